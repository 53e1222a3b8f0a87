"""Kernels for V4's hot spots, one folder per op: reference.py (pure jnp: the spec, the CPU path, the oracle)
beside Pallas kernels, and the public op in the folder's __init__.py. `resolve` is how every op reads its
`implementation` argument (ModelConfig.kernels' values)."""

from __future__ import annotations

import jax

IMPLEMENTATIONS = ("auto", "pallas", "pallas_interpret", "reference")


def resolve(op: str, implementation: str | None, backends: tuple[str, ...], extra: tuple[str, ...] = ()) -> str:
    """implementation -> what runs: "reference", "pallas" (compiled for jax.default_backend(), one of
    `backends`), "pallas_interpret", or one of the op's `extra` choices. None / "auto" is Pallas where the
    backend has the kernel, else the reference."""
    impl, backend = implementation or "auto", jax.default_backend()
    if impl not in IMPLEMENTATIONS + extra:
        raise ValueError(f"{op} implementation {implementation!r} is unknown: use one of {IMPLEMENTATIONS + extra} "
                         "(or None for 'auto')")
    if impl == "auto":
        impl = "pallas" if backend in backends else "reference"
    if impl == "pallas" and backend not in backends:
        raise ValueError(f"no compiled Pallas {op} kernel for backend {backend!r} (only {backends}): use "
                         "implementation='auto' or 'reference', or 'pallas_interpret' to run it interpreted")
    return impl
