"""Kernel checks and timings: each Pallas kernel of kernels/ against its jnp reference and the dense alternative,
beside the device's own ceilings measured in the same run (spec performance.md §1.7, target 9: kernel roofline
fractions). Issue 6's kernel table.

    .venv/bin/python -m bench.kernels [--only sparse_attention indexer fp4_matmul] [--contexts T ...] [--ms M ...]
                                      [--iters 20] [--quick] [--sweep] [--memory]
    .venv/bin/python -m bench kernels        # the same table (quick: --quick), recorded in docs/performance.md

Every kernel gives table rows (kernel, case, implementation, pass, ms, TFLOP/s, GB/s, max relative error vs
the reference: max |got - want| / max |want|). On GPU the compiled Pallas kernels are timed; on CPU Pallas
runs interpreted, so there the kernels are only checked on one small case each ("pallas (interpret)", not
timed) and the reference and dense alternatives are timed. The ceilings are a big matmul (FLOP/s) and a big
elementwise copy (GB/s).

Sparse attention (kernels/sparse_attention): one chunk of `s` prefill queries at the end of a context of T
tokens, V4-Flash's attention shape (64 heads of 512, BF16), keys = the T window rows + T/4 CSA entries, each
query's index list = its 128-token window ++ 512 random visible entries (the indexer's top-k); and decode (one
query for each of 32 sequences). Dense = masked attention over every key, the index lists as the mask. FLOPs
count the matmuls issued (dense: all n keys): forward 4 s h k d, forward + backward 14 s h k d. Bytes (fwd):
q, o, index lists, and kv: each query's gathered rows (sparse) or all of kv once (dense).

Indexer (kernels/indexer): one chunk of `s` queries at the end of a T-token context, V4-Flash's indexer (64
heads x 128, top-k 512, BF16), n = T / 4 keys, all visible; and decode (one query for each of 32 sequences).
The reference is the dense alternative (the full [s, n] score matrix, then lax.top_k). FLOPs 2 s n heads d;
bytes: q, w, keys read once and the picks written. The error compares the k best scores (picks may swap on
near-ties, the scores may not).

MXFP4 matmul (kernels/fp4_matmul): x [m, k] times V4-Flash expert shapes (w1/w3: n = 2048, k = 4096; w2: n =
4096, k = 2048), dense (fp4_matmul) and grouped over 32 experts (fp4_ragged_dot; 4 on CPU), rows split among
experts at random. Reference = dequantise, then matmul (XLA); dense = a plain matmul with a dense weight of
the same shape in the activation dtype (BF16 on GPU; fp32 on CPU, where BF16 matmuls are emulated). FLOPs
2 m n k (fwd), 4 m n k (fwd + dx); bytes (fwd): x, the weight as stored (0.53 B a weight for MXFP4) and the
fp32 output.

--sweep (GPU) times the sparse attention kernel over candidate block sizes at T = 32K: copy the best into
kernels/sparse_attention/tuning.py. --memory prints compiled temp bytes (compile only, nothing runs): jax.grad
of one sparse attention at T = 32K with small heads (reference vs Pallas vs dense masked) and one chunk of the
indexer at n = 64K and 256K (reference vs Pallas).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from kernels.fp4_matmul import fp4_matmul, fp4_ragged_dot
from kernels.indexer import indexer_topk
from kernels.sparse_attention import pallas, reference
from v4jax.formats import Mxfp4Weight

WINDOW, TOPK = 128, 512
ON_GPU = jax.default_backend() == "gpu"
ACCEL = jax.default_backend() in ("gpu", "tpu")  # has compiled Pallas kernels (fp4_ragged_dot: GPU only)
INTERPRET = "pallas (interpret)"


def timeit(fn, *args, iters: int = 20, best: bool = False) -> float:
    """Median (or best) seconds of fn(*args) (jitted; the first call compiles and is not counted)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return min(times) if best else statistics.median(times)


def max_rel_err(got, want) -> float:
    """max |got - want| / max |want| over the finite entries of want (-inf marks an empty indexer slot)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    ok = np.isfinite(want)
    return float(np.max(np.abs(got[ok] - want[ok]), initial=0.0) / max(np.max(np.abs(want[ok]), initial=0.0), 1e-30))


def row(kernel, case, impl, phase, err, sec=None, flops=None, io_bytes=None) -> dict:
    """One table row; sec None: checked, not timed. flops / io_bytes None: no such rate for the row."""
    def rate(count, unit):
        return None if sec is None or count is None else count / sec / unit

    return {"kernel": kernel, "case": case, "impl": impl, "pass": phase, "ms": None if sec is None else sec * 1e3,
            "tflops": rate(flops, 1e12), "gbs": rate(io_bytes, 1e9), "err": err}


def ceilings(iters: int = 10) -> dict:
    """The device's achievable peaks, measured (best of `iters`): a big matmul (BF16 on GPU, FP32 on CPU) and a
    big copy."""
    n, dtype, size = (8192, jnp.bfloat16, 1 << 30) if ACCEL else (2048, jnp.float32, 1 << 28)
    a = jnp.ones((n, n), dtype)
    mm = jax.jit(lambda a: jnp.dot(a, a, preferred_element_type=jnp.float32).astype(dtype))
    x = jnp.ones((size // 4,), jnp.float32)
    cp = jax.jit(lambda x: x * 1.5)  # reads and writes every byte once
    return {"tflops": 2 * n**3 / timeit(mm, a, iters=iters, best=True) / 1e12,
            "gbs": 2 * size / timeit(cp, x, iters=iters, best=True) / 1e9,
            "what": f"{n}^3 {jnp.dtype(dtype).name} matmul; {size >> 20} MiB fp32 x * 1.5"}


# ---- sparse attention ----------------------------------------------------------------------------------------
def sparse_case(T: int, queries: int, batch: int, heads: int, d: int, dtype, seed: int = 0):
    """q [b, s, h, d], kv [b, T + T/4, d], sink [h], idx [b, s, 128 + 512]: the last `queries` positions of a
    T-token context, each with its window rows and TOPK random visible CSA entries (kv rows T + j)."""
    rng = np.random.default_rng(seed)
    n = T + T // 4
    pos = np.arange(T - queries, T)
    win = pos[:, None] - WINDOW + 1 + np.arange(WINDOW)
    n_vis = (pos + 1) // 4  # entries whose 4-token window ended by the query
    top = np.full((queries, TOPK), -1)  # -1 pads where fewer than TOPK entries are visible
    for i, v in enumerate(n_vis):
        top[i, :min(TOPK, v)] = T + rng.choice(v, size=min(TOPK, v), replace=False)
    idx = np.broadcast_to(np.concatenate([np.where(win >= 0, win, -1), top], -1), (batch, queries, WINDOW + TOPK))
    q = jax.random.normal(jax.random.key(seed), (batch, queries, heads, d), dtype)
    kv = jax.random.normal(jax.random.key(seed + 1), (batch, n, d), dtype)
    sink = jnp.zeros((heads,), jnp.float32)
    return q, kv, sink, jnp.asarray(idx, jnp.int32)


def dense_attention(q, kv, sink, idx, scale, return_lse=False):
    """The same attention over all n keys with a dense mask built from the index lists (duplicates count once)."""
    b, s = idx.shape[:2]
    n = kv.shape[1]
    mask = jnp.zeros((b, s, n), bool).at[jnp.arange(b)[:, None, None], jnp.arange(s)[None, :, None],
                                         jnp.where(idx >= 0, idx, n)].set(True, mode="drop")
    z = jnp.einsum("bshd,bnd->bshn", q, kv, preferred_element_type=jnp.float32) * scale
    z = jnp.where(mask[:, :, None], z, -jnp.inf)
    m = jnp.maximum(jnp.max(z, -1, keepdims=True), sink[:, None])
    p = jnp.exp(z - m)
    denom = jnp.sum(p, -1, keepdims=True) + jnp.exp(sink[:, None] - m)
    o = (jnp.einsum("bshn,bnd->bshd", p.astype(kv.dtype), kv, preferred_element_type=jnp.float32) / denom)
    return (o.astype(q.dtype), (m + jnp.log(denom))[..., 0]) if return_lse else o.astype(q.dtype)


def _train_step(attn):
    """fwd + bwd of one attention call: grads wrt q, kv, sink of a scalar loss of o and lse."""
    def loss(q, kv, sink, idx):
        o, lse = attn(q, kv, sink, idx)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(lse)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def bench_sparse_attention(contexts, iters: int, block_sizes: dict | None = None) -> list[dict]:
    """Rows for the sparse attention kernel: Pallas (GPU / TPU) vs reference vs dense, prefill chunk and decode."""
    rows = []
    if ACCEL:
        cases = [("prefill", T, 256, 1, 64, 512, jnp.bfloat16) for T in contexts]
        cases += [("decode", T, 1, 32, 64, 512, jnp.bfloat16) for T in contexts]
        impls = {"pallas": lambda *a: pallas.sparse_attention(*a, return_lse=True, target=jax.default_backend(),
                                                              block_sizes=block_sizes)}
    else:
        cases = [("prefill", T, 64, 1, 8, 128, jnp.float32) for T in contexts]
        cases += [("decode", T, 1, 8, 8, 128, jnp.float32) for T in contexts]
        impls = {}
    impls |= {"reference": lambda *a: reference.sparse_attention(*a, return_lse=True),
              "dense": lambda *a: dense_attention(*a, return_lse=True)}
    for mode, T, s, b, h, d, dtype in cases:
        q, kv, sink, idx = sparse_case(T, s, b, h, d, dtype)
        scale = d**-0.5
        k, n = idx.shape[-1], kv.shape[1]
        case = f"{mode} T={T} s={s} b={b} h={h} d={d} k={k}"
        want = reference.sparse_attention(q, kv, sink, idx, scale)
        for name, attn in impls.items():
            f = jax.jit(lambda q, kv, sink, idx, attn=attn: attn(q, kv, sink, idx, scale))
            err = max_rel_err(f(q, kv, sink, idx)[0], want)
            keys = n if name == "dense" else k
            kv_read = b * n * d if name == "dense" else b * s * k * d  # dense reads kv once; sparse gathers per query
            io_bytes = (2 * q.size + kv_read) * q.dtype.itemsize + idx.size * 4
            rows.append(row("sparse_attention", case, name, "fwd", err, timeit(f, q, kv, sink, idx, iters=iters),
                            4 * b * s * h * keys * d, io_bytes))
            step = _train_step(lambda *a, attn=attn: attn(*a, scale))
            rows.append(row("sparse_attention", case, name, "fwd+bwd", err,
                            timeit(step, q, kv, sink, idx, iters=iters), 14 * b * s * h * keys * d))
    if not ACCEL:  # the GPU kernel, interpreted, against the reference on one small case
        q, kv, sink, idx = sparse_case(1024, 8, 1, 8, 128, jnp.float32)
        got = pallas.sparse_attention(q, kv, sink, idx, 128**-0.5, target="gpu_interpret", block_sizes={
            side: {"block_h": 8, "block_k": 128, "num_warps": None, "num_stages": None} for side in ("fwd", "bwd")})
        rows.append(row("sparse_attention", "prefill T=1024 s=8 b=1 h=8 d=128 k=640", INTERPRET, "fwd",
                        max_rel_err(got, reference.sparse_attention(q, kv, sink, idx, 128**-0.5))))
    return rows


def sweep_sparse_attention(iters: int) -> list[dict]:
    """The Pallas kernel (GPU) over candidate block sizes, prefill chunk at T = 32K: fwd and fwd+bwd."""
    rows = []
    q, kv, sink, idx = sparse_case(32768, 256, 1, 64, 512, jnp.bfloat16)
    flops = q.shape[1] * q.shape[2] * idx.shape[-1] * q.shape[3]
    for bh in (16, 32, 64):
        for bk in (16, 32, 64):
            for warps in (4, 8):
                cfg = {"block_h": bh, "block_k": bk, "num_warps": warps, "num_stages": 2}
                bs = {"fwd": cfg, "bwd": {**cfg, "num_stages": 1}}
                attn = lambda *a, bs=bs: pallas.sparse_attention(*a, 512**-0.5, True, block_sizes=bs)  # noqa: E731
                try:
                    times = {"fwd": timeit(jax.jit(attn), q, kv, sink, idx, iters=iters),
                             "fwd+bwd": timeit(_train_step(attn), q, kv, sink, idx, iters=iters)}
                except Exception as e:  # a block that does not fit (registers / shared memory): report and go on
                    print(f"blocks {cfg}: {type(e).__name__}: {str(e)[:200]}")
                    continue
                for phase, sec in times.items():
                    rows.append(row("sparse_attention", f"sweep bh={bh} bk={bk} warps={warps}", "pallas", phase,
                                    None, sec, (4 if phase == "fwd" else 14) * flops))
    return rows


def memory_sparse_vs_dense(T: int = 32768, heads: int = 4, d: int = 64, chunk: int = 256) -> dict:
    """Compiled temp bytes of jax.grad (wrt q and kv) of one attention at context T, fp32, batch 1, chunked as
    v4jax runs it (lax.map over chunks of `chunk` queries, each with its window + top-k index lists): "sparse"
    with the jnp reference (its autodiff saves every chunk's gathered keys [chunk, k, d]), "sparse_pallas" with
    the Pallas kernels (saves q, o, lse; the GPU kernels interpreted off GPU / TPU), and "dense" masked
    attention over every key. Nothing is executed."""
    n, k = T + T // 4, WINDOW + TOPK
    shapes = (jax.ShapeDtypeStruct((1, T, heads, d), jnp.float32), jax.ShapeDtypeStruct((1, n, d), jnp.float32),
              jax.ShapeDtypeStruct((heads,), jnp.float32), jax.ShapeDtypeStruct((1, T, k), jnp.int32))
    target = jax.default_backend() if ACCEL else "gpu_interpret"
    blocks = None if ACCEL else {side: {"block_h": 4, "block_k": 128, "num_warps": None, "num_stages": None}
                                 for side in ("fwd", "bwd")}

    def chunked(attn):
        def f(q, kv, sink, idx):
            split = lambda a: jnp.moveaxis(a.reshape(1, T // chunk, chunk, *a.shape[2:]), 1, 0)  # noqa: E731
            return jax.lax.map(lambda c: attn(c[0], kv, sink, c[1], d**-0.5, return_lse=True), (split(q), split(idx)))
        return f

    kernel = lambda *a, **kw: pallas.sparse_attention(*a, **kw, target=target, block_sizes=blocks)  # noqa: E731
    dense = lambda q, kv, sink, idx: dense_attention(q, kv, sink, idx, d**-0.5, return_lse=True)  # noqa: E731
    out = {}
    for name, attn in (("sparse", chunked(reference.sparse_attention)), ("sparse_pallas", chunked(kernel)),
                       ("dense", dense)):
        def loss(q, kv, sink, idx, attn=attn):
            o, lse = attn(q, kv, sink, idx)
            return jnp.sum(jnp.sin(o)) + jnp.sum(lse)
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*shapes).compile()
        out[name] = compiled.memory_analysis().temp_size_in_bytes
    out["shapes"] = {"T": T, "n": n, "k": k, "heads": heads, "d": d, "chunk": chunk}
    return out


# ---- lightning indexer ---------------------------------------------------------------------------------------
def indexer_case(n: int, s: int, b: int, heads: int, d: int, dtype, seed: int = 0):
    """q [b, s, heads, d], w [b, s, heads] fp32, keys [b, n, d], every key visible: lo = 0, hi = n."""
    r = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(r[0], (b, s, heads, d), dtype)
    w = jax.random.normal(r[1], (b, s, heads), jnp.float32)
    keys = jax.random.normal(r[2], (b, n, d), dtype)
    return q, w, keys, jnp.zeros((b, s), jnp.int32), jnp.full((b, s), n, jnp.int32)


def bench_indexer(contexts, iters: int, topk: int = 512) -> list[dict]:
    """Rows for the indexer: Pallas (GPU / TPU) vs the full-scores reference, prefill chunk and decode."""
    rows = []
    modes = (("prefill", 256, 1), ("decode", 1, 32)) if ACCEL else (("prefill", 64, 1), ("decode", 1, 8))
    h, dtype = (64, jnp.bfloat16) if ACCEL else (16, jnp.float32)
    impls = {"pallas": "pallas", "reference (dense scores)": "reference"} if ACCEL else {
        "reference (dense scores)": "reference"}
    for T in contexts:
        for mode, s, b in modes:
            n, d = T // 4, 128
            k = min(topk, n)
            args = indexer_case(n, s, b, h, d, dtype)
            want = jax.jit(lambda *a: indexer_topk(*a, k, dtype, implementation="reference"))(*args)[1]
            io_bytes = (args[0].size + args[2].size) * jnp.dtype(dtype).itemsize + args[1].size * 4 + b * s * k * 8
            for name, impl in impls.items():
                f = jax.jit(lambda *a, impl=impl: indexer_topk(*a, k, dtype, implementation=impl))
                rows.append(row("indexer_topk", f"{mode} T={T} n={n} s={s} b={b} h={h} d={d} k={k}", name, "fwd",
                                max_rel_err(f(*args)[1], want), timeit(f, *args, iters=iters),
                                2 * b * s * n * h * d, io_bytes))
    if not ACCEL:  # the kernel, interpreted, against the reference on one small case
        args = indexer_case(300, 8, 1, 16, 128, jnp.float32)
        got = indexer_topk(*args, 64, jnp.float32, implementation="pallas_interpret", block_sizes={
            "rows": 64, "block_k": 64, "span": 128, "num_warps": None, "num_stages": None})
        rows.append(row("indexer_topk", "prefill n=300 s=8 b=1 h=16 d=128 k=64", INTERPRET, "fwd",
                        max_rel_err(got[1], indexer_topk(*args, 64, jnp.float32, implementation="reference")[1])))
    return rows


def memory_indexer(n: int = 65536, s: int = 256, heads: int = 64, d: int = 128, k: int = 512) -> dict:
    """Compiled temp bytes of one chunk's indexer_topk (V4-Flash heads, BF16, n keys), reference (full [s, n]
    scores) vs the Pallas kernel (interpret mode off GPU / TPU, whose buffers are the kernel's own). Not run."""
    shapes = (jax.ShapeDtypeStruct((1, s, heads, d), jnp.bfloat16), jax.ShapeDtypeStruct((1, s, heads), jnp.float32),
              jax.ShapeDtypeStruct((1, n, d), jnp.bfloat16), jax.ShapeDtypeStruct((1, s), jnp.int32),
              jax.ShapeDtypeStruct((1, s), jnp.int32))
    out = {"shapes": {"n": n, "s": s, "heads": heads, "d": d, "k": k}}
    for name, impl in (("reference", "reference"), ("pallas", "pallas" if ACCEL else "pallas_interpret")):
        f = jax.jit(lambda *a, impl=impl: indexer_topk(*a, k, jnp.bfloat16, implementation=impl))
        out[name] = f.lower(*shapes).compile().memory_analysis().temp_size_in_bytes
    return out


# ---- MXFP4 matmul --------------------------------------------------------------------------------------------
def mxfp4_weight(shape, seed: int = 0) -> Mxfp4Weight:
    """Random codes, scales 2^-8 .. 2^-5 (trained-weight magnitudes) for a weight [.., n, k]."""
    rng = np.random.default_rng(seed)
    *lead, n, k = shape
    return Mxfp4Weight(jnp.asarray(rng.integers(0, 256, (*lead, n, k // 2)), jnp.uint8),
                       jnp.asarray(rng.integers(119, 123, (*lead, n, k // 32)), jnp.uint8))


def _grad_x(f):
    """A training-like step: loss sum(y^2) / 2 needs the forward y, then dx = y @ W (a plain sum(y) would let XLA
    drop the forward matmul)."""
    return jax.jit(jax.value_and_grad(lambda x, *a: jnp.sum(jnp.square(f(x, *a))) / 2))


def bench_fp4_matmul(ms, iters: int, experts: int = 32 if ON_GPU else 4) -> list[dict]:
    """Rows for fp4_matmul and fp4_ragged_dot: Pallas (GPU) vs dequantise-then-matmul vs a dense matmul. The
    weights are jit arguments (as closed-over constants XLA would fold the reference's dequantisation away)."""
    rows = []
    dtype = jnp.bfloat16 if ON_GPU else jnp.float32
    impls = ("pallas", "reference") if ON_GPU else ("reference",)
    rng = np.random.default_rng(0)
    for n, k in ((2048, 4096), (4096, 2048)):
        w, ew = mxfp4_weight((n, k)), mxfp4_weight((experts, n, k))
        wd, ewd = w.dequantize(dtype), jnp.swapaxes(ew.dequantize(dtype), 1, 2)  # the dense alternative's weights
        for m in ms:
            x = jax.random.normal(jax.random.key(m), (m, k), dtype)
            sizes = jnp.asarray(np.bincount(rng.integers(0, experts, m), minlength=experts), jnp.int32)
            # kernel -> ({impl: (f(x, *consts), consts)}, stored bytes of the MXFP4 weight, case)
            variants = {
                "fp4_matmul": ({name: (lambda x, w, name=name: fp4_matmul(x, w, implementation=name), (w,))
                                for name in impls}
                               | {"dense": (lambda x, wd: jnp.dot(x, wd.T, preferred_element_type=jnp.float32), (wd,))},
                               w.packed.size + w.scale.size, f"m={m} n={n} k={k}"),
                "fp4_ragged_dot": ({name: (lambda x, ew, g, name=name: fp4_ragged_dot(x, ew, g, implementation=name),
                                           (ew, sizes)) for name in impls}
                                   | {"dense": (lambda x, ewd, g: jax.lax.ragged_dot(
                                       x, ewd, g, preferred_element_type=jnp.float32), (ewd, sizes))},
                                   ew.packed.size + ew.scale.size, f"m={m} n={n} k={k} e={experts}"),
            }
            for kernel, (fns, w_bytes, case) in variants.items():
                f_ref, c_ref = fns["reference"]
                want = jax.jit(f_ref)(x, *c_ref)
                for name, (f, consts) in fns.items():
                    fwd = jax.jit(f)
                    stored = consts[0].size * jnp.dtype(dtype).itemsize if name == "dense" else w_bytes
                    io_bytes = x.size * jnp.dtype(dtype).itemsize + stored + m * n * 4
                    err = max_rel_err(fwd(x, *consts), want)
                    rows.append(row(kernel, case, name, "fwd", err, timeit(fwd, x, *consts, iters=iters),
                                    2 * m * n * k, io_bytes))
                    rows.append(row(kernel, case, name, "fwd+bwd", err, timeit(_grad_x(f), x, *consts, iters=iters),
                                    4 * m * n * k))
    if not ON_GPU:  # the Pallas kernels, interpreted, against the references on one small case
        x = jax.random.normal(jax.random.key(1), (40, 256), jnp.float32)
        w, ew = mxfp4_weight((96, 256)), mxfp4_weight((4, 96, 256))
        sizes = jnp.array([10, 0, 25, 5], jnp.int32)
        cfg = {"block_m": 16, "block_n": 32, "block_k": 128, "num_warps": None, "num_stages": None}
        for kernel, f in (("fp4_matmul", lambda **kw: fp4_matmul(x, w, **kw)),
                          ("fp4_ragged_dot", lambda **kw: fp4_ragged_dot(x, ew, sizes, **kw))):
            err = max_rel_err(f(implementation="pallas_interpret", block_sizes=cfg), f(implementation="reference"))
            rows.append(row(kernel, "m=40 n=96 k=256" + (" e=4" if kernel == "fp4_ragged_dot" else ""), INTERPRET,
                            "fwd", err))
    return rows


# ---- the table -------------------------------------------------------------------------------------------------
# name -> (row function of (sizes, iters), default sizes on GPU / TPU, on CPU, with --quick on CPU)
KERNELS = {
    "sparse_attention": (bench_sparse_attention, [8192, 16384, 32768, 65536], [1024, 4096], [1024]),
    "indexer": (bench_indexer, [32768, 131072, 1048576], [4096, 16384], [4096]),
    "fp4_matmul": (bench_fp4_matmul, [32, 4096], [1, 64], [1, 64]),
}
COLUMNS = ("kernel", "case", "impl", "pass", "ms", "TFLOP/s", "%peak", "GB/s", "%bw", "max rel err")


def table(rows: list[dict], ceil: dict) -> list[tuple]:
    """Rows as formatted cells (COLUMNS); TFLOP/s and GB/s also as percentages of the measured ceilings."""
    def fmt(v, f):
        return "-" if v is None else format(v, f)

    return [(r["kernel"], r["case"], r["impl"], r["pass"], fmt(r["ms"], ".3f"), fmt(r["tflops"], ".2f"),
             fmt(r["tflops"] and r["tflops"] / ceil["tflops"] * 100, ".1f"), fmt(r["gbs"], ".1f"),
             fmt(r["gbs"] and r["gbs"] / ceil["gbs"] * 100, ".1f"), fmt(r["err"], ".1e")) for r in rows]


def print_table(rows: list[dict], ceil: dict) -> None:
    print(f"ceilings on {jax.devices()[0].device_kind}: {ceil['tflops']:.3g} TFLOP/s, {ceil['gbs']:.3g} GB/s "
          f"({ceil['what']})")
    cells = [COLUMNS, *table(rows, ceil)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    for j, c in enumerate(cells):
        print("  ".join(v.ljust(w) if i < 4 else v.rjust(w) for i, (v, w) in enumerate(zip(c, widths))))
        if j == 0:
            print("-" * (sum(widths) + 2 * len(widths) - 2))


def memory(quick: bool = False) -> dict:
    """The --memory numbers: sparse attention at T = 32K (8K with quick), the indexer at n = 64K and 256K."""
    return {"sparse_attention": memory_sparse_vs_dense(T=8192 if quick else 32768),
            "indexer": [memory_indexer(n) for n in ((16384,) if quick else (65536, 262144))]}


def memory_lines(mem: dict) -> list[str]:
    s = mem["sparse_attention"]
    sh = s["shapes"]
    lines = [f"jax.grad of one sparse attention at T = {sh['T']} ({sh['heads']} heads of {sh['d']}, fp32, n = "
             f"{sh['n']} keys, k = {sh['k']}, chunks of {sh['chunk']}), compiled temp bytes: reference "
             f"{s['sparse'] / 2**30:.2f} GiB, Pallas {s['sparse_pallas'] / 2**30:.2f} GiB, dense masked "
             f"{s['dense'] / 2**30:.2f} GiB"]
    for m in mem["indexer"]:
        sh = m["shapes"]
        lines.append(f"indexer_topk of one chunk (s = {sh['s']}, {sh['heads']} x {sh['d']} heads, bf16, n = "
                     f"{sh['n']}, k = {sh['k']}), compiled temp bytes: reference {m['reference'] / 2**20:.0f} MiB, "
                     f"Pallas {m['pallas'] / 2**20:.0f} MiB")
    return lines


def measure(only=None, contexts=None, ms=None, iters=None, quick=False) -> dict:
    """Ceilings plus the rows of the chosen kernels (all by default) at the given or their default sizes."""
    iters = iters or (20 if ACCEL else 2 if quick else 3)
    result = {"ceilings": ceilings(), "rows": [], "iters": iters}
    for name in only or KERNELS:
        fn, accel, cpu, cpu_quick = KERNELS[name]
        given = ms if name == "fp4_matmul" else contexts
        result["rows"] += fn(given or (accel if ACCEL else cpu_quick if quick else cpu), iters)
    return result


def run(out_dir, quick: bool = False) -> dict:
    """For `python -m bench kernels`: the table of every kernel and the memory evidence (out_dir unused)."""
    result = measure(quick=quick)
    result["memory"] = memory(quick)
    print_table(result["rows"], result["ceilings"])
    print("\n".join(memory_lines(result["memory"])))
    return result


def markdown(result: dict) -> str:
    c = result["ceilings"]
    impls = ("Pallas kernels compiled for this device, timed" if any(r["impl"] == "pallas" for r in result["rows"])
             else "No compiled Pallas kernels on CPU: each kernel is checked interpreted on one small case "
                  f"(\"{INTERPRET}\", not timed); the jnp references and dense alternatives are timed")
    lines = [f"`python -m bench.kernels` prints the same table (docstring there: shapes, FLOP and byte counts). "
             f"Measured ceilings: {c['tflops']:.3g} TFLOP/s, {c['gbs']:.3g} GB/s ({c['what']}). {impls}. "
             f"ms: median of {result['iters']} calls; max rel err: max |got - want| / max |want| against the jnp "
             "reference (indexer: the k best scores). %peak and %bw are of the ceilings; %bw above 100 means the "
             "working set stayed in cache.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table(result["rows"], c)]
    lines += ["", "Memory (compiled, not run): " + "; ".join(memory_lines(result["memory"])) + "."]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", choices=list(KERNELS), help="kernels to run (default: all)")
    ap.add_argument("--contexts", type=int, nargs="+", help="contexts T for sparse_attention and indexer "
                    f"(default on GPU: {KERNELS['sparse_attention'][1]} and {KERNELS['indexer'][1]})")
    ap.add_argument("--ms", type=int, nargs="+",
                    help=f"rows m for fp4_matmul (default on GPU: {KERNELS['fp4_matmul'][1]})")
    ap.add_argument("--iters", type=int, help="timed calls per row (default: 20 on GPU / TPU, 3 on CPU)")
    ap.add_argument("--quick", action="store_true", help="small sizes (CPU), fewer calls")
    ap.add_argument("--sweep", action="store_true", help="time the sparse attention kernel's block sizes (GPU)")
    ap.add_argument("--memory", action="store_true", help="compiled memory: sparse attention and indexer")
    args = ap.parse_args()
    if args.sweep and not ON_GPU:
        ap.error("--sweep times the compiled Pallas kernel: run it on a GPU")
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, device {jax.devices()[0].device_kind}")
    result = measure(args.only, args.contexts, args.ms, args.iters, args.quick)
    print_table(result["rows"], result["ceilings"])
    if args.sweep:
        print_table(sweep_sparse_attention(result["iters"]), result["ceilings"])
    if args.memory:
        print("\n".join(memory_lines(memory(args.quick))))


if __name__ == "__main__":
    main()
