"""Logical axis names -> mesh axes (DESIGN.md "Sharding"; issue 7).

Every parameter names its logical axes (see the `param(...)` calls in the model); layer code never names a
mesh axis. A rule set maps each logical name to a mesh axis (`data`, `fsdp`, `expert`, `tensor`), a tuple of
them, or None (replicated). Two presets:

- TRAIN: FSDP (the model dim of every weight over `fsdp` and `expert`, or another dim where it has none; the
  routed experts' over `fsdp`), experts over `expert`, attention heads / output groups / indexer heads / expert
  hidden / vocab over `tensor`; the batch over data, fsdp and expert (the expert axis is a data-parallel axis
  for everything but the routed experts).
- DECODE: no FSDP (weights stay resident, sharded over tensor and expert), sequences over `data`.

Activations are constrained only at block boundaries (`constrain`, a no-op outside `use_rules`). On one device
every rule resolves to a trivial sharding, so the same code runs unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import jax
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from v4jax.config import ModelConfig

MESH_AXES = ("data", "fsdp", "expert", "tensor")

Rules = dict[str, "str | tuple[str, ...] | None"]

# FSDP takes the model dim where a weight has one, else another dim that no other rule of that array uses
# (the query up-projections' rows: heads x head dim; the output groups' input; the mHC maps' input), over
# `fsdp` and `expert`: every device holds a slice of each weight, but the routed experts' model dim
# (`expert_embed`) goes over `fsdp` alone (`expert` holds their expert dim). Activation names (used by
# `constrain`): batch, seq (None: room for context parallelism), act_embed.
FSDP = ("fsdp", "expert")
TRAIN_RULES: Rules = {
    "vocab": "tensor", "embed": FSDP, "expert_embed": "fsdp", "heads": "tensor", "q_rows": ("tensor", *FSDP),
    "index_heads": "tensor", "index_q_rows": ("tensor", *FSDP), "o_groups": "tensor", "o_group_in": FSDP,
    "hc_embed": FSDP, "experts": "expert", "expert_ffw": "tensor", "ffw": "tensor", "mtp": "tensor",
    "batch": ("data", "fsdp", "expert"), "seq": None, "act_embed": None,
}


def _without_fsdp(rule):
    kept = tuple(a for a in ((rule,) if isinstance(rule, str) else rule or ()) if a not in FSDP)
    return kept[0] if len(kept) == 1 else (kept or None)


# Decoding: no FSDP (weights resident), routed experts over `expert`, sequences over `data`.
DECODE_RULES: Rules = {**{k: _without_fsdp(v) for k, v in TRAIN_RULES.items()}, "experts": "expert", "batch": "data"}
PRESETS = {"train": TRAIN_RULES, "decode": DECODE_RULES}


# ---- meshes --------------------------------------------------------------------------------------------------

def mesh_shape(config: dict[str, int], n_devices: int) -> dict[str, int]:
    """Resolve a mesh config {axis: size} (missing axes 1, at most one -1 = the devices left over) for
    n_devices; rejects unknown axes and sizes that do not multiply to n_devices."""
    unknown = sorted(set(config) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh axes {unknown} are unknown: use {MESH_AXES}")
    sizes = {a: int(config.get(a, 1)) for a in MESH_AXES}
    free = [a for a, s in sizes.items() if s == -1]
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if len(free) > 1 or any(s == 0 or s < -1 for s in sizes.values()):
        raise ValueError(f"mesh {sizes}: sizes must be positive, with at most one -1 (the devices left over)")
    if free:
        if n_devices % fixed:
            raise ValueError(f"mesh {sizes}: {n_devices} devices do not divide by the fixed axes' {fixed}")
        sizes[free[0]] = n_devices // fixed
    if math.prod(sizes.values()) != n_devices:
        raise ValueError(f"mesh shape {sizes} needs {math.prod(sizes.values())} devices, got {n_devices}: "
                         "make the axis sizes multiply to the device count")
    return sizes


def make_mesh(shape: dict[str, int] | None = None, devices=None, dcn: dict[str, int] | None = None
              ) -> jax.sharding.Mesh:
    """A mesh over MESH_AXES (missing axes get size 1, one -1 takes the rest); by default every device on `data`.

    Multi-host / multi-slice: `dcn` {axis: n} splits each axis into n groups across slices (or processes,
    where devices carry no slice index), so only those axes communicate over the data-centre network; the
    axis sizes in `shape` are the totals. Typically dcn = {"data": n_slices} (gradient all-reduce only).
    """
    devices = list(devices if devices is not None else jax.devices())
    sizes = mesh_shape({"data": -1} if shape is None else shape, len(devices))
    types = (AxisType.Auto,) * len(MESH_AXES)
    if not dcn or math.prod(dcn.values()) == 1:
        try:
            return jax.make_mesh(tuple(sizes.values()), MESH_AXES, axis_types=types, devices=devices)
        except NotImplementedError:  # a shape that does not map onto a TPU torus axis by axis: split its axes
            arr = mesh_utils.create_device_mesh(tuple(sizes.values()), devices, allow_split_physical_axes=True)
            return jax.sharding.Mesh(arr, MESH_AXES, axis_types=types)
    dcn_sizes = {a: int(dcn.get(a, 1)) for a in MESH_AXES}
    if set(dcn) - set(MESH_AXES) or any(sizes[a] % dcn_sizes[a] for a in MESH_AXES):
        raise ValueError(f"dcn {dcn} must name mesh axes {MESH_AXES} and divide their sizes {sizes}")
    ici = [sizes[a] // dcn_sizes[a] for a in MESH_AXES]
    granule = not hasattr(devices[0], "slice_index")  # GPUs / CPUs: one granule per process
    arr = mesh_utils.create_hybrid_device_mesh(ici, list(dcn_sizes.values()), devices, process_is_granule=granule)
    return jax.sharding.Mesh(arr, MESH_AXES, axis_types=types)


# ---- rules -> specs ------------------------------------------------------------------------------------------

def logical_to_spec(axes: tuple[str | None, ...], rules: Rules) -> PartitionSpec:
    """PartitionSpec for one array; rejects two of its logical axes landing on the same mesh axis."""
    mesh_axes = [rules.get(a) if a is not None else None for a in axes]
    used = [m for entry in mesh_axes if entry is not None for m in ((entry,) if isinstance(entry, str) else entry)]
    if len(used) != len(set(used)):
        raise ValueError(f"sharding rules map two logical axes of {axes} to one mesh axis ({mesh_axes}): "
                         "change the rules so each mesh axis appears once per array")
    return PartitionSpec(*mesh_axes)


def logical_axes(var: nnx.Variable) -> tuple[str | None, ...]:
    """The logical axis names a variable was created with (flax renamed the metadata key across versions)."""
    md = var.get_metadata()
    names = md.get("out_sharding") or md.get("sharding_names") or md.get("sharding")
    if names is None or len(names) != var.ndim:
        raise ValueError(f"a {type(var).__name__} of shape {var.shape} has no logical axis names: "
                         "create it with v4jax.layers.param(...)")
    return tuple(names)


def model_specs(model: nnx.Module, rules: Rules, *filters):
    """The PartitionSpec pytree of the model's state (or of its variables that match `filters`, as nnx.state
    takes them), from each variable's logical axis names."""
    return jax.tree.map(lambda v: logical_to_spec(logical_axes(v), rules), nnx.state(model, *filters),
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def flat_specs(model: nnx.Module, rules: Rules) -> dict[str, list]:
    """{dotted variable path: spec as a list (None, a mesh axis or a list of them)}: the golden-file format."""
    def entry(e):
        return list(e) if isinstance(e, tuple) else e

    flat = nnx.to_flat_state(nnx.state(model))
    return {".".join(map(str, p)): [entry(e) for e in logical_to_spec(logical_axes(v), rules)] for p, v in flat}


def shard_model(model: nnx.Module, mesh: jax.sharding.Mesh, rules: Rules, *filters) -> nnx.Module:
    """Place the model's state (or the variables that match `filters`, e.g. lora.LoraParam) on `mesh` by the
    rules (in place); returns the model."""
    specs = model_specs(model, rules, *filters)
    state = nnx.state(model, *filters)
    sharded = jax.tree.map(lambda v, s: jax.device_put(v[...], NamedSharding(mesh, s)), state, specs,
                           is_leaf=lambda x: isinstance(x, nnx.Variable))
    nnx.update(model, sharded)
    return model


def for_mesh(cfg: ModelConfig, mesh: jax.sharding.Mesh) -> ModelConfig:
    """cfg as a run on `mesh` uses it: on more than one device the grouped MoE ("ragged") becomes
    "expert_parallel" (each device dispatches its own tokens). The one place where the mesh picks a code path."""
    return cfg.replace(moe_impl="expert_parallel") if cfg.moe_impl == "ragged" and mesh.size > 1 else cfg


def batch_sharding(mesh: jax.sharding.Mesh, rules: Rules, ndim: int, lead: int = 0) -> NamedSharding:
    """Sharding of an array whose axis `lead` is the batch (token ids, cache leaves): batch by the rules."""
    return NamedSharding(mesh, logical_to_spec((None,) * lead + ("batch",) + (None,) * (ndim - lead - 1), rules))


def train_batch_sharding(mesh: jax.sharding.Mesh, rules: Rules) -> NamedSharding:
    """The global training batch [micro-batches, rows, L+1]: rows by the rules' `batch` axis. train.pretrain
    places its batches so and train.plan plans that layout: the one definition both use."""
    return batch_sharding(mesh, rules, 3, lead=1)


def follow_params(tree, params):
    """Shardings for an optimizer state (`tree`, arrays or ShapeDtypeStructs): each array takes the sharding of
    the parameter whose path is a suffix of its own and whose shape it has (moments); the rest (step counters)
    is replicated. For `jax.jit(tx.init, out_shardings=follow_params(jax.eval_shape(tx.init, params), params))`:
    without it the moments, made by jnp.zeros, come out replicated on every device."""
    by_path = {tuple(map(str, p)): x for p, x in jax.tree_util.tree_leaves_with_path(params)}
    mesh = next(iter(by_path.values())).sharding.mesh

    def place(path, x):
        keys = tuple(map(str, path))
        owner = next((by_path[keys[i:]] for i in range(len(keys)) if keys[i:] in by_path), None)
        return owner.sharding if owner is not None and owner.shape == x.shape else NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map_with_path(place, tree)


# ---- activation constraints ----------------------------------------------------------------------------------

_RULES: contextvars.ContextVar[Rules | None] = contextvars.ContextVar("v4jax_sharding_rules", default=None)


@contextlib.contextmanager
def use_rules(mesh: jax.sharding.Mesh, rules: Rules):
    """Within: `mesh` is the current mesh and `constrain` applies `rules`. Rules are read when a function is
    traced, so trace (first call of a jitted function) inside the block."""
    token = _RULES.set(rules)
    try:
        with jax.set_mesh(mesh):
            yield
    finally:
        _RULES.reset(token)


def active_rules() -> Rules | None:
    """The rules of the enclosing `use_rules` block (None outside one)."""
    return _RULES.get()


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """Constrain activation x to the sharding its logical axes get under the active rules (no-op without)."""
    rules = _RULES.get()
    if rules is None:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, rules))

