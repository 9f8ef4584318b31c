"""Architectures built from cells, and our file format: nothing about serving, requests or other formats
(interop/ imports and exports those)."""

from cellserve.models.io import ARCHS, load, save
from cellserve.models.layers import Embedding, Linear
from cellserve.models.lm import Classifier, LanguageModel
from cellserve.models.rnn import RNN
from cellserve.models.seq2seq import Seq2Seq
from cellserve.models.tree import TreeLSTM, tree_levels

__all__ = ["ARCHS", "load", "save", "Embedding", "Linear", "Classifier", "LanguageModel", "RNN", "Seq2Seq",
           "TreeLSTM", "tree_levels"]
