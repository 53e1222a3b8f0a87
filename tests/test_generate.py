"""Generation: sampling rules, batched generation, MTP self-speculation equal to greedy, the CLI (plain, MTP,
DSpark)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from infer.generate import SamplingParams, generate, generate_dspark, generate_speculative, sample
from test_decode import _model


def test_sampling_rules():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    key = jax.random.key(0)
    assert int(sample(logits, key, SamplingParams())[0]) == 0
    keys = jax.random.split(key, 400)
    draw = lambda p: np.asarray([int(sample(logits, k, p)[0]) for k in keys])  # noqa: E731
    assert set(draw(SamplingParams(temperature=1.0, top_k=2))) == {0, 1}
    assert set(draw(SamplingParams(temperature=1.0, top_p=0.7))) == {0, 1}  # 0.5 < 0.7 <= 0.8
    full = draw(SamplingParams(temperature=1.0))
    assert set(full) == {0, 1, 2, 3} and abs((full == 0).mean() - 0.5) < 0.1


def test_batched_generation_equals_each_alone_and_speculation_equals_greedy():
    model = _model()
    rng = np.random.default_rng(3)
    prompts = [list(rng.integers(0, 1024, n)) for n in (9, 23)]
    params = SamplingParams(max_new_tokens=12)
    together = generate(model, prompts, params)
    max_len = max(map(len, prompts)) + params.max_new_tokens + 2  # one cache size for both: shared programs
    for i, p in enumerate(prompts):
        assert generate(model, [p], params, max_len=max_len)[0] == together[i]
        tokens, rate = generate_speculative(model, p, 12, max_len=max_len)
        assert tokens == together[i] and 0.0 <= rate <= 1.0


def test_on_device_decode_loop_equals_the_streaming_loop_and_the_full_forward(monkeypatch):
    """generate without on_tokens (one compiled lax.while_loop) draws exactly the streaming loop's tokens, greedy
    and sampled, with rows of different lengths stopping at different stop tokens; greedy tokens are the argmax
    of the full forward pass over prompt + tokens so far; the streaming loop makes one step per token after the
    first (no step after the last token)."""
    import infer.generate as G

    forward = nnx.jit(lambda m, ids: m(ids))
    model = _model()
    rng = np.random.default_rng(5)
    prompts = [list(rng.integers(0, 1024, n)) for n in (7, 19, 12)]
    greedy = generate(model, prompts, SamplingParams(max_new_tokens=10))
    # causal: one full pass over prompt + row (right-padded, the rows in one batch) scores every generated token
    seqs = [p + row for p, row in zip(prompts, greedy)]
    width = max(map(len, seqs))
    logits = forward(model, jnp.asarray([s + [0] * (width - len(s)) for s in seqs]))
    for i, (row, p) in enumerate(zip(greedy, prompts)):
        assert row == np.asarray(jnp.argmax(logits[i, len(p) - 1:len(p) - 1 + len(row)], axis=-1)).tolist()
    stop = (greedy[0][3], greedy[2][6])  # row 0 stops at its 4th token (or earlier), row 2 at its 7th at the latest
    results = []
    for params in (SamplingParams(max_new_tokens=10, stop_tokens=stop),
                   SamplingParams(temperature=1.5, top_k=50, max_new_tokens=10, stop_tokens=stop, seed=4)):
        device = generate(model, prompts, params)
        results.append(device)
        calls = []
        step = G._step
        monkeypatch.setattr(G, "_step", lambda *a: calls.append(1) or step(*a))
        streamed = generate(model, prompts, params, on_tokens=lambda t: None)
        monkeypatch.setattr(G, "_step", step)
        assert device == streamed
        assert len(calls) == 1 + max(len(r) for r in device) - 1  # one prefill chunk, then a step per later token
        for row in device:
            hits = [j for j, t in enumerate(row) if t in stop]
            assert len(row) == (hits[0] + 1 if hits else 10)
    stopped, sampled = results
    assert len(stopped[0]) <= 4 and len(stopped[2]) <= 7 and stopped[1] == greedy[1][:len(stopped[1])]
    assert sampled != greedy


def test_speculation_accepts_drafts_of_a_model_that_learned_a_cycle():
    """A tiny model trained (main + MTP loss) to continue an 11-token cycle: its MTP drafts are right, so most
    are accepted (two tokens per main step), and the output still equals plain greedy decoding."""
    import optax

    from v4jax.config import ModelConfig
    from v4jax.model import Transformer

    model = Transformer(ModelConfig.preset("tiny", compute_dtype="float32"), rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    rng = np.random.default_rng(0)
    cycle = np.tile(rng.integers(0, 1024, 11), 12)
    ce = optax.softmax_cross_entropy_with_integer_labels

    def loss_fn(m, ids):
        x = m.hidden(ids[:, :-2])
        main = ce(m.logits(x, m.hc_head, m.norm), ids[:, 1:-1]).mean()
        return main + ce(m.mtp_logits(x, ids[:, 1:-1]), ids[:, 2:]).mean()

    @nnx.jit
    def step(m, opt, ids):
        loss, grads = nnx.value_and_grad(loss_fn)(m, ids)
        opt.update(m, grads)
        return loss

    for _ in range(20):
        step(model, opt, jnp.asarray(np.stack([cycle[o:o + 66] for o in rng.integers(0, 11, 4)])))
    prompt = list(cycle[3:15])
    greedy = generate(model, [prompt], SamplingParams(max_new_tokens=20))[0]
    tokens, rate = generate_speculative(model, prompt, 20)
    assert tokens == greedy and rate >= 0.5
    assert greedy[:11] == list(cycle[15:26])  # it did learn the cycle


def test_generate_cli_on_the_released_layout_fixture(capsys):
    """v4jax-generate loads the FP8 / MXFP4 fixture as stored and streams the greedy continuation, the same
    tokens as infer.generate on the dequantized model; --speculative gives the same text."""
    from conftest import FIXTURE, REPO, fixture_model
    from infer.cli import main
    from train import tokenizer as tokenizer_lib

    tok_path = str(REPO / "train" / "assets" / "stdlib-bpe-1024.json")
    argv = [str(FIXTURE), "--tokenizer", tok_path, "--prompt", "def f(x):", "--max-new-tokens", "8"]
    assert main(argv) == 0
    streamed = capsys.readouterr().out
    tok = tokenizer_lib.load(tok_path)
    prompt = [0] + tok.encode("def f(x):").ids
    want = generate(fixture_model(compute_dtype="bfloat16"), [prompt], SamplingParams(max_new_tokens=8))[0]
    assert streamed.strip() == ("def f(x):" + tok.decode(want)).strip()
    assert main(argv + ["--speculative"]) == 0
    assert capsys.readouterr().out.strip() == streamed.strip()


def test_generate_cli_dspark_on_a_ga_checkpoint(tmp_path, capsys):
    """v4jax-generate --speculative dspark on a GA checkpoint (tiny fixture, FP8 / MXFP4 as released) streams the
    plain greedy text and reports the drafter's acceptance; a preview model asked for DSpark gets a clear error."""
    from conftest import REPO
    from ga_fixture import write_ga_fixture
    from infer.cli import main

    ckpt = tmp_path / "ga"
    write_ga_fixture(ckpt)
    tok_path = str(REPO / "train" / "assets" / "stdlib-bpe-1024.json")
    argv = [str(ckpt), "--tokenizer", tok_path, "--prompt", "import os\n", "--max-new-tokens", "12"]
    assert main(argv) == 0
    plain = capsys.readouterr()
    assert main(argv + ["--speculative", "dspark", "--confidence", "0.3"]) == 0
    spec = capsys.readouterr()
    assert spec.out == plain.out and "drafts accepted per pass" in spec.err
    with pytest.raises(ValueError, match="GA checkpoint's drafter"):
        generate_dspark(_model(), [[1, 2, 3]])


def test_streamed_text_keeps_multibyte_characters_split_across_tokens():
    """The shipped byte-level BPE splits é, —, ï and 日本 across tokens; streaming token by token prints the text
    exactly (the old per-token decode printed 'caf� � na�ve ��'), holding a partial character back until its
    last byte arrives, and flush() returns what an interrupted character leaves."""
    from conftest import REPO
    from infer.cli import TextStream
    from train import tokenizer as tokenizer_lib

    tok = tokenizer_lib.load(str(REPO / "train" / "assets" / "stdlib-bpe-1024.json"))
    text = "café — naïve 日本"
    ids = tok.encode(text).ids
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # the test needs characters split across tokens
    stream = TextStream(tok)
    pieces = [stream.add([i]) for i in ids]
    assert "".join(pieces) + stream.flush() == text and all("\ufffd" not in p for p in pieces)
    cut = TextStream(tok)
    head = "".join(cut.add([i]) for i in ids[:-1])  # the last character's final byte never comes
    assert head == text[:-1] and cut.flush() == tok.decode(ids[:-1])[len(head):]


def test_bad_generation_input_gets_named_errors(tmp_path):
    """Out-of-vocabulary prompt ids (were clamped), sampling parameters out of range (a negative temperature was
    accepted), a missing tokenizer file (noticed only after loading the model) and a tokenizer larger than the
    model's vocabulary: each a named error that says what to fix, the CLI's before it loads any weights."""
    from infer.cli import main

    model = _model()
    with pytest.raises(ValueError, match=r"outside the model's vocabulary \[0, 1024\)"):
        generate(model, [[5, 1024]], SamplingParams(max_new_tokens=2))
    for bad, field in ((dict(temperature=-0.5), "temperature"), (dict(top_p=0.0), "top_p"),
                       (dict(top_k=-1), "top_k"), (dict(max_new_tokens=0), "max_new_tokens")):
        with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
            SamplingParams(**bad)
    missing = str(tmp_path / "nothing-here")  # not a checkpoint either: the argument checks come first
    with pytest.raises(SystemExit, match="temperature is -1.0"):
        main([missing, "--temperature", "-1"])
    with pytest.raises(SystemExit, match="no tokenizer file at"):
        main([missing, "--tokenizer", str(tmp_path / "tok.json")])
    from conftest import REPO
    from v4jax import hub
    from v4jax.config import ModelConfig

    small = ModelConfig.preset("tiny", vocab_size=512, n_layers=2, n_hash_layers=1, compress_ratios=(0, 4, 0))
    hub.write_random_checkpoint(tmp_path / "small", small.to_hf_config(), 0)
    tok = str(REPO / "train" / "assets" / "stdlib-bpe-1024.json")
    with pytest.raises(SystemExit, match="tokenizer has 1024 tokens but the model's vocabulary is 512"):
        main([str(tmp_path / "small"), "--tokenizer", tok])
