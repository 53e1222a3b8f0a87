"""The CLIs take relative paths (issue 15): v4jax-convert to-orbax / verify / to-hub / to-orbax --verify and
v4jax-generate on an Orbax folder, all given as paths relative to the working directory (these failed with
`'NoneType' object has no attribute 'items'`: Orbax reads no metadata through a relative path)."""

from __future__ import annotations

from conftest import REPO
from ga_fixture import write_ga_fixture
from infer.cli import main as generate_main
from v4jax import hub
from v4jax.convert import main as convert_main


def test_convert_and_generate_take_relative_paths(tmp_path, monkeypatch, capsys):
    write_ga_fixture(tmp_path / "ga")
    monkeypatch.chdir(tmp_path)
    assert convert_main(["to-orbax", "ga", "orbax"]) == 0
    assert convert_main(["verify", "ga", "orbax", "--tokens", "16"]) == 0  # as --verify below: programs reused
    assert convert_main(["to-hub", "orbax", "back"]) == 0
    assert hub.checkpoint_digest("back") == hub.checkpoint_digest("ga")
    assert convert_main(["to-orbax", "ga", "orbax2", "--verify"]) == 0
    capsys.readouterr()
    tok = str(REPO / "train" / "assets" / "stdlib-bpe-1024.json")
    assert generate_main(["orbax", "--tokenizer", tok, "--prompt", "x = 1", "--max-new-tokens", "4"]) == 0
    from_orbax = capsys.readouterr().out
    assert generate_main(["ga", "--tokenizer", tok, "--prompt", "x = 1", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out == from_orbax
