"""The command line tools on bad input (issue 15): a known error (ConfigError, CheckpointMismatch, the safetensors
reader's CheckpointError, a missing or existing path, a bad argument) is one line `prog: message` on stderr with
exit status 1 and no traceback (the traceback only with --debug or V4JAX_DEBUG=1), found before weights are read,
and nothing is left half-written; --help shows every default."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from infer.cli import main as generate_main
from v4jax import hub
from v4jax.__main__ import main as v4jax_main
from v4jax.config import ModelConfig
from v4jax.convert import main as convert_main

TINY = ModelConfig.preset("tiny", n_layers=2, n_hash_layers=1, compress_ratios=(0, 4, 0))


@pytest.fixture
def src(tmp_path):
    hub.write_random_checkpoint(tmp_path / "src", TINY.to_hf_config(), 0)
    return tmp_path / "src"


def _without_hidden_size(src):
    hf = json.loads((src / "config.json").read_text())
    del hf["hidden_size"]
    (src / "config.json").write_text(json.dumps(hf))


def _run(args, env=None):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def test_convert_reports_a_config_error_in_one_line_and_writes_nothing(src, tmp_path):
    _without_hidden_size(src)
    r = _run(["-m", "v4jax.convert", "to-orbax", str(src), str(tmp_path / "out")])
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("v4jax-convert: HF config: missing ['hidden_size']") and r.stderr.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == ["src"]  # no output, journal or lock file
    r = _run(["-m", "v4jax.convert", "to-orbax", str(src), str(tmp_path / "out"), "--debug"])
    assert r.returncode == 1 and "Traceback" in r.stderr and "ConfigError: HF config: missing" in r.stderr
    r = _run(["-m", "v4jax.convert", "to-orbax", str(src), str(tmp_path / "out")], env={"V4JAX_DEBUG": "1"})
    assert r.returncode == 1 and "Traceback" in r.stderr
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_generate_reports_errors_in_one_line():
    r = _run(["-m", "infer.cli", "no/such/folder", "--tokenizer", "train/assets/stdlib-bpe-1024.json"])
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr == ("v4jax-generate: no/such/folder: not a folder or a run config (.yaml); "
                        "see v4jax-generate --help\n")


def _error(main, argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code != 0 and isinstance(e.value.code, str) and "\n" not in e.value.code
    return e.value.code


@pytest.mark.parametrize("case, message", [
    ("missing source",
     "v4jax-convert: {tmp}/nothing: neither model.safetensors.index.json nor model.safetensors found"),
    ("damaged shard", "v4jax-convert: {tmp}/src/model-00001-of-00002.safetensors: truncated"),
    ("shard outside", "v4jax-convert: {tmp}/src/model.safetensors.index.json: file name '../x.safetensors' points "
                      "outside {tmp}/src"),
    ("existing destination", "v4jax-convert: {tmp}/src exists: choose a new output directory or delete it first"),
    ("no such folder", "v4jax-convert: {tmp}/a/b: no such folder to write out into; create it first"),
    ("bad mesh", "v4jax-convert: --mesh 'fsdp=0': write it as axis=size pairs with sizes >= 1, e.g. fsdp=4,expert=2"),
])
def test_convert_errors_name_the_problem(src, tmp_path, case, message):
    out = str(tmp_path / "out")
    argv = ["to-orbax", str(src), out]
    if case == "missing source":
        argv = ["to-orbax", str(tmp_path / "nothing"), out]
    elif case == "damaged shard":
        shard = src / "model-00001-of-00002.safetensors"
        with open(shard, "r+b") as f:
            f.truncate(os.path.getsize(shard) // 2)
    elif case == "shard outside":
        index = json.loads((src / hub.INDEX_FILE).read_text())
        first = next(iter(index["weight_map"]))
        index["weight_map"][first] = "../x.safetensors"
        (src / hub.INDEX_FILE).write_text(json.dumps(index))
    elif case == "existing destination":
        argv = ["to-hub", str(src), str(src)]
    elif case == "no such folder":
        argv = ["to-hub", str(src), str(tmp_path / "a" / "b" / "out")]
    else:
        argv += ["--mesh", "fsdp=0"]
    assert _error(convert_main, argv).startswith(message.format(tmp=tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_an_unwritable_destination_folder_is_named(src, tmp_path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as a non-root user sees a read-only folder
    assert _error(convert_main, ["to-orbax", str(src), str(tmp_path / "out")]) == (
        f"v4jax-convert: {tmp_path}: not writable, so out cannot be written there")
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_a_checkpoint_mismatch_keeps_its_list(src, tmp_path):
    hf = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(dict(hf, n_routed_experts=8)))
    with pytest.raises(SystemExit) as e:
        convert_main(["to-orbax", str(src), str(tmp_path / "out")])
    lines = e.value.code.splitlines()
    assert lines[0] == "v4jax-convert: checkpoint does not match the model config:"
    assert lines[1].startswith("  unknown tensors (not in this config's model): ['layers.0.ffn.experts.10.w1.weight'")
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_generate_checks_arguments_before_loading(tmp_path):
    ckpt = str(tmp_path / "nothing-here")
    tok = str(REPO / "train" / "assets" / "stdlib-bpe-1024.json")
    assert _error(generate_main, [ckpt]) == ("v4jax-generate: no tokenizer: pass --tokenizer path/to/tokenizer.json "
                                             "(only a training run brings its own)")
    assert _error(generate_main, [ckpt, "--tokenizer", tok, "--speculative", "dspark", "--confidence", "1.5"]) == (
        "v4jax-generate: --confidence 1.5: give a threshold between 0 and 1")
    assert _error(generate_main, [ckpt, "--tokenizer", tok, "--confidence", "0.5"]) == (
        "v4jax-generate: --confidence cuts DSpark draft blocks: use it with --speculative dspark")
    assert _error(generate_main, [ckpt, "--tokenizer", tok, "--adapters", ckpt]) == (
        f"v4jax-generate: --adapters {ckpt}: no such folder; pass the folder that `python -m train.export ... "
        "--adapters-only --out DIR` wrote")
    assert _error(generate_main, [ckpt, "seed=1", "--tokenizer", tok]) == (
        f"v4jax-generate: seed=1: key=value overrides are for a training run config (.yaml), and {ckpt} is not one: "
        "drop them")


@pytest.mark.parametrize("main, argv, defaults", [
    (convert_main, ["to-orbax", "--help"], ["(default: quantized)", "(default: train)", "(default: 1.0)"]),
    (convert_main, ["to-hub", "--help"], ["(default: release)", "(default: 4.0)"]),
    (convert_main, ["verify", "--help"], ["(default: 16)"]),
    (generate_main, ["--help"], ["(default: 64)", "(default: 0.0)", "(default: 1.0)", "(default: 0)"]),
    (v4jax_main, ["--help"], ["(default: tiny)", "(default: 300)"]),
])
def test_help_shows_the_defaults(main, argv, defaults, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert all(d in out for d in defaults), out
    assert main is v4jax_main or "--debug" in out  # the smoke run has no error handling to switch
