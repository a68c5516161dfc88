#!/usr/bin/env python3
"""Set up ./.venv if needed, then run a Justfile recipe in it: ``python3 bootstrap.py RECIPE [ARGS]``.

Needs nothing but python3. The first run creates the venv, installs ``torch==2.13.0`` *before*
anything else (a plain ``torch`` requirement would pull a multi-GB CUDA build on a CPU machine),
then the project with its cpu, serve and dev extras, which bring the ``just`` binary
(rust-just). Later runs skip the install while pyproject.toml is unchanged, so they start in
about a second. Set BERTOPS_TORCH to install another torch build (e.g. a CUDA one on a GPU box).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / "bin"
STAMP = VENV / ".bertops-installed"
TORCH = os.environ.get("BERTOPS_TORCH", "torch==2.13.0")
EXTRAS = os.environ.get("BERTOPS_EXTRAS", "cpu,serve,dev")


def _run(*cmd: str) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def ensure_venv() -> None:
    if sys.version_info[:2] != (3, 11):
        sys.exit(f"bertops needs Python 3.11 (found {sys.version.split()[0]}); run this with python3.11")
    if not (BIN / "python").exists():
        print(f"creating {VENV.name}/", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + f"{TORCH}|{EXTRAS}".encode()).hexdigest()
    if STAMP.exists() and STAMP.read_text().strip() == want:
        return
    pip = (str(BIN / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q")
    _run(*pip, TORCH)  # first, so no later requirement can pull a CUDA build
    _run(*pip, "-e", f".[{EXTRAS}]")
    STAMP.write_text(want + "\n")


def main() -> None:
    ensure_venv()
    env = dict(os.environ)
    # The venv first on PATH: tritonserver's python backend finds its packages through `python3`.
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(VENV)
    args = sys.argv[1:] or ["--list"]
    os.chdir(ROOT)
    os.execve(str(BIN / "just"), [str(BIN / "just"), *args], env)


if __name__ == "__main__":
    main()
