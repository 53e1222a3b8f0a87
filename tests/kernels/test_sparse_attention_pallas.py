"""The Pallas sparse attention kernels, GPU (Triton) and TPU (Mosaic) versions in interpret mode on CPU, against
the jnp reference, forward and backward; the lowering of both kernels for CUDA and TPU without those devices;
and the implementation switch."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from conftest import KERNEL_IMPL
from kernels.sparse_attention import pallas, reference, sparse_attention

# (b, s, h, d, n, k): prefill with ragged k / heads / d (24: padded to 32 inside), decode with many heads,
# one head with k below one index block.
CASES = {
    "prefill": (2, 5, 3, 24, 20, 13),
    "decode": (3, 1, 8, 32, 17, 7),
    "one_head": (1, 4, 1, 16, 9, 3),
}
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def inputs(case, dtype, seed=0):
    """Random q, kv, sink and index lists with unused slots, an all -1 row and a duplicated row."""
    b, s, h, d, n, k = CASES[case]
    rng = np.random.default_rng(seed)
    q = jnp.asarray(2 * rng.standard_normal((b, s, h, d)), dtype)  # x2: peaked, not uniform, softmaxes
    kv = jnp.asarray(rng.standard_normal((b, n, d)), dtype)
    sink = jnp.asarray(rng.standard_normal(h), jnp.float32)
    idx = np.stack([np.stack([rng.permutation(n)[:k] for _ in range(s)]) for _ in range(b)])
    idx[0, 0, k // 2:] = -1  # fewer valid indices than k
    idx[-1, -1, :] = -1  # no keys at all: o = 0, lse = sink
    idx[0, -1, -1] = idx[0, -1, 0]  # the same row twice counts twice
    return q, kv, sink, jnp.asarray(idx, jnp.int32)


def close(got, want, tol):
    """Within tol of the reference, relative to its largest magnitude; the reference is not all zeros."""
    want = np.asarray(want, np.float64)
    scale = np.abs(want).max()
    assert scale > 0
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("impl", [KERNEL_IMPL, "pallas_interpret_tpu"])
def test_forward_matches_reference(impl, case, dtype):
    q, kv, sink, idx = inputs(case, dtype)
    scale = q.shape[-1] ** -0.5
    o, lse = sparse_attention(q, kv, sink, idx, scale, return_lse=True, implementation=impl)
    o_ref, lse_ref = reference.sparse_attention(q, kv, sink, idx, scale, return_lse=True)
    assert o.dtype == q.dtype and lse.dtype == jnp.float32 and o.shape == q.shape
    close(o, o_ref, TOL[dtype])
    close(lse, lse_ref, TOL[dtype])
    assert np.all(np.asarray(o[-1, -1]) == 0)  # the all -1 row
    np.testing.assert_allclose(np.asarray(lse[-1, -1]), np.asarray(sink), rtol=1e-6)


@pytest.mark.parametrize("impl,case,dtype", [
    (KERNEL_IMPL, "prefill", jnp.float32), (KERNEL_IMPL, "decode", jnp.float32),
    (KERNEL_IMPL, "prefill", jnp.bfloat16), ("pallas_interpret_tpu", "prefill", jnp.float32),
    ("pallas_interpret_tpu", "decode", jnp.bfloat16)])
def test_gradients_match_reference(impl, case, dtype):
    """Grads wrt q, kv, sink through the custom_vjp vs jax.grad of the reference, with cotangents on o and lse."""
    q, kv, sink, idx = inputs(case, dtype, seed=1)
    scale = q.shape[-1] ** -0.5
    w = jnp.asarray(np.random.default_rng(2).standard_normal(q.shape[:3]), jnp.float32)

    def loss(impl):
        def f(q, kv, sink):
            o, lse = sparse_attention(q, kv, sink, idx, scale, return_lse=True, implementation=impl)
            return jnp.sum(jnp.sin(o.astype(jnp.float32))) + jnp.sum(w * lse)
        return f

    got = jax.grad(loss(impl), argnums=(0, 1, 2))(q, kv, sink)
    want = jax.grad(loss("reference"), argnums=(0, 1, 2))(q, kv, sink)
    for name, g, r in zip(("dq", "dkv", "dsink"), got, want):
        assert g.dtype == r.dtype and g.shape == r.shape, name
        close(g, r, TOL[dtype])
    assert np.all(np.asarray(got[0][-1, -1]) == 0)  # a query with no keys gets no gradient


def test_lse_only_cotangent():
    """With a cotangent on lse alone, d lse / dz = p: dq = scale * sum_k p_k kv_k, dsink = p_sink (hand-derived)."""
    q, kv, sink, idx = inputs("one_head", jnp.float32, seed=3)
    scale = 0.25

    def lse_sum(q, sink):
        return jnp.sum(sparse_attention(q, kv, sink, idx, scale, return_lse=True, implementation=KERNEL_IMPL)[1])

    dq, dsink = jax.grad(lse_sum, argnums=(0, 1))(q, sink)
    o, lse = reference.sparse_attention(q, kv, sink, idx, scale, return_lse=True)
    # o is the p-weighted mean of the keys (K = V), so sum_k p_k kv_k = o
    close(dq, scale * o, 1e-5)
    close(dsink, jnp.sum(jnp.exp(sink - lse), axis=(0, 1)), 1e-5)


def test_implementation_switch():
    q, kv, sink, idx = inputs("one_head", jnp.float32)
    want = reference.sparse_attention(q, kv, sink, idx, 0.3)
    on_cpu = jax.default_backend() == "cpu"
    for impl in (None, "auto", "reference") if on_cpu else ("reference",):  # no Pallas kernel compiled for CPU
        np.testing.assert_array_equal(np.asarray(sparse_attention(q, kv, sink, idx, 0.3, implementation=impl)),
                                      np.asarray(want))
    if on_cpu:
        with pytest.raises(ValueError, match="no compiled Pallas"):
            sparse_attention(q, kv, sink, idx, 0.3, implementation="pallas")
    with pytest.raises(ValueError, match="unknown"):
        sparse_attention(q, kv, sink, idx, 0.3, implementation="triton")
    with pytest.raises(ValueError, match="shapes disagree"):
        sparse_attention(q, kv[..., :-1], sink, idx, 0.3, implementation="pallas_interpret")
    with pytest.raises(ValueError, match="must be integer"):
        sparse_attention(q, kv, sink, idx.astype(jnp.float32), 0.3, implementation="pallas_interpret")


# target -> (export platform, custom-call target that carries a kernel, context to lower under)
LOWERINGS = {
    "gpu": ("cuda", "__gpu$xla.gpu.triton", lambda: jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh(
        (1,), ("x",), abstract_device=jax.sharding.AbstractDevice(
            device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")))),  # Triton needs a GPU model
    "tpu": ("tpu", "tpu_custom_call", contextlib.nullcontext),
}


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
@pytest.mark.parametrize("target", sorted(LOWERINGS))
def test_kernels_lower_without_the_device(target):
    """Forward and backward kernels lower for CUDA (an H100) and TPU at V4 shapes (64 heads of 512, an index
    list of 128 window + 512 top-k). Only the kernel IR is built here (Triton IR; Mosaic IR): the device
    compilers (PTX registers and shared memory; Mosaic layouts and VMEM) run on the device."""
    b, s, h, d, n, k = 1, 64, 64, 512, 1000, 640
    args = (jax.ShapeDtypeStruct((b, s, h, d), jnp.bfloat16), jax.ShapeDtypeStruct((b, n, d), jnp.bfloat16),
            jax.ShapeDtypeStruct((h,), jnp.float32), jax.ShapeDtypeStruct((b, s, k), jnp.int32))

    def fwd(q, kv, sink, idx):
        return pallas.sparse_attention(q, kv, sink, idx, d**-0.5, return_lse=True, target=target)

    def grad(q, kv, sink, idx):
        def f(q, kv, sink):
            o, lse = fwd(q, kv, sink, idx)
            return jnp.sum(o.astype(jnp.float32)) + jnp.sum(lse)
        return jax.grad(f, argnums=(0, 1, 2))(q, kv, sink)

    platform, call, context = LOWERINGS[target]
    with context():
        for fn, kernels in ((fwd, ["sparse_attention_fwd"]), (grad, ["sparse_attention_fwd", "sparse_attention_bwd"])):
            exp = export.export(jax.jit(fn), platforms=[platform],
                                disabled_checks=[export.DisabledSafetyCheck.custom_call(call)])(*args)
            text = exp.mlir_module()
            assert text.count(f"@{call}(") == len(kernels), fn.__name__
            assert all(kname in text for kname in kernels), fn.__name__
