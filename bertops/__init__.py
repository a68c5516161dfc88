"""bertops: BERT from raw text to a production inference endpoint.

Data flows one way: config -> tokenizer -> model -> checkpoint -> export (ONNX) -> infer
(onnxruntime) -> triton (repository, server) -> client. The CLI (``bertops``) sits on top.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``bertops.Estimator`` without importing torch on ``import bertops``."""
    if name == "Estimator":
        from bertops.estimator import Estimator

        return Estimator
    raise AttributeError(f"module 'bertops' has no attribute {name!r}")
