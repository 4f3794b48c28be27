"""The JSONL dataset format, `{"prompt": ..., "completion": ...}` one example per line: the one reader that
both the API (checking an upload) and the workers (training on it) use, so they accept the same files and
name a bad line in the same words.

    >>> list(read_examples([b'{"prompt": "a", "completion": "b"}\\n', b"\\n"]))
    [(1, 'a', 'b')]
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator

REQUIRED_FIELDS = ("prompt", "completion")


class JsonlLineError(ValueError):
    """Line `line` is not an example; `reason` says why (the message is `line N: reason`)."""

    def __init__(self, line: int, reason: str):
        super().__init__(f"line {line}: {reason}")
        self.line, self.reason = line, reason


def read_examples(lines: Iterable[bytes]) -> Iterator[tuple[int, str, str]]:
    """(line number, prompt, completion) for every non-blank line; `JsonlLineError` at the first bad one."""
    for number, raw in enumerate(lines, start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise JsonlLineError(number, f"not UTF-8 ({exc.reason} at byte {exc.start})") from exc
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise JsonlLineError(number, f"not valid JSON ({exc.msg} at column {exc.colno})") from exc
        if not isinstance(record, dict):
            raise JsonlLineError(number, f"each line must be a JSON object, got {type(record).__name__}")
        for key in REQUIRED_FIELDS:
            value = record.get(key)
            if not isinstance(value, str) or not value.strip():
                raise JsonlLineError(number, f"{key!r} must be a non-empty string, got {value!r:.80}")
        yield number, record["prompt"], record["completion"]
