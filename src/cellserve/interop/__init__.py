"""Models in and out of other formats: ONNX export (and ONNX Runtime as a cell backend), ONNX graph
surgery (split at the recurrent core, probing, checks), and torch import (modules, state dicts,
TorchScript). Needs the `onnx` extra (and `torch` for torch import); nothing here runs while serving."""
