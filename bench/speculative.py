"""Plain vs MTP vs DSpark greedy decoding of one target model in one run: mean accepted drafts per verify pass,
tokens per target pass, decode tokens/s and its ratio to plain decoding (issue 14, the bench point).

    .venv/bin/python -m bench.speculative [--configs tiny small] [--new 128] [--reps 5]
    .venv/bin/python -m bench speculative   (the defaults, into docs/perf/results.json and docs/performance.md)

One random backbone (seed 0; fp32 compute, so that every method's greedy output is the same token for token) is
shared by three models: the preview config with its MTP block, and the GA config (same backbone shapes, a
3-stage DSpark drafter, blocks of 4) whose backbone weights are copied from it (nnx.state / nnx.update: the
target is literally the same), (a) with its random drafter, (b) with a *constructed* bigram drafter: the same
drafter stages, its Markov head replaced by the bigrams of the target's own greedy continuations of the
benchmark prompts (markov_w1 one-hot per source token, markov_w2[next, source] = 60, the last bigram seen
winning; tests/test_dspark.py's drafter with rank = the number of source tokens instead of the vocab, which
gives the same logits). No drafter is trained (there is no drafter trainer yet): with random weights
acceptance says nothing about a real drafter, and the bigram drafter is an upper-bound illustration of the
mechanics, not a drafter anyone could deploy.

Methods, batch 1, each prompt alone: plain `generate`, `generate_speculative` (MTP-1 self-speculation), and
`generate_dspark` with the random drafter, the bigram drafter, and the bigram drafter with confidence 0.5 (the
random confidence head truncates blocks: fewer drafts verified, the same output). The greedy output of every
method on every prompt is asserted equal to plain decoding's (the benchmark fails otherwise).

Timing: every (method, prompt) runs once to compile; then `reps` rounds run every method on every prompt, the
method order rotated each round. What is timed is the decode after the first token, to the last: for DSpark
SpeculationStats.seconds; for plain from the first on_tokens callback (prefill done, first token sampled) to
the return; for MTP from the end of the MTP block's catch-up over the prompt (its first `_mtp_step`, blocked
on) to the return. Tokens counted: the new tokens after the first. For plain and MTP the bench wraps
infer.generate's `_step` / `_step_keep` / `_mtp_step` for the duration of a call to count the passes (MTP:
one verify pass over [token, draft] per round, plus one redo step on each rejection; plain: one step per token
after the first). Per round: tokens / seconds, both summed over the prompts; reported are the
median over the rounds and the median of each round's ratio to plain. Beside them, dispatch_overhead() times one
decode step called through `nnx.jit` with the module as an argument (as infer.generate called it before issue 16)
and as the `jax.jit` of the split state that every decoding method now calls.

Configs: `tiny` / `tiny-dspark` (the test presets); `small`: bench/decode.py's ~56M-parameter layout (dim 512,
8 layers, vocab 16384) with its MTP block, and the same with a 3-stage drafter fed by layers 5-7, blocks of 4.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import time
from collections import Counter

import jax
import numpy as np
from flax import nnx

import infer.generate as G
from infer.generate import SamplingParams, generate, generate_dspark, generate_speculative
from v4jax.config import ModelConfig
from v4jax.model import Transformer, param_counts

_SMALL = dict(vocab_size=16384, dim=512, n_layers=8, n_hash_layers=1, n_heads=8, head_dim=128, q_lora_rank=256,
              o_groups=4, o_lora_rank=128, window_size=128, original_seq_len=4096, index_n_heads=16,
              index_topk=512, n_routed_experts=8, n_activated_experts=2, moe_inter_dim=256, attn_chunk=256)
_LAYERS = (0, 0, 4, 128, 4, 128, 4, 128)
CONFIGS = {  # name: (preview config with its MTP block, GA config with a DSpark drafter), same backbone
    "tiny": (ModelConfig.preset("tiny", compute_dtype="float32"),
             ModelConfig.preset("tiny-dspark", compute_dtype="float32")),
    "small": (ModelConfig.preset("tiny", **_SMALL, compress_ratios=_LAYERS + (0,), compute_dtype="float32"),
              ModelConfig.preset("tiny-dspark", **_SMALL, compress_ratios=_LAYERS + (0, 0, 0),
                                 dspark_noise_token_id=16383, dspark_target_layer_ids=(5, 6, 7),
                                 compute_dtype="float32")),
}
METHODS = {  # name: label
    "plain": "plain greedy (`generate`)",
    "mtp": "MTP-1 (preview MTP block, random)",
    "dspark_random": "DSpark, random drafter",
    "dspark_bigram": "DSpark, constructed bigram drafter",
    "dspark_bigram_c05": "DSpark, constructed bigram drafter, confidence 0.5",
}
STRENGTH = 60.0  # the bigram's Markov logit: far above the random drafter's own logits


def build(name: str, seed: int = 0) -> tuple[Transformer, Transformer]:
    """(preview model with MTP, GA model with a random drafter) sharing one random backbone."""
    pcfg, gcfg = CONFIGS[name]
    preview = Transformer(pcfg, rngs=nnx.Rngs(seed))
    ga = Transformer(gcfg, rngs=nnx.Rngs(seed + 1))
    backbone = {k: v for k, v in nnx.to_flat_state(nnx.state(preview)) if k[0] != "mtp"}
    nnx.update(ga, nnx.from_flat_state(backbone))
    ga_flat = dict(nnx.to_flat_state(nnx.state(ga)))
    assert {k for k in ga_flat if k[0] != "dspark"} == set(backbone)
    for k, v in backbone.items():  # the target is literally the same
        assert np.array_equal(np.asarray(ga_flat[k][...]), np.asarray(v[...])), k
    return preview, ga


def bigram_drafter(ga: Transformer, texts: list[list[int]], strength: float = STRENGTH) -> Transformer:
    """`ga` with its drafter's Markov head replaced by the bigrams of `texts` (the last one seen winning), rank =
    the number of distinct source tokens: markov_w1[a] one-hot at a's slot, markov_w2[b, slot(a)] = strength. The
    confidence head (its input grows with the rank) is new and random; everything else is `ga`'s."""
    vocab = ga.cfg.vocab_size
    nxt: dict[int, int] = {}
    for t in texts:
        for a, b in zip(t[:-1], t[1:]):
            nxt[int(a)] = int(b)
    sources = sorted(nxt)
    drafter = Transformer(ga.cfg.replace(dspark_markov_rank=len(sources)), rngs=nnx.Rngs(2))
    flat = {k: v for k, v in nnx.to_flat_state(nnx.state(ga)) if "markov_head" not in k and "confidence_head" not in k}
    nnx.update(drafter, nnx.from_flat_state(flat))
    w1, w2 = np.zeros((vocab, len(sources)), np.float32), np.zeros((vocab, len(sources)), np.float32)
    for j, a in enumerate(sources):
        w1[a, j] = 1.0
        w2[nxt[a], j] = strength
    markov = drafter.dspark.stages[-1].markov_head
    markov.markov_w1.set_value(jax.numpy.asarray(w1, markov.markov_w1.dtype))
    markov.markov_w2.set_value(jax.numpy.asarray(w2, markov.markov_w2.dtype))
    return drafter


class _Probe:
    """Wraps infer.generate's step functions during one call: the time the decode starts (t0) and the passes
    made after it, {function name: calls}."""

    def __init__(self):
        self.t0: float | None = None
        self.calls: Counter = Counter()

    def start(self) -> None:
        if self.t0 is None:
            self.t0 = time.perf_counter()

    @contextlib.contextmanager
    def wrapping(self, start_after_first_mtp_step: bool = False):
        names = ("_step", "_step_keep", "_mtp_step")
        orig = {n: getattr(G, n) for n in names}

        def wrap(n):
            def call(*args, **kwargs):
                out = orig[n](*args, **kwargs)
                if self.t0 is not None:
                    self.calls[n] += 1
                elif n == "_mtp_step" and start_after_first_mtp_step:  # the catch-up over the prompt
                    jax.block_until_ready(out)
                    self.start()
                return out
            return call

        for n in names:
            setattr(G, n, wrap(n))
        try:
            yield self
        finally:
            for n in names:
                setattr(G, n, orig[n])


def run_method(method: str, models: dict, prompt: list[int], new: int, max_len: int) -> dict:
    """One greedy decode of `prompt` -> {tokens, seconds (decode after the first token), and the counts}."""
    params = SamplingParams(max_new_tokens=new)
    if method == "plain":
        probe = _Probe()
        with probe.wrapping():
            (out,) = generate(models["preview"], [prompt], params, max_len=max_len, on_tokens=lambda _: probe.start())
        seconds = time.perf_counter() - probe.t0
        return {"tokens": out, "seconds": seconds, "target_passes": probe.calls["_step"], "verify_passes": 0,
                "drafted": 0, "accepted": 0}
    if method == "mtp":
        probe = _Probe()
        with probe.wrapping(start_after_first_mtp_step=True):
            out, rate = generate_speculative(models["preview"], prompt, new, max_len=max_len)
        seconds = time.perf_counter() - probe.t0
        verify, redo = probe.calls["_step_keep"], probe.calls["_step"]
        assert abs((verify - redo) / max(verify, 1) - rate) < 1e-9, (verify, redo, rate)  # a rejection, a redo
        return {"tokens": out, "seconds": seconds, "target_passes": verify + redo, "verify_passes": verify,
                "drafted": verify, "accepted": verify - redo}
    model = models["bigram" if method.startswith("dspark_bigram") else "ga"]
    (out,), st = generate_dspark(model, [prompt], params, max_len=max_len,
                                 confidence=0.5 if method.endswith("_c05") else None)
    return {"tokens": out, "seconds": st.seconds, "target_passes": st.row_rounds, "verify_passes": st.row_rounds,
            "drafted": st.drafted, "accepted": st.accepted}


@functools.partial(nnx.jit, donate_argnums=1)
def _nnx_step(model, cache, tokens, n_new):
    return model.step(cache, tokens, n_new)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def _pure_step_state_out(static, leaves, cache, tokens, n_new):
    model = static.merge(leaves)
    return model.step(cache, tokens, n_new), nnx.state(model)


def dispatch_overhead(model: Transformer, max_len: int, calls: int = 20) -> dict:
    """Median seconds of one single-token decode step called through `nnx.jit` with the module as an argument, as
    the `jax.jit` of the split state infer.generate calls, and as a `jax.jit` of the split state that also returns
    the model's state (a copy of every weight), alternated."""
    cache, _, _ = G.prefill(model, [[1] * 64], max_len)
    static, leaves = G.split(model)
    tok, one = jax.numpy.zeros((1, 1), jax.numpy.int32), jax.numpy.ones(1, jax.numpy.int32)
    fns = {"nnx_jit_s": lambda c: _nnx_step(model, c, tok, one),
           "jax_jit_s": lambda c: G._step(static, leaves, c, tok, one),
           "jax_jit_state_out_s": lambda c: _pure_step_state_out(static, leaves, c, tok, one)[0]}
    times = {k: [] for k in fns}
    for i in range(calls + 2):
        for k, f in fns.items():
            t = time.perf_counter()
            logits, _, cache = f(cache)
            logits.block_until_ready()
            if i >= 2:  # the first calls compile
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def measure(name: str, prompt_lens: tuple[int, ...], new: int, reps: int, methods=tuple(METHODS)) -> dict:
    preview, ga = build(name)
    vocab, B = ga.cfg.vocab_size, ga.cfg.dspark_block_size
    rng = np.random.default_rng(1)
    prompts = [[int(t) for t in rng.integers(0, vocab - 1, n)] for n in prompt_lens]  # the noise token left out
    max_len = -(-(max(prompt_lens) + new + B + 2) // 128) * 128  # one cache size for every method and prompt
    models = {"preview": preview, "ga": ga}
    t = time.perf_counter()
    greedy = [run_method("plain", models, p, new, max_len)["tokens"] for p in prompts]  # also the warm-up of plain
    models["bigram"] = bigram_drafter(ga, greedy)
    for m in methods:
        for p, want in zip(prompts, greedy):  # warm-up (compilation) and the equality check
            got = run_method(m, models, p, new, max_len)["tokens"]
            if got != want:
                raise AssertionError(f"{name}: {m} decoded {got} but plain greedy decoding {want}")
    print(f"{name}: built and compiled in {time.perf_counter() - t:.0f} s", flush=True)
    runs = {m: [] for m in methods}  # per round: summed over the prompts
    for r in range(reps):
        order = list(methods[r % len(methods):]) + list(methods[:r % len(methods)])
        for m in order:
            tot = Counter()
            for p, want in zip(prompts, greedy):
                res = run_method(m, models, p, new, max_len)
                if res["tokens"] != want:
                    raise AssertionError(f"{name}: {m} decoded {res['tokens']} but plain greedy decoding {want}")
                tot.update({k: v for k, v in res.items() if k != "tokens"})
                tot["new_tokens"] += len(res["tokens"]) - 1
            runs[m].append(dict(tot))
        print(f"{name} round {r + 1}/{reps}: " + ", ".join(
            f"{m} {runs[m][-1]['new_tokens'] / runs[m][-1]['seconds']:.1f} tok/s" for m in methods), flush=True)
    overhead = dispatch_overhead(preview, max_len)
    print(f"{name}: one decode step via nnx.jit {1e3 * overhead['nnx_jit_s']:.1f} ms, via jax.jit of the split "
          f"state {1e3 * overhead['jax_jit_s']:.1f} ms (returning the state too: "
          f"{1e3 * overhead['jax_jit_state_out_s']:.1f} ms)", flush=True)
    rows = []
    for m in methods:
        first = runs[m][0]  # the counts are the same every round (greedy, deterministic)
        tps = [x["new_tokens"] / x["seconds"] for x in runs[m]]
        ratio = [a / (p["new_tokens"] / p["seconds"]) for a, p in zip(tps, runs["plain"])]
        vp = first["verify_passes"]
        rows.append({"config": name, "method": m, "label": METHODS[m],
                     "drafted_per_pass": first["drafted"] / vp if vp else None,
                     "accepted_per_pass": first["accepted"] / vp if vp else None,
                     "tokens_per_target_pass": first["new_tokens"] / first["target_passes"],
                     "target_passes": first["target_passes"], "new_tokens": first["new_tokens"],
                     "tokens_per_s": statistics.median(tps), "tokens_per_s_all": tps,
                     "ratio": statistics.median(ratio)})
    counts = {"preview": param_counts(preview.cfg), "ga": param_counts(ga.cfg)}
    return {"config": name, "prompt_lens": list(prompt_lens), "new_tokens": new, "reps": reps, "max_len": max_len,
            "block_size": B, "step_call": overhead, "bigram_rank": models["bigram"].cfg.dspark_markov_rank,
            "params": {k: {"backbone": v["total_without_mtp"], "drafter": v["mtp"], "activated": v["activated"]}
                       for k, v in counts.items()},
            "rows": rows}


def run(out_dir=None, quick: bool = False) -> dict:
    """The suite entry (bench/__main__.py): tiny with 3 prompts of 64 / 160 / 256 tokens, 128 new tokens each, 5
    timed rounds; small with one prompt of 160 tokens, 64 new tokens, 3 rounds (its compilation alone takes
    minutes on 2 cores). Quick: tiny, 2 prompts, 16 new tokens, 1 round."""
    if quick:
        return {"configs": [measure("tiny", (32, 48), 16, 1)]}
    return {"configs": [measure("tiny", (64, 160, 256), 128, 5), measure("small", (160,), 64, 3)]}


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def table(result: dict) -> str:
    lines = ["| config | method | drafts verified / pass | accepted drafts / verify pass | tokens / target pass | "
             "decode tokens/s (median) | x plain (median of rounds) |", "|---|---|---|---|---|---|---|"]
    for c in result["configs"]:
        for r in c["rows"]:
            lines.append(f"| {r['config']} | {r['label']} | {_fmt(r['drafted_per_pass'], '.2f')} | "
                         f"{_fmt(r['accepted_per_pass'], '.2f')} | {r['tokens_per_target_pass']:.2f} | "
                         f"{r['tokens_per_s']:.1f} | {r['ratio']:.2f} |")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    cs = result["configs"]
    rows = {(r["config"], r["method"]): r for c in cs for r in c["rows"]}
    setup = "; ".join(
        f"`{c['config']}`: backbone {c['params']['preview']['backbone'] / 1e6:.1f}M parameters "
        f"({c['params']['preview']['activated'] / 1e6:.1f}M activated), MTP block "
        f"{c['params']['preview']['drafter'] / 1e6:.1f}M, DSpark drafter {c['params']['ga']['drafter'] / 1e6:.1f}M "
        f"(3 stages, block {c['block_size']}; bigram Markov rank {c['bigram_rank']}), "
        f"{len(c['prompt_lens'])} prompt{'s' if len(c['prompt_lens']) > 1 else ''} of "
        f"{'/'.join(map(str, c['prompt_lens']))} tokens, {c['new_tokens']} new tokens each, {c['reps']} timed rounds"
        for c in cs)
    overhead = ", ".join(f"{1e3 * c['step_call']['nnx_jit_s']:.1f} ms against {1e3 * c['step_call']['jax_jit_s']:.1f} "
                         f"ms on `{c['config']}`" for c in cs)
    if all("jax_jit_state_out_s" in c["step_call"] for c in cs):
        overhead += ("; a `jax.jit` of the split state that also returns the model's state (a copy of every weight) "
                     "takes " + " and ".join(f"{1e3 * c['step_call']['jax_jit_state_out_s']:.1f} ms" for c in cs)
                     + ", consistent with `nnx.jit` handing the module's state back from every call")
    return (
        "One random backbone (fp32) shared by the preview model (MTP block) and the GA model (DSpark drafter), batch "
        "1, greedy; every method's output equals plain greedy decoding on every prompt (asserted). " + setup + ". "
        "Timed: the decode from the first token to the last (prefill, the first token and the MTP block's catch-up "
        "over the prompt excluded); tokens/s counts the tokens after the first, summed over the prompts per round, "
        "methods alternated round by round after one compiling run each. Tokens / target pass counts every target "
        "pass after the first token (MTP: a verify pass over [token, draft] per round plus a redo step after each "
        "rejection; plain: one step per token after the first). Every method calls its compiled steps as a `jax.jit` of "
        "the split model state. "
        "Details and a standalone CLI: bench/speculative.py.\n\n"
        + table(result) + "\n\n"
        "**Mechanics only: no drafter here is trained.** The weights are random, so the acceptance of the random "
        "MTP block and the random DSpark drafter says nothing about real drafters (there is no drafter trainer "
        "yet; issue 14 asks for a drafter trained briefly on the tiny trained model once the fine-tuning issue "
        "delivers the trainer). The bigram drafter is *constructed*: its Markov head is set from the target's own "
        "greedy continuations of these very prompts, so its acceptance is an upper-bound illustration of what full "
        "and partial block acceptance does to the loop, not a measurement of a drafter. Confidence 0.5 uses a "
        "random confidence head: it only shows that truncated blocks keep the output (the verify pass still runs "
        "the whole block, so it saves no compute here).\n\n"
        "Speed: these ratios are a statement about mechanics and overheads on this CPU, not about DeepSeek's GPU "
        "numbers (spec: +60-85% per-user speed for DSpark-5 over MTP-1 in production, with a trained drafter). On "
        "CPU the tiny target pass is cheap next to the drafter's three stages. Every loop calls `jax.jit` functions "
        "of the split model state (no per-call traversal of the module); one single-token decode step called "
        f"through `nnx.jit` with the module as an argument, against that `jax.jit`: {overhead}. The MTP loop "
        "makes two or three calls per round (the MTP step, the verify and, after a rejection, the redo) and syncs "
        "on the host after each, so with (almost) nothing accepted it runs at " + " and ".join(
            f"{rows[(c['config'], 'mtp')]['ratio']:.2f}x plain on `{c['config']}`" for c in cs) + ".")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=["tiny"], choices=list(CONFIGS))
    p.add_argument("--prompts", nargs="+", type=int, default=[64, 160, 256], help="prompt lengths")
    p.add_argument("--new", type=int, default=128, help="new tokens per prompt")
    p.add_argument("--reps", type=int, default=5, help="timed rounds")
    args = p.parse_args(argv)
    result = {"configs": [measure(c, tuple(args.prompts), args.new, args.reps) for c in args.configs]}
    print(table(result))


if __name__ == "__main__":
    main()
