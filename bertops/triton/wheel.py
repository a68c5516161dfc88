"""Find the pieces of Triton inside installed wheels: the tritonserver binary, its python backend, perf_analyzer.

* the binary and its backend need the ``nvidia-pytriton`` wheel's vendored ``nvidia_pytriton.libs`` on
  ``LD_LIBRARY_PATH`` (the CUDA/NVML/DCGM errors it logs on a machine without a GPU are harmless);
* the Python backend looks for ``triton_python_backend_stub`` *next to* ``libtriton_python.so``,
  while the wheel keeps one stub per Python version elsewhere.  Instead of modifying the installed
  wheel we build a private backend directory of symlinks in a cache folder;
* the stub embeds ``libpython3.X`` and finds its packages through the first ``python3`` on
  ``PATH``, so the server must run with this interpreter's ``bin`` directory first on ``PATH``
  (and numpy < 2 there: with numpy 2 the stub returns empty outputs);
* ``perf_analyzer`` is not in the current tritonclient wheels (PyPI's ``perf-analyzer`` is a stub);
  the real binary ships in the ``tritonclient==2.40.0`` wheel, which ``bench/get_perf_analyzer.py``
  unpacks into the cache.  Nothing here downloads anything.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

from bertops.errors import BertopsError

PERF_ANALYZER_WHEEL_VERSION = "2.40.0"
"""The last tritonclient wheel that still carries the ``perf_analyzer`` binary."""

_PYTRITON_FIX = "install it with `pip install nvidia-pytriton` (it ships the tritonserver binary)"


def default_cache_dir() -> Path:
    """``$BERTOPS_CACHE_DIR``, else ``$XDG_CACHE_HOME/bertops``, else ``~/.cache/bertops``."""
    if os.environ.get("BERTOPS_CACHE_DIR"):
        return Path(os.environ["BERTOPS_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "bertops"


# --------------------------------------------------------------------------------------------
# Locating the pieces inside the nvidia-pytriton wheel
# --------------------------------------------------------------------------------------------


def _pytriton_root() -> Path:
    """The installed ``pytriton`` package directory, found without importing it (import is slow)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise BertopsError(f"nvidia-pytriton is not installed in {sys.prefix}; {_PYTRITON_FIX}.")
    return Path(next(iter(spec.submodule_search_locations)))


def _pytriton_libs() -> Path:
    """The wheel's vendored shared libraries (``external_libs`` in an editable pytriton checkout)."""
    root = _pytriton_root()
    for candidate in (root.parent / "nvidia_pytriton.libs", root / "tritonserver" / "external_libs"):
        if candidate.is_dir():
            return candidate
    raise BertopsError(
        f"the nvidia-pytriton install at {root} has no nvidia_pytriton.libs folder; "
        f"reinstall it with `pip install --force-reinstall nvidia-pytriton`."
    )


def find_tritonserver() -> Path:
    """Path of the ``tritonserver`` binary shipped inside the installed nvidia-pytriton wheel."""
    binary = _pytriton_root() / "tritonserver" / "bin" / "tritonserver"
    if not binary.is_file():
        raise BertopsError(f"no tritonserver binary at {binary}; {_PYTRITON_FIX}.")
    return binary


def _ensure_symlink(link: Path, target: Path) -> None:
    """Point ``link`` at ``target``; a no-op if it already does, atomic if it must change."""
    if link.is_symlink() and os.readlink(link) == str(target):
        return
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def prepare_backend_dir(cache_dir: Optional[Path] = None) -> Path:
    """Build (once) a backend directory for ``--backend-directory`` and return it.

    It holds ``python/`` with symlinks to the wheel's ``libtriton_python.so``,
    ``triton_python_backend_utils.py`` and the stub built for *this* interpreter's Python version.
    The folder name includes the Python version and a hash of the wheel location, so several
    environments can share one cache without re-pointing each other's links.
    """
    root = _pytriton_root()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "tritonserver" / "python_backend_stubs" / version / "triton_python_backend_stub"
    backend = root / "tritonserver" / "backends" / "python"
    sources = {
        "libtriton_python.so": backend / "libtriton_python.so",
        "triton_python_backend_utils.py": backend / "triton_python_backend_utils.py",
        "triton_python_backend_stub": stub,
    }
    for name, src in sources.items():
        if not src.is_file():
            hint = f"nvidia-pytriton has no Python backend stub for Python {version}; use a Python " \
                   f"version it supports" if name == "triton_python_backend_stub" else _PYTRITON_FIX
            raise BertopsError(f"missing {src}: {hint}.")

    tag = hashlib.sha1(str(root).encode()).hexdigest()[:10]
    backends = Path(cache_dir or default_cache_dir()) / "triton" / f"py{version}-{tag}" / "backends"
    python_dir = backends / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for name, src in sources.items():
        _ensure_symlink(python_dir / name, src)
    return backends


def _prepend(path: str, current: Optional[str]) -> str:
    return f"{path}{os.pathsep}{current}" if current else path


def server_env(base: Optional[dict] = None) -> dict:
    """Environment for the server process (a copy of ``base``, default ``os.environ``).

    ``LD_LIBRARY_PATH`` gets the wheel's vendored libraries (the private backend links defeat the
    libraries' ``$ORIGIN`` rpath); ``PATH`` gets this interpreter's ``bin`` directory first, so the
    Python backend stub runs with this environment's numpy/tokenizers/onnxruntime/bertops.
    """
    env = dict(os.environ if base is None else base)
    env["LD_LIBRARY_PATH"] = _prepend(str(_pytriton_libs()), env.get("LD_LIBRARY_PATH"))
    # Not resolved: a venv's python is a symlink, and the venv is found from the unresolved path.
    env["PATH"] = _prepend(str(Path(sys.executable).parent), env.get("PATH"))
    return env


def check_numpy() -> None:
    """The pip-wheel stub is built against numpy 1.x; with numpy 2 it silently returns empty outputs."""
    try:
        import numpy
    except ImportError:
        raise BertopsError(
            f"numpy is not installed in {sys.prefix}, and the Triton Python backend needs it; "
            f"run `pip install 'numpy<2'`."
        ) from None
    if int(numpy.__version__.split(".")[0]) >= 2:
        raise BertopsError(
            f"numpy {numpy.__version__} is installed, but the Triton Python backend stub from "
            f"nvidia-pytriton returns empty outputs with numpy 2; run `pip install 'numpy<2'`."
        )


# --------------------------------------------------------------------------------------------
# perf_analyzer (installed by bench/get_perf_analyzer.py; never downloaded here)
# --------------------------------------------------------------------------------------------


def perf_analyzer_dir(cache_dir: Optional[Path] = None) -> Path:
    """Where ``bench/get_perf_analyzer.py`` unpacks perf_analyzer: ``bin/perf_analyzer`` and ``lib/``."""
    return Path(cache_dir or default_cache_dir()) / "perf_analyzer" / PERF_ANALYZER_WHEEL_VERSION


def _perf_lib_dir(cache_dir: Optional[Path]) -> Path:
    """Private library folder for perf_analyzer: ``libcudart.so.12`` and ``libb64.so.0d`` links.

    Both libraries are vendored (renamed) in nvidia_pytriton.libs; perf_analyzer asks for them by
    their plain sonames.  Without the vendored libb64, Debian/Ubuntu's ``libb64-0d`` package works.
    """
    lib = perf_analyzer_dir(cache_dir) / "lib"
    lib.mkdir(parents=True, exist_ok=True)
    vendored = _pytriton_libs()
    for soname, pattern in (("libcudart.so.12", "libcudart-*.so.12*"), ("libb64.so.0d", "libb64-*.so.0d*")):
        found = sorted(vendored.glob(pattern))
        if found:
            _ensure_symlink(lib / soname, found[0])
    return lib


def perf_analyzer_env(cache_dir: Optional[Path] = None, base: Optional[dict] = None) -> dict:
    """Environment for running perf_analyzer: its private library folder first on ``LD_LIBRARY_PATH``."""
    env = dict(os.environ if base is None else base)
    env["LD_LIBRARY_PATH"] = _prepend(str(_perf_lib_dir(cache_dir)), env.get("LD_LIBRARY_PATH"))
    return env


def find_perf_analyzer(cache_dir: Optional[Path] = None) -> Path:
    """Path of a working, already installed ``perf_analyzer`` (run it with :func:`perf_analyzer_env`).

    It is not in the current tritonclient wheels (PyPI's ``perf-analyzer`` is a stub); the real binary
    ships in the ``tritonclient==2.40.0`` wheel, which ``python bench/get_perf_analyzer.py`` unpacks
    into :func:`perf_analyzer_dir`.  Checks that ``perf_analyzer --version`` actually runs.
    """
    base = perf_analyzer_dir(cache_dir)
    binary = base / "bin" / "perf_analyzer"
    if not binary.is_file():
        raise BertopsError(f"perf_analyzer is not installed at {binary}; run `python bench/get_perf_analyzer.py` "
                           f"(it unpacks the binary from the tritonclient=={PERF_ANALYZER_WHEEL_VERSION} wheel)")
    done = subprocess.run([str(binary), "--version"], capture_output=True, text=True,
                          env=perf_analyzer_env(cache_dir))
    if done.returncode != 0 or "Perf Analyzer" not in done.stdout + done.stderr:
        message = (done.stderr or done.stdout).strip()
        if "libb64" in message:
            fix = "install libb64: `apt-get install libb64-0d`"
        elif "libcudart" in message:
            fix = "put a libcudart.so.12 on LD_LIBRARY_PATH (`pip install nvidia-pytriton` ships one)"
        else:
            fix = f"delete {base} and run `python bench/get_perf_analyzer.py` again"
        raise BertopsError(f"perf_analyzer at {binary} does not run ({message[-400:]}); {fix}.")
    return binary
