"""Training data: tokenised shards on disk, and a loader that packs documents into rows (architecture §6.1 "Data").

Shard format (a folder): `meta.json` plus, per shard, `NNNNN.tokens.npy` (all documents' token ids back to
back, uint16 when the vocabulary fits, else uint32) and `NNNNN.docs.npy` (int64 document start offsets, with
the end as last entry). Every document starts with the tokenizer's `<|doc|>` (id 0). Files are memory-mapped.

Packing. Each epoch orders all documents by a permutation seeded with (seed, epoch) and concatenates them into
one token stream; the epochs follow each other. A row of length L is the L + 1 tokens at stream offsets
[o, o + L] (inputs are the first L, targets the last L), and the next row starts at o + L: no token is dropped
and there is no padding. `segment_ids` number the documents inside a row (0, 1, ...); the model restarts
positions at 0 at each document start, aligns compression windows to it (a tail shorter than the ratio makes
no entry) and lets no attention cross documents. A document cut by a row boundary continues in the next row as
that row's first document, from position 0. The loader's whole state is the stream offset: resuming at a saved
offset reproduces the batches exactly, and the row length or batch size may change between stages.

SFT data (`python -m train.chat pack`, format CHAT_FORMAT) comes as rows packed ahead of time, each with a
loss mask: RowStream reads them in an order permuted per epoch; stream offset o is row o // seq_len, so the
trainer's offset arithmetic is the same, and its stages must use the folder's seq_len. `open_corpus` picks the
loader from meta.json's format.

Commands:
    python -m train.data tokenize --input DIR [--pattern '**/*.txt'] --output OUT [--tokenizer T.json]
    python -m train.data stdlib --output OUT      # the embedded default corpus with the shipped tokenizer
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from train import tokenizer as tokenizer_lib
from train.cli import InputError, run
from v4jax.hub import file_inside, staged_folder

FORMAT = "v4jax-token-shards-1"
CHAT_FORMAT = "v4jax-chat-shards-1"  # train.chat's packed rows


# ---- writing ----------------------------------------------------------------------------------------------

def write_shards(docs, out: str | Path, vocab_size: int, shard_tokens: int = 1 << 24, info: dict | None = None):
    """Write an iterable of token-id sequences (each starting with <|doc|>) as shards; returns the meta dict.
    The folder appears atomically: it is written beside `out` and renamed when complete."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists: remove it or choose another --output")
    with staged_folder(out) as tmp:
        dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32
        shards, counts = [], np.zeros(vocab_size, np.int64)
        buf, starts, n = [], [0], 0

        def flush():
            name = f"{len(shards):05d}"
            np.save(tmp / f"{name}.tokens.npy", np.concatenate(buf).astype(dtype))
            np.save(tmp / f"{name}.docs.npy", np.asarray(starts, np.int64))
            shards.append({"name": name, "n_tokens": int(starts[-1]), "n_docs": len(starts) - 1})

        for ids in docs:
            ids = np.asarray(ids, np.int64)
            counts += np.bincount(ids, minlength=vocab_size)
            buf.append(ids)
            n += len(ids)
            starts.append(n)
            if n >= shard_tokens:
                flush()
                buf, starts, n = [], [0], 0
        if len(starts) > 1:
            flush()
        if not shards:
            raise ValueError("no documents to write")
        p = counts[counts > 0] / counts.sum()
        meta = {"format": FORMAT, "dtype": np.dtype(dtype).name, "vocab_size": vocab_size, "shards": shards,
                "n_tokens": int(counts.sum()), "n_docs": sum(s["n_docs"] for s in shards),
                "unigram_entropy_nats": float(-(p * np.log(p)).sum()), **(info or {})}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def tokenize_files(files: list[Path], out: str | Path, tokenizer_path: str | Path = tokenizer_lib.SHIPPED,
                   batch: int = 256) -> dict:
    """Tokenise text files (one document each) into shards, in the sorted order given."""
    tok = tokenizer_lib.load(tokenizer_path)

    def docs():
        for i in range(0, len(files), batch):
            texts = [f.read_text(encoding="utf-8", errors="replace") for f in files[i:i + batch]]
            for enc in tok.encode_batch(texts):
                yield [0] + enc.ids

    return write_shards(docs(), out, tok.get_vocab_size(), info={"tokenizer": str(tokenizer_path),
                                                                 "n_files": len(files)})


# ---- reading and packing ----------------------------------------------------------------------------------

class CorpusError(InputError):
    """A corpus folder that cannot be trained on: missing, not in this format, a shard outside the folder, empty."""


def shard_file(folder: Path, shard: dict, kind: str) -> Path:
    """`<folder>/<name>.<kind>.npy` of a meta.json shard entry; CorpusError unless it stays inside the folder."""
    name = shard.get("name") if isinstance(shard, dict) else None
    if not isinstance(name, str) or not name:
        raise CorpusError(f"{folder / 'meta.json'}: shard entry {shard!r} has no name")
    return Path(file_inside(folder, f"{name}.{kind}.npy", folder / "meta.json", CorpusError))


def read_meta(path: Path, fmt: str, make: str) -> dict:
    """meta.json of a `fmt` folder that lists shards, or a CorpusError saying how to make one."""
    meta_file = path / "meta.json"
    if not meta_file.exists():
        raise CorpusError(f"{meta_file} not found: {make}")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != fmt:
        raise CorpusError(f"{path} is not a {fmt} folder (format {meta.get('format')!r})")
    if not meta.get("shards"):
        raise CorpusError(f"{meta_file} lists no shards: the corpus is empty")
    return meta


def open_corpus(path: str | Path, seed: int):
    """The loader of a training data folder: RowStream for train.chat's packed rows, else PackedStream."""
    meta_file = Path(path) / "meta.json"
    try:
        fmt = json.loads(meta_file.read_text()).get("format") if meta_file.exists() else None
    except (ValueError, AttributeError):
        fmt = None
    return (RowStream if fmt == CHAT_FORMAT else PackedStream)(path, seed)


class PackedStream:
    """The epoch-permuted document stream of a shard folder, read as packed rows (module docstring)."""

    seq_len = None  # any row length

    def __init__(self, path: str | Path, seed: int):
        path = Path(path)
        self.meta = read_meta(path, FORMAT, "tokenise a corpus first with `python -m train.data`")
        self.seed = seed
        toks = [np.load(shard_file(path, s, "tokens"), mmap_mode="r") for s in self.meta["shards"]]
        starts = [np.load(shard_file(path, s, "docs")) for s in self.meta["shards"]]
        # one entry per document: (shard, start, length)
        self._tokens = toks
        self._doc_shard = np.concatenate([np.full(len(s) - 1, i) for i, s in enumerate(starts)])
        self._doc_start = np.concatenate([s[:-1] for s in starts])
        self._doc_len = np.concatenate([np.diff(s) for s in starts])
        self.epoch_tokens = int(self._doc_len.sum())
        # a target is a token after another of its document: a corpus of bare <|doc|> tokens has none
        if int(np.maximum(self._doc_len - 1, 0).sum()) == 0:
            raise CorpusError(f"{path}: no tokens to train on ({len(self._doc_len)} documents, all empty)")
        self._epoch_cache: tuple[int, np.ndarray, np.ndarray] | None = None

    def describe(self) -> str:
        m = self.meta
        return (f"{m['n_docs']} documents, {m['n_tokens']:,} tokens; unigram entropy "
                f"{m['unigram_entropy_nats']:.3f} nats/token")

    def _epoch(self, e: int):
        """(document order, cumulative end offsets) of epoch e."""
        if self._epoch_cache is None or self._epoch_cache[0] != e:
            order = np.random.default_rng([self.seed, e]).permutation(len(self._doc_len))
            self._epoch_cache = (e, order, np.cumsum(self._doc_len[order]))
        return self._epoch_cache[1:]

    def read(self, offset: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens [n] at stream offsets [offset, offset + n) and a document number per token (increasing)."""
        tokens, docs = [], []
        while n > 0:
            e, pos = divmod(offset, self.epoch_tokens)
            order, ends = self._epoch(e)
            k = int(np.searchsorted(ends, pos, side="right"))  # the document holding `pos`
            d = order[k]
            within = pos - (ends[k] - self._doc_len[d])
            take = min(n, int(self._doc_len[d] - within))
            start = self._doc_start[d] + within
            tokens.append(np.asarray(self._tokens[self._doc_shard[d]][start:start + take]))
            docs.append(np.full(take, len(docs)))
            offset, n = offset + take, n - take
        return np.concatenate(tokens).astype(np.int32), np.concatenate(docs).astype(np.int32)

    def batch(self, offset: int, rows: int, seq_len: int) -> dict[str, np.ndarray]:
        """`rows` packed rows of seq_len inputs starting at stream offset `offset`: tokens and segment_ids
        [rows, seq_len + 1] (the last column is the final target). The next batch starts at
        offset + rows * seq_len."""
        toks, segs = zip(*(self.read(offset + r * seq_len, seq_len + 1) for r in range(rows)))
        return {"tokens": np.stack(toks), "segment_ids": np.stack(segs)}


class RowStream:
    """train.chat's packed rows (module docstring): tokens, segment_ids and loss_mask [seq_len + 1] per row,
    memory-mapped, in an order permuted per epoch by (seed, epoch)."""

    KINDS = ("tokens", "segment_ids", "loss_mask")

    def __init__(self, path: str | Path, seed: int):
        path = Path(path)
        self.meta = read_meta(path, CHAT_FORMAT, "pack conversations first with `python -m train.chat pack`")
        self.seed, self.seq_len = seed, self.meta["seq_len"]
        self._shards = [{k: np.load(shard_file(path, s, k), mmap_mode="r") for k in self.KINDS}
                        for s in self.meta["shards"]]
        for s, arrays in zip(self.meta["shards"], self._shards):
            if any(a.shape != (s["n_rows"], self.seq_len + 1) for a in arrays.values()):
                raise CorpusError(f"{path}: shard {s['name']} does not hold {s['n_rows']} rows of "
                                  f"{self.seq_len + 1} as meta.json says: pack it again")
        self._starts = np.cumsum([0] + [s["n_rows"] for s in self.meta["shards"]])
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, its row permutation)
        if not sum(int(a["loss_mask"][:, 1:].sum()) for a in self._shards):
            raise CorpusError(f"{path}: no tokens to train on (the loss mask is 0 everywhere)")

    def describe(self) -> str:
        m = self.meta
        return (f"{m['n_conversations']} conversations packed in {m['n_rows']} rows of {self.seq_len + 1} tokens, "
                f"{m['n_loss_tokens']:,} of them trained (loss mask)")

    def batch(self, offset: int, rows: int, seq_len: int) -> dict[str, np.ndarray]:
        """Rows offset // seq_len ... + rows - 1 of the epoch-permuted order: {tokens, segment_ids, loss_mask}
        [rows, seq_len + 1]."""
        if seq_len != self.seq_len:
            raise CorpusError(f"the data's rows hold seq_len {self.seq_len} (+1) tokens but the stage asks for "
                              f"{seq_len}: set the stage's seq_len to {self.seq_len} or pack again")
        n = int(self._starts[-1])
        picked = []
        for i in range(offset // seq_len, offset // seq_len + rows):
            e, r = divmod(i, n)
            if self._order is None or self._order[0] != e:
                self._order = (e, np.random.default_rng([self.seed, e]).permutation(n))
            row = int(self._order[1][r])
            shard = int(np.searchsorted(self._starts, row, side="right")) - 1
            picked.append((shard, row - int(self._starts[shard])))
        return {k: np.stack([np.asarray(self._shards[s][k][r]) for s, r in picked]).astype(np.int32)
                for k in self.KINDS}


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m train.data", description="Tokenise text into training shards.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tokenize", help="tokenise a folder of text files (one document per file)")
    t.add_argument("--input", required=True)
    t.add_argument("--pattern", default="**/*.txt", help="glob of the files under --input")
    t.add_argument("--tokenizer", default=str(tokenizer_lib.SHIPPED))
    t.add_argument("--output", required=True)
    s = sub.add_parser("stdlib", help="the embedded default corpus: the Python standard library, shipped tokenizer")
    s.add_argument("--output", required=True)
    ap.add_argument("--debug", action="store_true", help="show the traceback of a known error too")
    args = ap.parse_args(argv)
    if args.cmd == "tokenize":
        files = sorted(p for p in Path(args.input).glob(args.pattern) if p.is_file())
        if not files:
            raise InputError(f"no files match {args.pattern!r} under {args.input}")
        tokenizer = args.tokenizer
    else:
        files, tokenizer = tokenizer_lib.stdlib_files(), tokenizer_lib.SHIPPED
    try:
        meta = tokenize_files(files, args.output, tokenizer)
    except FileExistsError as e:
        raise InputError(str(e)) from None
    print(f"{args.output}: {meta['n_docs']} documents, {meta['n_tokens']:,} tokens in {len(meta['shards'])} "
          f"shard(s); unigram entropy {meta['unigram_entropy_nats']:.3f} nats/token")


if __name__ == "__main__":
    run(main, "train.data")
