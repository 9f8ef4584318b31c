"""The classifier family: token sequences in, class logits out (the final hidden state(s) through the
head). Bidirectional classifiers read whole sequences, a layer direction per stage."""

from __future__ import annotations

import numpy as np

from cellserve.engine.frames import frames_runner
from cellserve.families.base import Family, TensorSpec, token_rows
from cellserve.models import Classifier


class ClassifierFamily(Family):
    arch = "classifier"

    def __init__(self, model: Classifier):
        super().__init__(model)
        self.rnn = model.rnn
        self.inputs = [TensorSpec("tokens", "INT64", [-1, -1])]
        self.outputs = [TensorSpec("logits", "FP32", [-1, model.num_classes])]

    def runner(self, capacity, block_steps=1, step_loop="native"):
        return frames_runner(self, capacity, block_steps, step_loop)

    def requests(self, tensors):
        self.check_names(tensors)
        return [{"tokens": row} for row in token_rows(tensors["tokens"], "tokens")]

    def frames_of(self, inputs: dict) -> np.ndarray:
        """A request's frames: its tokens' embeddings."""
        tokens = np.asarray(inputs.get("tokens"))
        if tokens.ndim != 1 or len(tokens) < 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"tokens must be a 1-D list of at least 1 integer token id, got shape {list(tokens.shape)}")
        return self.model.embedding(tokens)

    def result_of(self, inputs: dict, ys: np.ndarray, finals: list) -> dict:
        return {"logits": self.model.head(self.model.last_hidden(ys))}

    def outputs_of(self, results):
        return {"logits": np.stack([r["logits"] for r in results]).astype(np.float32)}
