"""Our model file: one .safetensors file whose metadata holds a JSON header naming the architecture."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.numpy import load_file, save_file
from safetensors import safe_open

from cellserve.models.lm import Classifier, LanguageModel
from cellserve.models.ocr import OCRModel
from cellserve.models.rnn import RNN
from cellserve.models.seq2seq import Seq2Seq
from cellserve.models.tree import TreeLSTM

FORMAT_VERSION = "1"
ARCHS = {cls.arch: cls for cls in (RNN, LanguageModel, Classifier, Seq2Seq, TreeLSTM, OCRModel)}


def save(model, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"cellserve_format": FORMAT_VERSION, "config": json.dumps(model.config())}
    save_file(dict(model.tensors()), str(path), metadata=header)
    return path


def load(path: str | Path):
    """Load a model saved by `save`; the architecture comes from the file's header."""
    path = Path(path)
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
    if meta.get("cellserve_format") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a cellserve model file (format {meta.get('cellserve_format')!r})")
    config = json.loads(meta["config"])
    if config.get("arch") == "onnx":  # an imported graph: needs the onnx extra, so imported only here
        from cellserve.models.imported import ImportedModel

        return ImportedModel.from_tensors(config, load_file(str(path)))
    if config.get("arch") not in ARCHS:
        raise ValueError(f"{path}: unknown architecture {config.get('arch')!r}")
    return ARCHS[config["arch"]].from_tensors(config, load_file(str(path)))
