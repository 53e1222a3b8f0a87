"""SFT rows (python -m train.chat pack) in the trainer: RowStream serves every packed row once per epoch, in a
seeded order, with its loss mask; a short run trains on them; rows of another length than the stages' are named
before anything compiles. (The masked objective itself: tests/train/test_losses.py.)"""

from __future__ import annotations

import json

import numpy as np
import pytest

from test_pretrain import run
from train import chat
from train.data import CorpusError, RowStream, open_corpus

SEQ = 128


@pytest.fixture(scope="module")
def sft_rows(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    chat.main(["synth", "--output", str(root / "chat.jsonl"), "--n", "48"])
    chat.pack(root / "chat.jsonl", root / "rows", seq_len=SEQ, rows_per_shard=3)  # several shards
    return root / "rows"


def test_row_stream_serves_each_row_once_per_epoch_with_its_mask(sft_rows):
    meta, arrays = chat.load_shards(sft_rows)
    n = meta["n_rows"]
    assert n >= 3 and len(meta["shards"]) >= 2
    stream = open_corpus(sft_rows, seed=3)
    assert isinstance(stream, RowStream) and stream.seq_len == SEQ
    epoch = stream.batch(0, n, SEQ)
    rows = {arrays["tokens"][i].tobytes(): i for i in range(n)}
    order = [rows[t.astype(arrays["tokens"].dtype).tobytes()] for t in epoch["tokens"]]
    assert sorted(order) == list(range(n))  # a permutation of the rows
    for key in ("segment_ids", "loss_mask"):  # each row keeps its own segment ids and mask
        np.testing.assert_array_equal(epoch[key], arrays[key][order])
    # offsets count tokens as for PackedStream: two half batches are the whole one; the next epoch reorders
    half = stream.batch(0, 2, SEQ)["tokens"], stream.batch(2 * SEQ, n - 2, SEQ)["tokens"]
    np.testing.assert_array_equal(np.concatenate(half), epoch["tokens"])
    nxt = [rows[t.astype(arrays["tokens"].dtype).tobytes()] for t in stream.batch(n * SEQ, n, SEQ)["tokens"]]
    assert sorted(nxt) == list(range(n)) and nxt != order
    with pytest.raises(CorpusError, match=f"rows hold seq_len {SEQ}"):
        stream.batch(0, 1, SEQ // 2)


def test_training_on_sft_rows(sft_rows, tmp_path):
    """A few steps of the trainer on the packed chat rows (a 2-layer model with V4's vocabulary); a stage whose
    seq_len is not the rows' is a one-line error before compiling."""
    config = tmp_path / "sft.yaml"
    config.write_text(f"""
model:
  preset: tiny
  overrides: {{vocab_size: 129280, n_layers: 2, n_hash_layers: 1, compress_ratios: [4, 128, 0], n_routed_experts: 8,
              n_heads: 4, o_groups: 2, moe_inter_dim: 64, index_n_heads: 4}}
data: {{path: {sft_rows}}}
stages:
  - {{until_step: 3, batch_size: 2, seq_len: {SEQ}, attention: dense}}
schedule: {{peak_lr: 3.0e-3, final_lr: 3.0e-4, warmup_steps: 1, decay_start: 2}}
checkpoint: {{every: 3, keep: 1}}
log_every: 1
run_dir: {tmp_path / "run"}
""")
    meta = json.loads((sft_rows / "meta.json").read_text())
    p = run(["-m", "train.pretrain", str(config)])
    assert f"data: {meta['n_conversations']} conversations packed in {meta['n_rows']} rows" in p.stdout, p.stdout
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and all(np.isfinite(r["lm_loss"]) for r in records)
    p = run(["-m", "train.pretrain", str(config), "stages=[{until_step: 3, batch_size: 2, seq_len: 64}]",
             f"run_dir={tmp_path / 'other'}"], check=False)
    assert p.returncode == 1 and p.stderr.strip().splitlines() == [
        f"train.pretrain: {sft_rows} holds rows of seq_len {SEQ} (packed by train.chat): set every stage's seq_len "
        f"to {SEQ}"], p.stderr
