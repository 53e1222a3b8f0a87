"""Bytes a decode step reads, counted load by load: the step runs under valgrind's callgrind with its cache
simulator, and the lines its loads bring into a simulated 1 MiB cache (one core's private caches) are set beside
`v4jax.cost.decode_read_bytes` (issue 16 item 2: "the cost model and a measured bytes-per-step figure agree").

    .venv/bin/python -m bench cache_reads        # the default runs, into docs/perf/results.json, docs/performance.md
    .venv/bin/python -m bench.cache_reads [--configs demo tiny] [--formats bf16 fp8+fp4] [--lengths 4096 262144]
        [--steps 2] [--jobs 2]

Why a simulator: this machine is a VM without hardware performance counters (`perf` sees no memory events), so
memory traffic cannot be read off the CPU; callgrind instead executes every instruction of the compiled step and
feeds each load to a cache model. The figure is exact for that model, not a DRAM reading: bytes read = the step's
read misses x 64 in a simulated 1 MiB, 8-way cache of 64-byte lines (valgrind's --D1: one core's private L1 + L2
on this AMD EPYC, whose L2 is 1 MiB, 8-way), i.e. what the step reads from the shared L3 or from memory. Data read
again after leaving that cache counts again, so a strided, transposed or repeated pass shows up (a transposed
copy of the BF16 indexer keys did: kernels/indexer/reference.index_scores), while temporaries that live and die
within it do not. Misses are counted per object over three scopes (count): the compiled CPU kernels
(kernels/cpu_ffi.py's libraries; the figure set beside the model, see below), all kernels (those, XLA's compiled
code without a file, "???", and its runtime and kernel libraries, libjax_common.so) and the whole process (also
the allocator and memcpy of libc, and Python).

Method, one child process per (config, cache format, length), run under `valgrind --tool=callgrind --cache-sim=yes
--instr-atstart=no` (XLA told to emit AVX2 code: valgrind 3.19 runs no AVX-512): the child builds the model with
random weights (bench/decode.build), its indexers' head weights made positive (positive_index_weights: why),
fills a cache of capacity length + steps + 1 up to `length` tokens with random rows (every layer's window ring,
compressed entries and indexer keys written through kv_cache.write; which rows a step reads does not depend on
their values: CSA reads its top-k rows whatever they are), compiles infer.generate's `_step` for one token, runs
one step uninstrumented, then switches the simulation on (callgrind's client requests, through a small C shim that
gcc compiles from valgrind's callgrind.h at run time), runs `steps` steps and switches it off. Before each step
the shim reads 4 MiB of its own with callgrind's collection off (sim_cold: simulated, not counted), so every step
starts from a cold simulated cache: without it, which weights the previous step left in the cache varied from run
to run by up to 0.5 MiB per step (a 256 KiB weight read 108-256 KiB), as large as the demo's FP8 + FP4 growth at
256K is small (2.5 MiB). What remains of that noise is in XLA's code, libc and Python: two runs of `--configs demo
--formats fp8+fp4 --lengths 4096 262144` (2026-12-07, ending 21:51 and 21:56 UTC) gave whole-process growths of
1.89 and 2.80 MiB, the compiled CPU kernels' growths 2.54 and 2.54 MiB (per object: libc -0.35 / +0.32 MiB, XLA's
code -0.23 / -0.11 MiB). The compiled step reads the buffers that grow with L (compressed entries, indexer keys)
only in those kernels (cache_readers checks its HLO), so their growth is the figure set beside the model; the
others are reported too. Weights, activations and the dispatch are the same at every length: the growth of the
bytes read over the shortest length L0 is what the cache costs, set beside the model's decode_read_bytes(L) -
decode_read_bytes(L0). Children run `--jobs` at a time (valgrind runs a process on one core).

Configs and formats are bench.long_context's (`demo`: V4's layer plan 0 0 4 128 with one indexer head of 64).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from bench.long_context import CONFIGS, FORMATS, capacity_for  # noqa: E402
from v4jax import cost  # noqa: E402

LENGTHS = {"demo": [4096, 262144, 1048576], "tiny": [4096, 262144]}
QUICK_LENGTHS = [1024, 4096]
STEPS = 2
LINE = 64
L1 = "--D1=1048576,8,64"  # the simulated cache whose misses are counted (valgrind calls it D1)
SHIM = """#include <valgrind/callgrind.h>
void sim_on(void) { CALLGRIND_ZERO_STATS; CALLGRIND_START_INSTRUMENTATION; }
void sim_off(void) { CALLGRIND_STOP_INSTRUMENTATION; }
static volatile char cold[4 << 20];
void sim_cold(void) {
  CALLGRIND_TOGGLE_COLLECT;
  for (unsigned long i = 0; i < sizeof cold; i += 64) (void)cold[i];
  CALLGRIND_TOGGLE_COLLECT;
}
"""


def build_shim(folder: str) -> str:
    """Compile the client-request shim into folder -> the .so path; a clear error if valgrind's headers or gcc
    are missing."""
    missing = [t for t in ("valgrind", "gcc") if shutil.which(t) is None]
    if missing:
        raise RuntimeError(f"bench.cache_reads needs {' and '.join(missing)} on PATH: install valgrind (it ships "
                           "callgrind.h) and gcc, e.g. `apt-get install valgrind gcc`")
    src, lib = os.path.join(folder, "shim.c"), os.path.join(folder, "libsim.so")
    with open(src, "w") as f:
        f.write(SHIM)
    p = subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", lib, src], capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"gcc could not build the callgrind shim (is valgrind/callgrind.h installed? it comes "
                           f"with valgrind's development headers): {p.stderr.strip()[-400:]}")
    return lib


def by_object(path: str) -> dict[str, dict[str, int]]:
    """A callgrind output file's self costs summed per object (shared library; "???" = code without a file: XLA's
    compiled kernels) -> {object: {event: count}}. Cost lines after a `calls=` line are the callee's inclusive
    cost and are skipped (its self cost appears under its own object)."""
    events, names, ob, sums, skip = [], {}, "?", {}, False
    with open(path) as f:
        for ln in f:
            if ln.startswith("events:"):
                events = ln.split()[1:]
            elif ln.startswith(("ob=", "cob=")):  # "(id) name" defines an id, "(id)" refers to it
                ref, _, name = ln.split("=", 1)[1].strip().partition(" ")
                if name:
                    names[ref] = name
                if ln.startswith("ob="):
                    ob = ref
            elif ln.startswith("calls="):
                skip = True
            elif ln[:1].isdigit() or ln[:1] in "+-*":
                if not skip:
                    acc = sums.setdefault(names.get(ob, ob), [0] * len(events))
                    for i, v in enumerate(ln.split()[1:]):
                        acc[i] += int(v)
                skip = False
    if not events:
        raise ValueError(f"{path} is no callgrind output (no events line)")
    return {o: dict(zip(events, v)) for o, v in sums.items()}


SCOPES = ("process", "kernels", "cache_kernels")


def count(objects: dict, event: str, scope: str = "process") -> int:
    """An event's total over by_object's objects in a scope: "process" (all), "kernels" (XLA's compiled kernels
    ("???"), libjax_common.so (its runtime and kernel libraries, e.g. YNNPACK's reductions and dots) and the compiled
    CPU kernels) or "cache_kernels" (the compiled CPU kernels alone: kernels/cpu_ffi.build's <op>_cpu_<hash>.so, the
    decode step's only readers of the cache: cache_readers)."""
    def cpu_kernel(o):
        return "_cpu_" in os.path.basename(o)

    keep = {"process": lambda o: True, "cache_kernels": cpu_kernel,
            "kernels": lambda o: o == "???" or o.endswith("libjax_common.so") or cpu_kernel(o)}[scope]
    return sum(v.get(event, 0) for o, v in objects.items() if keep(o))


def cache_readers(hlo: str) -> list[str]:
    """The operations of a compiled step (its optimized HLO text) that take a cache buffer growing with the
    context (a parameter named cache.layers[..].entries.. / .index_keys..) as an operand, following the scatters
    that write the new rows in place (their result is the same buffer): a custom call's target, a fusion's called
    computation without its number, else the opcode; the step's output tuple left out."""
    entry = hlo[hlo.index("\nENTRY"):]
    names = set(re.findall(r'%(\S+) = \S+ parameter\(\d+\), metadata=\{op_name="cache\.layers\[\d+\]\.'
                           r'(?:entries|index_keys)', entry))
    found = set()
    for ln in entry.splitlines():  # a scheduled module lists an instruction after its operands
        m = re.match(r"\s*(?:ROOT )?%(\S+) = (?:\([^)]*\)|\S+) ([\w-]+)\(", ln)
        if not m or m.group(2) in ("parameter", "tuple") or not any(
                re.search(rf"[(, ]%{re.escape(n)}[,)]", ln) for n in names):
            continue
        target = re.search(r'custom_call_target="([^"]+)"', ln) or re.search(r"calls=%([A-Za-z_-]+)", ln)
        kind = target.group(1).rstrip("_.") if target else m.group(2)
        found.add(kind)
        if "scatter" in kind:
            names.add(m.group(1))
    return sorted(found)


def simulate(python_args: list[str], out: str) -> subprocess.CompletedProcess:
    """Run this Python with python_args under callgrind's cache simulation, switched off until the program calls
    the shim's sim_on; the counts go to the file `out` (read it with by_object)."""
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_cpu_max_isa=AVX2").strip(),
               JAX_PLATFORMS="cpu")
    cmd = ["valgrind", "--tool=callgrind", "--cache-sim=yes", "--instr-atstart=no", L1, "--I1=32768,8,64",
           "--LL=33554432,16,64", f"--callgrind-out-file={out}", sys.executable, *python_args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)


# ---- the child: one (config, format, length), under valgrind ---------------------------------------------------
def filled_cache(model, capacity: int, length: int, kv_format: str, index_format: str):
    """A cache of `capacity` slots whose every stored row up to `length` tokens holds random values."""
    import jax
    import jax.numpy as jnp

    from v4jax import kv_cache

    cfg = model.cfg
    cache = model.init_cache(1, capacity, kv_format, index_format)
    keys = iter(jax.random.split(jax.random.PRNGKey(0), 3 * len(cache.layers)))

    def fill(buf, dim):
        if buf is None:
            return None
        n = jax.tree.leaves(buf)[0].shape[1]
        return kv_cache.write(buf, jax.random.normal(next(keys), (1, n, dim)), jnp.arange(n)[None])

    layers = tuple(lc._replace(window=fill(lc.window, cfg.head_dim), entries=fill(lc.entries, cfg.head_dim),
                               index_keys=fill(lc.index_keys, cfg.index_head_dim)) for lc in cache.layers)
    return cache._replace(layers=layers, lengths=jnp.full((1,), length, jnp.int32))


def positive_index_weights() -> None:
    """Make every indexer's head weights |w| (in this process): then each visible key can score above 0 and the scan
    reads every one, as decode_read_bytes counts. With random weights a query's single index head (the demo's) has
    a negative weight half the time; its scores are then all <= -0 and the indexer kernel rightly stops after k
    slots, reading a small part of the keys (the run of 2026-12-07 18:01 UTC: 0.08-0.26x the model's growth)."""
    import jax.numpy as jnp

    from v4jax.attention import Indexer

    queries = Indexer.queries

    def positive(self, *args):
        q, w = queries(self, *args)
        return q, jnp.abs(w)

    Indexer.queries = positive


def compiled_step(config: str, fmt: str, length: int, steps: int, kernels: str = "auto"):
    """The demo / tiny model (random weights), a cache filled to `length` with room for `steps` more,
    infer.generate's `_step` compiled for one token -> (step, leaves, cache, token, one)."""
    import jax.numpy as jnp

    from bench.decode import build
    from infer.generate import _step, split

    model = build(CONFIGS[config].replace(kernels=kernels))
    static, leaves = split(model)
    cache = filled_cache(model, capacity_for(length + steps + 1), length, *FORMATS[fmt])
    one, token = jnp.ones((1,), jnp.int32), jnp.zeros((1, 1), jnp.int32)
    return _step.lower(static, leaves, cache, token, one).compile(), leaves, cache, token, one


def child(spec: dict) -> dict:
    import ctypes

    import jax

    sim = ctypes.CDLL(spec["shim"])
    positive_index_weights()  # before tracing; patches this child process only
    steps = spec["steps"]
    step, leaves, cache, token, one = compiled_step(spec["config"], spec["format"], spec["length"], steps)
    readers = cache_readers(step.as_text())
    _, _, cache = step(leaves, cache, token, one)  # warm-up, not simulated
    jax.block_until_ready(cache)
    t0 = time.perf_counter()
    sim.sim_on()
    for _ in range(steps):
        sim.sim_cold()
        logits, _, cache = step(leaves, cache, token, one)
        jax.block_until_ready((logits, cache))
    sim.sim_off()
    return {"simulated_s": time.perf_counter() - t0, "cache_readers": readers}


# ---- the parent ----------------------------------------------------------------------------------------------
def spawn(spec: dict, folder: str) -> dict:
    """One child under callgrind -> the spec with its per-step counts, or an "error"."""
    out = os.path.join(folder, f"callgrind.{spec['config']}.{spec['format']}.{spec['length']}")
    t0 = time.perf_counter()
    p = simulate(["-m", "bench.cache_reads", "--child", json.dumps(spec)], out)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    row = {k: spec[k] for k in ("config", "format", "length", "steps")}
    if p.returncode or not lines:
        return {**row, "error": f"exit status {p.returncode}: {p.stderr.strip()[-800:]}"}
    objects, n = by_object(out), spec["steps"]
    return {**row, **json.loads(lines[-1][len("RESULT "):]), "wall_s": time.perf_counter() - t0,
            **{f"{scope}_read_bytes": count(objects, "D1mr", scope) * LINE / n for scope in SCOPES},
            "loads": count(objects, "Dr") / n, "instructions": count(objects, "Ir") / n}


def analyse(rows: list[dict]) -> None:
    """Per (config, format): each row's model bytes and both growths over the shortest length that ran."""
    for r in rows:
        kv_format, index_format = FORMATS[r["format"]]
        r["model_bytes"] = sum(cost.decode_read_bytes(CONFIGS[r["config"]], r["length"], kv_format,
                                                      index_format).values())
    for key in {(r["config"], r["format"]) for r in rows}:
        done = sorted((r for r in rows if (r["config"], r["format"]) == key and "process_read_bytes" in r),
                      key=lambda r: r["length"])
        for r in done[1:]:
            r["base_length"] = done[0]["length"]
            r["model_growth"] = r["model_bytes"] - done[0]["model_bytes"]
            for scope in SCOPES:
                r[f"{scope}_growth"] = r[f"{scope}_read_bytes"] - done[0][f"{scope}_read_bytes"]
            r["ratio"] = r["cache_kernels_growth"] / r["model_growth"]


def collect(configs, formats, lengths: dict, steps: int, jobs: int, keep: str | None = None) -> dict:
    """Every (config, format, length) -> the result; keep: a folder to leave the callgrind files in (read them
    with callgrind_annotate --sort=D1mr), else a temporary one."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = keep or tmp
        os.makedirs(folder, exist_ok=True)
        shim = build_shim(folder)
        specs = [{"config": c, "format": f, "length": n, "steps": steps, "shim": shim}
                 for c in configs for f in formats for n in sorted(lengths[c])]
        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
            rows = list(pool.map(lambda s: spawn(s, folder), specs))
    analyse(rows)
    for r in rows:
        print(line(r), flush=True)
    return {"steps": steps, "l1": L1, "rows": rows}


def _mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:.2f}"


def line(r: dict) -> str:
    head = f"{r['config']} {r['format']} {r['length']}:"
    if "error" in r:
        return f"{head} {r['error']}"
    tail = (f"; growth over {r['base_length']}: cache kernels {_mib(r['cache_kernels_growth'])} vs model "
            f"{_mib(r['model_growth'])} MiB ({r['ratio']:.3f}); process {_mib(r['process_growth'])}, kernels "
            f"{_mib(r['kernels_growth'])}" if "ratio" in r else "")
    return (f"{head} read {_mib(r['process_read_bytes'])} MiB/step, model (cache) {_mib(r['model_bytes'])} MiB; "
            f"cache readers {', '.join(r['cache_readers'])}" + tail)


def run(out_dir, quick: bool = False) -> dict:
    lengths = {c: QUICK_LENGTHS for c in LENGTHS} if quick else LENGTHS
    return collect(["demo"] if quick else list(LENGTHS), list(FORMATS), lengths, 1 if quick else STEPS, 2)


def _readers(names: list[str]) -> str:
    short = {"wrapped_scatter_computation": "scatter"}
    return ", ".join(short.get(n, n.removeprefix("v4jax_")) for n in names)


def markdown(result: dict) -> str:
    lines = [f"Decode steps under valgrind's callgrind cache simulation (bench/cache_reads.py: why and how): *read* "
             f"is the step's read misses x 64 bytes in a simulated {result['l1'][5:]} (bytes, ways, line) cache, one "
             f"core's private caches here, per step: the mean of {result['steps']} simulated steps after an "
             "unsimulated one, each started from a cold cache; *growth* is read(L) - read(L0), L0 the shortest "
             "length, beside the cost model's decode_read_bytes(L) - decode_read_bytes(L0) (cache bytes only: "
             "weights and activations are the same at every length). Counted over three scopes: the *cache "
             "kernels* (the compiled CPU kernels, kernels/*/cpu_kernel.cc: in the compiled step the only readers "
             "of the buffers that grow with L, besides the scatters that write the new row in place: *cache "
             "readers*, from its HLO), all *kernels* (those, XLA's compiled code and libjax_common.so) and the whole "
             "*process* (also libc's allocator and memcpy, and Python). The last two also move with where the "
             "allocator puts the weights and buffers (conflict misses in the simulated cache; "
             "bench/cache_reads.py: how much). Random weights (the indexers' head weights made positive, so that "
             "the scan visits every visible key: positive_index_weights) and randomly filled caches; XLA's AVX2 "
             "code (valgrind runs no AVX-512).", "",
             "| config | cache | tokens | read MiB/step | model MiB/step | cache-kernel growth MiB | "
             "model growth MiB | cache-kernel growth / model | kernel growth MiB | process growth MiB | "
             "instructions / step | cache readers |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(result["rows"], key=lambda r: (r["config"], r["format"], r["length"])):
        if "error" in r:
            lines.append(f"| {r['config']} | {r['format']} | {r['length']} | failed: {r['error'][:120]} |" + " |" * 8)
            continue
        ratio = f"**{r['ratio']:.3f}**" if "ratio" in r else "-"
        lines.append(f"| {r['config']} | {r['format']} | {r['length']} | {_mib(r['process_read_bytes'])} | "
                     f"{_mib(r['model_bytes'])} | {_mib(r.get('cache_kernels_growth'))} | "
                     f"{_mib(r.get('model_growth'))} | {ratio} | "
                     f"{_mib(r.get('kernels_growth'))} | {_mib(r.get('process_growth'))} | "
                     f"{r['instructions'] / 1e6:.1f}M | {_readers(r['cache_readers'])} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=list(LENGTHS), choices=sorted(CONFIGS))
    p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=sorted(FORMATS))
    p.add_argument("--lengths", nargs="+", type=int, default=None, help="tokens (default: per config, see LENGTHS)")
    p.add_argument("--steps", type=int, default=STEPS, help="simulated decode steps per length")
    p.add_argument("--jobs", type=int, default=2, help="children at a time (each runs on one core)")
    p.add_argument("--keep", default=None, help="a folder to keep the callgrind output files in")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print("RESULT " + json.dumps(child(json.loads(a.child))), flush=True)
        return
    lengths = {c: a.lengths or LENGTHS.get(c, QUICK_LENGTHS) for c in a.configs}
    collect(a.configs, a.formats, lengths, a.steps, a.jobs, a.keep)


if __name__ == "__main__":
    main()
