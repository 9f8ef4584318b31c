"""Model families: one file each, saying everything the server and the engine need of one kind of model
(its tensors, its codec, its runner, its results as tensors). The registry below maps a model file's
architecture to its family; adding a family is one new file and one line here."""

from __future__ import annotations

from cellserve.families.base import SNAPSHOT, Family, TensorSpec
from cellserve.families.classifier import ClassifierFamily
from cellserve.families.lm import LanguageModelFamily
from cellserve.families.ocr import OCRFamily
from cellserve.families.seq2seq import Seq2SeqFamily
from cellserve.families.stream import StreamFamily
from cellserve.families.tree import TreeFamily

FAMILIES: dict[str, type[Family] | str] = {
    "seq2seq": Seq2SeqFamily,
    "lm": LanguageModelFamily,
    "classifier": ClassifierFamily,
    "rnn": StreamFamily,
    "ocr": OCRFamily,
    "treelstm": TreeFamily,
    "onnx": "cellserve.families.imported:ImportedFamily",  # needs the onnx extra: imported when used
}


def family_class(arch: str) -> type[Family]:
    entry = FAMILIES.get(arch)
    if entry is None:
        raise ValueError(f"architecture {arch!r} cannot be served (families: {sorted(FAMILIES)})")
    if isinstance(entry, str):
        import importlib

        module, name = entry.split(":")
        entry = getattr(importlib.import_module(module), name)
    return entry


def family_for(model, **options) -> Family:
    """The family serving a loaded model; `options` are model config keys, each family takes its own."""
    cls = family_class(model.arch)
    return cls(model, **{k: v for k, v in options.items() if k in cls.options})


def make_runner(model, capacity: int, block_steps: int = 1, step_loop: str = "native"):
    """The runner of a loaded model with its family's default options (benchmarks, tests)."""
    return family_for(model).runner(capacity, block_steps, step_loop)


__all__ = ["SNAPSHOT", "Family", "TensorSpec", "FAMILIES", "family_class", "family_for", "make_runner"]
