"""Memory benchmark of v4jax-convert: peak RSS and throughput converting a generated released-layout
checkpoint of more than 4 GB (safetensors -> Orbax, then Orbax -> safetensors).

    .venv/bin/python bench/convert_memory.py [--workdir /tmp/v4jax-bench] [--keep] [--ga]

The checkpoint has V4-Flash's real tensor shapes (d 4096, 256 experts of width 2048, vocab 129280) with one
layer (CSA, hash-routed: every tensor kind of the release) and no MTP: 5.6 GB, whose largest arrays are the stacked routed experts of
a layer (256 x 2048 x 4096 FP4 = 1.07 GB packed) and the BF16 embedding / head (1.06 GB). Its bytes are random
codes in the released formats (no need for meaningful weights to measure I/O). Each conversion runs as a child
process; its peak RSS is the kernel's VmHWM. The fixed overhead is the peak RSS of converting an 8 MB random
checkpoint of the tiny preset (Python, jax, orbax, tensorstore threads; no data to speak of). `--ga` adds one DSpark
drafter stage in the GA layout (Flash-0731's shapes: its own 256 routed experts, main_proj, the Markov and
confidence heads): 9.4 GB, the same largest arrays.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from v4jax import hub  # noqa: E402
from v4jax.config import ModelConfig  # noqa: E402

TINY = ModelConfig.preset("tiny").to_hf_config()  # the released layout of the tiny preset (FP8 / MXFP4)
CONFIG = dict(
    TINY,
    vocab_size=129280, hidden_size=4096, num_hidden_layers=1, num_attention_heads=64, head_dim=512,
    q_lora_rank=1024, o_groups=8, o_lora_rank=1024, sliding_window=128, index_n_heads=64, index_head_dim=128,
    index_topk=512, n_routed_experts=256, num_experts_per_tok=6, moe_intermediate_size=2048,
    num_hash_layers=1, compress_ratios=[4], num_nextn_predict_layers=0,
)
GA_CONFIG = dict(CONFIG, compress_ratios=[4, 0], num_nextn_predict_layers=1, dspark_block_size=5,
                 dspark_noise_token_id=128799, dspark_target_layer_ids=[0], dspark_markov_rank=256)


def generate(out_dir: str, config: dict, seed: int = 0) -> None:
    """Random bytes in the release's formats under every tensor name of config, written shard by shard."""
    rng = np.random.default_rng(seed)
    specs = {}
    for name, shape, _ in hub.hub_tensor_specs(config):
        specs.update(hub.release_specs(name, shape))

    def produce(name):
        dtype, shape = specs[name]
        if dtype == hub.UE8M0:
            return rng.integers(120, 131, shape, dtype=np.uint8).view(dtype)
        if dtype in (hub.E4M3, np.int8):
            b = rng.integers(0, 256, shape, dtype=np.uint8)
            if dtype == hub.E4M3:
                b[(b & 0x7F) == 0x7F] = 0  # no NaN codes
            return b.view(dtype)
        if dtype == np.int64:  # tid2eid
            return rng.integers(0, config["n_routed_experts"], shape, dtype=np.int64)
        return rng.standard_normal(shape, dtype=np.float32).astype(dtype) * np.asarray(0.02, dtype)

    hub.write_hub_checkpoint(out_dir, specs, produce, max_shard_bytes=2 << 30,
                             extra_files={"config.json": json.dumps(config, indent=2)})


# Runs a module (or code) and prints the process's own peak RSS when it ends, whatever it imported.
# VmHWM is this process's own high-water mark (ru_maxrss would include the parent's RSS at fork time).
_PEAK = "print('PEAK_RSS_KIB', open('/proc/self/status').read().split('VmHWM:')[1].split()[0])"
_RUN_MODULE = """import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
except SystemExit as e:
    if e.code:
        raise"""


def run_child(code: str, *argv: str) -> tuple[float, float]:
    """(wall seconds, peak RSS in GB) of `python -c code argv...`."""
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", f"{code}\n{_PEAK}", *argv], check=True, cwd=ROOT,
                         stdout=subprocess.PIPE, text=True).stdout
    kib = int(out.rsplit("PEAK_RSS_KIB", 1)[1].split()[0])
    return time.time() - t0, kib * 1024 / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/v4jax-bench")
    ap.add_argument("--keep", action="store_true", help="keep the generated and converted checkpoints")
    ap.add_argument("--ga", action="store_true", help="add a DSpark drafter stage (GA layout)")
    args = ap.parse_args()
    config = GA_CONFIG if args.ga else CONFIG
    src, dst, back = (os.path.join(args.workdir, n) for n in ("hub", "orbax", "back"))
    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    t0 = time.time()
    generate(src, config)
    ckpt = hub.HubCheckpoint(src)
    size = ckpt.nbytes()
    largest = max(ckpt[n].nbytes for n in ckpt.keys())
    stacked = ckpt["layers.0.ffn.experts.0.w1.weight"].nbytes * config["n_routed_experts"]
    print(f"generated {size / 1e9:.2f} GB in {time.time() - t0:.0f} s; largest hub tensor {largest / 1e9:.2f} GB, "
          f"largest converted array (stacked experts) {stacked / 1e9:.2f} GB")

    fixture = os.path.join(args.workdir, "tiny-hub")
    hub.write_random_checkpoint(fixture, TINY, 0)
    _, overhead = run_child(_RUN_MODULE, "v4jax.convert", "to-orbax", fixture, os.path.join(args.workdir, "tiny"))
    t_in, rss_in = run_child(_RUN_MODULE, "v4jax.convert", "to-orbax", src, dst)
    t_out, rss_out = run_child(_RUN_MODULE, "v4jax.convert", "to-hub", dst, back)
    same = hub.checkpoint_digest(back) == hub.checkpoint_digest(src)
    unit = max(largest, stacked)
    result = {
        "checkpoint_gb": round(size / 1e9, 2), "largest_array_gb": round(unit / 1e9, 2),
        "overhead_rss_gb": round(overhead, 2),
        "to_orbax": {"seconds": round(t_in, 1), "mb_per_s": round(size / t_in / 1e6), "peak_rss_gb": round(rss_in, 2)},
        "to_hub": {"seconds": round(t_out, 1), "mb_per_s": round(size / t_out / 1e6), "peak_rss_gb": round(rss_out, 2)},
        "bound_gb (3 x largest + overhead)": round(3 * unit / 1e9 + overhead, 2),
        "round_trip_byte_identical": same, "ga_drafter": args.ga,
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result, indent=1))
    if not args.keep:
        shutil.rmtree(args.workdir)


if __name__ == "__main__":
    main()
