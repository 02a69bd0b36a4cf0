"""SFT data: JSONL or in-memory records -> `Conversation`s (instruction/response, chat messages, ShareGPT).

One record per line: `{"instruction": ..., "response": ...}` (optional `"input"`, appended to the instruction
after a blank line, and `"system"`; `"output"` is accepted for `"response"`), or chat style
`{"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}` (ShareGPT's
`{"conversations": [{"from": "human" | "gpt" | "system", "value": ...}]}` too). Blank lines are skipped; a
malformed line raises `SFTDataError` naming `file:line` and what to fix.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinygpt.errors import TinyGPTValueError
from tinygpt.io import iter_jsonl


class SFTDataError(TinyGPTValueError):
    """An SFT data file or record is malformed, or no usable example is left."""


@dataclass
class Conversation:
    """One training conversation.

    Attributes:
        messages: [{"role": "system" | "user" | "assistant", "content": str}, ...].
        where: where it came from ("FILE:LINE" or "record N"), for error messages.
    """

    messages: list[dict[str, str]]
    where: str = ""

    @property
    def response(self) -> str:
        """The assistant replies, joined by blank lines."""
        return "\n\n".join(m["content"] for m in self.messages if m["role"] == "assistant")

    @property
    def instruction(self) -> str:
        """The user messages, joined by blank lines."""
        return "\n\n".join(m["content"] for m in self.messages if m["role"] == "user")


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_EXAMPLE = '{"instruction": "Who is Puck?", "response": "A mischievous sprite in A Midsummer Night\'s Dream."}'


def record_to_messages(rec: Any, where: str) -> list[dict[str, str]]:
    """Normalise one record (instruction/response, messages, or ShareGPT conversations) to messages.

    Raises:
        SFTDataError: naming `where` and the expected shape.
    """
    if not isinstance(rec, dict):
        raise SFTDataError(f"{where}: expected a JSON object, got {type(rec).__name__}; e.g. {_EXAMPLE}")
    if "messages" in rec or "conversations" in rec:
        key = "messages" if "messages" in rec else "conversations"
        raw = rec[key]
        if not isinstance(raw, list) or not raw:
            raise SFTDataError(f"{where}: '{key}' must be a non-empty list of turns")
        msgs = []
        for i, m in enumerate(raw):
            if key == "conversations" and isinstance(m, dict) and "from" in m:
                m = {"role": _SHAREGPT_ROLES.get(str(m.get("from")), m.get("from")), "content": m.get("value")}
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                raise SFTDataError(f'{where}: turn {i} must be {{"role": ..., "content": "..."}}, got {m!r}')
            role = m.get("role")
            if role not in ("system", "user", "assistant"):
                raise SFTDataError(f"{where}: turn {i} has role {role!r}; use 'system', 'user' or 'assistant'")
            if role == "system" and i != 0:
                raise SFTDataError(f"{where}: turn {i}: a system message may only be the first turn")
            msgs.append({"role": role, "content": m["content"]})
        if not any(m["role"] == "assistant" for m in msgs):
            raise SFTDataError(f"{where}: the conversation has no assistant turn, so nothing to learn from")
        return msgs
    response_key = "response" if "response" in rec else "output" if "output" in rec else None
    if "instruction" not in rec or response_key is None:
        raise SFTDataError(
            f"{where}: a record needs 'instruction' and 'response' (or 'messages': [...]); it has keys "
            f"{sorted(rec)}. Example line: {_EXAMPLE}"
        )
    fields = {"instruction": rec["instruction"], response_key: rec[response_key]}
    for k in ("input", "system"):
        if rec.get(k) is not None:
            fields[k] = rec[k]
    for k, v in fields.items():
        if not isinstance(v, str):
            raise SFTDataError(f"{where}: '{k}' must be a string, got {type(v).__name__}")
    instruction = rec["instruction"] + (f"\n\n{rec['input']}" if rec.get("input") else "")
    msgs = [{"role": "user", "content": instruction}, {"role": "assistant", "content": rec[response_key]}]
    if rec.get("system"):
        msgs.insert(0, {"role": "system", "content": rec["system"]})
    return msgs


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON) for each non-blank line; `SFTDataError` names `path:line` on bad JSON."""
    p = Path(path)
    if not p.is_file():
        raise SFTDataError(f"SFT data file {p} does not exist (or is not a file); pass a .jsonl file")
    hint = f"; each line must hold one JSON object, e.g. {_EXAMPLE}"
    yield from iter_jsonl(p, SFTDataError, hint)


def load_sft_data(data: str | os.PathLike | Sequence[Any]) -> list[Conversation]:
    """Conversations from a JSONL path, or from a list of records / `Conversation`s.

    Raises:
        SFTDataError: a malformed line (named `FILE:LINE`) or record, or no records at all.
    """
    if isinstance(data, (str, os.PathLike)):
        out = [Conversation(record_to_messages(rec, f"{data}:{n}"), f"{data}:{n}") for n, rec in read_jsonl(data)]
        where = str(data)
    elif isinstance(data, Iterable):
        out = []
        for i, rec in enumerate(data):
            if isinstance(rec, Conversation):
                out.append(rec)
            else:
                out.append(Conversation(record_to_messages(rec, f"record {i}"), f"record {i}"))
        where = "the records given"
    else:
        raise SFTDataError(f"cannot read SFT data from a {type(data).__name__}; pass a .jsonl path or a list of dicts")
    if not out:
        raise SFTDataError(f"{where} holds no records")
    return out


def data_name(data: Any) -> str:
    return str(data) if isinstance(data, (str, os.PathLike)) else "the records given"


def data_hash(data: Any) -> str:
    h = hashlib.sha256()
    if isinstance(data, (str, os.PathLike)):
        with open(data, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    else:
        for rec in data:
            msgs = rec.messages if isinstance(rec, Conversation) else rec
            h.update(json.dumps(msgs, sort_keys=True, ensure_ascii=False).encode())
    return h.hexdigest()


__all__ = [
    "Conversation",
    "SFTDataError",
    "data_hash",
    "data_name",
    "load_sft_data",
    "read_jsonl",
    "record_to_messages",
]
