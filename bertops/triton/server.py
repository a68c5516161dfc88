"""Run a real Triton Inference Server, and the real perf_analyzer, from pip wheels on a plain CPU box.

Why this module exists: NVIDIA ships Triton as a container, but the ``nvidia-pytriton`` wheel
carries a working ``tritonserver`` binary with the Python backend.  Using it directly (without
PyTriton's own Python-callable models) takes a few non-obvious steps, collected here:

* the binary and its backend need the wheel's vendored ``nvidia_pytriton.libs`` on
  ``LD_LIBRARY_PATH`` (the CUDA/NVML/DCGM errors it logs on a machine without a GPU are harmless);
* the Python backend looks for ``triton_python_backend_stub`` *next to* ``libtriton_python.so``,
  while the wheel keeps one stub per Python version elsewhere.  Instead of modifying the installed
  wheel we build a private backend directory of symlinks in a cache folder;
* the stub embeds ``libpython3.X`` and finds its packages through the first ``python3`` on
  ``PATH``, so the server must run with this interpreter's ``bin`` directory first on ``PATH``
  (and numpy < 2 there: with numpy 2 the stub returns empty outputs);
* ``perf_analyzer`` is not in the current tritonclient wheels (PyPI's ``perf-analyzer`` is a stub);
  the real binary ships in the ``tritonclient==2.40.0`` wheel.  We download that wheel into the cache
  (never installing it over the project's tritonclient), unzip the binary, and give it a private
  library directory with the ``libcudart.so.12`` and ``libb64.so.0d`` it links against.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections import deque
from pathlib import Path
from typing import Optional, Sequence

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


def _check_numpy() -> None:
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
# The server process
# --------------------------------------------------------------------------------------------


def _free_ports(host: str, count: int) -> list:
    """``count`` distinct free TCP ports on ``host`` (all held open together so they differ)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


_ERROR_LINE = re.compile(r"^(E\d{4} |error:)")
_CPU_NOISE = ("CUDA", "CudaDriverHelper", "NVML", "DCGM")


class TritonServer:
    """A ``tritonserver`` child process serving ``repo``; use as a context manager.

    >>> with TritonServer(Path("triton_models")) as server:   # doctest: +SKIP
    ...     client = tritonclient.http.InferenceServerClient(server.http_url)

    Ports left as ``None`` are picked free on ``host``.  The server's stdout and stderr go to
    ``log_file`` (a fresh temporary file when ``None``; see :attr:`log_path`), and errors raised
    here quote its last lines.  ``--exit-on-error`` and ``--strict-readiness`` make a model that
    fails to load stop the server, so :meth:`start` fails fast instead of serving half a repository.

    On shutdown Triton waits up to ``exit_timeout_secs`` for in-flight requests *and for open client
    connections* (an unclosed keep-alive ``tritonclient.http`` client counts), so close clients
    before :meth:`stop`, or it takes that long; Triton's own default of 30 s is lowered to 10 here.
    """

    def __init__(
        self,
        repo: Path,
        http_port: Optional[int] = None,
        grpc_port: Optional[int] = None,
        metrics_port: Optional[int] = None,
        host: str = "127.0.0.1",
        log_file: Optional[Path] = None,
        extra_args: Sequence[str] = (),
        model_control_mode: str = "none",
        cache_dir: Optional[Path] = None,
        exit_timeout_secs: int = 10,
    ) -> None:
        self.repo = Path(repo)
        self.host = host
        free = iter(_free_ports(host, [http_port, grpc_port, metrics_port].count(None)))
        self.http_port = http_port if http_port is not None else next(free)
        self.grpc_port = grpc_port if grpc_port is not None else next(free)
        self.metrics_port = metrics_port if metrics_port is not None else next(free)
        if log_file is None:
            fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(fd)
            log_file = Path(name)
        self.log_path = Path(log_file)
        self.extra_args = tuple(extra_args)
        self.model_control_mode = model_control_mode
        self.cache_dir = cache_dir
        self.exit_timeout_secs = exit_timeout_secs
        self.process: Optional[subprocess.Popen] = None

    # -- addresses ---------------------------------------------------------------------------

    @property
    def _client_host(self) -> str:
        """Where a local client connects: a wildcard bind address is reachable on loopback."""
        if self.host in ("0.0.0.0", ""):
            return "127.0.0.1"
        if self.host == "::":
            return "[::1]"
        return f"[{self.host}]" if ":" in self.host else self.host

    @property
    def http_url(self) -> str:
        return f"{self._client_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self._client_host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"{self._client_host}:{self.metrics_port}"

    # -- lifecycle ---------------------------------------------------------------------------

    def command(self) -> list:
        """The full ``tritonserver`` command line (prepares the private backend directory)."""
        server = find_tritonserver()
        return [
            str(server),
            f"--model-repository={self.repo.resolve()}",
            f"--backend-directory={prepare_backend_dir(self.cache_dir)}",
            f"--cache-directory={server.parent.parent / 'caches'}",
            f"--model-control-mode={self.model_control_mode}",
            "--exit-on-error=true",
            "--strict-readiness=true",
            f"--exit-timeout-secs={self.exit_timeout_secs}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            *self.extra_args,
        ]

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def is_ready(self) -> bool:
        """True when ``/v2/health/ready`` answers 200 (with strict readiness: all models loaded)."""
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, lines: int = 15) -> str:
        """The last ``lines`` lines of the server log, without its wide status tables."""
        try:
            with open(self.log_path, errors="replace") as fh:
                kept = (line for line in fh if not line.startswith(("|", "+")))
                return "".join(deque(kept, maxlen=lines))
        except OSError:
            return ""

    def log_errors(self, limit: int = 10) -> list:
        """Error lines of the server log, minus the CUDA/NVML/DCGM noise of a machine without a GPU."""
        try:
            with open(self.log_path, errors="replace") as fh:
                errors = [line.rstrip("\n")[:800] for line in fh
                          if _ERROR_LINE.match(line) and not any(n in line for n in _CPU_NOISE)]
        except OSError:
            return []
        return errors[:limit]

    def _failure(self, problem: str) -> BertopsError:
        errors, tail = self.log_errors(), self.log_tail()
        hint = ""
        if "libpython" in tail:
            v = f"{sys.version_info.major}.{sys.version_info.minor}"
            hint = f" The Python backend stub needs libpython{v}.so: `apt-get install libpython{v}`."
        details = "errors:\n" + "\n".join(errors) + "\n" if errors else ""
        return BertopsError(
            f"Triton Inference Server {problem} (repository {self.repo}).{hint} Fix what the server "
            f"log reports (full log: {self.log_path}); {details}last lines:\n{tail}"
        )

    def start(self, timeout: float = 120.0) -> "TritonServer":
        """Launch the server and wait until it reports ready; raise :class:`BertopsError` if it doesn't."""
        if self.running:
            return self
        if not self.repo.is_dir():
            raise BertopsError(f"model repository {self.repo} is not a directory; pass the folder "
                               f"that holds one sub-folder per model.")
        _check_numpy()
        cmd, env = self.command(), server_env()
        with open(self.log_path, "ab") as log:
            # A new session: Ctrl-C in a terminal does not reach the server twice, and stop() can
            # kill the Python backend stubs along with the server as one process group.
            self.process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self.is_ready():
            if self.process.poll() is not None:
                code = self.process.returncode
                self._reap_group()
                raise self._failure(f"exited with code {code} while starting")
            if time.monotonic() > deadline:
                self.stop()
                raise self._failure(f"was not ready after {timeout:.0f} s")
            time.sleep(0.2)
        return self

    def _reap_group(self) -> None:
        """SIGKILL whatever is left of the server's process group (stray backend stubs)."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, grace: Optional[float] = None) -> Optional[int]:
        """SIGINT (Triton's graceful shutdown), then SIGKILL after ``grace`` seconds; returns the exit code.

        ``grace`` defaults to the server's own drain time (``exit_timeout_secs``) plus 10 s.
        """
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=self.exit_timeout_secs + 10 if grace is None else grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reap_group()
        return self.process.returncode

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# perf_analyzer
# --------------------------------------------------------------------------------------------


def _perf_dir(cache_dir: Optional[Path]) -> Path:
    return Path(cache_dir or default_cache_dir()) / "perf_analyzer" / PERF_ANALYZER_WHEEL_VERSION


def _download_wheel(dest: Path) -> Path:
    """The cached tritonclient 2.40.0 wheel, downloaded with this interpreter's pip if missing."""
    wheels = sorted(dest.glob(f"tritonclient-{PERF_ANALYZER_WHEEL_VERSION}-*.whl"))
    if wheels:
        return wheels[0]
    spec = f"tritonclient=={PERF_ANALYZER_WHEEL_VERSION}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", spec,
           "-d", str(dest)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob(f"tritonclient-{PERF_ANALYZER_WHEEL_VERSION}-*.whl"))
    if done.returncode != 0 or not wheels:
        raise BertopsError(
            f"could not download the {spec} wheel that carries perf_analyzer "
            f"(`{' '.join(cmd)}` failed: {(done.stderr or done.stdout).strip()[-500:]}); "
            f"download it by hand into {dest}."
        )
    return wheels[0]


def _perf_lib_dir(cache_dir: Optional[Path]) -> Path:
    """Private library folder for perf_analyzer: ``libcudart.so.12`` and ``libb64.so.0d`` links.

    Both libraries are vendored (renamed) in nvidia_pytriton.libs; perf_analyzer asks for them by
    their plain sonames.  Without the vendored libb64, Debian/Ubuntu's ``libb64-0d`` package works.
    """
    lib = _perf_dir(cache_dir) / "lib"
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
    """Path of a working ``perf_analyzer`` (run it with :func:`perf_analyzer_env`).

    The first call downloads the tritonclient 2.40.0 wheel (~12 MB) into the cache and unzips the
    binary; every call checks that ``perf_analyzer --version`` actually runs.
    """
    base = _perf_dir(cache_dir)
    binary = base / "bin" / "perf_analyzer"
    if not binary.is_file():
        base.mkdir(parents=True, exist_ok=True)
        wheel = _download_wheel(base)
        with zipfile.ZipFile(wheel) as zf:
            members = [n for n in zf.namelist() if n.endswith(".data/data/bin/perf_analyzer")]
            if not members:
                raise BertopsError(f"{wheel} holds no perf_analyzer binary; delete it and retry.")
            binary.parent.mkdir(parents=True, exist_ok=True)
            tmp = binary.with_name(f".perf_analyzer.{os.getpid()}.tmp")
            with zf.open(members[0]) as src, open(tmp, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        tmp.chmod(tmp.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        os.replace(tmp, binary)

    done = subprocess.run([str(binary), "--version"], capture_output=True, text=True,
                          env=perf_analyzer_env(cache_dir))
    if done.returncode != 0 or "Perf Analyzer" not in done.stdout + done.stderr:
        message = (done.stderr or done.stdout).strip()
        if "libb64" in message:
            fix = "install libb64: `apt-get install libb64-0d`"
        elif "libcudart" in message:
            fix = "put a libcudart.so.12 on LD_LIBRARY_PATH (`pip install nvidia-pytriton` ships one)"
        else:
            fix = f"delete {base} to download it again"
        raise BertopsError(f"perf_analyzer at {binary} does not run ({message[-400:]}); {fix}.")
    return binary
