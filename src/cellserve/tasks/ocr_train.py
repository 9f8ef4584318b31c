"""Train the BiLSTM-CTC line recognizer in torch on the CPU, compress it, and hand it to our runtime.

Training and compression live here (torch); recognition runs in cellserve.models.ocr (no torch).
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
from torch import nn

from cellserve.progress import bar
from cellserve.tasks.ocr_data import ALPHABET, HEIGHT, OCRDataset, character_error_rate, encode
from cellserve.families.ocr import recognize
from cellserve.compress.qat import QuantSpec, int8_linear, quantized_lstm
from cellserve.compress.quantize import quantize_cells, quantize_head
from cellserve.kernels import BlockSparseDense
from cellserve.models.layers import Linear
from cellserve.models.ocr import OCRModel, columns
from cellserve.interop.torch_import import rnn_from_torch


class Recognizer(nn.Module):
    """(Bi)LSTM over frames of `stride` pixel columns, and a linear CTC head (blank = class 0).
    With a QuantSpec it runs the fake-quantized LSTM (QAT); otherwise torch's fused nn.LSTM."""

    def __init__(self, hidden: int = 128, layers: int = 1, stride: int = 2, bidirectional: bool = True,
                 spec: QuantSpec | None = None):
        super().__init__()
        self.stride, self.spec = stride, spec
        self.rnn = nn.LSTM(HEIGHT * stride, hidden, num_layers=layers, bidirectional=bidirectional)
        self.head = nn.Linear((1 + bidirectional) * hidden, len(ALPHABET) + 1)

    def forward(self, frames: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """frames (T, B, HEIGHT*stride), lengths (B,) -> logits (T, B, classes)."""
        if self.spec is not None:
            return int8_linear(quantized_lstm(self.rnn, frames, lengths, self.spec), self.head)
        packed = nn.utils.rnn.pack_padded_sequence(frames, lengths, enforce_sorted=False)
        out, _ = self.rnn(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, total_length=frames.shape[0])
        return self.head(out)


def build(hidden: int = 128, seed: int = 0, **options) -> Recognizer:
    torch.manual_seed(seed)
    return Recognizer(hidden, **options)


def batches(dataset: OCRDataset, stride: int, batch_size: int, rng: np.random.Generator):
    """Shuffled batches of similar widths (little padding): (frames (T, B, F), lengths, targets, target lengths)."""
    frames = [columns(img, stride) for img in dataset.images]
    order = np.argsort([len(f) for f in frames])
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(chunks)
    for chunk in chunks:
        lengths = [len(frames[i]) for i in chunk]
        padded = np.zeros((max(lengths), len(chunk), frames[chunk[0]].shape[1]), np.float32)
        for b, i in enumerate(chunk):
            padded[: lengths[b], b] = frames[i]
        targets = [encode(dataset.texts[i]) for i in chunk]
        yield (torch.from_numpy(padded), torch.tensor(lengths), torch.tensor([c for t in targets for c in t]),
               torch.tensor([len(t) for t in targets]))


def train(model: Recognizer, train_set: OCRDataset, epochs: int = 12, seconds: float | None = None,
          lr: float = 3e-3, batch_size: int = 32, seed: int = 0, log=print, extra_loss=None,
          after_step=None) -> Recognizer:
    """CTC training with Adam, in place; stops after `epochs` or `seconds`, whichever comes first.
    extra_loss(frames, lengths, logits) adds a term (distillation); after_step(model) runs after each
    update (pruning masks)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    ctc = nn.CTCLoss(blank=0, zero_infinity=True)
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    out_of_time = lambda: seconds is not None and time.perf_counter() - start > seconds  # noqa: E731
    timed = seconds is not None  # the bar counts seconds; else batches
    with bar("training", round(seconds) if timed else epochs * -(-len(train_set.texts) // batch_size)) as shown:
        model.train()
        for epoch in range(epochs):
            total, count = 0.0, 0
            for frames, lengths, targets, target_lengths in batches(train_set, model.stride, batch_size, rng):
                logits = model(frames, lengths)
                loss = ctc(logits.log_softmax(-1), targets, lengths, target_lengths)
                if extra_loss is not None:
                    loss = loss + extra_loss(frames, lengths, logits)
                opt.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), 5.0)
                opt.step()
                if after_step is not None:
                    after_step(model)
                total, count = total + loss.item(), count + 1
                note = f"epoch {epoch}, loss {total / count:.3f}"
                if timed:
                    shown.update(min(time.perf_counter() - start, seconds), note)
                else:
                    shown.advance(note=note)
                if out_of_time():
                    break
            log(f"epoch {epoch}: loss {total / max(count, 1):.3f} ({time.perf_counter() - start:.0f} s)")
            if out_of_time():
                break
    model.eval()
    return model


def to_runtime(module: Recognizer, block_sparse: bool = False) -> OCRModel:
    """Our runtime's model; a QAT module becomes integer kernels on the grids it was trained for (and an
    int8 head), and a block-pruned one (block_sparse) block-sparse matrices that skip its zero blocks."""
    head = Linear(module.head.weight.detach().numpy(), module.head.bias.detach().numpy())
    rnn = rnn_from_torch(module.rnn)
    spec = module.spec
    model = OCRModel(rnn, head, ALPHABET, module.stride)
    if spec is not None:
        quantize_cells(rnn.cells, spec.weight_bits, spec.act_scale, spec.cell_quant)
        quantize_head(model)
    if block_sparse:
        for cell in rnn.cells:
            cell.ih, cell.hh = BlockSparseDense(cell.ih.weight), BlockSparseDense(cell.hh.weight)
    return model


def evaluate(model: OCRModel, dataset: OCRDataset) -> float:
    return character_error_rate([recognize(model, img) for img in dataset.images], dataset.texts)


def cell_peak(module: Recognizer, dataset: OCRDataset, lines: int = 64, quantile: float = 0.999) -> float:
    """A high quantile of |c| over all units and steps of some training lines: the cell-state clip for
    QAT (the maximum would be set by the few units that integrate without bound)."""
    peaks: list[float] = []
    with torch.no_grad():
        for frames, lengths, _, _ in batches(OCRDataset(dataset.images[:lines], dataset.texts[:lines]),
                                             module.stride, 32, np.random.default_rng(0)):
            quantized_lstm(module.rnn, frames, lengths, None, peaks)
    return float(np.quantile(torch.cat(peaks).numpy(), quantile))


def with_spec(module: Recognizer, spec: QuantSpec) -> Recognizer:
    """A copy of a trained module that trains on (fake-)quantized grids from here on."""
    qat = copy.deepcopy(module)
    qat.spec = spec
    return qat


# --- pruning -------------------------------------------------------------------------------------

def magnitude_masks(module: Recognizer, sparsity: float) -> dict[str, torch.Tensor]:
    """Per LSTM weight matrix, keep the largest-magnitude (1 - sparsity) share of entries."""
    masks = {}
    for name, p in module.rnn.named_parameters():
        if name.startswith("weight"):
            k = int(sparsity * p.numel())
            threshold = p.detach().abs().flatten().kthvalue(max(k, 1)).values
            masks[name] = (p.detach().abs() > threshold).float()
    return masks


def block_masks(module: Recognizer, sparsity: float, rows: int = 16) -> dict[str, torch.Tensor]:
    """Per LSTM weight matrix, keep the (1 - sparsity) share of blocks of `rows` consecutive output rows x 1
    input with the largest L2 norms (the blocks the block-sparse kernel skips when zero)."""
    masks = {}
    for name, p in module.rnn.named_parameters():
        if name.startswith("weight"):
            out, inputs = p.shape
            norms = p.detach().reshape(out // rows, rows, inputs).norm(dim=1)
            k = int(sparsity * norms.numel())
            threshold = norms.flatten().kthvalue(max(k, 1)).values
            masks[name] = (norms > threshold).float().repeat_interleave(rows, dim=0)
    return masks


def apply_masks(module: Recognizer, masks: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, p in module.rnn.named_parameters():
            if name in masks:
                p.mul_(masks[name])


def prune_hidden_units(module: Recognizer, keep: int) -> Recognizer:
    """Structured pruning of a 1-layer (Bi)LSTM: per direction keep the `keep` hidden units with the
    largest weight norms (their gate rows in W_ih/W_hh, their column in W_hh and in the head), giving a
    genuinely smaller model."""
    rnn = module.rnn
    if rnn.num_layers != 1:
        raise ValueError("hidden-unit pruning is implemented for 1-layer recognizers")
    hidden, dirs = rnn.hidden_size, 1 + rnn.bidirectional
    small = Recognizer(keep, 1, module.stride, rnn.bidirectional)
    head_w = module.head.weight.detach()
    kept_head_cols = []
    with torch.no_grad():
        for d, suffix in enumerate(("", "_reverse")[:dirs]):
            w_ih, w_hh = getattr(rnn, f"weight_ih_l0{suffix}"), getattr(rnn, f"weight_hh_l0{suffix}")
            b_ih, b_hh = getattr(rnn, f"bias_ih_l0{suffix}"), getattr(rnn, f"bias_hh_l0{suffix}")
            rows = lambda w: w.reshape(4, hidden, -1)  # noqa: E731
            score = (rows(w_ih).pow(2).sum((0, 2)) + rows(w_hh).pow(2).sum((0, 2)) + w_hh.pow(2).sum(0)
                     + head_w[:, d * hidden:(d + 1) * hidden].pow(2).sum(0))
            units = score.argsort(descending=True)[:keep].sort().values
            pick_rows = lambda w: rows(w)[:, units].reshape(4 * keep, -1)  # noqa: E731
            getattr(small.rnn, f"weight_ih_l0{suffix}").copy_(pick_rows(w_ih))
            getattr(small.rnn, f"weight_hh_l0{suffix}").copy_(pick_rows(w_hh)[:, units])
            getattr(small.rnn, f"bias_ih_l0{suffix}").copy_(b_ih.reshape(4, hidden)[:, units].flatten())
            getattr(small.rnn, f"bias_hh_l0{suffix}").copy_(b_hh.reshape(4, hidden)[:, units].flatten())
            kept_head_cols.append(units + d * hidden)
        small.head.weight.copy_(head_w[:, torch.cat(kept_head_cols)])
        small.head.bias.copy_(module.head.bias)
    return small


# --- distillation --------------------------------------------------------------------------------

def distillation_loss(teacher: Recognizer, temperature: float = 2.0, weight: float = 1.0):
    """Per-frame KL(teacher || student) at a temperature, over the frames inside each line (the teacher
    and student share the stride, so their frames align)."""
    teacher.eval()

    def loss(frames, lengths, student_logits):
        with torch.no_grad():
            target = (teacher(frames, lengths) / temperature).log_softmax(-1)
        log_probs = (student_logits / temperature).log_softmax(-1)
        inside = (torch.arange(frames.shape[0])[:, None] < lengths[None, :]).float()
        kl = (target.exp() * (target - log_probs)).sum(-1)
        return weight * temperature ** 2 * (kl * inside).sum() / inside.sum()

    return loss
