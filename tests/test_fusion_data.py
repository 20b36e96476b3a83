"""Instruction-response data: line-numbered errors, truncation counting, prompt layouts."""

from __future__ import annotations

from pathlib import Path

import pytest

from umm.errors import UmmError
from umm.fusion.data import (
    PLAIN_PROMPT,
    DataError,
    Example,
    InstructionData,
    LayoutError,
    resolve_layout,
    tokenize_data,
    tokenize_example,
)

GOOD = '{"instruction": "Add 2 and 3.", "response": "2 + 3 = 5"}'


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("", "empty line"),
        ("   ", "empty line"),
        ('{"instruction": "x", "response": ', "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"instruction": "x"}', "missing field 'response'"),
        ('{"instruction": 3, "response": "y"}', "field 'instruction' must be a string"),
        ('{"instruction": "x", "response": "  "}', "field 'response' is empty"),
    ],
)
def test_bad_lines_are_named(tmp_path: Path, line: str, message: str) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join([GOOD, GOOD, line, GOOD]) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"d\.jsonl:3: {message}"):
        InstructionData.from_jsonl(f)


def test_good_file_hash_and_lines(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text(GOOD + "\n" + GOOD.replace("5", "five") + "\n", encoding="utf-8")
    d = InstructionData.from_jsonl(f)
    assert len(d) == 2 and [e.line for e in d.examples] == [1, 2]
    assert d.examples[1].response == "2 + 3 = five"
    f.write_text(GOOD + "\n", encoding="utf-8")
    assert InstructionData.from_jsonl(f).sha256 != d.sha256


def test_empty_missing_and_non_utf8_files(tmp_path: Path) -> None:
    (tmp_path / "e.jsonl").write_bytes(b"")
    with pytest.raises(DataError, match="no examples"):
        InstructionData.from_jsonl(tmp_path / "e.jsonl")
    with pytest.raises(DataError, match="cannot read"):
        InstructionData.from_jsonl(tmp_path / "missing.jsonl")
    (tmp_path / "b.jsonl").write_bytes(GOOD.encode() + b"\n\xff\xfe\n")
    with pytest.raises(DataError, match=r"b\.jsonl:2: not valid UTF-8"):
        InstructionData.from_jsonl(tmp_path / "b.jsonl")


def _tokenizer():
    from umm.experts.random_models import make_tokenizer

    return make_tokenizer()


def test_truncation_and_drops_are_counted() -> None:
    tok = _tokenizer()
    data = InstructionData.from_records([
        {"instruction": "Add.", "response": "The quick brown fox jumps over the lazy dog. " * 4},
        {"instruction": "The quick brown fox jumps over the lazy dog. " * 8, "response": "ok"},
        {"instruction": "Add.", "response": "7"},
    ])
    out = tokenize_data(tok, data, max_length=40)
    assert out.n_truncated == 1 and out.n_dropped == 1 and out.dropped_lines == [2]
    first = out.items[0]
    assert first is not None and len(first.input_ids) == 40 and first.truncated
    last = out.items[2]
    assert last is not None and not last.truncated
    assert last.response_ids[-1] == tok.eos_token_id  # no template: EOS ends the response
    assert last.response_mask() == [i >= last.n_prompt for i in range(len(last.input_ids))]
    with pytest.raises(UmmError, match="max_length"):
        tokenize_data(tok, data, max_length=1)


def test_chat_template_is_used_when_present() -> None:
    tok = _tokenizer()
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    item = tokenize_example(tok, Example("hi there", "the answer", 1), 100)
    assert item is not None
    prompt = tok.decode(item.input_ids[: item.n_prompt])
    assert prompt.startswith("<|user|>hi there") and prompt.endswith("<|assistant|>")
    assert tok.decode(item.response_ids) == "the answer</s>"


TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
EX = Example("Compute 3 + 4.", "3 + 4 = 7", 1)


def _ids(tok, text: str, special: bool) -> list[int]:
    return list(tok(text, add_special_tokens=special)["input_ids"])


def _mask_is_response_only(item) -> None:
    mask = item.response_mask()
    assert mask == [False] * item.n_prompt + [True] * (len(item.input_ids) - item.n_prompt)


def test_raw_layout_is_exactly_prompt_response_eos() -> None:
    tok = _tokenizer()
    tok.chat_template = TEMPLATE  # an explicit raw layout ignores the template
    item = tokenize_example(tok, EX, 100, layout="raw")
    assert item is not None
    prompt = _ids(tok, EX.instruction, True)
    assert item.input_ids == prompt + _ids(tok, EX.response, False) + [tok.eos_token_id]
    assert item.n_prompt == len(prompt) and tok.decode(item.response_ids) == "3 + 4 = 7</s>"
    _mask_is_response_only(item)
    out = tokenize_data(tok, InstructionData.from_records([{"instruction": EX.instruction, "response": EX.response}]),
                        100, layout="raw")
    assert out.layout == "raw" and out.items[0] is not None and out.items[0].input_ids == item.input_ids


def test_plain_layout_wraps_the_instruction() -> None:
    tok = _tokenizer()
    item = tokenize_example(tok, EX, 100, layout="plain")
    assert item is not None
    prompt = _ids(tok, PLAIN_PROMPT.format(instruction=EX.instruction), True)
    assert item.input_ids == prompt + _ids(tok, EX.response, False) + [tok.eos_token_id]
    assert tok.decode(item.input_ids[: item.n_prompt]) == "### Instruction:\nCompute 3 + 4.\n\n### Response:\n"
    _mask_is_response_only(item)
    assert tokenize_example(tok, EX, 100) == item  # auto without a template is plain
    tok.chat_template = TEMPLATE
    assert tokenize_example(tok, EX, 100, layout="plain") == item  # explicit plain ignores the template


def test_chat_layout_uses_the_template_and_auto_picks_it() -> None:
    tok = _tokenizer()
    tok.chat_template = TEMPLATE
    item = tokenize_example(tok, EX, 100, layout="chat")
    assert item is not None
    assert item.input_ids[: item.n_prompt] == _ids(tok, "<|user|>Compute 3 + 4.</s><|assistant|>", False)
    assert tok.decode(item.response_ids) == "3 + 4 = 7</s>"  # the template's end of turn, no extra EOS
    _mask_is_response_only(item)
    assert tokenize_example(tok, EX, 100, layout="auto") == item
    assert resolve_layout(tok) == "chat"
    raw = tokenize_example(tok, EX, 100, layout="raw")
    assert raw is not None and raw.input_ids != item.input_ids


def test_chat_without_template_names_the_tokenizer(tmp_path: Path) -> None:
    from umm.checkpoints.loading import load_tokenizer

    folder = tmp_path / "no_template_tok"
    _tokenizer().save_pretrained(folder)
    tok = load_tokenizer(folder)
    assert resolve_layout(tok, "auto") == "plain"
    with pytest.raises(LayoutError, match=r"layout 'chat' needs a chat template.*no_template_tok.*has none"):
        tokenize_example(tok, EX, 100, layout="chat")
    data = InstructionData.from_records([{"instruction": "a", "response": "b"}])
    with pytest.raises(LayoutError, match="no_template_tok"):
        tokenize_data(tok, data, 100, layout="chat")
    with pytest.raises(LayoutError, match="unknown layout 'alpaca'; choose one of auto, chat, plain, raw"):
        tokenize_data(tok, data, 100, layout="alpaca")


def test_template_that_is_not_prefix_stable() -> None:
    tok = _tokenizer()
    # the generation prompt differs from how an assistant turn is rendered: no clean split
    tok.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}[reply]{% endif %}"
    )
    with pytest.raises(LayoutError, match="prefix"):
        tokenize_example(tok, EX, 100, layout="chat")
    assert resolve_layout(tok, "auto") == "plain"
    assert tokenize_example(tok, EX, 100) == tokenize_example(tok, EX, 100, layout="plain")
