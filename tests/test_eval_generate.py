"""Batched greedy generation and evaluate() on tiny random models (plumbing, not accuracy)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from umm.errors import UmmError
from umm.eval import evaluate, get_task
from umm.eval.generate import cut_at_stop, generate, render_prompt


@pytest.fixture(scope="module")
def lm(tiny_models: dict[str, Path]):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    old = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared CPU: one thread is much faster
    model = AutoModelForCausalLM.from_pretrained(tiny_models["base"], dtype=torch.float32, use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(tiny_models["base"])
    yield model, tok
    torch.set_num_threads(old)


PROMPTS = ["Question: Tom has 3 apples.", "def add(a, b):", "x", "The quick brown fox jumps over the lazy dog. 0123"]


def test_batched_left_padded_equals_one_by_one(lm) -> None:
    model, tok = lm
    one = generate(model, tok, PROMPTS, max_new_tokens=12, batch_size=1)
    batched = generate(model, tok, PROMPTS, max_new_tokens=12, batch_size=4)
    assert batched == one
    assert generate(model, tok, PROMPTS, max_new_tokens=12, batch_size=3) == one  # order restored


def test_hf_backend_matches_own_loop(lm) -> None:
    model, tok = lm
    assert generate(model, tok, PROMPTS, max_new_tokens=10, backend="hf") == generate(model, tok, PROMPTS, max_new_tokens=10)


def test_stop_sequences_cut_each_row(lm) -> None:
    model, tok = lm
    free = generate(model, tok, PROMPTS, max_new_tokens=16)
    stop = free[0][3:5]
    assert stop
    stopped = generate(model, tok, PROMPTS, max_new_tokens=16, stop=(stop,))
    assert stopped == [cut_at_stop(o, (stop,)) for o in free]
    assert stopped[0] == free[0][: free[0].find(stop)]
    assert generate(model, tok, PROMPTS, max_new_tokens=16, stop=(stop,), backend="hf") == stopped


def test_deterministic_and_context_limited(lm) -> None:
    model, tok = lm
    long_prompt = "0123456789 " * 200  # longer than the model's 256 positions
    a = generate(model, tok, [long_prompt, "x"], max_new_tokens=8)
    assert a == generate(model, tok, [long_prompt, "x"], max_new_tokens=8)
    assert generate(model, tok, [], max_new_tokens=8) == []


def test_chat_template_only_when_present_and_asked(lm) -> None:
    _, tok = lm
    assert render_prompt(tok, "hi", chat=True) == ("hi", False)  # no template: plain prompt
    tok2 = type(tok).from_pretrained(tok.name_or_path)
    tok2.chat_template = "{% for m in messages %}<s>USER: {{ m['content'] }}\n{% endfor %}ASSISTANT:"
    text, special = render_prompt(tok2, "hi", chat=True)
    assert text == "<s>USER: hi\nASSISTANT:" and special
    assert render_prompt(tok2, "hi", chat=False) == ("hi", False)


def test_evaluate_records_and_scores(lm) -> None:
    model, tok = lm
    res = evaluate(model, tok, ["synth-math", get_task("synth-code")], limit=6, batch_size=4, show_progress=False,
                   num_threads=1)
    assert list(res.scores) == ["synth-math", "synth-code"]
    for name, score in res.scores.items():
        assert score.n == 6 and 0 <= score.ci_low <= score.score <= score.ci_high <= 1
        assert score.split == "search"
        recs = res.samples[name]
        assert len(recs) == 6 and all(r.prompt and isinstance(r.output, str) for r in recs)
        assert score.correct == sum(r.correct for r in recs)
    again = evaluate(model, tok, ["synth-math"], limit=6, batch_size=2, show_progress=False, num_threads=1)
    assert [r.output for r in again.samples["synth-math"]] == [r.output for r in res.samples["synth-math"]]
    test_ids = {r.id for r in evaluate(model, tok, ["synth-math"], split="test", limit=6, show_progress=False,
                                       max_new_tokens=2).samples["synth-math"]}
    assert not test_ids & {r.id for r in res.samples["synth-math"]}


def test_sampling_is_seeded_and_gives_pass_at_k(lm) -> None:
    model, tok = lm
    greedy = generate(model, tok, PROMPTS, max_new_tokens=8)
    a = generate(model, tok, PROMPTS, max_new_tokens=8, temperature=1.5, seed=3)
    assert a == generate(model, tok, PROMPTS, max_new_tokens=8, temperature=1.5, seed=3)
    assert a != greedy and a != generate(model, tok, PROMPTS, max_new_tokens=8, temperature=1.5, seed=4)
    res = evaluate(model, tok, ["synth-list"], limit=3, num_samples=4, temperature=1.0, ks=(1, 2, 4),
                   show_progress=False, max_new_tokens=4)
    s = res.scores["synth-list"]
    assert s.n == 3 and len(res.samples["synth-list"]) == 12 and set(s.pass_at_k) == {1, 2, 4}
    assert s.pass_at_k[1] <= s.pass_at_k[2] <= s.pass_at_k[4]
    with pytest.raises(UmmError, match="temperature"):
        evaluate(model, tok, ["synth-list"], limit=2, num_samples=2, show_progress=False)
