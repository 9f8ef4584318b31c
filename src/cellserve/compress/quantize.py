"""Post-training quantization: every recurrent weight matrix of a model becomes int8 (per output
channel), activations are quantized per row at run time, and the products run on int8 kernels; or every
fp32 matrix becomes bf16 (bf16_weights)."""

from __future__ import annotations

import copy

from cellserve.cells import LSTMCell
from cellserve.kernels import Bf16Dense, Dense, QuantizedDense
from cellserve.models.rnn import rnns_of


def quantize_dynamic(model, bits: int = 8):
    """A copy of `model` whose LSTM weight matrices are `bits`-bit (per channel, max-abs scaled) with
    dynamic int8 activations, and whose output head is int8. Embeddings stay fp32 (a lookup, no product)."""
    model = copy.deepcopy(model)
    cells = [cell for rnn in rnns_of(model) for cell in rnn.cells]
    if not cells or not all(isinstance(c, LSTMCell) for c in cells):
        raise ValueError("post-training quantization supports LSTM models (the OCR recognizer, LMs, seq2seq)")
    quantize_cells(cells, bits)
    quantize_head(model)
    return model


def quantize_head(model) -> None:
    """In place: the model's output layer (`head`, if any) on int8 weights with dynamic int8 activations.
    On the OCR recognizer it is a quarter of an int8 line's time in fp32 (216 frames x 256 x 97)."""
    head = getattr(model, "head", None)
    if head is not None and isinstance(head.w, Dense):
        head.w = QuantizedDense.from_float(head.w.weight, 8)


def quantize_matrices(cell, bits: int):
    """A copy of a recurrent cell whose weight matrices are `bits`-bit (16: bf16; 8 and fewer: integer codes
    with dynamic int8 activations), for timing each width on the same shapes (bench cells --bits)."""
    if bits == 16:
        return bf16_weights(cell)
    cell = copy.deepcopy(cell)
    for name in ("ih", "hh", "w"):
        dense = getattr(cell, name, None)
        if isinstance(dense, Dense):
            setattr(cell, name, QuantizedDense.from_float(dense.weight, bits))
    return cell


def quantize_cells(cells: list[LSTMCell], bits: int, act_scale: float = 0.0, cell_quant=None) -> None:
    """In place: the cells' fp32 W_ih and W_hh become `bits`-bit QuantizedDense (act_scale 0: dynamic int8
    activations; > 0: the fixed grid QAT trained on), and, if given, the cell state is held on cell_quant's
    grid. Matrices already quantized are left as they are."""
    for cell in cells:
        for name in ("ih", "hh"):
            dense = getattr(cell, name)
            if isinstance(dense, Dense):
                setattr(cell, name, QuantizedDense.from_float(dense.weight, bits, act_scale))
        if cell_quant is not None:
            cell.cell_quant = cell_quant


def bf16_weights(model, in_place: bool = False):
    """`model` (a copy, unless in_place: an imported graph's ONNX Runtime sessions cannot be copied) with
    its fp32 weight matrices (cells, k-step blocks, heads: every Dense it holds) in bf16. Gates, cell state
    and accumulation stay fp32; embeddings and biases are untouched. Works on any architecture, imported
    graphs included, since it finds the matrices wherever the model keeps them."""
    if not in_place:
        model = copy.deepcopy(model)
    seen: set[int] = set()

    def convert(value):
        if type(value) is Dense:
            return Bf16Dense(value.weight)
        if id(value) in seen:
            return value
        seen.add(id(value))
        if isinstance(value, list):
            value[:] = [convert(v) for v in value]
        elif isinstance(value, dict):
            for key in value:
                value[key] = convert(value[key])
        elif type(value).__module__.startswith("cellserve.") and hasattr(value, "__dict__"):
            for key, v in vars(value).items():
                new = convert(v)
                if new is not v:
                    setattr(value, key, new)
        return value

    return convert(model)
