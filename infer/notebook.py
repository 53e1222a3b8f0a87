"""The checkpoint the notebooks in infer/notebooks open: always one in the released layout (config.json + FP8 / MXFP4
safetensors), loaded by the same `load_hub_state` call whatever its origin. In order of preference:

1. `$V4JAX_CHECKPOINT`: any released-layout checkpoint folder (e.g. DeepSeek-V4-Flash on hardware that holds it);
   its tokenizer.json if it has one, else the shipped tokenizer.
2. the model `bash run.sh` trained (runs/tiny), exported to the released layout by train.export's `export_model`
   into runs/tiny/release-step<N> the first time a notebook asks for step N; the run's tokenizer.
   `V4JAX_NOTEBOOK_TRAINED=0` skips it (tests/test_notebooks.py: the same work with or without a local run).
3. otherwise (a fresh clone, CI): the same architecture (the `tiny` preset) with random weights, written by
   v4jax.hub.write_random_checkpoint into a temporary folder removed at exit; the shipped tokenizer.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

from tokenizers import Tokenizer

from train import tokenizer as tokenizer_lib
from v4jax import hub
from v4jax.config import ModelConfig

REPO = Path(__file__).resolve().parents[1]
RUN_CONFIG = REPO / "configs" / "train" / "tiny.yaml"
RUN_DIR = REPO / "runs" / "tiny"


def notebook_checkpoint(seed: int = 0) -> tuple[Path, Tokenizer, str]:
    """-> (released-layout checkpoint folder, its tokenizer, what it is: "given", "trained" or "random")."""
    given = os.environ.get("V4JAX_CHECKPOINT")
    if given:
        path = Path(given)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"V4JAX_CHECKPOINT={given}: no config.json there (a released-layout folder)")
        tok = path / "tokenizer.json"
        return path, Tokenizer.from_file(str(tok)) if tok.exists() else tokenizer_lib.load(), "given"
    if os.environ.get("V4JAX_NOTEBOOK_TRAINED") != "0" and any((RUN_DIR / "checkpoints").glob("*")):
        return (*_export_trained(), "trained")
    tmp = tempfile.mkdtemp(prefix="v4jax-random-tiny-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    path = Path(tmp) / "tiny"
    hub.write_random_checkpoint(path, ModelConfig.preset("tiny").to_hf_config(), seed)
    return path, tokenizer_lib.load(), "random"


def _export_trained() -> tuple[Path, Tokenizer]:
    from train.pretrain import restore_run
    from v4jax.convert import export_model

    cwd = os.getcwd()
    os.chdir(REPO)  # the run config's paths (runs/tiny, data/stdlib) are relative to the repository
    try:
        model, tokenizer_path, meta = restore_run([str(RUN_CONFIG)])
        path = RUN_DIR / f"release-step{meta['step']}"
        if not path.exists():
            export_model(model, path, "release", progress=lambda *a: None)
        return path, tokenizer_lib.load(tokenizer_path)
    finally:
        os.chdir(cwd)
