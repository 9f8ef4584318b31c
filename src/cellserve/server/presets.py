"""Models that installed packages ship, served by name with the config they need: `cellserve serve silero-vad`
serves the Silero VAD graph of the `silero-vad` package with its sample rate, chunk shape and context, so a
newcomer needs no config file. A preset names the package, the file inside it and the model config; adding one
is one entry in PRESETS."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Preset:
    package: str  # the importable package that ships the file (and the pip name, dashes for underscores)
    file: str     # the model file, relative to the package's folder
    config: dict = field(default_factory=dict)  # config.json keys (server/config.py's ModelConfig)
    about: str = ""


PRESETS = {
    "silero-vad": Preset(
        "silero_vad", "data/silero_vad.onnx",
        # 16 kHz, 512-sample chunks; each session keeps the last 64 samples of its previous chunk, which the
        # graph reads in front of the next (576 in all), and its LSTM state
        {"controls": {"sr": 16000}, "context": {"input": 64}, "input_shapes": {"input": [-1, 576]},
         "max_batch": 64},
        "Silero VAD: speech probability per 512-sample chunk of 16 kHz audio, one session per stream"),
}


def preset(name: str) -> tuple[Path, dict] | None:
    """(model file, config) of a preset name, None when it is not one; ValueError when its package is not
    installed."""
    chosen = PRESETS.get(name)
    if chosen is None:
        return None
    spec = importlib.util.find_spec(chosen.package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"{name} is served from the {chosen.package!r} package, which is not installed: "
                         f"pip install {chosen.package.replace('_', '-')}")
    path = Path(list(spec.submodule_search_locations)[0]) / chosen.file
    if not path.exists():
        raise ValueError(f"{name}: the installed {chosen.package!r} package has no {chosen.file}")
    return path, dict(chosen.config)
