"""bertops: BERT from raw text to a production inference endpoint.

Data flows one way: config -> tokenizer -> model -> checkpoint -> export (ONNX) -> infer
(onnxruntime) -> triton (repository, server) -> client. The CLI (``bertops``) sits on top.
"""

__version__ = "0.1.0"
