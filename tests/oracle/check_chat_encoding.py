"""Byte-for-byte check of train/chat.py against the official DeepSeek-V4 encoding test cases (outside CI: their
files are not in this repository).

    .venv/bin/python tests/oracle/check_chat_encoding.py PATH/encoding/tests

For each test_input_K.json beside a test_output_K.txt: the messages (a list, or {"tools", "messages"} whose
tools belong to the first message, as the official test script does) are encoded in the mode the official test
script uses for that case (chat for case 4, thinking otherwise) and compared with the output file's bytes.
Exit status 0 when every case matches; a mismatch prints the first differing position.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from train.chat import render  # noqa: E402

CHAT_MODE_CASES = {"4"}  # the official test script encodes case 4 in chat mode, the others in thinking mode


def main(folder: str) -> int:
    inputs = sorted(Path(folder).glob("test_input_*.json"))
    if not inputs:
        print(f"no test_input_*.json in {folder}")
        return 1
    failed = 0
    for path in inputs:
        case = path.stem.removeprefix("test_input_")
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            messages = data["messages"]
            messages[0]["tools"] = data["tools"]
        else:
            messages = data
        mode = "chat" if case in CHAT_MODE_CASES else "thinking"
        expected = (path.parent / f"test_output_{case}.txt").read_bytes()
        got = render(messages, mode).encode("utf-8")
        if got == expected:
            print(f"case {case} ({mode}): identical, {len(got)} bytes")
        else:
            failed += 1
            at = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
            print(f"case {case} ({mode}): DIFFERS at byte {at} (ours {len(got)} bytes, official {len(expected)})\n"
                  f"  ours:     {got[max(0, at - 60):at + 60]!r}\n  official: {expected[max(0, at - 60):at + 60]!r}")
    print(f"{len(inputs) - failed} of {len(inputs)} cases identical")
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1]))
