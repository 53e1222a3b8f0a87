"""The CPU lightning-indexer kernel (cpu_kernel.cc: scores and top-k of a few query rows, read straight from the
stored key format) built with the machine's C++ compiler on first use, registered as an XLA FFI target and
called through jax.ffi. Used where `indexer_topk` runs the reference on a CPU for a decode-shaped query
(reference.few_query_rows) outside the batch-invariant mode; the math and the picks are reference.py's.

Why a compiled kernel: XLA:CPU decodes every span of packed keys to memory and reads it back before the score dot,
and sorts each span into the running top-k, so a decode step over FP4 keys read several times the bytes the
format stores and ran slower than over BF16 keys (docs/inference.md). The kernel reads each stored key once.

Needs x86-64 with AVX2 and FMA, and a C++17 compiler (`$CXX`, default g++). The shared library is cached under
`$V4JAX_BUILD_DIR` (default ~/.cache/v4jax), named by a hash of the source, the flags and the jax version;
it is written to a temporary file and renamed, so concurrent processes never load a partial one.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_kernel.cc")
TARGET = "v4jax_indexer_topk"
FLAGS = ("-O3", "-std=c++17", "-mavx2", "-mfma", "-shared", "-fPIC")
F32, BF16, FP8, FP4 = range(4)  # cpu_kernel.cc's key formats
DIM_MULTIPLE = {F32: 8, BF16: 16, FP8: 8, FP4: 64}


def unsupported_cpu() -> str | None:
    """Why this host has no kernel (not x86-64, or no AVX2 / FMA), or None."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the CPU indexer kernel is x86-64 only (this is {platform.machine()})"
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return "cannot read /proc/cpuinfo to check for AVX2 and FMA"
    missing = [x for x in ("avx2", "fma") if x not in flags]
    return f"the CPU lacks {missing}" if missing else None


def build_dir() -> str:
    return os.environ.get("V4JAX_BUILD_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "v4jax")


def build(out_dir: str | None = None) -> str:
    """Compile cpu_kernel.cc (once per source, flags and jax version) -> the shared library's path. A clear
    RuntimeError when the host cannot run it or the compiler is missing or fails."""
    why = unsupported_cpu()
    if why:
        raise RuntimeError(why + ": use implementation='reference'")
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"the CPU indexer kernel needs a C++17 compiler and {cxx!r} is not on PATH: install g++ "
                           f"(e.g. `apt-get install g++`) or set $CXX, or use implementation='reference'")
    with open(SOURCE, "rb") as f:
        src = f.read()
    tag = hashlib.sha256(src + repr((FLAGS, cxx, jax.__version__)).encode()).hexdigest()[:16]
    out_dir = out_dir or build_dir()
    lib = os.path.join(out_dir, f"indexer_cpu_{tag}.so")
    if os.path.exists(lib):
        return lib
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    cmd = [cxx, *FLAGS, "-I", jax.ffi.include_dir(), "-o", tmp, SOURCE]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        os.unlink(tmp)
        raise RuntimeError(f"building the CPU indexer kernel failed ({' '.join(cmd)}):\n{p.stderr[-3000:]}")
    os.replace(tmp, lib)
    return lib


@functools.cache
def _registered() -> str | None:
    """Build, load and register the kernel once per process -> None, or why it is not available."""
    if unsupported_cpu():
        return unsupported_cpu()
    try:
        lib = ctypes.CDLL(build())
    except (RuntimeError, OSError) as e:
        warnings.warn(f"the CPU indexer kernel is not available, the slower reference runs instead: {e}",
                      stacklevel=3)
        return str(e)
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.V4jaxIndexerTopk), platform="cpu")
    return None


def key_format(keys) -> tuple[int, jax.Array, jax.Array] | None:
    """keys (array or kv_cache format) -> (format code, codes [b, n, .], scales [b, n, .]), or None if the
    kernel does not read this format."""
    name = type(keys).__name__
    if name == "Fp4Keys":
        return FP4, keys.packed, keys.scale
    if name == "Fp8Keys":
        return FP8, keys.q, keys.scale
    if isinstance(keys, jax.Array) and keys.dtype in (jnp.float32, jnp.bfloat16):
        code = F32 if keys.dtype == jnp.float32 else BF16
        return code, keys, jnp.zeros((1,), jnp.float32)
    return None


def usable(q: jax.Array, keys, dtype) -> bool:
    """Whether `indexer_topk` can run these operands here: a known key format, q's dim a multiple of the
    format's vector width, scores rounded to fp32 or bf16, and the kernel built on this host."""
    fmt = key_format(keys)
    if fmt is None or q.shape[-1] % DIM_MULTIPLE[fmt[0]] or jnp.dtype(dtype) not in (jnp.float32, jnp.bfloat16):
        return False
    return _registered() is None


def indexer_topk(q: jax.Array, w: jax.Array, keys, lo: jax.Array, hi: jax.Array, k: int, dtype):
    """reference.indexer_topk's contract (scores in fp32 with another order of additions) for the operands
    `usable` accepts."""
    if _registered() is not None:
        raise RuntimeError(_registered())
    fmt, codes, scales = key_format(keys)
    b, s = lo.shape
    out = (jax.ShapeDtypeStruct((b, s, k), jnp.int32), jax.ShapeDtypeStruct((b, s, k), jnp.float32))
    call = jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")
    args = [jax.lax.stop_gradient(a) for a in (q.astype(jnp.float32), w.astype(jnp.float32), codes, scales)]
    return call(*args, lo.astype(jnp.int32), hi.astype(jnp.int32), fmt=np.int64(fmt),
                bf16_scores=jnp.dtype(dtype) == jnp.bfloat16)
