"""The sequence-to-sequence family (the number speller is one): source tokens (or text, through a text
codec) in, greedily decoded target tokens (and text) out. Encoder and decoder steps are two stages,
batched apart."""

from __future__ import annotations

import time

import numpy as np

from cellserve.engine.batch import Stage, layer_state_names, layer_state_widths, stack_steps
from cellserve.engine.pool import Arena
from cellserve.engine.runner import ADMITTED, SequenceRunner, pad_rows, token_array
from cellserve.engine.steploop import GENERATE, READ, NativeLoopRunner, native_layers
from cellserve.families.base import Family, TensorSpec, token_rows
from cellserve.models import Seq2Seq


def codec_named(name: str):
    """(encode, decode, native form or None) of a named text codec: text -> source tokens, target tokens ->
    text, and the same as a native front end runs it (server/native/token_lanes.cpp)."""
    if name == "number-speller":
        from cellserve.tasks.speller import NATIVE_CODEC, decode_words, encode_number

        return encode_number, decode_words, NATIVE_CODEC
    raise ValueError(f"unknown text codec {name!r} (number-speller)")


BATCH_INSENSITIVE = 8  # a full decoder batch costing less than this many one-row steps: the decoder reads
# its weights from memory, and a request that reaches it early rides along almost free


def stage_pick(model: Seq2Seq, rows: int = 64) -> str:
    """Cellular's default pick for this model on this machine: 'earliest' (of equally full stages, the
    encoder first, so requests join the decoder's batch soonest) where a decoder step of `rows` rows costs
    less than BATCH_INSENSITIVE steps of one row, else 'stage' (decoders first, finishing requests sooner).
    Measured on seq2seq 2x512 with a 10k vocabulary (ratio ~3) and the speller (2x128, ratio ~20): README,
    Serving."""

    def seconds(batch: int) -> float:
        x = model.tgt_embedding.table[np.full(batch, model.bos_id)]
        best = float("inf")
        for _ in range(3):
            state = model.decoder.zero_state(batch)
            start = time.perf_counter()
            h = x
            for cell, s in zip(model.decoder.cells, state):
                cell.step_into(h, s)
                h = s[0]
            model.head(h).argmax(axis=-1)
            best = min(best, time.perf_counter() - start)
        return best

    return "earliest" if seconds(rows) < BATCH_INSENSITIVE * seconds(1) else "stage"


class Seq2SeqFamily(Family):
    arch = "seq2seq"
    options = ("text_codec",)

    def __init__(self, model: Seq2Seq, text_codec: str | None = None):
        super().__init__(model)
        self.codec = codec_named(text_codec) if text_codec else None  # (encode, decode, native form)
        self._pick = None  # cellular's default stage pick, measured on the first runner
        self.inputs = [TensorSpec("tokens", "INT64", [-1, -1], optional=bool(self.codec)),
                       TensorSpec("max_output_tokens", "INT64", [-1], optional=True)]
        self.outputs = [TensorSpec("tokens", "INT64", [-1, -1]), TensorSpec("lengths", "INT64", [-1])]
        if self.codec:
            self.inputs.append(TensorSpec("text", "BYTES", [-1], optional=True))
            self.outputs.append(TensorSpec("text", "BYTES", [-1]))

    def runner(self, capacity, block_steps=1, step_loop="native"):
        model = self.model
        encoder, decoder = native_layers(model.encoder), native_layers(model.decoder)
        if step_loop == "native" and encoder and decoder:
            runner = NativeSeq2SeqRunner(model, capacity, encoder, decoder)
        else:
            runner = Seq2SeqRunner(model, capacity)
        if self._pick is None:
            self._pick = stage_pick(model)
        runner.default_pick = self._pick
        return runner

    def lane_spec(self, runner) -> dict | None:
        if not isinstance(runner, NativeSeq2SeqRunner) or (self.codec and self.codec[2] is None):
            return None
        spec = {"stage": 0, "eos": int(self.model.eos_id), "default_max_len": 16 if self.codec else -1}
        return {**spec, **(self.codec[2] if self.codec else {})}

    def requests(self, tensors):
        self.check_names(tensors)
        if ("text" in tensors) == ("tokens" in tensors):
            raise ValueError("give exactly one of 'tokens' or 'text'" if self.codec else "'tokens' is required")
        if "text" in tensors:
            encode = self.codec[0]
            try:
                rows = [encode(v.decode().strip()) for v in tensors["text"].reshape(-1)]
            except (UnicodeDecodeError, ValueError) as exc:
                raise ValueError(f"input 'text': {exc}")
        else:
            rows = list(token_rows(tensors["tokens"], "tokens"))
        limits = tensors.get("max_output_tokens")
        if limits is not None:
            limits = limits.reshape(-1)
            if len(limits) not in (1, len(rows)) or limits.dtype.kind not in "iu":
                raise ValueError("max_output_tokens must be one integer or one per batch row")
        out = []
        for i, row in enumerate(rows):
            req = {"tokens": np.asarray(row, dtype=np.int64)}
            if limits is not None:
                req["max_output_tokens"] = int(limits[i if len(limits) > 1 else 0])
            elif self.codec:
                req["max_output_tokens"] = 16
            out.append(req)
        return out

    def outputs_of(self, results):
        seqs = [r["tokens"] for r in results]
        lengths = [len(s) for s in seqs]
        if len(seqs) == 1:  # (most requests: nothing to pad)
            tokens = np.array(seqs, dtype=np.int64).reshape(1, lengths[0])
        else:
            tokens = np.full((len(seqs), max(lengths)), self.model.eos_id, dtype=np.int64)
            for i, s in enumerate(seqs):
                tokens[i, :len(s)] = s
        outputs = {"tokens": tokens, "lengths": np.array(lengths, dtype=np.int64)}
        if self.codec:
            decode = self.codec[1]
            outputs["text"] = np.array([decode(s).encode() for s in seqs], dtype=object)
        return outputs


class Seq2SeqRunner(SequenceRunner):
    """Encoder steps over the source, then greedy decoder steps, as two stages batched apart; a request
    moves its states from the encoder's batch to the decoder's once, when its source is read."""

    cell_types = ("encoder", "decoder")

    def __init__(self, model: Seq2Seq, capacity: int):
        self.model = model
        self.names = layer_state_names(model.encoder)
        widths = layer_state_widths(model.encoder)
        self.src, self.out = Arena(0, np.int64), Arena(0, np.int64)
        self.encoder = Stage("encoder", capacity, widths, {"offset": np.int64, "length": np.int64,
                                                           "pos": np.int64, "arrival": np.float64})
        self.decoder = Stage("decoder", capacity, widths, {"prev": np.int64, "out": np.int64, "count": np.int64,
                                                           "max_len": np.int64, "stop": bool, "arrival": np.float64})
        super().__init__(capacity, [self.encoder, self.decoder])

    def prepare(self, inputs):
        src = token_array(inputs.get("tokens"), "tokens", self.model.src_embedding.vocab_size)
        max_len = int(inputs.get("max_output_tokens", 2 * len(src) + 10))
        if not 1 <= max_len <= 4096:
            raise ValueError(f"max_output_tokens must be in [1, 4096], got {max_len}")
        return {"src": src, "max_len": max_len, "stop_at_eos": bool(inputs.get("stop_at_eos", True))}, 1

    def length(self, payload):
        return len(payload["src"])

    def admit(self, reqs):
        for req in reqs:
            req.progress["src"] = self.src.put(req.payload["src"])
        self.encoder.add(reqs, offset=[r.progress["src"] for r in reqs], length=[len(r.payload["src"]) for r in reqs],
                         pos=0, arrival=[r.arrival for r in reqs])
        return [ADMITTED] * len(reqs)

    def _free(self, req):
        if "src" in req.progress:
            self.src.free(req.progress.pop("src"), len(req.payload["src"]))
        if "out" in req.progress:
            self.out.free(req.progress.pop("out"), req.payload["max_len"])

    def step(self, cell_type, max_rows, pad_to=0):
        st = self.stages[cell_type]
        a, b, out = self._window(st, max_rows)
        if b > a:
            (self._encode if cell_type == "encoder" else self._decode)(st, a, b, self._padding(st, a, b, pad_to), out)
            self.last_rows = b - a
        return out

    def _encode(self, st, a, b, pad, out):
        model = self.model
        offset, pos = st["offset"][a:b], st["pos"][a:b]
        start = time.perf_counter()
        x = model.src_embedding.table[pad_rows(self.src.data[offset + pos], pad)]
        stack_steps(model.encoder, st, self.names, x[None], slice(a, b + pad))
        self.kernel_seconds += time.perf_counter() - start
        pos += 1
        done = a + np.flatnonzero(pos >= st["length"][a:b])
        if not len(done):
            return
        moving = [st.reqs[row] for row in done]  # read their sources: states move to the decoder
        for req in moving:
            self.src.free(req.progress.pop("src"), len(req.payload["src"]))
            req.progress["out"] = self.out.alloc(req.payload["max_len"])
        rows = self.decoder.add(moving, prev=model.bos_id, out=[r.progress["out"] for r in moving], count=0,
                                max_len=[r.payload["max_len"] for r in moving],
                                stop=[r.payload["stop_at_eos"] for r in moving], arrival=st["arrival"][done])
        self.decoder.state[rows] = st.state[done]  # encoder and decoder have the same state layout
        st.remove(done)

    def _decode(self, st, a, b, pad, out):
        model = self.model
        start = time.perf_counter()
        x = model.tgt_embedding.table[pad_rows(st["prev"][a:b], pad)]
        top = stack_steps(model.decoder, st, self.names, x[None], slice(a, b + pad))[0]
        tokens = model.head(top).argmax(axis=-1)[: b - a]
        self.kernel_seconds += time.perf_counter() - start
        count = st["count"][a:b]
        self.out.data[st["out"][a:b] + count] = tokens
        count += 1
        st["prev"][a:b] = tokens
        done = np.flatnonzero(((st["stop"][a:b] != 0) & (tokens == model.eos_id)) | (count >= st["max_len"][a:b]))
        for i in done:
            o = st["out"][a + i]
            st.reqs[a + i].result = {"tokens": self.out.data[o:o + count[i]].tolist()}
        self._leave(st, a + done, out)


class NativeSeq2SeqRunner(NativeLoopRunner):
    """Seq2SeqRunner's stages and decoding in the native step loop (engine/steploop.py)."""

    cell_types = Seq2SeqRunner.cell_types
    prepare, length = Seq2SeqRunner.prepare, Seq2SeqRunner.length

    def __init__(self, model: Seq2Seq, capacity: int, encoder: list, decoder: list):
        super().__init__(capacity)
        self.model = model
        self.loop.add_stage(READ, model.src_embedding.table, encoder, None, None, 1, 0, -1)
        self.loop.add_stage(GENERATE, model.tgt_embedding.table, decoder, model.head.w.packed, model.head.bias, -1,
                            model.bos_id, model.eos_id)

    def _row(self, row, req):
        p = req.payload
        return 0, row, req.ticket, req.arrival, p["src"], p["max_len"], p["stop_at_eos"]

    def _result(self, tokens, next_token):
        return {"tokens": tokens}
