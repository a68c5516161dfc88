"""Configs (every shipped YAML and DeepSpeed JSON), overrides, and the CLI's error contract."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bertops.cli import app
from bertops.config import Config, load_config, packaged_configs
from bertops.errors import BertopsError

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.mark.parametrize("path", packaged_configs(), ids=lambda p: p.name)
def test_every_packaged_yaml_loads(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# bertops "), "every shipped YAML starts with the command that runs it"
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.model.hidden_size % cfg.model.num_attention_heads == 0
    assert cfg.train.ds_config == "auto" or (ROOT / cfg.train.ds_config).is_file()


def test_packaged_configs_exist():
    assert {p.name for p in packaged_configs()} >= {"default.yaml", "tiny.yaml"}


@pytest.mark.parametrize("path", sorted((ROOT / "ds_configs").glob("*.json")), ids=lambda p: p.name)
def test_every_ds_config_is_valid_deepspeed(path):
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    raw = json.loads(path.read_text())
    # batch size and learning rate come from the bertops config, so they cannot disagree
    assert not {"train_batch_size", "train_micro_batch_size_per_gpu", "optimizer", "scheduler"} & raw.keys()
    zero = DeepSpeedZeroConfig(**raw["zero_optimization"])  # DeepSpeed's own validation
    assert zero.stage in (0, 1, 2, 3)


def test_overrides_types_and_frozen():
    cfg = load_config(None, ["model.hidden_size=64", "model.num_attention_heads=4", "train.learning_rate=3e-4",
                             "serve.preferred_batch_sizes=[4, 8]", "data.whole_word_masking=true"])
    assert cfg.model.hidden_size == 64 and cfg.train.learning_rate == 3e-4
    assert cfg.serve.preferred_batch_sizes == (4, 8) and cfg.data.whole_word_masking is True
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field 'hidden_size'"):
        cfg.model.hidden_size = 1  # frozen


def test_grad_accum_is_derived_and_checked():
    cfg = load_config(None, ["train.global_batch_size=64", "train.micro_batch_size=8"])
    assert cfg.train.grad_accum_steps(world_size=2) == 4
    with pytest.raises(BertopsError, match="not divisible"):
        cfg.train.grad_accum_steps(world_size=3)


@pytest.mark.parametrize(
    "bad, message",
    [
        (["model.hidden_size=30", "model.num_attention_heads=4"], "not divisible by model.num_attention_heads"),
        (["model.hiden_size=30"], "unknown override key 'model.hiden_size'"),
        (["model.hidden_size=big"], "wrong type"),
        (["nonsense"], "not of the form"),
        (["model.attn_implementation=flash"], "unknown; use one of"),
    ],
)
def test_bad_configs_raise_named_errors(bad, message):
    with pytest.raises(BertopsError, match=message):
        load_config(None, bad)


def _one_line_error(result, needle):
    assert result.exit_code == 1, result.output
    text = result.output.strip()
    assert "Traceback" not in text and len(text.splitlines()) == 1, text
    assert text.startswith("error:") and needle in text, text


def test_cli_bad_inputs_give_one_line_errors(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model:\n  hidden_size: [1, 2\n")
    _one_line_error(runner.invoke(app, ["config", "show", "-c", str(bad_yaml)]), "is not valid YAML at line")
    _one_line_error(runner.invoke(app, ["config", "show", "model.nope=1"]), "unknown override key 'model.nope'")
    _one_line_error(
        runner.invoke(app, ["checkpoint", "info", "--model", str(tmp_path / "missing")]), "does not exist"
    )
    divisible = tmp_path / "heads.yaml"
    divisible.write_text("model:\n  hidden_size: 100\n  num_attention_heads: 12\n")
    _one_line_error(runner.invoke(app, ["config", "validate", str(divisible)]), "not divisible")
    (tmp_path / "empty_ckpt").mkdir()
    _one_line_error(runner.invoke(app, ["checkpoint", "info", "--model", str(tmp_path / "empty_ckpt")]), "no config.json")


def test_cli_wiring(minilm_dir, tmp_path):
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for group in ("info", "tokenizer", "config", "checkpoint"):
        assert group in result.output
    info = runner.invoke(app, ["info", "--json"])
    assert info.exit_code == 0, info.output
    data = json.loads(info.output)
    assert data["cuda_available"] in (True, False) and "CPUExecutionProvider" in data["onnxruntime_providers"]
    shown = runner.invoke(app, ["config", "show", "-c", str(ROOT / "bertops/configs/tiny.yaml"), "model.num_hidden_layers=3"])
    assert shown.exit_code == 0 and "num_hidden_layers: 3" in shown.output
    described = runner.invoke(app, ["checkpoint", "info", "--model", "all-MiniLM-L6-v2"])
    assert described.exit_code == 0, described.output
    assert json.loads(described.output)["architecture"]["num_hidden_layers"] == 6
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(["The quick brown fox jumps over the lazy dog."] * 50))
    trained = runner.invoke(app, ["tokenizer", "train", "-i", str(corpus), "-o", str(tmp_path / "tok"), "--vocab-size", "120"])
    assert trained.exit_code == 0, trained.output
    enc = runner.invoke(app, ["tokenizer", "encode", "-t", str(tmp_path / "tok"), "The quick fox", "lazy dog"])
    assert json.loads(enc.output)["tokens"][0] == "[CLS]"


def test_yaml_settings_reach_the_commands_and_flags_win(exported, tmp_path):
    """`-c file.yaml` feeds serve.* into `triton build`; an explicit flag overrides the file."""
    from bertops.triton.validate import parse_config

    folder = exported("sequence-classification", num_labels=3)
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("serve:\n  max_batch_size: 4\n  instances: 2\n  preferred_batch_sizes: [2, 4]\n")
    repo = tmp_path / "repo"
    result = runner.invoke(app, ["triton", "build", "-e", str(folder), "-n", "cls", "-r", str(repo), "-c", str(cfg)])
    assert result.exit_code == 0, result.output
    enc = parse_config(repo / "cls" / "config.pbtxt")  # the single pipeline model (serve.pipeline default)
    assert enc.max_batch_size == 4 and enc.instance_group[0].count == 2
    assert list(enc.dynamic_batching.preferred_batch_size) == [2, 4]
    result = runner.invoke(app, ["triton", "build", "-e", str(folder), "-n", "cls", "-r", str(repo), "-c", str(cfg),
                                 "--max-batch-size", "8"])
    assert result.exit_code == 0, result.output
    assert parse_config(repo / "cls" / "config.pbtxt").max_batch_size == 8
    cfg.write_text(cfg.read_text() + "  pipeline: ensemble\n")
    result = runner.invoke(app, ["triton", "build", "-e", str(folder), "-n", "cls", "-r", str(repo), "-c", str(cfg)])
    assert result.exit_code == 0, result.output
    assert parse_config(repo / "cls_encoder" / "config.pbtxt").max_batch_size == 4
