"""Files named by a checkpoint stay in its folder (issue 15): an index whose weight_map names a shard by an absolute
path, through `..`, or through a symlink that leads outside the folder raises UnsafeCheckpointPath (a
hub.CheckpointError) before any shard is opened, in every loader; and nothing on a load path unpickles."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from conftest import REPO
from v4jax import hub
from v4jax.checkpoint import load_hub_state
from v4jax.config import ModelConfig
from v4jax.model import abstract_model
from v4jax.convert import convert


@pytest.fixture
def checkpoint(tmp_path):
    """A one-shard checkpoint folder `ckpt` (tensor `a`, with an index) and, beside it, `outside.safetensors`."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    hub.write_safetensors(ckpt / "model-00001-of-00001.safetensors", {"a": np.ones(4, np.float32)})
    hub.write_safetensors(tmp_path / "outside.safetensors", {"a": np.zeros(4, np.float32)})
    return ckpt


def _index(ckpt, shard):
    (ckpt / hub.INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": {"a": shard}}))


@pytest.mark.parametrize("form", ["dotdot", "absolute", "symlink", "symlinked_dotdot"])
def test_an_index_cannot_name_a_shard_outside_its_folder(checkpoint, form):
    outside = checkpoint.parent / "outside.safetensors"
    if form == "dotdot":
        _index(checkpoint, "../outside.safetensors")
    elif form == "absolute":
        _index(checkpoint, str(outside))
    elif form == "symlink":  # an innocent name, but the file is a link to elsewhere
        os.symlink(outside, checkpoint / "model-00002-of-00002.safetensors")
        _index(checkpoint, "model-00002-of-00002.safetensors")
    else:  # a folder inside that links out, and a name through it
        os.symlink(checkpoint.parent, checkpoint / "sub")
        _index(checkpoint, "sub/outside.safetensors")
    with pytest.raises(hub.UnsafeCheckpointPath, match="outside") as e:
        hub.HubCheckpoint(checkpoint)
    assert isinstance(e.value, hub.CheckpointError)
    if form in ("dotdot", "absolute"):
        assert str(checkpoint / hub.INDEX_FILE) in str(e.value)  # names the index that said so
    else:
        assert "is a symlink to" in str(e.value) and str(outside.resolve()) in str(e.value)


def test_a_lone_model_safetensors_that_links_out_is_refused(checkpoint):
    os.unlink(checkpoint / "model-00001-of-00001.safetensors")
    os.symlink(checkpoint.parent / "outside.safetensors", checkpoint / "model.safetensors")
    with pytest.raises(hub.UnsafeCheckpointPath, match="is a symlink to"):
        hub.HubCheckpoint(checkpoint)


def test_names_and_links_that_stay_inside_are_fine(checkpoint):
    (checkpoint / "shards").mkdir()
    os.rename(checkpoint / "model-00001-of-00001.safetensors", checkpoint / "shards" / "real.safetensors")
    os.symlink("shards/real.safetensors", checkpoint / "model-00001-of-00001.safetensors")
    _index(checkpoint, "model-00001-of-00001.safetensors")  # a symlink to a file in the folder
    assert hub.HubCheckpoint(checkpoint)["a"].tolist() == [1, 1, 1, 1]
    _index(checkpoint, "shards/real.safetensors")
    assert hub.HubCheckpoint(checkpoint)["a"].tolist() == [1, 1, 1, 1]
    os.symlink(checkpoint, checkpoint.parent / "link-to-ckpt")  # the folder itself reached through a link
    assert hub.HubCheckpoint(checkpoint.parent / "link-to-ckpt")["a"].tolist() == [1, 1, 1, 1]


def test_loaders_and_the_converter_refuse_it_before_reading(tmp_path):
    """The same check guards load_hub_state and v4jax-convert: a real checkpoint whose index points one shard
    outside fails with the named error and the conversion writes nothing."""
    cfg = ModelConfig.preset("tiny", n_layers=2, n_hash_layers=1, compress_ratios=(0, 4, 0))
    hub.write_random_checkpoint(tmp_path / "ckpt", cfg.to_hf_config(), 0, max_shard_bytes=1 << 20)
    index = json.loads((tmp_path / "ckpt" / hub.INDEX_FILE).read_text())
    last = sorted(set(index["weight_map"].values()))[-1]
    os.rename(tmp_path / "ckpt" / last, tmp_path / last)
    index["weight_map"] = {n: f"../{s}" if s == last else s for n, s in index["weight_map"].items()}
    (tmp_path / "ckpt" / hub.INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(hub.UnsafeCheckpointPath, match=re.escape(f"'../{last}' points outside")):
        load_hub_state(abstract_model(cfg), tmp_path / "ckpt")
    with pytest.raises(hub.UnsafeCheckpointPath):
        convert(tmp_path / "ckpt", tmp_path / "out", progress=lambda *a: None)
    assert sorted(os.listdir(tmp_path)) == ["ckpt", last]


def test_nothing_on_a_load_path_unpickles():
    """The loaders read safetensors (JSON header + raw bytes), JSON and Orbax; numpy's np.load refuses pickles by
    default (allow_pickle=False), YAML is read with yaml.safe_load, and no module uses pickle, allow_pickle=True,
    torch.load or yaml.load."""
    sources = [p for d in ("v4jax", "infer", "train") for p in (REPO / d).rglob("*.py")]
    assert sources
    for path in sources:
        text = path.read_text()
        for pattern in (r"\bpickle\b", r"allow_pickle\s*=\s*True", r"torch\.load\(", r"yaml\.(unsafe_)?load\("):
            assert not re.search(pattern, text), f"{path.relative_to(REPO)}: {pattern}"
