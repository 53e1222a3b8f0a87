"""Expert parallelism (v4jax/expert_parallel.py) on the 8 fake CPU devices: the EP routed sum equals the dense
reference MoE (moe_impl="dense", no mesh) in fp32, forward and gradients, on three mesh layouts; drops are counted
exactly; the ragged_all_to_all path (emulated: XLA:CPU cannot run it) agrees; the whole model under a mesh."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import random_ids
from v4jax import expert_parallel, sharding
from v4jax.config import ConfigError, ModelConfig
from v4jax.experts import expert_ffn
from v4jax.model import Transformer
from v4jax.moe import MoE
from v4jax.quant import dense

CFG = ModelConfig.preset("tiny", compute_dtype="float32")  # 16 experts, top-3, 2 hash layers
MESHES = {"expert8": {"expert": 8}, "data2_expert4": {"data": 2, "expert": 4},
          "fsdp2_expert2_tensor2": {"fsdp": 2, "expert": 2, "tensor": 2}, "data8": {"data": 8}}
HASH, SCORE = 0, 4  # layer indices of a hash-routed and a score-routed layer
FORCED = (7, 2, 13)  # every token routed to these: expert 7 gets all tokens, 13 of 16 experts get none


def _moe(layer, **cfg):
    moe = MoE(CFG.replace(**cfg), layer, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    for _, var in nnx.to_flat_state(nnx.state(moe, nnx.Param)):
        var.set_value(jnp.asarray(rng.standard_normal(var.shape) / np.sqrt(var.shape[-1]), jnp.float32))
    return moe


def _force_routing(moe):
    """Route every token to FORCED: through the router bias (score layers) or the tid2eid table (hash layers)."""
    if moe.gate.hash:
        moe.gate.tid2eid.set_value(jnp.broadcast_to(jnp.asarray(FORCED, jnp.int32), moe.gate.tid2eid.shape))
    else:
        moe.gate.bias.set_value(jnp.zeros(CFG.n_routed_experts).at[jnp.asarray(FORCED)].set(100.0))


def _inputs(seed=0, shape=(2, 10)):  # 20 tokens: padded to 24 on meshes with 8 token shards
    y = jax.random.normal(jax.random.key(seed), shape + (CFG.dim,)) * 2
    return y, random_ids(shape, CFG.vocab_size, seed), jax.random.normal(jax.random.key(seed + 1), y.shape)


@jax.jit(static_argnums=0)
def _run(graphdef, params, rest, y, tokens, ct):
    """MoE output, the sown ep_dropped (-1 when not sown) and the gradients of sum(out * ct) wrt every Param and
    the input. Jitted once per module structure (and context mesh): routing changes are values."""
    def loss(params, y):
        m = nnx.merge(graphdef, params, rest)
        out = m(y, tokens)
        dropped = nnx.pop(m, nnx.Intermediate).get("ep_dropped")
        return jnp.sum(out * ct), (out, dropped[-1] if dropped is not None else jnp.int32(-1))

    (_, aux), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, y)
    return aux, grads


def _value_and_grads(moe, y, tokens, ct):
    (out, dropped), (g_params, g_y) = _run(*nnx.split(moe, nnx.Param, ...), y, tokens, ct)
    flat = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(g_params)}
    return np.asarray(out), int(dropped), {**flat, "input": np.asarray(g_y)}


def _assert_close(got, want, tol=1e-5):
    """max |got - want| <= tol * max |want| (fp32: only the summation order differs)."""
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err <= tol, f"relative error {err:.2e}"


@pytest.mark.parametrize("mesh_name, layer", [("expert8", HASH), ("data2_expert4", SCORE),
                                              ("fsdp2_expert2_tensor2", SCORE), ("data8", SCORE)],
                         ids=["expert8-hash", "data2_expert4-score", "fsdp2_expert2_tensor2-score", "data8-score"])
def test_ep_equals_dense_forward_and_grads(mesh_name, layer):
    """Random routing, then every token on FORCED (one expert gets all tokens, most none): output and gradients
    wrt the expert, shared-expert and gate weights and the input equal the dense MoE; nothing is dropped."""
    y, tokens, ct = _inputs()
    for force in (False, True):
        ref, ep = _moe(layer, moe_impl="dense"), _moe(layer, moe_impl="expert_parallel")
        if force:
            _force_routing(ref)
            _force_routing(ep)
        want_out, _, want = _value_and_grads(ref, y, tokens, ct)
        with jax.set_mesh(sharding.make_mesh(MESHES[mesh_name])):
            out, dropped, got = _value_and_grads(ep, y, tokens, ct)
        assert dropped == 0
        _assert_close(out, want_out)
        assert set(got) == set(want) and len(got) == 8  # gate, w1-3, shared w1-3 (the bias is no Param), input
        for name in want:
            _assert_close(got[name], want[name])
        if force:  # idle experts get exactly zero gradient, the forced ones non-zero
            g = np.abs(got["experts.w1"]).sum(axis=(1, 2))
            assert (g[list(FORCED)] > 0).all() and (np.delete(g, FORCED) == 0).all()


def test_ep_engages_exactly_with_its_moe_impl():
    """The path is the config's (traced only): the per-device dispatch (shard_map) and the ep_dropped stat appear
    exactly for moe_impl "expert_parallel", exchanging tokens when the mesh's expert axis is > 1; "ragged" and
    "dense" keep the single-device path under any mesh; "expert_parallel" without a mesh says what to do;
    sharding.for_mesh turns "ragged" into "expert_parallel" on more than one device only."""
    y, tokens, _ = _inputs()

    def traced(impl, mesh_shape):
        graphdef, state = nnx.split(_moe(SCORE, moe_impl=impl))
        sown = []

        def f(state, y):
            m = nnx.merge(graphdef, state)
            out = m(y, tokens)
            sown.extend(nnx.pop(m, nnx.Intermediate))
            return out

        if mesh_shape is None:
            return str(jax.make_jaxpr(f)(state, y)), sown
        with jax.set_mesh(sharding.make_mesh(mesh_shape)):
            return str(jax.make_jaxpr(f)(state, y)), sown

    for impl, mesh_shape in (("ragged", None), ("ragged", {"data": 2, "expert": 4}), ("dense", {"expert": 8})):
        jaxpr, sown = traced(impl, mesh_shape)
        assert "all_to_all" not in jaxpr and "shard_map" not in jaxpr and "ep_dropped" not in sown
    jaxpr, sown = traced("expert_parallel", {"data": 8})  # tokens sorted where they are: no global sort
    assert "shard_map" in jaxpr and "ep_dropped" in sown
    jaxpr, sown = traced("expert_parallel", {"data": 2, "expert": 4})
    assert "all_to_all" in jaxpr and "ep_dropped" in sown
    with pytest.raises(ValueError, match="no.* mesh|none is set"):
        traced("expert_parallel", None)
    for impl, n, want in (("ragged", 1, "ragged"), ("ragged", 8, "expert_parallel"), ("dense", 8, "dense")):
        mesh = sharding.make_mesh({"data": n}, jax.devices()[:n])
        assert sharding.for_mesh(CFG.replace(moe_impl=impl), mesh).moe_impl == want


def _dropped_pairs(ids: np.ndarray, n_shards: int, n_dev: int, capacity: float) -> np.ndarray:
    """Which (token, slot) pairs the sizing rule drops, computed directly: tokens padded to a multiple of the
    shard count and split into contiguous shards (shard s sits at expert-axis position s % n_dev); in each shard
    the pairs ordered by (expert, token, slot) keep the first C = min(m, ceil(c * m / E)) per destination."""
    n, k = ids.shape
    n_l = -(-n // n_shards)
    m = n_l * k
    cap = min(m, math.ceil(capacity * m / n_dev))
    e_l = CFG.n_routed_experts // n_dev
    dropped = np.zeros((n, k), bool)
    for s in range(n_shards):
        pairs = sorted((ids[t, j], t, j) for t in range(s * n_l, min(n, (s + 1) * n_l)) for j in range(k))
        for dest in range(n_dev):
            for _, t, j in [p for p in pairs if p[0] // e_l == dest][cap:]:
                dropped[t, j] = True
    return dropped


@pytest.mark.parametrize("exchange", ["all_to_all", "ragged_all_to_all"])
def test_small_capacity_drops_exactly_the_counted_pairs(exchange, monkeypatch):
    """capacity 0.5 on (data 2, expert 4): ep_dropped equals the independent count of pairs over the
    per-destination limit, and the output equals the dense MoE without exactly those pairs (and with all of them
    when the call sows no stats). The ragged path runs with ragged_all_to_all emulated to its documented
    semantics; it must drop the very same pairs."""
    if exchange == "ragged_all_to_all":
        monkeypatch.setattr(jax.lax, "ragged_all_to_all", _emulated_ragged_all_to_all)
        monkeypatch.setattr(expert_parallel, "default_exchange", lambda mesh: "ragged_all_to_all")
    y, tokens, _ = _inputs(seed=3, shape=(4, 10))
    ref = _moe(SCORE, moe_impl="dense")
    x = y.reshape(-1, CFG.dim)
    weights, ids, _ = ref.gate(x, tokens.reshape(-1))
    mesh = sharding.make_mesh(MESHES["data2_expert4"])
    drop = _dropped_pairs(np.asarray(ids), 8, 4, 0.5)
    ep = _moe(SCORE, moe_ep_capacity=0.5, moe_impl="expert_parallel")
    with jax.set_mesh(mesh):
        out = np.asarray(nnx.jit(lambda m, a, b: m(a, b))(ep, y, tokens)).reshape(x.shape)
    assert int(nnx.pop(ep, nnx.Intermediate)["ep_dropped"][-1]) == drop.sum() > 10

    @nnx.jit
    def want(ref, x, weights, ids):
        se = ref.shared_experts
        return ref._dense(x, weights, ids) + expert_ffn(x, dense(se.w1), dense(se.w2), dense(se.w3),
                                                        CFG.swiglu_limit, False)

    _assert_close(out, np.asarray(want(ref, x, jnp.where(jnp.asarray(drop), 0.0, weights), ids)))
    # Inference calls (no stats sown, so drops could not be reported) use the buffers that never drop.
    with jax.set_mesh(mesh):
        out = np.asarray(nnx.jit(lambda m, a, b: m(a, b, False))(ep, y, tokens)).reshape(x.shape)
    _assert_close(out, np.asarray(want(ref, x, weights, ids)))
    assert not _ragged_size_mismatches


_ragged_size_mismatches: list = []


def _emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                                axis_name):
    """jax.lax.ragged_all_to_all (one slice per peer) as its docstring specifies it, built from all_gather.
    Records any device whose recv_sizes disagree with what its peers send."""
    me = jax.lax.axis_index(axis_name)
    src = jax.lax.all_gather(operand, axis_name)  # [E, N, ...]
    src_off = jax.lax.all_gather(input_offsets, axis_name)[:, me]  # peer i's slice for me starts here in its operand
    dst_off = jax.lax.all_gather(output_offsets, axis_name)[:, me]  # ... and lands here in my output
    sent = jax.lax.all_gather(send_sizes, axis_name)[:, me]
    jax.debug.callback(lambda ok: None if ok else _ragged_size_mismatches.append(1), jnp.all(sent == recv_sizes))
    row = jnp.arange(output.shape[0])
    for i in range(src.shape[0]):
        inside = (row >= dst_off[i]) & (row < dst_off[i] + recv_sizes[i])
        take = jnp.clip(row - dst_off[i] + src_off[i], 0, operand.shape[0] - 1)
        output = jnp.where(inside.reshape((-1,) + (1,) * (output.ndim - 1)), src[i][take], output)
    return output


def test_real_ragged_all_to_all_lowers_with_gradients(monkeypatch):
    """The GPU/TPU path (real ragged_all_to_all) traces and lowers, forward and backward, on the CPU mesh (XLA:CPU
    only fails at compile time): four dispatches forward and their transposes backward."""
    monkeypatch.setattr(expert_parallel, "default_exchange", lambda mesh: "ragged_all_to_all")
    moe = _moe(SCORE, moe_impl="expert_parallel")
    y, tokens, ct = _inputs()
    graphdef, params, rest = nnx.split(moe, nnx.Param, ...)

    def loss(params, y):
        return jnp.sum(nnx.merge(graphdef, params, rest)(y, tokens, False) * ct)

    with jax.set_mesh(sharding.make_mesh(MESHES["data2_expert4"])):
        fwd = jax.jit(loss).lower(params, y).as_text()
        bwd = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, y).as_text()
    # Backward: the forward trips whose results it needs (rows, ids, weights; not the return trip, which is linear
    # in the loss) and the transposes of the three differentiable trips (rows, routing weights, return).
    assert fwd.count("ragged_all_to_all") == 4 and bwd.count("ragged_all_to_all") == 6


def test_qat_matches_single_device_ragged_and_bad_layouts_are_rejected():
    """qat's FP8 rounding is per row, so EP with qat equals the single-device ragged path; expert counts or
    tensor splits that cannot work, and capacities that are not positive, get a clear error."""
    for bad in (0, -1.0, "2"):
        with pytest.raises(ConfigError, match="moe_ep_capacity"):
            CFG.replace(moe_ep_capacity=bad)
    y, tokens, _ = _inputs()
    fwd = nnx.jit(lambda m, a, b: m(a, b, False))
    want = np.asarray(fwd(_moe(HASH, qat=True), y, tokens))
    with jax.set_mesh(sharding.make_mesh(MESHES["expert8"])):
        got = np.asarray(fwd(_moe(HASH, qat=True, moe_impl="expert_parallel"), y, tokens))
    _assert_close(got, want)
    for mesh, cfg, msg in (("fsdp2_expert2_tensor2", dict(qat=True), "qat blocks"),
                           ("expert8", dict(n_routed_experts=12), "do not split over the mesh's expert axis")):
        moe = _moe(HASH, **cfg, moe_impl="expert_parallel")
        with jax.set_mesh(sharding.make_mesh(MESHES[mesh])), pytest.raises(ValueError, match=msg):
            jax.eval_shape(lambda: moe(y, tokens, False))  # the check runs while tracing


def test_transformer_logits_under_expert_mesh_equal_single_device():
    """The tiny model (hash and score layers, shared experts) sharded by TRAIN_RULES and run under a
    (data 2, expert 4) mesh gives the single-device logits."""
    cfg = CFG
    ids = random_ids((2, 16), cfg.vocab_size, seed=5)
    want = np.asarray(nnx.jit(lambda m, i: m(i))(Transformer(cfg, rngs=nnx.Rngs(0)), ids))
    mesh = sharding.make_mesh(MESHES["data2_expert4"])
    model = Transformer(sharding.for_mesh(cfg, mesh), rngs=nnx.Rngs(0))  # the expert-parallel MoE
    model = sharding.shard_model(model, mesh, sharding.TRAIN_RULES)
    with jax.set_mesh(mesh):
        got = np.asarray(nnx.jit(lambda m, i: m(i))(model, ids))
    _assert_close(got, want)
