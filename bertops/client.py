"""A small client for bertops models served by Triton (``bertops serve``), over HTTP or gRPC.

>>> from bertops.client import Client                         # doctest: +SKIP
>>> with Client("127.0.0.1:8000") as c:                       # doctest: +SKIP
...     c.embed("minilm", ["a sentence"]).shape               # (1, 384)
...     c.classify("sentiment", ["great film"])[0]["label"]
...     c.ner("ner", ["John lives in Paris"])[0]              # [{"entity": "PER", "start": 0, ...}]

Every answer is the JSON the served model returns in ``RESULT``: for each text exactly the dict
``bertops.infer.Predictor.predict`` gives in-process (``"truncated"`` included). Many texts are sent
in requests of at most the model's ``max_batch_size`` rows. Problems (no server at the URL, model
missing or not ready, a request the server rejects) raise a one-line :class:`BertopsError`.

A ``tritonclient.http`` client is not thread-safe: give each thread its own :class:`Client`
(``grpc`` clients may be shared). Close clients before stopping a server: Triton waits for open
keep-alive connections when it shuts down.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from bertops.config import ServeConfig
from bertops.errors import BertopsError

PROTOCOLS = ("http", "grpc")
DEFAULT_URLS = {
    "http": f"{ServeConfig.host}:{ServeConfig.http_port}",
    "grpc": f"{ServeConfig.host}:{ServeConfig.grpc_port}",
}


def _module(protocol: str):
    if protocol not in PROTOCOLS:
        raise BertopsError(f"protocol {protocol!r} is unknown; use http or grpc")
    try:
        if protocol == "http":
            import tritonclient.http as module
        else:
            import tritonclient.grpc as module
    except ImportError:
        raise BertopsError("tritonclient is not installed; pip install 'tritonclient[all]'") from None
    return module


def _message(exc: Exception) -> str:
    msg = exc.message() if hasattr(exc, "message") and callable(exc.message) else str(exc)
    return " ".join(str(msg or type(exc).__name__).split())


def text_tensor(texts: Sequence[str | bytes], pairs: Sequence[str | bytes] | None = None) -> np.ndarray:
    """Texts (and optional second texts) -> the ``TEXT`` array ``[batch, 1 | 2]`` of UTF-8 bytes."""

    def b(x: str | bytes) -> bytes:
        return x if isinstance(x, bytes) else str(x).encode("utf-8")

    if pairs is not None:
        if len(pairs) != len(texts):
            raise BertopsError(f"got {len(texts)} texts but {len(pairs)} second texts; pairs must line up")
        rows = [[b(t), b(p)] for t, p in zip(texts, pairs)]
    else:
        rows = [[b(t)] for t in texts]
    return np.array(rows, dtype=np.object_).reshape(len(rows), 2 if pairs is not None else 1)


class Client:
    """``Client(url, protocol="http")``: predictions from bertops models on a Triton server."""

    def __init__(self, url: str | None = None, protocol: str = "http", timeout: float = 60.0, verbose: bool = False):
        self.protocol = protocol
        self._tc = _module(protocol)
        url = url or DEFAULT_URLS[protocol]
        ssl = url.startswith("https://")
        for prefix in ("http://", "https://", "grpc://"):
            if url.startswith(prefix):
                url = url[len(prefix) :]
        self.url = url.rstrip("/")
        self.timeout = timeout
        try:
            if protocol == "http":
                self._client = self._tc.InferenceServerClient(
                    self.url, verbose=verbose, ssl=ssl, connection_timeout=timeout, network_timeout=timeout
                )
            else:
                self._client = self._tc.InferenceServerClient(self.url, verbose=verbose, ssl=ssl)
        except Exception as exc:  # tritonclient raises on malformed URLs
            raise BertopsError(
                f"cannot create a {protocol} client for {url!r} ({_message(exc)}); pass HOST:PORT"
            ) from None
        self._max_batch: dict[str, int] = {}
        self._live = False

    # -- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        try:
            self._client.close()
        except Exception:
            pass

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- checks ----------------------------------------------------------------------------------

    def _unreachable(self, exc: Exception | None) -> BertopsError:
        why = f" ({_message(exc)})" if exc is not None else " (not live)"
        port = ServeConfig.http_port if self.protocol == "http" else ServeConfig.grpc_port
        return BertopsError(
            f"no Triton server answers at {self.protocol}://{self.url}{why}; start one with "
            f"`bertops serve --repo triton_models/`, or pass the right --url (HTTP :{port} by default) and --protocol"
        )

    def models(self) -> list[str]:
        """Names of the models the server has loaded, from the statistics API (``bertops serve`` restricts
        the repository index to holders of the admin key, together with model control)."""
        stats = self._client.get_inference_statistics()
        if self.protocol == "grpc":
            return sorted({m.name for m in stats.model_stats})
        return sorted({m["name"] for m in stats["model_stats"]})

    def max_batch_size(self, model: str) -> int:
        """Check that the server is live and ``model`` ready; return its ``max_batch_size`` (cached)."""
        if model in self._max_batch:
            return self._max_batch[model]
        if not self._live:
            try:
                live = self._client.is_server_live()
            except Exception as exc:
                raise self._unreachable(exc) from None
            if not live:
                raise self._unreachable(None)
            self._live = True
        try:
            ready = self._client.is_model_ready(model)
        except Exception:
            ready = False
        if not ready:
            try:
                steps = ("_tokenizer", "_encoder", "_postprocess")
                available = ", ".join(m for m in self.models() if not m.endswith(steps))
            except Exception:
                available = "?"
            raise BertopsError(
                f"model {model!r} is not ready on {self.protocol}://{self.url} (ready models: {available or 'none'}); "
                f"check the name, or build it with `bertops triton build --name {model}`"
            )
        try:
            config = self._client.get_model_config(model)
        except Exception as exc:
            raise BertopsError(f"cannot read the config of {model!r} ({_message(exc)})") from None
        if self.protocol == "grpc":
            config = {"max_batch_size": config.config.max_batch_size}
        self._max_batch[model] = int(config.get("max_batch_size", 0))
        return self._max_batch[model]

    # -- inference -------------------------------------------------------------------------------

    def infer_raw(self, model: str, text: np.ndarray, outputs: Sequence[str] = ("RESULT",)) -> dict[str, np.ndarray]:
        """One request with a ready ``TEXT`` array; returns the named outputs (errors: BertopsError)."""
        tc = self._tc
        inp = tc.InferInput("TEXT", list(text.shape), "BYTES")
        inp.set_data_from_numpy(text)
        try:
            if self.protocol == "http":
                result = self._client.infer(model, [inp], outputs=[tc.InferRequestedOutput(o) for o in outputs])
            else:
                result = self._client.infer(model, [inp], outputs=[tc.InferRequestedOutput(o) for o in outputs],
                                            client_timeout=self.timeout)
        except Exception as exc:
            text_ = _message(exc)
            down = ("connection refused", "failed to connect", "unavailable", "connect call failed")
            if any(s in text_.lower() for s in down):
                raise self._unreachable(exc) from None
            raise BertopsError(f"{model}: the server rejected the request: {text_}") from None
        return {o: result.as_numpy(o) for o in outputs}

    def predict(
        self,
        model: str,
        texts: Sequence[str],
        pairs: Sequence[str] | None = None,
        batch_size: int = 32,
    ) -> list[dict[str, Any]]:
        """One answer dict per text, in input order (``Predictor.predict``'s dicts, from ``RESULT``)."""
        if isinstance(texts, (str, bytes)):
            raise BertopsError("texts must be a list of strings, not one string; wrap it: [text]")
        texts = list(texts)
        if pairs is not None:
            pairs = list(pairs)
        limit = self.max_batch_size(model)
        step = max(1, min(batch_size, limit) if limit > 0 else 1)
        answers: list[dict[str, Any]] = []
        for lo in range(0, len(texts), step):
            chunk = text_tensor(texts[lo : lo + step], None if pairs is None else pairs[lo : lo + step])
            result = self.infer_raw(model, chunk)["RESULT"]
            answers.extend(json.loads(bytes(row).decode("utf-8")) for row in result.reshape(-1))
        return answers

    # -- task helpers ----------------------------------------------------------------------------

    def embed(self, model: str, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """(N, H) float32 unit-length sentence embeddings."""
        rows = self.predict(model, texts, batch_size=batch_size)
        return np.asarray([r["embedding"] for r in rows], dtype=np.float32).reshape(len(rows), -1)

    def classify(
        self, model: str, texts: Sequence[str], pairs: Sequence[str] | None = None, batch_size: int = 32
    ) -> list[dict[str, Any]]:
        """Per text: ``{"label", "score", "probabilities", "truncated"}``."""
        return self.predict(model, texts, pairs, batch_size)

    def ner(self, model: str, texts: Sequence[str], batch_size: int = 32) -> list[list[dict[str, Any]]]:
        """Per text: entity spans ``{"entity", "score", "start", "end", "word"}`` (``text[start:end] == word``)."""
        return [r["entities"] for r in self.predict(model, texts, batch_size=batch_size)]

    def fill_mask(self, model: str, texts: Sequence[str], batch_size: int = 32) -> list[list[list[dict[str, Any]]]]:
        """Per text, per ``[MASK]``: the top-k ``{"token", "token_id", "score", "position"}``."""
        return [r["masks"] for r in self.predict(model, texts, batch_size=batch_size)]
