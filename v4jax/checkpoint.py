"""Weights in and out of the v4jax parameter tree: the hub (official) name <-> v4jax path map (spec §5.2).

The v4jax tree mirrors the official module names, so the map is a few rules:
  * `.weight` suffixes are dropped (except the router's `gate.weight`, which sits beside `gate.bias`);
  * `hc_{attn,ffn,head}_{fn,base,scale}` -> `hc_{attn,ffn,head}.{fn,base,scale}`;
  * `mtp.0.` -> `mtp.`;
  * routed experts `ffn.experts.E.w{1,2,3}` are stacked along a leading expert axis in `ffn.experts.w{1,2,3}`.
Shapes stay in the checkpoint's [out, in] layout, so no tensor is transposed.
"""

from __future__ import annotations

import re
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(w[123])$")


def hub_to_path(name: str) -> tuple[str, int | None]:
    """Hub tensor name -> (v4jax parameter path, routed-expert index or None)."""
    n = re.sub(r"^mtp\.0\.", "mtp.", name)
    n = re.sub(r"(^|\.)hc_(attn|ffn|head)_(fn|base|scale)$", r"\1hc_\2.\3", n)
    n = re.sub(r"(?<!\.gate)\.weight$", "", n)
    m = _EXPERT.match(n)
    return (f"{m[1]}.{m[3]}", int(m[2])) if m else (n, None)


def path_to_hub(path: str, expert: int | None = None) -> str:
    """The inverse of hub_to_path."""
    n = re.sub(r"^mtp\.", "mtp.0.", path)
    if expert is not None:
        n = re.sub(r"\.experts\.(w[123])$", rf".experts.{expert}.\1", n)
    n, hc = re.subn(r"(^|\.)hc_(attn|ffn|head)\.(fn|base|scale)$", r"\1hc_\2_\3", n)
    if hc:
        return n
    if re.search(r"(attn_sink|\.ape|\.bias|\.tid2eid|gate\.weight)$", n):
        return n
    return n + ".weight"


def model_variables(model: nnx.Module) -> dict[str, nnx.Variable]:
    """Flat {dotted path: variable} of every parameter and buffer of the model."""
    flat = nnx.to_flat_state(nnx.state(model))
    return {".".join(str(k) for k in path): var for path, var in flat}


def hub_names(model: nnx.Module) -> list[str]:
    """Every hub tensor name (without FP8/FP4 `.scale` companions) the model's weights correspond to."""
    names = []
    for path, var in model_variables(model).items():
        if re.search(r"\.experts\.w[123]$", path) and len(var.shape) == 3:
            names += [path_to_hub(path, e) for e in range(var.shape[0])]
        else:
            names.append(path_to_hub(path))
    return names


class CheckpointMismatch(ValueError):
    """The weights do not fit the model: the message lists the offending tensor names."""


def load_hub_state(model: nnx.Module, state: dict[str, np.ndarray]) -> None:
    """Set every weight of `model` from a dequantized hub-named state dict (see v4jax.hub), in place.

    Unknown names, missing names (e.g. a hash layer's tid2eid) and shape mismatches raise CheckpointMismatch
    listing all of them; nothing is assigned unless everything fits.
    """
    variables = model_variables(model)
    stacked: dict[str, dict[int, np.ndarray]] = defaultdict(dict)
    plain: dict[str, np.ndarray] = {}
    unknown = []
    for name, arr in state.items():
        path, expert = hub_to_path(name)
        if path not in variables:
            unknown.append(name)
        elif expert is None:
            plain[path] = arr
        else:
            stacked[path][expert] = arr
    problems = []
    if unknown:
        problems.append(f"unknown tensors (not in this config's model): {sorted(unknown)}")
    missing = sorted(set(hub_names(model)) - set(state))
    if missing:
        problems.append(f"missing tensors: {missing}")
    for path, experts in stacked.items():
        if path in plain or len(experts) != variables[path].shape[0]:
            continue  # reported as missing / unknown above
        plain[path] = np.stack([experts[e] for e in range(len(experts))])
    for path, arr in plain.items():
        want = tuple(variables[path].shape)
        if tuple(arr.shape) != want:
            problems.append(f"{path_to_hub(path)}: shape {tuple(arr.shape)} but the config needs {want}")
    if problems:
        raise CheckpointMismatch("checkpoint does not match the model config:\n  " + "\n  ".join(problems))
    for path, arr in plain.items():  # the flat state holds the model's own Variable objects
        var = variables[path]
        var.set_value(jnp.asarray(arr, dtype=var[...].dtype))


def export_hub_state(model: nnx.Module) -> dict[str, np.ndarray]:
    """The model's weights as an unquantized hub-named state dict (fp32 / int), experts unstacked."""
    out = {}
    for path, var in model_variables(model).items():
        arr = np.asarray(jax.device_get(var[...]))
        if arr.dtype != np.int32:
            arr = arr.astype(np.float32)
        if re.search(r"\.experts\.w[123]$", path) and arr.ndim == 3:
            out.update({path_to_hub(path, e): arr[e] for e in range(arr.shape[0])})
        else:
            out[path_to_hub(path)] = arr
    return out
