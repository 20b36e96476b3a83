"""A recipe's ``chat_template:``: ``auto``, a template name, or a Jinja string (as mergekit reads it).

- ``auto``: the template most of the input models have (first in recipe order on a tie); an
  error when none has one;
- a name (:data:`NAMED_TEMPLATES`: ``chatml``, ``alpaca``, ``llama3``, ``mistral``, ``exaone``,
  the names mergekit ships): that template, written here for umm;
- anything else with ``{`` in it: a Jinja template, checked for syntax.

The merge writes the result into the output's ``tokenizer_config.json`` (``chat_template``) and
drops the reference model's ``chat_template.jinja`` / ``chat_template.json``, which transformers
would otherwise prefer. A template that cannot be used is an error before any tensor is merged.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from umm.checkpoints.errors import CheckpointError
from umm.checkpoints.reader import read_json_file
from umm.errors import UmmError

#: files holding a chat template apart from tokenizer_config.json (transformers reads them first)
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")

NAMED_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "alpaca": (
        "{{ bos_token }}{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
        " + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
        "{% endif %}{% endfor %}"
    ),
    "exaone": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ '[|system|]' + message['content'] + '[|endofturn|]\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '[|user|]' + message['content'] + '\\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '[|assistant|]' + message['content'] + '[|endofturn|]\\n' }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
    ),
}


class ChatTemplateError(UmmError):
    """A ``chat_template`` that cannot be written (unknown name, bad Jinja, ``auto`` with none found)."""


def folder_chat_template(folder: Path) -> str | None:
    """The chat template a model folder carries (``chat_template.jinja``, ``chat_template.json``, or
    ``tokenizer_config.json``'s ``chat_template``: a string, or the ``default`` of a named list)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8").strip() or None
    for name in ("chat_template.json", "tokenizer_config.json"):
        data = _json(folder / name)
        template = data.get("chat_template") if isinstance(data, dict) else None
        if isinstance(template, list):
            template = next((t.get("template") for t in template
                             if isinstance(t, dict) and t.get("name") == "default"), None)
        if isinstance(template, str) and template.strip():
            return template.strip()
    return None


def _json(path: Path) -> Any:
    """The parsed file (size- and depth-bounded); ``None`` when absent or unreadable (no template)."""
    if not path.is_file():
        return None
    try:
        return read_json_file(path, path.name)
    except CheckpointError:
        return None


def resolve_chat_template(spec: str | None, folders: Sequence[Path]) -> str | None:
    """The template ``spec`` asks for (``None``: keep the reference model's files as they are)."""
    if spec is None:
        return None
    text = spec.strip()
    if text == "auto":
        found = [t for t in (folder_chat_template(f) for f in folders) if t]
        if not found:
            raise ChatTemplateError(
                "chat_template: auto, but none of the models has a chat template; name one "
                f"({', '.join(NAMED_TEMPLATES)}), give a Jinja string, or remove the key"
            )
        return Counter(found).most_common(1)[0][0]
    if text in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[text]
    if "{" not in text:
        raise ChatTemplateError(
            f"chat_template {text!r} is neither auto, a known template ({', '.join(NAMED_TEMPLATES)}) "
            "nor a Jinja template string"
        )
    _check_jinja(spec)
    return spec


def _check_jinja(template: str) -> None:
    try:
        import jinja2
    except ImportError:  # transformers needs it to apply templates; without it only the text is written
        return
    try:
        jinja2.Environment().parse(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"chat_template is not valid Jinja (line {exc.lineno}: {exc.message})") from None
