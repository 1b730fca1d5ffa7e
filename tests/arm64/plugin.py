"""pytest plugin for tests/arm64/run: make sys.executable start the arm64 interpreter.

Under qemu-user without binfmt_misc, the arm64 python3 cannot execve
itself; tests that start meshbox's CLI with sys.executable get the host
script that runs it under qemu instead.
"""

import os
import sys

sys.executable = os.environ["MESHBOX_ARM64_PYTHON"]
