"""Bad input to the CLI ends in one line naming the problem and the fix, exit code 1, and nothing half-written."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bertops.cli import app

runner = CliRunner()


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _stray_temp() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("bertops-*")}


def _fails_cleanly(args: list[str], watch: Path, needle: str) -> str:
    """Run the CLI; assert exit 1, one line of output without a traceback, and no new file under ``watch``."""
    before, temp_before = _tree(watch), _stray_temp()
    result = runner.invoke(app, args)
    text = result.output.strip()
    assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}"  # a bug, not a user error
    assert result.exit_code == 1, text
    assert "Traceback" not in text and len(text.splitlines()) == 1, text
    assert text.startswith("error:") and needle in text, text
    assert _tree(watch) == before, f"left behind: {_tree(watch) - before}"
    assert _stray_temp() <= temp_before, "a temporary folder was left behind"
    return text


@pytest.fixture()
def checkpoint_copy(tmp_path, tiny_checkpoint):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint("embeddings"), dst)
    return dst


@pytest.mark.parametrize("keep", ["half", "header"])
def test_export_truncated_safetensors(tmp_path, checkpoint_copy, keep):
    weights = checkpoint_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if keep == "half" else data[:20])
    text = _fails_cleanly(["export", "onnx", "-m", str(checkpoint_copy), "--task", "embeddings",
                           "-o", str(tmp_path / "out")], tmp_path, "model.safetensors")
    assert "truncated" in text


def test_export_out_is_an_existing_file(tmp_path, checkpoint_copy):
    target = tmp_path / "answers.txt"
    target.write_text("keep me\n")
    text = _fails_cleanly(["export", "onnx", "-m", str(checkpoint_copy), "--task", "embeddings", "-o", str(target)],
                          tmp_path, "is a file")
    assert "answers.txt" in text and target.read_text() == "keep me\n"


def test_export_out_below_a_file(tmp_path, checkpoint_copy):
    (tmp_path / "plain").write_text("x")
    _fails_cleanly(["export", "onnx", "-m", str(checkpoint_copy), "--task", "embeddings",
                    "-o", str(tmp_path / "plain" / "out")], tmp_path, "is a file")


@pytest.fixture(params=["read-only mount", "sysfs"])
def unwritable_dir(request, tmp_path):
    """A folder that genuinely refuses writes, also to root (who ignores chmod).

    "read-only mount": a tmpfs mounted ro (EROFS; os.access says so up front); a non-root user, who
    cannot mount, gets a chmod 0555 folder instead, which binds them. "sysfs": /sys, where mkdir fails
    with EPERM even for root although os.access allows it, so the write itself must be caught.
    """
    if request.param == "sysfs":
        if not Path("/sys/kernel").is_dir():
            pytest.skip("no sysfs on this machine")
        yield Path("/sys")
        return
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)], check=True)
    try:
        assert not os.access(folder, os.W_OK)
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_export_out_on_read_only_filesystem(tmp_path, checkpoint_copy, unwritable_dir):
    out = unwritable_dir / "bertops-export"
    text = _fails_cleanly(["export", "onnx", "-m", str(checkpoint_copy), "--task", "embeddings", "-o", str(out)],
                          tmp_path, "cannot write to")
    assert str(unwritable_dir) in text and not out.exists()


def test_export_failing_late_removes_the_folder_it_created(tmp_path, checkpoint_copy):
    """A failure after the output folder was made (here: an impossible parity tolerance) takes the folder away."""
    cfg = tmp_path / "strict.yaml"
    cfg.write_text("export:\n  parity_atol: -1.0\n")
    out = tmp_path / "runs" / "export"
    _fails_cleanly(["export", "onnx", "-m", str(checkpoint_copy), "--task", "embeddings", "-o", str(out),
                    "-c", str(cfg)], tmp_path, "parity failed")
    assert not (tmp_path / "runs").exists()


def test_predict_latin1_input(tmp_path, exported):
    src = tmp_path / "texts.jsonl"
    src.write_bytes('{"text": "un café crème à Besançon"}\n'.encode("latin-1"))
    text = _fails_cleanly(["predict", "-m", str(exported("embeddings")), "-i", str(src),
                           "-o", str(tmp_path / "out" / "answers.jsonl")], tmp_path, "UTF-8")
    assert "texts.jsonl" in text and "line 1" in text


def test_tokenizer_train_binary_file(tmp_path):
    src = tmp_path / "blob.bin"
    src.write_bytes(bytes(range(256)) * 64 + b"\x00\xff\xfe" * 100)
    text = _fails_cleanly(["tokenizer", "train", "-i", str(src), "-o", str(tmp_path / "tok"), "--vocab-size", "120"],
                          tmp_path, "blob.bin")
    assert "UTF-8" in text


@pytest.mark.parametrize("content", [b"", b"\n  \n\t\n"], ids=["empty", "blank"])
def test_tokenizer_train_empty_file(tmp_path, content):
    src = tmp_path / "empty.txt"
    src.write_bytes(content)
    text = _fails_cleanly(["tokenizer", "train", "-i", str(src), "-o", str(tmp_path / "tok"), "--vocab-size", "120"],
                          tmp_path, "empty.txt")
    assert "no text" in text
