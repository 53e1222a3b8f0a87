"""train/pretrain.py keeps a good state: bad steps (a loss spike, NaN) are skipped inside the compiled step, no
checkpoint is written after a bad step, bad steps in a row roll back to the newest checkpoint (which rotation
therefore never removes), and a damaged newest checkpoint is skipped on resume with a one-line note."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
from test_pretrain import run, small_config  # noqa: F401 - small_config is a fixture used here

from train.pretrain import step_is_good


def test_the_guard_rejects_nonfinite_loss_gradients_or_parameters_and_spikes():
    ok = {"w": jnp.ones(3), "b": jnp.zeros(2)}
    bad = {"w": jnp.array([1.0, jnp.inf, 0.0]), "b": jnp.zeros(2)}
    inf = jnp.float32(jnp.inf)
    assert step_is_good(jnp.float32(2.0), jnp.float32(1.0), ok, inf)
    assert not step_is_good(jnp.float32(jnp.nan), jnp.float32(1.0), ok, inf)
    assert not step_is_good(jnp.float32(2.0), jnp.float32(jnp.inf), ok, inf)
    assert not step_is_good(jnp.float32(2.0), jnp.float32(1.0), bad, inf)  # the update made a parameter inf
    assert not step_is_good(jnp.float32(7.0), jnp.float32(1.0), ok, jnp.float32(6.0))  # a spike
    assert step_is_good(jnp.float32(6.0), jnp.float32(1.0), ok, jnp.float32(6.0))


def test_resume_moves_only_damaged_checkpoints_aside(tmp_path):
    """In process, on a small state: a damaged newest checkpoint is moved aside when an older one restores;
    when none restores (here: another shape, as after a config change), nothing is moved and the error says so."""
    import orbax.checkpoint as ocp
    import pytest

    from train.cli import InputError
    from train.pretrain import restore_newest, save

    manager = ocp.CheckpointManager(tmp_path / "checkpoints")
    for step in (1, 2):
        save(manager, step, {"w": jnp.full(3, float(step))}, {"step": step})
    manager.wait_until_finished()
    for f in (tmp_path / "checkpoints" / "2" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"")
    with pytest.raises(InputError, match=r"no checkpoint in .* restores \(2: .*; 1: .*\); if the run config"):
        restore_newest(manager, {"w": jnp.zeros(4)})
    assert checkpoints(tmp_path) == [1, 2]
    (state, meta), note = restore_newest(manager, {"w": jnp.zeros(3)})
    assert meta == {"step": 1} and state["w"].tolist() == [1.0] * 3
    assert note.startswith("checkpoint 2 is damaged (") and "damaged-checkpoints" in note
    assert checkpoints(tmp_path) == [1] and manager.all_steps() == [1]
    manager.close()


def strict_records(run_dir: Path) -> list[dict]:
    """metrics.jsonl parsed as strict JSON (NaN / Infinity are errors)."""
    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")
    return [json.loads(line, parse_constant=refuse) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def checkpoints(run_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


# Runs train.pretrain with poisoned loss weights: the LM weight is 1000 on the first pass through step 5 (a loss
# spike) and NaN on every pass through steps 6 and 7 (0-based step indices 5 and 6); prints each save.
POISON = """
import sys
import train.pretrain as p
real_weights, real_save, seen = p.loss_weights, p.save, set()
def loss_weights(step, stage, cfg):
    w = real_weights(step, stage, cfg)
    if step == 4 and step not in seen:
        w["lm"] = 1000.0
    if step in (5, 6):
        w["lm"] = float("nan")
    seen.add(step)
    return w
def save(manager, step, *a, **k):
    print(f"SAVE {step}", flush=True)
    real_save(manager, step, *a, **k)
p.loss_weights, p.save = loss_weights, save
p.cli.run(p.main, "train.pretrain", sys.argv[1:])
"""


def test_bad_steps_are_skipped_never_saved_and_roll_back(small_config, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    p = run(["-c", POISON, str(small_config), f"run_dir={run_dir}", "checkpoint.every=1", "checkpoint.keep=1",
             "guard.max_bad_steps=2", "guard.max_rollbacks=1", "guard.spike_window=3",
             "stages=[{until_step: 8, batch_size: 4, seq_len: 64, attention: sparse}]"], check=False)
    out = p.stdout
    # steps 1-4 good; 5 a spike and 6 NaN: rollback to 4; 5 good (saved), 6 and 7 NaN: rollback to 5; 6 and 7
    # NaN again: a second rollback to 5 exceeds max_rollbacks, so the run stops and names checkpoint 5
    assert "step 5: loss spike" in out and "step 6: non-finite loss" in out, out
    assert "rolled back to checkpoint 4" in out and "rolled back to checkpoint 5" in out, out
    assert [int(line.split()[1]) for line in out.splitlines() if line.startswith("SAVE")] == [1, 2, 3, 4, 5]
    assert p.returncode == 1, p.stderr[-3000:]
    err = p.stderr.strip().splitlines()
    assert err[-1].startswith(
        "train.pretrain: stopped: 2 bad steps in a row at step 7, after 1 rollback(s) to checkpoint 5")
    assert "Traceback" not in p.stderr
    # with keep: 1 and a save due every step, the good checkpoint survived the bad steps
    assert checkpoints(run_dir) == [5]
    records = strict_records(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6, 7]  # the rolled-back steps are not repeated
    assert [r["skipped"] for r in records] == [False] * 5 + [True] * 2
    assert records[5]["loss"] is None  # NaN is written as null


def test_damaged_newest_checkpoint_falls_back_in_one_line(small_config, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    args = [str(small_config), f"run_dir={run_dir}",
            "stages=[{until_step: 4, batch_size: 4, seq_len: 64, attention: sparse}]"]
    run(["-m", "train.pretrain", *args])
    before = strict_records(run_dir)
    assert checkpoints(run_dir) == [2, 4]
    for f in (run_dir / "checkpoints" / "4" / "state").rglob("*"):  # truncate every file of the state
        if f.is_file():
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])

    p = run(["-m", "train.pretrain", *args])
    assert "compiling the train step" in p.stdout and "compiled and ran the first step in" in p.stdout
    assert "measured fp32 matmul (kept in" in p.stdout  # MFU's CPU peak: measured at the first start only
    line = next(s for s in p.stdout.splitlines() if s.startswith("resumed from"))
    assert "(step 2," in line and "checkpoint 4 is damaged" in line and "damaged-checkpoints" in line, line
    assert "Traceback" not in p.stderr and "Event loop is closed" not in p.stderr, p.stderr[-3000:]
    assert checkpoints(run_dir) == [2, 4]  # step 4 trained again and saved
    key = lambda rs: [(r["step"], r["loss"]) for r in rs]  # noqa: E731
    assert key(strict_records(run_dir)) == key(before)  # one line per step; steps 3-4 again, bitwise equal
