"""Weights in and out of the v4jax parameter tree (architecture §5): the released safetensors <-> model variables, and
restoring a converted Orbax checkpoint onto any mesh.

The hub (official) name <-> v4jax path <-> HF name table lives in v4jax.hub (numpy-only, shared with the HF
oracle). The v4jax tree mirrors the official module names; routed experts `ffn.experts.E.w{1,2,3}` are stacked
along a leading expert axis in `ffn.experts.w{1,2,3}`. Shapes stay in the checkpoint's [out, in] layout, so no
tensor is transposed. The model's config says which layout `mtp.*` holds: the preview's MTP block (`mtp.0.X` ->
`mtp.X`) or, for a GA config (cfg.dspark), the DSpark drafter's stages (`mtp.S.X` -> `dspark.stages.S.X`).

A weight can be held in one of these forms (`weights=`):
  * None / "float32" / "bfloat16": dense (FP8 and MXFP4 dequantized), for training;
  * "quantized": as released: FP8 tensors become `formats.Fp8Weight` (e4m3 + UE8M0 128x128 scales), MXFP4 experts
    `formats.Mxfp4Weight` (packed e2m1 + UE8M0 1x32 scales); the model's matmuls read them through `quant.dense`;
  * "fp8": like "quantized" with the experts re-encoded losslessly to FP8 (official convert.py --expert-dtype fp8).
Unquantized tensors keep their stored dtype in "quantized" / "fp8" form, and take the variable's dtype once in a
model. UE8M0 scales are kept as their raw uint8 exponent bytes.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from v4jax import hub
from v4jax.hub import hub_to_path, path_to_hub
from v4jax.model import abstract_model, model_variables
from v4jax.formats import Fp8Weight, Mxfp4Weight, QuantizedWeight
from v4jax.sharding import logical_to_spec

WEIGHT_FORMATS = (None, "float32", "bfloat16", "quantized", "fp8")
_DENSE = {None: np.float32, "float32": np.float32, "bfloat16": ml_dtypes.bfloat16}  # dense forms' numpy dtype
_STACKED = re.compile(r"\.experts\.w[123]$")


def _is_stacked(path: str, var) -> bool:
    return bool(_STACKED.search(path)) and len(var.shape) == 3


def hub_names(model: nnx.Module) -> list[str]:
    """Every hub tensor name (without FP8/FP4 `.scale` companions) the model's weights correspond to."""
    names = []
    for path, var in model_variables(model).items():
        if _is_stacked(path, var):
            names += [path_to_hub(path, e) for e in range(var.shape[0])]
        else:
            names.append(path_to_hub(path))
    return names


class CheckpointMismatch(ValueError):
    """The weights do not fit the model: the message lists the offending tensor names."""


def _scale_name(name: str) -> str:
    return name[: -len(".weight")] + ".scale"


def _stored_shape(name: str, source: Mapping) -> tuple[tuple[int, ...], str | None]:
    """(logical [.., out, in] shape, problem or None) of a hub tensor from its stored dtype / shape alone."""
    w = source[name]
    scale = source[_scale_name(name)] if name.endswith(".weight") and _scale_name(name) in source else None
    if scale is None:
        if w.dtype in (hub.E4M3, hub.UE8M0):
            return w.shape, f"{name}: dtype {w.dtype} without its {_scale_name(name)} block scales"
        return w.shape, None
    if w.dtype in (np.int8, np.uint8):  # MXFP4: pairs packed along K
        shape, grid = (*w.shape[:-1], 2 * w.shape[-1]), (*w.shape[:-1], -(-2 * w.shape[-1] // 32))
    elif w.dtype == ml_dtypes.float8_e4m3fn:
        shape, grid = w.shape, (*w.shape[:-2], -(-w.shape[-2] // 128), -(-w.shape[-1] // 128))
    else:
        return w.shape, f"{name}: dtype {w.dtype} with a .scale is neither FP8 e4m3 nor packed FP4"
    if scale.dtype not in (ml_dtypes.float8_e8m0fnu, np.uint8, np.float32):
        return shape, f"{_scale_name(name)}: dtype {scale.dtype} is not a UE8M0 or F32 scale"
    if tuple(scale.shape) != grid:
        return shape, f"{_scale_name(name)}: shape {tuple(scale.shape)} but its weight needs {grid}"
    return shape, None


def _mtp_layout_problem(cfg, names) -> str | None:
    """What is wrong with the layout of the checkpoint's `mtp.*` tensors for the config (the preview's MTP block,
    or a GA DSpark drafter of cfg.n_mtp_layers stages), with the fix; None if it fits."""
    only = hub.mtp_layout_names(names)
    if only[False] and only[True]:
        return (f"the mtp.* tensors fit neither layout: {only[False][:3]} belong to the preview's MTP block, "
                f"{only[True][:3]} to a GA DSpark drafter; the checkpoint mixes two releases: re-download it")
    stages = len({n.split(".")[1] for n in names if n.startswith("mtp.")})
    if cfg.dspark and only[False]:
        return (f"the checkpoint's mtp.* tensors are the preview's MTP block (e.g. {only[False][:2]}) but the "
                f"config is a GA one with a {cfg.n_mtp_layers}-stage DSpark drafter: load it with a preview config "
                "(its own config.json, no dspark_* fields; preset flash or pro)")
    if not cfg.dspark and only[True]:
        return (f"the checkpoint's mtp.* tensors are a GA DSpark drafter of {stages} stages (e.g. {only[True][:2]}) "
                "but the config is a preview one (one MTP block, no dspark_* fields): load it with its own "
                "config.json (ModelConfig.from_hf_config(checkpoint_dir) reads the dspark_* fields) or a GA preset "
                "(flash-0731, pro-0813)")
    if cfg.dspark and stages and stages != cfg.n_mtp_layers:
        return (f"the checkpoint's DSpark drafter has {stages} stages (mtp.0 .. mtp.{stages - 1}) but the config's "
                f"n_mtp_layers is {cfg.n_mtp_layers}: give the config n_mtp_layers = {stages} (and compress_ratios "
                f"with n_layers + {stages} entries)")
    return None


def plan_hub(model: nnx.Module, source: Mapping) -> dict[str, list[str]]:
    """{v4jax path: hub names (one, or one per expert)} after checking, from headers only, that `source`
    ({hub name: array}, e.g. a hub.HubCheckpoint) fits the model: the mtp.* layout (the preview's MTP block or a
    GA DSpark drafter, as the model's config says), unknown, missing and orphan-scale names, shapes and dtypes;
    every problem is listed in one CheckpointMismatch."""
    variables = model_variables(model)
    plan: dict[str, dict[int | None, str]] = {}
    unknown, problems = [], []
    for name in source.keys():
        if name.endswith(".scale"):
            if name[: -len(".scale")] + ".weight" not in source:
                problems.append(f"{name}: a scale without its .weight")
            continue
        try:
            path, expert = hub_to_path(name, model.cfg.dspark)
        except KeyError:
            path, expert = None, None
        if path not in variables or expert is not None and expert >= variables[path].shape[0]:
            unknown.append(name)
            continue
        plan.setdefault(path, {})[expert] = name
        shape, problem = _stored_shape(name, source)
        var = variables[path]
        want = tuple(var.shape[1:] if expert is not None else var.shape)
        integer = source[name].dtype.kind in "iu" and _scale_name(name) not in source  # tid2eid
        if problem:
            problems.append(problem)
        elif tuple(shape) != want:
            problems.append(f"{name}: shape {tuple(shape)} but the config needs {want}")
        elif integer != (np.dtype(var.dtype).kind in "iu"):
            problems.append(f"{name}: dtype {source[name].dtype} but the model holds {var.dtype}")
    if unknown:
        problems.insert(0, f"unknown tensors (not in this config's model): {sorted(unknown)}")
    missing = sorted(set(hub_names(model)) - set(source.keys()))
    if missing:
        problems.insert(0, f"missing tensors: {missing}")
    layout = _mtp_layout_problem(model.cfg, list(source.keys()))
    if layout:
        problems.insert(0, layout)
    if problems:
        raise CheckpointMismatch("checkpoint does not match the model config:\n  " + "\n  ".join(problems))
    return {p: [names[e] for e in sorted(names, key=lambda e: -1 if e is None else e)] for p, names in plan.items()}


def read_leaf(source: Mapping, path: str, names: list[str], weights: str | None, int_dtype=np.int32):
    """The value of the v4jax variable `path` from its hub tensor(s) `names` (one per expert for stacked
    experts), as numpy: a dense array, or a Fp8Weight / Mxfp4Weight holding numpy arrays."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights={weights!r}: choose one of {WEIGHT_FORMATS}")

    def one(name):
        w = source[name]
        scale = source[_scale_name(name)] if name.endswith(".weight") and _scale_name(name) in source else None
        if scale is None:  # stored unquantized: tid2eid, or BF16 / F32 (kept as stored for quantized forms)
            if w.dtype.kind in "iu":
                return np.asarray(w).astype(int_dtype)
            return np.asarray(w) if weights in ("quantized", "fp8") else np.asarray(w).astype(_DENSE[weights])
        mxfp4 = w.dtype in (np.int8, np.uint8)
        if weights in _DENSE:
            return (hub.dequant_fp4(w, scale) if mxfp4 else hub.dequant_fp8(w, scale)).astype(_DENSE[weights])
        s = np.asarray(scale)
        s = s if s.dtype == np.float32 else s.view(np.uint8)  # UE8M0 kept as raw exponent bytes
        if not mxfp4:
            return Fp8Weight(np.asarray(w), s)
        if weights == "fp8":
            q, s8 = hub.fp4_to_fp8(w, s)
            return Fp8Weight(q, s8.view(np.uint8))
        return Mxfp4Weight(np.asarray(w).view(np.uint8), s)

    values = [one(n) for n in names]
    if not _STACKED.search(path):
        return values[0]
    return jax.tree.map(lambda *xs: np.stack(xs), *values)


def _logical_axes(var) -> tuple:
    md = var.get_metadata()  # flax renamed the key across versions
    return tuple(md.get("out_sharding") or md.get("sharding_names") or md.get("sharding") or ())


def leaf_sharding(var, value, mesh: jax.sharding.Mesh, rules: dict):
    """NamedShardings for `value` (an array, or the arrays of a QuantizedWeight) from the variable's logical
    axes. Packed FP4 and block scales share the weight's axes; a mesh axis that does not divide a dimension of
    that array (a 4-row scale grid over 8 devices) leaves that dimension replicated."""
    spec = logical_to_spec(_logical_axes(var), rules)

    def size(ax):  # a rule may name one mesh axis or a tuple of them
        return math.prod(mesh.shape[m] for m in ((ax,) if isinstance(ax, str) else ax))

    def fit(a):
        axes = [ax if ax is not None and a.shape[i] % size(ax) == 0 else None
                for i, ax in enumerate(tuple(spec) + (None,) * (len(a.shape) - len(spec)))]
        return NamedSharding(mesh, PartitionSpec(*axes))

    return jax.tree.map(fit, value)


def abstract_quantized_leaf(path: str, var, mesh: jax.sharding.Mesh, rules: dict):
    """What `load_hub_state(model, src, weights="quantized", mesh=mesh, rules=rules)` puts in variable `path`, as
    ShapeDtypeStructs with their shardings, from the release's name table alone (no checkpoint): a Fp8Weight /
    Mxfp4Weight (uint8 scales, uint8 packed nibbles) where the release quantizes the tensor, else the variable's
    own shape and dtype. For planning the memory of a quantized base (train.plan --lora)."""
    stacked = _is_stacked(path, var)
    name = path_to_hub(path, 0 if stacked else None)
    lead = tuple(var.shape[:1]) if stacked else ()
    fmt = hub.release_dtype(name)
    if fmt in ("fp8", "fp4"):
        (w_dtype, w_shape), (_, s_shape) = hub.release_specs(name, var.shape[len(lead):]).values()
        data = jax.ShapeDtypeStruct(lead + w_shape, w_dtype if fmt == "fp8" else np.uint8)
        scale = jax.ShapeDtypeStruct(lead + s_shape, np.uint8)
        value = Fp8Weight(data, scale) if fmt == "fp8" else Mxfp4Weight(data, scale)
    else:
        value = jax.ShapeDtypeStruct(var.shape, var.dtype)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), value,
                        leaf_sharding(var, value, mesh, rules))


def _assign(var, value) -> None:
    """Set a variable from a device value: dense arrays take the variable's dtype, quantized stay as they are."""
    if not isinstance(value, QuantizedWeight):
        value = value.astype(var.dtype) if value.dtype != var.dtype else value
    var.set_value(value)


def load_hub_state(model: nnx.Module, source, weights: str | None = None, mesh=None, rules=None) -> None:
    """Set every weight of `model`, in place, from released-layout tensors: a checkpoint directory, a
    hub.HubCheckpoint, or a {hub name: array} dict (quantized with `.scale`s, or already dequantized).

    `weights` picks dense or quantized storage (module docstring). With `mesh` + `rules` every array is placed
    sharded by its logical axes. Unknown names, missing names (e.g. a hash layer's tid2eid), orphan scales,
    shape and dtype mismatches raise CheckpointMismatch listing all of them; nothing is assigned unless
    everything fits.
    """
    if isinstance(source, (str, os.PathLike)):
        source = hub.HubCheckpoint(source)
    variables = model_variables(model)
    plan = plan_hub(model, source)
    values = {}
    for path, names in plan.items():
        var = variables[path]
        value = read_leaf(source, path, names, weights, int_dtype=var.dtype)
        if mesh is not None:
            value = jax.tree.map(jax.device_put, value, leaf_sharding(var, value, mesh, rules))
        else:
            value = jax.tree.map(jnp.asarray, value)
        values[path] = value
    for path, value in values.items():  # the flat state holds the model's own Variable objects
        _assign(variables[path], value)


def _host_dense(value) -> np.ndarray:
    """A leaf value on the host as a dense numpy array (quantized storage dequantized to fp32)."""
    value = jax.tree.map(lambda a: np.asarray(jax.device_get(a)), value)
    if isinstance(value, Fp8Weight):
        return hub.dequant_fp8(value.data, value.scale)
    if isinstance(value, Mxfp4Weight):
        return hub.dequant_fp4(value.packed, value.scale)
    return value


def export_hub_state(model: nnx.Module) -> dict[str, np.ndarray]:
    """The model's weights as an unquantized hub-named state dict (fp32 / int32), experts unstacked."""
    out = {}
    for path, var in model_variables(model).items():
        arr = _host_dense(var.get_value())
        if arr.dtype.kind not in "iu":
            arr = arr.astype(np.float32)
        if _is_stacked(path, var):
            out.update({path_to_hub(path, e): arr[e] for e in range(arr.shape[0])})
        else:
            out[path_to_hub(path)] = arr
    return out


def hub_tensors(path: str, value, weights: str = "release") -> dict[str, np.ndarray]:
    """One variable's value (numpy or device arrays; dense or quantized) as {hub name: array} for a
    safetensors export. `weights="release"`: the released storage (FP8 / MXFP4 with UE8M0 scales, BF16, F32,
    I64); quantized values already in that format are passed through byte for byte, others re-encoded
    (value-exact for anything decoded from the release). `"bfloat16"`: FP8 / FP4 tensors as BF16, the rest as
    released."""
    if weights not in ("release", "bfloat16"):
        raise ValueError(f"weights={weights!r}: choose 'release' or 'bfloat16'")
    value = jax.tree.map(lambda a: np.asarray(jax.device_get(a)), value)
    lead = value.shape[0] if _STACKED.search(path) and len(value.shape) == 3 else None
    parts = [(path_to_hub(path), value)] if lead is None else [
        (path_to_hub(path, e), jax.tree.map(lambda a: a[e], value)) for e in range(lead)]
    out = {}
    for name, v in parts:
        fmt = hub.release_dtype(name)
        raw_ue8m0 = isinstance(v, QuantizedWeight) and v.scale.dtype == np.uint8
        if weights == "release" and fmt == "fp8" and isinstance(v, Fp8Weight) and raw_ue8m0:
            out.update({name: v.data, _scale_name(name): v.scale.view(ml_dtypes.float8_e8m0fnu)})
        elif weights == "release" and fmt == "fp4" and isinstance(v, Mxfp4Weight) and raw_ue8m0:
            out.update({name: v.packed.view(np.int8), _scale_name(name): v.scale.view(ml_dtypes.float8_e8m0fnu)})
        elif weights == "release":
            out.update(hub.encode_release(name, _host_dense(v)))
        else:
            out[name] = _host_dense(v).astype(hub.BF16 if fmt in ("fp8", "fp4") else fmt)
    return out


# ----------------------------------------------------------------------------- Orbax trees
def to_orbax_tree(values: dict[str, object]) -> dict:
    """{dotted path: value} -> the nested dict Orbax stores (a quantized value becomes {data|packed, scale})."""
    tree: dict = {}
    for path, value in values.items():
        node = tree
        *parents, leaf = path.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        if isinstance(value, Fp8Weight):
            value = {"data": value.data, "scale": value.scale}
        elif isinstance(value, Mxfp4Weight):
            value = {"packed": value.packed, "scale": value.scale}
        node[leaf] = value
    return tree


def _from_orbax_leaf(value):
    if isinstance(value, dict):
        return Mxfp4Weight(value["packed"], value["scale"]) if "packed" in value else Fp8Weight(value["data"], value["scale"])
    return value


def orbax_leaves(tree: dict, prefix: str = "") -> dict[str, object]:
    """The inverse of to_orbax_tree: nested dict -> {dotted path: array or quantized value}."""
    out = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict) and set(v) not in ({"data", "scale"}, {"packed", "scale"}):
            out.update(orbax_leaves(v, path + "."))
        else:
            out[path] = _from_orbax_leaf(v)
    return out


class OrbaxReader:
    """A checkpoint written by v4jax-convert: its v4jax metadata (`custom`: hf_config, weights, source), the
    stored leaves' metadata, and `read(paths, mesh, rules)` restoring any subset onto any mesh."""

    def __init__(self, path, **config_overrides):
        import orbax.checkpoint.experimental.v1 as ocp

        from v4jax.config import ModelConfig

        self.path = os.path.abspath(path)  # Orbax reads no metadata through a relative path
        if not ocp.is_orbax_checkpoint(self.path):
            raise hub.CheckpointError(
                f"{self.path}: not a finished Orbax checkpoint (an interrupted conversion leaves "
                f"{self.path}.partial_save instead: rerun the same v4jax-convert command to finish it)")
        meta = ocp.metadata(self.path)
        self.custom = (meta.custom_metadata or {}).get("v4jax")
        if self.custom is None:
            raise hub.CheckpointError(f"{self.path}: an Orbax checkpoint without v4jax metadata; "
                                      "convert released weights with v4jax-convert")
        self.stored = orbax_leaves(meta.metadata)  # {path: ArrayMetadata, or a quantized value of them}
        self.config = ModelConfig.from_hf_config(self.custom["hf_config"], **config_overrides)
        self.model = abstract_model(self.config)
        self.variables = model_variables(self.model)
        missing, unknown = sorted(set(self.variables) - set(self.stored)), sorted(set(self.stored) - set(self.variables))
        if missing or unknown:
            raise CheckpointMismatch(f"{self.path} does not match its own config: missing {missing}, unknown {unknown}")

    def read(self, paths, mesh=None, rules=None) -> dict:
        """{path: value} restored onto `mesh` by the rules (default: one device), resharding as needed."""
        import orbax.checkpoint.experimental.v1 as ocp

        from v4jax.sharding import TRAIN_RULES, make_mesh

        mesh = mesh if mesh is not None else make_mesh({"data": 1}, jax.devices()[:1])
        target = {}
        for p in paths:
            sharding = leaf_sharding(self.variables[p], self.stored[p], mesh, rules or TRAIN_RULES)
            target[p] = jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s),
                                     self.stored[p], sharding)
        ctx = ocp.Context()
        ctx.pytree.loading.partial_load = len(target) < len(self.variables)
        with ctx:
            return orbax_leaves(ocp.load_pytree(self.path, to_orbax_tree(target)))


def restore_orbax(path, mesh=None, rules=None, **config_overrides):
    """The model of a v4jax-convert checkpoint, every array restored onto `mesh` by `rules` whatever mesh it
    was converted for (default: one device). Quantized checkpoints give quantized Params."""
    reader = OrbaxReader(path, **config_overrides)
    for p, value in reader.read(list(reader.variables), mesh, rules).items():
        _assign(reader.variables[p], value)
    return reader.model
