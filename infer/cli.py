"""`v4jax-generate`: generate text from a checkpoint over the compressed KV cache, streaming tokens.

    v4jax-generate CHECKPOINT [key=value ...] --tokenizer tokenizer.json --prompt "def " [--adapters DIR]
                   [--max-new-tokens 64] [--temperature 0.8] [--top-k 0] [--top-p 1.0] [--seed 0]
                   [--speculative {mtp,dspark} [--confidence 0.5]] [--kv-format fp8 --index-format fp4]

CHECKPOINT is one of: a released-layout folder (config.json + safetensors, FP8 / MXFP4 loaded as is), a folder
written by `v4jax-convert to-orbax`, or a training run config (configs/train/*.yaml, with key=value overrides
as for train.pretrain: its latest checkpoint, and the tokenizer its data was made with; this is how a training
run is sampled). --adapters DIR puts LoRA adapters written by `python -m train.export ... --adapters-only`
(PEFT-style) on the base. Python: `load_model(...)` then `infer.generate.generate(...)`.

infer/ sits above train/ (it restores runs with train.pretrain.restore_run and reads train's tokenizers); train/
does not import infer/.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from infer.generate import SamplingParams, generate, generate_dspark, generate_speculative
from v4jax.config import ModelConfig, cli_errors
from v4jax.model import Transformer


def load_model(checkpoint: str, adapters: str | None = None, run_overrides: tuple[str, ...] = (),
               **config_overrides):
    """-> (model, tokenizer path or None) for any of the three checkpoint kinds (see the module docstring), with
    the LoRA adapters of the folder `adapters` attached (v4jax.lora.load_adapters) if given; `run_overrides`:
    key=value overrides of a training run config."""
    model, tokenizer_path = _load_base(checkpoint, run_overrides, config_overrides)
    if adapters:
        from v4jax.lora import load_adapters

        load_adapters(model, adapters)
    return model, tokenizer_path


def _load_base(checkpoint: str, run_overrides, config_overrides):
    from flax import nnx

    from v4jax.checkpoint import load_hub_state, restore_orbax

    path = Path(checkpoint)
    if path.suffix in (".yaml", ".yml"):
        from train.pretrain import restore_run

        model, tokenizer_path, _ = restore_run([checkpoint, *run_overrides])
        return model, tokenizer_path
    if run_overrides:
        raise ValueError(f"{' '.join(run_overrides)}: key=value overrides are for a training run config (.yaml), "
                         f"and {checkpoint} is not one: drop them")
    if not path.is_dir():
        raise FileNotFoundError(f"{checkpoint}: not a folder or a run config (.yaml); see v4jax-generate --help")
    if (path / "config.json").exists() and any(path.glob("*.safetensors")):
        model = Transformer(ModelConfig.from_hf_config(path / "config.json", **config_overrides), rngs=nnx.Rngs(0))
        load_hub_state(model, path, weights="quantized")
        return model, None
    return restore_orbax(path, **config_overrides), None


class TextStream:
    """Incremental detokenization for streaming: `add(tokens)` returns the text they add, holding back a trailing
    character whose UTF-8 bytes are not all there yet (a byte-level tokenizer may split one across tokens and
    decodes the incomplete part as U+FFFD); `flush()` returns whatever is still held back."""

    def __init__(self, tokenizer):
        self.tokenizer, self.tokens, self.printed = tokenizer, [], 0

    def add(self, tokens: list[int]) -> str:
        self.tokens.extend(tokens)
        text = self.tokenizer.decode(self.tokens)
        return self._emit(text, len(text.rstrip("\ufffd")))

    def flush(self) -> str:
        text = self.tokenizer.decode(self.tokens)
        return self._emit(text, len(text))

    def _emit(self, text: str, upto: int) -> str:
        out = text[self.printed:upto]
        self.printed = max(self.printed, upto)
        return out


def main(argv=None) -> int:
    from train import tokenizer as tokenizer_lib

    ap = argparse.ArgumentParser(prog="v4jax-generate", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("checkpoint", help="released-layout folder, to-orbax folder or training run config (.yaml)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of a training run config")
    ap.add_argument("--adapters", help="folder of LoRA adapters to put on the base (train.export --adapters-only)")
    ap.add_argument("--tokenizer", help="tokenizer.json (a training run brings its own)")
    ap.add_argument("--prompt", default="", help="text to continue")
    ap.add_argument("--bos", type=int, default=0, help="token put before the prompt (-1: none)")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated at most")
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ap.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    ap.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set of this probability")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    ap.add_argument("--stop", type=int, nargs="*", default=[], help="stop token ids")
    ap.add_argument("--speculative", nargs="?", const="mtp", choices=["mtp", "dspark"],
                    help="mtp: greedy decoding with the preview's MTP drafts; dspark: the GA checkpoints' DSpark "
                         "drafter (greedy or sampled, lossless)")
    ap.add_argument("--confidence", type=float, help="dspark: cut each draft block at the first slot whose "
                    "confidence is below this (0..1)")
    ap.add_argument("--kv-format", choices=["fp32", "bf16", "fp8"], help="KV cache storage (None: compute dtype)")
    ap.add_argument("--index-format", choices=["fp32", "bf16", "fp8", "fp4"],
                    help="indexer key storage (None: compute dtype)")
    ap.add_argument("--debug", action="store_true",
                    help="show the traceback of an error (also: environment V4JAX_DEBUG=1)")
    args = ap.parse_args(argv)
    with cli_errors("v4jax-generate", args.debug):
        return _run(args, tokenizer_lib)


def _run(args, tokenizer_lib) -> int:
    # cheap checks before the weights load
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            max_new_tokens=args.max_new_tokens, stop_tokens=tuple(args.stop), seed=args.seed)
    if not args.tokenizer and Path(args.checkpoint).suffix not in (".yaml", ".yml"):
        raise ValueError("no tokenizer: pass --tokenizer path/to/tokenizer.json (only a training run brings its own)")
    if args.tokenizer and not Path(args.tokenizer).is_file():
        raise FileNotFoundError(f"no tokenizer file at {args.tokenizer}: pass the path of a tokenizer.json")
    if args.adapters and not Path(args.adapters).is_dir():
        raise FileNotFoundError(f"--adapters {args.adapters}: no such folder; pass the folder that "
                                "`python -m train.export ... --adapters-only --out DIR` wrote")
    if args.confidence is not None and not 0 <= args.confidence <= 1:
        raise ValueError(f"--confidence {args.confidence}: give a threshold between 0 and 1")
    if args.confidence is not None and args.speculative != "dspark":
        raise ValueError("--confidence cuts DSpark draft blocks: use it with --speculative dspark")

    model, run_tokenizer = load_model(args.checkpoint, args.adapters, tuple(args.overrides))
    if not (args.tokenizer or run_tokenizer):
        raise ValueError("no tokenizer: pass --tokenizer path/to/tokenizer.json")
    tok = tokenizer_lib.load(args.tokenizer or run_tokenizer)
    if tok.get_vocab_size() > model.cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tok.get_vocab_size()} tokens but the model's vocabulary is "
                         f"{model.cfg.vocab_size}: pass the tokenizer the model was trained with")
    prompt = ([args.bos] if args.bos >= 0 else []) + tok.encode(args.prompt).ids
    print(args.prompt, end="", flush=True)
    start = time.perf_counter()
    stream = TextStream(tok)

    def show(new: list[int]) -> None:
        print(stream.add(new), end="", flush=True)

    if args.speculative == "mtp":
        tokens, rate = generate_speculative(model, prompt, args.max_new_tokens, tuple(args.stop))
        print(tok.decode(tokens), flush=True)
        extra = f", MTP draft acceptance {rate:.0%}"
    elif args.speculative == "dspark":
        out, stats = generate_dspark(model, [prompt], params, confidence=args.confidence,
                                     on_tokens=lambda rows: show(rows[0]),
                                     kv_format=args.kv_format, index_format=args.index_format)
        tokens = out[0]
        print(stream.flush())
        extra = (f"; DSpark: {stats.mean_accepted:.2f} drafts accepted per pass ({stats.accepted}/{stats.drafted}), "
                 f"{stats.tokens_per_pass:.2f} tokens per target pass, "
                 f"{stats.emitted / max(stats.seconds, 1e-9):.1f} tokens/s after the first token")
    else:
        tokens = generate(model, [prompt], params, on_tokens=lambda step_tokens: show([int(step_tokens[0])]),
                          kv_format=args.kv_format, index_format=args.index_format)[0]
        print(stream.flush())
        extra = ""
    seconds = time.perf_counter() - start
    print(f"[{len(tokens)} tokens in {seconds:.2f}s, {len(tokens) / seconds:.1f} tokens/s incl. compilation{extra}]",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
