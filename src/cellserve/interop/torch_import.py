"""Import from torch: the weights of nn.LSTM / nn.GRU / nn.LSTMCell / nn.GRUCell (modules or state dicts),
or a whole nn.Module (pickled, TorchScript, or built by module:factory) exported to ONNX and imported as a
graph (models/imported.py).

rnn_from_torch only reads tensors; torch itself is needed only when a module is given.
"""

from __future__ import annotations

import re

import numpy as np

from cellserve.cells import GRUCell, LSTMCell
from cellserve.models.rnn import RNN

_KEY = re.compile(r"^(weight|bias)_(ih|hh)(?:_l(\d+))?(_reverse)?$")


def _numpy(t) -> np.ndarray:
    return t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)


def rnn_from_torch(source, kind: str | None = None) -> RNN:
    """Build an RNN from a torch module or its state_dict. kind ('lstm'/'gru') is inferred when omitted."""
    state = source.state_dict() if hasattr(source, "state_dict") else source
    groups: dict[tuple[int, int], dict[str, np.ndarray]] = {}
    for key, value in state.items():
        match = _KEY.match(key)
        if not match:
            if key.startswith(("weight_hr", "weight_ih", "weight_hh", "bias_")):
                raise ValueError(f"unsupported torch RNN parameter {key!r} (projections, proj_size, are not supported)")
            raise ValueError(f"{key!r} is not an nn.LSTM/nn.GRU parameter: this state dict holds more than a recurrent "
                             "layer. Import the whole module instead (a pickled or TorchScript file, or "
                             "module:factory), which goes through ONNX")
        what, side, layer, reverse = match.groups()
        groups.setdefault((int(layer or 0), 1 if reverse else 0), {})[f"{what}_{side}"] = _numpy(value).astype(np.float32)
    if not groups:
        raise ValueError("no RNN weights found")
    hidden = groups[(0, 0)]["weight_hh"].shape[1]
    gates = groups[(0, 0)]["weight_hh"].shape[0] // hidden
    inferred = {4: "lstm", 3: "gru"}.get(gates)
    kind = kind or inferred
    if kind != inferred:
        raise ValueError(f"weights have {gates} gate blocks; that is not a {kind}")
    num_layers = 1 + max(l for l, _ in groups)
    num_dirs = 1 + max(d for _, d in groups)
    layers = []
    for l in range(num_layers):
        dirs = []
        for d in range(num_dirs):
            g = groups[(l, d)]
            zeros = np.zeros(gates * hidden, dtype=np.float32)
            b_ih, b_hh = g.get("bias_ih", zeros), g.get("bias_hh", zeros)
            if kind == "lstm":
                dirs.append(LSTMCell(g["weight_ih"], g["weight_hh"], b_ih + b_hh))
            else:
                dirs.append(GRUCell(g["weight_ih"], g["weight_hh"], b_ih, b_hh))
        layers.append(dirs)
    return RNN(layers)


def load_torch(source: str):
    """A torch object from a TorchScript archive, a state dict, a pickled module, or 'package.module:name'
    (a module, or a function returning one). ValueError says what the source is not."""
    import importlib
    from pathlib import Path

    import torch

    path = Path(source)
    if not path.exists():
        if ":" not in source:
            raise ValueError(f"{source} does not exist (a file, or module:factory)")
        name, _, attr = source.partition(":")
        try:
            obj = getattr(importlib.import_module(name), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"cannot import {source}: {exc}")
        return obj if isinstance(obj, torch.nn.Module) else obj()
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError):
        pass
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 (torch raises pickle's and its own errors alike)
        pass
    try:  # a whole pickled module: unpickling runs its code, as torch.load does; for your own files
        return torch.load(path, map_location="cpu", weights_only=False)
    except (AttributeError, ModuleNotFoundError) as exc:  # the pickle names a class this process cannot import
        raise ValueError(f"{source} is a pickled module whose class cannot be imported here ({exc}); put the "
                         "class in a module on PYTHONPATH, save the module as TorchScript "
                         "(torch.jit.script(model).save(path)), or give package.module:factory")
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"{source} is not a TorchScript archive, a state dict or a pickled module "
                         f"({type(exc).__name__}: {exc})")


def parse_input(text: str) -> tuple[str, str, list]:
    """'tokens:int64:batch,time' -> ('tokens', 'int64', ['batch', 'time']): named dimensions vary, numbers
    are fixed."""
    try:
        name, dtype, dims = text.split(":")
        shape = [int(d) if d.isdigit() else d for d in dims.split(",")]
    except ValueError:
        raise ValueError(f"--input takes NAME:DTYPE:DIMS like tokens:int64:batch,time, not {text!r}")
    if dtype not in ("float32", "int64", "int32") or not name or not all(shape):
        raise ValueError(f"--input {text!r}: dtype must be float32, int64 or int32, and dimensions names or sizes")
    return name, dtype, shape


def guess_inputs(module) -> list[tuple[str, str, list]]:
    """The input of a module from its first layer: token ids for an Embedding, (batch, channels, time)
    for a Conv1d, feature frames for an LSTM/GRU/Linear."""
    for m in list(module.modules())[1:]:
        kind = getattr(m, "original_name", type(m).__name__)
        if kind == "Embedding":
            return [("tokens", "int64", ["batch", "time"])]
        if kind == "Conv1d":
            return [("input", "float32", ["batch", int(m.in_channels), "time"])]
        if kind in ("LSTM", "GRU"):
            first = ["batch", "time"] if m.batch_first else ["time", "batch"]
            return [("input", "float32", first + [int(m.input_size)])]
        if kind == "Linear":
            return [("input", "float32", ["batch", "time", int(m.in_features)])]
    raise ValueError("cannot tell the module's input from its layers: give --input NAME:DTYPE:DIMS")


def parse_arg(text: str) -> tuple[str, object]:
    """'sr=16000' -> ('sr', 16000): a non-tensor forward argument bound to a constant (int, float, or text)."""
    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier():
        raise ValueError(f"--arg takes NAME=VALUE like sr=16000, not {text!r}")
    for kind in (int, float):
        try:
            return name, kind(value)
        except ValueError:
            pass
    return name, value


def submodule(module, path: str):
    """module.a.b for 'a.b'; ValueError lists the children when there is none."""
    for part in path.split("."):
        children = dict(module.named_children())
        if part not in children:
            raise ValueError(f"no submodule {part!r} (it has {sorted(children)})")
        module = children[part]
    return module


def _keeps_state(module) -> list[str]:
    """Attributes a TorchScript module's forward assigns: state it keeps between calls, out of an export's reach."""
    graph = getattr(getattr(module, "forward", None), "graph", None)
    if graph is None:
        return []
    return sorted({node.s("name") for node in graph.findAllNodes("prim::SetAttr")})


def _parameters(module) -> list[str]:
    """The names of forward's parameters, in order (TorchScript schema or Python signature)."""
    import inspect

    schema = getattr(getattr(module, "forward", None), "schema", None)
    if schema is not None:
        return [a.name for a in schema.arguments][1:]  # without self
    return list(inspect.signature(module.forward).parameters)


def module_to_onnx(module, inputs: list[tuple[str, str, list]] | None = None, args: dict | None = None) -> bytes:
    """Export a module to ONNX (TorchScript exporter: LSTM/GRU become ONNX LSTM/GRU operators) with every
    named dimension dynamic, in the inputs and in the outputs that follow them. args: non-tensor forward
    arguments bound to constants (`--arg sr=16000`)."""
    import io

    import torch

    kept = _keeps_state(module)
    if kept:
        children = [n for n, _ in module.named_children()]
        raise ValueError(f"its forward keeps state in the module between calls ({', '.join(kept)}), which an export "
                         f"cannot carry: import the submodule that takes the state as an input instead (--submodule, "
                         f"one of {children}); cellserve then holds the state per session")
    inputs = inputs or guess_inputs(module)
    module.eval()
    args = args or {}
    order = _parameters(module) if args else [n for n, _, _ in inputs]
    unknown = set(args) - set(order)
    if unknown:
        raise ValueError(f"--arg names {sorted(unknown)}, which forward does not take (it takes {order})")

    def examples(extra: int):
        """Example inputs, with the bound arguments in their places among them (the exporter makes them
        constants of the graph)."""
        sizes, tensors = {}, []
        for _, dtype, dims in inputs:
            shape = [d if isinstance(d, int) else sizes.setdefault(d, 2 + len(sizes) * 3 + extra) for d in dims]
            t = torch.ones(shape, dtype=getattr(torch, dtype)) if dtype != "float32" else torch.randn(shape)  # ids and lengths of 1
            tensors.append(t)
        given = iter(tensors)
        return tuple(args[name] if name in args else next(given) for name in order[:len(tensors) + len(args)])

    def shapes(args):
        with torch.no_grad():
            out = module(*args)
        out = out if isinstance(out, (tuple, list)) else (out,)
        return [tuple(o.shape) for o in out]

    try:
        first, second = shapes(examples(0)), shapes(examples(2))
    except Exception as exc:  # noqa: BLE001 (whatever the module raises)
        raise ValueError(f"the module fails on example inputs {[(n, d, s) for n, d, s in inputs]}: {exc}")
    names = ["output"] if len(first) == 1 else [f"output{i}" for i in range(len(first))]
    dynamic = {name: {a: d for a, d in enumerate(dims) if not isinstance(d, int)} for name, _, dims in inputs}
    for name, a, b in zip(names, first, second):
        dynamic[name] = {axis: f"{name}_{axis}" for axis, (m, n) in enumerate(zip(a, b)) if m != n}
    buffer = io.BytesIO()
    try:
        positional = examples(0)
        tensor_names = iter([n for n, _, _ in inputs])  # bound arguments keep their own names where kept as inputs
        torch.onnx.export(module, positional, buffer, dynamo=False, opset_version=17, output_names=names,
                          input_names=[name if name in args else next(tensor_names) for name in order[:len(positional)]],
                          dynamic_axes=dynamic)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"torch.onnx.export failed: {exc}")
    if not args:
        return buffer.getvalue()
    import onnx

    from cellserve.interop.normalize import fix_controls

    graph = onnx.load_from_string(buffer.getvalue())  # a TorchScript module's export keeps bound scalars as inputs
    fix_controls(graph, {i.name: args[i.name] for i in graph.graph.input if i.name in args})
    return graph.SerializeToString()
