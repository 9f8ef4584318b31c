"""Torch modules for the cells torch lacks (SRU, QRNN, child-sum TreeLSTM), written step by step from
the papers' equations. They are the references our kernels are tested against and the modules the
compression toolkit trains; `cell_tensors()` hands their weights to our cells. Needs torch.
"""

from __future__ import annotations

import torch
from torch import nn


def _param(*shape, bound):
    return nn.Parameter(torch.empty(*shape).uniform_(-bound, bound))


class TorchSRU(nn.Module):
    def __init__(self, input_size: int, hidden_size: int, activation: str = "tanh"):
        super().__init__()
        self.input_size, self.hidden_size, self.activation = input_size, hidden_size, activation
        blocks = 3 if input_size == hidden_size else 4
        bound = hidden_size ** -0.5
        self.weight = _param(blocks * hidden_size, input_size, bound=bound)
        self.v_f, self.v_r = _param(hidden_size, bound=bound), _param(hidden_size, bound=bound)
        self.b_f, self.b_r = _param(hidden_size, bound=bound), _param(hidden_size, bound=bound)

    def forward(self, x, c=None):
        """x (T, B, in) -> (h (T, B, H), final c)."""
        hidden = self.hidden_size
        c = torch.zeros(x.shape[1], hidden, dtype=x.dtype) if c is None else c
        outs = []
        for t in range(x.shape[0]):
            u = x[t] @ self.weight.T
            x_tilde, f_pre, r_pre = u[:, :hidden], u[:, hidden:2 * hidden], u[:, 2 * hidden:3 * hidden]
            highway = x[t] if self.input_size == hidden else u[:, 3 * hidden:]
            f = torch.sigmoid(f_pre + self.v_f * c + self.b_f)
            r = torch.sigmoid(r_pre + self.v_r * c + self.b_r)
            c = f * c + (1 - f) * x_tilde
            g = torch.tanh(c) if self.activation == "tanh" else c
            outs.append(r * g + (1 - r) * highway)
        return torch.stack(outs), c

    def cell_tensors(self) -> dict:
        return {k: v.detach().numpy() for k, v in self.state_dict().items()}


class TorchQRNN(nn.Module):
    def __init__(self, input_size: int, hidden_size: int, window: int = 1):
        super().__init__()
        self.input_size, self.hidden_size, self.window = input_size, hidden_size, window
        bound = (window * input_size) ** -0.5
        self.weight = _param(3 * hidden_size, window * input_size, bound=bound)
        self.bias = _param(3 * hidden_size, bound=bound)

    def forward(self, x, c=None, x_prev=None):
        """x (T, B, in) -> (h (T, B, H), final c). Window 2 convolves [x_{t-1}, x_t] (x_{-1} = x_prev or 0)."""
        hidden = self.hidden_size
        c = torch.zeros(x.shape[1], hidden, dtype=x.dtype) if c is None else c
        prev = torch.zeros_like(x[0]) if x_prev is None else x_prev
        outs = []
        for t in range(x.shape[0]):
            inp = torch.cat([prev, x[t]], dim=-1) if self.window == 2 else x[t]
            u = inp @ self.weight.T + self.bias
            z, f, o = torch.tanh(u[:, :hidden]), torch.sigmoid(u[:, hidden:2 * hidden]), torch.sigmoid(u[:, 2 * hidden:])
            c = f * c + (1 - f) * z
            outs.append(o * c)
            prev = x[t]
        return torch.stack(outs), c

    def cell_tensors(self) -> dict:
        return {k: v.detach().numpy() for k, v in self.state_dict().items()}


class TorchChildSumTreeLSTM(nn.Module):
    """Node by node, recursively: h_j from x_j and its children, as in Tai et al. (2015), eqs. 2-8."""

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        bound = hidden_size ** -0.5
        self.w_x = _param(4 * hidden_size, input_size, bound=bound)  # [i, o, u, f]
        self.u_iou = _param(3 * hidden_size, hidden_size, bound=bound)
        self.u_f = _param(hidden_size, hidden_size, bound=bound)
        self.bias = _param(4 * hidden_size, bound=bound)

    def node(self, x, child_h, child_c):
        hidden = self.hidden_size
        gx = x @ self.w_x.T + self.bias
        h_sum = child_h.sum(0) if len(child_h) else torch.zeros(hidden)
        iou = gx[: 3 * hidden] + h_sum @ self.u_iou.T
        i, o, u = torch.sigmoid(iou[:hidden]), torch.sigmoid(iou[hidden:2 * hidden]), torch.tanh(iou[2 * hidden:])
        c = i * u
        for hk, ck in zip(child_h, child_c):
            c = c + torch.sigmoid(gx[3 * hidden:] + hk @ self.u_f.T) * ck
        return o * torch.tanh(c), c

    def forward(self, x, parents):
        """x (N, in), parents list -> h of every node (N, H)."""
        n = len(parents)
        states: dict[int, tuple] = {}

        def run(j):
            kids = [k for k in range(n) if parents[k] == j]
            for k in kids:
                run(k)
            ch = torch.stack([states[k][0] for k in kids]) if kids else torch.zeros(0, self.hidden_size)
            cc = torch.stack([states[k][1] for k in kids]) if kids else torch.zeros(0, self.hidden_size)
            states[j] = self.node(x[j], ch, cc)

        run(list(parents).index(-1))
        return torch.stack([states[j][0] for j in range(n)])

    def cell_tensors(self) -> dict:
        return {k: v.detach().numpy() for k, v in self.state_dict().items()}
