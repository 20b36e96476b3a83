"""Instruction-response data: JSONL loading with line-numbered errors, and tokenisation.

Each line of the JSONL file is an object with non-empty string fields ``instruction`` and
``response``. A sequence is tokenised as *prompt* + *response* in one of these layouts:

- ``chat``: the tokenizer's chat template applied to the instruction (with the generation prompt)
  is the prompt; the rest of the templated conversation (response + end-of-turn markup) is the
  response. Needs a template whose rendered prompt is a prefix of the rendered conversation.
- ``plain``: the prompt is ``### Instruction:\n{instruction}\n\n### Response:\n`` (with the
  tokenizer's special tokens, e.g. BOS); the response is its text followed by the EOS token.
- ``raw``: the prompt is the instruction text as is (with the tokenizer's special tokens); the
  response is its text followed by the EOS token, i.e. exactly ``tokenizer(instruction) +
  tokenizer(response) + [eos]``: for models trained on bare prompts.
- ``auto`` (default): ``chat`` when the tokenizer has a chat template, else ``plain``.

Only response tokens are trained on and distilled (:meth:`TokenizedExample.response_mask`), in
every layout. Prompt and response are tokenised separately, so every tokenizer sees the response
text on its own and two tokenizations of the same response can be aligned token by token (see
:mod:`umm.fusion.align`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from umm.errors import UmmError
from umm.jsonl import parse_object

logger = logging.getLogger(__name__)

PLAIN_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"

#: A prompt layout as configured (``auto`` resolves to ``chat`` or ``plain`` per tokenizer).
Layout = Literal["auto", "chat", "plain", "raw"]
LAYOUTS: tuple[str, ...] = ("auto", "chat", "plain", "raw")


class DataError(UmmError):
    """A malformed instruction-response file; the message names the file and line."""


class LayoutError(UmmError):
    """A prompt layout that is unknown or that the tokenizer cannot provide (no chat template)."""


@dataclass(frozen=True)
class Example:
    """One instruction-response pair; ``line`` is its 1-based line number in the source file."""

    instruction: str
    response: str
    line: int


@dataclass(frozen=True)
class InstructionData:
    """A loaded JSONL file; ``sha256`` (of the file bytes) keys every cache derived from it."""

    examples: tuple[Example, ...]
    path: Path | None
    sha256: str

    def __len__(self) -> int:
        return len(self.examples)

    @classmethod
    def from_jsonl(cls, path: str | Path) -> InstructionData:
        """Load and validate ``path``; raises :class:`DataError` naming the first bad line."""
        p = Path(path)
        try:
            raw = p.read_bytes()
        except OSError as e:
            raise DataError(f"cannot read instruction data {p}: {e.strerror or e}") from e
        return cls.from_bytes(raw, path=p)

    @classmethod
    def from_bytes(cls, raw: bytes, *, path: Path | None = None) -> InstructionData:
        name = str(path) if path is not None else "<data>"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            raise DataError(f"{name}:{line}: not valid UTF-8 (byte {e.start})") from e
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()  # the file's final newline
        examples = [_parse_line(name, i, s) for i, s in enumerate(lines, start=1)]
        if not examples:
            raise DataError(f"{name}: no examples (the file is empty)")
        return cls(tuple(examples), path, hashlib.sha256(raw).hexdigest())

    @classmethod
    def from_records(cls, records: Sequence[dict[str, Any]]) -> InstructionData:
        """Build from in-memory records (hashed as their canonical JSONL form)."""
        raw = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)
        return cls.from_bytes(raw.encode("utf-8"))


def _parse_line(name: str, lineno: int, s: str) -> Example:
    if not s.strip():
        raise DataError(f"{name}:{lineno}: empty line (every line must be a JSON object)")
    obj = parse_object(s, f"{name}:{lineno}", DataError)
    for key in ("instruction", "response"):
        if key not in obj:
            raise DataError(f"{name}:{lineno}: missing field {key!r}")
        if not isinstance(obj[key], str):
            raise DataError(f"{name}:{lineno}: field {key!r} must be a string")
        if not obj[key].strip():
            raise DataError(f"{name}:{lineno}: field {key!r} is empty")
    return Example(obj["instruction"], obj["response"], lineno)


@dataclass
class TokenizedExample:
    """Token ids of prompt + response; ``n_prompt`` ids come first, the rest is the response."""

    input_ids: list[int]
    n_prompt: int
    truncated: bool

    @property
    def response_ids(self) -> list[int]:
        return self.input_ids[self.n_prompt :]

    def response_mask(self) -> list[bool]:
        return [i >= self.n_prompt for i in range(len(self.input_ids))]


@dataclass
class TokenizedData:
    """The tokenisation of a dataset by one tokenizer; ``None`` marks a dropped example."""

    items: list[TokenizedExample | None]
    n_truncated: int = 0
    n_dropped: int = 0
    dropped_lines: list[int] = field(default_factory=list)
    layout: str = "plain"  # the resolved layout: chat, plain or raw


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def tokenizer_name(tokenizer: Any) -> str:
    """How a tokenizer is named in messages: its folder (``name_or_path``), else its class."""
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def _chat_split(tokenizer: Any, instruction: str, response: str) -> tuple[str, str] | None:
    """(prompt, response markup) from the chat template, ``None`` if the prompt is no prefix."""
    user = [{"role": "user", "content": instruction}]
    prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
    if isinstance(prompt, str) and isinstance(full, str) and full.startswith(prompt):
        return prompt, full[len(prompt) :]
    return None


def resolve_layout(tokenizer: Any, layout: str = "auto") -> str:
    """The concrete layout (``chat``, ``plain`` or ``raw``) that ``layout`` means for ``tokenizer``.

    ``auto`` is ``chat`` when the tokenizer has a usable chat template (one whose rendered prompt
    is a prefix of the rendered conversation), else ``plain``. Raises :class:`LayoutError` for an
    unknown layout, or for ``chat`` when the tokenizer has no usable template.
    """
    if layout not in LAYOUTS:
        raise LayoutError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if layout in ("plain", "raw"):
        return layout
    name = tokenizer_name(tokenizer)
    if not has_chat_template(tokenizer):
        if layout == "chat":
            raise LayoutError(
                f"layout 'chat' needs a chat template, but the tokenizer {name} has none; use layout "
                "'plain' (### Instruction / ### Response) or 'raw' (instruction then response), or "
                "give the tokenizer a chat_template"
            )
        return "plain"
    if _chat_split(tokenizer, "Say hello.", "Hello.") is None:
        if layout == "chat":
            raise LayoutError(
                f"the chat template of the tokenizer {name} does not render the prompt as a prefix of "
                "the conversation, so the response tokens cannot be separated; use layout 'plain' or 'raw'"
            )
        logger.warning("the chat template of %s is not prefix-stable; using the plain layout", name)
        return "plain"
    return "chat"


def prompt_and_response_text(tokenizer: Any, ex: Example, layout: str = "auto") -> tuple[str, str, str]:
    """(prompt text, response text, resolved layout). In ``chat`` the response text includes the
    end-of-turn markup; in ``plain`` and ``raw`` the EOS token is added by :func:`tokenize_example`."""
    resolved = resolve_layout(tokenizer, layout)
    prompt, response = _texts(tokenizer, ex, resolved)
    return prompt, response, resolved


def _texts(tokenizer: Any, ex: Example, resolved: str) -> tuple[str, str]:
    if resolved == "chat":
        split = _chat_split(tokenizer, ex.instruction, ex.response)
        if split is None:
            raise LayoutError(
                f"line {ex.line}: the chat template of the tokenizer {tokenizer_name(tokenizer)} does not "
                "render this example's prompt as a prefix of the conversation; use layout 'plain' or 'raw'"
            )
        return split
    if resolved == "raw":
        return ex.instruction, ex.response
    return PLAIN_PROMPT.format(instruction=ex.instruction), ex.response


def tokenize_example(tokenizer: Any, ex: Example, max_length: int,
                     layout: str = "auto") -> TokenizedExample | None:
    """Tokenise one example in ``layout`` (see the module docstring); the response is cut to fit
    ``max_length`` (``None`` if nothing of it fits)."""
    return _tokenize(tokenizer, ex, max_length, resolve_layout(tokenizer, layout))


def _tokenize(tokenizer: Any, ex: Example, max_length: int, resolved: str) -> TokenizedExample | None:
    prompt, response = _texts(tokenizer, ex, resolved)
    templated = resolved == "chat"  # the template writes its own special tokens
    prompt_ids = list(tokenizer(prompt, add_special_tokens=not templated)["input_ids"])
    response_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    if not templated and tokenizer.eos_token_id is not None:
        response_ids.append(int(tokenizer.eos_token_id))
    room = max_length - len(prompt_ids)
    if room <= 0 or not response_ids:
        return None
    truncated = len(response_ids) > room
    return TokenizedExample(prompt_ids + response_ids[:room], len(prompt_ids), truncated)


def tokenize_data(tokenizer: Any, data: InstructionData, max_length: int,
                  layout: str = "auto") -> TokenizedData:
    """Tokenise every example in ``layout``; counts truncated responses and dropped examples
    (prompt too long). ``TokenizedData.layout`` records the resolved layout."""
    if max_length < 2:
        raise UmmError(f"max_length must be at least 2, got {max_length}")
    resolved = resolve_layout(tokenizer, layout)
    if resolved in ("plain", "raw") and tokenizer.eos_token_id is None:
        logger.warning("the tokenizer %s has no EOS token: responses end without one", tokenizer_name(tokenizer))
    out = TokenizedData(items=[], layout=resolved)
    for ex in data.examples:
        item = _tokenize(tokenizer, ex, max_length, resolved)
        out.items.append(item)
        if item is None:
            out.n_dropped += 1
            out.dropped_lines.append(ex.line)
        elif item.truncated:
            out.n_truncated += 1
    if out.n_truncated or out.n_dropped:
        logger.warning(
            "%d of %d responses truncated to max_length=%d; %d examples dropped (prompt alone "
            "fills the context)", out.n_truncated, len(data), max_length, out.n_dropped,
        )
    return out
