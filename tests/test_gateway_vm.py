"""The gateway with kernel WireGuard, in a VM (this kernel has no WireGuard).

Boots Debian's kernel once (tests/vm/runner.py) and runs the namespace
gateway tests inside it, where MESHBOX_IN_VM makes the box use the kernel
backend through netlink.
"""

import os
import sys
import time

import pytest

from vm import runner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Seconds for boot and the four tests. Under qemu TCG each Python start
# (meshbox and every CLI call) takes about 9 s, so the run takes about 580 s.
VM_TIMEOUT = 1200


@pytest.mark.skipif(os.environ.get("MESHBOX_IN_VM") == "1", reason="already inside the VM")
def test_gateway_with_kernel_wireguard_in_vm():
    available, reason = runner.vm_available()
    if not available:
        pytest.skip(reason)
    started = time.monotonic()
    code, output = runner.run_in_vm(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
         os.path.join(ROOT, "tests", "test_gateway.py"), "-k", "end_to_end or policy or crash"],
        timeout=VM_TIMEOUT, cwd=ROOT)
    text = output.decode(errors="replace")
    print(text[-6000:])
    print(f"VM run: {time.monotonic() - started:.1f} s")
    assert code == 0, text[-3000:]
    assert " passed" in text and "skipped" not in text.splitlines()[-1]
