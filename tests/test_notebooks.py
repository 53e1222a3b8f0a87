"""The notebooks in infer/notebooks execute top to bottom without error (nbclient, a python3 kernel on this
interpreter, working directory = the notebook's folder) and each draws at least one plot."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "infer" / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert {p.name for p in NOTEBOOKS} >= {"quickstart.ipynb", "look_inside.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes_and_plots(path: Path, monkeypatch):
    nb = nbformat.read(path, as_version=4)
    stored = [c for c in nb.cells if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not stored, f"{path.name} is stored with outputs: clear them before saving (outputs are not kept in git)"
    # The kernel inherits this environment: the inline backend (PNG outputs) whatever MPLBACKEND says, one CPU
    # device (conftest's 8 fake ones are for sharding tests), and the model the notebooks open on a fresh clone
    # (random weights in the released layout, infer/notebook.py), with or without a local runs/tiny.
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
    monkeypatch.setenv("XLA_FLAGS", " ".join(flags))
    monkeypatch.setenv("V4JAX_NOTEBOOK_TRAINED", "0")
    monkeypatch.delenv("V4JAX_CHECKPOINT", raising=False)
    nb.cells.insert(0, nbformat.v4.new_code_cell("import sys; print(sys.executable, end='')"))
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()

    assert nb.cells[0].outputs[0]["text"] == sys.executable, "the kernel must run this interpreter (the .venv)"
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert images, f"{path.name} drew no plot"


def test_notebooks_take_a_released_checkpoint_by_path(monkeypatch, tmp_path):
    """$V4JAX_CHECKPOINT names the checkpoint the notebooks open (with the shipped tokenizer when it brings none);
    a folder without a config.json is refused by name."""
    from conftest import FIXTURE
    from infer.notebook import notebook_checkpoint

    monkeypatch.setenv("V4JAX_CHECKPOINT", str(FIXTURE))
    path, tok, kind = notebook_checkpoint()
    assert (path, kind) == (FIXTURE, "given") and tok.token_to_id("<|doc|>") == 0
    monkeypatch.setenv("V4JAX_CHECKPOINT", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"V4JAX_CHECKPOINT={tmp_path}: no config.json"):
        notebook_checkpoint()
