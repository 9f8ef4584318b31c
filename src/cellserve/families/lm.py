"""The language model family: a token sequence in, its log-likelihood (of tokens[1:]) and the predicted
next token out. One stage: every running sequence advances one token per step."""

from __future__ import annotations

import time

import numpy as np

from cellserve.engine.batch import Stage, layer_state_names, layer_state_widths, stack_steps
from cellserve.engine.pool import Arena
from cellserve.engine.runner import ADMITTED, SequenceRunner, pad_rows, token_array
from cellserve.engine.steploop import READ, NativeLoopRunner, native_layers
from cellserve.families.base import Family, TensorSpec, token_rows
from cellserve.models import LanguageModel
from cellserve.models.lm import log_softmax


class LanguageModelFamily(Family):
    arch = "lm"
    inputs = [TensorSpec("tokens", "INT64", [-1, -1])]
    outputs = [TensorSpec("log_likelihood", "FP64", [-1]), TensorSpec("next_token", "INT64", [-1])]

    def runner(self, capacity, block_steps=1, step_loop="native"):
        layers = native_layers(self.model.rnn)
        if step_loop == "native" and layers:
            return NativeLanguageModelRunner(self.model, capacity, layers)
        return LanguageModelRunner(self.model, capacity)

    def lane_spec(self, runner) -> dict | None:
        return {"stage": 0, "scores": 1} if isinstance(runner, NativeLanguageModelRunner) else None

    def requests(self, tensors):
        self.check_names(tensors)
        return [{"tokens": row} for row in token_rows(tensors["tokens"], "tokens")]

    def outputs_of(self, results):
        return {"log_likelihood": np.array([r["log_likelihood"] for r in results], dtype=np.float64),
                "next_token": np.array([r["next_token"] for r in results], dtype=np.int64)}


class LanguageModelRunner(SequenceRunner):
    """Scores a token sequence: log-likelihood of tokens[1:] and the predicted next token."""

    cell_types = ("lm",)

    def __init__(self, model: LanguageModel, capacity: int):
        self.model = model
        self.names = layer_state_names(model.rnn)
        self.tokens = Arena(0, np.int64)
        self.stage = Stage("lm", capacity, layer_state_widths(model.rnn),
                           {"offset": np.int64, "length": np.int64, "pos": np.int64, "score": np.float64,
                            "arrival": np.float64})
        super().__init__(capacity, [self.stage])

    def prepare(self, inputs):
        return token_array(inputs.get("tokens"), "tokens", self.model.embedding.vocab_size), 1

    def admit(self, reqs):
        for req in reqs:
            req.progress["offset"] = self.tokens.put(req.payload)
        self.stage.add(reqs, offset=[r.progress["offset"] for r in reqs], length=[len(r.payload) for r in reqs],
                       pos=0, score=0.0, arrival=[r.arrival for r in reqs])
        return [ADMITTED] * len(reqs)

    def _free(self, req):
        self.tokens.free(req.progress["offset"], len(req.payload))

    def step(self, cell_type, max_rows, pad_to=0):
        st, model = self.stage, self.model
        a, b, out = self._window(st, max_rows)
        n = b - a
        if not n:
            return out
        pad = self._padding(st, a, b, pad_to)
        offset, pos, length = st["offset"][a:b], st["pos"][a:b], st["length"][a:b]
        start = time.perf_counter()
        x = model.embedding.table[pad_rows(self.tokens.data[offset + pos], pad)]
        top = stack_steps(model.rnn, st, self.names, x[None], slice(a, b + pad))[0]
        logp = log_softmax(model.head(top))  # padded rows pay for the head too, as in a padded graph
        self.kernel_seconds += time.perf_counter() - start
        nxt = pos + 1
        more = nxt < length
        go = np.flatnonzero(more)
        st["score"][a + go] += logp[go, self.tokens.data[offset[go] + nxt[go]]]
        st["pos"][a:b] = nxt
        done = np.flatnonzero(~more)
        for i in done:
            st.reqs[a + i].result = {"log_likelihood": float(st["score"][a + i]), "next_token": int(logp[i].argmax())}
        self._leave(st, a + done, out)
        self.last_rows = n
        return out


class NativeLanguageModelRunner(NativeLoopRunner):
    """LanguageModelRunner's scoring in the native step loop (engine/steploop.py)."""

    cell_types = LanguageModelRunner.cell_types
    prepare = LanguageModelRunner.prepare

    def __init__(self, model: LanguageModel, capacity: int, layers: list):
        super().__init__(capacity)
        self.model = model
        self.loop.add_stage(READ, model.embedding.table, layers, model.head.w.packed, model.head.bias, -1, 0, -1)

    def _row(self, row, req):
        return 0, row, req.ticket, req.arrival, req.payload, 0, True

    def _result(self, score, next_token):
        return {"log_likelihood": score, "next_token": next_token}
