"""Composite models against torch, torch import, and the file format."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from cellserve import models
from cellserve.interop.torch_import import rnn_from_torch
from cellserve.models import RNN, Classifier, LanguageModel, Seq2Seq, TreeLSTM, tree_levels
from cellserve.models.torch_reference import TorchChildSumTreeLSTM
from conftest import assert_close


@settings(max_examples=25, deadline=None)
@given(st.sampled_from([torch.nn.LSTM, torch.nn.GRU]), st.integers(1, 24), st.integers(1, 24), st.integers(1, 3),
       st.booleans(), st.booleans(), st.integers(1, 6), st.integers(1, 8), st.integers(0, 2**16))
def test_stacked_rnn_matches_torch(module, in_size, hidden, layers, bidirectional, bias, b, steps, seed):
    torch.manual_seed(seed)
    ref = module(in_size, hidden, num_layers=layers, bidirectional=bidirectional, bias=bias)
    rnn = rnn_from_torch(ref)
    assert (rnn.num_layers, rnn.bidirectional, rnn.hidden_size) == (layers, bidirectional, hidden)
    xs = np.random.default_rng(seed).standard_normal((steps, b, in_size)).astype(np.float32)
    ys, finals = rnn.forward(xs)
    ref_ys, ref_h = ref(torch.from_numpy(xs))
    if isinstance(ref_h, tuple):
        ref_h = ref_h[0]
    assert_close(ys, ref_ys)
    assert_close(np.stack([s[0] for s in finals]), ref_h)


@pytest.mark.parametrize("module", [torch.nn.LSTMCell, torch.nn.GRUCell])
def test_import_single_cell_module_and_plain_state_dict(module, rng):
    torch.manual_seed(0)
    ref = module(5, 7)
    rnn = rnn_from_torch({k: v.numpy() for k, v in ref.state_dict().items()})
    x = rng.standard_normal((3, 5)).astype(np.float32)
    y, _ = rnn.step(x, rnn.zero_state(3))
    out = ref(torch.from_numpy(x))
    assert_close(y, out[0] if isinstance(out, tuple) else out)


def test_import_rejects_projection_and_wrong_kind():
    with pytest.raises(ValueError, match="proj"):
        rnn_from_torch(torch.nn.LSTM(4, 6, proj_size=3))
    with pytest.raises(ValueError, match="not a gru"):
        rnn_from_torch(torch.nn.LSTM(4, 6), kind="gru")


def test_rnn_step_equals_forward(rng):
    rnn = RNN.random("gru", 6, 10, num_layers=3, seed=3)
    xs = rng.standard_normal((5, 2, 6)).astype(np.float32)
    ys, _ = rnn.forward(xs)
    state = rnn.zero_state(2)
    for t in range(5):
        y, state = rnn.step(xs[t], state)
        assert_close(y, ys[t], rtol=1e-5, atol=1e-6)


class TorchLM(torch.nn.Module):
    def __init__(self, model: LanguageModel):
        super().__init__()
        self.emb = torch.nn.Embedding.from_pretrained(torch.from_numpy(model.embedding.table))
        cfg = model.rnn.config()
        self.rnn = torch.nn.LSTM(cfg["input_size"], cfg["hidden_size"], cfg["num_layers"])
        for l, (cell,) in enumerate(model.rnn.layers):
            getattr(self.rnn, f"weight_ih_l{l}").data = torch.from_numpy(cell.ih.weight)
            getattr(self.rnn, f"weight_hh_l{l}").data = torch.from_numpy(cell.hh.weight)
            getattr(self.rnn, f"bias_ih_l{l}").data = torch.from_numpy(cell.bias)
            getattr(self.rnn, f"bias_hh_l{l}").data.zero_()
        self.head = torch.nn.Linear(model.head.in_features, model.head.out_features)
        self.head.weight.data = torch.from_numpy(model.head.w.weight)
        self.head.bias.data = torch.from_numpy(model.head.bias)

    def forward(self, tokens):
        return self.head(self.rnn(self.emb(tokens))[0])


def test_language_model_matches_torch(rng):
    lm = LanguageModel.random(vocab_size=50, embed_size=12, hidden_size=16, num_layers=2, seed=4)
    tokens = rng.integers(0, 50, (9, 3))
    assert_close(lm.forward(tokens), TorchLM(lm)(torch.from_numpy(tokens)))
    logp = torch.log_softmax(TorchLM(lm)(torch.from_numpy(tokens[:-1, :1])), -1)[:, 0].detach()
    assert lm.score(tokens[:, 0]) == pytest.approx(float(logp[range(8), tokens[1:, 0]].sum()), rel=1e-4)


def test_bidirectional_classifier_uses_both_directions(rng):
    torch.manual_seed(0)
    ref = torch.nn.GRU(8, 10, bidirectional=True)
    clf = Classifier.random(30, 8, 10, num_classes=4, bidirectional=True, cell="gru")
    clf.rnn = rnn_from_torch(ref)
    tokens = rng.integers(0, 30, (7, 2))
    ys, _ = ref(torch.from_numpy(clf.embedding(tokens)))
    feats = torch.cat([ys[-1, :, :10], ys[0, :, 10:]], -1).detach().numpy()
    assert_close(clf.forward(tokens), feats @ clf.head.w.weight.T + clf.head.bias)


def test_embedding_rejects_out_of_range_tokens():
    lm = LanguageModel.random(vocab_size=10, embed_size=4, hidden_size=4, num_layers=1)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        lm.forward(np.array([[3], [10]]))


def test_seq2seq_greedy_matches_torch_reference(rng):
    model = Seq2Seq.random(src_vocab=20, tgt_vocab=15, embed_size=8, hidden_size=12, num_layers=2, seed=5)
    src = rng.integers(0, 20, 6)
    t_enc = torch.nn.LSTM(8, 12, 2)
    t_dec = torch.nn.LSTM(8, 12, 2)
    for rnn, tmod in ((model.encoder, t_enc), (model.decoder, t_dec)):
        for l, (cell,) in enumerate(rnn.layers):
            getattr(tmod, f"weight_ih_l{l}").data = torch.from_numpy(cell.ih.weight)
            getattr(tmod, f"weight_hh_l{l}").data = torch.from_numpy(cell.hh.weight)
            getattr(tmod, f"bias_ih_l{l}").data = torch.from_numpy(cell.bias)
            getattr(tmod, f"bias_hh_l{l}").data.zero_()
    _, state = t_enc(torch.from_numpy(model.src_embedding(src[:, None])))
    token, expected = model.bos_id, []
    for _ in range(10):
        y, state = t_dec(torch.from_numpy(model.tgt_embedding(np.array([[token]]))), state)
        token = int((y[0, 0].detach().numpy() @ model.head.w.weight.T + model.head.bias).argmax())
        expected.append(token)
    assert model.translate(src, max_len=10, stop_at_eos=False) == expected


def test_treelstm_model_matches_reference(rng):
    model = TreeLSTM.random(vocab_size=25, embed_size=6, hidden_size=9, num_classes=3, seed=2)
    parents = [-1, 0, 0, 1, 1, 1, 2, 6]
    tokens = rng.integers(0, 25, len(parents))
    ref = TorchChildSumTreeLSTM(6, 9)
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in model.cell.tensors().items()})
    h, _ = model.node_states(tokens, parents)
    assert_close(h, ref(torch.from_numpy(model.embedding(tokens)), parents))


@pytest.mark.parametrize("parents", [[0], [-1, -1], [-1, 5], [-1, 2, 1], []])
def test_tree_levels_rejects_non_trees(parents):
    with pytest.raises(ValueError):
        tree_levels(parents)


@pytest.mark.parametrize("make", [
    lambda: RNN.random("sru", 5, 8, num_layers=2, bidirectional=True, activation="identity"),
    lambda: RNN.random("qrnn", 5, 8, num_layers=2, window=2),
    lambda: LanguageModel.random(30, 6, 8, cell="gru"),
    lambda: Classifier.random(30, 6, 8, num_classes=3, bidirectional=True),
    lambda: Seq2Seq.random(20, 21, 6, 8),
    lambda: TreeLSTM.random(20, 6, 8),
])
def test_save_load_round_trip(make, tmp_path):
    model = make()
    loaded = models.load(models.save(model, tmp_path / "m.safetensors"))
    assert type(loaded) is type(model) and loaded.config() == model.config()
    for name, value in model.tensors().items():
        np.testing.assert_array_equal(loaded.tensors()[name], value)


def test_load_rejects_foreign_file(tmp_path):
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(3, np.float32)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="not a cellserve model"):
        models.load(tmp_path / "x.safetensors")
