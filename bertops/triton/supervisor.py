"""Keep a tritonserver serving: restart it when it or a python-backend stub dies, stop it on SIGTERM/SIGINT.

Triton 2.51's python backend does not restart a stub that died (``kill -9``, OOM killer): every
request to that model then fails with "Stub process ... is not healthy" while ``/v2/health/ready``
still answers 200.  :class:`Supervisor` watches the server (twice a second: the process, the stub
processes it started) and probes each served model with a real inference (:func:`bertops.triton.health.probe`,
every ``probe_every`` s in a background thread); on a failure it restarts tritonserver -- at most
``max_restarts`` times within ``restart_window`` s, with one log line each -- then gives up with an error.

:func:`serve_until_stopped` is ``bertops serve``: it turns SIGTERM, SIGINT and SIGHUP into a clean stop
(tritonserver and its stubs gone, no /dev/shm region left) from any point, model loading included.
"""

from __future__ import annotations

import signal
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

from bertops.errors import BertopsError
from bertops.triton.health import probe
from bertops.triton.server import TritonServer

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Stopped(BaseException):
    """Raised in the main thread when a stop signal arrives (a BaseException: no ``except Exception`` eats it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signal_name = signal.Signals(signum).name


@contextmanager
def stop_signals() -> Iterator[None]:
    """Within the block, SIGTERM/SIGINT/SIGHUP raise :class:`Stopped`; the previous handlers come back after."""

    def handler(signum, _frame):
        raise Stopped(signum)

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextmanager
def signals_blocked() -> Iterator[None]:
    """Hold stop signals back while cleaning up, so a second Ctrl-C cannot interrupt it; ones that
    arrived meanwhile are dropped (the cleanup they asked for is done, and it is bounded)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        handlers = {s: signal.signal(s, signal.SIG_IGN) for s in STOP_SIGNALS}  # pending ones are discarded
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
        for s, h in handlers.items():
            signal.signal(s, h)


class Supervisor:
    """Runs ``server`` and heals it; ``models`` are the served models to probe (empty: no probes)."""

    def __init__(
        self,
        server: TritonServer,
        models: Sequence[str] = (),
        *,
        log: Callable[[str], None] = print,
        start_timeout: float = 300.0,
        max_restarts: int = 5,
        restart_window: float = 600.0,
        poll_every: float = 0.5,
        probe_every: float = 10.0,
        probe_timeout: float = 20.0,
        probe_failures: int = 2,
    ) -> None:
        self.server = server
        self.models = list(models)
        self.log = log
        self.start_timeout = start_timeout
        self.max_restarts = max_restarts
        self.restart_window = restart_window
        self.poll_every = poll_every
        self.probe_every = probe_every
        self.probe_timeout = probe_timeout
        self.probe_failures = probe_failures
        self.restarts: deque = deque()  # monotonic times of the restarts within the window
        self._stubs: dict = {}  # pid -> instance name, as started
        self._pool: ThreadPoolExecutor | None = None
        self._probe: Future | None = None
        self._next_probe = 0.0
        self._failed_probes = 0

    # -- watching ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the server and remember its stubs (the baseline a dead stub is noticed against)."""
        self.server.start(self.start_timeout)
        self._stubs = {s.pid: s.instance for s in self.server.stubs()}
        self._failed_probes = 0
        self._probe = None
        self._next_probe = time.monotonic() + self.probe_every

    def problem(self) -> str | None:
        """What is wrong with the server right now, or None: it exited, a stub died, or probes keep failing."""
        if not self.server.running:
            return f"tritonserver exited with code {self.server.process.returncode if self.server.process else None}"
        alive = {s.pid for s in self.server.stubs()}
        dead = [f"{instance} (pid {pid})" for pid, instance in self._stubs.items() if pid not in alive]
        if dead:
            # A dying tritonserver loses its stubs (they stop being its children) a moment before it can be
            # reaped: give it that moment, so the log names the real cause.
            deadline = time.monotonic() + 1.0
            while self.server.running and time.monotonic() < deadline:
                time.sleep(0.05)
            if not self.server.running:
                return f"tritonserver exited with code {self.server.process.returncode if self.server.process else None}"
            return f"python-backend stub {', '.join(dead)} died"
        return self._probe_problem()

    def _probe_problem(self) -> str | None:
        """Collect a finished probe round, start the next one when due; a problem after ``probe_failures`` in a row."""
        if not self.models:
            return None
        if self._probe is not None and self._probe.done():
            error = self._probe.exception()
            self._probe = None
            self._failed_probes = self._failed_probes + 1 if error else 0
            if error and self._failed_probes >= self.probe_failures:
                return f"{self._failed_probes} health probes in a row failed; last: {error}"
        if self._probe is None and time.monotonic() >= self._next_probe:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="bertops-probe")
            url, timeout = self.server.http_url, self.probe_timeout
            self._probe = self._pool.submit(lambda: [probe(url, m, timeout) for m in self.models])
            self._next_probe = time.monotonic() + self.probe_every
        return None

    def restart(self, reason: str) -> None:
        """Log one line, stop what is left of the server, start it again; raise once the restart budget is spent."""
        now = time.monotonic()
        while self.restarts and now - self.restarts[0] > self.restart_window:
            self.restarts.popleft()
        if len(self.restarts) >= self.max_restarts:
            raise BertopsError(
                f"{reason}, and tritonserver was already restarted {len(self.restarts)} times in the last "
                f"{self.restart_window:.0f} s; giving up. See the server log {self.server.log_path}"
            )
        self.restarts.append(now)
        self.log(f"{reason}; restarting tritonserver ({len(self.restarts)}/{self.max_restarts} "
                 f"within {self.restart_window:.0f} s)")
        self.server.stop(grace=3)
        while True:
            try:
                self.start()
                return
            except BertopsError as exc:  # a failed start counts against the same budget
                if len(self.restarts) >= self.max_restarts:
                    raise
                self.restarts.append(time.monotonic())
                self.log(f"tritonserver did not start again ({str(exc).splitlines()[0]}); retrying "
                         f"({len(self.restarts)}/{self.max_restarts})")
                time.sleep(1.0)

    def run(self) -> None:
        """Watch and heal until a stop signal (:class:`Stopped`) or until restarts run out (:class:`BertopsError`)."""
        while True:
            reason = self.problem()
            if reason:
                self.restart(reason)
            time.sleep(self.poll_every)

    def close(self) -> None:
        """Stop the server (and its stubs, and its /dev/shm regions) and the probe thread."""
        self.server.stop()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def serve_until_stopped(supervisor: Supervisor, on_ready: Callable[[], None]) -> str | None:
    """Start, call ``on_ready``, heal until a stop signal; always stop the server. Returns the signal's name.

    Raises :class:`BertopsError` when the server cannot start or keeps failing.
    """
    with stop_signals():
        try:
            supervisor.start()
            on_ready()
            supervisor.run()
        except Stopped as stop:
            with signals_blocked():
                supervisor.log(f"{stop.signal_name}: stopping tritonserver ...")
            return stop.signal_name
        finally:
            with signals_blocked():
                supervisor.close()
    return None
