"""Logical axis names -> mesh axes.

Every parameter names its logical axes (see the `param(...)` calls in the model); layer code never names a
mesh axis. A rule set maps each logical name to a mesh axis (`data`, `fsdp`, `expert`, `tensor`) or None
(replicated). Two presets: TRAIN (FSDP over the model dim, experts over `expert`, heads / expert hidden over
`tensor`) and DECODE (no FSDP: weights stay resident, sharded over tensor and expert). On one device every
rule resolves to a trivial sharding, so the same code runs unchanged.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "expert", "tensor")

TRAIN_RULES: dict[str, str | None] = {
    "vocab": "tensor", "embed": "fsdp", "heads": "tensor", "index_heads": "tensor", "o_groups": "tensor",
    "experts": "expert", "expert_ffw": "tensor", "ffw": "tensor", "mtp": "tensor",
}
DECODE_RULES: dict[str, str | None] = {**TRAIN_RULES, "embed": None}


def make_mesh(shape: dict[str, int] | None = None, devices=None) -> jax.sharding.Mesh:
    """A mesh over MESH_AXES (missing axes get size 1); by default every device on `data`."""
    devices = devices if devices is not None else jax.devices()
    shape = {"data": len(devices)} if shape is None else shape
    sizes = tuple(shape.get(a, 1) for a in MESH_AXES)
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh shape {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                         f"got {len(devices)}: make the axis sizes multiply to the device count")
    return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_to_spec(axes: tuple[str | None, ...], rules: dict[str, str | None]) -> PartitionSpec:
    """PartitionSpec for one array; rejects two of its logical axes landing on the same mesh axis."""
    mesh_axes = [rules.get(a) if a is not None else None for a in axes]
    used = [m for m in mesh_axes if m is not None]
    if len(used) != len(set(used)):
        raise ValueError(f"sharding rules map two logical axes of {axes} to one mesh axis ({mesh_axes}): "
                         "change the rules so each mesh axis appears once per array")
    return PartitionSpec(*mesh_axes)


def model_specs(model: nnx.Module, rules: dict[str, str | None]):
    """The PartitionSpec pytree of the model's state, from each variable's logical axis names."""
    def spec(var):
        md = var.get_metadata()  # flax renamed the key across versions
        names = md.get("out_sharding") or md.get("sharding_names") or md.get("sharding")
        if names is None or len(names) != var.ndim:
            raise ValueError(f"a {type(var).__name__} of shape {var.shape} has no logical axis names: "
                             "create it with v4jax.layers.param(...)")
        return logical_to_spec(tuple(names), rules)

    return jax.tree.map(spec, nnx.state(model), is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: jax.sharding.Mesh, rules: dict[str, str | None]) -> nnx.Module:
    """Place the model's state on `mesh` by the rules (in place); returns the model."""
    specs = model_specs(model, rules)
    state = nnx.state(model)
    sharded = jax.tree.map(lambda v, s: jax.device_put(v[...], NamedSharding(mesh, s)), state, specs,
                           is_leaf=lambda x: isinstance(x, nnx.Variable))
    nnx.update(model, sharded)
    return model
