"""Post-training quantization: every recurrent weight matrix of a model becomes int8 (per output
channel), activations are quantized per row at run time, and the products run on int8 kernels."""

from __future__ import annotations

import copy

from cellserve.cells import LSTMCell
from cellserve.kernels import Dense, QuantizedDense
from cellserve.models.rnn import rnns_of


def quantize_dynamic(model, bits: int = 8):
    """A copy of `model` whose LSTM weight matrices are `bits`-bit (per channel, max-abs scaled) with
    dynamic int8 activations. The head and embeddings stay fp32: they are a small share of the work."""
    model = copy.deepcopy(model)
    cells = [cell for rnn in rnns_of(model) for cell in rnn.cells]
    if not cells or not all(isinstance(c, LSTMCell) for c in cells):
        raise ValueError("post-training quantization supports LSTM models (the OCR recognizer, LMs, seq2seq)")
    for cell in cells:
        for name in ("ih", "hh"):
            dense = getattr(cell, name)
            if isinstance(dense, Dense):
                setattr(cell, name, QuantizedDense.from_float(dense.weight, bits))
    return model
