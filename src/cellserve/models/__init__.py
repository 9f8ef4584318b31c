"""Composite models built from cells, their torch import, and our file format."""

from cellserve.models.io import ARCHS, load, save
from cellserve.models.layers import Embedding, Linear
from cellserve.models.lm import Classifier, LanguageModel
from cellserve.models.rnn import RNN
from cellserve.models.seq2seq import Seq2Seq
from cellserve.models.torch_import import rnn_from_torch
from cellserve.models.tree import TreeLSTM, tree_levels

__all__ = ["ARCHS", "load", "save", "Embedding", "Linear", "Classifier", "LanguageModel", "RNN", "Seq2Seq",
           "rnn_from_torch", "TreeLSTM", "tree_levels"]
