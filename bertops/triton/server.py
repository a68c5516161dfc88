"""Run one real tritonserver (from the nvidia-pytriton wheel) as a child process: start, inspect, stop.

What keeps the process safe to run (see docs/deploy.md, "Security" and "Health"):

* the shared-memory, logging, trace and model-repository APIs are restricted over HTTP and gRPC to
  requests carrying the header ``bertops-admin-key`` (``$BERTOPS_ADMIN_KEY``, else a random key per
  server): registering the python backend's own /dev/shm regions as "system shared memory" aborts
  tritonserver, and ``/v2/logging`` changes its verbosity;
* each server gets its own prefix for the python backend's /dev/shm regions, so :meth:`TritonServer.stop`
  removes exactly the regions a killed or failed server leaves behind, a new server removes those of
  bertops servers that are gone (:func:`remove_stale_shm`), and the regions are chmod 0600 as soon as
  they appear (the backend creates them 0644);
* the ports are checked before anything starts ("address in use" instead of a half-started server);
* tritonserver gets SIGTERM when the Python thread that started it dies (``PR_SET_PDEATHSIG``);
* :func:`list_stubs` finds the python-backend stub processes, so a supervisor
  (:mod:`bertops.triton.supervisor`) can notice one that died.

Locating the binary and its backend is :mod:`bertops.triton.wheel`'s job.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from bertops.errors import BertopsError
from bertops.triton.wheel import check_numpy, find_tritonserver, prepare_backend_dir, server_env

ADMIN_KEY_ENV = "BERTOPS_ADMIN_KEY"
"""Environment variable holding the key that unlocks the restricted APIs (a random key when unset)."""
ADMIN_HEADER = "bertops-admin-key"
"""HTTP header that must carry the admin key for a restricted API (gRPC: ``triton-grpc-protocol-bertops-admin-key``)."""
RESTRICTED_APIS = ("shared-memory", "logging", "trace", "model-repository")
"""Triton APIs a client may use only with the admin key (model-repository = model control)."""
SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "triton_python_backend_shm_region_"
"""Triton's own prefix for the python backend's regions; each server appends a random tag."""

# --------------------------------------------------------------------------------------------
# Ports, processes, /dev/shm
# --------------------------------------------------------------------------------------------


def _socket(host: str) -> socket.socket:
    return socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)


def _free_ports(host: str, count: int) -> list:
    """``count`` distinct free TCP ports on ``host`` (all held open together so they differ)."""
    socks = []
    try:
        for _ in range(count):
            s = _socket(host)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def check_ports_free(host: str, ports: dict) -> None:
    """Raise "address in use" naming the port if any of ``ports`` (``{"http": 8000, ...}``) is taken on ``host``.

    Binds like a server does (``SO_REUSEADDR``: a port in TIME_WAIT counts as free, a listener does not).
    """
    for kind, port in ports.items():
        s = _socket(host)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise BertopsError(f"cannot bind {host}:{port} ({kind} port): {exc.strerror}; "
                                   f"pass an address of this machine with --host") from None
            raise BertopsError(_in_use(host, port, kind)) from None
        finally:
            s.close()


def _in_use(host: str, port, kind: str) -> str:
    return (f"address in use: {host}:{port} ({kind} port) is already taken by another process; stop it, "
            f"or pick another port with --{kind}-port")


def _die_with_parent_hook():
    """A ``preexec_fn`` asking Linux to SIGTERM the child when the thread that started it dies."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before fork: nothing to load in the child
    parent = os.getpid()

    def hook() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died between fork and prctl
            os.kill(os.getpid(), signal.SIGTERM)

    return hook


def _proc_stat(pid: str) -> Optional[tuple]:
    """``(state, ppid, pgrp)`` of a process from /proc, or None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1]), int(fields[2])


def group_members(pgid: int) -> list:
    """PIDs of the live (not zombie) processes in process group ``pgid``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _proc_stat(entry)
            if stat and stat[2] == pgid and stat[0] != "Z":
                found.append(int(entry))
    return found


_OWN_REGION = re.compile(re.escape(SHM_PREFIX) + r"([0-9a-f]{12})_")


def remove_stale_shm() -> list:
    """Remove /dev/shm regions of bertops-started servers that are no longer running; return them.

    Only regions named with a bertops server tag (``SHM_PREFIX + 12 hex + "_"``) whose tag no running
    tritonserver's command line carries: left by a server that was killed, or forced to exit while
    clients kept connections open past its drain time.
    """
    tags = {m.group(1) for r in SHM_DIR.glob(f"{SHM_PREFIX}*") if (m := _OWN_REGION.match(r.name))}
    if not tags:
        return []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            tags = {t for t in tags if f"shm-region-prefix-name={SHM_PREFIX}{t}_".encode() not in argv}
    removed = []
    for region in SHM_DIR.glob(f"{SHM_PREFIX}*"):
        m = _OWN_REGION.match(region.name)
        if m and m.group(1) in tags:
            try:
                region.unlink()
                removed.append(region)
            except OSError:  # another user's, or gone meanwhile
                pass
    return removed


@dataclass(frozen=True)
class Stub:
    """One python-backend stub process: ``instance`` is Triton's instance name (``minilm_encoder_0_0``)."""

    pid: int
    model: str
    instance: str
    region: str


def list_stubs(server_pid: int) -> list:
    """The live python-backend stubs that are children of tritonserver ``server_pid``.

    A stub's command line is ``stub MODEL_DIR/VERSION/model.py REGION SIZE GROWTH PARENT_PID LIB HANDLE INSTANCE ...``
    (python_backend's stub_launcher.cc); a killed stub stays a zombie until Triton reaps it and is not listed.
    """
    stubs = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = _proc_stat(entry)
        if not stat or stat[1] != server_pid or stat[0] == "Z":
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if len(argv) > 8 and argv[0].endswith("triton_python_backend_stub"):
            stubs.append(Stub(int(entry), Path(argv[1]).parent.parent.name, argv[8], argv[2]))
    return stubs


# --------------------------------------------------------------------------------------------
# The server process
# --------------------------------------------------------------------------------------------


_ERROR_LINE = re.compile(r"^(E\d{4} |error:)")
_CPU_NOISE = ("CUDA", "CudaDriverHelper", "NVML", "DCGM")
_IN_USE = re.compile(r"failed to start (\w+) service: .*Socket '(.*):(\d+)' already in use")


class TritonServer:
    """A ``tritonserver`` child process serving ``repo``; use as a context manager.

    >>> with TritonServer(Path("triton_models")) as server:   # doctest: +SKIP
    ...     client = tritonclient.http.InferenceServerClient(server.http_url)

    Ports left as ``None`` are picked free on ``host``; given ports are checked before starting.
    The server's stdout and stderr go to ``log_file`` (a fresh temporary file when ``None``; see
    :attr:`log_path`), and errors raised here quote its last lines.  ``--exit-on-error`` and
    ``--strict-readiness`` make a model that fails to load stop the server, so :meth:`start` fails
    fast instead of serving half a repository.

    ``admin_key`` unlocks :data:`RESTRICTED_APIS` (header :data:`ADMIN_HEADER`); default
    ``$BERTOPS_ADMIN_KEY``, else a random key only this object knows, which keeps them closed to clients.

    On shutdown Triton 2.51 waits up to ``exit_timeout_secs`` for open HTTP connections -- an idle
    keep-alive client counts as much as a request in flight -- then exits without unloading its models;
    :meth:`stop` kills what is left and removes this server's /dev/shm regions either way.  The 3 s
    default keeps SIGTERM-to-gone at about 4 s; raise it if requests take longer to finish.
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
        exit_timeout_secs: int = 3,
        admin_key: Optional[str] = None,
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
        self.admin_key = admin_key or os.environ.get(ADMIN_KEY_ENV) or secrets.token_urlsafe(24)
        if not re.fullmatch(r"[A-Za-z0-9._~+/-]+", self.admin_key):
            raise BertopsError(f"${ADMIN_KEY_ENV} may hold only letters, digits and ._~+/-; choose another key")
        self.shm_prefix = f"{SHM_PREFIX}{secrets.token_hex(6)}_"
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

    @property
    def admin_headers(self) -> dict:
        """HTTP headers that unlock the restricted APIs of this server."""
        return {ADMIN_HEADER: self.admin_key}

    @property
    def grpc_admin_headers(self) -> dict:
        """gRPC metadata that unlocks them (Triton prefixes the key with ``triton-grpc-protocol-``)."""
        return {f"triton-grpc-protocol-{ADMIN_HEADER}": self.admin_key}

    # -- lifecycle ---------------------------------------------------------------------------

    def command(self) -> list:
        """The full ``tritonserver`` command line (prepares the private backend directory)."""
        server = find_tritonserver()
        restricted = f"{','.join(RESTRICTED_APIS)}:{ADMIN_HEADER}={self.admin_key}"
        return [
            str(server),
            f"--model-repository={self.repo.resolve()}",
            f"--backend-directory={prepare_backend_dir(self.cache_dir)}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            f"--cache-directory={server.parent.parent / 'caches'}",
            f"--model-control-mode={self.model_control_mode}",
            "--exit-on-error=true",
            "--strict-readiness=true",
            f"--exit-timeout-secs={self.exit_timeout_secs}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--http-restricted-api={restricted}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--grpc-restricted-protocol={restricted}",
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

    def stubs(self) -> list:
        """The live python-backend stubs of this server (see :func:`list_stubs`)."""
        return list_stubs(self.process.pid) if self.running else []

    def shm_regions(self) -> list:
        """This server's python-backend regions in /dev/shm."""
        return sorted(SHM_DIR.glob(f"{self.shm_prefix}*"))

    def protect_shm(self) -> None:
        """chmod this server's /dev/shm regions 0600 (the python backend creates them 0644)."""
        for region in self.shm_regions():
            try:
                if region.stat().st_mode & 0o077:
                    region.chmod(0o600)
            except OSError:  # removed meanwhile
                pass

    def remove_shm(self) -> None:
        """Remove this server's /dev/shm regions (only once its processes are gone)."""
        for region in self.shm_regions():
            region.unlink(missing_ok=True)

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
        for line in errors:
            in_use = _IN_USE.search(line)
            if in_use:
                return BertopsError(_in_use(in_use.group(2), in_use.group(3), in_use.group(1).lower()))
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
        """Launch the server and wait until it reports ready; raise :class:`BertopsError` if it doesn't.

        Start it from a thread that outlives it (the main thread): the server gets SIGTERM when the
        starting thread ends.
        """
        if self.running:
            return self
        if not self.repo.is_dir():
            raise BertopsError(f"model repository {self.repo} is not a directory; pass the folder "
                               f"that holds one sub-folder per model.")
        check_numpy()
        cmd, env = self.command(), server_env()
        check_ports_free(self.host, {"http": self.http_port, "grpc": self.grpc_port, "metrics": self.metrics_port})
        remove_stale_shm()
        with open(self.log_path, "ab") as log:
            # A new session: Ctrl-C in a terminal does not reach the server twice, and stop() can
            # kill the Python backend stubs along with the server as one process group.
            self.process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            env=env, start_new_session=True, preexec_fn=_die_with_parent_hook())
        try:
            deadline = time.monotonic() + timeout
            while not self.is_ready():
                self.protect_shm()
                if self.process.poll() is not None:
                    raise self._failure(f"exited with code {self.process.returncode} while starting")
                if time.monotonic() > deadline:
                    raise self._failure(f"was not ready after {timeout:.0f} s")
                time.sleep(0.2)
            self.protect_shm()
        except BaseException:
            self.stop(grace=2)
            raise
        return self

    def _reap_group(self, wait: float = 5.0) -> None:
        """SIGKILL whatever is left of the server's process group and wait until it is gone."""
        if self.process is None:
            return
        deadline = time.monotonic() + wait
        while True:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                return
            if not group_members(self.process.pid) or time.monotonic() > deadline:
                return
            time.sleep(0.05)

    def stop(self, grace: Optional[float] = None) -> Optional[int]:
        """SIGINT (Triton's graceful shutdown), SIGKILL after ``grace`` s, remove the /dev/shm regions; the exit code.

        ``grace`` defaults to the server's own drain time (``exit_timeout_secs``) plus 3 s.
        """
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=self.exit_timeout_secs + 3 if grace is None else grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reap_group()
        self.remove_shm()
        return self.process.returncode

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
