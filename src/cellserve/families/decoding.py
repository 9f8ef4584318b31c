"""Decoding of a model's scores into what a client wants: CTC greedy labels and text, and an LM's
log-likelihood of the tokens it was given. Serving post-processing, shared by the families that offer it
(OCR, imported graphs) and the OCR task's evaluation."""

from __future__ import annotations

import numpy as np

from cellserve.models.lm import log_softmax


def ctc_greedy(best: np.ndarray) -> list[int]:
    """Collapse repeats, then drop blanks (id 0)."""
    keep = np.ones(len(best), dtype=bool)
    keep[1:] = best[1:] != best[:-1]
    keep &= best != 0
    return best[keep].tolist()


def ctc_text(logits: np.ndarray, alphabet: str) -> str:
    """Greedy CTC decoding of (steps, classes) logits; class i > 0 is alphabet[i - 1]."""
    return "".join(alphabet[i - 1] for i in ctc_greedy(logits.argmax(axis=-1)))


def log_likelihood(scores: np.ndarray, tokens: np.ndarray) -> float:
    """Log-likelihood of tokens[1:] under per-step scores (T, vocab) of tokens[:-1]."""
    if len(tokens) != len(scores):
        raise ValueError(f"LM scoring: {len(tokens)} tokens but {len(scores)} steps of logits")
    logp = log_softmax(scores.astype(np.float64))
    return float(logp[np.arange(len(tokens) - 1), tokens[1:]].sum())
