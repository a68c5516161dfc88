"""Install Triton's perf_analyzer for the benchmarks: unpack it from the tritonclient 2.40.0 wheel into the cache.

``perf_analyzer`` is not in the current tritonclient wheels (PyPI's ``perf-analyzer`` is a stub); the
real binary ships in ``tritonclient==2.40.0``.  This script downloads that wheel with pip (never
installing it over the project's tritonclient), unzips the binary to
``bertops.triton.wheel.perf_analyzer_dir()/bin/perf_analyzer`` and checks that it runs, which is where
``bertops.triton.wheel.find_perf_analyzer`` looks.  Library code never downloads anything.

    python bench/get_perf_analyzer.py            # prints the binary's path
"""

from __future__ import annotations

import argparse
import os
import stat
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from bertops.errors import BertopsError
from bertops.triton.wheel import PERF_ANALYZER_WHEEL_VERSION, find_perf_analyzer, perf_analyzer_dir


def download_wheel(dest: Path) -> Path:
    """The tritonclient 2.40.0 wheel in ``dest``, downloaded with this interpreter's pip if missing."""
    pattern = f"tritonclient-{PERF_ANALYZER_WHEEL_VERSION}-*.whl"
    if wheels := sorted(dest.glob(pattern)):
        return wheels[0]
    spec = f"tritonclient=={PERF_ANALYZER_WHEEL_VERSION}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", spec, "-d", str(dest)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob(pattern))
    if done.returncode != 0 or not wheels:
        raise SystemExit(f"`{' '.join(cmd)}` failed: {(done.stderr or done.stdout).strip()[-500:]}")
    return wheels[0]


def install(cache_dir: Path | None = None) -> Path:
    """Unpack perf_analyzer (once) and return the path of the working binary."""
    base = perf_analyzer_dir(cache_dir)
    binary = base / "bin" / "perf_analyzer"
    if not binary.is_file():
        base.mkdir(parents=True, exist_ok=True)
        wheel = download_wheel(base)
        with zipfile.ZipFile(wheel) as zf:
            members = [n for n in zf.namelist() if n.endswith(".data/data/bin/perf_analyzer")]
            if not members:
                raise SystemExit(f"{wheel} holds no perf_analyzer binary; delete it and retry")
            binary.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(dir=binary.parent, prefix=".perf_analyzer.")
            with zf.open(members[0]) as src, os.fdopen(fd, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        tmp = Path(name)
        tmp.chmod(tmp.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        os.replace(tmp, binary)
    try:
        return find_perf_analyzer(cache_dir)
    except BertopsError as exc:
        raise SystemExit(str(exc)) from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache-dir", type=Path, default=None, help="default: $BERTOPS_CACHE_DIR or ~/.cache/bertops")
    print(install(ap.parse_args().cache_dir))


if __name__ == "__main__":
    main()
