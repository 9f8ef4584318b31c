"""Quantization-aware training in torch: weights, matmul inputs and the LSTM cell state are rounded to
their low-bit grids in the forward pass, and gradients pass straight through the rounding (STE).

The grids are the ones our integer kernels use (kernels.quantized), so a trained model converts to
int8/packed weights and fixed activation scales with no further loss:
  weights      per output row, see kernels.quantized.quantize_weight (binary, ternary, max-abs);
  activations  the inputs of every matmul (pixels in [0, 1], h in [-1, 1]) on a fixed grid of
               1/qmax(act_bits) in [-1, 1];
  cell state   clipped to +-cell_limit (calibrated on the fp32 model) on a grid of cell_limit/qmax(bits);
  output head  int8 weights, inputs per row at max|x| / 127 (the int8 head of every quantized model).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cellserve.kernels.quantized import qmax


@dataclass(frozen=True)
class QuantSpec:
    weight_bits: int
    act_bits: int = 8
    cell_bits: int | None = 8
    cell_limit: float = 4.0

    def __post_init__(self):
        if self.weight_bits not in (8, 4, 2, 1):
            raise ValueError(f"weight bits must be 8, 4, 2 or 1, not {self.weight_bits}")
        if not 2 <= self.act_bits <= 8:
            raise ValueError(f"activation bits must be 2..8, not {self.act_bits}")

    @property
    def act_scale(self) -> float:
        return 1.0 / qmax(self.act_bits)

    @property
    def cell_quant(self) -> tuple[float, float] | None:
        return None if self.cell_bits is None else (self.cell_limit / qmax(self.cell_bits), self.cell_limit)


def straight_through(x: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
    """Forward: rounded. Backward: identity."""
    return x + (rounded - x).detach()


def fake_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    mean_abs = w.abs().mean(dim=1, keepdim=True)
    if bits == 1:
        return straight_through(w, torch.where(w >= 0, 1.0, -1.0) * mean_abs.clamp_min(1e-12))
    if bits == 2:
        scale = 1.4 * mean_abs
    else:
        scale = w.abs().amax(dim=1, keepdim=True) / qmax(bits)
    scale = scale.clamp_min(1e-12).detach()
    return straight_through(w, torch.clamp(torch.round(w / scale), -qmax(bits), qmax(bits)) * scale)


def fake_grid(x: torch.Tensor, step: float, limit: float) -> torch.Tensor:
    """Clip to +-limit (zero gradient outside), round to multiples of step (straight through)."""
    clipped = x.clamp(-limit, limit)
    return straight_through(clipped, torch.round(clipped / step) * step)


def int8_linear(x: torch.Tensor, linear: torch.nn.Linear) -> torch.Tensor:
    """linear(x) as the int8 head of a converted model computes it: weights per row at 8 bits, inputs per
    row on a dynamic grid of max|x| / 127 (straight through)."""
    step = (x.detach().abs().amax(dim=-1, keepdim=True) / qmax(8)).clamp_min(1e-12)
    x = straight_through(x, torch.round(x / step) * step)
    return torch.nn.functional.linear(x, fake_weight(linear.weight, 8), linear.bias)


def lstm_direction(x: torch.Tensor, w_ih, w_hh, bias, spec: QuantSpec | None, peaks: list | None = None):
    """One fake-quantized LSTM direction over x (T, B, in) -> (T, B, H), from zero state.
    spec None runs in fp32; `peaks` collects |c| of every step (to calibrate cell_limit)."""
    same = lambda v: v  # noqa: E731
    act = (lambda v: fake_grid(v, spec.act_scale, 1.0)) if spec else same
    weight = (lambda w: fake_weight(w, spec.weight_bits)) if spec else same
    cell = (lambda v: fake_grid(v, *spec.cell_quant)) if spec and spec.cell_quant else same
    gates_x = act(x) @ weight(w_ih).T + bias
    w_hh = weight(w_hh)
    h = x.new_zeros(x.shape[1], w_hh.shape[1])
    c = x.new_zeros(x.shape[1], w_hh.shape[1])
    outputs = []
    for t in range(x.shape[0]):
        i, f, g, o = (gates_x[t] + act(h) @ w_hh.T).chunk(4, dim=-1)
        c = cell(torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g))
        if peaks is not None:
            peaks.append(c.detach().abs().flatten())
        h = torch.sigmoid(o) * torch.tanh(c)
        outputs.append(h)
    return torch.stack(outputs)


def reverse_within(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse each padded sequence (T, B, F) within its own length; padding stays at the end."""
    steps = torch.arange(x.shape[0])[:, None]
    index = torch.where(steps < lengths[None, :], lengths[None, :] - 1 - steps, steps)
    return x.gather(0, index[:, :, None].expand_as(x))


def quantized_lstm(lstm: torch.nn.LSTM, x: torch.Tensor, lengths: torch.Tensor, spec: QuantSpec | None,
                   peaks: list | None = None) -> torch.Tensor:
    """nn.LSTM's forward (all layers, both directions) with fake quantization, using its parameters."""
    for layer in range(lstm.num_layers):
        outputs = []
        for suffix in ("", "_reverse")[: 1 + lstm.bidirectional]:
            p = lambda name: getattr(lstm, f"{name}_l{layer}{suffix}")  # noqa: E731
            inputs = reverse_within(x, lengths) if suffix else x
            y = lstm_direction(inputs, p("weight_ih"), p("weight_hh"), p("bias_ih") + p("bias_hh"), spec, peaks)
            outputs.append(reverse_within(y, lengths) if suffix else y)
        x = torch.cat(outputs, dim=-1)
    return x
