"""Request streams with realistic sizes.

Sentence lengths follow a log-normal fitted to the shape of WMT-15 sentence lengths (median ~20 tokens,
mean ~25, a long tail past 100); seq2seq output lengths track input lengths (x0.8-1.2); trees are random
binary bracketings over sentences of the same lengths (2n-1 nodes); the speller spells uniformly drawn
numbers up to 999999 (mostly 6 digits in, 6-11 words out: little length variance).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from cellserve.families import make_runner
from cellserve.models import LanguageModel, Seq2Seq, TreeLSTM

VOCAB = 10_000


def sentence_lengths(rng: np.random.Generator, n: int, max_len: int = 200) -> np.ndarray:
    return np.clip(np.round(rng.lognormal(mean=np.log(20.0), sigma=0.62, size=n)), 2, max_len).astype(int)


def binary_tree(rng: np.random.Generator, leaves: int) -> list[int]:
    """Parents of a random binary bracketing over `leaves` words (leaves first, root last)."""
    frontier = list(range(leaves))
    parents = [-1] * leaves
    while len(frontier) > 1:
        i = int(rng.integers(0, len(frontier) - 1))
        parents.append(-1)
        node = len(parents) - 1
        parents[frontier[i]] = parents[frontier[i + 1]] = node
        frontier[i:i + 2] = [node]
    return parents


@dataclass
class Workload:
    name: str
    description: str
    make_model: Callable[[], object]
    make_request: Callable[[np.random.Generator, int], dict]  # (rng, sentence length) -> inputs
    rows_per_request: int = 1  # cell-step rows one request brings at once: cellular's max_batch is in rows
    running_per_batch: int = 2  # cellular's running set, in units of max_batch requests
    make_runner: Callable | None = None  # (model, policy, capacity, step_loop) -> runner; default: the model's own

    def runner(self, model, policy: str, capacity: int, step_loop: str = "native"):
        if self.make_runner:
            return self.make_runner(model, policy, capacity, step_loop)
        return make_runner(model, capacity, step_loop=step_loop)


def _lm_request(rng, n):
    return {"tokens": rng.integers(0, VOCAB, n).tolist()}


def _s2s_request(rng, n):
    out = max(1, int(round(n * rng.uniform(0.8, 1.2))))
    return {"tokens": rng.integers(0, VOCAB, n).tolist(), "max_output_tokens": out, "stop_at_eos": False}


def _speller_request(rng, n):
    from cellserve.tasks.speller import MAX_NUMBER, encode_number

    return {"tokens": encode_number(str(int(rng.integers(0, MAX_NUMBER + 1)))), "max_output_tokens": 16}


def _speller():
    from cellserve.tasks.speller import load_default

    return load_default()


def _tree_request(rng, n):
    parents = binary_tree(rng, min(n, 100))
    return {"parents": parents, "tokens": rng.integers(0, VOCAB, len(parents)).tolist()}


FEATURES = 40  # filterbank features per 10 ms frame


def _acoustic():
    """A CTC acoustic model as a user brings it: a torch module (Conv1d front subsampling time by 2,
    2-layer GRU(256), linear head over 29 symbols, log-softmax), exported to ONNX and imported."""
    import torch
    from torch import nn

    from cellserve.interop.onnx_import import import_onnx
    from cellserve.interop.torch_import import module_to_onnx

    class Acoustic(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(FEATURES, 256, 3, stride=2, padding=1)
            self.rnn = nn.GRU(256, 256, num_layers=2)
            self.head = nn.Linear(256, 29)

        def forward(self, feats):  # (batch, features, time)
            y, _ = self.rnn(torch.relu(self.conv(feats)).permute(2, 0, 1))
            return torch.log_softmax(self.head(y), dim=-1)

    torch.manual_seed(0)
    return import_onnx(module_to_onnx(Acoustic().eval(), [("feats", "float32", ["batch", FEATURES, "time"])]))


def _acoustic_request(rng, n):
    """An utterance of ~8 frames per word of a sentence (median ~1.6 s)."""
    return {"feats": rng.standard_normal((1, FEATURES, 8 * n)).astype(np.float32)}


def _imported_runner(model, policy, capacity, step_loop):
    """graph: ONNX Runtime on the whole original graph, requests padded to the longest (Triton + ONNX
    Runtime); otherwise our engine on the imported model, GRU steps in blocks of 16 (a whole request is there:
    blocks add no latency, and the input projection reads its weights once per 16 steps)."""
    from cellserve.families.imported import WholeGraphRunner

    return WholeGraphRunner(model, capacity) if policy == "graph" else make_runner(model, capacity, 16, step_loop)


WORKLOADS = {
    "lm": Workload("lm", "LSTM language model, 2x512, vocab 10k: log-likelihood of a sentence",
                   lambda: LanguageModel.random(VOCAB, 512, 512, num_layers=2, seed=0), _lm_request),
    "seq2seq": Workload("seq2seq", "LSTM encoder-decoder, 2x512 each, vocab 10k, greedy decode of ~input length",
                        lambda: Seq2Seq.random(VOCAB, VOCAB, 512, 512, num_layers=2, seed=0), _s2s_request),
    "treelstm": Workload("treelstm", "child-sum TreeLSTM, 512 hidden, binary trees over sentences",
                         lambda: TreeLSTM.random(VOCAB, 512, 512, num_classes=5, seed=0), _tree_request,
                         rows_per_request=16, running_per_batch=1),
    "speller": Workload("speller", "the embedded number speller: LSTM encoder-decoder, 2x128, numbers up to "
                        "999999 spelled in words", _speller, _speller_request),
    "imported": Workload("imported", "Conv1d + 2-layer GRU(256) CTC acoustic model imported from ONNX; graph = "
                         "ONNX Runtime on the whole graph, batched per request", _acoustic, _acoustic_request,
                         make_runner=_imported_runner),
}
