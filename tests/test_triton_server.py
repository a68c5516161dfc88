"""End-to-end checks of bertops.triton.server against the real tritonserver from nvidia-pytriton.

They prove, on a CPU-only machine, what the serving code relies on: the launcher, TYPE_STRING
tensors over HTTP and gRPC, an ensemble, a BLS call between Python models, and perf_analyzer.
"""

import csv
import json
import textwrap
from pathlib import Path

import numpy as np
import pytest

from bertops.errors import BertopsError
from bertops.triton.server import TritonServer
from bertops.triton.wheel import find_perf_analyzer, perf_analyzer_env

pytestmark = pytest.mark.slow

STRING_IO = """
max_batch_size: 8
input [ {{ name: "TEXT" data_type: TYPE_STRING dims: [ 1 ] }} ]
output [ {{ name: "{out}" data_type: TYPE_STRING dims: [ 1 ] }} ]
"""

ECHO_UPPER_PY = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            text = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy()
            upper = [s.decode("utf-8").upper().encode("utf-8") for s in text.reshape(-1)]
            out = np.array(upper, dtype=np.object_).reshape(text.shape)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", out)]))
        return responses
"""

CALLER_PY = """
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            text = pb_utils.get_input_tensor_by_name(request, "TEXT")
            bls = pb_utils.InferenceRequest(
                model_name="echo_upper", requested_output_names=["OUT"],
                inputs=[pb_utils.Tensor("TEXT", text.as_numpy())],
            ).exec()
            if bls.has_error():
                raise pb_utils.TritonModelException(bls.error().message())
            out = pb_utils.get_output_tensor_by_name(bls, "OUT").as_numpy()
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("UPPER", out)]))
        return responses
"""

PIPE_ENSEMBLE = """
ensemble_scheduling {
  step [ {
    model_name: "caller"
    model_version: -1
    input_map { key: "TEXT" value: "TEXT" }
    output_map { key: "UPPER" value: "OUT" }
  } ]
}
"""


def _python_model(repo: Path, name: str, out: str, code: str) -> None:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "1" / "model.py").write_text(textwrap.dedent(code))
    (repo / name / "config.pbtxt").write_text(
        f'name: "{name}"\nbackend: "python"\n' + STRING_IO.format(out=out)
        + 'instance_group [ { kind: KIND_CPU count: 1 } ]\n'
    )


def write_repo(repo: Path) -> Path:
    """echo_upper (Python) <- BLS from caller (Python) <- ensemble pipe."""
    _python_model(repo, "echo_upper", "OUT", ECHO_UPPER_PY)
    _python_model(repo, "caller", "UPPER", CALLER_PY)
    (repo / "pipe" / "1").mkdir(parents=True)  # an ensemble still needs a version folder
    (repo / "pipe" / "config.pbtxt").write_text(
        'name: "pipe"\nplatform: "ensemble"\n' + STRING_IO.format(out="OUT") + PIPE_ENSEMBLE
    )
    return repo


TEXTS = ["hello world", "héllo wörld ß", "BERT ops"]


def _expected():
    return [t.upper().encode("utf-8") for t in TEXTS]


def test_server_serves_ensemble_with_bls_over_http_and_grpc(tmp_path):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    repo = write_repo(tmp_path / "repo")
    data = np.array([t.encode("utf-8") for t in TEXTS], dtype=np.object_).reshape(-1, 1)
    with TritonServer(repo, log_file=tmp_path / "server.log") as server:
        assert len({server.http_port, server.grpc_port, server.metrics_port}) == 3

        http = httpclient.InferenceServerClient(server.http_url)
        assert all(http.is_model_ready(m) for m in ("echo_upper", "caller", "pipe"))
        inp = httpclient.InferInput("TEXT", list(data.shape), "BYTES")
        inp.set_data_from_numpy(data)
        result = http.infer("pipe", [inp], outputs=[httpclient.InferRequestedOutput("OUT")])
        assert result.as_numpy("OUT").reshape(-1).tolist() == _expected()
        http.close()

        grpc = grpcclient.InferenceServerClient(server.grpc_url)
        inp = grpcclient.InferInput("TEXT", list(data.shape), "BYTES")
        inp.set_data_from_numpy(data)
        result = grpc.infer("pipe", [inp], outputs=[grpcclient.InferRequestedOutput("OUT")])
        assert result.as_numpy("OUT").reshape(-1).tolist() == _expected()
        grpc.close()

        process = server.process
    assert process.poll() is not None, "tritonserver still running after stop()"
    assert not server.running and not server.is_ready()


def test_broken_model_fails_start_with_log_tail(tmp_path):
    repo = write_repo(tmp_path / "repo")
    (repo / "echo_upper" / "1" / "model.py").write_text("this is not python\n")
    server = TritonServer(repo, log_file=tmp_path / "server.log")
    with pytest.raises(BertopsError, match="failed to load 'echo_upper'"):
        server.start(timeout=120)
    assert not server.running


def test_perf_analyzer_measures_echo_upper(tmp_path):
    import subprocess

    perf_analyzer = find_perf_analyzer()
    repo = write_repo(tmp_path / "repo")
    inputs = tmp_path / "inputs.json"
    inputs.write_text(json.dumps({"data": [{"TEXT": [t]} for t in TEXTS]}))
    report = tmp_path / "perf.csv"
    with TritonServer(repo, log_file=tmp_path / "server.log") as server:
        done = subprocess.run(
            [str(perf_analyzer), "-m", "echo_upper", "-u", server.grpc_url, "-i", "grpc",
             "--concurrency-range", "1:2", "--input-data", str(inputs),
             "--measurement-interval", "1000", "--stability-percentage", "50",
             "-f", str(report)],
            capture_output=True, text=True, env=perf_analyzer_env(), timeout=300,
        )
    assert done.returncode == 0, done.stdout + done.stderr
    rows = list(csv.DictReader(report.open()))
    assert sorted(int(r["Concurrency"]) for r in rows) == [1, 2]  # perf_analyzer may order rows by throughput
    assert all(float(r["Inferences/Second"]) > 0 for r in rows), rows
