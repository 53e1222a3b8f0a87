"""The compiled CPU kernels (kernels/*/cpu_kernel.cc): built with the machine's C++ compiler on first use, loaded,
registered as XLA FFI targets, called through jax.ffi.

Needs x86-64 with AVX2 and FMA and a C++17 compiler (`$CXX`, default g++). A library is cached under
`$V4JAX_BUILD_DIR` (default ~/.cache/v4jax), named by a hash of its source, kernels/cpu_common.h, the flags and
the jax version (the FFI headers); it is written to a temporary file and renamed, so concurrent processes never
load a partial one. Where a kernel cannot be built, its op's `auto` runs the jnp reference (with a warning when
the host could run it but the build failed).
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

HERE = os.path.dirname(os.path.abspath(__file__))
FLAGS = ("-O3", "-std=c++17", "-mavx2", "-mfma", "-shared", "-fPIC")


def unsupported_cpu() -> str | None:
    """Why this host runs no compiled CPU kernel (not x86-64, or no AVX2 / FMA), or None."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the CPU kernels are x86-64 only (this is {platform.machine()})"
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return "cannot read /proc/cpuinfo to check for AVX2 and FMA"
    missing = [x for x in ("avx2", "fma") if x not in flags]
    return f"the CPU lacks {missing}" if missing else None


def build_dir() -> str:
    return os.environ.get("V4JAX_BUILD_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "v4jax")


def build(source: str, out_dir: str | None = None) -> str:
    """Compile `source` (a .cc beside its op) once per source, header, flags and jax version -> the shared
    library's path. A clear RuntimeError when the host cannot run it or the compiler is missing or fails."""
    why = unsupported_cpu()
    if why:
        raise RuntimeError(why + ": use implementation='reference'")
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"the CPU kernels need a C++17 compiler and {cxx!r} is not on PATH: install g++ (e.g. "
                           f"`apt-get install g++`) or set $CXX, or use implementation='reference'")
    digest = hashlib.sha256(repr((FLAGS, cxx, jax.__version__)).encode())
    for path in (source, os.path.join(HERE, "cpu_common.h")):
        with open(path, "rb") as f:
            digest.update(f.read())
    out_dir = out_dir or build_dir()
    name = os.path.basename(os.path.dirname(source))
    lib = os.path.join(out_dir, f"{name}_cpu_{digest.hexdigest()[:16]}.so")
    if os.path.exists(lib):
        return lib
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    cmd = [cxx, *FLAGS, "-I", HERE, "-I", jax.ffi.include_dir(), "-o", tmp, source]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        os.unlink(tmp)
        raise RuntimeError(f"building a CPU kernel failed ({' '.join(cmd)}):\n{p.stderr[-3000:]}")
    os.replace(tmp, lib)
    return lib


@functools.cache
def registered(source: str, targets: tuple[tuple[str, str], ...]) -> str | None:
    """Build and load `source` and register its handlers ((FFI target name, exported symbol), ...) once per
    process -> None, or why they are not available."""
    if unsupported_cpu():
        return unsupported_cpu()
    try:
        lib = ctypes.CDLL(build(source))
    except (RuntimeError, OSError) as e:
        warnings.warn(f"a CPU kernel is not available, the slower reference runs instead: {e}", stacklevel=3)
        return str(e)
    for name, symbol in targets:
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    return None
