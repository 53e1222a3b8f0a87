"""v4jax-convert housekeeping (issue 15): an interrupted to-hub resumes (finished shards kept and checked, nothing
else left behind), a resumed to-orbax reaches 100%, a lock file keeps two conversions out of one destination (a
dead holder's lock is taken over), and relative paths work for resumed conversions too."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO
from v4jax import hub
from v4jax.config import ModelConfig
from v4jax.convert import convert, export
from v4jax.convert import main as convert_main

SHARD = 2 << 20


class Interrupt(Exception):
    pass


def stop_after(k):
    """A progress callback that interrupts the conversion at its k-th call."""
    calls = []

    def progress(item, nbytes):
        calls.append(item)
        if len(calls) == k:
            raise Interrupt

    return progress


def stop_at_shard(partial, k):
    """A progress callback that interrupts to-hub once k shards are finished in `partial`."""
    def progress(item, nbytes):
        if len(glob.glob(os.path.join(partial, "*.safetensors"))) == k:
            raise Interrupt

    return progress


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny-preset checkpoint as released (5 shards) and its Orbax conversion."""
    root = tmp_path_factory.mktemp("tiny")
    hub.write_random_checkpoint(root / "src", ModelConfig.preset("tiny").to_hf_config(), 0, max_shard_bytes=SHARD)
    convert(root / "src", root / "orbax", unit_bytes=1 << 20, progress=lambda *a: None)
    return root


def test_interrupted_to_hub_resumes_keeping_finished_shards(tiny, tmp_path):
    dst, partial = tmp_path / "back", tmp_path / "back.partial"
    second = []
    with pytest.raises(Interrupt):
        export(tiny / "orbax", dst, max_shard_bytes=SHARD, progress=stop_at_shard(partial, 2))
    # what an interruption leaves: the finished shards and the journal; no temp files, no lock, no DST
    assert sorted(os.listdir(tmp_path)) == ["back.journal.json", "back.partial"]
    kept = sorted(os.listdir(partial))
    assert len(kept) == 2 and all(f.endswith(".safetensors") for f in kept)
    stamps = {f: os.stat(partial / f).st_mtime_ns for f in kept}
    kept_names = {n for f in kept for n in hub.SafetensorsFile(partial / f).keys()}
    with pytest.raises(ValueError, match="used other options"):  # resuming with another format is refused
        export(tiny / "orbax", dst, "bfloat16", max_shard_bytes=SHARD, progress=lambda *a: None)

    export(tiny / "orbax", dst, max_shard_bytes=SHARD, progress=lambda item, n: second.append(item))
    assert second[:2] == [None, None]  # the two kept shards, counted but not rewritten
    assert not kept_names & set(second[2:])
    assert {f: os.stat(dst / f).st_mtime_ns for f in kept} == stamps
    assert sorted(os.listdir(tmp_path)) == ["back"]
    assert hub.checkpoint_digest(dst) == hub.checkpoint_digest(tiny / "src")


def test_a_damaged_kept_shard_is_written_again(tiny, tmp_path):
    dst, partial = tmp_path / "back", tmp_path / "back.partial"
    with pytest.raises(Interrupt):
        export(tiny / "orbax", dst, max_shard_bytes=SHARD, progress=stop_at_shard(partial, 1))
    (shard,) = glob.glob(str(partial / "*.safetensors"))
    with open(shard, "r+b") as f:  # cut short, as by a disk that filled up under another writer
        f.truncate(os.path.getsize(shard) - 100)
    open(partial / "model-00002-of-00005.safetensors.x1y2.tmp", "wb").close()  # a killed writer's temp file
    written = []
    export(tiny / "orbax", dst, max_shard_bytes=SHARD, progress=lambda item, n: written.append(item))
    assert None not in written  # nothing kept: the damaged shard was rewritten
    assert hub.checkpoint_digest(dst) == hub.checkpoint_digest(tiny / "src")
    assert sorted(os.listdir(tmp_path)) == ["back"] and not glob.glob(str(dst / "*.tmp"))


def test_a_resumed_to_orbax_reaches_100_percent(tiny, tmp_path, capsys):
    with pytest.raises(Interrupt):
        convert(tiny / "src", tmp_path / "orbax", unit_bytes=1 << 20, progress=stop_after(2))
    capsys.readouterr()
    convert(tiny / "src", tmp_path / "orbax", unit_bytes=1 << 20)  # the default progress line, on stderr
    lines = capsys.readouterr().err.splitlines()
    assert lines and "100%" in lines[-1], lines
    assert sorted(os.listdir(tmp_path)) == ["orbax"]


def test_relative_paths_resume(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = os.path.relpath(tiny / "src")
    with pytest.raises(Interrupt):
        convert(src, "orbax", unit_bytes=1 << 20, progress=stop_after(3))
    convert(src, "orbax", unit_bytes=1 << 20, progress=lambda *a: None)
    with pytest.raises(Interrupt):
        export("orbax", "back", max_shard_bytes=SHARD, progress=stop_at_shard("back.partial", 1))
    export("orbax", "back", max_shard_bytes=SHARD, progress=lambda *a: None)
    assert hub.checkpoint_digest("back") == hub.checkpoint_digest(src)
    assert sorted(os.listdir(".")) == ["back", "orbax"]


def _kill_when(args, ready):
    """Runs `python -m v4jax.convert *args` and SIGKILLs it once ready() is true (it must not finish first)."""
    proc = subprocess.Popen([sys.executable, "-m", "v4jax.convert", *args], cwd=REPO, stderr=subprocess.DEVNULL)
    try:
        while not ready():
            assert proc.poll() is None, "the conversion finished before it could be killed"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_killed_conversions_resume_to_the_same_bytes(tiny, tmp_path):
    """SIGKILL in the middle of to-orbax, then of to-hub (each leaves its lock file, the journal and its partial
    output); the same commands run again take the stale locks over, resume and finish byte-identical."""
    orbax, back = str(tmp_path / "orbax"), str(tmp_path / "back")

    def units_done():  # the journal is replaced atomically: always whole
        return os.path.exists(orbax + ".journal.json") and json.load(open(orbax + ".journal.json"))["done"]

    _kill_when(["to-orbax", str(tiny / "src"), orbax, "--unit-gb", "0.0005"], units_done)
    assert {"orbax.lock", "orbax.journal.json", "orbax.partial_save"} <= set(os.listdir(tmp_path))
    assert convert_main(["to-orbax", str(tiny / "src"), orbax, "--unit-gb", "0.0005"]) == 0
    _kill_when(["to-hub", orbax, back, "--shard-gb", "0.002"],
               lambda: len(glob.glob(os.path.join(back + ".partial", "*.safetensors"))) >= 2)
    assert {"back.lock", "back.journal.json", "back.partial"} <= set(os.listdir(tmp_path))
    assert convert_main(["to-hub", orbax, back, "--shard-gb", "0.002"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["back", "orbax"]
    assert hub.checkpoint_digest(back) == hub.checkpoint_digest(tiny / "src")


HOLD_LOCK = """
import sys, time
from v4jax import hub
with hub.destination_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_a_second_conversion_into_the_same_destination_fails_at_once(tiny, tmp_path):
    dst = str(tmp_path / "out")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, dst], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(hub.DestinationLocked) as e:
            convert(tiny / "src", dst, progress=lambda *a: None)
        assert f"being written by process {holder.pid} on " in str(e.value) and f"{dst}.lock" in str(e.value)
        with pytest.raises(hub.DestinationLocked, match=f"process {holder.pid}"):
            export(tiny / "orbax", dst, progress=lambda *a: None)
        assert sorted(os.listdir(tmp_path)) == ["out.lock"]  # the refused conversions wrote nothing
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding it: the lock file stays, naming a dead process
        holder.wait()
    assert sorted(os.listdir(tmp_path)) == ["out.lock"]
    convert(tiny / "src", dst, unit_bytes=1 << 20, progress=lambda *a: None)  # the stale lock is taken over
    assert sorted(os.listdir(tmp_path)) == ["out"]
