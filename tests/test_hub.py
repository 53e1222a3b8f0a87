"""The safetensors reader / writer and the FP8 / MXFP4 codecs of v4jax.hub, against independent decoders
written here from the format definitions (safetensors layout; e4m3, e2m1 and UE8M0 bit layouts, architecture §5.2)."""

from __future__ import annotations

import json
import os
import shutil
import struct

import ml_dtypes
import numpy as np
import pytest

from conftest import FIXTURE
from v4jax import hub

ALL_DTYPES = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32, "F64": np.float64,
              "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E8M0": ml_dtypes.float8_e8m0fnu, "I8": np.int8,
              "U8": np.uint8, "I16": np.int16, "I32": np.int32, "I64": np.int64, "BOOL": np.bool_}


def independent_read(path):
    """safetensors by hand: u64 LE header length, JSON header, then raw little-endian tensor bytes."""
    blob = open(path, "rb").read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    header.pop("__metadata__", None)
    return {k: (v["dtype"], v["shape"], blob[8 + n + v["data_offsets"][0]:8 + n + v["data_offsets"][1]])
            for k, v in header.items()}


def random_tensors(rng):
    """Random bytes viewed as every dtype (NaN payloads included: the bytes must survive), plus an empty tensor."""
    out = {}
    for i, (tag, dt) in enumerate(ALL_DTYPES.items()):
        shape = (3, 5, 2) if i % 2 else (7,)
        raw = rng.integers(0, 2 if tag == "BOOL" else 256, size=int(np.prod(shape)) * np.dtype(dt).itemsize)
        out[f"t.{tag}"] = raw.astype(np.uint8).view(dt).reshape(shape)
    out["empty"] = np.zeros((0, 4), np.float32)
    return out


def test_every_dtype_round_trips_and_matches_an_independent_reader(tmp_path):
    tensors = random_tensors(np.random.default_rng(0))
    path = tmp_path / "x.safetensors"
    hub.write_safetensors(path, tensors, metadata={"format": "pt"})
    assert (8 + struct.unpack("<Q", open(path, "rb").read(8))[0]) % 8 == 0  # data section 8-byte aligned
    mine, theirs = hub.SafetensorsFile(path), independent_read(path)
    assert set(mine.keys()) == set(theirs) == set(tensors)
    for name, a in tensors.items():
        tag, shape, raw = theirs[name]
        assert ALL_DTYPES[tag] == a.dtype and shape == list(a.shape)
        assert raw == a.tobytes() == mine[name].tobytes()
        assert mine[name].dtype == a.dtype and mine[name].shape == a.shape
        begin, end = mine.byte_range(name)
        with open(path, "rb") as f:
            f.seek(begin)
            assert f.read(end - begin) == raw
    view = mine["t.F32"]
    assert not view.flags.owndata and not view.flags.writeable  # a view of the read-only file map: nothing loaded


def _write_raw(path, header, data):
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def _good(tmp_path):
    p = tmp_path / "good.safetensors"
    hub.write_safetensors(p, {"a": np.arange(6, dtype=np.float32), "b": np.ones((2, 2), ml_dtypes.bfloat16)})
    return p


@pytest.mark.parametrize("case, message", [
    ("truncated", "truncated: the header needs 32 bytes of tensor data but the file holds 29"),
    ("short", "truncated: 5 bytes"),
    ("huge_header", "header length 99999 exceeds the file"),
    ("bad_json", "header is not valid JSON"),
    ("size_lie", "header lies about tensor 'a': data_offsets [0, 20] hold 20 bytes but F32 [6] needs 24"),
    ("overlap", "start at 20 but the previous tensor ends at 24 (overlap)"),
    ("gap", "start at 28 but the previous tensor ends at 24 (gap)"),
    ("trailing", "4 bytes after the last tensor"),
    ("dtype", "unsupported dtype 'F4'"),
])
def test_bad_safetensors_files_are_refused_with_the_reason(tmp_path, case, message):
    data = np.arange(6, dtype=np.float32).tobytes() + np.ones(4, ml_dtypes.bfloat16).tobytes()
    header = {"a": {"dtype": "F32", "shape": [6], "data_offsets": [0, 24]},
              "b": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [24, 32]}}
    p = tmp_path / "bad.safetensors"
    if case == "truncated":
        _write_raw(p, header, data[:-3])
    elif case == "short":
        p.write_bytes(b"\x01\x02\x03\x04\x05")
    elif case == "huge_header":
        p.write_bytes(struct.pack("<Q", 99999) + b"{}")
    elif case == "bad_json":
        p.write_bytes(struct.pack("<Q", 5) + b"{nope")
    elif case == "size_lie":
        header["a"]["data_offsets"] = [0, 20]
        header["b"]["data_offsets"] = [20, 28]
        _write_raw(p, header, data[:28])
    elif case == "overlap":
        header["b"]["data_offsets"] = [20, 28]
        _write_raw(p, header, data)
    elif case == "gap":
        header["b"]["data_offsets"] = [28, 36]
        _write_raw(p, header, data + b"1234")
    elif case == "trailing":
        _write_raw(p, header, data + b"1234")
    elif case == "dtype":
        header["b"]["dtype"] = "F4"
        _write_raw(p, header, data)
    with pytest.raises(hub.CheckpointError) as e:
        hub.SafetensorsFile(p)
    assert message in str(e.value) and str(p) in str(e.value)


def _sharded_copy(tmp_path, mutate=None):
    """A copy of the fixture checkpoint whose index / files `mutate(dir)` may damage."""
    d = tmp_path / "ckpt"
    shutil.copytree(FIXTURE, d)
    if mutate:
        mutate(d)
    return d


def test_sharded_checkpoint_errors_name_the_shard_or_tensor(tmp_path):
    def drop_shard(d):
        (d / "model-00002-of-00002.safetensors").unlink()

    with pytest.raises(hub.CheckpointError, match=r"1 shard\(s\) named in model.safetensors.index.json are "
                                                  r"missing: \['model-00002-of-00002.safetensors'\]"):
        hub.HubCheckpoint(_sharded_copy(tmp_path / "a", drop_shard))

    def cut_shard(d):
        p = d / "model-00001-of-00002.safetensors"
        p.write_bytes(p.read_bytes()[:-100])

    with pytest.raises(hub.CheckpointError, match="model-00001-of-00002.safetensors: truncated"):
        hub.HubCheckpoint(_sharded_copy(tmp_path / "b", cut_shard))

    def wrong_index(d):
        idx = json.loads((d / hub.INDEX_FILE).read_text())
        idx["weight_map"]["embed.weight"] = "model-00002-of-00002.safetensors"
        del idx["weight_map"]["head.weight"]
        (d / hub.INDEX_FILE).write_text(json.dumps(idx))

    with pytest.raises(hub.CheckpointError) as e:
        hub.HubCheckpoint(_sharded_copy(tmp_path / "c", wrong_index))
    assert "tensors in no index entry ['head.weight']" in str(e.value)
    assert "index entries not in the named shard ['embed.weight']" in str(e.value)

    with pytest.raises(hub.CheckpointError, match="neither model.safetensors.index.json nor model.safetensors"):
        hub.HubCheckpoint(tmp_path)


def test_a_weight_and_its_scale_may_sit_in_different_shards(tmp_path):
    raw = hub.load_hub_checkpoint(FIXTURE)
    lone = "layers.1.attn.wq_a.scale"
    hub.write_safetensors(tmp_path / "a.safetensors", {n: a for n, a in raw.items() if n != lone})
    hub.write_safetensors(tmp_path / "b.safetensors", {lone: raw[lone]})
    weight_map = {n: "b.safetensors" if n == lone else "a.safetensors" for n in raw}
    (tmp_path / hub.INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    ckpt = hub.HubCheckpoint(tmp_path)
    got = hub.dequantize_hub_state({n: ckpt[n] for n in ckpt.keys()})
    np.testing.assert_array_equal(got["layers.1.attn.wq_a.weight"],
                                  hub.dequant_fp8(raw["layers.1.attn.wq_a.weight"], raw[lone]))


def test_writers_leave_nothing_behind_on_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with hub.SafetensorsWriter(tmp_path / "x.safetensors", {"a": (np.float32, (2,)), "b": (np.float32, (2,))}) as w:
            w.write("a", np.zeros(2, np.float32))
            raise RuntimeError("interrupted")
    with pytest.raises(ValueError, match="1 tensors were never written"):
        with hub.SafetensorsWriter(tmp_path / "y.safetensors", {"a": (np.float32, (2,)), "b": (np.float32, (2,))}) as w:
            w.write("a", np.zeros(2, np.float32))
    assert os.listdir(tmp_path) == []

    def produce(name):
        if name.startswith("mtp."):
            raise OSError("disk full")
        return np.zeros(3, np.float32)

    specs = {n: (np.float32, (3,)) for n in ("embed.weight", "layers.0.attn_norm.weight", "mtp.0.norm.weight")}
    with pytest.raises(OSError, match="disk full"):
        hub.write_hub_checkpoint(tmp_path / "out", specs, produce)
    assert os.listdir(tmp_path) == []


def test_shard_layout_puts_mtp_last_and_keeps_pairs_and_experts_together():
    specs = {}
    for i in range(3):
        specs[f"layers.{i}.attn.wq_a.weight"] = (np.uint8, (100,))
        specs[f"layers.{i}.attn.wq_a.scale"] = (np.uint8, (10,))
        for e in range(4):
            specs[f"layers.{i}.ffn.experts.{e}.w1.weight"] = (np.uint8, (50,))
    specs["mtp.0.e_proj.weight"] = (np.uint8, (5,))
    shards = hub.shard_layout(specs, max_shard_bytes=120)
    assert shards[-1] == ["mtp.0.e_proj.weight"]
    where = {n: i for i, names in enumerate(shards) for n in names}
    for i in range(3):
        assert where[f"layers.{i}.attn.wq_a.weight"] == where[f"layers.{i}.attn.wq_a.scale"]
        assert len({where[f"layers.{i}.ffn.experts.{e}.w1.weight"] for e in range(4)}) == 1
    assert [n for s in shards for n in s] == list(specs)


# ---- FP8 / MXFP4, decoded from the bit layouts ---------------------------------------------------------------
def e4m3_value(code: int) -> float:
    """float8_e4m3fn: sign | 4 exponent bits (bias 7) | 3 mantissa bits; exponent 0 = subnormal; S.1111.111 = NaN."""
    code = int(code)
    sign = -1.0 if code & 0x80 else 1.0
    exp, man = (code >> 3) & 0xF, code & 0x7
    if exp == 0xF and man == 0x7:
        return float("nan")
    return sign * (man / 8 * 2.0**-6 if exp == 0 else (1 + man / 8) * 2.0 ** (exp - 7))


def e2m1_value(code: int) -> float:
    """e2m1: sign (bit 3) | 2 exponent bits (bias 1) | 1 mantissa bit; exponent 0 = subnormal (0 or 0.5)."""
    code = int(code)
    sign = -1.0 if code & 0x8 else 1.0
    exp, man = (code >> 1) & 0x3, code & 0x1
    return sign * (man * 0.5 if exp == 0 else (1 + man / 2) * 2.0 ** (exp - 1))


def ue8m0_value(byte: int) -> float:
    return 2.0 ** (int(byte) - 127)


def test_fp8_block_dequant_matches_the_bit_level_decoder():
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 256, (200, 300), dtype=np.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x3C  # no NaN codes in weights
    codes[0, :256] = [c if (c & 0x7F) != 0x7F else 0 for c in range(256)]  # every finite code once
    scale = rng.integers(100, 150, (2, 3), dtype=np.uint8)
    scale[1, 2] = 1  # tiny scales stay exact
    got = hub.dequant_fp8(codes.view(ml_dtypes.float8_e4m3fn), scale.view(ml_dtypes.float8_e8m0fnu))
    want = np.array([[e4m3_value(c) * ue8m0_value(scale[i // 128, j // 128]) for j, c in enumerate(row)]
                     for i, row in enumerate(codes)])
    np.testing.assert_array_equal(got, want.astype(np.float32))


def test_mxfp4_dequant_matches_the_bit_level_decoder():
    rng = np.random.default_rng(2)
    packed = rng.integers(0, 256, (6, 64), dtype=np.uint8)
    packed[0, :16] = np.arange(16) | (np.arange(16)[::-1] << 4)  # every code in both nibbles
    scale = rng.integers(110, 140, (6, 4), dtype=np.uint8)
    got = hub.dequant_fp4(packed.view(np.int8), scale.view(ml_dtypes.float8_e8m0fnu))
    want = np.zeros((6, 128))
    for i in range(6):
        for j in range(64):  # low nibble = even element 2j, high nibble = odd element 2j+1
            want[i, 2 * j] = e2m1_value(packed[i, j] & 0xF) * ue8m0_value(scale[i, 2 * j // 32])
            want[i, 2 * j + 1] = e2m1_value(packed[i, j] >> 4) * ue8m0_value(scale[i, (2 * j + 1) // 32])
    np.testing.assert_array_equal(got, want.astype(np.float32))


def test_encoders_are_value_exact_on_decoded_weights_and_pick_minimal_scales():
    raw = hub.load_hub_checkpoint(FIXTURE)
    for name in ("layers.1.attn.wq_b", "layers.2.ffn.experts.5.w2"):
        w, s = raw[name + ".weight"], raw[name + ".scale"]
        fp4 = w.dtype == np.int8
        value = hub.dequant_fp4(w, s) if fp4 else hub.dequant_fp8(w, s)
        q, qs = (hub.quantize_fp4 if fp4 else hub.quantize_fp8)(value)
        np.testing.assert_array_equal((hub.dequant_fp4 if fp4 else hub.dequant_fp8)(q, qs), value)
    x = np.random.default_rng(3).standard_normal((130, 260)).astype(np.float32) * 5
    q, s = hub.quantize_fp8(x)
    amax = hub._block_amax(x, (128, 128))
    ratio = amax / hub.scale_to_f32(s)
    assert np.all(ratio <= 448) and np.all(ratio > 224)  # the smallest power-of-two scale that fits
    assert np.max(np.abs(hub.dequant_fp8(q, s) - x) / hub._blocks_to_elements(amax, x.shape, (128, 128))) < 2**-4


def test_mxfp4_to_fp8_reencode_is_lossless_and_refuses_when_it_cannot_be():
    raw = hub.load_hub_checkpoint(FIXTURE)
    for name in ("layers.0.ffn.experts.0.w1", "layers.4.ffn.experts.15.w2", "mtp.0.ffn.experts.3.w3"):
        w, s = raw[name + ".weight"], raw[name + ".scale"]
        q, s8 = hub.fp4_to_fp8(w, s)
        assert q.dtype == ml_dtypes.float8_e4m3fn and s8.shape == (1, 1)
        np.testing.assert_array_equal(hub.dequant_fp8(q, s8), hub.dequant_fp4(w, s))
    # Scales spanning 2^14 inside a 128x128 block still fit (0.5 * 2^-14 * 2^6 = 2^-9, e4m3's smallest subnormal)
    packed = np.full((128, 64), 0x11, np.uint8)  # every element 0.5
    scale = np.full((128, 4), 127, np.uint8)
    scale[5, 1] = 127 - 14
    q, s8 = hub.fp4_to_fp8(packed.view(np.int8), scale)
    np.testing.assert_array_equal(hub.dequant_fp8(q, s8), hub.dequant_fp4(packed, scale))
    scale[5, 1] = 127 - 15
    with pytest.raises(ValueError, match="not exact"):
        hub.fp4_to_fp8(packed.view(np.int8), scale)


def test_released_fixture_reencodes_to_its_own_layout():
    raw = hub.load_hub_checkpoint(FIXTURE)
    again = hub.quantize_hub_state(hub.dequantize_hub_state(raw))
    assert set(again) == set(raw)
    for name, a in raw.items():
        assert again[name].dtype == a.dtype and again[name].shape == a.shape, name
    dq, dq2 = hub.dequantize_hub_state(raw), hub.dequantize_hub_state(again)
    for name in dq:
        np.testing.assert_array_equal(dq2[name], dq[name])


def test_name_table_rows_from_the_spec():
    assert hub.hub_to_path("mtp.0.ffn.experts.7.w3.weight") == ("mtp.ffn.experts.w3", 7)
    assert hub.path_to_hub("layers.4.attn.indexer.compressor.ape") == "layers.4.attn.indexer.compressor.ape"
    assert hub.release_dtype("layers.2.ffn.experts.1.w2.weight") == "fp4"
    assert hub.release_dtype("mtp.0.e_proj.weight") == "fp8"
    assert hub.release_dtype("layers.0.ffn.gate.tid2eid") == np.int64
    assert hub.release_dtype("layers.0.attn.compressor.ape") == np.float32
    assert hub.release_dtype("layers.0.attn.kv_norm.weight") == ml_dtypes.bfloat16
    hf = hub.hub_to_hf({"layers.1.attn.indexer.weights_proj.weight": 1, "hc_head_base": 2,
                        "layers.0.ffn.gate.bias": 3, "mtp.0.e_proj.weight": 4}, n_layers=2)
    assert hf == {"model.layers.1.self_attn.compressor.indexer.scorer.weights_proj.weight": 1,
                  "model.hc_head.hc_base": 2, "model.layers.0.mlp.gate.e_score_correction_bias": 3}
    for bad in ("layers.0.attn.wq_c.weight", "mtp.1.e_proj.weight", "layers.0.e_proj.weight"):
        with pytest.raises(KeyError):
            hub.hub_to_path(bad)
