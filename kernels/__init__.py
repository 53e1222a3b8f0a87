"""Kernels for V4's hot spots, one folder per op: reference.py (pure jnp: the spec, the CPU path, the oracle)
beside Pallas kernels, and the public op in the folder's __init__.py. `resolve` is how every op reads its
`implementation` argument (ModelConfig.kernels' values)."""

from __future__ import annotations

import jax

IMPLEMENTATIONS = ("auto", "pallas", "pallas_interpret", "reference")


def target_platform() -> str:
    """The platform being compiled for: the current mesh's devices' (jax.set_mesh), else jax.default_backend().
    They differ when a step is compiled ahead of time for devices this host does not have (train.plan on a
    TPU topology)."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    return device.platform if device is not None else jax.default_backend()


def per_batch_shard(fn, batched: tuple, replicated: tuple = ()):
    """fn(*batched, *replicated) on each device's share of the batch (dim 0 of every `batched` arg and of every
    output) under a multi-device mesh: XLA cannot partition a Pallas call, so a kernel runs inside shard_map on
    local shapes. The batch goes over the axes the sharding rules give `batch` (default data, fsdp, expert),
    as many of them, in order, as divide it; everything else is replicated. Without a mesh: fn(*args)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn(*batched, *replicated)
    from jax.sharding import PartitionSpec as P

    from v4jax.sharding import active_rules
    rule = (active_rules() or {}).get("batch", ("data", "fsdp", "expert"))
    axes, n = [], 1
    for a in (rule,) if isinstance(rule, str) else rule or ():
        if a in mesh.axis_names and batched[0].shape[0] % (n * mesh.shape[a]) == 0:
            axes, n = axes + [a], n * mesh.shape[a]
    spec = P(tuple(axes)) if axes else P()
    in_specs = (spec,) * len(batched) + (P(),) * len(replicated)
    out_shape = jax.eval_shape(fn, *batched, *replicated)
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=jax.tree.map(lambda _: spec, out_shape),
                         check_vma=False)(*batched, *replicated)


def resolve(op: str, implementation: str | None, backends: tuple[str, ...], extra: tuple[str, ...] = ()) -> str:
    """implementation -> what runs: "reference", "pallas" (compiled for target_platform(), one of
    `backends`), "pallas_interpret", or one of the op's `extra` choices. None / "auto" is Pallas where the
    backend has the kernel, else the reference."""
    impl, backend = implementation or "auto", target_platform()
    if impl not in IMPLEMENTATIONS + extra:
        raise ValueError(f"{op} implementation {implementation!r} is unknown: use one of {IMPLEMENTATIONS + extra} "
                         "(or None for 'auto')")
    if impl == "auto":
        impl = "pallas" if backend in backends else "reference"
    if impl == "pallas" and backend not in backends:
        raise ValueError(f"no compiled Pallas {op} kernel for backend {backend!r} (only {backends}): use "
                         "implementation='auto' or 'reference', or 'pallas_interpret' to run it interpreted")
    return impl
