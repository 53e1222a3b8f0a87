"""`python -m v4jax`: the parameter report of the presets and a smoke run of the model (run.sh trains instead).

It prints the parameter counts of Flash / Pro (preview: one MTP block), Flash-0731 / Pro-0813 (GA: a 3-stage
DSpark drafter) and tiny, then runs one jitted forward pass of a randomly initialized model (main head and MTP
head; for GA presets a cached prefill and one draft block) on random token ids, with the logits' shapes,
finiteness, a few statistics and the wall time. The `tiny` preset runs in seconds on a CPU; flash and pro need
real hardware.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from v4jax.config import PRESETS, ModelConfig
from v4jax.model import Transformer, param_counts


def human(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def param_report(names=("flash", "pro", "flash-0731", "pro-0813", "tiny")) -> None:
    rows = [("preset", "total", "without MTP", "MTP / drafter", "activated/token")]
    for name in names:
        c = param_counts(ModelConfig.preset(name))  # abstract: no memory used
        rows.append((name, *(human(c[k]) for k in ("total", "total_without_mtp", "mtp", "activated"))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(r[0].ljust(widths[0]) if i == 0 else s.rjust(widths[i]) for i, s in enumerate(r)))


def describe(name: str, x: jax.Array) -> str:
    return (f"{name:<11} {str(tuple(x.shape)):<16} finite={bool(jnp.isfinite(x).all())}  "
            f"mean={float(x.mean()):+.4f}  std={float(x.std()):.4f}  max|x|={float(jnp.abs(x).max()):.4f}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m v4jax", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model for the forward pass")
    ap.add_argument("--seq-len", type=int, default=300, help="tokens per sequence (batch is 2)")
    args = ap.parse_args(argv)

    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({len(jax.devices())} device(s))\n")
    param_report()

    cfg = ModelConfig.preset(args.preset)
    t0 = time.perf_counter()
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    print(f"\nbuilt {args.preset} model in {time.perf_counter() - t0:.1f}s")

    ids = jax.random.randint(jax.random.key(1), (2, args.seq_len), 0, cfg.vocab_size)
    # MTP is fed the tokens one step ahead: ids shifted left by one (the last position gets token 0).
    next_ids = jnp.concatenate([ids[:, 1:], jnp.zeros_like(ids[:, :1])], axis=1)

    @nnx.jit
    def forward(model, ids, next_ids):
        if model.dspark is not None:  # GA: prefill the cache (and the drafter's rings), draft one block
            logits, _, cache = model.step(model.init_cache(ids.shape[0], ids.shape[1] + 8), ids)
            return logits, model.draft(cache, next_ids[:, -2])[1]
        x = model.hidden(ids)  # the final streams feed both heads
        return model.logits(x, model.hc_head, model.norm), model.mtp_logits(x, next_ids)

    for attempt in ("compile + run", "second run"):
        t0 = time.perf_counter()
        logits, extra = jax.block_until_ready(forward(model, ids, next_ids))
        print(f"forward ({attempt}): {time.perf_counter() - t0:.2f}s")
    print(describe("logits", logits))
    print(describe("draft_logits" if cfg.dspark else "mtp_logits", extra))


if __name__ == "__main__":
    main()
