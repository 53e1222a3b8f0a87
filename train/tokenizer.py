"""Tokenizers for training, and the embedded default corpus: the Python standard library's own sources.

Every machine with Python 3.12 has the standard library, so it serves as the default corpus (about 11 MB of
`.py` files, tests and site-packages excluded). The shipped tokenizer `train/assets/stdlib-bpe-1024.json` is a byte-level
BPE with 1024 entries (the tiny preset's vocab_size) trained on it with the `tokenizers` library; id 0 is
`<|doc|>`, which starts every document. Retrain one (any size, any folder):

    python -m train.tokenizer --input DIR --vocab-size 1024 --output my-tokenizer.json
"""

from __future__ import annotations

import argparse
import sysconfig
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

DOC = "<|doc|>"
SHIPPED = Path(__file__).parent / "assets" / "stdlib-bpe-1024.json"


def stdlib_files() -> list[Path]:
    """The standard library's .py files, sorted, without test suites and installed packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idle_test"}
    return sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts[:-1]))


def train_tokenizer(files: list[Path], vocab_size: int) -> Tokenizer:
    """Byte-level BPE: 256 byte tokens + merges up to vocab_size, with <|doc|> as id 0."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[DOC],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([str(f) for f in files], trainer)
    return tok


def load(path: str | Path = SHIPPED) -> Tokenizer:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer file {path} does not exist: train one with `python -m train.tokenizer`")
    tok = Tokenizer.from_file(str(path))
    if tok.token_to_id(DOC) != 0:
        raise ValueError(f"tokenizer {path} must have {DOC} as id 0 (the document start the loader relies on)")
    return tok


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m train.tokenizer", description="Train a byte-level BPE tokenizer.")
    ap.add_argument("--input", help="folder of text files (default: the Python standard library)")
    ap.add_argument("--pattern", default="**/*.py", help="glob of the files to read under --input")
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--output", required=True)
    args = ap.parse_args(argv)
    files = sorted(Path(args.input).glob(args.pattern)) if args.input else stdlib_files()
    if not files:
        raise SystemExit(f"no files match {args.pattern!r} under {args.input}")
    train_tokenizer(files, args.vocab_size).save(args.output)
    print(f"trained a {args.vocab_size}-entry BPE on {len(files)} files -> {args.output}")


if __name__ == "__main__":
    main()
