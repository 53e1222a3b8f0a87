"""Shared test helpers: the released-layout fixture checkpoint and per-position relative errors."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
from pathlib import Path

# Eight CPU devices in every test process (before jax is imported): sharding tests build meshes over them;
# everything else runs on device 0 as usual.
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]).strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from flashlike_fixture import REF, write_flashlike  # noqa: E402
from v4jax.checkpoint import load_hub_state  # noqa: E402
from v4jax.config import ModelConfig  # noqa: E402
from v4jax.hub import dequantize_hub_state, load_hub_checkpoint  # noqa: E402
from v4jax.model import Transformer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# tests/kernels run the Pallas kernels interpreted (any backend); on a GPU, V4JAX_KERNEL_TEST_IMPL=pallas runs the
# same tests on the compiled kernels (scripts/gpu_check.sh).
KERNEL_IMPL = os.environ.get("V4JAX_KERNEL_TEST_IMPL", "pallas_interpret")
if KERNEL_IMPL not in ("pallas_interpret", "pallas"):
    raise ValueError(f"V4JAX_KERNEL_TEST_IMPL={KERNEL_IMPL!r}: use 'pallas_interpret' (default) or 'pallas' (GPU)")


def _write_fixture() -> Path:
    """The tiny Flash-like checkpoint in the released layout (tests/flashlike_fixture.py: the committed config,
    random weights of the references' seed), written once per test process (a fraction of a second) into a
    temporary folder that is removed when the process ends."""
    tmp = tempfile.mkdtemp(prefix="v4jax-flashlike-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    write_flashlike(os.path.join(tmp, "v4-tiny-flashlike"))
    return Path(tmp) / "v4-tiny-flashlike"


FIXTURE = _write_fixture()


MAPPINGS_BEFORE_CLEARING = 20_000  # of the kernel's default vm.max_map_count, 65,530


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """After a test module, drop jax's compiled programs if this process holds many memory mappings. Each XLA:CPU
    executable keeps ~9 until jax's caches let it go (measured: 200 small jitted functions added 1,855 mappings;
    three test modules, 19 tests, left 4,161, or 727 with clear_caches() after each), and a test worker that had
    compiled a few thousand programs reached the kernel's limit: 'Failed to materialize symbols' errors in unrelated
    tests, then an abort while compiling (a full run on 2 workers, 2026-12-06). Clearing only past a threshold keeps
    the programs that later modules reuse."""
    yield
    maps = Path("/proc/self/maps")
    if maps.exists() and sum(1 for _ in maps.open()) > MAPPINGS_BEFORE_CLEARING:
        jax.clear_caches()


def rel_err(a, b) -> np.ndarray:
    """||a - b|| / ||b|| over the last axis (per position)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)


@functools.lru_cache(maxsize=None)
def fixture_refs() -> dict:
    """What HF transformers and DeepSeek's official code computed from FIXTURE (tests/fixtures/flashlike/ref.npz,
    made by tests/oracle/make_flashlike_fixture.py; its docstring lists the arrays)."""
    return dict(np.load(REF))


@functools.lru_cache(maxsize=None)
def _fixture_state():
    return dequantize_hub_state(load_hub_checkpoint(FIXTURE))


def fixture_model(**overrides) -> Transformer:
    """The fixture checkpoint loaded into a fresh model (fp32 compute unless overridden)."""
    cfg = ModelConfig.from_hf_config(FIXTURE / "config.json", **{"compute_dtype": "float32", **overrides})
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    load_hub_state(model, _fixture_state())
    return model


@nnx.jit
def forward_hidden(model, ids):
    return model.hidden(ids)


@nnx.jit
def head_logits(model, x):
    return model.logits(x, model.hc_head, model.norm)


@nnx.jit
def mtp_logits(model, x, ids):
    return model.mtp_logits(x, ids)


def assert_grads_close(got: dict, ref: dict, tol: float = 1e-5):
    """Whole-gradient relative error <= tol, and every leaf within tol of the gradient's largest entry (a leaf
    whose exact gradient is ~0 by symmetry, e.g. the head collapse of identical streams, is rounding noise)."""
    assert got.keys() == ref.keys()
    diff = np.sqrt(sum(np.sum((got[k] - ref[k]) ** 2) for k in ref))
    norm = np.sqrt(sum(np.sum(ref[k] ** 2) for k in ref))
    assert diff <= tol * norm, (diff, norm)
    scale = max(np.max(np.abs(v)) for v in ref.values())
    worst = max(ref, key=lambda k: np.max(np.abs(got[k] - ref[k])))
    assert np.max(np.abs(got[worst] - ref[worst])) <= tol * scale, worst


def random_ids(shape, vocab, seed=0):
    return jax.numpy.asarray(np.random.default_rng(seed).integers(0, vocab, shape))


def export_for(f, args, platform):
    """jax.export for `platform` on this (CPU) machine: CUDA needs an abstract GPU for Pallas' Triton lowering
    (it reads the target's compute capability), and the Triton custom call carries no export stability
    guarantee, which is irrelevant here."""
    if platform == "tpu":
        return jax.export.export(jax.jit(f), platforms=["tpu"])(*args)
    dev = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=None, platform="gpu")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=dev)):
        return jax.export.export(jax.jit(f), platforms=["cuda"], disabled_checks=[
            jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
