"""Answer quality (LongBench QA F1, ROUGE-L, RULER string-match-all) and fidelity to full prefill.

Fidelity compares a fused generation with the full-prefill reference of the same prompt: the same greedy
answer (token ids equal), the same first token (top-1), and KL(full || fused) of the first-token distribution.
"""
from __future__ import annotations

import re
import string
from collections import Counter

import torch

from ..profile import kl_first_token

_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """LongBench's (SQuAD's) normalisation: lower-case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def f1_score(prediction: str, golds: list[str]) -> float:
    """LongBench `qa_f1_score`: word-level F1 of the normalised strings, best over the gold answers."""
    pred = normalize_answer(prediction).split()
    best = 0.0
    for gold in golds:
        ref = normalize_answer(gold).split()
        common = sum((Counter(pred) & Counter(ref)).values())
        if common:
            precision, recall = common / len(pred), common / len(ref)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


_ROUGE = None


def rouge_l(prediction: str, golds: list[str]) -> float:
    """ROUGE-L F-measure (rouge-score package, Porter stemming), best over the gold answers."""
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer
        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    if not prediction.strip():
        return 0.0
    return max((_ROUGE.score(gold, prediction)["rougeL"].fmeasure for gold in golds), default=0.0)


def string_match_all(prediction: str, golds: list[str]) -> float:
    """RULER's string_match_all: the share of gold strings found (case-insensitively) in the prediction."""
    if not golds:
        return 0.0
    pred = prediction.lower()
    return sum(gold.lower() in pred for gold in golds) / len(golds)


def first_token_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """What a reference keeps of the first-token distribution: fp32 log-probabilities over the vocabulary."""
    return logits.detach().float().log_softmax(-1)


def fidelity(ref_token_ids: list[int], ref_logits: torch.Tensor, token_ids: list[int],
             logits: torch.Tensor) -> dict:
    """Same answer, first-token agreement and KL(full || fused); `ref_logits` may be logits or log-probs."""
    return {
        "same_answer": list(ref_token_ids) == list(token_ids),
        "top1": int(ref_logits.argmax()) == int(logits.argmax()),
        "kl": max(0.0, kl_first_token(ref_logits, logits)),
    }
