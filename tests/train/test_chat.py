"""The DeepSeek-V4 chat format (train/chat.py): the encoder on hand-written cases shaped like the official
encoding's test cases (the byte-for-byte check against the official files is tests/oracle/check_chat_encoding.py),
the loss mask with the real V4 tokenizer, input checks, packing and the command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from train.chat import (ConversationError, encode, load_shards, load_tokenizer, pack, render, synthetic,
                        tokenize)
from train.cli import InputError

REPO = Path(__file__).resolve().parents[2]
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
TOOLS_TEXT = """

## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "<｜DSML｜tool_calls>" block like the following:

<｜DSML｜tool_calls>
<｜DSML｜invoke name="$TOOL_NAME">
<｜DSML｜parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</｜DSML｜parameter>
...
</｜DSML｜invoke>
<｜DSML｜invoke name="$TOOL_NAME2">
...
</｜DSML｜invoke>
</｜DSML｜tool_calls>

String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside <think>...</think> BEFORE any tool calls or final response.

Otherwise, output directly after </think> with tool calls or final response.

### Available Tool Schemas

{"name": "get_weather", "parameters": {"type": "object"}}

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.
"""


def call(name, args, id=None):
    return {**({"id": id} if id else {}), "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


# Official case 2: thinking mode without tools, two turns (the first turn's reasoning is left out).
MULTI_TURN = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "reasoning_content": "R1", "content": "A1"},
              {"role": "user", "content": "Q"},
              {"role": "assistant", "reasoning_content": "R2", "content": "A2"}]
MULTI_TURN_TEXT = (f"{BOS}S<｜User｜>Hi<｜Assistant｜></think>A1{EOS}"
                   f"<｜User｜>Q<｜Assistant｜><think>R2</think>A2{EOS}")
# Official case 1: thinking mode, tools on the system message, a tool call with its result, then a later user
# turn: with tools, every turn keeps its reasoning.
TOOL_CALL_BLOCK = ('\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\n'
                   '<｜DSML｜parameter name="city" string="true">Oslo</｜DSML｜parameter>\n'
                   '<｜DSML｜parameter name="days" string="false">2</｜DSML｜parameter>\n'
                   '</｜DSML｜invoke>\n</｜DSML｜tool_calls>')
TOOL_CONV = [{"role": "system", "content": "S", "tools": [TOOL]},
             {"role": "user", "content": "Weather in Oslo?"},
             {"role": "assistant", "reasoning_content": "R1", "tool_calls": [call("get_weather", {"city": "Oslo",
                                                                                                "days": 2}, "c1")]},
             {"role": "tool", "tool_call_id": "c1", "content": '{"t": 3}'},
             {"role": "assistant", "reasoning_content": "R2", "content": "Cold."},
             {"role": "user", "content": "Thanks"},
             {"role": "assistant", "reasoning_content": "R3", "content": "Bye."}]
TOOL_CONV_TEXT = (f"{BOS}S{TOOLS_TEXT}<｜User｜>Weather in Oslo?<｜Assistant｜><think>R1</think>{TOOL_CALL_BLOCK}{EOS}"
                  f'<｜User｜><tool_result>{{"t": 3}}</tool_result><｜Assistant｜><think>R2</think>Cold.{EOS}'
                  f"<｜User｜>Thanks<｜Assistant｜><think>R3</think>Bye.{EOS}")


def test_chat_and_thinking_modes():
    assert render(MULTI_TURN, "thinking") == MULTI_TURN_TEXT
    plain = [{k: v for k, v in m.items() if k != "reasoning_content"} for m in MULTI_TURN]
    assert render(plain, "chat") == f"{BOS}S<｜User｜>Hi<｜Assistant｜></think>A1{EOS}<｜User｜>Q<｜Assistant｜></think>A2{EOS}"
    # a conversation ending with the user: the prompt for the next answer
    assert render(MULTI_TURN[:4], "thinking") == (f"{BOS}S<｜User｜>Hi<｜Assistant｜></think>A1{EOS}"
                                                  "<｜User｜>Q<｜Assistant｜><think>")


def test_tool_definitions_calls_and_results():
    assert render(TOOL_CONV, "thinking") == TOOL_CONV_TEXT


def test_developer_tools_reminder_and_calls_without_ids():
    """Official case 3: a latest_reminder, tools on a developer message (a user turn), ids left out."""
    conv = [{"role": "system", "content": "S"}, {"role": "latest_reminder", "content": "2026-02-21,App"},
            {"role": "developer", "content": "D", "tools": [TOOL]},
            {"role": "assistant", "content": "", "reasoning_content": "R", "tool_calls": [call("get_weather",
                                                                                               {"city": "Oslo"})]},
            {"role": "tool", "content": "[0]"},
            {"role": "assistant", "content": "Done.", "reasoning_content": "R2", "tool_calls": []}]
    assert render(conv, "thinking") == (
        f"{BOS}S<｜latest_reminder｜>2026-02-21,App<｜User｜>D{TOOLS_TEXT}<｜Assistant｜><think>R</think>"
        '\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\n'
        '<｜DSML｜parameter name="city" string="true">Oslo</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>'
        f"{EOS}<｜User｜><tool_result>[0]</tool_result><｜Assistant｜><think>R2</think>Done.{EOS}")


def test_action_task_in_chat_mode():
    """Official case 4: a quick-instruction task (action) after an earlier turn; the `mask` flag changes nothing."""
    conv = [{"role": "system", "content": "S"}, {"role": "latest_reminder", "content": "rem"},
            {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1", "mask": 1},
            {"role": "user", "content": "Q2", "task": "action"}, {"role": "assistant", "content": "Search"}]
    text = (f"{BOS}S<｜latest_reminder｜>rem<｜User｜>Q1<｜Assistant｜></think>A1{EOS}"
            f"<｜User｜>Q2<｜Assistant｜></think><｜action｜>Search{EOS}")
    assert render(conv, "chat") == text
    # in thinking mode the task opens with <think>, and its answer has no reasoning part
    assert render(conv, "thinking").endswith(f"<｜User｜>Q2<｜Assistant｜><think><｜action｜>Search{EOS}")


def test_parallel_calls_results_in_call_order_and_merged_user_text():
    conv = [{"role": "user", "content": "Q"},
            {"role": "assistant", "content": "", "tool_calls": [call("f", {"a": [1, "é"]}, "c1"), call("g", {}, "c2")]},
            {"role": "tool", "tool_call_id": "c2", "content": "r2"},
            {"role": "tool", "tool_call_id": "c1", "content": "r1"},
            {"role": "user", "content": "thanks"}, {"role": "assistant", "content": "ok"}]
    assert render(conv, "chat") == (
        f"{BOS}<｜User｜>Q<｜Assistant｜></think>\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n"
        '<｜DSML｜parameter name="a" string="false">[1, "é"]</｜DSML｜parameter>\n</｜DSML｜invoke>\n'
        '<｜DSML｜invoke name="g">\n\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>'
        f"{EOS}<｜User｜><tool_result>r1</tool_result>\n\n<tool_result>r2</tool_result>\n\nthanks"
        f"<｜Assistant｜></think>ok{EOS}")


# ---- loss mask ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def runs(ids, mask):
    """The token runs where mask is 1."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    return [ids[a:b] for a, b in zip(edges[::2], edges[1::2])]


@pytest.mark.parametrize("conv, mode, assistant_parts", [
    (MULTI_TURN, "thinking", [f"A1{EOS}", f"R2</think>A2{EOS}"]),
    (TOOL_CONV, "thinking", [f"R1</think>{TOOL_CALL_BLOCK}{EOS}", f"R2</think>Cold.{EOS}", f"R3</think>Bye.{EOS}"]),
    ([{"role": "user", "content": "Hi 💡"}, {"role": "assistant", "content": "💡 yes"}], "chat", [f"💡 yes{EOS}"]),
])
def test_loss_mask_is_exactly_the_assistant_text(tok, conv, mode, assistant_parts):
    ids, mask = tokenize(encode(conv, mode), tok)
    assert tok.decode(ids.tolist(), skip_special_tokens=False) == render(conv, mode)
    assert [tok.decode(r.tolist(), skip_special_tokens=False) for r in runs(ids, mask)] == assistant_parts
    assert ids[mask == 1][-1] == tok.token_to_id(EOS) and ids[0] == tok.token_to_id(BOS) and mask[0] == 0


def test_tokens_crossing_an_assistant_edge_are_an_error():
    whole = Tokenizer(models.WordLevel({"abcd": 0, "?": 1}, unk_token="?"))
    whole.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    with pytest.raises(ConversationError, match="crosses the edge"):
        tokenize([("ab", False), ("cd", True)], whole)


def test_tokenizer_without_the_chat_special_tokens_is_refused(tmp_path):
    with pytest.raises(InputError, match="lacks the chat format's special token"):
        load_tokenizer(REPO / "train" / "assets" / "stdlib-bpe-1024.json")
    with pytest.raises(InputError, match="does not exist"):
        load_tokenizer("/nonexistent/tokenizer.json")
    (tmp_path / "t.json").write_text("{}")
    with pytest.raises(InputError, match="is not a tokenizer.json"):
        load_tokenizer(tmp_path / "t.json")


# ---- input checks -------------------------------------------------------------------------------------------

U, A = {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}
CALL_A = {"role": "assistant", "content": "", "tool_calls": [call("f", {}, "c1")]}


@pytest.mark.parametrize("line, error", [
    ([{"role": "robot", "content": "x"}, A], r"message 0: role 'robot' is not one of"),
    ([{"role": "user"}, A], r"message 0 \(user\): missing content"),
    ([U, {"role": "assistant", "content": 3}], r"message 1 \(assistant\): content must be a string"),
    ([U, A, {"role": "tool", "content": "r"}], r"message 2 \(tool\): a tool result must follow an assistant "
                                               r"message with tool_calls"),
    ([U, CALL_A, {"role": "tool", "tool_call_id": "c9", "content": "r"}],
     r"message 2 \(tool\): tool_call_id 'c9' answers none"),
    ([U, CALL_A, {"role": "tool", "content": "r"}, {"role": "tool", "content": "r"}],
     r"message 3 \(tool\): more tool results than the 1 tool call"),
    ([U, {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}],
     r"message 1 \(assistant\): tool call 'f': arguments are not JSON"),
    ([U, {"role": "assistant", "content": "A", "reasoning_content": "R"}],
     r"message 1 \(assistant\): reasoning_content in chat mode"),
    ([U, {"role": "assistant", "content": "A", "reasoning": "R"}],
     r"message 1 \(assistant\): unknown key\(s\) \['reasoning'\]"),
    ([{"role": "system", "content": "S"}, A], r"message 1 \(assistant\): an assistant message must follow"),
    ([{"role": "user", "content": "x<｜end▁of▁sentence｜>"}, A], r"message 0 \(user\): the format's special token"),
    ([U, {"role": "assistant", "tool_calls": [call("f", {"q": "<think>"})]}],
     r"message 1 \(assistant\): the format's special token\(s\) \['<think>'\]"),
    ([{"role": "user", "content": "Q", "task": "action"}, U, A],
     r"message 0 \(user\): task 'action' must be followed by the assistant's answer"),
    ([{"role": "user", "content": "Q", "tools": [TOOL]}, A], r"message 0 \(user\): unknown key\(s\) \['tools'\]"),
    ([U, {"role": "assistant", "content": ""}],
     r"message 1 \(assistant\): an assistant message needs content or tool_calls"),
    ({"messages": [U, A], "mode": "chat"}, r"a line is a list of messages or"),
    ([], r"a conversation is a non-empty list of messages"),
    ({"messages": [{"role": "developer", "content": "D"}, A, U, A], "thinking_mode": "thinking"},
     r"message 0 \(developer\): thinking mode without tools leaves out a developer message"),
])
def test_malformed_conversations_name_file_line_and_message(tmp_path, line, error):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps([U, A]) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(ConversationError, match=rf"bad.jsonl:2: {error}"):
        pack(path, tmp_path / "out", seq_len=64)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_bad_inputs_are_named_errors(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("\n{not json\n")
    with pytest.raises(ConversationError, match=r"c.jsonl:2: not JSON"):
        pack(path, tmp_path / "out", seq_len=64)
    path.write_text(json.dumps([U]) + "\n")
    with pytest.raises(ConversationError, match=r"c.jsonl:1: no assistant message"):
        pack(path, tmp_path / "out", seq_len=64)
    path.write_bytes(b"\n" + json.dumps([U, A]).encode() + b"\n\xff\n")
    with pytest.raises(ConversationError, match=r"c.jsonl:3: not UTF-8 text"):
        pack(path, tmp_path / "out", seq_len=64)
    with pytest.raises(InputError, match=r"not a file"):
        pack(tmp_path, tmp_path / "out", seq_len=64)
    path.write_text("\n\n")
    with pytest.raises(InputError, match=r"no conversation to pack"):
        pack(path, tmp_path / "out", seq_len=64)
    with pytest.raises(InputError, match=r"no such file"):
        pack(tmp_path / "missing.jsonl", tmp_path / "out", seq_len=64)
    with pytest.raises(InputError, match=r"must be positive"):
        pack(path, tmp_path / "out", seq_len=0)


# ---- packing ------------------------------------------------------------------------------------------------

def write_jsonl(path, convs):
    path.write_text("".join(json.dumps(c) + "\n" for c in convs))
    return path


def test_packing_keeps_conversations_whole_and_apart(tmp_path, tok):
    convs = synthetic(40, seed=1)
    long = {"messages": [U, {"role": "assistant", "content": "word " * 600}]}
    path = write_jsonl(tmp_path / "c.jsonl", convs[:10] + [long] + convs[10:])
    meta = pack(path, tmp_path / "out", seq_len=450, rows_per_shard=4)
    assert len(meta["shards"]) > 2 and meta["skipped_too_long_lines"] == [11] and meta["n_conversations"] == 40
    assert not (tmp_path / "out.partial").exists()
    meta2, rows = load_shards(tmp_path / "out")
    assert meta2 == meta and rows["tokens"].shape == (meta["n_rows"], 451) and rows["tokens"].dtype == np.uint32
    assert meta["fill"] > 0.8  # best fit packs the short conversations beside the long ones
    expected = sorted((tuple(ids), tuple(mask)) for ids, mask in
                      (tokenize(encode(c["messages"], c["thinking_mode"]), tok) for c in convs))
    found = []
    for t, s, m in zip(rows["tokens"], rows["segment_ids"], rows["loss_mask"]):
        assert s[0] == 0 and (np.diff(s) >= 0).all() and (np.diff(s) <= 1).all()
        for k in range(s[-1] + 1):
            seg = s == k
            if t[seg][0] == tok.token_to_id(BOS):  # a conversation, whole
                found.append((tuple(t[seg]), tuple(m[seg])))
            else:  # the padding after the conversations: one segment, never trained
                assert k == s[-1] and (t[seg] == meta["pad_id"]).all() and not m[seg].any()
    assert sorted(found) == expected
    assert meta["n_loss_tokens"] == sum(int(x) for _, m in expected for x in m) == int(rows["loss_mask"].sum())
    text = tok.decode(rows["tokens"].ravel().tolist(), skip_special_tokens=False)
    assert "<｜DSML｜tool_calls>" in text and "<tool_result>" in text and "<think>" in text


def test_output_is_not_overwritten_and_only_too_long_input_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", synthetic(4))
    pack(path, tmp_path / "out", seq_len=512)
    with pytest.raises(InputError, match="already exists"):
        pack(path, tmp_path / "out", seq_len=512)
    with pytest.raises(InputError, match=r"4 longer than a row of 9 tokens: raise --seq-len"):
        pack(path, tmp_path / "out2", seq_len=8)


# ---- the command --------------------------------------------------------------------------------------------

def cli(*args):
    return subprocess.run([sys.executable, "-m", "train.chat", *args], cwd=REPO, capture_output=True, text=True)


def test_command_synth_pack_help_and_one_line_errors(tmp_path):
    r = cli("pack", "--help")
    assert r.returncode == 0 and "(default: chat)" in r.stdout and "--seq-len" in r.stdout
    r = cli("synth", "--output", str(tmp_path / "s.jsonl"), "--n", "12")
    assert r.returncode == 0, r.stderr
    r = cli("pack", str(tmp_path / "s.jsonl"), "--output", str(tmp_path / "out"), "--seq-len", "512")
    assert r.returncode == 0, r.stderr
    assert "12 conversations in" in r.stdout and load_shards(tmp_path / "out")[0]["n_conversations"] == 12
    (tmp_path / "bad.jsonl").write_text(json.dumps([{"role": "robot", "content": "x"}]) + "\n")
    r = cli("pack", str(tmp_path / "bad.jsonl"), "--output", str(tmp_path / "o2"), "--seq-len", "64")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "bad.jsonl:1: message 0: role 'robot'" in r.stderr


def test_a_conversation_of_exactly_one_row_fits_one_token_more_does_not(tmp_path, tok):
    conv = synthetic(1)[0]
    n = len(tokenize(encode(conv["messages"], conv["thinking_mode"]), tok)[0])
    path = write_jsonl(tmp_path / "c.jsonl", [conv, conv])
    pack(path, tmp_path / "out", seq_len=n - 1)
    meta, rows = load_shards(tmp_path / "out")
    assert meta["n_rows"] == 2 and meta["fill"] == 1 and (rows["segment_ids"] == 0).all()
    with pytest.raises(InputError, match=rf"2 longer than a row of {n - 1} tokens"):
        pack(path, tmp_path / "out2", seq_len=n - 2)
