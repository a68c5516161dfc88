"""The server under faults and abuse: dead stubs healed, signals obeyed, admin APIs closed, big requests bounded.

Everything runs against the real tritonserver (nvidia-pytriton wheel) serving a tiny random embeddings
model built by ``bertops triton build``; ``bertops serve`` runs as a real subprocess where the test is
about the command. Every test must leave no process and no /dev/shm region behind: the autouse
``no_leftovers`` fixture makes this process a child subreaper (orphans of a killed ``bertops serve``
come back to it) and fails a test that leaves a live descendant or a region of a server it started.
"""

from __future__ import annotations

import ctypes
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest

from bertops.errors import BertopsError

SHORT = ["hello world"]
MB = 1_000_000


# ------------------------------------------------------------------------------------------------
# Processes and /dev/shm: what a test leaves behind
# ------------------------------------------------------------------------------------------------


def _stat(pid: int):
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0], int(fields[1])
    except (OSError, IndexError):
        return None


def descendants(root: int) -> set[int]:
    """Live (not zombie) processes below ``root``."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) and st[0] != "Z":
            children.setdefault(st[1], []).append(int(entry))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] != "Z"


def regions(prefix: str) -> list[Path]:
    return sorted(Path("/dev/shm").glob(f"{prefix}*"))


def server_prefix(tritonserver_pid: int) -> str:
    """The /dev/shm prefix a running tritonserver was given (its --backend-config)."""
    argv = Path(f"/proc/{tritonserver_pid}/cmdline").read_bytes().decode().split("\0")
    return next(a.split("shm-region-prefix-name=", 1)[1] for a in argv if "shm-region-prefix-name=" in a)


def orphan_regions(before: set[Path]) -> list[Path]:
    """Python-backend regions created since ``before`` that no running tritonserver owns."""
    owners = []
    for entry in os.listdir("/proc"):
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if argv[0].endswith("tritonserver"):
            prefixes = [a.split("shm-region-prefix-name=", 1)[1] for a in argv if "shm-region-prefix-name=" in a]
            owners.append(prefixes[0] if prefixes else "triton_python_backend_shm_region_")
    new = set(Path("/dev/shm").glob("triton_python_backend_shm_region_*")) - before
    return sorted(r for r in new if not any(r.name.startswith(o) for o in owners))


def wait_for(check, timeout: float, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(every)
    return check()


@pytest.fixture(autouse=True)
def no_leftovers():
    """Yields a list to which tests add the /dev/shm prefixes of servers they start; checks both after."""
    ctypes.CDLL(None).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER: orphans of our children are re-parented to us
    before = descendants(os.getpid())
    prefixes: list[str] = []
    yield prefixes
    left = wait_for(lambda: not (descendants(os.getpid()) - before), 15) or (descendants(os.getpid()) - before)
    assert left is True, f"processes left behind: {[(p, Path(f'/proc/{p}/comm').read_text().strip()) for p in left]}"
    leaked = [r for p in prefixes for r in regions(p)]
    assert not leaked, f"/dev/shm regions left behind: {leaked}"
    while True:  # reap orphans re-parented to us (zombies), so later tests start clean
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                break
        except ChildProcessError:
            break


# ------------------------------------------------------------------------------------------------
# A tiny model repository, a module server, raw HTTP requests
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def export_dir(exported) -> Path:
    return exported("embeddings")


@pytest.fixture(scope="module")
def repo(export_dir, tmp_path_factory) -> Path:
    from bertops.triton.builder import build_repository

    repo = tmp_path_factory.mktemp("repo")
    # The default single pipeline with one instance: "the" stub to kill is the one process that
    # tokenizes, runs onnxruntime and post-processes; a process tree these tests can count
    # (the default of two instances is covered by the huge-rows test below).
    build_repository(export_dir, "tiny", repo, max_batch_size=8, preferred_batch_sizes=(4, 8), instances=1)
    return repo


@pytest.fixture(scope="module")
def predictor(export_dir):
    from bertops.infer import load_predictor

    return load_predictor(export_dir, threads=1)


@pytest.fixture(scope="module")
def server(repo):
    from bertops.triton.server import TritonServer

    srv = TritonServer(repo).start()
    yield srv
    srv.stop()
    assert not regions(srv.shm_prefix) and not srv.running


def body(texts, outputs=("RESULT",)) -> tuple[bytes, dict]:
    """A binary-tensor inference request for model ``tiny`` (built once, sent many times)."""
    import tritonclient.http as tc

    inp = tc.InferInput("TEXT", [len(texts), 1], "BYTES")
    inp.set_data_from_numpy(np.array([[t if isinstance(t, bytes) else t.encode()] for t in texts], dtype=object))
    outs = [tc.InferRequestedOutput(o, binary_data=False) for o in outputs]
    data, json_size = tc.InferenceServerClient.generate_request_body([inp], outs)
    headers = {"Content-Type": "application/octet-stream"}
    if json_size is not None:
        headers["Inference-Header-Content-Length"] = str(json_size)
    return data, headers


def post(conn: http.client.HTTPConnection, request: tuple[bytes, dict], model: str = "tiny") -> tuple[int, dict]:
    conn.request("POST", f"/v2/models/{model}/infer", request[0], request[1])
    answer = conn.getresponse()
    return answer.status, json.loads(answer.read())


def results(payload: dict) -> list[dict]:
    return [json.loads(r) for r in next(o for o in payload["outputs"] if o["name"] == "RESULT")["data"]]


def same_embeddings(served: list[dict], expected: list[dict]) -> bool:
    return len(served) == len(expected) and all(
        s["truncated"] == e["truncated"] and np.allclose(s["embedding"], e["embedding"], atol=1e-4)
        for s, e in zip(served, expected)
    )


def connect(url: str, timeout: float = 60) -> http.client.HTTPConnection:
    """A keep-alive HTTP connection; close it (or use it in ``with closing(...)``)."""
    host, port = url.rsplit(":", 1)
    return http.client.HTTPConnection(host, int(port), timeout=timeout)


# ------------------------------------------------------------------------------------------------
# `bertops serve` as a subprocess
# ------------------------------------------------------------------------------------------------


class Serve:
    """``bertops serve`` on free ports; ``.tritonserver`` is its current tritonserver pid."""

    def __init__(self, repo: Path, tmp: Path, prefixes: list[str], *ports: int):
        from bertops.triton.server import _free_ports

        self.http, self.grpc, self.metrics = ports or _free_ports("127.0.0.1", 3)
        self.out = tmp / "serve.out"
        cmd = [sys.executable, "-c", "from bertops.cli import main; main()", "serve", "--repo", str(repo),
               "--http-port", str(self.http), "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics),
               "--log-file", str(tmp / "tritonserver.log")]
        self.proc = subprocess.Popen(cmd, stdout=self.out.open("w"), stderr=subprocess.STDOUT,
                                     env={**os.environ, "COLUMNS": "250"})
        self.prefixes = prefixes

    @property
    def text(self) -> str:
        return self.out.read_text()

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.http}"

    def wait_serving(self, timeout: float = 180) -> None:
        assert wait_for(lambda: "Ctrl-C" in self.text or self.proc.poll() is not None, timeout), self.text
        assert "Ctrl-C" in self.text, self.text
        self.prefixes.append(server_prefix(self.tritonserver))

    @property
    def tritonserver(self) -> int:
        return next(p for p in descendants(self.proc.pid) if _stat(p)[1] == self.proc.pid)

    def stubs(self):
        from bertops.triton.server import list_stubs

        return list_stubs(self.tritonserver)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)


def probe(url: str, timeout: float = 5) -> subprocess.CompletedProcess:
    """The documented exec probe, run as a command."""
    return subprocess.run([sys.executable, "-m", "bertops.triton.health", "--url", url, "--model", "tiny",
                           "--timeout", str(timeout)], capture_output=True, text=True)


# ------------------------------------------------------------------------------------------------
# 1. A dead stub: noticed, healed; a dead or hung server: restarted, within a budget
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_killed_encoder_stub_under_load_is_noticed_and_healed(repo, predictor, sentences, tmp_path, no_leftovers):
    import threading

    serve = Serve(repo, tmp_path, no_leftovers)
    try:
        serve.wait_serving()
        assert probe(serve.url).returncode == 0
        texts = sentences[:8]
        expected = predictor.predict(texts)
        request = body(texts)
        outcomes: list[tuple[float, bool]] = []
        stop = threading.Event()

        def load():  # one client sending real sentences back to back, every answer checked
            while not stop.is_set():
                conn = connect(serve.url, timeout=30)
                try:
                    status, payload = post(conn, request)
                    outcomes.append((time.monotonic(), status == 200 and same_embeddings(results(payload), expected)))
                except (OSError, http.client.HTTPException, ValueError):
                    outcomes.append((time.monotonic(), False))
                    time.sleep(0.05)
                finally:
                    conn.close()

        worker = threading.Thread(target=load)
        worker.start()
        try:
            assert wait_for(lambda: sum(ok for _, ok in outcomes) >= 5, 30), outcomes[-5:]
            old_server = serve.tritonserver
            encoder = next(s for s in serve.stubs() if s.model == "tiny")  # the stub running onnxruntime
            os.kill(encoder.pid, signal.SIGKILL)
            killed = time.monotonic()

            signal_seen = probe(serve.url, timeout=5)  # right after the kill: the probe must fail
            assert signal_seen.returncode == 1 and "unhealthy" in signal_seen.stderr, signal_seen
            assert wait_for(lambda: probe(serve.url).returncode == 0, 30, every=0.5), serve.text
            healed = time.monotonic() - killed
            failed = sum(not ok for t, ok in outcomes if t > killed)
            print(f"healed {healed:.1f} s after the kill; {failed} requests failed meanwhile")
            assert healed < 30
            assert wait_for(lambda: [t for t, ok in outcomes if ok and t > killed + healed], 10)
        finally:
            stop.set()
            worker.join(60)

        restarts = [line for line in serve.text.splitlines() if "restarting tritonserver" in line]
        # One restart: usually the supervisor sees the stub die first; on a loaded machine tritonserver
        # itself sometimes aborts on the lost stub first (exit code -6). Either way it heals, once.
        assert len(restarts) == 1, serve.text
        assert ("tiny_0_0" in restarts[0] and "died" in restarts[0]) or "tritonserver exited" in restarts[0], serve.text
        assert not alive(old_server) and serve.tritonserver != old_server
        assert [s.model for s in serve.stubs()] == ["tiny"]
        with closing(connect(serve.url)) as conn:  # the healed server answers like in-process
            status, payload = post(conn, body(sentences[8:16]))
        assert status == 200 and same_embeddings(results(payload), predictor.predict(sentences[8:16]))
        assert all(ok for t, ok in outcomes if t > killed + healed + 1), "failures after healing"
    finally:
        serve.stop()
    assert serve.proc.returncode == 0, serve.text


@pytest.mark.slow
def test_supervisor_restarts_a_dead_or_hung_server_then_gives_up(repo, no_leftovers):
    from bertops.triton.server import TritonServer
    from bertops.triton.supervisor import Supervisor

    lines: list[str] = []
    stale = Path("/dev/shm/triton_python_backend_shm_region_00000000dead_from-a-killed-server")
    stale.write_bytes(b"x")  # what a bertops server killed with clients attached leaves
    server = TritonServer(repo)
    no_leftovers.append(server.shm_prefix)
    sup = Supervisor(server, ["tiny"], log=lines.append, max_restarts=2, probe_every=0.5, probe_timeout=2)
    try:
        sup.start()
        assert sup.problem() is None
        assert not stale.exists()  # removed by the new server: no running tritonserver carries its tag

        first = server.process.pid
        os.kill(first, signal.SIGKILL)  # tritonserver itself dies
        reason = wait_for(sup.problem, 10)
        assert reason == "tritonserver exited with code -9", reason
        sup.restart(reason)
        assert server.running and server.process.pid != first and server.is_ready()
        assert all(r.stat().st_mode & 0o777 == 0o600 for r in regions(server.shm_prefix))

        stuck = next(s for s in server.stubs() if s.model == "tiny")
        os.kill(stuck.pid, signal.SIGSTOP)  # a hung stub: alive, but never answers; only the probes notice
        reason = wait_for(sup.problem, 30, every=0.25)
        assert reason and "health probes in a row failed" in reason and "tiny" in reason, reason
        sup.restart(reason)
        assert server.is_ready() and not alive(stuck.pid)

        os.kill(server.process.pid, signal.SIGKILL)
        reason = wait_for(sup.problem, 10)
        with pytest.raises(BertopsError, match="restarted 2 times in the last 600 s; giving up"):
            sup.restart(reason)
    finally:
        sup.close()
    assert len(lines) == 2 and all("restarting tritonserver" in line for line in lines), lines
    assert "(1/2 within 600 s)" in lines[0] and "(2/2 within 600 s)" in lines[1]


# ------------------------------------------------------------------------------------------------
# 2. SIGTERM, SIGINT, and a parent that dies: nothing left behind
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=["SIGTERM", "SIGINT", "SIGKILL-parent"])
def test_signals_stop_server_and_stubs_and_free_shm(repo, tmp_path, no_leftovers, signum):
    serve = Serve(repo, tmp_path, no_leftovers)
    try:
        serve.wait_serving()
        tree = descendants(serve.proc.pid)
        prefix = no_leftovers[-1]
        assert len(tree) == 2 and len(regions(prefix)) == 1, (tree, regions(prefix))  # tritonserver + its one stub
        assert all(r.stat().st_mode & 0o777 == 0o600 for r in regions(prefix))  # not readable by other users
        with closing(connect(serve.url)) as conn:  # an open keep-alive client must not hold the shutdown
            assert post(conn, body(SHORT))[0] == 200
            if signum == signal.SIGKILL:  # nobody is left to remove regions after Triton's drain timeout
                conn.close()
            start = time.monotonic()
            serve.proc.send_signal(signum)
            gone = wait_for(lambda: not any(alive(p) for p in tree) and not regions(prefix), 15)
            took = time.monotonic() - start
        assert gone, (signal.Signals(signum).name, [p for p in tree if alive(p)], regions(prefix))
        print(f"{signal.Signals(signum).name}: everything gone after {took:.1f} s")
        assert took < 10, f"{signal.Signals(signum).name}: {took:.1f} s"
        serve.proc.wait(10)
        if signum != signal.SIGKILL:
            assert serve.proc.returncode == 0 and f"{signal.Signals(signum).name}: stopping" in serve.text, serve.text
    finally:
        if serve.proc.poll() is None:
            serve.proc.kill()
            serve.proc.wait()


# ------------------------------------------------------------------------------------------------
# 3. Restricted APIs: the shared-memory attack is refused, the server keeps serving
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_admin_apis_need_the_key_and_shm_attack_is_refused(server, predictor, sentences):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    region = server.shm_regions()[0]  # one of the python backend's own regions: the attack's target
    size = region.stat().st_size
    h = httpclient.InferenceServerClient(server.http_url)
    g = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        attacks = {
            "http shm": lambda: h.register_system_shared_memory("x", f"/{region.name}", size),
            "grpc shm": lambda: g.register_system_shared_memory("x", f"/{region.name}", size),
            "http logging": lambda: h.update_log_settings({"log_verbose_level": 1}),
            "grpc logging": lambda: g.update_log_settings({"log_verbose_level": 1}),
            "http trace": lambda: h.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]}),
            "grpc trace": lambda: g.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]}),
            "http unload": lambda: h.unload_model("tiny"),
            "grpc unload": lambda: g.unload_model("tiny"),
        }
        for name, attack in attacks.items():
            with pytest.raises(InferenceServerException, match="(?i)restricted|permission") as refused:
                attack()
            assert "bertops-admin-key" in str(refused.value), (name, refused.value)
        # key-protected, not broken: the operator's key opens them (read-only calls here)
        assert h.get_system_shared_memory_status(headers=server.admin_headers) == []
        assert g.get_log_settings(headers=server.grpc_admin_headers) is not None
        assert h.is_server_ready() and h.is_model_ready("tiny")
    finally:
        h.close()
        g.close()
    with closing(connect(server.http_url)) as conn:
        status, payload = post(conn, body(sentences[:8]))
    assert status == 200 and same_embeddings(results(payload), predictor.predict(sentences[:8]))
    assert all(r.stat().st_mode & 0o777 == 0o600 for r in server.shm_regions())


# ------------------------------------------------------------------------------------------------
# 4. Bounded work per request
# ------------------------------------------------------------------------------------------------

BIG_SENDER = r"""
import http.client, sys, threading
host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
data = open(path, "rb").read()
headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": open(path + ".json").read()}
go = threading.Event()
def send():  # back to back while told "go"
    conn = http.client.HTTPConnection(host, port, timeout=120)
    while True:
        go.wait()
        conn.request("POST", "/v2/models/tiny/infer", data, headers)
        answer = conn.getresponse()
        answer.read()
        print(answer.status, flush=True)
threading.Thread(target=send, daemon=True).start()
for line in sys.stdin:  # "go" / "stop"; end of input ends the process
    go.set() if line.strip() == "go" else go.clear()
"""


@pytest.mark.slow
def test_huge_rows_cost_a_full_length_request_and_do_not_stall_others(
    export_dir, predictor, sentences, tmp_path, no_leftovers
):
    """Each text is read up to row_char_cap characters, so 8 x 1 MB rows cost what 8 full-length rows do;
    with two instances per model (the default, ``serve.instances``) a short request never waits for such a request."""
    from bertops.triton.builder import build_repository
    from bertops.triton.server import TritonServer

    repo = build_repository(export_dir, "tiny", tmp_path / "repo", max_batch_size=8).parent
    server = TritonServer(repo)
    no_leftovers.append(server.shm_prefix)
    with server:
        _huge_rows(server, predictor, sentences, tmp_path)


def _huge_rows(server, predictor, sentences, tmp_path):
    from bertops.triton.runtime import row_char_cap

    row = (" ".join(sentences) * (MB // 1000))[:MB]
    big = body([row] * 8)
    with closing(connect(server.http_url, timeout=120)) as conn:  # a 1 MB row: same answer as in-process, cut and flagged
        status, payload = post(conn, big)
    assert status == 200, payload
    served = results(payload)
    assert len(served) == 8 and all(r["truncated"] for r in served)
    assert same_embeddings(served[:1], predictor.predict([row]))
    assert same_embeddings(served[:1], predictor.predict([row[: row_char_cap(512)]]))

    (tmp_path / "big").write_bytes(big[0])
    (tmp_path / "big.json").write_text(big[1]["Inference-Header-Content-Length"])
    host, port = server.http_url.rsplit(":", 1)
    sender = subprocess.Popen([sys.executable, "-c", BIG_SENDER, host, port, str(tmp_path / "big")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    short = body(SHORT)
    idle, loaded, big_done = [], [], 0
    try:
        with closing(connect(server.http_url)) as conn:
            for _ in range(20):
                post(conn, short)
            for _ in range(4):  # alternate, so background load on the machine hits both alike
                for phase, samples in (("idle", idle), ("loaded", loaded)):
                    sender.stdin.write("go\n" if phase == "loaded" else "stop\n")
                    sender.stdin.flush()
                    if phase == "loaded":
                        assert sender.stdout.readline().strip() == "200"  # 8 x 1 MB really in flight
                        big_done += 1
                    end = time.monotonic() + 2.5
                    while time.monotonic() < end:
                        t = time.perf_counter()
                        status, _ = post(conn, short)
                        samples.append(time.perf_counter() - t)
                        assert status == 200
                    if phase == "loaded":
                        sender.stdin.write("stop\n")
                        sender.stdin.flush()
                        time.sleep(0.5)  # let the request in flight finish
    finally:
        sender.stdin.close()
        try:
            sender.wait(60)
        finally:
            if sender.poll() is None:
                sender.kill()
                sender.wait()
    big_done += sender.stdout.read().count("200")
    p99_idle = float(np.percentile(idle, 99))
    median_loaded = statistics.median(loaded)
    report = (f"idle n={len(idle)} p50 {statistics.median(idle) * 1e3:.1f} ms p99 {p99_idle * 1e3:.1f} ms; loaded "
              f"n={len(loaded)} p50 {median_loaded * 1e3:.1f} ms max {max(loaded) * 1e3:.0f} ms; {big_done} big requests")
    print(report)
    assert big_done >= 8, report
    assert median_loaded <= 2 * p99_idle, report
    assert max(loaded) < 2.0, report  # uncapped, one such request held others for seconds


@pytest.mark.slow
def test_request_over_the_byte_limit_is_refused_naming_limit_and_option(server):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from bertops.config import ServeConfig

    limit = ServeConfig().max_request_bytes
    rows = [b"a" * (limit // 2 + 1)] * 2
    with closing(connect(server.http_url, timeout=120)) as conn:
        status, payload = post(conn, body(rows))
    assert status == 400, payload
    message = payload["error"]
    assert f"limit of {limit} bytes" in message and "--max-request-bytes" in message, message
    assert "serve.max_request_bytes" in message and f"holds {limit + 2} bytes" in message

    g = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        inp = grpcclient.InferInput("TEXT", [2, 1], "BYTES")
        inp.set_data_from_numpy(np.array([[r] for r in rows], dtype=object))
        with pytest.raises(InferenceServerException, match=f"limit of {limit} bytes"):
            g.infer("tiny", [inp])
    finally:
        g.close()
    assert server.is_ready()


def test_runtime_caps_rows_and_counts_bytes():
    from bertops.triton.runtime import cap_chars, check_request_bytes, decode_text_rows, row_char_cap

    assert row_char_cap(512) == 10240
    assert cap_chars(["abc", "abcdef"], 4) == (["abc", "abcd"], [False, True])
    text = "é" * 50 + "x" * 50  # 2-byte characters: a byte cut may split one
    array = np.array([[text.encode()]], dtype=object)
    for cap in (10, 25, 49, 50, 51, 99, 100, 200):
        [got], _ = decode_text_rows(array, False, cap)
        assert got == text[: cap + 1]
    bad = np.array([[b"ok\xff" + b"x" * 100]], dtype=object)
    with pytest.raises(BertopsError, match="byte 0xff at offset 2"):
        decode_text_rows(bad, False, 10)
    check_request_bytes(np.array([[b"x" * 10], [b"y" * 10]], dtype=object), 20)
    with pytest.raises(BertopsError, match="holds 21 bytes, above the model's limit of 20 bytes"):
        check_request_bytes(np.array([[b"x" * 10], [b"y" * 11]], dtype=object), 20)


# ------------------------------------------------------------------------------------------------
# 5. A second server on busy ports
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_second_server_on_busy_ports_says_address_in_use(server, repo, tmp_path, no_leftovers):
    from bertops.triton.server import TritonServer, _free_ports

    before = set(Path("/dev/shm").iterdir())
    free = _free_ports("127.0.0.1", 2)
    serve = Serve(repo, tmp_path, no_leftovers, server.http_port, *free)
    serve.proc.wait(60)
    assert serve.proc.returncode == 1, serve.text
    assert f"address in use: 127.0.0.1:{server.http_port} (http port)" in serve.text, serve.text
    assert "serving" not in serve.text and "Traceback" not in serve.text

    second = TritonServer(repo, grpc_port=server.grpc_port)
    no_leftovers.append(second.shm_prefix)
    with pytest.raises(BertopsError, match=f"address in use: 127.0.0.1:{server.grpc_port} \\(grpc port\\)"):
        second.start()
    assert second.process is None  # refused before anything started
    assert not orphan_regions(before)
    assert server.is_ready()
