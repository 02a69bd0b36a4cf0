"""Chat templates as data: how a conversation becomes one token sequence, and which tokens carry the loss.

A template is a small JSON file shipped in the package (`tinygpt/training/chat_templates/chatml.json`,
`tinygpt/training/chat_templates/alpaca.json`) selected by name, or any JSON file with the same fields, loaded with
`load_template`:

    {
      "name": "chatml",
      "special_tokens": ["<|im_start|>", "<|im_end|>"],
      "bos": "",                      # text before every conversation
      "default_system": null,         # system message used when a conversation has none
      "roles": {
        "system":    {"prefix": "<|im_start|>system\\n",    "end": "<|im_end|>", "after": "\\n"},
        "user":      {"prefix": "<|im_start|>user\\n",      "end": "<|im_end|>", "after": "\\n"},
        "assistant": {"prefix": "<|im_start|>assistant\\n", "end": "<|im_end|>", "after": "\\n"}
      }
    }

A turn is rendered `prefix + content + end + after`. In supervised fine-tuning only an assistant turn's
content and its `end` carry loss (the model learns to answer and to stop); `end` is also the stop string
when generating (Magpie stops an instruction at the user role's `end`, a response at the assistant's).

Special tokens are single ids. `tinygpt.training.sft.add_special_tokens(model, template)` adds missing ones to the
tokenizer and the embedding. Template text is encoded with them; message *content* is encoded literally
(`encode_literal`), so a user who types `<|im_end|>` gets the characters, never the control token.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tinygpt.errors import TinyGPTValueError
from tinygpt.training.settings import did_you_mean

TEMPLATE_DIR = Path(__file__).resolve().parent / "chat_templates"
ROLES = ("system", "user", "assistant")
_TEMPLATE_KEYS = {"name", "description", "special_tokens", "bos", "default_system", "roles"}
_ROLE_KEYS = {"prefix", "end", "after"}


class TemplateError(TinyGPTValueError):
    """A chat template is unknown or malformed, or a tokenizer lacks the special tokens it needs."""


@dataclass(frozen=True)
class RoleFormat:
    """How one role's turn is written: `prefix + content + end + after`.

    Attributes:
        prefix: text before the content (e.g. "<|im_start|>user\\n").
        end: text that closes the turn; it carries loss in assistant turns and is the stop string.
        after: text after `end` (e.g. a newline), no loss.
    """

    prefix: str
    end: str
    after: str = ""


@dataclass
class Template:
    """A chat template (see the module docstring for the format).

    Attributes:
        name: short name (the file name for built-in templates).
        roles: {"system" | "user" | "assistant": RoleFormat}.
        special_tokens: strings that must be single tokens.
        bos: text before every conversation ("" for none).
        default_system: system message used when a conversation has none (None for none).
        description: one line for humans.
        source: the file it was loaded from (None when built from a dict).
    """

    name: str
    roles: dict[str, RoleFormat]
    special_tokens: tuple[str, ...] = ()
    bos: str = ""
    default_system: str | None = None
    description: str = ""
    source: str | None = field(default=None, compare=False)

    # ------------------------------------------------------------------------------------ (de)serialising
    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str | None = None) -> Template:
        """Validate and build a template from its JSON fields."""
        where = f"template {source or d.get('name', '?')}"
        if not isinstance(d, dict):
            raise TemplateError(f"{where}: expected a JSON object, got {type(d).__name__}")
        if unknown := sorted(set(d) - _TEMPLATE_KEYS):
            raise TemplateError(f"{where}: unknown field(s) {unknown}; known: {sorted(_TEMPLATE_KEYS)}")
        for key in ("name", "roles"):
            if key not in d:
                raise TemplateError(f"{where}: missing field {key!r}")
        if not isinstance(d["name"], str) or not d["name"]:
            raise TemplateError(f"{where}: 'name' must be a non-empty string")
        roles_in = d["roles"]
        if not isinstance(roles_in, dict) or set(roles_in) != set(ROLES):
            got = sorted(roles_in) if isinstance(roles_in, dict) else roles_in
            raise TemplateError(f"{where}: 'roles' must have exactly the keys {list(ROLES)}, got {got}")
        roles = {}
        for role in ROLES:
            r = roles_in[role]
            if not isinstance(r, dict) or not {"prefix", "end"} <= set(r) or set(r) - _ROLE_KEYS:
                raise TemplateError(f"{where}: roles.{role} must have 'prefix', 'end' and optionally 'after'; got {r}")
            if not all(isinstance(v, str) for v in r.values()):
                raise TemplateError(f"{where}: roles.{role} values must be strings")
            roles[role] = RoleFormat(r["prefix"], r["end"], r.get("after", ""))
        for role in ("user", "assistant"):
            if not roles[role].end:
                raise TemplateError(f"{where}: roles.{role}.end must not be empty (it ends the turn when generating)")
        specials = d.get("special_tokens", [])
        if not isinstance(specials, list) or not all(isinstance(s, str) and s for s in specials):
            raise TemplateError(f"{where}: 'special_tokens' must be a list of non-empty strings")
        default_system = d.get("default_system")
        if default_system is not None and not isinstance(default_system, str):
            raise TemplateError(f"{where}: 'default_system' must be a string or null")
        bos = d.get("bos", "")
        if not isinstance(bos, str):
            raise TemplateError(f"{where}: 'bos' must be a string")
        return cls(
            name=d["name"],
            roles=roles,
            special_tokens=tuple(specials),
            bos=bos,
            default_system=default_system,
            description=str(d.get("description", "")),
            source=source,
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON fields (what checkpoints record)."""
        return {
            "name": self.name,
            "description": self.description,
            "special_tokens": list(self.special_tokens),
            "bos": self.bos,
            "default_system": self.default_system,
            "roles": {r: dataclasses.asdict(f) for r, f in self.roles.items()},
        }

    # ------------------------------------------------------------------------------------ rendering
    @property
    def stop(self) -> str:
        """The string that ends an assistant turn (the response stop)."""
        return self.roles["assistant"].end

    @property
    def instruction_stop(self) -> str:
        """The string that ends a user turn (Magpie's instruction stop)."""
        return self.roles["user"].end

    def with_default_system(self, messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
        """`messages` with the template's default system message first when they have none."""
        msgs = [dict(m) for m in messages]
        if self.default_system is not None and not (msgs and msgs[0].get("role") == "system"):
            msgs.insert(0, {"role": "system", "content": self.default_system})
        return msgs

    def pieces(
        self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False, train_on_prompt: bool = False
    ) -> list[tuple[str, bool, bool]]:
        """The conversation as `(text, is_content, carries_loss)` pieces, in order (empty pieces left out).

        Args:
            messages: [{"role": "system" | "user" | "assistant", "content": str}, ...].
            add_generation_prompt: end with the assistant prefix (to generate a reply).
            train_on_prompt: system and user turns carry loss too (their content and `end`, as replies do);
                role prefixes and `after` never do.
        """
        check_messages(messages)
        out: list[tuple[str, bool, bool]] = [(self.bos, False, False)]
        for m in self.with_default_system(messages):
            r = self.roles[m["role"]]
            answer = m["role"] == "assistant" or train_on_prompt
            out += [
                (r.prefix, False, False),
                (m["content"], True, answer),
                (r.end, False, answer),
                (r.after, False, False),
            ]
        if add_generation_prompt:
            out.append((self.roles["assistant"].prefix, False, False))
        return [p for p in out if p[0]]

    def render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False) -> str:
        """The conversation as text."""
        return "".join(text for text, _, _ in self.pieces(messages, add_generation_prompt))

    def pre_query(self, system: str | None = None) -> str:
        """Everything before a first user message's content: `bos`, the system turn if any, the user prefix.

        This is what Magpie feeds a chat model so that it writes a user query itself.
        """
        text = self.bos
        system = system if system is not None else self.default_system
        if system is not None:
            r = self.roles["system"]
            text += r.prefix + system + r.end + r.after
        return text + self.roles["user"].prefix

    # ------------------------------------------------------------------------------------ encoding
    def check_tokenizer(self, tokenizer: Any) -> dict[str, int]:
        """{special token: id} for this template, or `TemplateError` naming the missing ones and the fix."""
        have = tokenizer.special_tokens
        missing = [s for s in self.special_tokens if s not in have]
        if missing:
            raise TemplateError(
                f"the tokenizer has no special token(s) {missing}, which template {self.name!r} needs; "
                "add them with tinygpt.sft.add_special_tokens(model, template) (sft() does this), or use the "
                "template the model was fine-tuned with"
            )
        return {s: have[s] for s in self.special_tokens}

    def encode_text(self, tokenizer: Any, text: str) -> list[int]:
        """Template text -> ids, each of the template's special tokens as its single id."""
        ids = self.check_tokenizer(tokenizer)
        if not self.special_tokens:
            return encode_literal(tokenizer, text)
        pattern = "|".join(re.escape(s) for s in sorted(self.special_tokens, key=len, reverse=True))
        out: list[int] = []
        pos = 0
        for m in re.finditer(pattern, text):
            out += encode_literal(tokenizer, text[pos : m.start()])
            out.append(ids[m.group()])
            pos = m.end()
        return out + encode_literal(tokenizer, text[pos:])

    def encode(
        self,
        messages: Sequence[dict[str, str]],
        tokenizer: Any,
        add_generation_prompt: bool = False,
        train_on_prompt: bool = False,
    ) -> tuple[list[int], list[bool]]:
        """A conversation -> (token ids, loss mask), the mask true on the tokens the model learns to write.

        Template pieces are encoded with the special tokens as single ids; message content literally (a
        special-token string inside content stays plain text). Pieces are encoded separately, so a token
        never straddles a piece boundary and the mask is exact.

        Args:
            train_on_prompt: the mask also covers system and user turns (see `pieces`).
        Returns:
            (ids [n], mask [n]): `mask[i]` is True when token i is part of an assistant reply (its content
            or its `end`), i.e. a target the loss covers.
        """
        ids: list[int] = []
        mask: list[bool] = []
        for text, is_content, loss in self.pieces(messages, add_generation_prompt, train_on_prompt):
            part = encode_literal(tokenizer, text) if is_content else self.encode_text(tokenizer, text)
            ids += part
            mask += [loss] * len(part)
        return ids, mask

    def __repr__(self) -> str:
        return f"Template({self.name!r}, special_tokens={list(self.special_tokens)})"


# ---------------------------------------------------------------------------------------------- loading
def available_templates() -> list[str]:
    """Names of the built-in templates (`tinygpt/training/chat_templates/*.json`)."""
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.json")) if TEMPLATE_DIR.is_dir() else []


def load_template(spec: str | os.PathLike | dict[str, Any] | Template = "chatml") -> Template:
    """A template by built-in name ("chatml", "alpaca"), from a JSON file path, from a dict, or as given.

    Raises:
        TemplateError: an unknown name (the message lists the available ones) or a malformed file.
    """
    if isinstance(spec, Template):
        return spec
    if isinstance(spec, dict):
        return Template.from_dict(spec)
    if not isinstance(spec, (str, os.PathLike)):
        raise TemplateError(f"cannot make a chat template from a {type(spec).__name__}; pass a name or a .json path")
    p = Path(spec)
    if p.suffix.lower() == ".json" or p.exists():
        if not p.is_file():
            raise TemplateError(f"template file {p} does not exist")
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TemplateError(f"template file {p} is not valid JSON: {e}") from e
        return Template.from_dict(data, source=str(p))
    names = available_templates()
    if str(spec) in names:
        return load_template(TEMPLATE_DIR / f"{spec}.json")
    hint = did_you_mean(str(spec), names)
    listed = ", ".join(names) if names else f"(none found in {TEMPLATE_DIR})"
    raise TemplateError(
        f"unknown chat template {str(spec)!r}{hint}; available: {listed}, or the path of a template .json file"
    )


# ---------------------------------------------------------------------------------------------- helpers
def check_messages(messages: Sequence[dict[str, str]]) -> None:
    """Raise `TemplateError` unless `messages` is a list of {"role", "content"} with known roles."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise TemplateError("messages must be a non-empty list of {'role': ..., 'content': ...}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise TemplateError(f"message {i} must be {{'role': str, 'content': str}}, got {m!r}")
        if m["role"] not in ROLES:
            raise TemplateError(f"message {i} has role {m['role']!r}; roles are {', '.join(ROLES)}")
        if m["role"] == "system" and i != 0:
            raise TemplateError(f"message {i}: a system message may only come first")


def encode_literal(tokenizer: Any, text: str) -> list[int]:
    """Encode `text` so that no special-token string in it becomes a special token.

    Where `text` contains a special token's string, its first character is encoded on its own, which
    breaks the match; the text still decodes to exactly `text`.
    """
    specials = [s for s in tokenizer.special_tokens if s in text]
    if not specials:
        return list(tokenizer.encode(text)) if text else []
    out: list[int] = []
    while text:
        hits = [(text.find(s), s) for s in specials if s in text]
        if not hits:
            out += tokenizer.encode(text)
            break
        i, _ = min(hits)
        if i:
            out += tokenizer.encode(text[:i])
        out += tokenizer.encode(text[i])
        text = text[i + 1 :]
    return out


def special_token_strings(templates: Iterable[Template]) -> list[str]:
    """The union of the templates' special tokens, in order."""
    return list(dict.fromkeys(s for t in templates for s in t.special_tokens))
