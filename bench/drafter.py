"""A trained DSpark drafter against the target's own MTP-1 on held-out text: mean accepted drafts per verify pass
of greedy DSpark decoding (infer.generate.generate_dspark) and of greedy MTP self-speculation
(generate_speculative), same target weights, same prompts, fp32.

    .venv/bin/python -m bench.drafter [configs/train/tiny-drafter.yaml] [--prompts 16] [--prompt-len 64] [--new 64]

The drafter run's config names its target run (drafter.target); both runs' newest checkpoints are loaded (the
target with its MTP block, as trained; the drafter run's model is the same backbone plus the trained drafter,
checked leaf by leaf). Held-out prompts: `--prompts` consecutive rows of `--prompt-len` tokens of the target run's
data stream (its data.seed's document order), starting at token offset `--offset` (default 4,000,000 of the
stdlib corpus's 4.69M), past everything either run read (both read from offset 0: checked against their
checkpoints' data offsets). Every prompt is decoded alone, --new tokens; per prompt, accepted drafts / verify
passes; reported is the mean over the prompts for each method, and the greedy outputs are checked equal.
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
from flax import nnx

from infer.generate import SamplingParams, generate_dspark, generate_speculative
from train import pretrain
from train.data import open_corpus

FP32 = "model.overrides={compute_dtype: float32}"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench.drafter", description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?", default="configs/train/tiny-drafter.yaml", help="the drafter run's config")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--offset", type=int, default=4_000_000, help="token offset of the held-out rows")
    args = ap.parse_args(argv)

    cfg = pretrain.load_config([args.config])
    target_config = cfg["drafter"]["target"]
    ga, _, ga_meta = pretrain.restore_run([args.config])
    target_overrides = pretrain.load_config([target_config])["model"]["overrides"] | {"compute_dtype": "float32"}
    preview, _, target_meta = pretrain.restore_run([target_config, f"model.overrides={target_overrides}"])
    ours = {k: v for k, v in nnx.to_flat_state(nnx.state(ga)) if k[0] != "dspark"}
    theirs = {k: v for k, v in nnx.to_flat_state(nnx.state(preview)) if k[0] != "mtp"}
    assert ours.keys() == theirs.keys() and all(np.array_equal(ours[k][...], theirs[k][...]) for k in ours)
    assert ga.cfg.compute_dtype == preview.cfg.compute_dtype == "float32"
    for meta in (ga_meta, target_meta):
        assert meta["data_offset"] <= args.offset, f"offset {args.offset} was trained on ({meta})"
    tcfg = pretrain.load_config([target_config])
    stream = open_corpus(tcfg["data"]["path"], tcfg["data"]["seed"])
    assert cfg["data"] == tcfg["data"], "the drafter and target runs read different streams"
    rows = stream.batch(args.offset, args.prompts, args.prompt_len)["tokens"][:, :args.prompt_len]

    mtp, dspark = [], []
    for prompt in rows.tolist():
        out_mtp, rate = generate_speculative(preview, prompt, args.new)
        (out_ds,), stats = generate_dspark(ga, [prompt], SamplingParams(max_new_tokens=args.new))
        assert out_mtp == out_ds, "greedy outputs differ"
        mtp.append(rate)  # one draft per verify pass: the rate is the accepted drafts per pass
        dspark.append(stats.mean_accepted)
    result = {"prompts": args.prompts, "prompt_len": args.prompt_len, "new": args.new, "offset": args.offset,
              "mtp1": statistics.mean(mtp), "dspark": statistics.mean(dspark),
              "block": ga.cfg.dspark_block_size, "drafter_step": ga_meta["step"], "target_step": target_meta["step"]}
    print(f"held-out: {args.prompts} prompts of {args.prompt_len} tokens at offset {args.offset:,}, "
          f"{args.new} new tokens each, fp32, greedy (outputs equal)")
    print(f"target {target_config} step {target_meta['step']}; drafter {args.config} step {ga_meta['step']}")
    print("| method | accepted drafts per verify pass (mean over prompts) | tokens per verify pass |")
    print("|---|---|---|")
    print(f"| MTP-1 (the target's MTP block) | {result['mtp1']:.3f} | {1 + result['mtp1']:.3f} |")
    ds = result["dspark"]
    print(f"| DSpark, block {result['block']} (trained drafter) | {ds:.3f} | {1 + ds:.3f} |")
    return result


if __name__ == "__main__":
    main()
