"""LoRA fine-tuning in train/pretrain.py (lora.enabled): a tiny model with V4's vocabulary whose random weights are
stored as released (FP8 / MXFP4), kept quantized, adapters trained with AdamW on chat rows (train.chat synth +
pack). Held-out loss falls and every base leaf is bit-identical after training; checkpoints hold the adapters and
their optimizer state alone and resume bitwise after kill -9 (dropout masks included); train.export writes the
adapters alone (reloaded bitwise) or merged (re-quantized: within the weights' own quantization error); bad
configs are named. (Adapter gradients against the full model's weight gradient projected onto the adapter
directions, fp32 1e-4: tests/test_lora.py.)"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from test_pretrain import KILL_IN_WRITE, losses_by_step, run

from train import chat, losses, pretrain
from v4jax import hub, lora
from v4jax.config import ModelConfig
from v4jax.lora import LoraParam

SEQ = 128
SMALL_V4 = dict(vocab_size=129280, n_layers=2, n_hash_layers=1, compress_ratios=[4, 128, 0], n_routed_experts=8,
                n_heads=4, o_groups=2, moe_inter_dim=64, index_n_heads=4)
CONFIG = """
model: {{config: {root}/base, overrides: {{compute_dtype: float32, csa_dense: true}}}}
init: {root}/base
lora: {{enabled: true, rank: 8, alpha: 16, dropout: 0.1}}
data: {{path: {root}/train}}
stages:
  - {{until_step: 4, batch_size: 2, seq_len: 128, attention: dense}}
schedule: {{peak_lr: 1.0e-2, final_lr: 1.0e-3, warmup_steps: 1, decay_start: 3}}
optimizer: {{adam_weight_decay: 0.0}}
checkpoint: {{every: 2, keep: 5}}
mesh: {{data: 1}}
log_every: 1
"""


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """The base checkpoint, training and held-out chat rows (other seeds: other numbers, cities and words), and the
    run config."""
    root = tmp_path_factory.mktemp("lora")
    hub.write_random_checkpoint(root / "base", ModelConfig.preset("tiny", **SMALL_V4).to_hf_config(), 0)
    for name, seed in (("train", 0), ("heldout", 1)):
        chat.main(["synth", "--output", str(root / f"{name}.jsonl"), "--n", "48", "--seed", str(seed)])
        chat.pack(root / f"{name}.jsonl", root / name, seq_len=SEQ)
    config = root / "lora.yaml"
    config.write_text(CONFIG.format(root=root))
    return config


def leaves(state) -> dict:
    """Every array of a state as numpy (a quantized weight's codes and scales separately)."""
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(state)}


# Runs train.pretrain and pickles the frozen part of the state its last train step returned (every leaf's dtype
# and bytes) and the kinds of value its Variables hold, to the file $FROZEN_OUT.
RECORD_FROZEN = """
import os, pickle, sys
import jax
from flax import nnx
import train.pretrain as p
real, last = p.make_train_step, {}
def make_train_step(*a, **k):
    step = real(*a, **k)
    def recorded(*x, **y):
        last["out"] = step(*x, **y)
        return last["out"]
    return recorded
p.make_train_step = make_train_step
p.main(sys.argv[1:])
rest = last["out"][1]
kinds = {type(v.get_value()).__name__ for v in jax.tree.leaves(rest, is_leaf=lambda x: isinstance(x, nnx.Variable))}
leaves = {jax.tree_util.keystr(k): jax.device_get(x) for k, x in jax.tree_util.tree_leaves_with_path(rest)}
with open(os.environ["FROZEN_OUT"], "wb") as f:
    pickle.dump({"kinds": kinds, "leaves": {k: (str(x.dtype), x.tobytes()) for k, x in leaves.items()}}, f)
"""


def test_lora_lowers_heldout_loss_and_leaves_the_quantized_base_bit_identical(lora_run, tmp_path):
    """10 steps; the frozen part of the state after the last step (recorded in the training process) equals a
    fresh load of the base leaf by leaf, dtypes and bytes (FP8 codes, MXFP4 nibbles, scales, norms, embeddings,
    router biases, tid2eid), still quantized; the held-out assistant-token loss of the run's adapters (restored
    by train.pretrain.restore_run) is below the base's."""
    import pickle

    from train.pretrain import restore_run

    argv = [str(lora_run), f"run_dir={tmp_path / 'run'}", "checkpoint.every=10",
            f"stages=[{{until_step: 10, batch_size: 2, seq_len: {SEQ}, attention: dense}}]"]
    run(["-c", RECORD_FROZEN, *argv], {"FROZEN_OUT": str(tmp_path / "frozen.pkl")})
    recorded = pickle.loads((tmp_path / "frozen.pkl").read_bytes())
    assert {"Fp8Weight", "Mxfp4Weight"} <= recorded["kinds"]  # still quantized in memory

    cfg = pretrain.load_config(argv)
    _, fresh, base = nnx.split(pretrain.build_model(cfg, pretrain.model_config(cfg)), LoraParam, ...)
    want = {k: (str(x.dtype), x.tobytes()) for k, x in leaves(base).items()}
    assert recorded["leaves"].keys() == want.keys() and len(want) > 50
    assert {dtype for dtype, _ in want.values()} >= {"float8_e4m3fn", "uint8", "float32", "int32"}
    for k in want:
        assert recorded["leaves"][k] == want[k], k

    graphdef, adapters, _ = nnx.split(restore_run(argv)[0], LoraParam, ...)
    trained_b = {k: v for k, v in leaves(adapters).items() if "['b']" in k and k.startswith("['layers']")}
    assert trained_b and all(np.abs(v).max() > 0 for v in trained_b.values())  # every backbone adapter moved
    _, rows = chat.load_shards(lora_run.parent / "heldout")
    weights = {"lm": 1.0, "mtp": 0.0, "balance": 0.0, "indexer": 0.0}

    @jax.jit
    def heldout(adapters, base):
        model = nnx.merge(graphdef, adapters, base)
        return losses.objective(model, jnp.asarray(rows["tokens"], jnp.int32), rows["segment_ids"], weights,
                                rows["loss_mask"])[1]["lm_loss"]

    # fresh adapters (b = 0): the base itself
    before, after = float(heldout(fresh, base)), float(heldout(adapters, base))
    print(f"held-out assistant-token loss: base {before:.3f}, after 10 LoRA steps {after:.3f}")
    assert after < before - 2.0, (before, after)


def test_adapter_only_checkpoints_resume_bitwise_after_kill9_and_export(lora_run, tmp_path):
    """A kill during the write of step 4 and a resume: losses and the final adapters and optimizer state equal an
    uninterrupted run's bitwise; a checkpoint holds only the adapters and their AdamW state. Then the run's
    exports (check_exports)."""
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    with ThreadPoolExecutor(2) as pool:  # the uninterrupted and the killed run side by side
        ref_run = pool.submit(run, ["-m", "train.pretrain", str(lora_run), f"run_dir={ref_dir}"])
        killed = run(["-c", KILL_IN_WRITE, str(lora_run), f"run_dir={run_dir}"], {"KILL_AT": "4"}, check=False)
        ref_run.result()
    ref = losses_by_step(ref_dir)
    assert sorted(ref) == [1, 2, 3, 4]
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
    resumed = run(["-m", "train.pretrain", str(lora_run), f"run_dir={run_dir}"])
    assert "resumed from" in resumed.stdout and "(step 2," in resumed.stdout, resumed.stdout
    assert losses_by_step(run_dir) == ref  # floats compared with ==

    got, want = (ocp.StandardCheckpointer().restore(d / "checkpoints" / "4" / "state") for d in (run_dir, ref_dir))
    assert set(want) == {"params", "opt_state"}
    params = leaves(want["params"])
    assert params and all("_lora']" in k and k.endswith(("['a']['value']", "['b']['value']")) for k in params)
    n_adapter = sum(x.size for x in params.values())
    # adapters, Adam's mu and nu, and two step counts (Adam's, the learning-rate schedule's)
    assert sum(x.size for x in jax.tree.leaves(want)) == 3 * n_adapter + 2
    assert leaves(got).keys() == leaves(want).keys()
    assert all(leaves(got)[k].tobytes() == v.tobytes() for k, v in leaves(want).items())

    check_exports([str(lora_run), f"run_dir={run_dir}"], lora_run.parent, tmp_path)


def check_exports(argv: list[str], root, tmp_path):
    """train.export of the LoRA run `argv`: the adapters alone, put on the base by v4jax-generate's loader, give
    the adapted model's logits bit for bit. Merged and re-quantized (--weights release), every adapted weight
    takes a rounding error the size of its own FP8 quantization (per tensor RMS within 5% of that of quantizing
    the dense values the base was made from: the same grid, errors of RMS step / sqrt(12) over >= 16K entries,
    so 5% is many standard errors), and so, to first order, the logits are no further (5%) from the adapted
    model's than the base's logits are from those of the base whose adapted weights are left unquantized (the
    reference: what FP8 costs these weights); merged in BF16, less than half as far (BF16 keeps 8 significant
    bits to FP8's 4; only half, as a routed token whose top-k flips dominates either error)."""
    from infer.cli import load_model
    from train import export
    from train.pretrain import restore_run

    for flags, out in ((["--adapters-only"], "adapters"), (["--weights", "release"], "release"),
                       (["--weights", "bfloat16"], "bf16")):
        export.main([*argv, "--out", str(tmp_path / out), *flags])
    with pytest.raises(export.InputError, match="already exists: remove it or choose another --out"):
        export.main([*argv, "--out", str(tmp_path / "adapters"), "--adapters-only"])
    over = dict(compute_dtype="float32", csa_dense=True)  # the run's model overrides
    _, rows = chat.load_shards(root / "heldout")
    ids = jnp.asarray(rows["tokens"][:2, :-1], jnp.int32)
    forward = nnx.jit(lambda model: model(ids))

    def error(model, ref):  # relative RMS over the logits
        d = np.asarray(forward(model)) - ref
        return float(np.sqrt(np.mean(d ** 2) / np.mean(ref ** 2)))

    adapted = np.asarray(forward(restore_run(argv)[0]))
    assert error(load_model(str(root / "base"), str(tmp_path / "adapters"), **over)[0], adapted) == 0.0
    release, bf16 = (error(load_model(str(tmp_path / w), **over)[0], adapted) for w in ("release", "bf16"))

    dense = hub.random_hub_checkpoint(ModelConfig.preset("tiny", **SMALL_V4).to_hf_config(), 0)
    cfg = pretrain.lora_config(pretrain.load_config(argv))
    merged = {path: np.asarray(getattr(owner, name).get_value())
              for path, owner, name in lora.targets(lora.merge(restore_run(argv)[0]), cfg)}
    unquantized, quantized = (load_model(str(root / "base"), **over)[0] for _ in range(2))
    rms = lambda x: np.sqrt(np.mean(np.square(x)))  # noqa: E731
    ratios = []
    for path, owner, name in lora.targets(unquantized, cfg):
        hub_name, w = hub.path_to_hub(path), merged[path]
        requantized = hub.dequantize_hub_state(hub.encode_release(hub_name, w))[hub_name]
        quantized_dense = hub.dequantize_hub_state(hub.encode_release(hub_name, dense[hub_name]))[hub_name]
        ratios.append(rms(requantized - w) / rms(quantized_dense - dense[hub_name]))
        getattr(owner, name).set_value(jnp.asarray(dense[hub_name]))
    reference = error(unquantized, np.asarray(forward(quantized)))
    print(f"logits, relative RMS error: merged + re-quantized {release:.4f}, merged BF16 {bf16:.4f}; the adapted "
          f"weights' FP8 quantization {reference:.4f}; re-quantization / quantization RMS per weight "
          f"{min(ratios):.3f}..{max(ratios):.3f}")
    assert len(ratios) == 3 * 8 and all(0.95 <= r <= 1.05 for r in ratios), ratios
    assert release <= 1.05 * reference and bf16 < release / 2, (release, bf16, reference)


def test_lora_config_errors_name_the_fix(lora_run):
    with pytest.raises(pretrain.ConfigError, match="lora.enabled trains adapters on a base model, and init names "
                                                   "none: set init"):
        pretrain.load_config([str(lora_run), "init=null"])
    with pytest.raises(pretrain.ConfigError, match=r"lora.targets = \['wq'\]: .*LoRA targets \['wq'\] are unknown"):
        pretrain.load_config([str(lora_run), "lora.targets=[wq]"])
    with pytest.raises(pretrain.ConfigError, match="an indexer_warmup stage trains only the indexer"):
        pretrain.load_config([str(lora_run), "stages=[{until_step: 2, batch_size: 2, seq_len: 128, "
                                             "attention: indexer_warmup}]"])
    assert not pretrain.load_config([str(lora_run), "lora.enabled=false"])["lora"]["enabled"]


def test_the_readme_command_fine_tunes_the_tiny_model_with_lora(tmp_path):
    """bash scripts/lora_tiny.sh (README), one step: it makes the chat data and the quantized tiny base, then
    trains adapters on it with configs/train/lora_tiny.yaml."""
    import json
    import os
    import subprocess

    from test_pretrain import REPO

    run_dir = tmp_path / "run"
    p = subprocess.run(["bash", "scripts/lora_tiny.sh", f"run_dir={run_dir}", "checkpoint.every=1",
                        "stages=[{until_step: 1, batch_size: 1, seq_len: 512, attention: dense}]"],
                       cwd=REPO, env={**os.environ, "LORA_TINY_DIR": str(tmp_path / "lora-tiny"),
                                      "XLA_FLAGS": "--xla_force_host_platform_device_count=1"},
                       capture_output=True, text=True, timeout=500)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "400 conversations in" in p.stdout and "random weights stored as released" in p.stdout, p.stdout
    assert "LoRA: base" in p.stdout and "(rank 16, alpha 32.0," in p.stdout, p.stdout
    base = json.loads((tmp_path / "lora-tiny" / "base" / "config.json").read_text())
    assert base["vocab_size"] == 129280 and base["quantization_config"]["quant_method"] == "fp8"
    record = json.loads((run_dir / "metrics.jsonl").read_text())
    assert record["step"] == 1 and np.isfinite(record["lm_loss"]) and not record["skipped"]
    assert (run_dir / "checkpoints" / "1").is_dir()
