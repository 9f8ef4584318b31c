"""TreeLSTM over a given tree: a token per node, and parents[i] the parent of node i (-1 at the root)."""

from __future__ import annotations

import numpy as np

from cellserve.cells import ChildSumTreeLSTMCell
from cellserve.models.layers import Embedding, Linear, random_embedding
from cellserve.models.rnn import prefixed, unprefixed


def tree_levels(parents) -> list[np.ndarray]:
    """Nodes grouped by height (leaves first), so each group depends only on earlier groups.
    Raises ValueError unless parents describes one tree."""
    parents = np.asarray(parents, dtype=np.int64)
    n = len(parents)
    if n == 0 or (parents < -1).any() or (parents >= n).any() or (parents == -1).sum() != 1:
        raise ValueError("parents must name one root (-1) and parents within the tree")
    children = [[] for _ in range(n)]
    for i, p in enumerate(parents):
        if p >= 0:
            children[p].append(i)
    height = np.full(n, -1)
    order = [int(np.flatnonzero(parents == -1)[0])]
    for node in order:  # breadth first from the root; a cycle never reaches the root
        order.extend(children[node])
    if len(order) != n:
        raise ValueError("parents must form a single tree without cycles")
    for node in reversed(order):
        height[node] = 1 + max((height[c] for c in children[node]), default=-1)
    return [np.flatnonzero(height == level) for level in range(height.max() + 1)]


class TreeLSTM:
    arch = "treelstm"

    def __init__(self, embedding: Embedding, cell: ChildSumTreeLSTMCell, head: Linear):
        self.embedding, self.cell, self.head = embedding, cell, head
        self.hidden_size = cell.hidden_size

    def node_states(self, tokens, parents) -> tuple[np.ndarray, np.ndarray]:
        """(h, c) of every node, (N, H) each, computed level by level."""
        parents = np.asarray(parents, dtype=np.int64)
        x = self.embedding(tokens)
        n = len(parents)
        h = np.zeros((n, self.hidden_size), dtype=np.float32)
        c = np.zeros_like(h)
        for level, nodes in enumerate(tree_levels(parents)):
            if level == 0:
                h[nodes], c[nodes] = self.cell.nodes(x[nodes])
                continue
            row_of = np.full(n, -1)
            row_of[nodes] = np.arange(len(nodes))
            kids = np.flatnonzero(np.isin(parents, nodes))
            h[nodes], c[nodes] = self.cell.nodes(x[nodes], h[kids], c[kids], row_of[parents[kids]])
        return h, c

    def forward(self, tokens, parents) -> np.ndarray:
        """Class logits from the root's h."""
        h, _ = self.node_states(tokens, parents)
        root = int(np.flatnonzero(np.asarray(parents) == -1)[0])
        return self.head(h[root][None])[0]

    def config(self) -> dict:
        return {"arch": self.arch, "vocab_size": self.embedding.vocab_size, "input_size": self.cell.input_size,
                "hidden_size": self.hidden_size}

    def tensors(self) -> dict:
        return {**prefixed("embedding", self.embedding.tensors()), **prefixed("cell", self.cell.tensors()),
                **prefixed("head", self.head.tensors())}

    @classmethod
    def from_tensors(cls, config, tensors):
        return cls(Embedding(tensors["embedding.table"]),
                   ChildSumTreeLSTMCell.from_tensors(config["input_size"], config["hidden_size"],
                                                     unprefixed("cell", tensors)),
                   Linear.from_tensors(unprefixed("head", tensors)))

    @classmethod
    def random(cls, vocab_size, embed_size, hidden_size, num_classes=5, seed=0) -> "TreeLSTM":
        rng = np.random.default_rng(seed)
        return cls(random_embedding(vocab_size, embed_size, rng),
                   ChildSumTreeLSTMCell.random(embed_size, hidden_size, rng),
                   Linear.random(hidden_size, num_classes, rng))
