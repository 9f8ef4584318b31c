"""The model repository: the served models by name, their lifecycle (load, reload beside the old version,
unload, drain), and how a folder becomes a served model. Two folder layouts:
  ours    weights (model.safetensors) + optional config.json;
  Triton  numbered version folders holding model.onnx or model.safetensors, and an optional config.pbtxt
          (and/or config.json) beside them.
Without a folder, the embedded default models are served."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from pathlib import Path

from pydantic import ValidationError

from cellserve import models
from cellserve.models import RNN
from cellserve.server.config import ModelConfig, check_declared, triton_config
from cellserve.server.served import ServedModel


log = logging.getLogger("cellserve.repository")
MODEL_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def check_name(name: str) -> None:
    """A model name is one path segment of letters, digits, '-', '_' and '.', never '.' or '..'."""
    if not MODEL_NAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"invalid model name {name[:64]!r}: use letters, digits, '-', '_' and '.' (not '.' or '..')")


def serve_model(name: str, model, config: ModelConfig) -> ServedModel:
    """A loaded model behind the protocol; backend onnxruntime[-int8] first moves our own models' LSTM/GRU
    layers onto ONNX Runtime (an imported graph's family runs the whole graph there instead)."""
    if config.backend.startswith("onnxruntime") and model.arch != "onnx":
        from cellserve.interop.onnx_export import use_onnxruntime

        use_onnxruntime(model, int8=config.backend == "onnxruntime-int8")
    return ServedModel(name, model, config)


class Repository:
    """The served models, by name. With a root folder, models can be (re)loaded and unloaded while serving:
    a load builds the new version beside the old one and swaps it in, and the old engine finishes what it
    was given (drains) in the background."""

    def __init__(self, served: list[ServedModel], root: Path | None = None, factories: dict | None = None):
        self.models = {m.name: m for m in served}
        self.root = root
        self.factories = factories or {}  # name -> () -> ServedModel, for models without a folder
        self.unavailable: dict[str, str] = {}  # name -> reason (failed to load, unloaded)
        self.lock = threading.Lock()
        self.started = False

    def get(self, name: str) -> ServedModel | None:
        return self.models.get(name)

    def start(self) -> None:
        self.started = True
        for m in self.models.values():
            m.engine.start()

    def stop(self, timeout: float = 10.0) -> None:
        for m in self.models.values():
            m.engine.stop(drain=True, timeout=timeout)

    def known(self) -> list[str]:
        """Every model this repository can serve: loaded ones, folders on disk, embedded ones."""
        names = set(self.models) | set(self.factories) | set(self.unavailable)
        if self.root is not None and self.root.is_dir():
            names |= {p.name for p in self.root.iterdir() if p.is_dir()}
        return sorted(names)

    def index(self, ready_only: bool = False) -> list[dict]:
        rows = []
        for name in self.known():
            served = self.models.get(name)
            row = {"name": name, "version": served.version if served else "",
                   "state": "READY" if served else "UNAVAILABLE",
                   "reason": "" if served else self.unavailable.get(name, "not loaded")}
            if served or not ready_only:
                rows.append(row)
        return rows

    def build(self, name: str) -> ServedModel:
        check_name(name)
        if name in self.factories:
            return timed_load(name, self.factories[name])
        folder = self.root / name if self.root is not None else None
        if folder is None or folder.parent != self.root or not folder.is_dir():
            raise KeyError(f"no model {name!r} in this repository; it has {self.known()}")
        try:
            return timed_load(name, lambda: load_folder(folder))
        except ValueError as exc:  # clients see the folder's name, never the server's paths (the log has them)
            log.warning("model %s failed to load: %s", name, exc)
            raise ValueError(self.public(str(exc)))

    def public(self, message: str) -> str:
        """A message without the repository's location on the server."""
        if self.root is None:
            return message
        for root in {str(self.root.resolve()), str(self.root)}:
            message = message.replace(root + "/", "").replace(root, "<repository>")
        return message

    def load(self, name: str) -> tuple[ServedModel, ServedModel | None]:
        """(Re)load a model and serve it; returns (new, old). The old one, if any, must be retired by the
        caller (retire) once nobody can reach it. Raises KeyError (unknown) or ValueError (a bad name or bad
        files; only a name that can be a folder here is remembered as unavailable)."""
        check_name(name)
        try:
            served = self.build(name)
        except ValueError as exc:
            with self.lock:
                self.unavailable[name] = str(exc)
            raise
        if self.started:
            served.engine.start()
        with self.lock:
            old = self.models.get(name)
            self.models[name] = served
            self.unavailable.pop(name, None)
        return served, old

    def unload(self, name: str) -> ServedModel:
        with self.lock:
            served = self.models.pop(name, None)
            if served is None:
                raise KeyError(f"model {name!r} is not loaded")
            self.unavailable[name] = "unloaded"
        log.info("model %s version %s unloaded; its engine stops once its requests are done", name, served.version)
        return served

    @staticmethod
    def retire(served: ServedModel, timeout: float = 60.0) -> None:
        """Stop a replaced or unloaded model's engine once its queued and running requests are done."""
        def stop():
            start = time.perf_counter()
            served.engine.stop(drain=True, timeout=timeout)
            log.info("model %s version %s retired: its engine stopped after %.0f ms of draining", served.name,
                     served.version, (time.perf_counter() - start) * 1e3)

        threading.Thread(target=stop, name=f"retire-{served.name}", daemon=True).start()

    @classmethod
    def from_path(cls, path: str | Path, settings: dict | None = None, name: str | None = None) -> "Repository":
        """A repository folder, or a single model file (model.onnx or ours) served under `name` (default: its
        stem) with `settings` as its config.json (a folder's models keep their own)."""
        path = Path(path)
        if not path.is_file():
            if settings:
                raise ValueError("--config and --set configure a single model file; a repository folder keeps "
                                 "each model's config.json")
            return cls.from_directory(path)
        try:
            config = ModelConfig(**(settings or {}))
        except ValidationError as exc:
            raise ValueError("the model config: " + "; ".join(
                f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}" for error in exc.errors()))
        try:
            model = _load_model(path, config)
        except ValueError as exc:
            raise ValueError(f"{exc} (a single model file takes its config on the command line: --config "
                             "config.json, or --set KEY=VALUE such as --set input_shapes.input=[-1,576])")
        return cls([serve_model(name or path.stem, model, config)])

    @classmethod
    def from_directory(cls, root: str | Path, only: list[str] | None = None) -> "Repository":
        """Every model folder of `root`, or only those named (explicit model control: '*' is every one)."""
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"model repository {root} is not a directory")
        folders = sorted(p for p in root.iterdir() if p.is_dir())
        if only is not None and "*" not in only:
            for name in only:
                check_name(name)
                if not (root / name).is_dir():
                    raise ValueError(f"--load-model {name}: no such model folder in the repository")
            folders = [root / name for name in only]
        served = [timed_load(folder.name, lambda folder=folder: load_folder(folder)) for folder in folders]
        if not served and only is None:
            raise ValueError(f"model repository {root} has no model folders")
        return cls(served, root)

    @classmethod
    def defaults(cls) -> "Repository":
        """The embedded models: the trained number speller, and an SRU frame encoder (40 filterbank-sized
        features, 2x256, fixed-seed weights) that exercises streaming sessions with 4-frame blocks."""
        from cellserve.tasks.speller import load_default

        factories = {
            "speller": lambda: serve_model("speller", load_default(), ModelConfig(text_codec="number-speller")),
            "sru-stream": lambda: serve_model("sru-stream", RNN.random("sru", 40, 256, num_layers=2, seed=0),
                                              ModelConfig(block_steps=4, capacity=1024))}
        return cls([timed_load(name, make) for name, make in factories.items()], factories=factories)


def timed_load(name: str, make) -> ServedModel:
    """make(), logged with the time it took (a failure is logged by the caller, which knows what to hide)."""
    start = time.perf_counter()
    served = make()
    log.info("model %s version %s loaded in %.0f ms (%s)", name, served.version, (time.perf_counter() - start) * 1e3,
             f"{type(served.model).__name__}, {served.engine.policy} batching, {served.engine.runner.step_loop} step loop")
    return served


def load_folder(folder: Path) -> ServedModel:
    """A model folder, ValueError naming what is wrong. Two layouts:
      ours    weights (model.safetensors) + optional config.json;
      Triton  numbered version folders holding model.onnx or model.safetensors, and an optional
              config.pbtxt (and/or config.json) beside them; the newest version is served unless the
              config's version_policy names others (the newest of those)."""
    versions = sorted((p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    settings, declared = {}, None
    if (folder / "config.pbtxt").exists():
        settings, declared = triton_config(folder / "config.pbtxt", folder.name)
    config_path = folder / "config.json"
    try:
        if config_path.exists():
            settings.update(json.loads(config_path.read_text()))
        policy = settings.pop("version_policy", None)
        filename = settings.pop("default_model_filename", None)
        config = ModelConfig(**settings)
    except (json.JSONDecodeError, ValidationError) as exc:
        raise ValueError(f"{config_path if config_path.exists() else folder / 'config.pbtxt'}: {exc}")
    if not versions:
        served = serve_model(folder.name, _load_model(folder / (filename or config.weights), config), config)
    else:
        chosen = _pick_version(versions, policy)
        files = [filename] if filename else ["model.onnx", "model.safetensors"]
        path = next((chosen / f for f in files if (chosen / f).exists()), None)
        if path is None:
            raise ValueError(f"version folder {chosen} holds none of {files}")
        served = serve_model(folder.name, _load_model(path, config), config)
        served.version, served.versions = chosen.name, [v.name for v in versions]
    if declared is not None:
        check_declared(served, declared, folder / "config.pbtxt")
    return served


def _load_model(path: Path, config: ModelConfig):
    """Our model file, or an ONNX graph imported on the spot (specialized as its config says), with its
    matrices in the config's weight dtype."""
    model = _read_model(path, config)
    if config.weight_dtype == "bf16":
        from cellserve.compress.quantize import bf16_weights

        model = bf16_weights(model, in_place=True)  # freshly loaded: nobody else holds it
    return model


def _read_model(path: Path, config: ModelConfig):
    if path.suffix == ".onnx":
        from cellserve.interop.onnx_import import import_onnx

        if not path.exists():
            raise ValueError(f"{path} does not exist")
        return import_onnx(path, **config.import_options())
    try:
        return models.load(path)
    except OSError as exc:
        raise ValueError(f"{path}: {exc}")


def _pick_version(versions: list[Path], policy: dict | None) -> Path:
    if policy and policy.get("specific"):
        wanted = {str(v) for v in policy["specific"]}
        chosen = [v for v in versions if v.name in wanted]
        if not chosen:
            raise ValueError(f"version_policy names versions {sorted(wanted)}; the folder has {[v.name for v in versions]}")
        return chosen[-1]
    return versions[-1]
