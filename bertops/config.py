"""Typed configuration: YAML -> dataclasses -> ``a.b=c`` overrides -> validated, frozen.

Defaults live only in the dataclasses below (never ``cfg.get(key, default)`` elsewhere). A config
file holds any subset of the sections ``model``, ``data``, ``train``, ``export`` and ``serve``;
whatever it leaves out keeps the default. Every problem is raised as a :class:`BertopsError` whose
one line names the key and the fix, so the CLI can print it without a traceback.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bertops import tasks
from bertops.errors import BertopsError

ATTN_IMPLEMENTATIONS = ("eager", "sdpa")


POOLINGS = ("cls", "mean")


@dataclass(frozen=True)
class ModelConfig:
    """BERT architecture. Field names and meanings are those of HF ``BertConfig`` (config.json)."""

    vocab_size: int = 30522  # WordPiece vocabulary size; the MLM decoder is tied to this embedding
    hidden_size: int = 768  # d_model; must divide evenly by num_attention_heads
    num_hidden_layers: int = 12  # encoder layers
    num_attention_heads: int = 12  # heads per layer; head size = hidden_size / num_attention_heads
    intermediate_size: int = 3072  # feed-forward inner size (usually 4 * hidden_size)
    hidden_act: str = "gelu"  # "gelu" (erf), "gelu_new"/"gelu_pytorch_tanh" (tanh approx.), "relu"
    hidden_dropout_prob: float = 0.1  # dropout after embeddings, attention output and FFN
    attention_probs_dropout_prob: float = 0.1  # dropout on attention probabilities (training only)
    max_position_embeddings: int = 512  # longest sequence the position table covers
    type_vocab_size: int = 2  # segment ids (sentence A / B)
    layer_norm_eps: float = 1e-12  # BERT's LayerNorm epsilon
    pad_token_id: int = 0  # id of [PAD]
    initializer_range: float = 0.02  # std of the normal init for fresh weights
    attn_implementation: str = "sdpa"  # key into bertops.model.ATTENTION_FUNCTIONS
    num_labels: int = 2  # classes of the sequence / token classification head
    id2label: dict[int, str] | None = None  # label names, index -> name; None means LABEL_i
    classifier_dropout: float | None = None  # None falls back to hidden_dropout_prob, as in HF
    # What a sequence-classification head reads: "cls" (BERT's pooler on [CLS], as HF's
    # BertForSequenceClassification) or "mean" (the average of the real tokens, what sentence-transformers
    # encoders were trained to produce). The same key and values as HF's ModernBERT config.
    classifier_pooling: str = "cls"

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def labels(self) -> list[str]:
        """Label names in index order (``LABEL_i`` where the config names none)."""
        names = self.id2label or {}
        return [names.get(i, f"LABEL_{i}") for i in range(self.num_labels)]

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json content ``transformers.BertConfig`` reads."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["id2label"] = {str(i): name for i, name in enumerate(self.labels())}
        out["label2id"] = {name: i for i, name in enumerate(self.labels())}
        out.pop("attn_implementation")
        out.pop("num_labels")  # implied by id2label in HF's format
        out.update(model_type="bert", architectures=["BertForPreTraining"], position_embedding_type="absolute")
        return out

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], **overrides: Any) -> ModelConfig:
        """Read a HF config.json dict, ignoring keys that do not describe a BERT encoder."""
        if raw.get("model_type", "bert") != "bert":
            raise BertopsError(
                f"config.json has model_type {raw['model_type']!r}; bertops loads BERT checkpoints only "
                "(model_type 'bert')"
            )
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise BertopsError("config.json asks for relative position embeddings; bertops supports 'absolute' only")
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        if raw.get("id2label"):
            names = {int(k): v for k, v in raw["id2label"].items()}
            values["num_labels"] = values.get("num_labels", len(names))
            # HF writes LABEL_i placeholders when no names were given; keep "no names" as None.
            values["id2label"] = None if all(v == f"LABEL_{k}" for k, v in names.items()) else names
        values.update(overrides)
        return _build(cls, values, "model")

    def validate(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise BertopsError(
                f"model.hidden_size={self.hidden_size} is not divisible by model.num_attention_heads="
                f"{self.num_attention_heads}; pick a head count that divides the hidden size"
            )
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise BertopsError(
                f"model.attn_implementation={self.attn_implementation!r} is unknown; use one of {ATTN_IMPLEMENTATIONS}"
            )
        if self.hidden_act not in ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu"):
            raise BertopsError(f"model.hidden_act={self.hidden_act!r} is unsupported; use gelu, gelu_new or relu")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            if getattr(self, name) <= 0:
                raise BertopsError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.num_labels < 1:
            raise BertopsError(f"model.num_labels must be at least 1, got {self.num_labels}")
        if self.classifier_pooling not in POOLINGS:
            raise BertopsError(f"model.classifier_pooling={self.classifier_pooling!r} is unknown; use one of {POOLINGS}")


@dataclass(frozen=True)
class DataConfig:
    """How text is cut into model inputs and masked (the files themselves are command arguments)."""

    max_seq_len: int = 128  # tokens per example, [CLS] and [SEP] included
    mlm_probability: float = 0.15  # share of tokens chosen for masking in pretraining
    whole_word_masking: bool = False  # mask all WordPieces of a chosen word together (pretraining)
    shuffle_buffer: int = 10000  # examples in the seeded shuffle buffer of the pretraining input pipeline
    shard_interleave: int = 16  # shards read side by side, a row of each in turn, before the buffer (1: one after another)

    def validate(self) -> None:
        if not 8 <= self.max_seq_len <= 8192:
            raise BertopsError(f"data.max_seq_len={self.max_seq_len} is out of range; use 8..8192")
        if not 0.0 < self.mlm_probability < 1.0:
            raise BertopsError(f"data.mlm_probability={self.mlm_probability} must be between 0 and 1")
        if self.shard_interleave < 1:
            raise BertopsError(f"data.shard_interleave={self.shard_interleave} must be at least 1 (1 = one shard after another)")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings. Gradient accumulation is derived, never set: see ``grad_accum_steps``."""

    task: str = tasks.PRETRAINING.name  # a registered task (bertops.tasks.task_names())
    # pretraining: a checkpoint folder (e.g. a released encoder) to continue from, with its architecture and
    # tokenizer (domain- or task-adaptive pretraining); empty: a fresh model shaped by `model`
    init_from: str = ""
    output_dir: str = "runs/default"  # checkpoints and logs land here
    global_batch_size: int = 32  # sequences per optimizer step, across all ranks
    micro_batch_size: int = 8  # sequences per rank per forward pass
    learning_rate: float = 1e-4  # peak learning rate
    weight_decay: float = 0.01  # AdamW decay (not applied to biases and LayerNorm)
    warmup_steps: int = 100  # linear warm-up to the peak
    max_steps: int = 1000  # optimizer steps in total
    precision: str = "auto"  # "auto" (bf16 where native: CUDA Ampere+, CPU with AVX512-BF16/AMX; else fp32), "bf16", "fp16", "fp32"
    seed: int = 0  # seeds python, numpy and torch on every rank
    ds_config: str = "auto"  # DeepSpeed-only settings (ZeRO stage, offload; no batch/LR keys); auto: ZeRO-0 on one rank, ZeRO-2 on several
    log_every: int = 10  # steps between log lines
    save_every: int = 500  # steps between checkpoints
    optimizer: str = "adamw"  # "adamw" or "lamb" (LAMB needs whole tensors: ZeRO stage 0 only)
    adam_beta1: float = 0.9  # first-moment decay (AdamW and LAMB)
    adam_beta2: float = 0.999  # second-moment decay (AdamW and LAMB)
    adam_epsilon: float = 1e-6  # denominator epsilon (BERT's 1e-6)
    lr_schedule: str = "linear"  # decay after warm-up: "linear" (to 0 at max_steps), "cosine" or "constant"
    min_lr_ratio: float = 0.0  # the decay's floor, as a share of learning_rate
    gradient_clipping: float = 1.0  # max global gradient 2-norm; 0 switches clipping off
    activation_checkpointing: bool = False  # recompute each encoder layer in backward: less memory, ~30% more compute
    eval_every: int = 0  # steps between held-out evaluations (0: only at the end)
    eval_batches: int = 8  # micro-batches per rank in one evaluation
    keep_checkpoints: int = 3  # newest checkpoints kept in RUN_DIR/checkpoints (older ones are deleted)
    phase2_step: int = 0  # two-phase schedule: from this step on read phase2_data (0: one phase)
    phase2_data: str = ""  # prepared shards at the longer sequence length (e.g. 512) for phase 2
    phase2_micro_batch_size: int = 0  # micro batch in phase 2 (0: micro_batch_size); global batch stays

    def grad_accum_steps(self, world_size: int) -> int:
        """Micro-steps per optimizer step so that micro * world * accum == global."""
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise BertopsError(
                f"train.global_batch_size={self.global_batch_size} is not divisible by train.micro_batch_size="
                f"{self.micro_batch_size} x world size {world_size}; change one of them"
            )
        return self.global_batch_size // per_step

    def validate(self) -> None:
        _check_task("train.task", self.task)
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise BertopsError(f"train.precision={self.precision!r} is unknown; use auto, bf16, fp16 or fp32")
        if self.micro_batch_size <= 0 or self.global_batch_size <= 0:
            raise BertopsError("train.micro_batch_size and train.global_batch_size must be positive")
        self.grad_accum_steps(1)
        if self.optimizer not in ("adamw", "lamb"):
            raise BertopsError(f"train.optimizer={self.optimizer!r} is unknown; use adamw or lamb")
        if self.lr_schedule not in ("linear", "cosine", "constant"):
            raise BertopsError(f"train.lr_schedule={self.lr_schedule!r} is unknown; use linear, cosine or constant")
        if self.max_steps < 1 or self.warmup_steps < 0 or self.log_every < 1 or self.save_every < 1:
            raise BertopsError("train.max_steps, train.log_every and train.save_every must be >= 1, warmup_steps >= 0")
        if self.learning_rate <= 0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise BertopsError("train.learning_rate must be positive and train.min_lr_ratio within 0..1")
        if self.phase2_step and not self.phase2_data:
            raise BertopsError("train.phase2_step is set but train.phase2_data is empty; name the phase-2 shards folder")
        if self.phase2_micro_batch_size < 0 or self.phase2_step < 0 or self.keep_checkpoints < 1:
            raise BertopsError("train.phase2_* must be >= 0 and train.keep_checkpoints >= 1")


@dataclass(frozen=True)
class ExportConfig:
    """ONNX export settings (``bertops export onnx``)."""

    task: str = tasks.EMBEDDINGS.name  # which head's outputs the graph exposes (a registered task)
    precision: str = "fp32"  # fp32, fp16 (CUDA), int8 (CPU), bf16 (CPU with AVX512-BF16/AMX, on OpenVINO)
    opset: int = 17  # ONNX opset; 17 is what onnxruntime's BERT fusions are written against
    max_seq_len: int = 128  # longest input the exported model is checked and benchmarked at
    parity_atol: float = 1e-4  # PyTorch vs onnxruntime gate (fp32)
    # Accuracy gate of reduced precisions against the fp32 graph on real text (bertops.accuracy).
    gate_min_mean_cosine: float = 0.99  # embeddings: mean cosine to fp32
    gate_min_cosine: float = 0.97  # embeddings: the worst sentence's cosine to fp32
    gate_min_agreement: float = 0.99  # labels (and fill-mask top-1 tokens) identical to fp32
    gate_max_drop: float = 0.5  # points: entity F1 against fp32's spans, and the eval_data main metric
    eval_data: str | None = None  # labelled file (fine-tuning formats): gate the task's main metric too
    # int8 (bertops.quantize): dynamic quantization; the defaults are what measured best (see there).
    int8_per_channel: bool = True  # per-output-channel weight scales; per-tensor lost accuracy (MiniLM cos 0.96)
    int8_reduce_range: bool = False  # 7-bit weights; measured worse on MiniLM
    int8_fp32_parts: tuple[str, ...] = ("embeddings", "head")  # kept fp32 from the start (also layer.N)
    int8_max_fp32_share: float = 0.5  # at most this share of layers falls back to fp32 to pass the gate; 0: none

    def validate(self) -> None:
        from bertops.precision import PRECISIONS  # the registry (numpy-only module; imports this one)

        _check_task("export.task", self.task)
        if self.precision not in PRECISIONS:
            raise BertopsError(f"export.precision={self.precision!r} is unknown; use {', '.join(PRECISIONS)}")
        if not 0 <= self.int8_max_fp32_share <= 1:
            raise BertopsError("export.int8_max_fp32_share must be within 0..1 (a share of the layers)")
        if not (0 <= self.gate_min_cosine <= 1 and 0 <= self.gate_min_mean_cosine <= 1 and 0 <= self.gate_min_agreement <= 1):
            raise BertopsError("export.gate_min_* must be within 0..1")
        if self.gate_max_drop < 0:
            raise BertopsError("export.gate_max_drop is in points and must be at least 0")


@dataclass(frozen=True)
class ServeConfig:
    """Triton repository and server settings (``bertops triton build`` / ``bertops serve``)."""

    flavor: str = "cpu"  # where the encoder runs: "cpu" / "cuda": onnxruntime's CPU / CUDA provider in a python-backend
    # model; "gpu": Triton's onnxruntime backend (NVIDIA's container)
    pipeline: str = "single"  # "single": one python model per task; "ensemble": tokenizer -> postprocess (+ encoder)
    max_batch_size: int = 32  # largest batch a model accepts
    instances: int = 2  # model instances per model; two let a short request run beside a long one (issue: stalls)
    preferred_batch_sizes: tuple[int, ...] = (8, 16, 32)  # dynamic batcher targets
    max_queue_delay_us: int = 200  # batcher wait for a fuller batch; 2000 doubled p50 at concurrency 1 (BENCHMARKS)
    host: str = "127.0.0.1"  # address the server binds; loopback unless told otherwise
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_request_bytes: int = 16 * 2**20  # TEXT bytes one request may carry; the tokenizer model refuses more

    def validate(self) -> None:
        if self.max_request_bytes < 1:
            raise BertopsError("serve.max_request_bytes must be at least 1")
        if self.flavor not in ("cpu", "cuda", "gpu"):
            raise BertopsError(f"serve.flavor={self.flavor!r} is unknown; use cpu, cuda or gpu")
        if self.pipeline not in ("single", "ensemble"):
            raise BertopsError(f"serve.pipeline={self.pipeline!r} is unknown; use single or ensemble")
        if self.max_batch_size < 1 or self.instances < 1:
            raise BertopsError("serve.max_batch_size and serve.instances must be at least 1")
        if any(b > self.max_batch_size for b in self.preferred_batch_sizes):
            raise BertopsError("serve.preferred_batch_sizes must not exceed serve.max_batch_size")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def validate(self) -> Config:
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def _check_task(key: str, name: str) -> None:
    if name not in tasks.task_names():
        raise BertopsError(f"{key}={name!r} is unknown; use one of {', '.join(tasks.task_names())}")


# --- building dataclasses from plain dicts, with type checks -------------------------------------


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (and convert lists to tuples)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except BertopsError:
                continue
        raise BertopsError(f"{where}={value!r} has the wrong type; expected {tp}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise BertopsError(f"{where} must be a mapping of keys, got {value!r}")
        return _build(tp, value, where)
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            value = [value]
        (item,) = typing.get_args(tp)[:1]
        return tuple(_coerce(v, item, where) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise BertopsError(f"{where} must be a mapping, got {value!r}")
        kt, vt = typing.get_args(tp)
        return {_coerce(k, kt, where): _coerce(v, vt, where) for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, str) and value.lstrip("-").isdigit():
        return int(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise BertopsError(f"{where}={value!r} has the wrong type; expected {tp.__name__}")
        return value
    raise BertopsError(f"{where}: unsupported annotation {tp}")  # a bug in this module, not user input


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise BertopsError(f"unknown key {where}.{unknown[0]}; valid keys under {where}: {', '.join(names)}")
    return cls(**{k: _coerce(v, hints[k], f"{where}.{k}") for k, v in values.items()})


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from nested dicts (YAML content)."""
    if not isinstance(raw, dict):
        raise BertopsError(f"a config must be a mapping of sections, got {type(raw).__name__}")
    return _build(Config, raw, "config").validate()


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings to nested dicts; values are parsed as YAML scalars."""
    out = json.loads(json.dumps(raw))
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise BertopsError(f"override {item!r} is not of the form section.key=value")
        parts = key.split(".")
        _check_path(parts, key)
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise BertopsError(f"override {item!r}: {p} is not a section")
        node[parts[-1]] = yaml.safe_load(text) if text else ""
    return out


def _check_path(parts: list[str], key: str) -> None:
    """Unknown override keys are an error before anything runs, not a silently ignored typo."""
    cls: Any = Config
    for i, p in enumerate(parts):
        if not dataclasses.is_dataclass(cls):
            raise BertopsError(f"unknown override key {key!r}: {'.'.join(parts[:i])} has no sub-keys")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if p not in fields:
            where = ".".join(parts[:i]) or "the top level"
            raise BertopsError(f"unknown override key {key!r}; valid keys under {where}: {', '.join(fields)}")
        cls = typing.get_type_hints(cls)[p]


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise BertopsError(f"config file {path} does not exist; pass a YAML file (see bertops/configs/)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid syntax"
        raise BertopsError(f"{path} is not valid YAML{at}: {problem}; fix the file and retry") from None
    return raw or {}


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """YAML file (optional) + overrides -> validated, frozen :class:`Config`."""
    raw = load_yaml(path) if path else {}
    return config_from_dict(apply_overrides(raw, overrides))


def packaged_configs() -> list[Path]:
    """The YAML files shipped inside the package (bertops/configs/*.yaml)."""
    return sorted((Path(__file__).parent / "configs").glob("*.yaml"))
