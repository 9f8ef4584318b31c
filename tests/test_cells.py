"""Every cell against a torch reference on random weights and inputs, over batch, length and sizes."""

import numpy as np
import torch
from hypothesis import given, settings, strategies as st

from cellserve.cells import ChildSumTreeLSTMCell, GRUCell, LSTMCell, QRNNCell, SRUCell
from cellserve.models.torch_reference import TorchChildSumTreeLSTM, TorchQRNN, TorchSRU
from conftest import assert_close

dims = st.integers(1, 40)
batch = st.integers(1, 12)
length = st.integers(1, 9)
SETTINGS = dict(max_examples=25, deadline=None)


def inputs(seed, steps, b, size):
    return np.random.default_rng(seed).standard_normal((steps, b, size)).astype(np.float32)


@settings(**SETTINGS)
@given(dims, dims, batch, length, st.integers(0, 2**16))
def test_lstm_cell_matches_torch_lstmcell(in_size, hidden, b, steps, seed):
    torch.manual_seed(seed)
    ref = torch.nn.LSTMCell(in_size, hidden)
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    cell = LSTMCell(sd["weight_ih"], sd["weight_hh"], sd["bias_ih"] + sd["bias_hh"])
    xs = inputs(seed, steps, b, in_size)
    h0 = np.random.default_rng(seed + 1).standard_normal((2, b, hidden)).astype(np.float32)
    state = (h0[0], h0[1])
    th, tc = torch.from_numpy(h0[0]), torch.from_numpy(h0[1])
    ys, final = cell.steps(xs, state)
    for t in range(steps):
        th, tc = ref(torch.from_numpy(xs[t]), (th, tc))
        assert_close(ys[t], th)
    assert_close(final[0], th)
    assert_close(final[1], tc)
    # one step at a time gives the same as the k-step call
    s = state
    for t in range(steps):
        s = cell.step(xs[t], s)
    assert_close(s[0], final[0], rtol=1e-5, atol=1e-6)


@settings(**SETTINGS)
@given(dims, dims, batch, length, st.integers(0, 2**16))
def test_gru_cell_matches_torch_grucell(in_size, hidden, b, steps, seed):
    torch.manual_seed(seed)
    ref = torch.nn.GRUCell(in_size, hidden)
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    cell = GRUCell(sd["weight_ih"], sd["weight_hh"], sd["bias_ih"], sd["bias_hh"])
    xs = inputs(seed, steps, b, in_size)
    h0 = np.random.default_rng(seed + 1).standard_normal((b, hidden)).astype(np.float32)
    ys, final = cell.steps(xs, (h0,))
    th = torch.from_numpy(h0)
    for t in range(steps):
        th = ref(torch.from_numpy(xs[t]), th)
        assert_close(ys[t], th)
    assert_close(final[0], th)


@settings(**SETTINGS)
@given(dims, dims, batch, length, st.sampled_from(["tanh", "identity"]), st.booleans(), st.integers(0, 2**16))
def test_sru_cell_matches_reference(in_size, hidden, b, steps, activation, same_size, seed):
    if same_size:
        in_size = hidden  # exercise the identity highway as well as the projected one
    torch.manual_seed(seed)
    ref = TorchSRU(in_size, hidden, activation)
    cell = SRUCell.from_tensors(in_size, hidden, ref.cell_tensors(), activation=activation)
    xs = inputs(seed, steps, b, in_size)
    c0 = np.random.default_rng(seed + 1).standard_normal((b, hidden)).astype(np.float32)
    ys, final = cell.steps(xs, (np.zeros_like(c0), c0))
    ref_h, ref_c = ref(torch.from_numpy(xs), torch.from_numpy(c0))
    assert_close(ys, ref_h)
    assert_close(final[1], ref_c)


@settings(**SETTINGS)
@given(dims, dims, batch, length, st.sampled_from([1, 2]), st.integers(0, 2**16))
def test_qrnn_cell_matches_reference(in_size, hidden, b, steps, window, seed):
    torch.manual_seed(seed)
    ref = TorchQRNN(in_size, hidden, window)
    cell = QRNNCell.from_tensors(in_size, hidden, ref.cell_tensors(), window=window)
    xs = inputs(seed, steps, b, in_size)
    ys, final = cell.steps(xs, cell.zero_state(b))
    ref_h, ref_c = ref(torch.from_numpy(xs))
    assert_close(ys, ref_h)
    assert_close(final[1], ref_c)


@settings(**SETTINGS)
@given(st.sampled_from(["sru", "qrnn1", "qrnn2"]), st.integers(2, 12), st.integers(1, 11), st.integers(0, 2**16))
def test_multistep_blocks_equal_single_steps(kind, steps, k, seed):
    """Cutting a stream into blocks of k steps gives the single-step result (relative 1e-5)."""
    rng = np.random.default_rng(seed)
    cell = SRUCell.random(16, 24, rng) if kind == "sru" else QRNNCell.random(16, 24, rng, window=int(kind[-1]))
    xs = rng.standard_normal((steps, 2, 16)).astype(np.float32)
    one, s1 = [], cell.zero_state(2)
    for t in range(steps):
        s1 = cell.step(xs[t], s1)
        one.append(s1[0])
    blocks, s2 = [], cell.zero_state(2)
    for start in range(0, steps, k):
        ys, s2 = cell.steps(xs[start:start + k], s2)
        blocks.append(ys)
    np.testing.assert_allclose(np.concatenate(blocks), np.stack(one), rtol=1e-5, atol=1e-6)


@settings(**SETTINGS)
@given(st.integers(1, 12), dims, dims, st.integers(0, 2**16))
def test_child_sum_treelstm_matches_reference(nodes, in_size, hidden, seed):
    from cellserve.models.tree import tree_levels

    rng = np.random.default_rng(seed)
    parents = [-1] + [int(rng.integers(0, i)) for i in range(1, nodes)]
    torch.manual_seed(seed)
    ref = TorchChildSumTreeLSTM(in_size, hidden)
    cell = ChildSumTreeLSTMCell.from_tensors(in_size, hidden, ref.cell_tensors())
    x = rng.standard_normal((nodes, in_size)).astype(np.float32)
    h = np.zeros((nodes, hidden), np.float32)
    c = np.zeros_like(h)
    par = np.array(parents)
    for level, idx in enumerate(tree_levels(parents)):
        kids = np.flatnonzero(np.isin(par, idx))
        row = {node: r for r, node in enumerate(idx)}
        if level == 0:
            h[idx], c[idx] = cell.nodes(x[idx])
        else:
            h[idx], c[idx] = cell.nodes(x[idx], h[kids], c[kids], [row[p] for p in par[kids]])
    assert_close(h, ref(torch.from_numpy(x), parents))
