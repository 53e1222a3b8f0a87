"""Token shards and the packing loader (train/data.py), and the tokenizer (train/tokenizer.py)."""

from __future__ import annotations

import numpy as np
import pytest

from train import tokenizer as tokenizer_lib
from train.data import CorpusError, PackedStream, tokenize_files, write_shards


def make_docs(n=40, seed=0, vocab=50):
    rng = np.random.default_rng(seed)
    return [np.concatenate([[0], rng.integers(1, vocab, rng.integers(3, 60))]) for _ in range(n)]


@pytest.fixture
def shards(tmp_path):
    docs = make_docs()
    write_shards(docs, tmp_path / "s", vocab_size=50, shard_tokens=300)  # several shards
    return tmp_path / "s", docs


def test_rows_tile_the_permuted_document_stream(shards):
    path, docs = shards
    s = PackedStream(path, seed=3)
    assert len(s.meta["shards"]) > 2 and s.epoch_tokens == sum(map(len, docs))
    L, rows = 16, 5
    b = s.batch(0, rows, L)
    # consecutive rows overlap by one token (the last target is the next row's first input)
    assert (b["tokens"][:-1, -1] == b["tokens"][1:, 0]).all()
    stream = np.concatenate([b["tokens"][0]] + [r[1:] for r in b["tokens"][1:]])
    order = np.random.default_rng([3, 0]).permutation(len(docs))
    expect = np.concatenate([docs[i] for i in order])[: len(stream)]
    assert (stream == expect).all()
    # a new segment starts exactly where a document starts (<|doc|> = 0), except at column 0
    seg = b["segment_ids"]
    assert (seg[:, 0] == 0).all()
    assert ((np.diff(seg, axis=1) == 1) == (b["tokens"][:, 1:] == 0)).all()
    assert (np.diff(seg, axis=1) >= 0).all()


def test_exact_resume_and_stage_changes(shards):
    """The state is the stream offset: reading on from any offset gives the same tokens as one long read,
    across epoch boundaries and with a different row length."""
    path, _ = shards
    a, b = PackedStream(path, seed=1), PackedStream(path, seed=1)
    n = 3 * a.epoch_tokens + 17  # three epochs and a bit
    whole, docs = a.read(0, n)
    first = b.batch(0, 4, 32)
    offset = 4 * 32
    second = b.batch(offset, 3, 50)  # a later stage: other row length and batch size
    again = np.concatenate([first["tokens"][:, :-1].ravel(), second["tokens"][:, :-1].ravel()])
    assert (again == whole[: len(again)]).all()
    # epochs are permuted differently, each a permutation of all documents
    E = a.epoch_tokens
    assert not (whole[:E] == whole[E:2 * E]).all()
    assert sorted(whole[:E]) == sorted(whole[E:2 * E])
    # a different seed gives a different order
    assert not (PackedStream(path, seed=2).read(0, E)[0] == whole[:E]).all()


def test_write_is_atomic_and_refuses_to_overwrite(shards, tmp_path):
    path, docs = shards
    with pytest.raises(FileExistsError, match="already exists"):
        write_shards(docs, path, vocab_size=50)
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())
    with pytest.raises(CorpusError, match="tokenise a corpus first"):
        PackedStream(tmp_path / "missing", 0)


def test_tokenize_folder_round_trips_text(tmp_path):
    texts = {"a.txt": "def f(x):\n    return x * 2\n", "b.txt": "import os\nprint(os.getcwd())\n"}
    for name, t in texts.items():
        (tmp_path / name).write_text(t)
    meta = tokenize_files(sorted(tmp_path.glob("*.txt")), tmp_path / "out")
    assert meta["n_docs"] == 2 and meta["vocab_size"] == 1024
    s = PackedStream(tmp_path / "out", 0)
    tokens = np.load(tmp_path / "out" / "00000.tokens.npy")
    starts = np.load(tmp_path / "out" / "00000.docs.npy")
    tok = tokenizer_lib.load()
    decoded = [tok.decode(tokens[starts[i] + 1:starts[i + 1]].tolist()) for i in range(2)]
    assert decoded == [texts["a.txt"], texts["b.txt"]]
    assert tokens[starts[:-1]].tolist() == [0, 0] and s.epoch_tokens == len(tokens)
    # the unigram entropy in meta.json is the entropy of the token frequencies
    p = np.bincount(tokens) / len(tokens)
    p = p[p > 0]
    assert abs(meta["unigram_entropy_nats"] - float(-(p * np.log(p)).sum())) < 1e-9


def test_shipped_tokenizer_fits_the_tiny_preset():
    from v4jax.config import ModelConfig

    tok = tokenizer_lib.load()
    assert tok.get_vocab_size() == ModelConfig.preset("tiny").vocab_size
    assert tok.token_to_id(tokenizer_lib.DOC) == 0
    assert len(tokenizer_lib.stdlib_files()) > 100
