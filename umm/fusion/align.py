"""Token alignment between a source tokenizer and the pivot's.

Three parts, all following FuseLLM/FuseChat's method but vectorised:

* **Normalisation** (:func:`normalised_vocab`): every token id becomes the bytes it stands for,
  written as a latin-1 string, so tokens of different tokenizers compare equal exactly when they
  spell the same bytes: byte-level BPE symbols (``Ġ`` = space, ...) are decoded through the GPT-2
  byte table, SentencePiece's ``▁`` becomes a space and ``<0xNN>`` byte-fallback pieces become
  their byte. Special tokens become ``"\\x00eos"``, ``"\\x00bos"``, ... (same role, same string).
* **Sequence alignment** (:func:`align_sequences`): dynamic time warping over the two token
  sequences of the same text with the edit distance of the token strings (spaces removed) as the
  cost, as FuseLLM does; the cost matrix comes from rapidfuzz (C++) and the recurrence is solved a
  row at a time with NumPy (a min-plus prefix scan), so 2k x 2k tokens take milliseconds.
* **Vocabulary mapping** (:func:`build_vocab_map`): a source id maps to the pivot id with the same
  normalised string; otherwise (``"stats"``) to the pivot id it was most often aligned with in the
  corpus; otherwise to the pivot id at minimum edit distance (ties: lowest id), searched with
  length buckets and growing distance cut-offs instead of a brute-force double loop.

:func:`project_to_pivot` puts it together for one sequence: a teacher's top-k at its own response
positions becomes a sparse distribution over pivot ids at the pivot's response positions; pivot
positions without a usable 1-1 alignment fall back to the one-hot gold token.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from umm.atomic import atomic_path
from umm.errors import UmmError
from umm.fusion.sparse import SparseDist, merge_duplicates, renormalise

logger = logging.getLogger(__name__)

SPACE_MARKERS = ("Ġ", "▁")

# How a source id was mapped (VocabMap.how).
EXACT, STATS, EDIT, SPECIAL, UNMAPPED = 0, 1, 2, 3, 4
_HOW_NAMES = {EXACT: "exact", STATS: "stats", EDIT: "edit", SPECIAL: "special", UNMAPPED: "unmapped"}


class AlignmentError(UmmError):
    """Two tokenizers or sequences that cannot be aligned."""


# --------------------------------------------------------------------------- normalisation


def _byte_decoder() -> dict[str, int]:
    """The inverse of the GPT-2 byte-to-unicode table used by byte-level BPE tokenizers."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table: dict[int, int] = {b: b for b in printable}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = 256 + n
            n += 1
    return {chr(u): b for b, u in table.items()}


_BYTE_DECODER = _byte_decoder()


def _walk_types(obj: Any) -> list[str]:
    """Every ``type`` (and Replace pattern) in a tokenizer JSON sub-tree."""
    found: list[str] = []
    if isinstance(obj, dict):
        if isinstance(obj.get("type"), str):
            found.append(obj["type"])
        if obj.get("type") == "Replace":
            pattern = obj.get("pattern", {})
            if isinstance(pattern, dict) and "▁" in str(pattern.get("String", "")):
                found.append("Metaspace")
        for v in obj.values():
            found.extend(_walk_types(v))
    elif isinstance(obj, list):
        for v in obj:
            found.extend(_walk_types(v))
    return found


def token_scheme(tokenizer: Any) -> str:
    """``"bytelevel"``, ``"metaspace"`` or ``"plain"``: how a token string spells its text."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        try:
            spec = json.loads(backend.to_str())
            types = _walk_types({k: spec.get(k) for k in ("pre_tokenizer", "decoder", "normalizer")})
            if "ByteLevel" in types:
                return "bytelevel"
            if "Metaspace" in types:
                return "metaspace"
        except (ValueError, AttributeError):  # a backend that cannot serialise: use the vocab
            pass
    vocab = list(tokenizer.get_vocab())
    g = sum("Ġ" in t for t in vocab)
    s = sum("▁" in t for t in vocab)
    if max(g, s) < max(1, len(vocab) // 100):
        return "plain"
    return "bytelevel" if g >= s else "metaspace"


def _special_roles(tokenizer: Any) -> dict[int, str]:
    roles: dict[int, str] = {}
    for tid, tok in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(tok, "special", False):
            roles[int(tid)] = "special:" + str(tok)
    for tid in getattr(tokenizer, "all_special_ids", []) or []:
        roles.setdefault(int(tid), "special:" + str(tokenizer.convert_ids_to_tokens(int(tid))))
    for role in ("unk", "pad", "bos", "eos"):  # later roles win: eos beats pad when shared
        tid = getattr(tokenizer, f"{role}_token_id", None)
        if tid is not None:
            roles[int(tid)] = role
    return roles


def normalise_token(token: str, scheme: str) -> str:
    """The bytes a token string stands for, as a latin-1 string (see module docstring)."""
    if scheme == "bytelevel" and all(c in _BYTE_DECODER for c in token):
        return bytes(_BYTE_DECODER[c] for c in token).decode("latin-1")
    if scheme == "metaspace":
        if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            try:
                return chr(int(token[3:5], 16))
            except ValueError:
                pass
        token = token.replace("▁", " ")
    return token.encode("utf-8").decode("latin-1")


def normalised_vocab(tokenizer: Any) -> list[str | None]:
    """Normalised string of every id in ``range(len(tokenizer))`` (``None`` for holes)."""
    scheme = token_scheme(tokenizer)
    n = len(tokenizer)
    toks = tokenizer.convert_ids_to_tokens(list(range(n)))
    roles = _special_roles(tokenizer)
    out: list[str | None] = []
    for i, t in enumerate(toks):
        if i in roles:
            out.append("\x00" + roles[i])
        elif t is None:
            out.append(None)
        else:
            out.append(normalise_token(t, scheme))
    return out


def vocab_coverage(source_tokenizer: Any, pivot_tokenizer: Any) -> float:
    """The fraction of the source's vocabulary that the pivot's covers exactly.

    ``covered / n``: ``n`` counts the source ids that have a token (holes excluded), ``covered``
    those whose normalised string (:func:`normalised_vocab`; a special token: its role, eos to
    eos...) is also one of the pivot's. The rest can only be mapped approximately (by edit
    distance or alignment statistics, :func:`build_vocab_map`), so a low coverage means a fusion
    whose targets are mostly approximations. 0 for an empty vocabulary.
    """
    src = [s for s in normalised_vocab(source_tokenizer) if s is not None]
    piv = {s for s in normalised_vocab(pivot_tokenizer) if s is not None}
    return sum(s in piv for s in src) / len(src) if src else 0.0


# --------------------------------------------------------------------------- sequence alignment


@dataclass(frozen=True)
class Alignment:
    """A monotone warping path: ``pairs[p] = (src index, tgt index)``, both non-decreasing."""

    pairs: np.ndarray  # [P, 2] int64
    cost: float
    n_src: int
    n_tgt: int

    def tgt_to_src(self) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in range(self.n_tgt)]
        for s, t in self.pairs.tolist():
            out[t].append(s)
        return out

    def src_to_tgt(self) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in range(self.n_src)]
        for s, t in self.pairs.tolist():
            out[s].append(t)
        return out


def _strip_spaces(tokens: Sequence[str]) -> list[str]:
    out = []
    for t in tokens:
        s = t.replace(" ", "")
        out.append(s if s else t)  # a pure-space token keeps its space (FuseLLM does the same)
    return out


def cost_matrix(src_tokens: Sequence[str], tgt_tokens: Sequence[str]) -> np.ndarray:
    """``[n, m]`` edit distances between space-stripped token strings (float64)."""
    from rapidfuzz import process
    from rapidfuzz.distance import Levenshtein

    return process.cdist(
        _strip_spaces(src_tokens), _strip_spaces(tgt_tokens),
        scorer=Levenshtein.distance, dtype=np.int32, workers=1,
    ).astype(np.float64)


def dtw(cost: np.ndarray) -> tuple[np.ndarray, float]:
    """Dynamic time warping over ``cost [n, m]``: the path (pairs) and its total cost.

    ``D[i, j] = cost[i, j] + min(D[i-1, j-1], D[i-1, j], D[i, j-1])``, solved row by row: with
    ``a[j] = cost[i, j] + min(D[i-1, j-1], D[i-1, j])`` and ``S`` the row's cumulative cost,
    ``D[i, j] = S[j] + min_{k <= j}(a[k] - S[k])`` (a NumPy prefix minimum). The path is traced
    back from the end preferring the diagonal, then the left, then the upper cell.
    """
    n, m = cost.shape
    if n == 0 or m == 0:
        raise AlignmentError(f"cannot align an empty token sequence (lengths {n} and {m})")
    d = np.empty((n, m), dtype=np.float64)
    d[0] = np.cumsum(cost[0])
    inf_col = np.array([np.inf])
    for i in range(1, n):
        prev = d[i - 1]
        diag = np.concatenate((inf_col, prev[:-1]))
        a = cost[i] + np.minimum(diag, prev)
        s = np.cumsum(cost[i])
        d[i] = s + np.minimum.accumulate(a - s)
    pairs = []
    i, j = n - 1, m - 1
    while i > 0 or j > 0:
        pairs.append((i, j))
        diag = d[i - 1, j - 1] if i > 0 and j > 0 else np.inf
        left = d[i, j - 1] if j > 0 else np.inf
        up = d[i - 1, j] if i > 0 else np.inf
        if diag <= left and diag <= up:
            i, j = i - 1, j - 1
        elif left <= up:
            j -= 1
        else:
            i -= 1
    pairs.append((0, 0))
    pairs.reverse()
    return np.asarray(pairs, dtype=np.int64), float(d[n - 1, m - 1])


def align_sequences(src_tokens: list[str], tgt_tokens: list[str]) -> Alignment:
    """Align two tokenisations of the same text given as (normalised) token strings."""
    pairs, total = dtw(cost_matrix(src_tokens, tgt_tokens))
    return Alignment(pairs, total, len(src_tokens), len(tgt_tokens))


def aligned_source_rows(
    src_tokens: Sequence[str], tgt_tokens: Sequence[str], alignment: Alignment
) -> np.ndarray:
    """For each target position, the source position whose distribution it takes, or -1.

    FuseLLM's rule: a target token aligned to exactly one source token takes that token's
    distribution when one string ends with the other (1-1 and n-1 matches); a target token aligned
    to several source tokens (1-n) falls back to the gold token.
    """
    counts = np.bincount(alignment.pairs[:, 1], minlength=alignment.n_tgt)
    rows = np.full(alignment.n_tgt, -1, dtype=np.int64)
    for s, t in alignment.pairs.tolist():
        if counts[t] == 1:
            a, b = src_tokens[s], tgt_tokens[t]
            if a.endswith(b) or b.endswith(a):
                rows[t] = s
    return rows


# --------------------------------------------------------------------------- vocabulary mapping


@dataclass
class VocabMap:
    """``src_to_pivot[i]``: the pivot id for source id ``i``; ``how[i]``: EXACT/STATS/EDIT/..."""

    src_to_pivot: np.ndarray  # int64 [source vocab]
    how: np.ndarray  # uint8 [source vocab]
    fallback_id: int
    method: str
    stats: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.stats = {name: int((self.how == k).sum()) for k, name in _HOW_NAMES.items()}
        self._table = torch.from_numpy(self.src_to_pivot.astype(np.int64))

    def apply(self, ids: torch.Tensor) -> torch.Tensor:
        """Map source ids (any shape); ids beyond the source vocabulary map to ``fallback_id``."""
        ids = ids.long()
        inside = (ids >= 0) & (ids < self._table.numel())
        return torch.where(inside, self._table[ids.clamp(0, self._table.numel() - 1)],
                           torch.full_like(ids, self.fallback_id))

    def save(self, path: str | Path) -> None:
        from safetensors.numpy import save_file

        with atomic_path(path) as tmp:
            save_file({"src_to_pivot": self.src_to_pivot.astype(np.int64), "how": self.how},
                      str(tmp), metadata={"method": self.method, "fallback_id": str(self.fallback_id)})

    @classmethod
    def load(cls, path: str | Path) -> VocabMap:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            return cls(f.get_tensor("src_to_pivot"), f.get_tensor("how"),
                       int(meta.get("fallback_id", 0)), meta.get("method", "exact+edit"))


def _fallback_id(tokenizer: Any) -> int:
    for attr in ("unk_token_id", "eos_token_id", "pad_token_id"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            return int(v)
    return 0


def min_edit_distance_map(
    queries: Sequence[str], candidates: Sequence[str], candidate_ids: np.ndarray,
    *, workers: int = -1, exhaustive_after: int = 6, chunk_cells: int = 8_000_000,
) -> tuple[np.ndarray, np.ndarray]:
    """For each query, the candidate id at minimum Levenshtein distance (ties: first candidate).

    Distance <= 1 is found by a hash join on single-deletion variants (two strings are within one
    edit only if they share one); then d = 2, 3, ... with rapidfuzz's bounded distance
    (``score_cutoff=d``) against only the candidates whose length is within ``d`` of the query's;
    queries still unresolved after ``exhaustive_after`` rounds are compared with every candidate.
    Returns (ids, distances; -1 where there is no candidate).
    """
    from rapidfuzz import process
    from rapidfuzz.distance import Levenshtein

    nq = len(queries)
    best = np.full(nq, -1, dtype=np.int64)
    dist = np.full(nq, -1, dtype=np.int64)
    if nq == 0 or len(candidates) == 0:
        return best, dist
    q_arr = np.asarray(queries, dtype=object)
    c_arr = np.asarray(candidates, dtype=object)
    q_len = np.fromiter((len(q) for q in queries), dtype=np.int64, count=nq)
    c_len = np.fromiter((len(c) for c in candidates), dtype=np.int64, count=len(candidates))

    def run(rows: np.ndarray, cols: np.ndarray, cutoff: int | None) -> None:
        if rows.size == 0 or cols.size == 0:
            return
        step = max(1, chunk_cells // cols.size)
        cand = list(c_arr[cols])
        for s in range(0, rows.size, step):
            r = rows[s : s + step]
            m = process.cdist(list(q_arr[r]), cand, scorer=Levenshtein.distance,
                              dtype=np.int32, workers=workers, score_cutoff=cutoff)
            arg = m.argmin(axis=1)
            mins = m[np.arange(r.size), arg]
            ok = mins <= cutoff if cutoff is not None else np.ones(r.size, dtype=bool)
            best[r[ok]] = candidate_ids[cols[arg[ok]]]
            dist[r[ok]] = mins[ok]

    _within_one(q_arr, c_arr, candidate_ids, best, dist)
    for d in range(2, exhaustive_after + 1):
        pending = np.flatnonzero(best < 0)
        if pending.size == 0:
            break
        for length in np.unique(q_len[pending]):
            rows = pending[q_len[pending] == length]
            cols = np.flatnonzero(np.abs(c_len - length) <= d)
            run(rows, cols, d)
    pending = np.flatnonzero(best < 0)
    if pending.size:
        run(pending, np.arange(len(candidates)), None)
    return best, dist


def _deletions(s: str) -> set[str]:
    return {s} | {s[:i] + s[i + 1 :] for i in range(len(s))}


def _within_one(q_arr: np.ndarray, c_arr: np.ndarray, candidate_ids: np.ndarray,
                best: np.ndarray, dist: np.ndarray) -> None:
    """Fill queries that have a candidate within edit distance 1 (ties: first candidate)."""
    from rapidfuzz.distance import Levenshtein

    index: dict[str, list[int]] = {}
    for pos, c in enumerate(c_arr.tolist()):
        for v in _deletions(c):
            index.setdefault(v, []).append(pos)
    for qi, q in enumerate(q_arr.tolist()):
        found: set[int] = set()
        for v in _deletions(q):
            found.update(index.get(v, ()))
        if not found:
            continue
        d, pos = min((Levenshtein.distance(q, c_arr[p], score_cutoff=1), p) for p in found)
        if d <= 1:
            best[qi] = candidate_ids[pos]
            dist[qi] = d


def build_vocab_map(
    source_tokenizer: Any,
    pivot_tokenizer: Any,
    *,
    method: str = "exact+edit",
    alignments: Iterable[tuple[Sequence[int], Sequence[int], Alignment]] | None = None,
    workers: int = -1,
) -> VocabMap:
    """Map every source id to a pivot id.

    ``method="exact+edit"``: exact normalised string, else minimum edit distance.
    ``method="stats"``: exact, else the pivot id most often aligned 1-1 with it in ``alignments``
    (``(source ids, pivot ids, Alignment)`` per sequence; ties: smaller edit distance, then lower
    id), else minimum edit distance. Special tokens map by role (eos to eos, ...), else by string,
    else to the pivot's unk/eos.
    """
    if method not in ("exact+edit", "stats"):
        raise UmmError(f"unknown vocabulary mapping method {method!r}; use 'exact+edit' or 'stats'")
    if method == "stats" and alignments is None:
        raise UmmError("the 'stats' vocabulary mapping needs corpus alignments")
    src = normalised_vocab(source_tokenizer)
    piv = normalised_vocab(pivot_tokenizer)
    fallback = _fallback_id(pivot_tokenizer)
    n = len(src)
    out = np.full(n, fallback, dtype=np.int64)
    how = np.full(n, UNMAPPED, dtype=np.uint8)

    piv_index: dict[str, int] = {}
    for pid, s in enumerate(piv):
        if s is not None:
            piv_index.setdefault(s, pid)
    pending: list[int] = []
    for sid, s in enumerate(src):
        if s is None:
            continue
        pid = piv_index.get(s)
        if pid is not None:
            out[sid] = pid
            how[sid] = SPECIAL if s.startswith("\x00") else EXACT
        elif s.startswith("\x00"):
            how[sid] = SPECIAL  # a special token the pivot lacks: the pivot's fallback id
        else:
            pending.append(sid)

    if method == "stats" and pending:
        pending = _apply_stats(alignments or [], src, piv, out, how, pending)

    if pending:
        logger.info("mapping %d of %d source tokens by minimum edit distance", len(pending), n)
        cand_ids = np.asarray([i for i, s in enumerate(piv) if s is not None and not s.startswith("\x00")],
                              dtype=np.int64)
        best, _ = min_edit_distance_map([src[i] for i in pending],  # type: ignore[misc]
                                        [piv[i] for i in cand_ids], cand_ids,  # type: ignore[misc]
                                        workers=workers)
        sel = np.asarray(pending, dtype=np.int64)
        found = best >= 0
        out[sel[found]] = best[found]
        how[sel[found]] = EDIT
    vm = VocabMap(out, how, fallback, method)
    logger.info("vocabulary map (%s): %s", method, vm.stats)
    return vm


def _apply_stats(
    alignments: Iterable[tuple[Sequence[int], Sequence[int], Alignment]],
    src: Sequence[str | None], piv: Sequence[str | None],
    out: np.ndarray, how: np.ndarray, pending: list[int],
) -> list[int]:
    """Fill ``pending`` source ids from 1-1 co-alignment counts; return those still unmapped."""
    from rapidfuzz.distance import Levenshtein

    keys = []
    big = np.int64(len(piv) + 1)
    for src_ids, piv_ids, al in alignments:
        s_arr = np.asarray(src_ids, dtype=np.int64)
        p_arr = np.asarray(piv_ids, dtype=np.int64)
        pairs = al.pairs
        one_src = np.bincount(pairs[:, 0], minlength=al.n_src)[pairs[:, 0]] == 1
        one_tgt = np.bincount(pairs[:, 1], minlength=al.n_tgt)[pairs[:, 1]] == 1
        p = pairs[one_src & one_tgt]
        keys.append(s_arr[p[:, 0]] * big + p_arr[p[:, 1]])
    if not keys:
        return pending
    uniq, counts = np.unique(np.concatenate(keys), return_counts=True)
    by_src: dict[int, list[tuple[int, int]]] = {}
    for key, c in zip(uniq.tolist(), counts.tolist()):
        by_src.setdefault(key // int(big), []).append((key % int(big), c))
    left = []
    for sid in pending:
        cands = [(pid, c) for pid, c in by_src.get(sid, []) if piv[pid] is not None
                 and not piv[pid].startswith("\x00")]  # type: ignore[union-attr]
        if not cands:
            left.append(sid)
            continue
        s = src[sid] or ""
        pid, _ = min(cands, key=lambda pc: (-pc[1], Levenshtein.distance(s, piv[pc[0]] or ""), pc[0]))
        out[sid] = pid
        how[sid] = STATS
    return left


# --------------------------------------------------------------------------- projection


def project_to_pivot(
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    src_gold_ids: Sequence[int],
    pivot_gold_ids: Sequence[int],
    src_vocab: Sequence[str | None],
    pivot_vocab: Sequence[str | None],
    vocab_map: VocabMap,
    *,
    temperature: float = 1.0,
) -> tuple[SparseDist, int]:
    """A source's top-k at its response tokens -> a distribution at the pivot's response tokens.

    ``topk_ids/logprobs [Ts, k]``: the source's distribution that predicted each of its response
    tokens ``src_gold_ids [Ts]``. Returns the renormalised ``[Tp, k]`` distribution over pivot ids
    for the pivot's response tokens ``pivot_gold_ids [Tp]`` and the number of positions that fell
    back to the one-hot gold token.
    """
    tp = len(pivot_gold_ids)
    s_tok = [token_string(src_vocab, i) for i in src_gold_ids]
    p_tok = [token_string(pivot_vocab, i) for i in pivot_gold_ids]
    rows = aligned_source_rows(s_tok, p_tok, align_sequences(s_tok, p_tok))
    rows_t = torch.from_numpy(rows)
    ok = rows_t >= 0
    k = topk_ids.shape[1]
    gold = torch.as_tensor(list(pivot_gold_ids), dtype=torch.long)
    ids = torch.zeros(tp, k, dtype=torch.long)
    lp = torch.full((tp, k), -torch.inf)
    mask = torch.zeros(tp, k, dtype=torch.bool)
    src_rows = rows_t[ok]
    ids[ok] = vocab_map.apply(topk_ids[src_rows])
    lp[ok] = topk_logprobs[src_rows].float()
    mask[ok] = torch.isfinite(lp[ok])
    ids[~ok, 0] = gold[~ok]
    lp[~ok, 0] = 0.0
    mask[~ok, 0] = True
    d = renormalise(SparseDist(ids, torch.where(mask, lp, -torch.inf), mask), temperature)
    d = merge_duplicates(d.ids, d.probs(), d.mask)
    return d, int((~ok).sum())


def token_string(vocab: Sequence[str | None], i: int) -> str:
    """The normalised string of id ``i`` (a unique placeholder for ids outside the vocabulary)."""
    if 0 <= i < len(vocab) and vocab[i] is not None:
        return vocab[i]  # type: ignore[return-value]
    return f"\x00id{i}"
