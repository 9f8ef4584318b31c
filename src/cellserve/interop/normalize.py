"""Graph normalization: what exporters really emit, rewritten into the plain form the split expects.

  controls   scalar "control" inputs (Silero's `sr`) fixed to a value: they become constants, so a graph
             that serves two sample rates is specialized to one (a model config names the value).
  shapes     every input's batch axis is named `batch` (the first symbolic or unnamed axis, or the one a
             declared shape marks -1), and declared sizes (a chunk of 576 samples) are written in, so the
             graph is probed and split on requests of the form it will serve.
  If         an `If` whose condition depends only on constants, controls, ranks and sizes is replaced by the
             branch it takes; nested ones follow, level by level. The condition is found by running the graph
             on probe inputs at two batch sizes; one that differs between them, or that reads an input's
             values, is refused, naming the node.
  constants  `Constant` nodes and every node computed from constants alone (weights sliced and
             concatenated into gate order, shapes built from fixed numbers) are folded into initializers.
  cells      an LSTM or GRU cell written in primitive operators (what torch's nn.LSTMCell and nn.GRUCell
             or an op-set-18 re-export emit: MatMul/Gemm (+ Add), Split into gates, Sigmoid/Tanh, Mul/Add/Sub)
             becomes one ONNX LSTM or GRU operator of one step, which the split then takes as the core.
  convs      a 1-D Conv over an input of fixed length becomes its columns (Slices of the input) times the
             weights as one MatMul over every row and position of the batch. ONNX Runtime runs Conv one batch
             row at a time, a GEMM with as many columns as output positions (4 for a Silero chunk); the
             MatMul has rows x positions. Measured on Silero VAD's front at 192 rows, 1 thread: the STFT conv
             20.4 -> 11.4 us a row, the first encoder conv 17.5 -> 8.4.

The result computes what the original computes on requests of the probed form (the caller checks it
against ONNX Runtime on the original graph).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from cellserve.cells.onnxruntime import ort_session

NUMPY_OF = {TensorProto.FLOAT: np.float32, TensorProto.DOUBLE: np.float64, TensorProto.FLOAT16: np.float16,
            TensorProto.INT64: np.int64, TensorProto.INT32: np.int32, TensorProto.INT8: np.int8,
            TensorProto.UINT8: np.uint8, TensorProto.BOOL: np.bool_}


def normalize(model: onnx.ModelProto, controls: dict[str, float] | None = None,
              shapes: dict[str, list[int]] | None = None, batch_sizes: tuple[int, int] = (1, 3)) -> onnx.ModelProto:
    """The graph with its controls fixed, its input shapes named, its decidable Ifs inlined and its
    constants folded. shapes: an input's full shape, -1 on its batch axis. ValueError names what does
    not fit."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    fix_controls(model, controls or {})
    name_shapes(model, shapes or {})
    fold_constants(model)
    while inline_ifs(model, batch_sizes):
        fold_constants(model)
    if not any(n.op_type in ("LSTM", "GRU") for n in model.graph.node):
        fuse_cells(model)
    convs_to_matmuls(model)
    return model


def convs_to_matmuls(model: onnx.ModelProto) -> int:
    """Rewrite every 1-D Conv (one group, no dilation, explicit pads, constant weights, input of known
    channels and length) as Pad, columns and MatMul (module docstring); how many were rewritten."""
    graph = model.graph
    inferred = onnx.shape_inference.infer_shapes(model)
    lengths = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
               for v in [*inferred.graph.value_info, *inferred.graph.input]}
    constants = _constants(graph)
    nodes, done = [], 0
    for node in graph.node:
        rewritten = _conv_as_matmul(node, lengths, constants, f"{node.name or node.output[0]}/columns")
        if rewritten is None:
            nodes.append(node)
            continue
        new_nodes, initializers = rewritten
        nodes.extend(new_nodes)
        graph.initializer.extend(initializers)
        done += 1
    if done:
        del graph.node[:]
        graph.node.extend(nodes)
        _drop_unused(graph)
    return done


def _conv_as_matmul(node: onnx.NodeProto, shapes: dict, constants: dict, prefix: str):
    """(nodes, initializers) computing `node`, a Conv on [B, C, L], as y = columns(x) @ W: x laid out
    [B, L, C] and cut into [B, T, K * C] (K // w Slices of w positions: w = stride where it divides the
    kernel and the length, so a Silero STFT frame is 2 Slices, not 256), times W [K * C, O], plus the
    bias, back to [B, O, T]. None where it does not apply."""
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    weight = constants.get(node.input[1])
    bias = constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    shape = shapes.get(node.input[0])
    if (weight is None or weight.ndim != 3 or weight.dtype != np.float32 or shape is None or len(shape) != 3
            or shape[1] != weight.shape[1] or shape[2] is None or attrs.get("group", 1) != 1
            or any(d != 1 for d in attrs.get("dilations", [1])) or attrs.get("auto_pad", b"NOTSET") != b"NOTSET"
            or len(node.input) > 2 and node.input[2] and bias is None):
        return None
    out_channels, channels, kernel = weight.shape
    stride = attrs.get("strides", [1])[0]
    pad_begin, pad_end = attrs.get("pads", [0, 0])
    length = shape[2] + pad_begin + pad_end
    positions = (length - kernel) // stride + 1
    if positions < 1:
        return None
    width = stride if kernel % stride == 0 and length % stride == 0 else 1
    names = iter(f"{prefix}/{i}" for i in range(10**6))
    nodes, inits = [], []

    def const(value, dtype=np.int64) -> str:
        name = next(names)
        inits.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    source = node.input[0]
    if pad_begin or pad_end:
        nodes.append(helper.make_node("Pad", [source, const([0, 0, pad_begin, 0, 0, pad_end])], [padded := next(names)]))
        source = padded
    nodes.append(helper.make_node("Transpose", [source], [by_position := next(names)], perm=[0, 2, 1]))  # [B, L, C]
    nodes.append(helper.make_node("Reshape", [by_position, const([0, length // width, width * channels])],
                                  [blocks := next(names)]))
    step = stride // width
    pieces = []
    for j in range(kernel // width):  # piece j: blocks j, j + step, ... (one per output position)
        nodes.append(helper.make_node("Slice", [blocks, const([j]), const([j + step * (positions - 1) + 1]), const([1]),
                                                const([step])], [piece := next(names)]))
        pieces.append(piece)
    if len(pieces) > 1:
        nodes.append(helper.make_node("Concat", pieces, [rows := next(names)], axis=2))  # [B, T, K * C]
    else:
        rows = pieces[0]
    product = next(names)
    columns = weight.transpose(2, 1, 0).reshape(kernel * channels, out_channels)  # row k * C + c
    nodes.append(helper.make_node("MatMul", [rows, const(columns, np.float32)], [product]))
    if bias is not None:
        nodes.append(helper.make_node("Add", [product, const(bias, np.float32)], [biased := next(names)]))
        product = biased
    nodes.append(helper.make_node("Transpose", [product], [node.output[0]], perm=[0, 2, 1]))
    return nodes, inits


def name_shapes(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> None:
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    inputs = {i.name for i in graph.input if i.name not in initializers}
    for name in set(shapes) - inputs:
        raise ValueError(f"a shape is declared for {name!r}, which is not an input of the graph ({sorted(inputs)})")
    for info in graph.input:
        if info.name in initializers:
            continue
        dims = info.type.tensor_type.shape.dim
        declared = shapes.get(info.name)
        if declared is not None and len(declared) != len(dims):
            raise ValueError(f"input {info.name!r} has {len(dims)} axes; its declared shape {declared} has "
                             f"{len(declared)}")
        if declared is None and all(d.dim_value or d.dim_param for d in dims):
            continue  # named axes stay as they are
        batch = declared.index(-1) if declared and -1 in declared else next(
            (a for a, d in enumerate(dims) if not d.dim_value and not d.dim_param), None)
        for axis, d in enumerate(dims):
            if axis == batch:
                d.dim_param = "batch"
            elif declared is not None:
                d.dim_value = declared[axis]
            elif not d.dim_value and not d.dim_param:
                raise ValueError(f"input {info.name!r} has an unnamed size on axis {axis}: declare its shape in the "
                                 "model config (input_shapes, or dims in config.pbtxt)")


def fix_controls(model: onnx.ModelProto, controls: dict[str, float]) -> None:
    graph = model.graph
    inputs = {i.name: i for i in graph.input}
    for name, value in controls.items():
        if name not in inputs:
            raise ValueError(f"control input {name!r} is not an input of the graph (it has {sorted(inputs)})")
        info = inputs[name]
        t = info.type.tensor_type
        if len(t.shape.dim) > 1 or (t.shape.dim and t.shape.dim[0].dim_value not in (0, 1)):
            raise ValueError(f"control input {name!r} must be a scalar (or of one element)")
        dtype = NUMPY_OF.get(t.elem_type)
        if dtype is None:
            raise ValueError(f"control input {name!r} has a type cellserve cannot fix")
        shape = [1] if t.shape.dim else []
        graph.initializer.append(numpy_helper.from_array(np.array(value, dtype=dtype).reshape(shape), name))
        graph.input.remove(info)


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in graph.initializer}


def fold_constants(model: onnx.ModelProto) -> None:
    """Evaluate every node whose inputs are all constants (and that holds no subgraph) into initializers."""
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    known = _constants(graph)
    outputs = {o.name for o in graph.output}
    keep = []
    for node in graph.node:
        inputs = [n for n in node.input if n]
        foldable = (all(n in known for n in inputs) and node.op_type not in ("If", "Loop", "Scan")
                    and not any(a.type == onnx.AttributeProto.GRAPH for a in node.attribute)
                    and node.domain in ("", "ai.onnx") and not any(o in outputs for o in node.output))
        if not foldable:
            keep.append(node)
            continue
        try:
            values = ReferenceEvaluator(node).run(None, {n: known[n] for n in inputs})
        except Exception:  # noqa: BLE001 (an operator the reference cannot run: left to ONNX Runtime)
            keep.append(node)
            continue
        for name, value in zip(node.output, values):
            if name:
                known[name] = np.asarray(value)
                graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    del graph.node[:]
    graph.node.extend(keep)
    _drop_unused(graph)


def _drop_unused(graph: onnx.GraphProto) -> None:
    """Remove nodes and initializers nothing reads (outer names read inside subgraphs count)."""
    needed = {o.name for o in graph.output}
    alive = []
    for node in reversed(list(graph.node)):
        if any(o in needed for o in node.output if o):
            alive.append(node)
            needed.update(_reads(node))
    alive.reverse()
    del graph.node[:]
    graph.node.extend(alive)
    inits = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)


def _reads(node: onnx.NodeProto) -> set[str]:
    """Every name a node reads, its subgraphs' reads of outer names included."""
    names = {n for n in node.input if n}
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            inner = {o for n in attr.g.node for o in n.output} | {i.name for i in attr.g.initializer} | \
                    {i.name for i in attr.g.input}
            for n in attr.g.node:
                names |= {r for r in _reads(n) if r not in inner}
            names |= {o.name for o in attr.g.output if o.name not in inner}
    return names


def probe_inputs(graph: onnx.GraphProto, batch: int, seed: int = 0, other: int = 7) -> dict[str, np.ndarray]:
    """Random inputs for a probe: `batch` on the axes named batch, `other` on other symbolic axes."""
    rng = np.random.default_rng(seed)
    feeds = {}
    initializers = {i.name for i in graph.initializer}
    for info in graph.input:
        if info.name in initializers:
            continue
        t = info.type.tensor_type
        shape = [d.dim_value or (batch if d.dim_param == "batch" else other) for d in t.shape.dim]
        dtype = NUMPY_OF.get(t.elem_type, np.float32)
        if np.issubdtype(dtype, np.floating):
            feeds[info.name] = (rng.standard_normal(shape) * 0.1).astype(dtype)
        else:
            feeds[info.name] = np.zeros(shape, dtype)
    return feeds


def inline_ifs(model: onnx.ModelProto, batch_sizes: tuple[int, int]) -> bool:
    """Replace each top-level If whose condition is decided by the branch it takes; returns whether any was."""
    graph = model.graph
    ifs = [n for n in graph.node if n.op_type == "If"]
    if not ifs:
        return False
    producer = {o: n for n in graph.node for o in n.output}
    initializers = {i.name for i in graph.initializer}
    inputs = {i.name for i in graph.input if i.name not in initializers}
    for node in ifs:
        read = upstream(node.input[0], producer, inputs, values_only=True)
        if read:
            raise ValueError(f"If node {node.name!r} branches on the value of input(s) {sorted(read)}: fix them in the "
                             "model config's controls (e.g. {\"sr\": 16000}) so the graph can be specialized")
    probe = onnx.ModelProto.FromString(model.SerializeToString())
    existing = {o.name for o in probe.graph.output}
    for node in ifs:
        if node.input[0] not in existing:
            probe.graph.output.append(helper.make_tensor_value_info(node.input[0], TensorProto.BOOL, None))
    names = [node.input[0] for node in ifs]
    seen = []
    for batch in batch_sizes:
        feeds = probe_inputs(probe.graph, batch, seed=batch)
        try:
            values = ort_session(probe).run(names, feeds)
        except Exception as exc:  # noqa: BLE001 (ONNX Runtime raises its own types)
            raise ValueError(f"ONNX Runtime cannot run the graph on probe inputs ({exc}); declare the inputs' "
                             "shapes in the model config (input_shapes)")
        seen.append([bool(np.asarray(v).reshape(-1)[0]) for v in values])
    changed = False
    for i, node in enumerate(ifs):
        decided = {s[i] for s in seen}
        if len(decided) > 1:
            raise ValueError(f"If node {node.name!r} takes different branches at batch sizes {batch_sizes}: "
                             "its condition depends on the request, which cellserve cannot specialize")
        taken = "then_branch" if decided.pop() else "else_branch"
        branch = next(a.g for a in node.attribute if a.name == taken)
        _inline(graph, node, branch)
        changed = True
    return changed


def upstream(name: str, producer: dict, stops: set[str], values_only: bool = False) -> set[str]:
    """The names in `stops` that `name` is computed from (not looking past them). values_only: what reaches
    them only through Shape or Size (their sizes, not their values) does not count."""
    found, seen, todo = set(), set(), [name]
    while todo:
        tensor = todo.pop()
        if tensor in seen:
            continue
        seen.add(tensor)
        if tensor in stops:
            found.add(tensor)
        elif tensor in producer and not (values_only and producer[tensor].op_type in ("Shape", "Size")):
            todo.extend(_reads(producer[tensor]))
    return found


def _inline(graph: onnx.GraphProto, node: onnx.NodeProto, branch: onnx.GraphProto) -> None:
    """Put a branch's nodes where the If node was, then an Identity from each branch output to the If's
    output of the same place (names inside the branch stay, so nested subgraphs still find them)."""
    position = list(graph.node).index(node)
    nodes = list(branch.node) + [helper.make_node("Identity", [b.name], [o])
                                 for b, o in zip(branch.output, node.output)]
    graph.initializer.extend(branch.initializer)
    del graph.node[position]
    for k, new in enumerate(nodes):
        graph.node.insert(position + k, new)


# ------------------------------------------------------------------------------------------------- cells

def fuse_cells(model: onnx.ModelProto) -> int:
    """Replace each LSTM or GRU cell written in primitive operators by an ONNX operator of one step;
    returns how many. Cells are recognized from their output side:
      LSTM  h' = o * tanh(c'), c' = f * c + i * g, the gates sigmoid(i, f, o) and tanh(g) of four even
            splits of one pre-activation x W_ih^T + h W_hh^T (+ b);
      GRU   h' = n + z * (h - n), n = tanh(i_n + r * h_n), r and z sigmoids of i_r + h_r and i_z + h_z,
            the i_* and h_* three even splits of x W_ih^T + b_ih and h W_hh^T + b_hh (torch's GRUCell,
            ONNX's GRU with linear_before_reset=1)."""
    graph = model.graph
    constants = _constants(graph)
    producer = {o: n for n in graph.node for o in n.output}
    count = 0
    for node in list(graph.node):
        cell = _match_lstm_cell(node, producer, constants) or _match_gru_cell(node, producer, constants)
        if cell is None:
            continue
        _replace_cell(graph, cell, f"cellserve_{cell['kind']}_{count}")
        count += 1
    if count:
        nodes = _topological_order(graph)
        del graph.node[:]
        graph.node.extend(nodes)
        _drop_unused(graph)
    return count


def _topological_order(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The graph's nodes with every node after its producers (the new cell operators were appended).
    Iterative, so a long chain cannot exhaust the stack; nodes are held by position in one list."""
    nodes = list(graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    placed, order = [False] * len(nodes), []
    for root in range(len(nodes)):
        stack = [(root, False)]
        while stack:
            i, expanded = stack.pop()
            if placed[i]:
                continue
            if expanded:
                placed[i] = True
                order.append(nodes[i])
                continue
            stack.append((i, True))
            stack.extend((producer[name], False) for name in _reads(nodes[i])
                         if name in producer and not placed[producer[name]])
    return order


def _op(producer: dict, name: str, *ops: str):
    node = producer.get(name)
    return node if node is not None and node.op_type in ops else None


def _match_lstm_cell(mul: onnx.NodeProto, producer: dict, constants: dict) -> dict | None:
    if mul.op_type != "Mul" or len(mul.input) != 2:
        return None
    for o_name, t_name in (mul.input, reversed(mul.input)):
        o_gate, tanh_c = _op(producer, o_name, "Sigmoid"), _op(producer, t_name, "Tanh")
        add_c = tanh_c and _op(producer, tanh_c.input[0], "Add")
        if not (o_gate and add_c):
            continue
        terms = [_op(producer, n, "Mul") for n in add_c.input]
        if not all(terms):
            continue
        roles = {}
        for term in terms:  # f * c_prev and i * g, in either order
            a, b = term.input
            if _op(producer, a, "Tanh") or _op(producer, b, "Tanh"):
                g, i = (a, b) if _op(producer, a, "Tanh") else (b, a)
                roles["g"], roles["i"] = producer[g], _op(producer, i, "Sigmoid")
            else:
                f, c = (a, b) if _op(producer, a, "Sigmoid") else (b, a)
                roles["f"], roles["c_prev"] = _op(producer, f, "Sigmoid"), c
        if set(roles) != {"g", "i", "f", "c_prev"} or not roles["i"] or not roles["f"]:
            continue
        gates = {"i": roles["i"].input[0], "f": roles["f"].input[0], "g": roles["g"].input[0], "o": o_gate.input[0]}
        split = _gate_split(gates, producer, constants)
        if split is None:
            continue
        pre, index = split
        products = _products(pre, producer, constants)
        if products is None:
            continue
        return {"kind": "lstm", "h_node": mul, "c_node": add_c, "c_reader": tanh_c, "c_prev": roles["c_prev"],
                "gates": index, "products": products}
    return None


def _match_gru_cell(add: onnx.NodeProto, producer: dict, constants: dict) -> dict | None:
    if add.op_type != "Add" or len(add.input) != 2:
        return None
    for n_name, m_name in (add.input, reversed(add.input)):
        tanh_n, mul = _op(producer, n_name, "Tanh"), _op(producer, m_name, "Mul")
        if not (tanh_n and mul):
            continue
        sub = next((producer[i] for i in mul.input if _op(producer, i, "Sub")), None)
        z_gate = next((producer[i] for i in mul.input if _op(producer, i, "Sigmoid")), None)
        if sub is None or z_gate is None or sub.input[1] != n_name:
            continue
        h_prev = sub.input[0]
        pre_n = _op(producer, tanh_n.input[0], "Add")
        z_sum = _op(producer, z_gate.input[0], "Add")
        if pre_n is None or z_sum is None:
            continue
        r_mul = next((producer[i] for i in pre_n.input if _op(producer, i, "Mul")), None)
        i_n = next((i for i in pre_n.input if not _op(producer, i, "Mul")), None)
        if r_mul is None or i_n is None:
            continue
        r_gate = next((producer[i] for i in r_mul.input if _op(producer, i, "Sigmoid")), None)
        h_n = next((i for i in r_mul.input if not _op(producer, i, "Sigmoid")), None)
        r_sum = r_gate and _op(producer, r_gate.input[0], "Add")
        if r_sum is None or h_n is None:
            continue
        splits = {}
        for gate, pair in (("r", r_sum.input), ("z", z_sum.input)):
            for name in pair:
                node = _op(producer, name, "Split")
                if node is None:
                    break
                splits.setdefault(id(node), (node, {}))[1][gate] = list(node.output).index(name)
        for gate, name in (("n", i_n), ("n", h_n)):
            node = _op(producer, name, "Split")
            if node is not None:
                splits.setdefault(id(node), (node, {}))[1][gate] = list(node.output).index(name)
        if len(splits) != 2 or any(len(index) != 3 or len(node.output) != 3 for node, index in splits.values()):
            continue
        if any(not _even_split(node, constants) for node, _ in splits.values()):
            continue
        (node_a, index_a), (node_b, index_b) = splits.values()
        products = [_product(node_a.input[0], producer, constants), _product(node_b.input[0], producer, constants)]
        if None in products:
            continue
        for product, index in zip(products, (index_a, index_b)):
            product["gates"] = index
        return {"kind": "gru", "h_node": add, "h_prev": h_prev, "products": products}
    return None


def _even_split(split: onnx.NodeProto, constants: dict) -> bool:
    """A Split into equal parts on the last axis (gates), by count or by equal constant sizes."""
    axis = next((helper.get_attribute_value(a) for a in split.attribute if a.name == "axis"), 0)
    if axis not in (1, -1):
        return False
    if len(split.input) > 1 and split.input[1]:
        sizes = constants.get(split.input[1])
        return sizes is not None and len(set(np.asarray(sizes).tolist())) == 1
    return True


def _gate_split(gates: dict[str, str], producer: dict, constants: dict) -> tuple[str, dict[str, int]] | None:
    """The one tensor the four gate pre-activations are cut from by an even Split, and each gate's part."""
    nodes = {g: producer.get(name) for g, name in gates.items()}
    if any(n is None or n.op_type != "Split" for n in nodes.values()) or len({id(n) for n in nodes.values()}) != 1:
        return None
    split = next(iter(nodes.values()))
    if len(split.output) != 4 or not _even_split(split, constants):
        return None
    return split.input[0], {g: list(split.output).index(gates[g]) for g in gates}


def _products(pre: str, producer: dict, constants: dict) -> list[dict] | None:
    """pre = a + b, each a product (see _product): two of them, or None."""
    add = _op(producer, pre, "Add")
    if add is None:
        return None
    out = [_product(name, producer, constants) for name in add.input]
    return None if None in out else out


def _product(name: str, producer: dict, constants: dict) -> dict | None:
    """name = x @ W^T (+ bias) by Gemm, or MatMul (+ Add), with constant weights: {"x", "w" (G*H, in),
    "b" (G*H,) or None}."""
    node = producer.get(name)
    out = []
    if node is not None:
        if node.op_type == "Gemm":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
                return None
            if node.input[1] not in constants:
                return None
            w = constants[node.input[1]]
            w = w if attrs.get("transB", 0) else w.T
            b = constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            if len(node.input) > 2 and node.input[2] and b is None:
                return None
            out.append({"x": node.input[0], "w": w, "b": b})
        elif node.op_type == "Add":  # MatMul + bias
            mm = next((producer.get(n) for n in node.input if _op(producer, n, "MatMul")), None)
            bias = next((constants.get(n) for n in node.input if n in constants), None)
            if mm is None or bias is None or mm.input[1] not in constants:
                return None
            out.append({"x": mm.input[0], "w": constants[mm.input[1]].T, "b": bias})
        elif node.op_type == "MatMul" and node.input[1] in constants:
            out.append({"x": node.input[0], "w": constants[node.input[1]].T, "b": None})
    return out[0] if out else None


def _replace_cell(graph: onnx.GraphProto, cell: dict, prefix: str) -> None:
    """An ONNX LSTM/GRU operator of one step that computes the cell's h' (and c') under their own names,
    so every reader outside the cell reads the operator's; the primitive nodes are left for _drop_unused."""
    producer = {o: n for n in graph.node for o in n.output}
    stops = {i.name for i in graph.input}
    lstm = cell["kind"] == "lstm"
    state = cell["c_prev"] if lstm else cell["h_prev"]
    state_inputs = upstream(state, producer, stops)
    first, second = cell["products"]
    gates = 4 if lstm else 3
    # the recurrent product: the one whose weight is square per gate (when the input size differs), else
    # the one reading the GRU's h_prev itself, else the one reading the same inputs as the LSTM's c_prev
    recurrent = [p for p in (first, second) if p["w"].shape[1] * gates == p["w"].shape[0]]
    if len(recurrent) != 1 and not lstm:
        recurrent = [p for p in (first, second) if p["x"] == cell["h_prev"]]
    if len(recurrent) != 1:
        recurrent = [p for p in (first, second) if upstream(p["x"], producer, stops) & state_inputs]
    if len(recurrent) != 1:
        raise ValueError(f"a {cell['kind'].upper()} cell (h = {cell['h_node'].output[0]!r}) whose input cannot be "
                         "told from its recurrent state")
    hh = recurrent[0]
    ih = second if hh is first else first
    hidden = hh["w"].shape[1]

    def reorder(a: np.ndarray, index: dict) -> np.ndarray:  # into ONNX gate order: LSTM [i, o, f, c], GRU [z, r, h]
        blocks = np.split(np.asarray(a, np.float32), gates, axis=0)
        return np.concatenate([blocks[index[g]] for g in (("i", "o", "f", "g") if lstm else ("z", "r", "n"))])

    index_ih = cell["gates"] if lstm else ih["gates"]
    index_hh = cell["gates"] if lstm else hh["gates"]
    zeros = np.zeros(gates * hidden, np.float32)
    w, r = reorder(ih["w"], index_ih)[None], reorder(hh["w"], index_hh)[None]
    b = np.concatenate([reorder(ih["b"] if ih["b"] is not None else zeros, index_ih),
                        reorder(hh["b"] if hh["b"] is not None else zeros, index_hh)])[None]
    names = {k: f"{prefix}_{k}" for k in ("W", "R", "B", "X", "h0", "c0", "Y", "Y_h", "Y_c", "axes")}
    for key, value in (("W", w), ("R", r), ("B", b), ("axes", np.array([0], np.int64))):
        graph.initializer.append(numpy_helper.from_array(value, names[key]))
    h_out = cell["h_node"].output[0]
    cell["h_node"].output[0] = h_out + "_primitive"
    nodes = [helper.make_node("Unsqueeze", [ih["x"], names["axes"]], [names["X"]])]
    if lstm:
        c_out = cell["c_node"].output[0]
        cell["c_node"].output[0] = cell["c_reader"].input[0] = c_out + "_primitive"
        nodes += [helper.make_node("Unsqueeze", [hh["x"], names["axes"]], [names["h0"]]),
                  helper.make_node("Unsqueeze", [cell["c_prev"], names["axes"]], [names["c0"]]),
                  helper.make_node("LSTM", [names["X"], names["W"], names["R"], names["B"], "", names["h0"],
                                            names["c0"]], [names["Y"], names["Y_h"], names["Y_c"]],
                                   hidden_size=hidden, name=prefix),
                  helper.make_node("Squeeze", [names["Y_c"], names["axes"]], [c_out])]
    else:
        nodes += [helper.make_node("Unsqueeze", [hh["x"], names["axes"]], [names["h0"]]),
                  helper.make_node("GRU", [names["X"], names["W"], names["R"], names["B"], "", names["h0"]],
                                   [names["Y"], names["Y_h"]], hidden_size=hidden, linear_before_reset=1, name=prefix)]
    nodes.append(helper.make_node("Squeeze", [names["Y_h"], names["axes"]], [h_out]))
    graph.node.extend(nodes)
