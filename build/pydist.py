"""build/pydist.py: meshbox's wheel and sdist, for Raspberry Pi OS and other Linuxes.

    python3 build/pydist.py OUTDIR              (build/package calls it)

Calls the PEP 517 hooks of the backend pyproject.toml names (setuptools),
in a scratch copy of the files the distributions hold, so the backend's
own build/ folder never mixes with this one; no network, no isolation.
The wheel is pure Python (py3-none-any); the native helper is not in it:
pynacl, a dependency, serves instead (see native/README.md).
"""

import importlib
import os
import shutil
import sys
import tempfile
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("pyproject.toml", "README.md", "meshbox.py")


def main(outdir):
    outdir = os.path.abspath(outdir)
    os.makedirs(outdir, exist_ok=True)
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        backend = importlib.import_module(tomllib.load(f)["build-system"]["build-backend"])
    with tempfile.TemporaryDirectory() as work:
        for name in SOURCES:
            shutil.copy2(os.path.join(ROOT, name), work)
        here = os.getcwd()
        os.chdir(work)
        try:
            built = [backend.build_sdist(outdir), backend.build_wheel(outdir)]
        finally:
            os.chdir(here)
    for name in built:
        print(f"build/pydist.py: {os.path.join(outdir, name)} ({os.path.getsize(os.path.join(outdir, name))} bytes)")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: build/pydist.py OUTDIR")
    main(sys.argv[1])
