"""Graph surgery: an ONNX graph (exported from PyTorch or anything else) around a recurrent core becomes an
ImportedModel (models/imported.py).

Import splits the graph at its LSTM/GRU operators:
  front  graph inputs -> the first recurrent operator's input X [T, B, F]: embedding Gather, Conv,
         MatMul/Gemm, normalization, activations, ...
  core   the LSTM/GRU operators (stacked, bidirectional) and the reshaping between them. They become our
         cells, which the engine batches step by step across requests (cellular batching).
  head   what the graph computes from the core's outputs (every step of the top layer, the final states
         of any layer) and its own inputs: a classifier, tagger, CTC or LM head.
Front and head are the original graph's own nodes, cut out as two ONNX models with their weights as
initializers and run by ONNX Runtime, so they compute exactly what the original does whatever their
operators. Only the recurrence runs elsewhere; its operators have to be LSTM or GRU, and only reshaping
may sit between stacked layers: anything else is refused with the operator's name. Import then checks the
split on a probe input against ONNX Runtime running the whole graph, and refuses a model it does not
reproduce. Import finds the batch and time axes of every tensor by running the graph on probe sizes.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx.utils
from onnx import TensorProto, helper, numpy_helper

from cellserve.cells import Cell, GRUCell, LSTMCell
from cellserve.cells.onnxruntime import ort_session
from cellserve.interop.normalize import normalize, upstream
from cellserve.interop.onnx_export import GATE_ORDER
from cellserve.models.imported import NUMPY, ImportedModel
from cellserve.models.rnn import RNN

RECURRENT = ("LSTM", "GRU")
OTHER_RECURRENCES = ("RNN", "Loop", "Scan")  # recurrences the core cannot take
GLUE = ("Transpose", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Dropout")  # allowed between layers
DATATYPES = {TensorProto.FLOAT: "FP32", TensorProto.DOUBLE: "FP64", TensorProto.FLOAT16: "FP16",
             TensorProto.INT64: "INT64", TensorProto.INT32: "INT32", TensorProto.INT16: "INT16",
             TensorProto.INT8: "INT8", TensorProto.UINT8: "UINT8", TensorProto.BOOL: "BOOL"}


def _inverse_reorder(a: np.ndarray, kind: str) -> np.ndarray:
    blocks = np.split(a, len(GATE_ORDER[kind]), axis=0)
    inverse = np.argsort(GATE_ORDER[kind])
    return np.concatenate([blocks[i] for i in inverse], axis=0)


def load_onnx(source) -> onnx.ModelProto:
    """A ModelProto from a path, bytes or a ModelProto."""
    if isinstance(source, onnx.ModelProto):
        return source
    return onnx.load_from_string(source) if isinstance(source, bytes) else onnx.load(str(source))


def constants_of(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Tensors known before run time: initializers and the outputs of Constant nodes."""
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def cells_of_node(node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> list[Cell]:
    """Our cells (one per direction) for an ONNX LSTM or GRU operator. Activations must be the defaults,
    GRU needs linear_before_reset=1 (torch's and cuDNN's GRU), and the weights must be constants."""
    kind = node.op_type.lower()
    where = f"{node.op_type} node {node.name!r}"
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    for unsupported in ("activations", "clip", "input_forget"):
        if attrs.get(unsupported):
            raise ValueError(f"{where}: {unsupported} is not supported")
    if kind == "gru" and attrs.get("linear_before_reset", 0) != 1:
        raise ValueError(f"{where}: GRU needs linear_before_reset=1 (the torch/cuDNN formulation)")
    if attrs.get("layout", 0) != 0:
        raise ValueError(f"{where}: only layout=0 ([T, B, F]) is supported")
    if attrs.get("direction", b"forward") in (b"reverse", "reverse"):
        raise ValueError(f"{where}: a lone reverse-direction layer is not supported")
    names = list(node.input) + [""] * (4 - len(node.input))
    if names[1] not in constants or names[2] not in constants:
        raise ValueError(f"{where}: its weights W and R must be constants (initializers)")
    w, r = constants[names[1]], constants[names[2]]
    hidden, gates = r.shape[-1], len(GATE_ORDER[kind])
    b = constants.get(names[3]) if names[3] else None
    if names[3] and b is None:
        raise ValueError(f"{where}: its bias B must be a constant (initializer)")
    if b is None:
        b = np.zeros((w.shape[0], 2 * gates * hidden), np.float32)
    cells = []
    for d in range(w.shape[0]):
        w_ih, w_hh = _inverse_reorder(w[d], kind), _inverse_reorder(r[d], kind)
        b_ih, b_hh = _inverse_reorder(b[d, :gates * hidden], kind), _inverse_reorder(b[d, gates * hidden:], kind)
        if kind == "lstm":
            cells.append(LSTMCell(w_ih, w_hh, b_ih + b_hh))
        else:
            cells.append(GRUCell(w_ih, w_hh, b_ih, b_hh))
    return cells


def rnn_from_onnx(source) -> RNN:
    """Import the LSTM/GRU operators of an ONNX model (a path, bytes or ModelProto), in graph order, as a
    stacked RNN: consecutive operators are consecutive layers (import_onnx imports whole graphs)."""
    model = load_onnx(source)
    constants = constants_of(model.graph)
    layers = [cells_of_node(node, constants) for node in model.graph.node if node.op_type in ("LSTM", "GRU")]
    if not layers:
        raise ValueError("no LSTM or GRU operator in the ONNX graph")
    return RNN(layers)


def import_onnx(source, controls: dict | None = None, input_shapes: dict | None = None,
                state_pairs: dict[str, str] | None = None) -> ImportedModel:
    """Split an ONNX model (path, bytes or ModelProto) into front, core and head; see the module doc.
    controls and input_shapes specialize it first (interop/normalize.py); state_pairs declares which
    state output continues which state input (found by dataflow otherwise). ValueError says what does
    not fit, naming the operator."""
    model = load_onnx(source)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ValueError(f"not a valid ONNX model: {str(exc).splitlines()[0]}")
    model = normalize(model, controls, input_shapes)
    graph = model.graph
    constants = constants_of(graph)
    producer = {out: node for node in graph.node for out in node.output}
    consumers = collections.defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    graph_inputs = [i for i in graph.input if i.name not in constants]
    input_names = {i.name for i in graph_inputs}
    output_names = [o.name for o in graph.output]

    for node in graph.node:
        if node.op_type in OTHER_RECURRENCES:
            raise ValueError(f"operator {node.op_type} (node {node.name!r}) is a recurrence cellserve does not run: "
                             "the recurrent core must be ONNX LSTM or GRU operators")
    recurrent = [n for n in graph.node if n.op_type in RECURRENT]
    if not recurrent:
        raise ValueError(f"no LSTM or GRU operator in the graph (it has {sorted({n.op_type for n in graph.node})})")
    if len({n.op_type for n in recurrent}) > 1:
        raise ValueError("the graph mixes LSTM and GRU layers; cellserve runs one cell type per stack")

    core = {id(n) for n in recurrent}
    for i in range(1, len(recurrent)):  # only reshaping between stacked layers
        name = recurrent[i].input[0]
        while name != recurrent[i - 1].output[0]:
            node = producer.get(name)
            if node is None or node.op_type in RECURRENT:
                raise ValueError(f"recurrent layer {i} ({recurrent[i].op_type} node {recurrent[i].name!r}) does not "
                                 f"read layer {i - 1}'s output: cellserve runs the layers as one stack")
            if node.op_type not in GLUE:
                raise ValueError(f"operator {node.op_type} (node {node.name!r}) lies between recurrent layers {i - 1} "
                                 f"and {i}; only reshaping ({', '.join(GLUE[:4])}) can")
            core.add(id(node))
            name = node.input[0]

    layers = []
    lengths_tensors = {node.input[4] if len(node.input) > 4 else "" for node in recurrent}
    if len(lengths_tensors) > 1:
        raise ValueError("the recurrent layers take different sequence_lens; cellserve runs the layers of a row "
                         "over the same steps")
    lengths_tensor = lengths_tensors.pop()
    state_sources = []  # initial states the graph computes from its inputs: {"layer", "kind" (h/c), "name"}
    for l, node in enumerate(recurrent):
        names = list(node.input) + [""] * (8 - len(node.input))
        for kind, name in (("h", names[5]), ("c", names[6])):
            # an initial state built from shapes alone (zeros of the batch size, as torch exports them) is
            # not a state the graph is given: the check below confirms zeros reproduce it
            if name and name not in constants and upstream(name, producer, input_names, values_only=True):
                state_sources.append({"layer": l, "kind": kind, "name": name})
        layers.append(cells_of_node(node, constants))
    if len({len(d) for d in layers}) > 1 or len({c.hidden_size for d in layers for c in d}) > 1:
        raise ValueError("stacked recurrent layers must share their direction count and hidden size")
    rnn = RNN(layers)

    # the core's outputs that the rest of the graph reads
    def read_outside(name):
        return name in output_names or any(id(c) not in core for c in consumers[name])

    glue_tensors = {out for node in graph.node if id(node) in core and node.op_type in GLUE for out in node.output}
    for i, node in enumerate(recurrent[:-1]):
        for name in [node.output[0]] + [t for t in glue_tensors if _through_glue(t, node.output[0], producer)]:
            if read_outside(name):
                raise ValueError(f"the graph reads every step of recurrent layer {i}, not only of the top layer; "
                                 "cellserve keeps the top layer's steps")
    core_outputs = []
    top = recurrent[-1].output[0] if recurrent[-1].output else ""
    if top and read_outside(top):
        core_outputs.append({"name": top, "kind": "Y"})
    for l, node in enumerate(recurrent):
        for k, kind in ((1, "Y_h"), (2, "Y_c")):
            if len(node.output) > k and node.output[k] and read_outside(node.output[k]):
                core_outputs.append({"name": node.output[k], "kind": kind, "layer": l})

    core_input = recurrent[0].input[0]
    extractor = onnx.utils.Extractor(onnx.shape_inference.infer_shapes(model))
    front = b"" if core_input in input_names else _extract(extractor, list(input_names), [core_input])
    tensors_in = [o["name"] for o in core_outputs] + [i.name for i in graph_inputs]
    head_outputs = [n for n in output_names if n not in tensors_in]
    head = _extract(extractor, tensors_in, head_outputs) if head_outputs else b""

    lengths = _extract(extractor, list(input_names), [lengths_tensor]) if lengths_tensor else b""
    states = _extract(extractor, list(input_names), [s["name"] for s in state_sources]) if state_sources else b""
    state_inputs = [i.name for i in onnx.load_from_string(states).graph.input] if states else []
    for part, cut in (("front", front), ("head", head), ("sequence lengths", lengths)):
        read = {i.name for i in onnx.load_from_string(cut).graph.input} if cut else set()
        if read & set(state_inputs):
            raise ValueError(f"the graph's {part} reads state input(s) {sorted(read & set(state_inputs))}: cellserve "
                             "takes state inputs only as the recurrent core's initial state")
    spec = {"inputs": [_tensor_spec(i) for i in graph_inputs], "outputs": [_tensor_spec(o) for o in graph.output],
            "core_input": core_input, "core_outputs": core_outputs, "streamable": False,
            "vocab": _vocabularies(graph, constants, input_names),
            "length_inputs": _length_inputs(lengths, graph_inputs) if lengths else [],
            "state_sources": state_sources,
            "state": _state_pairs(graph, producer, state_inputs, state_sources, core_outputs, state_pairs or {})}
    imported = ImportedModel(front, head, rnn, spec, model.SerializeToString(), lengths, states)
    whole = ort_session(model)
    _find_axes(imported, whole)
    _check(imported, whole)
    # sessions: a graph that carries its state itself, or one whose chunks give what one pass gives
    spec["streamable"] = not rnn.bidirectional and not lengths and (bool(states) or _chunks_equal_one_pass(imported))
    return imported


def _state_pairs(graph, producer, state_inputs, state_sources, core_outputs, declared: dict) -> list[dict]:
    """Which graph output continues each state input: the output computed only from the core's final
    states (Y_h, Y_c) of the same layers and kinds the input starts (or as the config declares them)."""
    finals = {o["name"]: (o["layer"], o["kind"][-1]) for o in core_outputs if o["kind"] != "Y"}
    output_names = [o.name for o in graph.output]
    for name, out in declared.items():
        if name not in state_inputs or out not in output_names:
            raise ValueError(f"the declared state pair {name!r} -> {out!r} is not a state input of the recurrent core "
                             f"({state_inputs}) and a graph output ({output_names})")
    reads, glue = {}, {}
    for out in output_names:
        sources = upstream(out, producer, set(finals) | set(state_inputs))
        if sources and sources <= set(finals):
            reads[out] = {finals[s] for s in sources}
            glue[out] = _only_moves(out, producer, set(finals))
    pairs = []
    for name in state_inputs:
        feeds = {(s["layer"], s["kind"]) for s in state_sources if name in upstream(s["name"], producer, {name})}
        # the state itself (reshaped, stacked), before an output merely computed from it (a head on h)
        candidates = sorted((o for o, r in reads.items() if r == feeds), key=lambda o: not glue[o])
        out = declared.get(name) or next(iter(candidates), None)
        pairs.append({"input": name, "output": out})
    return pairs


MOVES = ("Identity", "Squeeze", "Unsqueeze", "Concat", "Reshape", "Transpose", "Gather", "Slice", "Cast", "Flatten")


def _only_moves(name: str, producer: dict, sources: set[str]) -> bool:
    """Whether `name` is `sources` only moved about (reshaped, stacked, cut), not computed on."""
    seen, todo = set(), [name]
    while todo:
        tensor = todo.pop()
        if tensor in seen or tensor in sources:
            continue
        seen.add(tensor)
        node = producer.get(tensor)
        if node is None:
            continue
        if node.op_type not in MOVES:
            return False
        todo.extend(n for n in node.input if n)
    return True


def _through_glue(tensor: str, source: str, producer: dict) -> bool:
    """Whether `tensor` is computed from `source` through single-input glue."""
    while tensor != source:
        node = producer.get(tensor)
        if node is None or node.op_type not in GLUE:
            return False
        tensor = node.input[0]
    return True


def _extract(extractor, inputs: list[str], outputs: list[str]) -> bytes:
    """The subgraph computing `outputs` from `inputs`, with the inputs it does not read removed."""
    try:
        sub = extractor.extract_model(inputs, outputs)
    except (KeyError, ValueError) as exc:
        raise ValueError(f"cannot cut the graph between {inputs} and {outputs}: {exc}")
    used = {name for node in sub.graph.node for name in node.input} | {o.name for o in sub.graph.output}
    unused = [i for i in sub.graph.input if i.name not in used]
    for i in unused:
        sub.graph.input.remove(i)
    return sub.SerializeToString()


def _tensor_spec(value_info) -> dict:
    t = value_info.type.tensor_type
    if t.elem_type not in DATATYPES:
        raise ValueError(f"tensor {value_info.name!r} has ONNX type {TensorProto.DataType.Name(t.elem_type)}, which "
                         "cellserve does not serve")
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or f"?{value_info.name}.{a}")
            for a, d in enumerate(t.shape.dim)]
    return {"name": value_info.name, "datatype": DATATYPES[t.elem_type],
            "shape": [d if isinstance(d, int) else -1 for d in dims], "dims": dims,
            "batch_axis": None, "time_axis": None}


def _length_inputs(lengths: bytes, graph_inputs) -> list[str]:
    """The graph inputs the sequence lengths are computed from: integer vectors, one length per row."""
    names = [i.name for i in onnx.load_from_string(lengths).graph.input]
    for i in graph_inputs:
        if i.name in names:
            t = i.type.tensor_type
            if t.elem_type not in (TensorProto.INT64, TensorProto.INT32) or len(t.shape.dim) != 1:
                raise ValueError(f"the sequence lengths come from input {i.name!r}, which is not an integer vector "
                                 "(one length per row)")
    return names


def _vocabularies(graph, constants, input_names) -> dict[str, int]:
    """Integer inputs used as indices into a constant table (an embedding): their table sizes."""
    vocab = {}
    for node in graph.node:
        if node.op_type == "Gather" and node.input[1] in input_names and node.input[0] in constants:
            vocab[node.input[1]] = int(constants[node.input[0]].shape[0])
    return vocab


def _probe(spec: dict, sizes: dict[str, int], rng: np.random.Generator, steps: int = 1) -> dict:
    """Random input tensors with each symbolic dimension at its probe size; sequence lengths at most
    `steps` (the core's steps at these sizes)."""
    feeds = {}
    for s in spec["inputs"]:
        shape = [d if isinstance(d, int) else sizes[d] for d in s["dims"]]
        dtype = NUMPY[s["datatype"]]
        if s["name"] in spec.get("length_inputs", ()):
            feeds[s["name"]] = rng.integers(1, steps + 1, shape).astype(dtype)
        elif np.issubdtype(dtype, np.floating):
            feeds[s["name"]] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[s["name"]] = rng.random(shape) < 0.5
        else:
            feeds[s["name"]] = rng.integers(0, min(spec["vocab"].get(s["name"], 2), 1000), shape).astype(dtype)
    return feeds


def _find_axes(model: ImportedModel, whole) -> None:
    """Batch and time axes of every input and output, found by changing one symbolic size at a time:
    the batch size is the core input's axis 1, its time axis 0."""
    spec = model.spec
    symbols = list(dict.fromkeys(d for s in spec["inputs"] for d in s["dims"] if isinstance(d, str)))
    base = {s: 3 + 2 * i for i, s in enumerate(symbols)}  # 3, 5, 7, ...
    rng = np.random.default_rng(0)

    def run(sizes):
        feeds = _probe(spec, sizes, rng)
        x = model._front.run([spec["core_input"]], model._feeds(model._front, feeds))[0] if model._front else \
            feeds[spec["core_input"]]
        outs = whole.run([o["name"] for o in spec["outputs"]], feeds)
        return x.shape, [o.shape for o in outs]

    try:
        x0, out0 = run(base)
    except Exception as exc:  # noqa: BLE001 (ONNX Runtime raises its own types)
        raise ValueError(f"ONNX Runtime cannot run the graph on probe inputs: {exc}")
    batch = time = None
    changes = {}
    for s in symbols:
        x1, out1 = run({**base, s: base[s] + 2})
        changes[s] = out1
        if x1[1] != x0[1]:
            batch = s
        elif x1[0] != x0[0]:
            time = time or s
    spec["symbols"] = {"batch": batch, "time": time}
    for s in spec["inputs"]:
        s["batch_axis"] = s["dims"].index(batch) if batch in s["dims"] else None
        s["time_axis"] = s["dims"].index(time) if time in s["dims"] else None
    if batch is None:  # a graph exported for batch 1: rows are whole requests
        for s in spec["inputs"]:
            s["batch_axis"] = s["dims"].index(1) if x0[1] == 1 and 1 in s["dims"] else None
    for k, o in enumerate(spec["outputs"]):
        o["batch_axis"] = _changed_axis(out0[k], changes[batch][k]) if batch else (
            0 if out0[k] and out0[k][0] == 1 else None)
        o["time_axis"] = _changed_axis(out0[k], changes[time][k]) if time else None
        if batch and o["batch_axis"] is None:
            raise ValueError(f"output {o['name']!r} has no batch axis: rows of a request could not be told apart")


def _sizes(spec: dict, batch: int, other: int) -> dict[str, int]:
    """Probe sizes: `batch` for the batch dimension, `other` for every other symbolic one."""
    return {d: batch if d == spec["symbols"]["batch"] else other
            for s in spec["inputs"] for d in s["dims"] if isinstance(d, str)}


def _changed_axis(a: tuple, b: tuple) -> int | None:
    diff = [i for i, (m, n) in enumerate(zip(a, b)) if m != n]
    return diff[0] if len(diff) == 1 else None


def _check(model: ImportedModel, whole, rtol: float = 1e-4) -> None:
    """The split model against ONNX Runtime running the whole graph, on two probe rows."""
    spec = model.spec
    sizes = _sizes(spec, batch=2, other=9)
    feeds = _probe(spec, sizes, np.random.default_rng(1))
    if spec.get("length_inputs"):  # lengths from 1 up to the core's steps
        steps = model._front.run([spec["core_input"]], model._feeds(model._front, feeds))[0].shape[0] \
            if model._front else feeds[spec["core_input"]].shape[0]
        feeds = _probe(spec, sizes, np.random.default_rng(1), steps)
    expected = dict(zip([o["name"] for o in spec["outputs"]], whole.run(None, feeds)))
    got = model.forward(feeds)
    for name, want in expected.items():
        have = got[name]
        if have.shape != want.shape:
            raise ValueError(f"the split model gives output {name!r} shape {list(have.shape)}, the graph "
                             f"{list(want.shape)}")
        scale = max(1.0, float(np.abs(want).max())) if want.size and want.dtype.kind == "f" else 1.0
        if not np.allclose(have, want, rtol=rtol, atol=rtol * scale):
            raise ValueError(f"the split model does not reproduce the graph: output {name!r} differs by "
                             f"{float(np.abs(have.astype(np.float64) - want).max()):.3g} (are the initial states "
                             "zeros?)")


def _chunks_equal_one_pass(model: ImportedModel) -> bool:
    """Whether the front and head work step by step: a sequence cut in two chunks (the core's state
    carried over) gives the outputs of one pass. Sessions need it."""
    spec = model.spec
    timed = [s for s in spec["inputs"] if s["time_axis"] is not None]
    if not timed or any(o["time_axis"] is None for o in spec["outputs"]):
        return False
    row = model.rows(_probe(spec, _sizes(spec, batch=1, other=12), np.random.default_rng(2)))[0]

    def cut(a, b):
        return {name: np.take(v, range(a, b), axis=s["time_axis"]) if s["time_axis"] is not None else v
                for s in spec["inputs"] for name, v in [(s["name"], row[s["name"]])]}

    steps = row[timed[0]["name"]].shape[timed[0]["time_axis"]]
    half = steps // 2
    try:
        frames = [model.frames_of(cut(0, half)), model.frames_of(cut(half, steps))]
        whole_frames = model.frames_of(row)
    except Exception:  # noqa: BLE001 (a front that cannot take short chunks cannot stream)
        return False
    if sum(len(f) for f in frames) != len(whole_frames) or not np.allclose(np.concatenate(frames), whole_frames,
                                                                             rtol=1e-5, atol=1e-6):
        return False
    state = None
    outs = []
    for chunk, f in zip((cut(0, half), cut(half, steps)), frames):
        ys, state = model.rnn.forward(f[:, None], state)
        outs.append(model.result_of(chunk, ys[:, 0], [tuple(s[0] for s in st) for st in state]))
    whole = model.forward(row)
    for o in spec["outputs"]:
        joined = np.concatenate([x[o["name"]] for x in outs], axis=o["time_axis"])
        if joined.shape != whole[o["name"]].shape or not np.allclose(joined, whole[o["name"]], rtol=1e-4, atol=1e-5):
            return False
    return True
