"""The Pallas kernels under a multi-device mesh (kernels.per_batch_shard): XLA cannot partition a Pallas call,
so each device runs the kernel on its share of the batch inside shard_map. On 8 devices (data 2, fsdp 2,
expert 2, the training rules) the sharded kernels equal the single-device references, gradients included."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from conftest import KERNEL_IMPL, rel_err
from kernels.indexer import indexer_topk
from kernels.sparse_attention import sparse_attention
from v4jax import sharding


def _mesh_and_data():
    rng = np.random.default_rng(0)
    b, s, h, d, n, k = 8, 16, 4, 64, 24, 8
    data = dict(q=rng.standard_normal((b, s, h, d)), kv=rng.standard_normal((b, n, d)), sink=rng.standard_normal(h),
                iq=rng.standard_normal((b, s, 4, d)), w=rng.random((b, s, 4)))
    data = {key: jnp.asarray(v, jnp.float32) for key, v in data.items()}
    data["idx"] = jnp.asarray(rng.integers(-1, n, (b, s, k)), jnp.int32)  # -1: unused slots mixed in
    data["lo"] = jnp.asarray(rng.integers(0, 4, (b, s)), jnp.int32)
    data["hi"] = jnp.asarray(rng.integers(12, n + 1, (b, s)), jnp.int32)
    return sharding.make_mesh({"data": 2, "fsdp": 2, "expert": 2}), data, k


def test_sparse_attention_on_a_mesh_equals_reference():
    mesh, x, _ = _mesh_and_data()

    def loss(q, kv, sink, impl):
        o, lse = sparse_attention(q, kv, sink, x["idx"], 0.125, True, implementation=impl)
        return jnp.sum(o * jnp.cos(o)) + jnp.sum(jnp.sin(lse)), (o, lse)

    grad = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)
    (_, want), gwant = grad(x["q"], x["kv"], x["sink"], "reference")
    with sharding.use_rules(mesh, sharding.TRAIN_RULES):
        step = jax.jit(lambda q, kv, sink: grad(q, kv, sink, KERNEL_IMPL))
        text = step.lower(x["q"], x["kv"], x["sink"]).as_text()
        assert "manual_computation" in text or "shard_map" in text  # the kernel runs per device (Shardy / GSPMD)
        (_, got), ggot = step(x["q"], x["kv"], x["sink"])
    for a, b in zip(got + ggot, want + gwant):
        assert rel_err(a.reshape(a.shape[0], -1) if a.ndim > 1 else a[None], b.reshape(b.shape[0], -1)
                       if b.ndim > 1 else b[None]).max() < 1e-5


def test_indexer_topk_on_a_mesh_equals_reference():
    mesh, x, k = _mesh_and_data()
    args = (x["iq"], x["w"], x["kv"], x["lo"], x["hi"])
    want = indexer_topk(*args, k, jnp.float32, implementation="reference")
    with sharding.use_rules(mesh, sharding.TRAIN_RULES):
        got = jax.jit(lambda *a: indexer_topk(*a, k, jnp.float32, implementation=KERNEL_IMPL))(*args)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=1e-6)
