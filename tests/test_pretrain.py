"""Pretraining: DeepSpeed config injection, schedule, optimisers, checks, checkpoints/resume, real launcher runs.

Launcher tests (``slow``) start the real ``deepspeed`` launcher with 2 CPU ranks (gloo) on a tiny
model and the bundled corpus; the others run in-process or call the planning functions directly.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bertops.config import TrainConfig, load_config
from bertops.errors import BertopsError

ROOT = Path(__file__).resolve().parents[1]
TINY_YAML = ROOT / "bertops" / "configs" / "tiny.yaml"
BASE = ["train.log_every=1", "train.learning_rate=1e-3", "train.warmup_steps=2", "train.eval_batches=2"]
NO_DROPOUT = ["model.hidden_dropout_prob=0", "model.attention_probs_dropout_prob=0"]


@pytest.fixture(scope="session")
def shards(tmp_path_factory, minilm_dir) -> Path:
    """The bundled corpus prepared at seq 64 with MiniLM's real vocabulary."""
    from bertops.data.corpus import write_bundled_corpus
    from bertops.data.prepare import prepare

    root = tmp_path_factory.mktemp("shards")
    write_bundled_corpus(root / "corpus.txt")
    prepare([root / "corpus.txt"], minilm_dir, root / "data", seq_len=64, progress=False)
    return root / "data"


def tiny(*overrides: str):
    return load_config(TINY_YAML, [*BASE, *overrides])


def rows(run_dir: Path, kind: str = "loss") -> dict[int, dict]:
    from bertops.train.metrics import read_rows

    return {r["step"]: r for r in read_rows(run_dir / "metrics.jsonl") if kind in r}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def bertops_cmd() -> str:
    return shutil.which("bertops") or str(Path(sys.executable).parent / "bertops")


def pretrain_args(data: Path, out: Path, ds: str | None, *overrides: str) -> list[str]:
    """``ds``: a file of ds_configs/, or None for the config's default (auto)."""
    return ["pretrain", "-c", str(TINY_YAML), "--data", str(data), "--out", str(out),
            *(["--deepspeed", str(ROOT / "ds_configs" / ds)] if ds else []), "--resume", "auto", *BASE, *overrides]


def launch(n: int, data: Path, out: Path, ds: str, *overrides: str, port: int | None = None,
           **popen) -> subprocess.Popen:
    cmd = ["deepspeed", "--num_accelerators", str(n), "--master_port", str(port or free_port()), bertops_cmd(),
           *pretrain_args(data, out, ds, *overrides)]
    log = open(out.parent / f"{out.name}.log", "ab")
    return subprocess.Popen(cmd, env=clean_env(), stdout=log, stderr=subprocess.STDOUT, **popen)


def run_launch(*args, timeout: float = 240, **kwargs) -> Path:
    proc = launch(*args, **kwargs)
    out = args[2]
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (out.parent / f"{out.name}.log").read_text(errors="replace")
    assert rc == 0, log[-4000:]
    return out


def rank_processes(out: Path) -> list[int]:
    """pids of `bertops pretrain` / `bertops finetune` processes writing to ``out`` (launcher ranks)."""
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            argv = Path(f"/proc/{d}/cmdline").read_bytes().decode(errors="replace").split("\0")
            state = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        is_rank = any(a.startswith("--local_rank=") for a in argv)  # not the runner or launch.py above them
        if is_rank and {"pretrain", "finetune"} & set(argv) and str(out) in argv and state != "Z":
            found.append(int(d))
    return found


def assert_learns(losses: list[float]) -> None:
    assert all(math.isfinite(x) for x in losses)
    k = max(2, len(losses) // 4)
    assert sum(losses[-k:]) / k < sum(losses[:k]) / k - 0.05, losses


def assert_hf_matches(final: Path) -> None:
    """final/ loads in transformers.BertForPreTraining and computes what bertops' model computes."""
    import torch
    import transformers

    from bertops.checkpoint import load_model

    hf = transformers.BertForPreTraining.from_pretrained(final).eval()
    ours, _ = load_model(final, "pretraining")
    ids = torch.randint(5, 30000, (2, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 18:] = 0
    types = torch.zeros_like(ids)
    types[:, 12:] = 1
    with torch.no_grad():
        a = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
        b = ours(ids, mask, types)
    assert (a.prediction_logits - b["logits"]).abs()[mask.bool()].max() < 1e-4
    assert (a.seq_relationship_logits - b["nsp_logits"]).abs().max() < 1e-4


# --- pieces ---------------------------------------------------------------------------------------


def test_ds_config_gets_batch_clipping_precision_injected():
    from bertops.train.dsconfig import Precision, build_ds_config, load_ds_config

    raw = load_ds_config(ROOT / "ds_configs" / "zero2.json")
    cfg = tiny("train.global_batch_size=32", "train.micro_batch_size=4", "train.gradient_clipping=0.5").train
    ds = build_ds_config(raw, cfg, Precision("bf16", ""), world_size=2, micro_batch_size=4)
    batch_keys = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
    assert tuple(ds[k] for k in batch_keys) == (32, 4, 4)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] and "fp16" not in ds
    fp16 = build_ds_config(raw, cfg, Precision("fp16", ""), world_size=1, micro_batch_size=4)["fp16"]
    assert fp16["enabled"] and fp16["loss_scale"] == 0  # dynamic loss scaling
    assert "bf16" not in build_ds_config(raw, cfg, Precision("fp32", ""), 1, 4)


@pytest.mark.parametrize("key", ["train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                                 "optimizer", "scheduler", "gradient_clipping"])
def test_ds_config_owning_bertops_keys_is_refused(tmp_path, key):
    from bertops.train.dsconfig import load_ds_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, key: 8}))
    with pytest.raises(BertopsError, match=f"sets '{key}', which comes from the bertops config") as err:
        load_ds_config(path)
    assert "\n" not in str(err.value)
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}))
    with pytest.raises(BertopsError, match="precision comes from train.precision"):
        load_ds_config(path)


def test_auto_ds_config_is_zero0_on_one_rank_and_zero2_on_several():
    from bertops.train.dsconfig import choose_ds_config, load_ds_config, zero_stage

    one, line = choose_ds_config("auto", 1)
    assert zero_stage(one) == 0 and "auto -> ds_configs/zero0.json (one rank" in line
    several, line = choose_ds_config("auto", 4)
    assert several == load_ds_config(ROOT / "ds_configs" / "zero2.json") and "several ranks" in line
    assert zero_stage(choose_ds_config(str(ROOT / "ds_configs" / "zero3.json"), 1)[0]) == 3  # a file is taken as is
    assert TrainConfig().ds_config == "auto"


def test_shipped_ds_configs_cover_every_stage_and_offload():
    from bertops.train.dsconfig import load_ds_config, offloads_optimizer, zero_stage

    configs = {p.stem: load_ds_config(p) for p in (ROOT / "ds_configs").glob("*.json")}
    assert {zero_stage(c) for c in configs.values()} == {0, 1, 2, 3}
    assert offloads_optimizer(configs["zero2_offload"]) and offloads_optimizer(configs["zero3_offload"])


def test_precision_auto_follows_the_cpu_flags():
    from bertops.runtimes import cpu_flags
    from bertops.train.dsconfig import resolve_precision

    chosen = resolve_precision("auto", "cpu")
    native = bool({"avx512_bf16", "amx_bf16"} & cpu_flags())
    assert chosen.name == ("bf16" if native else "fp32")
    assert chosen.reason.startswith("precision auto -> ")
    assert resolve_precision("fp32", "cpu").name == "fp32"


def test_warmup_then_linear_or_cosine_decay():
    from bertops.train.optim import lr_factor

    lin = tiny("train.warmup_steps=4", "train.max_steps=14").train
    assert [lr_factor(s, lin) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(9, lin) == pytest.approx(0.5) and lr_factor(14, lin) == 0.0
    cos = tiny("train.warmup_steps=0", "train.max_steps=10", "train.lr_schedule=cosine", "train.min_lr_ratio=0.1").train
    assert lr_factor(0, cos) == pytest.approx(1.0) and lr_factor(5, cos) == pytest.approx(0.55)
    assert lr_factor(10, cos) == pytest.approx(0.1)


def test_lamb_descends_and_needs_whole_tensors():
    import torch

    from bertops.train.optim import Lamb, check_optimizer

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 8))
    target = torch.randn(8, 8)
    opt = Lamb([w], lr=0.05, weight_decay=0.0)
    first = None
    for _ in range(50):
        loss = ((w - target) ** 2).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 4
    check_optimizer(tiny("train.optimizer=lamb").train, stage=0)
    with pytest.raises(BertopsError, match="ZeRO stage 2"):
        check_optimizer(tiny("train.optimizer=lamb").train, stage=2)


# --- checks before training (one-line errors) ------------------------------------------------------


def test_bad_inputs_fail_before_training(shards, tmp_path, monkeypatch):
    from bertops.train.run import plan_run

    ok = tiny()
    plan_run(ok, shards, tmp_path / "ok", str(ROOT / "ds_configs" / "zero2.json"), None)
    cases = [
        (tiny("model.vocab_size=1000"), {}, "model.vocab_size=1000 does not match the tokenizer"),
        (tiny("train.global_batch_size=12", "train.micro_batch_size=4"), {"WORLD_SIZE": "2"}, "not divisible"),
        (tiny("train.optimizer=lamb"), {}, "train.optimizer=lamb needs whole tensors"),
    ]
    for cfg, env, message in cases:
        with monkeypatch.context() as m:
            if env:
                m.setenv("RANK", "0"), m.setenv("LOCAL_RANK", "0"), m.setenv("MASTER_ADDR", "127.0.0.1")
                m.setenv("MASTER_PORT", "1"), m.setenv("WORLD_SIZE", env["WORLD_SIZE"])
            with pytest.raises(BertopsError, match=message) as err:
                plan_run(cfg, shards, tmp_path / "run", str(ROOT / "ds_configs" / "zero2.json"), None)
            assert "\n" not in str(err.value)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(BertopsError, match="cannot write to the run folder"):
        plan_run(ok, shards, blocker / "run", None, None)
    with pytest.raises(BertopsError, match="--resume 'latest' is not understood"):
        plan_run(ok, shards, tmp_path / "run", None, "latest")
    with pytest.raises(BertopsError, match="shards|manifest|not found|does not exist"):
        plan_run(ok, tmp_path / "no-such-data", tmp_path / "run", None, None)


def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.mark.parametrize("options,message", [("size=256k", "MiB free but one checkpoint"),
                                             ("ro,size=1m", "cannot write to the run folder")])
def test_full_or_read_only_disk_fails_before_training(shards, tmp_path, options, message):
    from bertops.train.run import plan_run

    mnt = tmp_path / "mnt"
    if not _mount_tmpfs(mnt, options):
        pytest.skip("mounting a tmpfs needs root with mount rights")
    try:
        with pytest.raises(BertopsError, match=message):
            plan_run(tiny(), shards, mnt / "run", None, None)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_cli_refuses_batch_keys_in_one_line(shards, tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_batch_size": 64}))
    proc = subprocess.run([bertops_cmd(), "pretrain", "-c", str(TINY_YAML), "--data", str(shards), "--out",
                           str(tmp_path / "run"), "--deepspeed", str(bad)], capture_output=True, text=True,
                          env=clean_env(), timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "train_batch_size" in proc.stderr, proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


# --- one process, in-process ------------------------------------------------------------------------


def test_corrupt_last_checkpoint_is_named_and_the_previous_one_used(shards, tmp_path):
    from bertops.train import pretrain
    from bertops.train.checkpoints import tags

    run = tmp_path / "run"
    cfg = tiny("train.max_steps=6", "train.save_every=3", "train.precision=fp32", "train.eval_batches=0")
    first = pretrain(cfg, shards, run, str(ROOT / "ds_configs" / "zero2.json"))
    assert first.steps == 6 and tags(run / "checkpoints") == ["global_step3", "global_step6"]
    with pytest.raises(BertopsError, match="already holds checkpoints"):
        pretrain(cfg, shards, run, str(ROOT / "ds_configs" / "zero2.json"))
    victim = next((run / "checkpoints" / "global_step6").glob("*optim_states.pt"))
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # a save cut short
    longer = tiny("train.max_steps=8", "train.save_every=3", "train.precision=fp32", "train.eval_batches=0")
    second = pretrain(longer, shards, run, str(ROOT / "ds_configs" / "zero2.json"), resume="auto")
    assert second.resumed_from == "global_step3" and second.optimizer_state == "restored"
    assert len(second.skipped_checkpoints) == 1 and "global_step6" in second.skipped_checkpoints[0]
    assert "truncated" in second.skipped_checkpoints[0]
    assert "global_step6" in (run / "train.log").read_text()
    assert (run / "checkpoints" / "global_step6.broken-1").is_dir()  # set aside, not mixed with the new save
    assert tags(run / "checkpoints") == ["global_step3", "global_step6", "global_step8"]
    with pytest.raises(BertopsError, match="model.hidden_size=32"):
        pretrain(tiny("model.hidden_size=64", "train.max_steps=9"), shards, run, None, resume="auto")
    assert sorted(rows(run)) == list(range(1, 9))  # metrics.jsonl reads as one run: steps 1..8 once each
    assert (run / "curves.png").stat().st_size > 0 and any((run / "tensorboard").iterdir())


@pytest.mark.parametrize("ds", ["zero2", "zero0"])  # zero0: what the README advises for one process
def test_bf16_resume_repeats_the_same_losses_too(shards, tmp_path, ds):
    """What bf16 gives on resume: DeepSpeed keeps fp32 masters and bf16 weights, both restored: exact here."""
    from bertops.train import pretrain

    cfg = tiny("train.max_steps=6", "train.save_every=3", "train.precision=bf16", "train.eval_batches=0")
    whole = pretrain(cfg, shards, tmp_path / "whole", str(ROOT / "ds_configs" / f"{ds}.json"))
    tag = Path("checkpoints") / "global_step3"
    shutil.copytree(tmp_path / "whole" / tag, tmp_path / "cut" / tag)
    cut = pretrain(cfg, shards, tmp_path / "cut", str(ROOT / "ds_configs" / f"{ds}.json"), resume="auto")
    assert cut.resumed_from == "global_step3"
    assert [r["loss"] for r in cut.history] == [r["loss"] for r in whole.history[3:]]


@pytest.mark.parametrize("ds,overrides", [
    ("zero2", ("train.precision=fp16",)),  # dynamic loss scaling
    ("zero0", ("train.optimizer=lamb", "train.precision=fp32")),  # bertops' CPU LAMB
    ("zero3", ("train.activation_checkpointing=true",)),
], ids=["fp16", "lamb", "activation-checkpointing"])
def test_precision_optimizer_and_checkpointing_variants_train(shards, tmp_path, ds, overrides):
    from bertops.train import pretrain

    cfg = tiny("train.max_steps=3", "train.save_every=3", "train.eval_batches=0", *overrides)
    result = pretrain(cfg, shards, tmp_path / "run", str(ROOT / "ds_configs" / f"{ds}.json"))
    assert result.steps == 3 and all(math.isfinite(r["loss"]) and r["grad_norm"] is not None for r in result.history)
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_non_finite_loss_stops_with_one_line(shards, tmp_path):
    from bertops.train import pretrain

    cfg = tiny("train.precision=fp32", "train.learning_rate=1e6", "train.warmup_steps=0", "train.gradient_clipping=0",
               "train.max_steps=30", "train.save_every=100", "train.eval_batches=0")
    with pytest.raises(BertopsError, match="the training loss became nan by step") as err:
        pretrain(cfg, shards, tmp_path / "run", str(ROOT / "ds_configs" / "zero2.json"))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run" / "checkpoints" / "latest").exists()


def test_sigterm_saves_the_step_in_flight_and_resume_goes_on_as_if_never_stopped(shards, tmp_path):
    """A scheduler's SIGTERM: the current step finishes and is saved, one line, exit 143, no final/."""
    import re

    from bertops.train import pretrain
    from bertops.train.checkpoints import tags

    common = ("train.max_steps=40", "train.save_every=1000", "train.precision=fp32", "train.eval_batches=0")
    reference = {r["step"]: r["loss"] for r in pretrain(tiny(*common), shards, tmp_path / "whole", None).history}
    cut = tmp_path / "cut"
    proc = subprocess.Popen([bertops_cmd(), *pretrain_args(shards, cut, None, *common)], env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not rows(cut):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err
    found = re.fullmatch(r"stopped: SIGTERM after step (\d+), checkpoint global_step\1 saved: rerun the same command "
                         r"with --resume auto \(Python: resume=\"auto\"\) to go on from it", err.strip().splitlines()[-1])
    assert found, err[-2000:]
    stopped = int(found[1])
    assert 1 <= stopped < 40 and tags(cut / "checkpoints") == [f"global_step{stopped}"]  # not on the save schedule
    assert sorted(rows(cut)) == list(range(1, stopped + 1)) and not (cut / "final").exists()

    resumed = pretrain(tiny(*common), shards, cut, None, resume="auto")
    assert resumed.resumed_from == f"global_step{stopped}" and resumed.optimizer_state == "restored"
    assert sorted(rows(cut)) == list(range(1, 41))
    for row in resumed.history:  # fp32 on CPU: bit for bit, give or take the process
        assert abs(row["loss"] - reference[row["step"]]) <= 1e-6, row


def test_stop_flag_takes_the_first_signal_and_yields_to_the_same_one_again():
    """Real signals to this process: the first is only noted, another kind is ignored, the same again acts."""
    from bertops.train.stop import StopFlag

    before = signal.getsignal(signal.SIGINT)
    with StopFlag() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # handlers run between bytecodes of the main thread
        assert stop.signum == signal.SIGINT and stop.agreed("cpu") == signal.SIGINT
        os.kill(os.getpid(), signal.SIGTERM)  # the launcher passing Ctrl-C on: already stopping
        time.sleep(0.05)
        assert stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):  # Ctrl-C twice: Python's own handler, now
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is before and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_step_lines_say_the_time_left_at_this_process_pace(monkeypatch):
    from bertops.train import metrics

    clock = iter([100.0, 130.0, 100.0 + 3 * 3600])
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    pace = metrics.Pace(10, 1000)  # resumed at step 10: its pace counts from there
    assert pace.eta(10) == ""
    assert pace.eta(13) == "  eta 2h44m"  # 10 s a step, 987 left
    assert pace.eta(998) == "  eta 22s"  # 3 h for 988 steps, 2 left
    assert pace.eta(1000) == ""


def test_two_phase_schedule_switches_data_and_micro_batch(shards, minilm_dir, tmp_path):
    from bertops.data.corpus import write_bundled_corpus
    from bertops.data.prepare import prepare
    from bertops.train import pretrain

    write_bundled_corpus(tmp_path / "corpus.txt")
    long = tmp_path / "long"
    prepare([tmp_path / "corpus.txt"], minilm_dir, long, seq_len=128, progress=False)
    run = tmp_path / "run"
    cfg = tiny("train.max_steps=5", "train.save_every=4", "train.phase2_step=3", f"train.phase2_data={long}",
               "train.phase2_micro_batch_size=2", "train.eval_batches=0")
    result = pretrain(cfg, shards, run, str(ROOT / "ds_configs" / "zero1.json"))
    assert result.steps == 5 and sorted(rows(run)) == [1, 2, 3, 4, 5]
    log = (run / "train.log").read_text()
    assert "step 3: phase 2 (micro batch 2)" in log
    meta = json.loads((run / "checkpoints" / "global_step4" / "bertops_checkpoint.json").read_text())
    assert (meta["phase"], meta["position"]) == (2, 8)  # one phase-2 step of global batch 8
    resumed = pretrain(tiny("train.max_steps=6", "train.save_every=4", "train.phase2_step=3",
                            f"train.phase2_data={long}", "train.phase2_micro_batch_size=2", "train.eval_batches=0"),
                       shards, run, str(ROOT / "ds_configs" / "zero1.json"), resume="global_step4")
    assert resumed.resumed_from == "global_step4" and resumed.steps == 6


def test_pretraining_continues_from_a_released_encoder(shards, minilm_dir, tmp_path):
    """train.init_from (task-adaptive pretraining): all-MiniLM-L6-v2's shape and weights, whatever the config's
    model section says (tiny.yaml's here), fresh MLM/NSP heads; shards of another tokenizer are refused."""
    from safetensors.torch import load_file

    from bertops.checkpoint import read_weights
    from bertops.data.corpus import write_bundled_corpus
    from bertops.data.prepare import prepare
    from bertops.train import pretrain

    run = tmp_path / "run"
    cfg = tiny("train.max_steps=2", "train.save_every=2", "train.eval_batches=1", "train.learning_rate=1e-5",
               "train.precision=fp32", f"train.init_from={minilm_dir}")
    result = pretrain(cfg, shards, run, str(ROOT / "ds_configs" / "zero0.json"))
    assert result.steps == 2
    assert "6 layers, hidden 384, 12 heads, vocabulary 30522" in (run / "train.log").read_text()
    assert "fresh MLM and NSP heads" in (run / "train.log").read_text()
    saved = json.loads((run / "final" / "config.json").read_text())
    assert (saved["hidden_size"], saved["num_hidden_layers"], saved["intermediate_size"]) == (384, 6, 1536)
    start = read_weights(minilm_dir)
    final = load_file(str(run / "final" / "model.safetensors"))
    moved = {k: float((final[k].float() - v.float()).abs().max()) for k, v in start.items() if k in final}
    assert len(moved) >= 100 and max(moved.values()) < 1e-4, max(moved.items(), key=lambda kv: kv[1])  # 2 steps at 1e-5
    assert final["cls.seq_relationship.weight"].shape == (2, 384)

    # the same vocabulary size but a cased tokenizer: ids would mean other word pieces
    cased = tmp_path / "cased"
    cased.mkdir()
    spec = json.loads((minilm_dir / "tokenizer.json").read_text())
    spec["normalizer"]["lowercase"] = False
    (cased / "tokenizer.json").write_text(json.dumps(spec))
    write_bundled_corpus(tmp_path / "corpus.txt")
    prepare([tmp_path / "corpus.txt"], cased, tmp_path / "cased-shards", seq_len=64, progress=False)
    proc = subprocess.run([bertops_cmd(), "pretrain", "-c", str(TINY_YAML), "--data", str(tmp_path / "cased-shards"),
                           "--out", str(tmp_path / "run2"), "--init-from", "all-MiniLM-L6-v2"],
                          capture_output=True, text=True, env=clean_env(), timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "tokenized with another tokenizer" in proc.stderr, proc.stderr
    assert not (tmp_path / "run2" / "checkpoints").exists()


def test_convert_any_stage_and_plot_cli(shards, tmp_path):
    from bertops.train import pretrain

    run = tmp_path / "run"
    pretrain(tiny("train.max_steps=2", "train.save_every=2", "train.eval_batches=0"), shards, run,
             str(ROOT / "ds_configs" / "zero0.json"))
    out = tmp_path / "hf"
    proc = subprocess.run([bertops_cmd(), "checkpoint", "convert", str(run / "checkpoints"), str(out)],
                          capture_output=True, text=True, env=clean_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert {"config.json", "model.safetensors", "vocab.txt"} <= {p.name for p in out.iterdir()}
    assert_hf_matches(out)
    (run / "curves.png").unlink()
    proc = subprocess.run([bertops_cmd(), "plot", str(run)], capture_output=True, text=True, env=clean_env())
    assert proc.returncode == 0 and (run / "curves.png").is_file()


# --- the real launcher, 2 CPU ranks ------------------------------------------------------------------


@pytest.mark.slow
def test_zero2_fp32_resume_after_sigkill_repeats_the_same_losses(shards, tmp_path):
    common = ("train.precision=fp32", "train.max_steps=40", "train.save_every=5", "train.eval_every=20")
    whole = run_launch(2, shards, tmp_path / "whole", "zero2.json", *common)
    reference = rows(whole)
    assert_learns([reference[s]["loss"] for s in sorted(reference)])
    assert_hf_matches(whole / "final")

    cut = tmp_path / "cut"
    proc = launch(2, shards, cut, "zero2.json", *common, start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline and not any(s >= 7 for s in rows(cut)):
        assert proc.poll() is None, (tmp_path / "cut.log").read_text()[-3000:]
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job, as a machine failure would
    proc.wait()
    killed_at = max(rows(cut))
    assert killed_at < 40
    run_launch(2, shards, cut, "zero2.json", *common)
    log = (cut / "train.log").read_text()
    resumed = int(log.split("resumed from global_step")[1].split(":")[0])
    assert 5 <= resumed <= killed_at
    resumed_rows = rows(cut)
    assert sorted(resumed_rows) == list(range(1, 41))
    for step in range(resumed + 1, 41):  # every step after the checkpoint, bit for bit (fp32, CPU)
        assert abs(resumed_rows[step]["loss"] - reference[step]["loss"]) <= 1e-6, step
        assert abs(resumed_rows[step]["grad_norm"] - reference[step]["grad_norm"]) <= 1e-6, step


@pytest.mark.slow
def test_zero3_two_ranks_then_resume_on_one_rank_from_the_same_examples(shards, tmp_path):
    """Then the one rank runs the default ds_config (auto: ZeRO-0 there), as a user resuming on one machine would."""
    two = run_launch(2, shards, tmp_path / "two", "zero3.json", "train.max_steps=12", "train.save_every=6",
                     "train.eval_every=6", *NO_DROPOUT)
    ref = rows(two)
    assert_learns([ref[s]["loss"] for s in sorted(ref)])
    assert "ZeRO stage 3" in (two / "train.log").read_text()
    assert_hf_matches(two / "final")
    assert sorted(rows(two, "eval_mlm_loss")) == [0, 6, 12]  # step 0: the untrained baseline

    one = tmp_path / "one"
    shutil.copytree(two / "checkpoints" / "global_step6", one / "checkpoints" / "global_step6")
    proc = subprocess.run([bertops_cmd(), *pretrain_args(shards, one, None, "train.max_steps=12",
                                                         "train.save_every=6", *NO_DROPOUT)],
                          capture_output=True, text=True, env=clean_env(), timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (one / "train.log").read_text()
    assert "DeepSpeed config auto -> ds_configs/zero0.json (one rank" in log and "ZeRO stage 0" in log
    assert "written by 2 rank(s), ZeRO-3" in log and "optimizer moments restart from zero" in log
    got = rows(one)
    assert sorted(got) == list(range(7, 13))
    # Step 7 runs the weights of step 6 on examples 48..55 (same masks): equal up to bf16 summation order.
    for key in ("mlm_loss", "nsp_loss"):
        assert abs(got[7][key] - ref[7][key]) < 1e-3, (key, got[7][key], ref[7][key])
    assert got[7]["mlm_accuracy"] == ref[7]["mlm_accuracy"] and got[7]["lr"] == pytest.approx(ref[7]["lr"])


@pytest.mark.slow
def test_two_nodes_on_one_machine_train_and_checkpoint(shards, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    out, port = tmp_path / "run", free_port()
    procs = []
    for node in (0, 1):
        cmd = ["deepspeed", "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node), "--master_addr",
               "127.0.0.1", "--master_port", str(port), bertops_cmd(),
               *pretrain_args(shards, out, "zero2.json", "train.max_steps=6", "train.save_every=3")]
        procs.append(subprocess.Popen(cmd, env=clean_env(), stdout=open(tmp_path / f"node{node}.log", "wb"),
                                      stderr=subprocess.STDOUT))
    for node, proc in enumerate(procs):
        assert proc.wait(timeout=240) == 0, (tmp_path / f"node{node}.log").read_text()[-3000:]
    meta = json.loads((out / "checkpoints" / "global_step6" / "bertops_checkpoint.json").read_text())
    assert meta["world_size"] == 2
    assert len(list((out / "checkpoints" / "global_step6").glob("*zero_pp_rank_*_optim_states.pt"))) == 2
    assert "2 rank(s)" in (out / "train.log").read_text()
    assert sorted(rows(out)) == list(range(1, 7))


@pytest.mark.slow
def test_demo_pretrain_serves_a_fill_mask_answer(tmp_path):
    from bertops.pretrain_demo import QUERY, run_pretrain_demo

    lines: list[str] = []
    summary = run_pretrain_demo(tmp_path / "demo", say=lines.append, steps=4)
    assert summary["steps"] == 4 and math.isfinite(summary["loss_last"])
    assert len(summary["served"]) == 5 and summary["served"] == summary["in_process"]
    assert any(QUERY in line and "served over HTTP" in line for line in lines)
    assert (tmp_path / "demo" / "run" / "final" / "model.safetensors").is_file()


@pytest.mark.slow
def test_ranks_die_with_the_launcher(shards, tmp_path):
    out = tmp_path / "run"
    proc = launch(2, shards, out, "zero2.json", "train.max_steps=100000", "train.save_every=100000")
    deadline = time.time() + 180
    while time.time() < deadline and not rows(out):
        assert proc.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
        time.sleep(0.1)
    assert len(rank_processes(out)) == 2
    proc.send_signal(signal.SIGTERM)  # to the `deepspeed` runner only, which does not forward it
    proc.wait(timeout=30)
    deadline = time.time() + 20
    while rank_processes(out) and time.time() < deadline:
        time.sleep(0.2)
    left = rank_processes(out)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left
