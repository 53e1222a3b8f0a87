"""`v4jax-convert`: released safetensors -> sharded Orbax checkpoint, and back (architecture §5).

    v4jax-convert to-orbax SRC DST [--weights quantized|fp8|float32|bfloat16] [--mesh fsdp=4,expert=2]
                                   [--rules train|decode] [--unit-gb 1] [--verify]
    v4jax-convert to-hub   SRC DST [--weights release|bfloat16] [--shard-gb 4]
    v4jax-convert verify   HUB_DIR ORBAX_DIR [--tokens 16]

to-orbax streams: every header is checked against the config before anything is written, then the variables
are read from the memory-mapped shards a few at a time ("units" of about --unit-gb, a stacked expert weight
alone if larger), placed on the mesh by their logical axes, and added to the checkpoint with Orbax partial
saving (each unit committed atomically). Host memory therefore holds about one unit, never the checkpoint. A
journal beside DST lists the committed units, so running the same command again after an interruption resumes
where it stopped; DST itself appears only when the last unit is in (Orbax finalize renames it into place).

to-hub writes the official layout (shards + index + config.json, the MTP block or a GA checkpoint's DSpark
drafter in the last shard), one variable at a time, into DST.partial renamed to DST at the end; the same journal
records the finished shards, so it resumes too (the kept shards' headers are checked first). `release`
re-encodes to FP8 / MXFP4 (byte for byte what was read, for a checkpoint converted with --weights quantized);
`bfloat16` stores FP8 / FP4 tensors as BF16 (what HF transformers and most engines load without a quantizer).

verify compares the logits of the source and the conversion and, for a GA checkpoint, the drafter's draft block.

A conversion holds DST.lock while it writes: a second one into the same DST fails at once, naming the process.
Errors in the input are one line on stderr (exit status 1); --debug or V4JAX_DEBUG=1 shows the traceback.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import json
import math
import os
import shutil
import sys
import time

import jax
import numpy as np
from flax import nnx

from v4jax import hub
from v4jax.checkpoint import (OrbaxReader, _is_stacked, hub_tensors, leaf_sharding, load_hub_state, plan_hub, read_leaf,
                              restore_orbax, to_orbax_tree)
from v4jax.config import HF_FP8_QUANTIZATION, ModelConfig, cli_errors
from v4jax.model import abstract_model, model_variables
from v4jax.sharding import DECODE_RULES, TRAIN_RULES, make_mesh

RULES = {"train": TRAIN_RULES, "decode": DECODE_RULES}
_GB = 1e9


class Progress:
    """One status line per step (rewritten in place on a terminal): done / total bytes, throughput, item.
    `progress(None, nbytes)` counts bytes an interrupted run already wrote: toward done, not the throughput."""

    def __init__(self, label: str, total_bytes: int, stream=None):
        self.label, self.total, self.done, self.kept, self.stream = label, total_bytes, 0, 0, stream or sys.stderr
        self.t0 = self.shown = time.time()
        self.tty = self.stream.isatty()

    def __call__(self, item: str | None, nbytes: int) -> None:
        self.done += nbytes
        if item is None:
            self.kept += nbytes
        now = time.time()
        if now - self.shown < (0.2 if self.tty else 5.0) and self.done < self.total:
            return  # at most 5 updates a second on a terminal, one line per 5 s in a log
        self.shown = now
        rate = (self.done - self.kept) / max(now - self.t0, 1e-9)
        line = (f"{self.label}: {self.done / _GB:7.2f} / {self.total / _GB:.2f} GB  {rate / 1e6:6.0f} MB/s  "
                f"{100 * self.done / max(self.total, 1):3.0f}%  {item or 'kept from the interrupted run'}")
        self.stream.write(("\r" + line + "\x1b[K") if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")


def _hf_config(src: str) -> dict:
    path = os.path.join(src, "config.json")
    if not os.path.exists(path):
        raise hub.CheckpointError(f"{src}: no config.json; copy the model's HF config.json next to the shards")
    with open(path) as f:
        return json.load(f)


def _stored_bytes(source, names) -> int:
    scales = [n[: -len(".weight")] + ".scale" for n in names if n.endswith(".weight")]
    return sum(source[n].nbytes for n in names + [s for s in scales if s in source])


def _return_freed_memory() -> None:
    """glibc keeps large freed blocks of multi-threaded programs in its arenas and raises its mmap threshold
    after each big free, so without a trim every step's buffers would add to RSS (2.5 vs 4.4 GB peak measured
    converting the 5.7 GB benchmark). No-op where there is no glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def convert(src, dst, weights: str = "quantized", mesh_shape: dict | None = None, rules: str = "train",
            unit_bytes: int = 1 << 30, progress=None) -> None:
    """Released safetensors directory `src` -> Orbax checkpoint `dst` (module docstring). `progress(item,
    nbytes)` is called after each committed unit (and `progress(None, nbytes)` first for the units a resumed
    conversion keeps); an exception from it (or anything else) leaves a resumable partial conversion. `DST.lock`
    is held throughout (hub.destination_lock)."""
    src, dst = os.path.abspath(src), os.path.abspath(dst)
    with hub.destination_lock(dst):
        _convert(src, dst, weights, mesh_shape, rules, unit_bytes, progress)


def _convert(src, dst, weights, mesh_shape, rules, unit_bytes, progress) -> None:
    import orbax.checkpoint.experimental.v1 as ocp
    from orbax.checkpoint._src.handlers.base_pytree_checkpoint_handler import PartialSaveReplacementError

    if os.path.exists(dst):
        raise FileExistsError(f"{dst} exists: it is a finished conversion; delete it or pick another DST")
    source = hub.HubCheckpoint(src)
    hf_config = _hf_config(src)
    model = abstract_model(ModelConfig.from_hf_config(hf_config))
    plan = plan_hub(model, source)  # every header checked before anything is written
    variables = model_variables(model)
    mesh = make_mesh(mesh_shape or {"data": 1}, jax.devices()[: math.prod((mesh_shape or {"data": 1}).values())])

    units, cur, cur_bytes = [], [], 0  # consecutive variables, about unit_bytes each
    for path in variables:
        nbytes = _stored_bytes(source, plan[path])
        if cur and cur_bytes + nbytes > unit_bytes:
            units.append(cur)
            cur, cur_bytes = [], 0
        cur.append(path)
        cur_bytes += nbytes
    units.append(cur)

    options = {"source": src, "shards": {s: os.path.getsize(f.path) for s, f in source.files.items()},
               "weights": weights, "mesh": dict(mesh.shape), "rules": rules, "units": units}
    partial_dir = dst + ".partial_save"
    journal = hub.Journal(dst, options, partial_dir)

    custom = {"v4jax": {"hf_config": hf_config, "weights": weights, "source": src,
                        "mesh": dict(mesh.shape), "rules": rules}}
    unit_nbytes = [sum(_stored_bytes(source, plan[p]) for p in unit) for unit in units]
    progress = progress or Progress("to-orbax", sum(unit_nbytes))
    if journal.done:
        progress(None, sum(unit_nbytes[i] for i in journal.done))
    def placed(path):
        """Read one variable and put it on the mesh. The shards' pages leave the resident set after each copy
        (read_leaf's stack / dequant, then device_put, which reads unstacked tensors straight from the map)
        and the host value dies on return: the peak is two copies of the variable."""
        value = read_leaf(source, path, plan[path], weights, int_dtype=variables[path].dtype)
        source.release()
        value = jax.tree.map(jax.device_put, value, leaf_sharding(variables[path], value, mesh, RULES[rules]))
        source.release()
        return value

    for i, unit in enumerate(units):
        if i in journal.done:
            continue
        try:
            ocp.partial.save(dst, to_orbax_tree({path: placed(path) for path in unit}), custom_metadata=custom)
        except PartialSaveReplacementError:
            pass  # committed by a run that was interrupted before it could record it in the journal
        _return_freed_memory()
        journal.commit(i)
        progress(unit[-1], unit_nbytes[i])
    ocp.partial.finalize(dst)
    journal.finish()
    for leftover in glob.glob(glob.escape(partial_dir) + ".orbax-checkpoint-tmp*"):  # a refused replacement's temp dir
        shutil.rmtree(leftover)
    if hasattr(progress, "close"):
        progress.close()


def _export_specs(path: str, meta, weights: str) -> dict:
    """{hub name: (dtype, shape)} the export writes for one stored variable, in hub_tensors' order."""
    out = {}
    lead = meta.shape[0] if _is_stacked(path, meta) else None
    shape = tuple(meta.shape[1:] if lead is not None else meta.shape)
    for e in ([None] if lead is None else range(lead)):
        name = hub.path_to_hub(path, e)
        fmt = hub.release_dtype(name)
        if weights == "release":
            out.update(hub.release_specs(name, shape))
        else:
            out[name] = (hub.BF16 if fmt in ("fp8", "fp4") else fmt, shape)
    return out


def export(src, dst, weights: str = "release", max_shard_bytes: int = 4 << 30, progress=None) -> None:
    """Orbax checkpoint `src` (from `convert`) -> released-layout safetensors directory `dst`. Resumable: run
    again after an interruption, it keeps the shards already written (hub.write_hub_checkpoint)."""
    if os.path.exists(dst):  # before the source is opened
        raise FileExistsError(f"{os.path.abspath(dst)} exists: choose a new output directory or delete it first")
    reader = OrbaxReader(src)
    write_hub(dst, {p: reader.stored[p] for p in reader.variables}, lambda path: reader.read([path])[path],
              dict(reader.custom["hf_config"]), weights, max_shard_bytes, progress,
              resume={"source": reader.path, "v4jax": reader.custom, "weights": weights})


def export_model(model, dst, weights: str = "release", max_shard_bytes: int = 4 << 30, progress=None) -> None:
    """A model in memory (e.g. fine-tuned by train/pretrain.py) -> released-layout safetensors directory `dst`,
    with the config.json of its ModelConfig."""
    variables = model_variables(model)
    write_hub(dst, variables, lambda path: variables[path].get_value(), model.cfg.to_hf_config(), weights,
              max_shard_bytes, progress)


def write_hub(dst, variables: dict, read, hf_config: dict, weights: str, max_shard_bytes: int, progress,
              resume=None) -> None:
    """Write variables {path: anything with .shape} in the official layout, reading each value with read(path)
    only when its tensors are due (one variable's tensors in memory at a time); `resume`: see
    hub.write_hub_checkpoint."""
    specs, leaf_of = {}, {}
    for path, meta in variables.items():
        s = _export_specs(path, meta, weights)
        specs.update(s)
        leaf_of.update({n: path for n in s})
    if weights == "release":  # the release's storage description
        hf_config.update(quantization_config=HF_FP8_QUANTIZATION, expert_dtype="fp4", torch_dtype="bfloat16")
    else:
        hf_config.pop("quantization_config", None)
        hf_config.pop("expert_dtype", None)
        hf_config["torch_dtype"] = "bfloat16"
    cache: dict = {}  # the hub tensors of the variable being written (tensors are written variable by variable)

    def produce(name):
        if name not in cache:
            path = leaf_of[name]
            cache.clear()
            _return_freed_memory()
            cache.update(hub_tensors(path, read(path), weights))
        return cache.pop(name)

    total = sum(math.prod(s) * np.dtype(d).itemsize for d, s in specs.values())
    progress = progress or Progress("to-hub", total)
    hub.write_hub_checkpoint(dst, specs, produce, max_shard_bytes,
                             extra_files={"config.json": json.dumps(hf_config, indent=2) + "\n"}, progress=progress,
                             resume=resume)
    if hasattr(progress, "close"):
        progress.close()


@nnx.jit
def verify_outputs(model, ids) -> list:
    """What verify compares, fp32: the logits [b, s, vocab] of ids [b, s]; with a DSpark drafter, the logits of the
    ids prefilled over a cache (which fills the drafter's rings) and the draft block after them (anchor: the last
    position's argmax): its Markov-corrected logits [b, B, vocab] and confidence logits [b, B]."""
    if model.dspark is None:
        return [model(ids)]
    logits, _, cache = model.step(model.init_cache(*ids.shape), ids)
    _, draft, confidence = model.draft(cache, jax.numpy.argmax(logits[:, -1], axis=-1))
    return [logits, draft, confidence]


def verify(hub_dir, orbax_dir, n_tokens: int = 16, seed: int = 0) -> float:
    """Max relative error (per position over the vocab; over the slots for the confidences) of the converted
    checkpoint's verify_outputs against the source's on `n_tokens` random token ids, both run in fp32 on one
    device."""
    cfg = ModelConfig.from_hf_config(_hf_config(hub_dir), compute_dtype="float32")
    ids = jax.numpy.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, (1, n_tokens)))
    source = abstract_model(cfg)
    load_hub_state(source, hub_dir)
    want = [np.asarray(a, np.float64) for a in verify_outputs(source, ids)]
    del source
    got = [np.asarray(a, np.float64) for a in verify_outputs(restore_orbax(orbax_dir, compute_dtype="float32"), ids)]
    return max(float(np.max(np.linalg.norm(g - w, axis=-1) / np.linalg.norm(w, axis=-1))) for g, w in zip(got, want))


def _parse_mesh(text: str | None) -> dict | None:
    if not text:
        return None
    try:
        mesh = {k: int(v) for k, v in (kv.split("=") for kv in text.split(","))}
    except ValueError:
        mesh = None
    if not mesh or min(mesh.values()) < 1:
        raise ValueError(f"--mesh {text!r}: write it as axis=size pairs with sizes >= 1, e.g. fsdp=4,expert=2")
    return mesh


def _positive(cast):
    """argparse type: cast(text), which must be > 0."""
    def parse(text: str):
        value = cast(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text} is not > 0")
        return value

    parse.__name__ = cast.__name__  # argparse names it in "invalid float value: 'x'"
    return parse


def _check_destination(dst: str) -> None:
    """Before anything is read: DST's folder exists and is writable (convert / export refuse an existing DST)."""
    dst = os.path.abspath(dst)
    parent = os.path.dirname(dst)
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"{parent}: no such folder to write {os.path.basename(dst)} into; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{parent}: not writable, so {os.path.basename(dst)} cannot be written there")


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help: every option's default, and the module docstring as written."""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="v4jax-convert", description=__doc__, formatter_class=_Help)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("to-orbax", help="released safetensors -> sharded Orbax checkpoint", formatter_class=_Help)
    a.add_argument("src", help="released-layout folder: config.json + safetensors shards")
    a.add_argument("dst", help="Orbax checkpoint folder to create")
    a.add_argument("--weights", default="quantized", choices=["quantized", "fp8", "float32", "bfloat16"],
                   help="quantized: FP8 + MXFP4 as released; fp8: experts re-encoded losslessly to FP8; "
                        "float32 / bfloat16: dequantized")
    a.add_argument("--mesh", help="mesh axis sizes, e.g. fsdp=4,expert=2 (None: one device)")
    a.add_argument("--rules", default="train", choices=sorted(RULES), help="logical axis -> mesh axis rules")
    a.add_argument("--unit-gb", type=_positive(float), default=1.0, help="bytes read and saved per step (memory bound)")
    a.add_argument("--verify", action="store_true",
                   help="then compare logits (and a DSpark drafter's drafts) of source and result")
    b = sub.add_parser("to-hub", help="Orbax checkpoint -> released-layout safetensors", formatter_class=_Help)
    b.add_argument("src", help="Orbax checkpoint folder written by to-orbax")
    b.add_argument("dst", help="released-layout folder to create")
    b.add_argument("--weights", default="release", choices=["release", "bfloat16"],
                   help="release: FP8 / MXFP4 as released; bfloat16: FP8 / FP4 tensors stored as BF16")
    b.add_argument("--shard-gb", type=_positive(float), default=4.0, help="largest shard size")
    c = sub.add_parser("verify", help="compare logits (and a DSpark drafter's drafts) of a safetensors checkpoint "
                                      "and its Orbax conversion", formatter_class=_Help)
    c.add_argument("hub_dir", help="released-layout folder")
    c.add_argument("orbax_dir", help="its Orbax conversion")
    c.add_argument("--tokens", type=_positive(int), default=16,
                   help="random token ids compared")
    for p in (a, b, c):
        p.add_argument("--debug", action="store_true",
                       help="show the traceback of an error (also: environment V4JAX_DEBUG=1)")
    args = ap.parse_args(argv)

    with cli_errors("v4jax-convert", args.debug):
        if args.cmd == "to-orbax":
            mesh = _parse_mesh(args.mesh)
            _check_destination(args.dst)
            if mesh and math.prod(mesh.values()) > 1:  # CPU hosts: fake devices (read when jax first starts)
                os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                           f" --xla_force_host_platform_device_count={math.prod(mesh.values())}")
            convert(args.src, args.dst, args.weights, mesh, args.rules, int(args.unit_gb * _GB))
            print(f"v4jax-convert: wrote {args.dst}")
            if args.verify:
                return _report_verify(args.src, args.dst, 16, args.weights)
        elif args.cmd == "to-hub":
            _check_destination(args.dst)
            export(args.src, args.dst, args.weights, int(args.shard_gb * _GB))
            print(f"v4jax-convert: wrote {args.dst}")
        else:
            weights = OrbaxReader(args.orbax_dir).custom["weights"]
            return _report_verify(args.hub_dir, args.orbax_dir, args.tokens, weights)
    return 0


def _report_verify(hub_dir, orbax_dir, n_tokens: int, weights: str) -> int:
    # Every format but bfloat16 holds the source's exact values: the logits must agree to rounding noise.
    tol = 2e-2 if weights == "bfloat16" else 1e-5
    err = verify(hub_dir, orbax_dir, n_tokens)
    ok = err <= tol
    print(f"v4jax-convert verify: max relative logits error {err:.3e} over {n_tokens} tokens "
          f"({'OK' if ok else 'FAIL'}, tolerance {tol:g} for {weights} weights)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
