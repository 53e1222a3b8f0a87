"""The released DeepSeek-V4 checkpoint format (architecture §5), in plain numpy + ml_dtypes.

What is here:
  * safetensors reading: the header is parsed and checked (offsets, sizes, dtypes) and the bytes are
    memory-mapped, so a tensor or a byte range is read without loading its shard; `HubCheckpoint` follows
    `model.safetensors.index.json`, whose shard names must stay inside the checkpoint folder
    (`UnsafeCheckpointPath`). A streaming, atomic writer for the same format (`SafetensorsWriter`,
    `write_hub_checkpoint` for a whole sharded directory, resumable); the housekeeping v4jax-convert shares:
    `destination_lock` (DST.lock) and `Journal` (DST.journal.json, what a resumed write keeps);
  * decoding and encoding of the two quantized formats: FP8 e4m3 with one UE8M0 scale per 128x128 block, MXFP4
    (e2m1 pairs packed in a byte, low nibble = even element, one UE8M0 scale per 1x32 block along K), and the
    lossless MXFP4 -> FP8 re-encode of the official convert.py (architecture §5.4 step 5);
  * THE name table: hub (official) names <-> v4jax parameter paths <-> HF transformers names, with each
    tensor's released storage format (architecture §5.2-5.3);
  * `random_hub_checkpoint`, an unquantized random checkpoint with every released tensor name (preview or GA
    layout), and `write_random_checkpoint`, the same stored as released.

This module must stay free of jax / torch / flax (v4jax.config is plain Python): the HF oracle imports it from
its own Python 3.11 torch environment (tests/oracle/).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import math
import mmap
import os
import re
import shutil
import socket
import struct
import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np

from v4jax.config import hf_drafter_stages

# safetensors dtype tag <-> numpy dtype.
_ST_DTYPES = {
    "BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32), "F64": np.dtype(np.float64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
    "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "I16": np.dtype(np.int16),
    "I32": np.dtype(np.int32), "I64": np.dtype(np.int64), "BOOL": np.dtype(np.bool_),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_MAX_HEADER = 100 << 20  # the safetensors library's own limit on the JSON header
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint file or directory that cannot be read as the released format; the message names the file,
    the problem and what to do about it."""


class UnsafeCheckpointPath(CheckpointError):
    """A file name read from a checkpoint (a shard name of the index) that would lead outside the checkpoint's
    folder: an absolute path, a `..` part, or a symlink to a file elsewhere."""


def file_inside(folder, name, source, error: type[Exception] = UnsafeCheckpointPath):
    """The path of the file `name`, read from `source` (a checkpoint index, a corpus's meta.json; for the message),
    inside `folder`; `error` unless it is a relative name without `..` whose real path (symlinks followed) stays
    inside the folder. Names read from files are data, never paths to follow."""
    folder = os.fspath(folder)
    if not isinstance(name, str) or not name or os.path.isabs(name) or ".." in re.split(r"[\\/]", name):
        raise error(f"{source}: file name {name!r} points outside {folder}; the files it lists must lie inside its "
                    "folder, named relative to it: fix or re-create it")
    path = os.path.join(folder, name)
    real, root = os.path.realpath(path), os.path.realpath(folder)
    if os.path.commonpath([real, root]) != root:
        raise error(f"{path} is a symlink to {real}, outside {folder}; only files inside the folder are read: copy "
                    "the file in (a hub download: use --local-dir)")
    return path


# ----------------------------------------------------------------------------- safetensors reading
def read_safetensors_header(path):
    """Returns (header {name: info} without '__metadata__', byte offset where tensor data starts).

    The header is checked against the file: known dtypes, byte counts that match the shapes, and data offsets
    that tile the data section exactly (no overlap, no gap, nothing past the end, nothing after it)."""
    size = os.path.getsize(path)

    def bad(problem, fix="the file is damaged or incomplete: download or re-create it"):
        raise CheckpointError(f"{path}: {problem}; {fix}")

    if size < 8:
        bad(f"truncated: {size} bytes, shorter than the 8-byte header length")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))  # 8-byte little-endian header length
        if n > min(size - 8, _MAX_HEADER):
            bad(f"header length {n} exceeds the file ({size} bytes)" if n > size - 8
                else f"header length {n} exceeds the 100 MiB limit")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            bad(f"header is not valid JSON ({e})")
    if not isinstance(header, dict):
        bad("header is not a JSON object")
    header.pop("__metadata__", None)
    spans = []
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = _ST_DTYPES.get(info["dtype"]), list(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            bad(f"tensor {name!r} has a malformed header entry {info!r}")
        if dtype is None:
            bad(f"tensor {name!r} has unsupported dtype {info['dtype']!r}",
                f"supported: {sorted(_ST_DTYPES)}")
        if not all(isinstance(d, int) and d >= 0 for d in shape) or not (isinstance(begin, int)
                                                                         and isinstance(end, int) and 0 <= begin <= end):
            bad(f"tensor {name!r} has invalid shape {shape} or data_offsets {[begin, end]}")
        if end - begin != math.prod(shape) * dtype.itemsize:
            bad(f"header lies about tensor {name!r}: data_offsets {[begin, end]} hold {end - begin} bytes but "
                f"{info['dtype']} {shape} needs {math.prod(shape) * dtype.itemsize}")
        spans.append((begin, end, name))
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin != pos:
            bad(f"header offsets of tensor {name!r} start at {begin} but the previous tensor ends at {pos} "
                f"({'overlap' if begin < pos else 'gap'})")
        pos = end
    data = size - 8 - n
    if pos > data:
        bad(f"truncated: the header needs {pos} bytes of tensor data but the file holds {data}")
    if pos < data:
        bad(f"{data - pos} bytes after the last tensor that the header does not describe")
    return header, 8 + n


class SafetensorsFile:
    """One .safetensors file; `f[name]` is a read-only memory-mapped array of the stored dtype (slicing it
    reads only the pages touched), `f.byte_range(name)` its [begin, end) in the file."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self.header, self.data_offset = read_safetensors_header(self.path)
        if os.path.getsize(self.path) > self.data_offset:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._buf = np.frombuffer(self._map, np.uint8)[self.data_offset:]
        else:  # mmap refuses empty maps: a file of only empty tensors
            self._map, self._buf = None, np.zeros(0, np.uint8)

    def release(self):
        """Drop the pages read so far from this process's resident set (they stay in the OS page cache and are
        read again if touched): a streaming reader calls this after each step so RSS does not grow with the
        bytes read."""
        if self._map is not None:
            self._map.madvise(mmap.MADV_DONTNEED)

    def keys(self):
        return list(self.header)

    def __contains__(self, name):
        return name in self.header

    def info(self, name):
        """(numpy dtype, shape) from the header, without touching the data."""
        info = self.header[name]
        return _ST_DTYPES[info["dtype"]], tuple(info["shape"])

    def byte_range(self, name):
        begin, end = self.header[name]["data_offsets"]
        return self.data_offset + begin, self.data_offset + end

    def __getitem__(self, name):
        dtype, shape = self.info(name)
        begin, end = self.header[name]["data_offsets"]
        return self._buf[begin:end].view(dtype).reshape(shape)


class HubCheckpoint:
    """A released-layout checkpoint directory: `model.safetensors.index.json` + shards, or one
    `model.safetensors`. Every shard header is checked on open; a tensor is found by name in whichever shard
    holds it (a weight and its `.scale` may sit in different shards)."""

    def __init__(self, ckpt_dir):
        self.dir = os.fspath(ckpt_dir)
        index = os.path.join(self.dir, INDEX_FILE)
        if os.path.exists(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError(f"weight_map is a {type(weight_map).__name__}, not an object")
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e!r}); re-download it") from e
        elif os.path.exists(os.path.join(self.dir, "model.safetensors")):
            weight_map = None
        else:
            raise CheckpointError(f"{self.dir}: neither {INDEX_FILE} nor model.safetensors found; "
                                  "point to the directory that holds the checkpoint's .safetensors files")
        shards = sorted(set(weight_map.values()), key=str) if weight_map is not None else ["model.safetensors"]
        paths = {s: file_inside(self.dir, s, index) for s in shards}  # before anything is opened
        missing = [s for s in shards if not os.path.exists(paths[s])]
        if missing:
            raise CheckpointError(f"{self.dir}: {len(missing)} shard(s) named in {INDEX_FILE} are missing: "
                                  f"{missing}; download them (or fix the index)")
        self.files = {s: SafetensorsFile(paths[s]) for s in shards}
        self.shard_of = {n: s for s, f in self.files.items() for n in f.keys()}
        if weight_map is not None:
            unlisted = sorted(set(self.shard_of) - set(weight_map))
            wrong = sorted(n for n, s in weight_map.items() if self.shard_of.get(n) != s)
            if unlisted or wrong:
                raise CheckpointError(
                    f"{self.dir}: {INDEX_FILE} disagrees with the shards: "
                    + (f"tensors in no index entry {unlisted[:10]} ({len(unlisted)}); " if unlisted else "")
                    + (f"index entries not in the named shard {wrong[:10]} ({len(wrong)}); " if wrong else "")
                    + "re-download the index and shards together")

    def keys(self):
        return list(self.shard_of)

    def __contains__(self, name):
        return name in self.shard_of

    def info(self, name):
        return self.files[self.shard_of[name]].info(name)

    def __getitem__(self, name):
        return self.files[self.shard_of[name]][name]

    def nbytes(self):
        return sum(os.path.getsize(f.path) for f in self.files.values())

    def release(self):
        for f in self.files.values():
            f.release()


def checkpoint_digest(ckpt_dir):
    """sha256 over every tensor's name, dtype tag, shape and bytes in name order: equal digests mean equal
    tensors, however they are split into shards or ordered in the files."""
    import hashlib

    ckpt, h = HubCheckpoint(ckpt_dir), hashlib.sha256()
    for name in sorted(ckpt.keys()):
        dtype, shape = ckpt.info(name)
        h.update(f"{name}|{_ST_NAMES[dtype]}|{list(shape)}|".encode())
        h.update(np.ascontiguousarray(ckpt[name]).reshape(-1).view(np.uint8).data)
    return h.hexdigest()


def load_hub_checkpoint(ckpt_dir):
    """All tensors of a checkpoint directory as raw memory-mapped arrays in their stored dtypes."""
    ckpt = HubCheckpoint(ckpt_dir)
    return {name: ckpt[name] for name in ckpt.keys()}


# ----------------------------------------------------------------------------- safetensors writing
def safetensors_header(specs):
    """The header {name: {dtype, shape, data_offsets}} of a file holding `specs` {name: (dtype, shape)} in order."""
    header, offset = {}, 0
    for name, (dtype, shape) in specs.items():
        dtype = np.dtype(dtype)
        if dtype not in _ST_NAMES:
            raise TypeError(f"{name}: dtype {dtype} has no safetensors tag")
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    return header


class SafetensorsWriter:
    """Streams one safetensors file: the header is written from `specs` {name: (dtype, shape)} up front, then
    `write(name, array)` in that order. The file appears under `path` only when every tensor has been written
    (temp file in the same directory + fsync + os.replace); on error the temp file is removed."""

    def __init__(self, path, specs, metadata=None):
        self.path, self._order, self._next = os.fspath(path), list(specs), 0
        header = safetensors_header(specs)
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        self._header = header
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # pad so the data section starts 8-byte aligned
        fd, self._tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(self.path)), suffix=".tmp")
        self._f = os.fdopen(fd, "wb")
        self._f.write(struct.pack("<Q", len(blob)) + blob)

    def write(self, name, array):
        if self._next >= len(self._order) or name != self._order[self._next]:
            raise ValueError(f"{self.path}: wrote {name!r} but the header's next tensor is "
                             f"{self._order[self._next] if self._next < len(self._order) else 'none'}")
        info, a = self._header[name], np.ascontiguousarray(array)
        if _ST_NAMES.get(a.dtype) != info["dtype"] or list(a.shape) != info["shape"]:
            raise ValueError(f"{name}: got {a.dtype} {list(a.shape)}, the header says {info['dtype']} {info['shape']}")
        self._f.write(a.reshape(-1).view(np.uint8).data)  # raw bytes (the buffer protocol rejects ml_dtypes)
        self._next += 1

    def close(self):
        if self._next != len(self._order):
            self.abort()
            raise ValueError(f"{self.path}: {len(self._order) - self._next} tensors were never written "
                             f"(next: {self._order[self._next]})")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.chmod(self._tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(self._tmp, self.path)

    def abort(self):
        self._f.close()
        if os.path.exists(self._tmp):
            os.unlink(self._tmp)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        self.abort() if exc_type else self.close()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def staged_folder(out):
    """A folder that appears complete or not at all: yields an empty `<out>.partial` beside `out` (a leftover of
    an interrupted write is cleared first), renamed to `out` when the block ends; after an error it is left as
    it is. The caller checks first that `out` does not exist."""
    tmp = Path(f"{os.fspath(out)}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    os.replace(tmp, out)


def write_safetensors(path, tensors, metadata=None):
    """Writes {name: array} as one safetensors file, atomically."""
    arrays = {n: np.asarray(a) for n, a in tensors.items()}
    with SafetensorsWriter(path, {n: (a.dtype, a.shape) for n, a in arrays.items()}, metadata) as w:
        for n, a in arrays.items():
            w.write(n, a)


def shard_layout(specs, max_shard_bytes):
    """Groups the ordered {name: (dtype, shape)} into shards of at most max_shard_bytes (a tensor larger than
    that gets its own shard) as the release does: MTP tensors alone in the last shard; a weight, its `.scale`
    and all experts of a layer are never split if they are consecutive in `specs`. -> list of name lists."""
    def group_key(name):  # tensors that must share a shard
        return re.sub(r"\.(experts\.\d+\.w[123]\.)?(weight|scale)$", "", name)

    shards, cur, cur_bytes, prev = [], [], 0, None
    main = [n for n in specs if not n.startswith("mtp.")]
    for name in main:
        dtype, shape = specs[name]
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        key = group_key(name)
        if cur and key != prev and cur_bytes + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(name)
        cur_bytes, prev = cur_bytes + nbytes, key
    if cur:
        shards.append(cur)
    mtp = [n for n in specs if n.startswith("mtp.")]
    return shards + ([mtp] if mtp else [])


class DestinationLocked(FileExistsError):
    """Another process is writing the same destination: it holds the destination's lock file."""


@contextlib.contextmanager
def destination_lock(dst):
    """Holds `DST.lock` while the caller writes `dst`. The lock is an flock, which the OS drops when its process
    ends, so a lock file left by a killed run is simply taken over; DestinationLocked names the live holder."""
    path = os.fspath(dst) + ".lock"
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise DestinationLocked(f"{dst} is being written by {holder} (lock file {path}): wait for it to finish "
                                "or write somewhere else") from None
    try:
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        yield
    finally:
        os.unlink(path)
        f.close()


def write_json(path, obj):
    """json.dump, atomically (temp file + fsync + rename)."""
    tmp = os.fspath(path) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Journal:
    """`DST.journal.json` beside an unfinished write of `dst` (whose output so far lives in `partial`): the write's
    options and the steps it has committed, so that the same command run again resumes (`done`) and one with
    other options is refused."""

    def __init__(self, dst, options, partial):
        self.path, self.options, self.done = os.fspath(dst) + ".journal.json", json.loads(json.dumps(options)), []
        if os.path.exists(self.path):
            with open(self.path) as f:
                journal = json.load(f)
            if journal["options"] != self.options:
                raise ValueError(f"{self.path}: an interrupted conversion into {dst} used other options or another "
                                 f"source; rerun it with the same arguments, or delete {self.path} and {partial}")
            self.done = journal["done"]
        elif os.path.exists(partial):
            raise FileExistsError(f"{partial} exists without {self.path}: it is not a v4jax-convert conversion this "
                                  "command can resume; delete it")
        else:
            write_json(self.path, {"options": self.options, "done": self.done})

    def commit(self, step):
        self.done.append(step)
        write_json(self.path, {"options": self.options, "done": self.done})

    def finish(self):
        os.unlink(self.path)


def write_hub_checkpoint(out_dir, specs, produce, max_shard_bytes=4 << 30, extra_files=None, progress=None,
                         resume=None):
    """Writes a released-layout checkpoint directory tensor by tensor: `produce(name)` returns each tensor of
    `specs` {name: (dtype, shape)} in order, so memory holds one tensor at a time (plus what `produce`
    caches). Shards `model-0000i-of-0000n.safetensors`, the index and `extra_files` {filename: text} go to a
    folder beside `out_dir` that is renamed to it at the end: `out_dir` is complete or absent. `out_dir.lock` is
    held meanwhile (destination_lock). `progress(name, nbytes)` is called after each tensor written.

    `resume` (JSON data saying what is written, e.g. the source and format) makes the write resumable: the folder
    is `out_dir.partial`, a Journal lists its finished shards, and the same call after an interruption keeps
    them (each checked against the header it must have; `progress(None, nbytes)` per kept shard) and writes the
    rest. Without it the folder is a temp directory that an error removes."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    shards = shard_layout(specs, max_shard_bytes)
    fnames = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    with destination_lock(out_dir):
        if os.path.exists(out_dir):
            raise FileExistsError(f"{out_dir} exists: choose a new output directory or delete it first")
        if resume is None:
            journal = None
            tmp = tempfile.mkdtemp(dir=os.path.dirname(out_dir), prefix=os.path.basename(out_dir) + ".tmp-")
        else:
            tmp = out_dir + ".partial"
            options = {"resume": resume, "max_shard_bytes": max_shard_bytes, "extra_files": extra_files,
                       "specs": [[n, _ST_NAMES[np.dtype(d)], list(s)] for n, (d, s) in specs.items()]}
            journal = Journal(out_dir, options, tmp)
            os.makedirs(tmp, exist_ok=True)
            for leftover in os.listdir(tmp):  # a killed run's unfinished shard (SafetensorsWriter's temp file)
                if leftover.endswith(".tmp"):
                    os.unlink(os.path.join(tmp, leftover))
        try:
            for i, (names, fname) in enumerate(zip(shards, fnames)):
                path, header = os.path.join(tmp, fname), safetensors_header({n: specs[n] for n in names})
                if journal and i in journal.done and _has_header(path, header):
                    if progress:
                        progress(None, sum(e - b for b, e in (h["data_offsets"] for h in header.values())))
                    continue
                with SafetensorsWriter(path, {n: specs[n] for n in names}) as w:
                    for n in names:
                        a = produce(n)
                        w.write(n, a)
                        if progress:
                            progress(n, a.nbytes)
                if journal and i not in journal.done:
                    journal.commit(i)
            for fname, text in (extra_files or {}).items():
                os.makedirs(os.path.dirname(os.path.join(tmp, fname)), exist_ok=True)  # e.g. inference/config.json
                with open(os.path.join(tmp, fname), "w") as f:
                    f.write(text)
            total = sum(math.prod(s) * np.dtype(d).itemsize for d, s in specs.values())
            weight_map = {n: fname for names, fname in zip(shards, fnames) for n in names}
            with open(os.path.join(tmp, INDEX_FILE), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
            os.replace(tmp, out_dir)
        except BaseException:
            if journal is None:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        if journal:
            journal.finish()


def _has_header(path, header):
    """Whether the file at `path` is a complete safetensors file with exactly this header."""
    try:
        return read_safetensors_header(path)[0] == header
    except (OSError, CheckpointError):
        return False


# ----------------------------------------------------------------------------- FP8 / MXFP4 decode + encode
# e2m1 code -> value; bit 3 is the sign (codes 8..15 are the negatives of 0..7).
E2M1_VALUES = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], np.float32)
FP8_MAX, FP4_MAX = 448.0, 6.0


def scale_to_f32(scale):
    """UE8M0 byte b -> 2^(b-127) (computed from the raw byte, not via ml_dtypes' conversion).
    Base models reportedly store F32 scales; those pass through."""
    if scale.dtype == np.float32:
        return scale
    e = np.asarray(scale).view(np.uint8).astype(np.int32) - 127
    return np.ldexp(np.float32(1.0), e).astype(np.float32)


def _blocks_to_elements(s, shape, block):
    """Repeat a per-block grid [.., ceil(r/b0), ceil(c/b1)] over [.., r, c] (block = (b0, b1))."""
    s = np.repeat(np.repeat(s, block[0], axis=-2), block[1], axis=-1)
    return s[..., : shape[-2], : shape[-1]]


def dequant_fp8(w, scale, block=128):
    """FP8 e4m3 [.., out, in] with a [.., ceil(out/128), ceil(in/128)] UE8M0 block-scale grid -> fp32."""
    w = np.asarray(w)
    s = scale_to_f32(scale)
    want = (*w.shape[:-2], -(-w.shape[-2] // block), -(-w.shape[-1] // block))
    if s.shape != want:
        raise CheckpointError(f"FP8 weight {w.shape} needs a scale grid {want}, got {s.shape}")
    return w.astype(np.float32) * _blocks_to_elements(s, w.shape, (block, block))


def unpack_fp4(packed):
    """int8/uint8 [.., out, in/2] -> fp32 values [.., out, in]; low nibble = element 2j, high = 2j+1."""
    b = np.asarray(packed).view(np.uint8)
    vals = np.stack([E2M1_VALUES[b & 0xF], E2M1_VALUES[b >> 4]], axis=-1)
    return vals.reshape(*b.shape[:-1], 2 * b.shape[-1])


def dequant_fp4(packed, scale, block=32):
    """MXFP4 [.., out, in/2] with one UE8M0 scale per 1x32 block along K ([.., out, in/32]) -> fp32."""
    v = unpack_fp4(packed)
    s = scale_to_f32(scale)
    want = (*v.shape[:-1], -(-v.shape[-1] // block))
    if s.shape != want:
        raise CheckpointError(f"MXFP4 weight {v.shape} needs a scale grid {want}, got {s.shape}")
    return v * _blocks_to_elements(s, v.shape, (1, block))


def _pow2_scale_bytes(amax, qmax):
    """UE8M0 byte of the smallest power of two s with amax / s <= qmax (1.0 for all-zero blocks)."""
    m, e = np.frexp(amax.astype(np.float64) / qmax)  # x = m * 2^e, m in [0.5, 1)
    e = np.where(m == 0.5, e - 1, e)  # exact powers of two need no rounding up
    e = np.where(amax > 0, e, 0)
    return np.clip(e + 127, 0, 254).astype(np.uint8)


def _block_amax(w, block):
    """max |w| over [.., b0, b1] blocks of [.., r, c] (edges padded with zeros)."""
    *lead, r, c = w.shape
    pr, pc = -(-r // block[0]) * block[0], -(-c // block[1]) * block[1]
    a = np.zeros((*lead, pr, pc), np.float32)
    a[..., :r, :c] = np.abs(w)
    a = a.reshape(*lead, pr // block[0], block[0], pc // block[1], block[1])
    return a.max(axis=(-3, -1))


def quantize_fp8(w, block=128):
    """fp32 [.., out, in] -> (float8_e4m3fn weight, UE8M0 scale grid [.., ceil(out/128), ceil(in/128)]) with
    power-of-two block scales (amax / scale <= 448, round to nearest even). Decoding an FP8 weight and
    re-encoding it gives back the same values (possibly with smaller scales)."""
    w = np.asarray(w, np.float32)
    sb = _pow2_scale_bytes(_block_amax(w, (block, block)), FP8_MAX)
    s = _blocks_to_elements(scale_to_f32(sb), w.shape, (block, block))
    return (w / s).astype(ml_dtypes.float8_e4m3fn), sb.view(ml_dtypes.float8_e8m0fnu)


def quantize_fp4(w, block=32):
    """fp32 [.., out, in] -> (packed int8 [.., out, in/2], UE8M0 scales [.., out, in/32]): one power-of-two
    scale per 1x32 block (amax / scale <= 6), e2m1 codes rounded to nearest even, low nibble = even element."""
    w = np.asarray(w, np.float32)
    if w.shape[-1] % 2:
        raise ValueError(f"MXFP4 packs pairs along K: the last dim of {w.shape} must be even")
    sb = _pow2_scale_bytes(_block_amax(w, (1, block)), FP4_MAX)
    s = _blocks_to_elements(scale_to_f32(sb), w.shape, (1, block))
    codes = (w / s).astype(ml_dtypes.float4_e2m1fn).view(np.uint8) & 0xF
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed.view(np.int8), sb.view(ml_dtypes.float8_e8m0fnu)


def fp4_to_fp8(packed, scale, block=128):
    """The lossless MXFP4 -> FP8 re-encode (official convert.py --expert-dtype fp8, architecture §5.4 step 5).

    Each 128x128 block gets the shared scale max(its 1x32 scales) / 2^6; the per-32 ratios (<= 2^6) fold into
    the e4m3 values (|e2m1| * 2^6 <= 384 <= 448). Exact unless a block's 1x32 scales span more than 2^14
    (values then fall below e4m3's subnormals): that raises instead of rounding."""
    vals = dequant_fp4(packed, scale)  # exact in fp32
    s32 = np.asarray(scale).view(np.uint8).astype(np.int32)
    *lead, rows, n32 = s32.shape
    # max of the 1x32 exponents over each 128x128 block: pad, then reduce over 128 rows x 4 groups of 32
    per = block // 32
    pr, pc = -(-rows // block) * block, -(-n32 // per) * per
    grid = np.zeros((*lead, pr, pc), np.int32)
    grid[..., :rows, :n32] = s32
    smax = grid.reshape(*lead, pr // block, block, pc // per, per).max(axis=(-3, -1))
    sb = np.clip(smax - 6, 0, 254).astype(np.uint8)
    s = _blocks_to_elements(scale_to_f32(sb), vals.shape, (block, block))
    q = (vals / s).astype(ml_dtypes.float8_e4m3fn)
    if not np.array_equal(q.astype(np.float32) * s, vals):
        raise ValueError("MXFP4 -> FP8 re-encode is not exact for this tensor: some 128x128 block's 1x32 scales "
                         "span more than 2^14; keep the experts in MXFP4")
    return q, sb.view(ml_dtypes.float8_e8m0fnu)


def dequantize_hub_state(raw):
    """Merges every `X.weight` with its `X.scale` into one fp32 `X.weight` (int8 weight = MXFP4,
    anything else = FP8 block); other float tensors -> fp32, integer tensors (tid2eid) unchanged."""
    out = {}
    for name, a in raw.items():
        if name.endswith(".scale"):
            if name[: -len(".scale")] + ".weight" not in raw:
                raise CheckpointError(f"{name} has no matching .weight")
            continue
        scale = raw.get(name[: -len(".weight")] + ".scale") if name.endswith(".weight") else None
        if scale is not None:
            out[name] = dequant_fp4(a, scale) if a.dtype == np.int8 else dequant_fp8(a, scale)
        elif np.issubdtype(a.dtype, np.integer):
            out[name] = np.array(a)
        else:
            out[name] = np.asarray(a).astype(np.float32)
    return out


def release_dtype(name):
    """The dtype tag(s) the release stores a hub tensor in: "fp8" / "fp4" (weight + `.scale`), or the plain
    numpy dtype (BF16, F32, I64). None for names outside the table."""
    hit = _lookup(name, None)
    return None if hit is None else hit[0][3]


def encode_release(name, value):
    """One unquantized hub tensor -> {hub name: array} in the release's storage (weight + scale for FP8/FP4)."""
    fmt = release_dtype(name)
    if fmt is None:
        raise KeyError(f"{name}: not a released tensor name")
    if fmt in ("fp8", "fp4"):
        w, s = (quantize_fp8 if fmt == "fp8" else quantize_fp4)(value)
        return {name: w, name[: -len(".weight")] + ".scale": s}
    return {name: np.asarray(value).astype(fmt)}


def release_specs(name, shape):
    """{hub name: (dtype, shape)} of what the release stores for the unquantized tensor `name` of `shape`
    ([.., out, in]): FP8 e4m3 + a 128x128 UE8M0 grid, packed MXFP4 + 1x32 UE8M0 scales, or one plain tensor."""
    fmt, scale = release_dtype(name), name[: -len(".weight")] + ".scale"
    if fmt == "fp8":
        return {name: (E4M3, tuple(shape)), scale: (UE8M0, (-(-shape[0] // 128), -(-shape[1] // 128)))}
    if fmt == "fp4":
        return {name: (np.dtype(np.int8), (shape[0], shape[1] // 2)), scale: (UE8M0, (shape[0], -(-shape[1] // 32)))}
    return {name: (np.dtype(fmt), tuple(shape))}


def quantize_hub_state(state):
    """An unquantized hub state (e.g. random_hub_checkpoint) -> the exact released storage layout."""
    out = {}
    for name, value in state.items():
        out.update(encode_release(name, value))
    return out


# ----------------------------------------------------------------------------- the name table
# One row per released tensor: (hub name, v4jax parameter path, HF transformers name, released storage).
# Rows under _BLOCK are relative to `layers.N.` (hub, v4jax) / `model.layers.N.` (HF). The `mtp.*` namespace holds
# one of two layouts (architecture §8.1-8.3), which the config tells apart: the preview's MTP block, `mtp.0.`
# (hub) / `mtp.` (v4jax), _BLOCK + _MTP_ONLY; or a GA checkpoint's DSpark drafter, stage s at `mtp.s.` (hub) /
# `dspark.stages.s.` (v4jax), _BLOCK + _DSPARK_ONLY (stage 0 holds main_proj / main_norm, the last stage the
# head pieces). Neither has an HF counterpart (HF builds no MTP or drafter). Routed-expert rows
# (`{e}`) are one tensor per expert on the hub and one stacked [E, ..] array in v4jax; HF stacks them too:
# gate_up_proj[e] = concat(w1[e], w3[e]) -> [E, 2I, d], down_proj[e] = w2[e] -> [E, d, I].
# Verified against transformers 5.23 modeling_deepseek_v4.py + conversion_mapping.py["deepseek_v4"].
BF16, F32, I64 = np.dtype(ml_dtypes.bfloat16), np.dtype(np.float32), np.dtype(np.int64)
E4M3, UE8M0 = np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e8m0fnu)
_TOP = [
    ("embed.weight", "embed", "model.embed_tokens.weight", BF16),
    ("head.weight", "head", "lm_head.weight", BF16),
    ("norm.weight", "norm", "model.norm.weight", BF16),
    ("hc_head_fn", "hc_head.fn", "model.hc_head.hc_fn", F32),
    ("hc_head_base", "hc_head.base", "model.hc_head.hc_base", F32),
    ("hc_head_scale", "hc_head.scale", "model.hc_head.hc_scale", F32),
]
_BLOCK = [
    ("attn_norm.weight", "attn_norm", "input_layernorm.weight", BF16),
    ("ffn_norm.weight", "ffn_norm", "post_attention_layernorm.weight", BF16),
    *[(f"hc_{site}_{p}", f"hc_{site}.{p}", f"{site}_hc.{p}", F32) for site in ("attn", "ffn")
      for p in ("fn", "base", "scale")],
    ("attn.attn_sink", "attn.attn_sink", "self_attn.sinks", F32),
    ("attn.wq_a.weight", "attn.wq_a", "self_attn.q_a_proj.weight", "fp8"),
    ("attn.q_norm.weight", "attn.q_norm", "self_attn.q_a_norm.weight", BF16),
    ("attn.wq_b.weight", "attn.wq_b", "self_attn.q_b_proj.weight", "fp8"),
    ("attn.wkv.weight", "attn.wkv", "self_attn.kv_proj.weight", "fp8"),
    ("attn.kv_norm.weight", "attn.kv_norm", "self_attn.kv_norm.weight", BF16),
    ("attn.wo_a.weight", "attn.wo_a", "self_attn.o_a_proj.weight", "fp8"),  # same [g*d_g, n_h*c/g] layout
    ("attn.wo_b.weight", "attn.wo_b", "self_attn.o_b_proj.weight", "fp8"),
    # CSA / HCA compressor
    ("attn.compressor.wkv.weight", "attn.compressor.wkv", "self_attn.compressor.kv_proj.weight", BF16),
    ("attn.compressor.wgate.weight", "attn.compressor.wgate", "self_attn.compressor.gate_proj.weight", BF16),
    ("attn.compressor.norm.weight", "attn.compressor.norm", "self_attn.compressor.kv_norm.weight", BF16),
    ("attn.compressor.ape", "attn.compressor.ape", "self_attn.compressor.position_bias", F32),
    # CSA lightning indexer: HF nests it *inside* the compressor; weights_proj sits in a `scorer`.
    ("attn.indexer.compressor.wkv.weight", "attn.indexer.compressor.wkv",
     "self_attn.compressor.indexer.kv_proj.weight", BF16),
    ("attn.indexer.compressor.wgate.weight", "attn.indexer.compressor.wgate",
     "self_attn.compressor.indexer.gate_proj.weight", BF16),
    ("attn.indexer.compressor.norm.weight", "attn.indexer.compressor.norm",
     "self_attn.compressor.indexer.kv_norm.weight", BF16),
    ("attn.indexer.compressor.ape", "attn.indexer.compressor.ape",
     "self_attn.compressor.indexer.position_bias", F32),
    ("attn.indexer.wq_b.weight", "attn.indexer.wq_b", "self_attn.compressor.indexer.q_b_proj.weight", "fp8"),
    ("attn.indexer.weights_proj.weight", "attn.indexer.weights_proj",
     "self_attn.compressor.indexer.scorer.weights_proj.weight", BF16),
    # MoE: router (gate.weight keeps its suffix in v4jax: it sits beside gate.bias / gate.tid2eid)
    ("ffn.gate.weight", "ffn.gate.weight", "mlp.gate.weight", BF16),
    ("ffn.gate.bias", "ffn.gate.bias", "mlp.gate.e_score_correction_bias", F32),  # score-routed layers
    ("ffn.gate.tid2eid", "ffn.gate.tid2eid", "mlp.gate.tid2eid", I64),  # hash layers
    ("ffn.shared_experts.w1.weight", "ffn.shared_experts.w1", "mlp.shared_experts.gate_proj.weight", "fp8"),
    ("ffn.shared_experts.w2.weight", "ffn.shared_experts.w2", "mlp.shared_experts.down_proj.weight", "fp8"),
    ("ffn.shared_experts.w3.weight", "ffn.shared_experts.w3", "mlp.shared_experts.up_proj.weight", "fp8"),
    ("ffn.experts.{e}.w1.weight", "ffn.experts.w1", "mlp.experts.gate_up_proj", "fp4"),
    ("ffn.experts.{e}.w2.weight", "ffn.experts.w2", "mlp.experts.down_proj", "fp4"),
    ("ffn.experts.{e}.w3.weight", "ffn.experts.w3", "mlp.experts.gate_up_proj", "fp4"),
]
_HEAD = [("norm.weight", "norm", None, BF16),
         *[(f"hc_head_{p}", f"hc_head.{p}", None, F32) for p in ("fn", "base", "scale")]]
_MTP_ONLY = [
    ("e_proj.weight", "e_proj", None, "fp8"), ("h_proj.weight", "h_proj", None, "fp8"),
    ("enorm.weight", "enorm", None, BF16), ("hnorm.weight", "hnorm", None, BF16), *_HEAD,
]
_DSPARK_ONLY = [
    ("main_proj.weight", "main_proj", None, "fp8"), ("main_norm.weight", "main_norm", None, BF16), *_HEAD,
    ("markov_head.markov_w1.weight", "markov_head.markov_w1", None, BF16),  # [vocab, rank]: an embedding
    ("markov_head.markov_w2.weight", "markov_head.markov_w2", None, BF16),  # [vocab, rank]: rank -> vocab, [out, in]
    ("confidence_head.proj.weight", "confidence_head.proj", None, BF16),  # [1, dim + rank], no bias
]
_HUB_TOP = {r[0]: r for r in _TOP}
_HUB_BLOCK = {r[0]: r for r in _BLOCK}
_HUB_MTP = {False: {**_HUB_BLOCK, **{r[0]: r for r in _MTP_ONLY}},  # by layout: dspark False / True
            True: {**_HUB_BLOCK, **{r[0]: r for r in _DSPARK_ONLY}}}
_V4_TOP = {r[1]: r for r in _TOP}
_V4_BLOCK = {r[1]: r for r in _BLOCK}
_V4_MTP = {**_V4_BLOCK, **{r[1]: r for r in _MTP_ONLY}}
_V4_DSPARK = {**_V4_BLOCK, **{r[1]: r for r in _DSPARK_ONLY}}
_PREFIX = re.compile(r"^(layers\.\d+|mtp\.(\d+))\.(.+)$")
_V4_PREFIX = re.compile(r"^(layers\.\d+|mtp|dspark\.stages\.(\d+))\.(.+)$")
_HUB_EXPERT = re.compile(r"^ffn\.experts\.(\d+)\.(w[123]\.weight)$")


def _lookup(name, dspark):
    """Hub name -> (its row, block prefix ('layers.N' / 'mtp.S' / ''), expert index or None) in the preview
    (dspark False: `mtp.0` is the MTP block) or GA layout (True: `mtp.S` is drafter stage S); None if unknown
    there. dspark None: either layout (the two agree on the release dtype of the names both have)."""
    if dspark is None:
        return _lookup(name, False) or _lookup(name, True)
    if name in _HUB_TOP:
        return _HUB_TOP[name], "", None
    m = _PREFIX.match(name)
    if m is None or m[2] is not None and m[2] != "0" and not dspark:
        return None
    table = _HUB_BLOCK if m[2] is None else _HUB_MTP[dspark]
    e = _HUB_EXPERT.match(m[3])
    row = table.get(f"ffn.experts.{{e}}.{e[2]}" if e else m[3])
    return None if row is None else (row, m[1], int(e[1]) if e else None)


def hub_to_path(name, dspark=False):
    """Hub tensor name -> (v4jax parameter path, routed-expert index or None) in the preview layout, or with
    `dspark` (the config's) the GA one; KeyError for names unknown there."""
    hit = _lookup(name, dspark)
    if hit is None:
        raise KeyError(f"{name}: not a DeepSeek-V4 hub tensor name of the {'GA' if dspark else 'preview'} layout")
    row, prefix, expert = hit
    if prefix.startswith("mtp."):
        prefix = f"dspark.stages.{prefix[4:]}" if dspark else "mtp"
    return (prefix + "." if prefix else "") + row[1], expert


def path_to_hub(path, expert=None):
    """v4jax parameter path (+ routed-expert index for stacked experts) -> hub tensor name (either layout: the
    paths `mtp.*` and `dspark.stages.S.*` tell them apart)."""
    if path in _V4_TOP:
        return _V4_TOP[path][0]
    m = _V4_PREFIX.match(path)
    table = None if m is None else _V4_MTP if m[1] == "mtp" else _V4_BLOCK if m[2] is None else _V4_DSPARK
    row = None if table is None else table.get(m[3])
    if row is None:
        raise KeyError(f"{path}: not a v4jax parameter path with a hub name")
    if ("{e}" in row[0]) != (expert is not None):
        raise KeyError(f"{path}: the expert index is {'missing' if expert is None else 'not expected'}")
    prefix = "mtp.0" if m[1] == "mtp" else m[1] if m[2] is None else f"mtp.{m[2]}"
    return prefix + "." + row[0].replace("{e}", str(expert))


def mtp_layout_names(names):
    """The `mtp.*` tensor names (scales excepted) only one layout knows, sorted: {False: the preview MTP block's
    (e.g. mtp.0.e_proj.weight), True: a GA DSpark drafter's (mtp.0.main_proj.weight, anything under mtp.1)}.
    The names fit the preview layout if the True list is empty, the GA layout if the False list is."""
    out = {False: [], True: []}
    for n in sorted(names):
        if n.startswith("mtp.") and not n.endswith(".scale"):
            preview, ga = _lookup(n, False) is not None, _lookup(n, True) is not None
            if preview != ga:
                out[ga].append(n)
    return out


def hub_to_hf(state, n_layers):
    """Dequantized hub-named tensors -> HF DeepseekV4ForCausalLM state_dict names. `mtp.*` is dropped in both
    layouts (HF builds neither the MTP block nor the DSpark drafter). Routed experts are stacked:
    gate_up_proj[e] = concat(w1[e], w3[e], axis=0) -> [E, 2I, d] (gate first, then up; no transpose, HF applies
    F.linear), down_proj = stack(w2) -> [E, d, I]."""
    out, experts, unknown = {}, {}, []
    for name, a in state.items():
        hit = _lookup(name, None)
        if hit is None or hit[1].startswith("layers.") and int(hit[1].split(".")[1]) >= n_layers:
            unknown.append(name)
            continue
        row, prefix, expert = hit
        if prefix.startswith("mtp."):
            continue
        hf = row[2] if prefix == "" else f"model.{prefix}.{row[2]}"
        if expert is None:
            out[hf] = a
        else:
            experts.setdefault(prefix, {})[(expert, row[0].split(".")[-2])] = a
    if unknown:
        raise KeyError(f"hub_to_hf: no HF name for {unknown[:10]} ({len(unknown)} in all)")
    for prefix, ws in experts.items():
        n_exp = 1 + max(i for i, _ in ws)
        p = f"model.{prefix}.mlp.experts."
        out[p + "gate_up_proj"] = np.stack(
            [np.concatenate([ws[(i, "w1")], ws[(i, "w3")]], axis=0) for i in range(n_exp)])
        out[p + "down_proj"] = np.stack([ws[(i, "w2")] for i in range(n_exp)])
    return out


# ----------------------------------------------------------------------------- random checkpoint
def _layer_specs(cfg, prefix, ratio, hash_layer):
    """(name, shape, kind) for one block; kind picks the random distribution."""
    d, hc = cfg["hidden_size"], cfg.get("hc_mult", 4)
    nh, c, dc = cfg["num_attention_heads"], cfg["head_dim"], cfg["q_lora_rank"]
    g, dg = cfg["o_groups"], cfg["o_lora_rank"]
    n_exp, inter = cfg["n_routed_experts"], cfg["moe_intermediate_size"]
    nih, ci = cfg["index_n_heads"], cfg["index_head_dim"]
    mix = (2 + hc) * hc
    s = [("attn_norm.weight", (d,), "norm"), ("ffn_norm.weight", (d,), "norm")]
    for site in ("attn", "ffn"):
        s += [(f"hc_{site}_fn", (mix, hc * d), "hc_fn"), (f"hc_{site}_base", (mix,), "hc_base"),
              (f"hc_{site}_scale", (3,), "hc_scale")]
    s += [("attn.attn_sink", (nh,), "sink"),
          ("attn.wq_a.weight", (dc, d), "mat"), ("attn.q_norm.weight", (dc,), "norm"),
          ("attn.wq_b.weight", (nh * c, dc), "mat"),
          ("attn.wkv.weight", (c, d), "mat"), ("attn.kv_norm.weight", (c,), "norm"),
          ("attn.wo_a.weight", (g * dg, nh * c // g), "mat"), ("attn.wo_b.weight", (d, g * dg), "mat")]
    if ratio:
        coff = 2 if ratio == 4 else 1  # CSA (overlapping windows) projects to 2 series
        s += [("attn.compressor.wkv.weight", (coff * c, d), "mat"),
              ("attn.compressor.wgate.weight", (coff * c, d), "mat"),
              ("attn.compressor.norm.weight", (c,), "norm"),
              ("attn.compressor.ape", (ratio, coff * c), "ape")]
    if ratio == 4:
        s += [("attn.indexer.compressor.wkv.weight", (2 * ci, d), "mat"),
              ("attn.indexer.compressor.wgate.weight", (2 * ci, d), "mat"),
              ("attn.indexer.compressor.norm.weight", (ci,), "norm"),
              ("attn.indexer.compressor.ape", (ratio, 2 * ci), "ape"),
              ("attn.indexer.wq_b.weight", (nih * ci, dc), "mat"),
              ("attn.indexer.weights_proj.weight", (nih, d), "mat")]
    s += [("ffn.gate.weight", (n_exp, d), "mat")]
    s += [("ffn.gate.tid2eid", (cfg["vocab_size"], cfg["num_experts_per_tok"]), "tid2eid") if hash_layer
          else ("ffn.gate.bias", (n_exp,), "gate_bias")]
    for w, shape in (("w1", (inter, d)), ("w2", (d, inter)), ("w3", (inter, d))):
        s.append((f"ffn.shared_experts.{w}.weight", shape, "mat"))
    for e in range(n_exp):
        for w, shape in (("w1", (inter, d)), ("w2", (d, inter)), ("w3", (inter, d))):
            s.append((f"ffn.experts.{e}.{w}.weight", shape, "mat"))
    return [(prefix + n, shape, kind) for n, shape, kind in s]


def _head_specs(prefix, d, hc):
    """(name, shape, kind) of a head collapse + final norm: the model's, the MTP block's, the drafter's last stage."""
    return [(prefix + "norm.weight", (d,), "norm"), (prefix + "hc_head_fn", (hc, hc * d), "hc_fn"),
            (prefix + "hc_head_base", (hc,), "hc_base"), (prefix + "hc_head_scale", (1,), "hc_scale")]


def hub_tensor_specs(hf_config):
    """(name, shape, kind) of every unquantized released tensor of a config, in checkpoint order: the preview's
    MTP block, or for a GA config (dspark_* fields) the DSpark drafter's stages (config.hf_drafter_stages)."""
    cfg = hf_config
    d, hc, n_layers, vocab = cfg["hidden_size"], cfg.get("hc_mult", 4), cfg["num_hidden_layers"], cfg["vocab_size"]
    stages = hf_drafter_stages(cfg)
    n_mtp = cfg.get("num_nextn_predict_layers", 1) if stages is None else stages
    ratios = list(cfg["compress_ratios"]) + [0] * (n_layers + n_mtp)
    n_hash = cfg.get("num_hash_layers", 0)
    specs = [("embed.weight", (vocab, d), "embed"), ("head.weight", (vocab, d), "mat"), *_head_specs("", d, hc)]
    for i in range(n_layers):
        specs += _layer_specs(cfg, f"layers.{i}.", ratios[i], i < n_hash)
    for j in range(n_mtp):  # MTP blocks / drafter stages: score routing, compress ratio from the list's tail
        p = f"mtp.{j}."
        if stages is None:  # the preview's MTP block
            specs += [(p + "e_proj.weight", (d, d), "mat"), (p + "h_proj.weight", (d, d), "mat"),
                      (p + "enorm.weight", (d,), "norm"), (p + "hnorm.weight", (d,), "norm"), *_head_specs(p, d, hc)]
        if stages is not None and j == 0:  # drafter stage 0: main_hidden (the target layers' outputs) -> main_x
            n_in = len(cfg["dspark_target_layer_ids"]) * d
            specs += [(p + "main_proj.weight", (d, n_in), "mat"), (p + "main_norm.weight", (d,), "norm")]
        if stages is not None and j == n_mtp - 1:  # the last stage's heads. markov_w1 is an embedding and w2
            rank = cfg["dspark_markov_rank"]  # [out, in]: the Markov term w2 @ w1[token] is O(1), as the logits
            specs += [*_head_specs(p, d, hc), (p + "markov_head.markov_w1.weight", (vocab, rank), "embed"),
                      (p + "markov_head.markov_w2.weight", (vocab, rank), "mat"),
                      (p + "confidence_head.proj.weight", (1, d + rank), "mat")]
        specs += _layer_specs(cfg, p, ratios[n_layers + j], False)
    return specs


def random_hub_tensors(hf_config, seed):
    """Yields (name, array) of deterministic random fp32 (int64 for tid2eid) weights under every released
    tensor name, unquantized, one tensor at a time. Scales keep activations O(1) with non-trivial
    attention/routing."""
    rng = np.random.default_rng(seed)
    sample = {  # kind -> sampler(shape); "mat" is [out, in]: unit-variance outputs for unit inputs
        "mat": lambda sh: rng.normal(0.0, sh[-1] ** -0.5, sh),
        "hc_fn": lambda sh: rng.normal(0.0, sh[-1] ** -0.5, sh),  # input is RMS-normalised -> mixes ~N(0,1)
        "embed": lambda sh: rng.normal(0.0, 1.0, sh),
        "norm": lambda sh: 1.0 + 0.1 * rng.normal(size=sh),
        "hc_base": lambda sh: rng.normal(0.0, 0.3, sh),
        "hc_scale": lambda sh: rng.uniform(0.5, 1.0, sh),
        "sink": lambda sh: rng.normal(0.0, 0.5, sh),
        "ape": lambda sh: rng.normal(0.0, 0.5, sh),
        "gate_bias": lambda sh: rng.normal(0.0, 0.1, sh),
    }
    for name, shape, kind in hub_tensor_specs(hf_config):
        if kind == "tid2eid":  # distinct experts per token: first k of a random permutation
            perm = np.argsort(rng.random((shape[0], hf_config["n_routed_experts"])), axis=1)
            yield name, perm[:, : shape[1]].astype(np.int64)
        else:
            yield name, sample[kind](shape).astype(np.float32)


def random_hub_checkpoint(hf_config, seed):
    """random_hub_tensors as a dict {name: array}."""
    return dict(random_hub_tensors(hf_config, seed))


def write_random_checkpoint(out_dir, hf_config, seed, max_shard_bytes=4 << 30, extra_files=None):
    """random_hub_tensors(hf_config, seed) stored as released (encode_release) in a checkpoint directory
    (write_hub_checkpoint: shards, index, MTP or drafter alone in the last shard) with `config.json` = hf_config
    and `extra_files` {path: text}; one tensor in memory at a time."""
    specs = {}
    for name, shape, _ in hub_tensor_specs(hf_config):
        specs.update(release_specs(name, shape))
    tensors, encoded = random_hub_tensors(hf_config, seed), {}

    def produce(name):  # asked for in specs' order, which is random_hub_tensors' order
        if name not in encoded:
            encoded.update(encode_release(*next(tensors)))
        return encoded.pop(name)

    files = {"config.json": json.dumps(hf_config, indent=2) + "\n", **(extra_files or {})}
    write_hub_checkpoint(out_dir, specs, produce, max_shard_bytes, files)
