"""The training loop (train/pretrain.py) end to end, in subprocesses: kill -9 during a checkpoint write and
resume with bitwise-equal losses, and two jax.distributed processes on 127.0.0.1 sharing one mesh."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from train import tokenizer as tokenizer_lib
from train.data import tokenize_files
from train.pretrain import load_config

REPO = Path(__file__).resolve().parents[2]
SMALL = """
model:
  preset: tiny
  overrides: {n_layers: 2, n_hash_layers: 1, compress_ratios: [4, 128, 0], n_routed_experts: 8, n_heads: 4,
              o_groups: 2, moe_inter_dim: 64, index_n_heads: 4}
data: {path: DATA}
stages:
  - {until_step: 6, batch_size: 4, seq_len: 64, attention: sparse}
schedule: {peak_lr: 3.0e-3, final_lr: 3.0e-4, warmup_steps: 2, decay_start: 4}
checkpoint: {every: 2, keep: 5}
log_every: 1
"""


@pytest.fixture(scope="module")
def small_config(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    tokenize_files(tokenizer_lib.stdlib_files()[:30], root / "data")
    path = root / "small.yaml"
    path.write_text(SMALL.replace("DATA", str(root / "data")))
    return path


def run(args, env_extra=None, check=True):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", **(env_extra or {})}
    p = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=500)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def losses_by_step(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out[r["step"]] = r["loss"]  # a resumed run re-logs steps after its checkpoint: the last record counts
    return out


# Runs train.pretrain, but SIGKILLs itself right after the save of step $KILL_AT started (the async write in flight).
KILL_IN_WRITE = """
import os, signal, sys
import train.pretrain as p
real = p.save
def save(manager, step, *a, **k):
    real(manager, step, *a, **k)
    if step == int(os.environ["KILL_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)
p.save = save
p.main(sys.argv[1:])
"""


def strict_json(line: str) -> dict:
    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")
    return json.loads(line, parse_constant=refuse)


def test_kill_during_checkpoint_write_then_resume_bitwise(small_config, tmp_path):
    """Two kills (during the writes of steps 4 and 6) and resumes: the losses equal an uninterrupted run's
    bitwise, metrics.jsonl has one strict-JSON line per step and TensorBoard one loss per step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    run(["-m", "train.pretrain", str(small_config), f"run_dir={ref_dir}"])
    ref = losses_by_step(ref_dir)
    assert sorted(ref) == [1, 2, 3, 4, 5, 6]

    ckpts = run_dir / "checkpoints"
    for kill_at, committed in ((4, [2]), (6, [2, 4])):
        killed = run(["-c", KILL_IN_WRITE, str(small_config), f"run_dir={run_dir}"], {"KILL_AT": str(kill_at)},
                     check=False)
        assert killed.returncode == -9, killed.stderr[-2000:]
        complete = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
        assert complete == committed, f"the write of step {kill_at} was in flight, found {sorted(os.listdir(ckpts))}"

    resumed = run(["-m", "train.pretrain", str(small_config), f"run_dir={run_dir}"])
    assert "resumed from" in resumed.stdout and "(step 4," in resumed.stdout
    records = [strict_json(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]  # steps after a restored checkpoint not repeated
    assert all(r["loss"] == ref[r["step"]] for r in records), (records, ref)  # bitwise: floats compared with ==
    assert sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == [2, 4, 6]
    board = EventAccumulator(str(run_dir / "tensorboard"))
    board.Reload()
    events = board.Scalars("loss")
    assert [e.step for e in events] == [1, 2, 3, 4, 5, 6]
    assert all(abs(e.value - ref[e.step]) <= 1e-6 * abs(ref[e.step]) for e in events)  # stored as float32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_share_a_mesh_and_write_one_checkpoint(small_config, tmp_path):
    """Two jax.distributed processes with 2 CPU devices each: a 4-device mesh (data 2 x fsdp 2) spanning both,
    a few steps, one checkpoint written jointly; the losses equal a one-process run on 4 devices."""
    port = free_port()
    common = [str(small_config), f"run_dir={tmp_path / 'multi'}", "mesh={data: 2, fsdp: 2, expert: 1, tensor: 1}",
              "stages=[{until_step: 2, batch_size: 4, seq_len: 64, attention: sparse}]", "checkpoint.every=2"]
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "train.pretrain", *common, f"distributed.coordinator_address=127.0.0.1:{port}",
         "distributed.num_processes=2", f"distributed.process_id={i}"],
        cwd=REPO, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    outs = [p.communicate(timeout=500) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, f"{out[-2000:]}\n{err[-3000:]}"
    assert "2 process(es), 4 device(s)" in outs[0][0]
    assert (tmp_path / "multi" / "checkpoints" / "2").is_dir()
    multi = losses_by_step(tmp_path / "multi")

    single = tmp_path / "single"
    run(["-m", "train.pretrain", *common[:1], f"run_dir={single}", *common[2:]],
        env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    ref = losses_by_step(single)
    assert all(abs(multi[s] - ref[s]) < 1e-4 * abs(ref[s]) for s in (1, 2)), (multi, ref)


def test_config_errors_name_the_key(small_config):
    with pytest.raises(ValueError, match="unknown key 'schedul'"):
        load_config([str(small_config), "schedul.peak_lr=1"])
    with pytest.raises(ValueError, match=r"stages\[0\]\.attention = 'sparce'"):
        load_config([str(small_config), "stages=[{until_step: 2, attention: sparce}]"])
    cfg = load_config([str(small_config), "schedule.peak_lr=1e-3", "loss.mtp_weight=0.2"])
    assert cfg["schedule"]["peak_lr"] == 1e-3 and cfg["loss"]["mtp_weight"] == 0.2


def test_every_run_config_loads():
    for path in sorted((REPO / "configs" / "train").glob("*.yaml")):
        cfg = load_config([str(path)])
        assert cfg["stages"] and cfg["stages"][-1]["until_step"] > 0, path


FINETUNE = """
model: {config: FIXTURE, overrides: {compute_dtype: float32}}
init: FIXTURE
data: {path: DATA}
stages:
  - {until_step: 2, batch_size: 2, seq_len: 64, attention: sparse}
schedule: {peak_lr: 1.0e-3, final_lr: 1.0e-4, warmup_steps: 1, decay_start: 1}
checkpoint: {every: 2, keep: 1}
log_every: 1
"""


def test_finetune_from_released_weights_then_export(small_config, tmp_path):
    """Fine-tune the released-layout fixture (FP8 + MXFP4) two steps, then export the run as BF16 safetensors.
    Step 1's LM loss is the cross entropy of the released weights on the first batch (computed here with numpy
    from a model loaded independently), and the export holds the fine-tuned weights, rounded to BF16 where the
    BF16 export stores them, F32 and tid2eid exactly."""
    import jax
    import numpy as np
    from flax import nnx
    from ml_dtypes import bfloat16

    from conftest import FIXTURE
    from train.data import PackedStream
    from v4jax import hub
    from v4jax.checkpoint import load_hub_state
    from v4jax.model import model_variables
    from v4jax.config import ModelConfig
    from v4jax.model import Transformer

    data = small_config.parent / "data"
    config = tmp_path / "finetune.yaml"
    config.write_text(FINETUNE.replace("FIXTURE", str(FIXTURE)).replace("DATA", str(data)))
    run(["-m", "train.pretrain", str(config), f"run_dir={tmp_path / 'run'}"])
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])

    cfg = ModelConfig.from_hf_config(FIXTURE, compute_dtype="float32")
    released = Transformer(cfg, rngs=nnx.Rngs(1))
    load_hub_state(released, FIXTURE)
    batch = PackedStream(data, 0).batch(0, 2, 64)
    tokens, segs = batch["tokens"], batch["segment_ids"]
    logits = np.asarray(released(tokens[:, :-1], segs[:, :-1]), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    ce = -np.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
    mask = segs[:, 1:] == segs[:, :-1]
    assert abs(first["lm_loss"] - ce[mask].mean()) < 1e-5 * ce[mask].mean()

    out = tmp_path / "export"
    run(["-m", "train.export", str(config), f"run_dir={tmp_path / 'run'}", "--out", str(out), "--weights", "bfloat16"])
    from train.pretrain import restore_run
    tuned = model_variables(restore_run([str(config), f"run_dir={tmp_path / 'run'}"])[0])
    exported = Transformer(cfg, rngs=nnx.Rngs(2))
    load_hub_state(exported, out)
    moved = 0
    for path, var in model_variables(exported).items():
        want = np.asarray(jax.device_get(tuned[path].get_value()))
        stored = hub.release_dtype(hub.path_to_hub(path, 0 if ".experts.w" in path else None))
        if stored in ("fp8", "fp4") or stored == hub.BF16:  # held as BF16 by a bfloat16 export
            want = want.astype(bfloat16).astype(want.dtype)
        np.testing.assert_array_equal(np.asarray(var.get_value()), want, err_msg=path)
        moved += not np.array_equal(want, np.asarray(model_variables(released)[path].get_value()))
    assert moved > len(tuned) // 2  # the export holds the fine-tuned weights, not the released ones


def test_finetune_of_a_ga_checkpoint_leaves_its_drafter_as_loaded(small_config, tmp_path):
    """Fine-tuning a GA checkpoint (tiny DSpark fixture) trains the backbone; the drafter, not part of the LM
    objective, keeps its released weights exactly (no weight decay) and its router biases (its MoEs do not run)."""
    import jax
    import numpy as np
    from flax import nnx

    from ga_fixture import write_ga_fixture
    from train.pretrain import restore_run
    from v4jax.checkpoint import load_hub_state
    from v4jax.model import model_variables
    from v4jax.config import ModelConfig
    from v4jax.model import Transformer

    ckpt = tmp_path / "ga"
    write_ga_fixture(ckpt)
    config = tmp_path / "finetune.yaml"
    config.write_text(FINETUNE.replace("FIXTURE", str(ckpt)).replace("DATA", str(small_config.parent / "data")))
    run(["-m", "train.pretrain", str(config), f"run_dir={tmp_path / 'run'}"])
    tuned = model_variables(restore_run([str(config), f"run_dir={tmp_path / 'run'}"])[0])
    released = Transformer(ModelConfig.from_hf_config(ckpt, compute_dtype="float32"), rngs=nnx.Rngs(1))
    load_hub_state(released, ckpt)
    moved = {p: not np.array_equal(np.asarray(jax.device_get(tuned[p].get_value())), np.asarray(v.get_value()))
             for p, v in model_variables(released).items()}
    drafter = [p for p in moved if p.startswith("dspark.")]
    assert drafter and not any(moved[p] for p in drafter), [p for p in drafter if moved[p]]
    assert sum(moved[p] for p in moved if p.startswith("layers.")) > len(moved) // 3
