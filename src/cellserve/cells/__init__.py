"""Recurrent cells: the math of one step (and of k steps) on a batch of states, one file per cell type
(onnxruntime.py: a cell run by ONNX Runtime). A cell knows nothing of requests, batches or models."""

from cellserve.cells.base import Cell, State
from cellserve.cells.gru import GRUCell
from cellserve.cells.lstm import LSTMCell
from cellserve.cells.qrnn import QRNNCell
from cellserve.cells.sru import SRUCell
from cellserve.cells.treelstm import ChildSumTreeLSTMCell

CELLS: dict[str, type[Cell]] = {c.kind: c for c in (LSTMCell, GRUCell, SRUCell, QRNNCell)}

__all__ = ["Cell", "State", "CELLS", "LSTMCell", "GRUCell", "SRUCell", "QRNNCell", "ChildSumTreeLSTMCell"]
