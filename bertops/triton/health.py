"""Health probe: one real inference per served model, the check that notices a dead python-backend stub.

Triton's ``/v2/health/ready`` keeps answering 200 when a python-backend stub has died (every request
to that model then fails), so readiness and liveness must run a real inference.  Standard library
only, so it runs anywhere bertops is installed (Kubernetes exec probe, NVIDIA's container):

    python -m bertops.triton.health --url 127.0.0.1:8000 --model minilm [--model ner ...] [--timeout 10]

exits 0 when every model answered a short text with a well-formed RESULT, else prints one line and
exits 1.  ``bertops serve`` runs the same probe periodically and restarts tritonserver when it fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

from bertops.errors import BertopsError

PROBE_TEXT = "bertops health probe"


def probe(url: str, model: str, timeout: float = 10.0) -> float:
    """Send :data:`PROBE_TEXT` to the served model ``model`` at ``url`` (``HOST:PORT``, HTTP); return the seconds it took.

    Raises :class:`BertopsError` naming the model and what went wrong (refused, timed out, an error
    answer, a RESULT that is not one JSON object per row).
    """
    body = json.dumps({
        "inputs": [{"name": "TEXT", "shape": [1, 1], "datatype": "BYTES", "data": [PROBE_TEXT]}],
        "outputs": [{"name": "RESULT", "parameters": {"binary_data": False}}],
    }).encode()
    request = urllib.request.Request(f"http://{url}/v2/models/{model}/infer", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    start = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            payload = json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:300]
        raise BertopsError(f"model {model} at {url} answered the probe with HTTP {exc.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise BertopsError(f"model {model} at {url} did not answer the probe within {timeout:g} s: {reason}") from None
    except ValueError as exc:
        raise BertopsError(f"model {model} at {url} answered the probe with invalid JSON: {exc}") from None
    outputs = {o.get("name"): o for o in payload.get("outputs", [])}
    try:
        rows = outputs["RESULT"]["data"]
        if len(rows) != 1 or not isinstance(json.loads(rows[0]), dict):
            raise ValueError(f"{len(rows)} rows")
    except (KeyError, TypeError, ValueError) as exc:
        raise BertopsError(f"model {model} at {url} answered the probe without a valid RESULT ({exc})") from None
    return time.monotonic() - start


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bertops.triton.health", description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="127.0.0.1:8000", help="HOST:PORT of Triton's HTTP endpoint")
    ap.add_argument("--model", action="append", required=True, help="served model to probe (repeat for several)")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds per model")
    args = ap.parse_args(argv)
    try:
        took = [probe(args.url, m, args.timeout) for m in args.model]
    except BertopsError as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    print(f"healthy: {', '.join(f'{m} {t * 1000:.0f} ms' for m, t in zip(args.model, took))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
