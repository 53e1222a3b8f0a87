"""Cache storage formats (architecture §4.2) and cache size (architecture §4.3, performance.md §1.2)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from test_decode import _model
from v4jax import cost, kv_cache
from v4jax.attention import kv_fake_quant
from v4jax.config import ModelConfig
from v4jax.formats import e2m1_to_f32, e4m3_decode, mxfp4_decode
from v4jax.hub import E2M1_VALUES
from v4jax.model import Transformer
from v4jax.quant import hadamard, mxfp4_fake_quant


def _bits(a) -> np.ndarray:
    return np.asarray(a, np.float32).view(np.uint32)


def _values(shape, seed=0) -> jax.Array:
    """Normal values with every row at its own magnitude (2^-17 .. 2^17), one all-zero row: scales of all sizes."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * np.exp2(rng.uniform(-17, 17, shape[:-1] + (1,)))
    x[0, 0] = 0.0
    return jnp.asarray(x, jnp.float32)


def _entry_bytes(buf) -> int:
    return sum(a.dtype.itemsize * a.shape[-1] for a in jax.tree.leaves(buf))


def test_fp8_entries_are_flashmla_584_bytes_and_encode_the_qat_kv_quantization():
    buf = kv_cache.Fp8Entries.empty((4, 6), 512, 64)
    assert _entry_bytes(buf) == 584  # 448 e4m3 + 7 UE8M0 scale bytes + 1 pad + 64 BF16
    x = _values((4, 6, 512))
    stored = buf.encode(x)
    back = kv_cache.read(stored, jnp.float32)
    fq = kv_fake_quant(x, 64)
    # the non-rope dims are architecture §3.8's 1x64 FP8 quantization bit for bit; the rope dims are rounded to BF16
    assert np.array_equal(_bits(back[..., :448]), _bits(fq[..., :448]))
    assert np.array_equal(_bits(back[..., 448:]), _bits(x[..., 448:].astype(jnp.bfloat16)))
    assert not np.any(np.asarray(stored.scale[..., 7]))  # the pad byte
    # storing a value the qat model already fake-quantized loses nothing
    assert np.array_equal(_bits(kv_cache.read(buf.encode(back), jnp.float32)), _bits(back))


def test_fp4_index_keys_are_68_bytes_and_encode_the_qat_mxfp4_quantization():
    buf = kv_cache.Fp4Keys.empty((4, 6), 128)
    assert _entry_bytes(buf) == 68  # 64 bytes of packed e2m1 + 4 UE8M0 scale bytes
    k = hadamard(_values((4, 6, 128), seed=1))
    back = kv_cache.read(buf.encode(k), jnp.float32)
    fq = mxfp4_fake_quant(k, 32)
    assert np.array_equal(back, fq)  # values equal (the sign of a zero may differ)
    assert np.array_equal(kv_cache.read(buf.encode(fq), jnp.float32), fq)


def test_e2m1_bit_decode_is_the_value_table():
    """formats.e2m1_to_f32 (built from bits) gives hub's e2m1 table for every code, the sign of zero included; the
    high nibble of a byte is ignored."""
    codes = jnp.arange(256, dtype=jnp.uint8)
    assert np.array_equal(_bits(e2m1_to_f32(codes)), _bits(E2M1_VALUES[np.arange(256) % 16]))


def test_mxfp4_decode_is_the_value_table_times_the_scale():
    """formats.mxfp4_decode (built from bits) equals hub's e2m1 table times 2^(byte - 127), computed by numpy in
    float64, for both codes of every byte and every exponent byte that encoding finite values writes (1 .. 253), in
    bf16 and fp32, bit for bit: byte 1's subnormals kept, signs of zero included. (6 * 2^126, magnitude code 7 at
    byte 253, would overflow fp32: block_quantize never writes it.)"""
    exps = np.arange(1, 254, dtype=np.uint8)
    packed = np.broadcast_to(np.arange(256, dtype=np.uint8), (exps.size, 256))  # 512 values = 16 blocks of 32
    codes = np.stack([packed & 15, packed >> 4], axis=-1).reshape(exps.size, 512)
    want = E2M1_VALUES[codes].astype(np.float64) * np.ldexp(1.0, exps.astype(np.int64) - 127)[:, None]
    finite = ~((exps[:, None] == 253) & (codes % 8 == 7))
    assert np.sum(~finite) == 64 and np.sum(want[finite] != 0) > 0 and np.any(np.abs(want[finite]) < 2.0**-126)
    scale = jnp.asarray(np.broadcast_to(exps[:, None], (exps.size, 16)))
    for dtype, view in ((jnp.float32, np.uint32), (jnp.bfloat16, np.uint16)):
        got = np.asarray(mxfp4_decode(jnp.asarray(packed), scale, dtype)).view(view)
        np.testing.assert_array_equal(got[finite], want.astype(dtype)[finite].view(view))


def test_e4m3_decode_is_the_value_table_times_the_scale():
    """formats.e4m3_decode (built from bits) equals ml_dtypes' e4m3 value of every non-NaN code times 2^(byte - 127),
    computed by numpy in float64, for every exponent byte 10 .. 246 (subnormal codes land on normal fp32 values
    from byte 10 on; 448 x 2^119 is finite), in fp32 and bf16, bit for bit, signs of zero included."""
    exps = np.arange(10, 247, dtype=np.uint8)
    codes = np.broadcast_to(np.arange(256, dtype=np.uint8), (exps.size, 256))  # 4 blocks of 64 per exponent byte
    values = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float64)
    want = values[codes] * np.ldexp(1.0, exps.astype(np.int64) - 127)[:, None]
    keep = ~np.isnan(want)
    assert np.sum(~keep) == 2 * exps.size and np.any(np.abs(want[keep]) < 2.0**-120)
    scale = jnp.asarray(np.broadcast_to(exps[:, None], (exps.size, 4)))
    for dtype, view in ((jnp.float32, np.uint32), (jnp.bfloat16, np.uint16)):
        got = np.asarray(e4m3_decode(jnp.asarray(codes), scale, 64, dtype)).view(view)
        np.testing.assert_array_equal(got[keep], want.astype(dtype)[keep].view(view))


def test_fp8_index_keys_are_132_bytes_within_half_an_e4m3_step():
    buf = kv_cache.Fp8Keys.empty((4, 6), 128)
    assert _entry_bytes(buf) == 132  # 128 e4m3 + one fp32 scale
    k = _values((4, 6, 128), seed=2)
    back = np.asarray(kv_cache.read(buf.encode(k), jnp.float32))
    k = np.asarray(k)
    amax = np.max(np.abs(k), axis=-1, keepdims=True)
    # round to nearest with 3 mantissa bits: error <= |x| / 16, or half a subnormal step (<= amax * 2^-17)
    assert np.all(np.abs(back - k) <= np.abs(k) / 16 + amax * 2.0**-17)
    assert np.array_equal(np.asarray(kv_cache.read(buf.encode(jnp.asarray(back)), jnp.float32)), back)


def test_fp8_cache_is_lossless_under_qat():
    """qat=True (fp32 compute): feeding tokens through a cache of FP8 entries and FP4 indexer keys gives bit for
    bit the logits of a BF16 cache (both keep the rope dims in BF16; every other stored value is already on the FP8 /
    MXFP4 grid). A CSA and an HCA layer; 152 tokens in chunks of 8 cross 38 CSA windows and one HCA window."""
    model = _model(qat=True, n_layers=2, compress_ratios=(4, 128, 0))
    ids = jnp.asarray(np.random.default_rng(4).integers(0, 1024, (2, 152)))

    @nnx.jit
    def run(model, cache):
        def body(cache, tokens):
            logits, _, cache = model.step(cache, tokens)
            return cache, logits

        cache, logits = jax.lax.scan(body, cache, ids.reshape(2, 19, 8).swapaxes(0, 1))
        return cache, logits

    caches, logits = {}, {}
    for fmt in (("bf16", "bf16"), ("fp8", "fp4")):
        caches[fmt], logits[fmt] = run(model, model.init_cache(2, 256, *fmt))
    fp8 = caches[("fp8", "fp4")].layers[0]  # the CSA layer: window, entries and keys all packed
    assert fp8.window.nope.dtype == fp8.entries.nope.dtype == jnp.uint8  # FP8 codes stored as their bytes
    assert isinstance(fp8.index_keys, kv_cache.Fp4Keys) and fp8.index_keys.packed.dtype == jnp.uint8
    assert np.any(np.asarray(fp8.entries.nope[:, 37]))  # the last complete window was stored
    assert np.array_equal(_bits(logits[("fp8", "fp4")]), _bits(logits[("bf16", "bf16")]))


@pytest.mark.parametrize("preset, n_csa, n_hca", [("flash", 21, 20), ("pro", 30, 31)])
def test_cache_bytes_equal_the_spec_formula(preset, n_csa, n_hca):
    """Bytes per token measured from init_cache's pytree = n_csa (entry + key) / 4 + n_hca entry / 128 for
    every precision (architecture §4.3); the fixed part holds a 128-slot window per layer (MTP included) and the fp32
    compressor states ([8, 2 * 512] and [8, 2 * 128] per CSA layer, [128, 512] per HCA layer, values + logits)."""
    cfg = ModelConfig.preset(preset)
    entry = {"fp32": 2048, "bf16": 1024, "fp8": 584}
    key = {"fp32": 512, "bf16": 256, "fp8": 132, "fp4": 68}
    state = 2 * 4 * (n_csa * (8 * 1024 + 8 * 256) + n_hca * 128 * 512)
    for kv_format, index_format in (("bf16", "bf16"), ("fp8", "fp4"), ("fp8", "fp8"), ("fp32", "fp32")):
        got = cost.cache_bytes(cfg, kv_format, index_format)
        e, k = entry[kv_format], key[index_format]
        assert got.per_token == n_csa * (e + k) / 4 + n_hca * e / 128, (kv_format, index_format)
        assert got.window == (cfg.n_layers + 1) * 128 * e
        assert got.compressor_state == state
        assert got.per_sequence == got.window + got.compressor_state + 2 * 4  # + the two int32 lengths
    # performance.md §1.2's all-BF16 figures
    assert cost.cache_bytes(cfg, "bf16", "bf16").per_token == {"flash": 6880, "pro": 9848}[preset]
    assert cost.cache_bytes(cfg) == cost.cache_bytes(cfg, "bf16", "bf16")  # default: the compute dtype


def test_bad_formats_are_refused_with_the_fix():
    model = nnx.eval_shape(lambda: Transformer(ModelConfig.preset("tiny"), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="kv_format='fp4'.*use one of"):
        model.init_cache(1, 64, kv_format="fp4")
    with pytest.raises(ValueError, match="index_format='int8'.*use one of"):
        model.init_cache(1, 64, index_format="int8")
    with pytest.raises(ValueError, match="multiple of 64"):
        kv_cache.Fp8Entries.empty((1, 4), 160, 64)
