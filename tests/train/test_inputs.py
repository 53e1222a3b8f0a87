"""Bad input to the train/ tools is named before anything compiles: run-config keys (typed, ranged, unknown),
corpora (missing, empty, shard names leading outside the folder), and the commands' --help and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from train import pretrain
from train.data import CorpusError, PackedStream, write_shards

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs" / "train" / "tiny.yaml")


def corpus(tmp_path: Path, docs=None) -> Path:
    docs = docs if docs is not None else [[0, 5, 6, 7], [0, 8, 9]]
    write_shards(docs, tmp_path / "c", vocab_size=16)
    return tmp_path / "c"


def rename_shard(folder: Path, name: str) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    meta["shards"][0]["name"] = name
    (folder / "meta.json").write_text(json.dumps(meta))


def test_shard_name_with_dotdot_is_refused(tmp_path):
    folder = corpus(tmp_path)
    for kind in ("tokens", "docs"):
        (tmp_path / f"00000.{kind}.npy").write_bytes((folder / f"00000.{kind}.npy").read_bytes())
    rename_shard(folder, "../00000")
    with pytest.raises(CorpusError, match=r"file name '\.\./00000.tokens.npy' points outside"):
        PackedStream(folder, 0)


def test_absolute_shard_name_is_refused(tmp_path):
    folder = corpus(tmp_path)
    for name in ("/etc/passwd", str(folder.resolve() / "00000")):  # even one that names a file inside
        rename_shard(folder, name)
        with pytest.raises(CorpusError, match=f"file name '{name}.tokens.npy' points outside"):
            PackedStream(folder, 0)


def test_shard_symlink_leading_out_is_refused(tmp_path):
    folder = corpus(tmp_path)
    outside = tmp_path / "elsewhere.tokens.npy"
    (folder / "00000.tokens.npy").rename(outside)
    (folder / "00000.tokens.npy").symlink_to(outside)
    with pytest.raises(CorpusError, match="00000.tokens.npy is a symlink to .*elsewhere.tokens.npy, outside"):
        PackedStream(folder, 0)


def test_empty_or_missing_corpus_is_named_before_compiling(tmp_path):
    empty = corpus(tmp_path, [[0], [0], [0]])  # three empty documents: nothing to predict
    with pytest.raises(CorpusError, match="no tokens to train on"):
        PackedStream(empty, 0)
    with pytest.raises(CorpusError, match="no tokens to train on"):  # main stops before building the model
        pretrain.main([CONFIG, f"data.path={empty}", f"run_dir={tmp_path / 'run'}"])
    meta = json.loads((empty / "meta.json").read_text())
    (empty / "meta.json").write_text(json.dumps(meta | {"shards": []}))
    with pytest.raises(CorpusError, match="lists no shards"):
        PackedStream(empty, 0)
    with pytest.raises(CorpusError, match="meta.json not found"):
        pretrain.main([CONFIG, f"data.path={tmp_path / 'none'}", f"run_dir={tmp_path / 'run'}"])
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_config_values_are_typed_and_ranged(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("schedule: {peak_lr: 3e-3}\ncheckpoint: {every: 0}\nstages: [{until_step: 5, batch_size: 2, "
                      "seq_len: 8, grad_accum: two}]\n")
    with pytest.raises(pretrain.ConfigError) as e:
        pretrain.load_config([str(config)])
    msg = str(e.value)
    assert "checkpoint.every = 0: Input should be greater than or equal to 1" in msg
    assert "stages[0].grad_accum = 'two'" in msg and "peak_lr" not in msg  # YAML's string '3e-3' is a number
    cfg = pretrain.load_config([str(config), "checkpoint.every=5", "stages=[{until_step: 5, batch_size: 2, "
                                                                   "seq_len: 8}]"])
    assert cfg["schedule"]["peak_lr"] == 3e-3 and cfg["checkpoint"]["every"] == 5
    with pytest.raises(pretrain.ConfigError, match=r"unknown key 'stages\[0\]\.atention'"):
        pretrain.load_config([CONFIG, "stages=[{until_step: 5, batch_size: 2, seq_len: 8, atention: dense}]"])
    with pytest.raises(pretrain.ConfigError, match=r"unknown key 'guard\.max_bad'; known keys here: \['max_bad_"):
        pretrain.load_config([CONFIG, "guard.max_bad=1"])
    with pytest.raises(pretrain.ConfigError, match="schedule.peak_lr = -1: Input should be greater than 0"):
        pretrain.load_config([CONFIG, "schedule.peak_lr=-1"])
    with pytest.raises(pretrain.ConfigError, match="until_step must increase"):
        pretrain.load_config([CONFIG, "stages=[{until_step: 5, batch_size: 2, seq_len: 8}, "
                                      "{until_step: 5, batch_size: 2, seq_len: 8}]"])


def cli(*args, env=None):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_help_as_script_and_module_lists_the_schema():
    for args in (["train/pretrain.py", "--help"], ["-m", "train.pretrain", "--help"]):
        p = cli(*args)
        assert p.returncode == 0, p.stderr
        assert "guard.max_bad_steps (int, default 3)" in p.stdout, p.stdout
        assert "checkpoint.async (bool, default true)" in p.stdout
    for module in ("train.data", "train.export"):
        p = cli("-m", module, "--help")
        assert p.returncode == 0 and "--debug" in p.stdout, (module, p.stderr)


def test_known_errors_are_one_line_unless_debug(tmp_path):
    p = cli("-m", "train.pretrain", CONFIG, "checkpoint.every=0")
    assert p.returncode == 1 and p.stderr.strip().splitlines() == [
        "train.pretrain: config: checkpoint.every = 0: Input should be greater than or equal to 1"], p.stderr
    p = cli("-m", "train.pretrain", CONFIG, "checkpoint.every=0", env={"V4JAX_DEBUG": "1"})
    assert p.returncode == 1 and "Traceback" in p.stderr
    p = cli("-m", "infer.cli", CONFIG, f"data.path={tmp_path}", "--debug")  # sampling a run: v4jax-generate
    assert p.returncode == 1 and "Traceback" in p.stderr and "meta.json not found" in p.stderr
    p = cli("-m", "train.data", "stdlib", "--output", str(tmp_path))
    assert p.returncode == 1 and p.stderr.strip().splitlines() == [f"train.data: {tmp_path} already exists: remove it "
                                                                   "or choose another --output"], p.stderr
