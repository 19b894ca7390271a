"""ROUGE-L recall of greedy generations against the reference completion (TOFU).

For a reference answer a (tokens a₁…aₙ) and a generation g (tokens g₁…gₘ),

    rouge_l_recall(a, g) = LCS(a, g) / n     (0 when n = 0 or m = 0),

LCS the length of the longest common subsequence of the two token sequences. This is
TOFU's and open-unlearning's ROUGE-L recall, ``rouge_scorer.RougeScorer(["rougeL"],
use_stemmer=True).score(reference, generation)["rougeL"].recall`` of Google's
``rouge_score`` package, to the last bit: the tokens are that package's own
(``rouge_score.tokenizers.DefaultTokenizer(use_stemmer=True)``, not re-implemented here):
the text lower-cased, every run of characters outside ``[a-z0-9]`` a separator (so
punctuation, underscores and non-ASCII letters split words: "café" gives "caf"), tokens
longer than three characters reduced by nltk's Porter stemmer ("running", "runs" → "run").
The tests check every row of TOFU's published evaluation logs against the logged value.

The LCS runs as a numba kernel on integer token ids (the classic O(n·m) dynamic
programme with two rows): on the 2,908 rows of TOFU's logs (about 20 tokens each) it is
about 15 times faster than ``rouge_score``'s pure-Python table, a fifth off a whole score,
where the stemmer dominates. :func:`lcs_length_reference` is the obvious pure-Python
version the kernel is tested against.

Generation follows TOFU's settings: greedy, up to ``MAX_LENGTH`` = 200 tokens prompt
included (TOFU's ``max_length``), stopped at the end-of-sequence token — and never past
the model's context (``max_position_embeddings`` or ``n_positions``). Each record's
budget is 200 minus its own prompt's length (TOFU counts the batch's left padding too;
per record, the result does not depend on the batch size). A longer generation can only
raise recall, so a model that reaches the reference words after a preamble is scored as
TOFU scores it.
Generating needs a tokenizer: the task's ``tokenizer`` attribute (a task without one, or
``{"text"}`` records, mark the metric unavailable, with the reason).

>>> rouge_l_recall_score("The capital is Paris.", "paris is the capital")
0.5
>>> words("The capital is Paris."), words("She runs; he's running!")
(['the', 'capit', 'is', 'pari'], ['she', 'run', 'he', 's', 'run'])
>>> from rouge_score import rouge_scorer
>>> scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
>>> scorer.score("The capital is Paris.", "paris is the capital")["rougeL"].recall
0.5
>>> lcs_length([1, 2, 3, 4], [2, 4, 3]), lcs_length_reference([1, 2, 3, 4], [2, 4, 3])
(2, 2)
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import numba
import numpy as np
import torch

from attribution.data import model_context, pad_token_id
from attribution.progress import progress_bar
from attribution.task import Task

MAX_LENGTH = 200  # TOFU's generation max_length: prompt + new tokens (module doc)


@functools.cache
def _rouge_tokenizer() -> Any:
    # nltk (under rouge_score) takes about a second to import: loaded at the first score
    from rouge_score.tokenizers import DefaultTokenizer

    return DefaultTokenizer(use_stemmer=True)


def words(text: str) -> list[str]:
    """The tokens ``rouge_score`` scores ROUGE-L on (its tokenizer, with the Porter stemmer).

    >>> words("Born in 1901, in Yrhalton!")
    ['born', 'in', '1901', 'in', 'yrhalton']
    >>> words("snake_case, naïve café")
    ['snake', 'case', 'na', 've', 'caf']
    """
    return _rouge_tokenizer().tokenize(text)


@numba.njit
def _lcs_kernel(a: np.ndarray, b: np.ndarray) -> int:  # pragma: no cover - compiled
    """LCS length of two int64 arrays: L[i, j] = L[i-1, j-1] + 1 if aᵢ = bⱼ else max(...)."""
    previous = np.zeros(b.shape[0] + 1, dtype=np.int64)
    current = np.zeros(b.shape[0] + 1, dtype=np.int64)
    for i in range(a.shape[0]):
        for j in range(b.shape[0]):
            if a[i] == b[j]:
                current[j + 1] = previous[j] + 1
            else:
                current[j + 1] = max(previous[j + 1], current[j])
        previous, current = current, previous
    return previous[b.shape[0]]


def lcs_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common subsequence of two integer sequences (numba).

    >>> lcs_length([5, 1, 5], [1, 5, 5, 1])
    2
    """
    return int(_lcs_kernel(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)))


def lcs_length_reference(a: Sequence[Any], b: Sequence[Any]) -> int:
    """The obvious full-table dynamic programme, in pure Python (the test reference).

    >>> lcs_length_reference("ABCBDAB", "BDCABA")
    4
    """
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = (
                table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
            )
    return table[len(a)][len(b)]


def rouge_l_recall_score(reference: str, generation: str) -> float:
    """LCS(words(reference), words(generation)) / len(words(reference)); 0 if either is empty.

    Equal to ``RougeScorer(["rougeL"], use_stemmer=True).score(reference, generation)
    ["rougeL"].recall`` (the same tokens, the same integer LCS, the same division).

    >>> rouge_l_recall_score("a b c d", "a x c")
    0.5
    >>> rouge_l_recall_score("He was running home.", "he runs home")
    0.75
    """
    ref, gen = words(reference), words(generation)
    if not ref or not gen:
        return 0.0
    ids: dict[str, int] = {}
    ref_ids = [ids.setdefault(w, len(ids)) for w in ref]
    gen_ids = [ids.setdefault(w, len(ids)) for w in gen]
    return lcs_length(ref_ids, gen_ids) / len(ref)


@torch.no_grad()
def generate_completions(
    model: Any,
    tokenizer: Any,
    records: Sequence[Mapping[str, Any]],
    *,
    batch_size: int = 32,
    max_length: int = MAX_LENGTH,
    progress: bool | None = None,
) -> list[str]:
    """Greedy completions of each record's ``prompt`` (decoded, special tokens dropped).

    Each record may generate ``max_length`` minus its prompt's length new tokens (at least
    one), within the model's context; decoding stops at the end-of-sequence token. Prompts
    are left-padded into batches (with the attention mask), and each row is cut to its own
    budget, so the result does not depend on ``batch_size`` (unless the model's context,
    counted with the batch's padding, is shorter than a budget); the tokenizer is not
    modified. The model runs on its own device.
    """
    device = next(model.parameters()).device
    pad, eos = pad_token_id(tokenizer), tokenizer.eos_token_id
    prompts = [list(tokenizer(r["prompt"])["input_ids"]) for r in records]
    budgets = [max(1, max_length - len(p)) for p in prompts]
    context = model_context(model)
    texts: list[str] = []
    for start in progress_bar(range(0, len(records), batch_size), "generating", progress):
        chunk = prompts[start : start + batch_size]
        input_ids, attention_mask = _left_pad(chunk, pad)
        new = max(budgets[start : start + batch_size])
        if context is not None:
            new = max(1, min(new, context - input_ids.shape[1]))
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=new,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=eos,
        )
        for row, budget in zip(
            out[:, input_ids.shape[1] :].tolist(), budgets[start:], strict=False
        ):
            row = row[:budget]
            if eos is not None and eos in row:
                row = row[: row.index(eos)]
            texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts


def rouge_l_recall(
    model: Any,
    task: Task,
    records: Sequence[Mapping[str, Any]],
    *,
    batch_size: int = 32,
    progress: bool | None = None,
) -> dict[str, Any]:
    """``{"value": mean recall, "per_example": [...]}`` of greedy generations vs completions.

    Generation needs the task's ``tokenizer`` attribute. Without one, or for records
    without a ``prompt`` and ``completion`` (``{"text"}`` records), the metric is
    ``{"value": None, "per_example": [], "reason"}``.
    """
    tokenizer = getattr(task, "tokenizer", None)
    if tokenizer is None:
        return unavailable(
            f"ROUGE-L generates text and the task ({type(task).__name__}) has no tokenizer"
        )
    if not all("prompt" in r and "completion" in r for r in records):
        return unavailable("ROUGE-L needs prompt/completion records")
    generations = generate_completions(
        model, tokenizer, records, batch_size=batch_size, progress=progress
    )
    scores = [
        rouge_l_recall_score(r["completion"], g) for r, g in zip(records, generations, strict=True)
    ]
    return {"value": float(np.mean(scores)), "per_example": scores}


def unavailable(reason: str) -> dict[str, Any]:
    """The schema's marker of a metric that cannot be computed for a split."""
    return {"value": None, "per_example": [], "reason": reason}


def _left_pad(sequences: Sequence[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask, so every prompt ends at the last column.

    >>> ids, mask = _left_pad([[5, 6], [7]], 0)
    >>> ids.tolist(), mask.tolist()
    ([[5, 6], [0, 7]], [[1, 1], [0, 1]])
    """
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq) :] = 1
    return ids, mask
