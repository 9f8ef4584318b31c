"""Encoder-decoder with greedy decoding: the decoder starts from the encoder's final states."""

from __future__ import annotations

import numpy as np

from cellserve.cells import State
from cellserve.models.layers import Embedding, Linear, random_embedding
from cellserve.models.rnn import RNN, prefixed, unprefixed


class Seq2Seq:
    arch = "seq2seq"

    def __init__(self, src_embedding: Embedding, encoder: RNN, tgt_embedding: Embedding, decoder: RNN,
                 head: Linear, bos_id: int = 1, eos_id: int = 2):
        if encoder.bidirectional or decoder.bidirectional:
            raise ValueError("seq2seq here uses unidirectional encoder and decoder")
        if (encoder.cell_kind, encoder.num_layers, encoder.hidden_size) != (
                decoder.cell_kind, decoder.num_layers, decoder.hidden_size):
            raise ValueError("encoder and decoder must share cell type, layers and hidden size")
        self.src_embedding, self.encoder = src_embedding, encoder
        self.tgt_embedding, self.decoder, self.head = tgt_embedding, decoder, head
        self.bos_id, self.eos_id = int(bos_id), int(eos_id)

    def encode(self, src: np.ndarray) -> list[State]:
        """src (T, B) token ids -> encoder final states, the decoder's initial states."""
        _, states = self.encoder.forward(self.src_embedding(src))
        return states

    def decode_step(self, prev_tokens: np.ndarray, states: list[State]) -> tuple[np.ndarray, list[State]]:
        """One greedy step for a batch: previous tokens (B,) -> (next tokens (B,), states)."""
        h, states = self.decoder.step(self.tgt_embedding(prev_tokens), states)
        return self.head(h).argmax(axis=-1), states

    def translate(self, src, max_len: int, stop_at_eos: bool = True) -> list[int]:
        """Greedy decoding of one source sequence, up to max_len tokens (EOS included when produced)."""
        states = self.encode(np.asarray(src)[:, None])
        token = np.array([self.bos_id])
        out: list[int] = []
        for _ in range(max_len):
            token, states = self.decode_step(token, states)
            out.append(int(token[0]))
            if stop_at_eos and out[-1] == self.eos_id:
                break
        return out

    def config(self) -> dict:
        return {"arch": self.arch, "src_vocab_size": self.src_embedding.vocab_size,
                "tgt_vocab_size": self.tgt_embedding.vocab_size, "encoder": self.encoder.config(),
                "decoder": self.decoder.config(), "bos_id": self.bos_id, "eos_id": self.eos_id}

    def tensors(self) -> dict:
        return {**prefixed("src_embedding", self.src_embedding.tensors()),
                **prefixed("encoder", self.encoder.tensors()),
                **prefixed("tgt_embedding", self.tgt_embedding.tensors()),
                **prefixed("decoder", self.decoder.tensors()), **prefixed("head", self.head.tensors())}

    @classmethod
    def from_tensors(cls, config, tensors):
        return cls(Embedding(tensors["src_embedding.table"]),
                   RNN.from_tensors(config["encoder"], unprefixed("encoder", tensors)),
                   Embedding(tensors["tgt_embedding.table"]),
                   RNN.from_tensors(config["decoder"], unprefixed("decoder", tensors)),
                   Linear.from_tensors(unprefixed("head", tensors)), config["bos_id"], config["eos_id"])

    @classmethod
    def random(cls, src_vocab: int, tgt_vocab: int, embed_size: int, hidden_size: int, num_layers: int = 2,
               cell: str = "lstm", seed: int = 0) -> "Seq2Seq":
        rng = np.random.default_rng(seed)
        return cls(random_embedding(src_vocab, embed_size, rng),
                   RNN.random(cell, embed_size, hidden_size, num_layers, seed=seed + 1),
                   random_embedding(tgt_vocab, embed_size, rng),
                   RNN.random(cell, embed_size, hidden_size, num_layers, seed=seed + 2),
                   Linear.random(hidden_size, tgt_vocab, rng))
