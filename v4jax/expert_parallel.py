"""Expert parallelism for the DeepSeek-V4 MoE (architecture §3.5): the routed sum with the experts split over devices.

Layout (the usual EP one). Tokens are split over every token axis of the mesh (data, fsdp and expert), the routed
experts over `expert` in contiguous blocks of e_l = e / E (device j of the axis holds experts j*e_l .. j*e_l+e_l-1),
the expert hidden f over `tensor` (tokens are replicated there; each tensor rank runs the same exchange on its
slice of f and the partial outputs are summed). Within one (data, fsdp) group the E devices of the expert axis
exchange tokens; groups are independent. Per device, inside a jax.shard_map:

  1. sort the local (token, slot) pairs by expert id; a pair goes to device expert_id // e_l;
  2. dispatch: at most C pairs from each source to each destination device (the capacity, below); the rest are
     dropped and counted, never silently;
  3. on the receiver: sort the received rows by local expert and run the same grouped SwiGLU as the single-device
     "ragged" path (experts.grouped_ffn: ragged_dot, routing weight before w2, qat's FP8 fake-quant at the same points);
  4. combine: send the results back (in the compute dtype), sum them at their tokens in fp32, psum over `tensor`.

Collectives: `jax.lax.ragged_all_to_all` on GPU and TPU (sends only the rows that exist, packed per receiver into a
buffer of E*C rows); `jax.lax.all_to_all` of padded [E, C] buffers on CPU (XLA:CPU has no ragged all-to-all).
Both apply the same capacity to the same sorted order, so they drop exactly the same pairs.

Capacity: with m = n_l * k pairs per device (n_l local tokens, k slots), C = min(m, ceil(c * m / E)) where
c = cfg.moe_ep_capacity is the multiple of the balanced share m / E. c = None gives C = m: a source never has
more than m pairs for one device, so nothing can drop (the default). Letters as in moe.py; E expert-axis size.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from v4jax.config import ModelConfig
from v4jax.experts import grouped_ffn
from v4jax.sharding import active_rules

TOKEN_AXES = ("data", "fsdp", "expert")  # mesh axes that split tokens; `tensor` replicates them


def capacity_rows(m: int, n_dev: int, capacity: float | None) -> int:
    """C: rows one device may send to one device of the expert axis (see the module docstring)."""
    return m if capacity is None else max(1, min(m, math.ceil(capacity * m / n_dev)))


def default_exchange(mesh) -> str:
    """The dispatch collective for the mesh's platform: XLA:CPU lacks ragged all-to-all."""
    return "all_to_all" if mesh.abstract_device.platform == "cpu" else "ragged_all_to_all"


def ep_routed(x: jax.Array, weights: jax.Array, ids: jax.Array, w1: jax.Array, w2: jax.Array, w3: jax.Array,
              cfg: ModelConfig, mesh, capacity: float | None):
    """The routed sum over `mesh` (an abstract mesh with an `expert` axis).

    x [n, d] tokens, weights / ids [n, k] the gate's routing, w1 / w3 [e, f, d] and w2 [e, d, f] (dense arrays)
    -> (out [n, d] fp32, dropped: the number of (token, slot) pairs that did not fit, int32 scalar).
    capacity: the multiple c of the module docstring (None: never drop).
    """
    names = mesh.axis_names
    n_dev = mesh.shape["expert"]
    e, f = w1.shape[0], w1.shape[1]
    tensor = "tensor" if "tensor" in names else None
    n_tp = mesh.shape[tensor] if tensor else 1
    if e % n_dev:
        raise ValueError(f"expert parallelism: {e} routed experts do not split over the mesh's expert axis of "
                         f"size {n_dev}; make the expert axis size divide n_routed_experts")
    if f % n_tp or (cfg.qat and (f // n_tp) % 128):
        raise ValueError(f"expert parallelism: expert hidden {f} does not split over the tensor axis of size {n_tp}"
                         f"{' into multiples of the 128-wide qat blocks' if cfg.qat else ''}; change the tensor "
                         "axis size")
    token_axes = tuple(a for a in TOKEN_AXES if a in names)
    n_shards = math.prod(mesh.shape[a] for a in token_axes)
    n = x.shape[0]
    pad = -n % n_shards  # padded pairs carry the expert id e: no device holds it, so they go nowhere
    if pad:
        x = jnp.pad(x, ((0, pad), (0, 0)))
        weights = jnp.pad(weights, ((0, pad), (0, 0)))
        ids = jnp.pad(ids, ((0, pad), (0, 0)), constant_values=e)
    m = (n + pad) // n_shards * ids.shape[1]
    cap = capacity_rows(m, n_dev, capacity)
    exchange = default_exchange(mesh)

    # FSDP: the weights come in as they are stored (their model dim over the axis the rules give `expert_embed`)
    # and are gathered inside, in the compute dtype; under remat the gather is recomputed in the backward pass
    # and its transpose reduce-scatters the gradient (no full-size fp32 weight or gradient per device).
    embed = (active_rules() or {}).get("expert_embed")
    fsdp = embed if embed in names and embed not in ("expert", tensor) else None
    w1, w2, w3 = (w.astype(x.dtype) for w in (w1, w2, w3))

    def local(x, weights, ids, w1, w2, w3):
        if fsdp:  # the barrier ties the gathers to this layer's tokens: schedulers cannot hoist them all up front
            x, w1, w2, w3 = jax.lax.optimization_barrier((x, w1, w2, w3))
            w1, w3 = (jax.lax.all_gather(w, fsdp, axis=2, tiled=True) for w in (w1, w3))
            w2 = jax.lax.all_gather(w2, fsdp, axis=1, tiled=True)
        out, dropped = _local_step(x, weights, ids, w1, w2, w3, cfg, n_dev, cap, exchange)
        if tensor:  # each tensor rank summed over its slice of f
            out = jax.lax.psum(out, tensor)
        return out, jax.lax.psum(dropped, token_axes)

    tok = P(token_axes, None)
    w_in, w_out = P("expert", tensor, fsdp), P("expert", fsdp, tensor)
    out, dropped = jax.shard_map(local, mesh=mesh, in_specs=(tok, tok, tok, w_in, w_out, w_in),
                                 out_specs=(tok, P()))(x, weights, ids, w1, w2, w3)
    return out[:n], dropped


def _local_step(x, weights, ids, w1, w2, w3, cfg: ModelConfig, n_dev: int, cap: int, exchange: str):
    """One device: x [n_l, d], weights / ids [n_l, k], its experts w1 / w3 [e_l, f_l, d], w2 [e_l, d, f_l]
    -> (its tokens' routed sum [n_l, d] fp32, partial over f if f is split; pairs it dropped)."""
    n_l, d = x.shape
    k = ids.shape[1]
    m, e_l = n_l * k, w1.shape[0]
    order = jnp.argsort(ids.reshape(-1), stable=True)  # pairs by expert: grouped by destination, then expert
    eid = ids.reshape(-1)[order]
    dest = eid // e_l  # n_dev for padding pairs
    token = order // k
    counts = jnp.zeros(n_dev + 1, jnp.int32).at[dest].add(1)  # [E + 1]: pairs per destination, padding last
    start = jnp.cumsum(counts) - counts
    rank = jnp.arange(m) - start[dest]  # position of the pair within its destination's group
    keep = (dest < n_dev) & (rank < cap)
    dropped = jnp.sum((dest < n_dev) & (rank >= cap)).astype(jnp.int32)
    local_id = jnp.where(keep, eid - dest * e_l, e_l)  # e_l marks "no expert" (dropped or padding)
    args = (x[token], local_id, weights.reshape(-1)[order], w1, w2, w3, cfg, n_dev, cap)
    if exchange == "all_to_all":
        back = _exchange_padded(*args, dest=dest, rank=rank, keep=keep)
    else:
        back = _exchange_ragged(*args, counts=jnp.minimum(counts[:n_dev], cap), start=start[:n_dev])
    # back [m, d]: each sorted pair's weighted expert output, zero where dropped
    out = jnp.zeros((n_l, d), jnp.float32).at[token].add(back.astype(jnp.float32))
    return out, dropped


def _experts_on_rows(rows, local_id, route_w, w1, w2, w3, cfg: ModelConfig):
    """Received rows [r, d] with local expert ids [r] (e_l = empty row) and routing weights [r] -> the weighted
    expert outputs [r, d] in the rows' order (zero at empty rows), in the rows' dtype for the return trip."""
    e_l = w1.shape[0]
    order = jnp.argsort(local_id, stable=True)  # empty rows sort last, past every group
    sizes = jnp.zeros(e_l + 1, jnp.int32).at[local_id].add(1)[:e_l]
    out = grouped_ffn(rows[order], sizes, route_w[order], w1, w2, w3, cfg.swiglu_limit, cfg.qat)
    out = jnp.where((local_id[order] < e_l)[:, None], out, 0.0)  # rows past the groups are unspecified on GPU
    return jnp.zeros(out.shape, rows.dtype).at[order].set(out.astype(rows.dtype))


def _exchange_padded(xs, local_id, route_w, w1, w2, w3, cfg, n_dev, cap, *, dest, rank, keep):
    """all_to_all of fixed [E, C] buffers: pair p sits in row dest * C + rank of the send buffer."""
    e_l = w1.shape[0]
    slot = jnp.where(keep, dest * cap + rank, n_dev * cap)  # out of range for dropped pairs: mode="drop"
    rows = n_dev * cap

    def a2a(v):  # source-major blocks of C rows: block i of the result came from device i
        return jax.lax.all_to_all(v, "expert", 0, 0, tiled=True)

    send_x = jnp.zeros((rows, xs.shape[1]), xs.dtype).at[slot].set(xs, mode="drop")
    send_id = jnp.full((rows,), e_l, jnp.int32).at[slot].set(local_id, mode="drop")
    send_w = jnp.zeros((rows,), route_w.dtype).at[slot].set(route_w, mode="drop")
    out = _experts_on_rows(a2a(send_x), a2a(send_id), a2a(send_w), w1, w2, w3, cfg)
    back = a2a(out)  # back in this device's send layout
    return jnp.where(keep[:, None], back[jnp.minimum(slot, rows - 1)], 0)


def _exchange_ragged(xs, local_id, route_w, w1, w2, w3, cfg, n_dev, cap, *, counts, start):
    """ragged_all_to_all: this device's kept pairs for device j are rows start[j] .. start[j] + counts[j] of the
    sorted xs; on the receiver, source i's rows follow those of sources 0 .. i-1 (a buffer of E * C rows)."""
    e_l = w1.shape[0]
    me = jax.lax.axis_index("expert")
    sent = jax.lax.all_gather(counts, "expert")  # [E source, E destination] rows sent
    offs = jax.lax.all_gather(start, "expert")  # [E, E] where those rows start in each source's sorted pairs
    at_recv = jnp.cumsum(sent, axis=0) - sent  # [E, E] where source i's rows land on receiver j
    rows = n_dev * cap

    def dispatch(v, fill):
        buf = jnp.full((rows,) + v.shape[1:], fill, v.dtype)
        return jax.lax.ragged_all_to_all(v, buf, start, counts, at_recv[me], sent[:, me], axis_name="expert")

    out = _experts_on_rows(dispatch(xs, 0), dispatch(local_id, e_l), dispatch(route_w, 0), w1, w2, w3, cfg)
    # The reverse trip: the rows of source i (at at_recv[i, me] here) go back to offs[i, me] on device i.
    buf = jnp.zeros(xs.shape, out.dtype)  # unwritten rows (dropped pairs) stay zero
    return jax.lax.ragged_all_to_all(out, buf, at_recv[:, me], sent[:, me], offs[:, me], counts, axis_name="expert")
