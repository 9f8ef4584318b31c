"""Token models: an embedding + RNN language model (logits per step) and sequence classifier."""

from __future__ import annotations

import numpy as np

from cellserve.models.layers import Embedding, Linear, random_embedding
from cellserve.models.rnn import RNN, prefixed, unprefixed


class LanguageModel:
    """Next-token logits at every step of a unidirectional RNN."""

    arch = "lm"

    def __init__(self, embedding: Embedding, rnn: RNN, head: Linear):
        if rnn.bidirectional:
            raise ValueError("a language model is unidirectional")
        self.embedding, self.rnn, self.head = embedding, rnn, head
        self.vocab_size = head.out_features

    def forward(self, tokens: np.ndarray) -> np.ndarray:
        """tokens (T, B) -> logits (T, B, vocab)."""
        ys, _ = self.rnn.forward(self.embedding(tokens))
        return self.head(ys)

    def score(self, tokens) -> float:
        """Log-likelihood of tokens[1:] given the prefix (one sequence)."""
        tokens = np.asarray(tokens)
        logp = log_softmax(self.forward(tokens[:-1, None])[:, 0])
        return float(logp[np.arange(len(tokens) - 1), tokens[1:]].sum())

    def config(self) -> dict:
        return {"arch": self.arch, "vocab_size": self.embedding.vocab_size, "rnn": self.rnn.config()}

    def tensors(self) -> dict:
        return {**prefixed("embedding", self.embedding.tensors()), **prefixed("rnn", self.rnn.tensors()),
                **prefixed("head", self.head.tensors())}

    @classmethod
    def from_tensors(cls, config, tensors):
        return cls(Embedding(tensors["embedding.table"]), RNN.from_tensors(config["rnn"], unprefixed("rnn", tensors)),
                   Linear.from_tensors(unprefixed("head", tensors)))

    @classmethod
    def random(cls, vocab_size: int, embed_size: int, hidden_size: int, num_layers: int = 2,
               cell: str = "lstm", seed: int = 0) -> "LanguageModel":
        rng = np.random.default_rng(seed)
        rnn = RNN.random(cell, embed_size, hidden_size, num_layers, seed=seed + 1)
        return cls(random_embedding(vocab_size, embed_size, rng), rnn, Linear.random(hidden_size, vocab_size, rng))


class Classifier:
    """Class logits from the final hidden state(s): for a bidirectional RNN, the forward direction's
    last step and the backward direction's first step."""

    arch = "classifier"

    def __init__(self, embedding: Embedding, rnn: RNN, head: Linear):
        self.embedding, self.rnn, self.head = embedding, rnn, head
        self.num_classes = head.out_features

    def features(self, tokens: np.ndarray) -> np.ndarray:
        ys, _ = self.rnn.forward(self.embedding(tokens))
        return self.last_hidden(ys)

    def last_hidden(self, ys: np.ndarray) -> np.ndarray:
        """The final hidden state(s) from the top layer's outputs ys (T, ..., D*H)."""
        hidden = self.rnn.hidden_size
        if not self.rnn.bidirectional:
            return ys[-1]
        return np.concatenate([ys[-1, ..., :hidden], ys[0, ..., hidden:]], axis=-1)

    def forward(self, tokens: np.ndarray) -> np.ndarray:
        """tokens (T, B) -> logits (B, classes)."""
        return self.head(self.features(tokens))

    def config(self) -> dict:
        return {"arch": self.arch, "vocab_size": self.embedding.vocab_size, "rnn": self.rnn.config()}

    tensors = LanguageModel.tensors
    from_tensors = classmethod(LanguageModel.from_tensors.__func__)

    @classmethod
    def random(cls, vocab_size, embed_size, hidden_size, num_classes, num_layers=1, cell="lstm",
               bidirectional=False, seed=0) -> "Classifier":
        rng = np.random.default_rng(seed)
        rnn = RNN.random(cell, embed_size, hidden_size, num_layers, bidirectional, seed=seed + 1)
        return cls(random_embedding(vocab_size, embed_size, rng), rnn,
                   Linear.random(rnn.output_size, num_classes, rng))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
