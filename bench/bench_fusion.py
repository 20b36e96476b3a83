"""Distribution-fusion speed and memory figures (prints them; asserts nothing).

1. Vocabulary mapping between real-size vocabularies: a 32k ``▁``-BPE (Llama-2 style) and a 50k
   byte-level BPE (GPT-2/NeoX style), both trained here with ``tokenizers`` on local text
   (Python sources of the installed packages), cached under ``--work``.
   Compared with a plain Python loop over the pivot vocabulary per unmatched token (timed on 20
   tokens, extrapolated).
2. Sequence alignment of the same ~N-token text under both tokenizers: ours vs a pure-Python
   O(n*m) dynamic programme like FuseLLM's (measured on a shorter prefix, and extrapolated).
3. Teacher pass throughput (response tokens/s) of a random Llama on ``--device``.
4. Peak memory of one training step with sparse k=10 targets vs a dense bf16 target of the same
   batch (each in a fresh subprocess; CPU: growth of the peak RSS over the first step, Linux
   only; CUDA: max allocated over a step after a warm-up one).

Run: ``python bench/bench_fusion.py [--work DIR] [--device cpu|cuda] [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _corpus(limit_bytes: int) -> list[str]:
    import site

    texts, total = [], 0
    roots = [Path(p) for p in site.getsitepackages()]
    for root in roots:
        for f in sorted(root.rglob("*.py")):
            try:
                t = f.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            texts.append(t)
            total += len(t)
            if total >= limit_bytes:
                return texts
    return texts


def build_tokenizers(work: Path, corpus_mb: int) -> tuple[object, object, float]:
    """A 32k ``▁``-BPE (SentencePiece-like, as Llama-2's) and a 50k byte-level BPE (as GPT-NeoX's),
    trained by umm's one tokenizer builder on ``corpus_mb`` MiB of text; cached in ``work``.

    (Earlier runs built the 32k one by hand with ``byte_fallback=True``; the trainer adds no
    ``<0xNN>`` tokens, so that setting did nothing: unseen characters were ``<unk>`` as here.)"""
    from transformers import AutoTokenizer

    from umm.experts.tokenizers import train_tokenizer

    a_dir, b_dir = work / "tok32k_metaspace", work / "tok50k_bytelevel"
    seconds = 0.0
    if not ((a_dir / "tokenizer.json").is_file() and (b_dir / "tokenizer.json").is_file()):
        texts = _corpus(corpus_mb << 20)
        t0 = time.perf_counter()
        a = train_tokenizer("metaspace", texts, 32000, split_digits=False, mark_first_word=True,
                            specials=("<unk>", "<s>", "</s>"), pad_token="</s>", padding_side=None)
        b = train_tokenizer("bytelevel", texts, 50000, split_digits=False, padding_side=None)
        seconds = time.perf_counter() - t0
        a.save_pretrained(a_dir)
        b.save_pretrained(b_dir)
    return AutoTokenizer.from_pretrained(a_dir), AutoTokenizer.from_pretrained(b_dir), seconds


def python_dtw(a: list[str], b: list[str]) -> float:
    """A plain O(n*m) Python DTW with edit-distance costs (the reference implementation's shape)."""
    from rapidfuzz.distance import Levenshtein

    inf = float("inf")
    n, m = len(a), len(b)
    prev = [inf] * (m + 1)
    prev[0] = 0.0
    for i in range(1, n + 1):
        cur = [inf] * (m + 1)
        for j in range(1, m + 1):
            c = Levenshtein.distance(a[i - 1].replace(" ", ""), b[j - 1].replace(" ", ""))
            cur[j] = c + min(prev[j - 1], prev[j], cur[j - 1])
        prev = cur
    return prev[m]


def bench_alignment(work: Path, corpus_mb: int, seq_tokens: int) -> dict[str, object]:
    from umm.fusion.align import align_sequences, build_vocab_map, normalised_vocab

    ta, tb, train_s = build_tokenizers(work, corpus_mb)
    res: dict[str, float] = {"vocab_a": len(ta), "vocab_b": len(tb), "tokenizer_training_s": round(train_s, 1)}
    t0 = time.perf_counter()
    vm = build_vocab_map(tb, ta)  # 50k source -> 32k pivot
    res["vocab_map_50k_to_32k_s"] = round(time.perf_counter() - t0, 2)
    res.update({f"map_{k}": v for k, v in vm.stats.items()})
    t0 = time.perf_counter()
    vm2 = build_vocab_map(ta, tb)
    res["vocab_map_32k_to_50k_s"] = round(time.perf_counter() - t0, 2)
    res.update({f"map2_{k}": v for k, v in vm2.stats.items()})

    # The reference's way: a Python loop over the whole pivot vocabulary per unmatched token.
    from rapidfuzz.distance import Levenshtein

    src_strings, piv_strings = normalised_vocab(tb), normalised_vocab(ta)
    pivot_set = set(piv_strings)
    unmatched = [x for x in src_strings if x and x not in pivot_set]
    sample = unmatched[:: max(1, len(unmatched) // 20)][:20]
    t0 = time.perf_counter()
    for q in sample:
        min((Levenshtein.distance(q, c), i) for i, c in enumerate(piv_strings) if c)
    per_query = (time.perf_counter() - t0) / len(sample)
    res["python_loop_vocab_map_extrapolated_s"] = round(per_query * len(unmatched), 1)

    text = "\n".join(_corpus(200_000)[-5:])
    va, vb = normalised_vocab(ta), normalised_vocab(tb)
    ia = ta(text, add_special_tokens=False)["input_ids"][:seq_tokens]
    ib = tb(ta.decode(ia), add_special_tokens=False)["input_ids"]
    sa, sb = [va[i] or "" for i in ia], [vb[i] or "" for i in ib]
    t0 = time.perf_counter()
    al = align_sequences(sb, sa)
    res["seq_align_tokens"] = f"{len(sb)}x{len(sa)}"  # type: ignore[assignment]
    res["seq_align_s"] = round(time.perf_counter() - t0, 4)
    short = 256
    t0 = time.perf_counter()
    python_dtw(sb[:short], sa[:short])
    py_s = time.perf_counter() - t0
    res["python_dtw_256x256_s"] = round(py_s, 3)
    res["python_dtw_extrapolated_s"] = round(py_s * len(sa) * len(sb) / (short * short), 2)
    t0 = time.perf_counter()
    align_sequences(sb[:short], sa[:short])
    res["ours_256x256_s"] = round(time.perf_counter() - t0, 4)
    res["seq_align_cost"] = al.cost
    return res


def bench_teacher(device: str, n_examples: int) -> dict[str, float]:
    from umm.experts.random_models import make_random_llama
    from umm.fusion.data import InstructionData
    from umm.fusion.teacher import teacher_pass

    recs = [{"instruction": f"Compute the sum of the numbers from 1 to {i}.",
             "response": " ".join(f"{j} + {j + 1} = {2 * j + 1}." for j in range(i % 20 + 20))}
            for i in range(n_examples)]
    with tempfile.TemporaryDirectory() as tmp:
        model = make_random_llama(Path(tmp) / "m", hidden_size=256, num_layers=4, num_heads=4)
        data = InstructionData.from_records(recs)
        t0 = time.perf_counter()
        out = teacher_pass(model, data, Path(tmp) / "t", k=10, batch_size=16, device=device,
                           max_length=512, show_progress=False)
        s = time.perf_counter() - t0
        return {"teacher_examples": len(out), "teacher_response_tokens": out.n_tokens,
                "teacher_wall_s": round(s, 2), "teacher_tokens_per_s": round(out.n_tokens / s, 1),
                "teacher_compute_tokens_per_s": round(out.n_tokens / out.index["compute_seconds"], 1),
                "teacher_bytes_per_token": round(out.bytes_per_token, 1)}


_STEP = r"""
import json, sys, torch
from pathlib import Path
mode, device, model_dir, b, l, k = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
from umm.checkpoints.loading import load_causal_lm
from umm.fusion.loss import sparse_distill_loss, dense_distill_loss
model = load_causal_lm(model_dir, device=device, dtype=torch.float32); model.train()
v = model.config.vocab_size
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, v, (b, l), generator=g)
t_ids = torch.randint(0, v, (b, l, k), generator=g)
t_lp = torch.log_softmax(torch.randn(b, l, k, generator=g), -1)
mask = torch.ones(b, l, k, dtype=torch.bool)
resp = torch.ones(b, l, dtype=torch.bool)
import re
def hwm():  # peak RSS (bytes) since the last reset
    return int(re.search(r'VmHWM:\s+(\d+)', open('/proc/self/status').read()).group(1)) * 1024
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * 4096
def step():
    x = ids.to(device)
    logits = model(input_ids=x).logits
    gold = x.roll(-1, 1)
    if mode == 'sparse':
        loss = sparse_distill_loss(logits, t_ids.to(device), t_lp.to(device), mask.to(device), gold, resp.to(device))
    else:  # FuseLLM's way: densify the same targets to [B, L, V] bf16, then the dense loss
        dense = torch.zeros(b, l, v, dtype=torch.bfloat16, device=device)
        dense.scatter_(-1, t_ids.to(device), t_lp.exp().to(device, torch.bfloat16))
        loss = dense_distill_loss(logits, dense, gold, resp.to(device))
    loss.backward()
    model.zero_grad(set_to_none=True)
if device.startswith('cuda'):
    step(); torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
    step(); torch.cuda.synchronize(); peak = torch.cuda.max_memory_allocated() - base
else:
    open('/proc/self/clear_refs', 'w').write('5')  # reset the peak-RSS counter (Linux)
    base = rss(); step(); peak = hwm() - base
print(json.dumps({'mode': mode, 'peak_bytes': peak}))
"""


def bench_memory(device: str, batch: int, length: int, vocab: int, k: int) -> dict[str, float]:
    from umm.experts.random_models import make_random_llama

    res: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = make_random_llama(Path(tmp) / "m", hidden_size=128, num_layers=2, vocab_size=vocab)
        for mode in ("sparse", "dense"):
            out = subprocess.run([sys.executable, "-c", _STEP, mode, device, str(model), str(batch), str(length), str(k)],
                                 capture_output=True, text=True, check=True,
                                 env={**os.environ, "UMM_NO_PROGRESS": "1"})
            res[f"{mode}_step_peak_MB"] = round(json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"] / 1e6, 1)
    res["dense_over_sparse"] = round(res["dense_step_peak_MB"] / max(res["sparse_step_peak_MB"], 1e-9), 2)
    res["dense_target_tensor_MB"] = round(batch * length * vocab * 2 / 1e6, 1)
    res["sparse_target_tensors_MB"] = round(batch * length * k * (8 + 4 + 1) / 1e6, 2)
    res["memory_setting"] = f"batch {batch} x {length} tokens, vocab {vocab}, k {k}, {device}"  # type: ignore[assignment]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "umm-bench-fusion")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--corpus-mb", type=int, default=24)
    ap.add_argument("--seq-tokens", type=int, default=2048)
    ap.add_argument("--quick", action="store_true", help="smaller teacher and memory runs")
    ap.add_argument("--parts", default="alignment,teacher,memory", help="comma-separated subset to run")
    args = ap.parse_args()
    os.environ.setdefault("UMM_NO_PROGRESS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    args.work.mkdir(parents=True, exist_ok=True)
    from umm.ui import console, table

    results: dict[str, object] = {}
    parts = set(args.parts.split(","))
    if "alignment" in parts:
        results.update(bench_alignment(args.work, args.corpus_mb, args.seq_tokens))
    if "teacher" in parts:
        results.update(bench_teacher(args.device, 32 if args.quick else 128))
    if "memory" in parts:
        batch, length = (2, 256) if args.quick else (4, 512)
        results.update(bench_memory(args.device, batch, length, 32000, 10))
    results["cpu_count"] = os.cpu_count()
    console.print(table("umm fusion bench", ["figure", "value"], sorted(results.items())))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
