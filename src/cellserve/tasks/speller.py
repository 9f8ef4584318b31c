"""The embedded default model: a seq2seq LSTM that spells numbers out in English words
("40712" -> "forty thousand seven hundred twelve"). Small, trained in about a minute on a CPU, and its
answers can be checked by eye, which is what `make demo` needs."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np

from cellserve.models.io import load, save
from cellserve.models.seq2seq import Seq2Seq

ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen " \
       "sixteen seventeen eighteen nineteen".split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
WORDS = ["<pad>", "<bos>", "<eos>"] + ONES + TENS[2:] + ["hundred", "thousand"]
WORD_ID = {w: i for i, w in enumerate(WORDS)}
MAX_NUMBER = 999_999
ASSET = "number_speller.safetensors"


def spell(n: int) -> list[str]:
    """English words for 0 <= n <= 999999, e.g. 1205 -> one thousand two hundred five."""
    if not 0 <= n <= MAX_NUMBER:
        raise ValueError(f"numbers from 0 to {MAX_NUMBER}")
    if n < 20:
        return [ONES[n]]
    if n < 100:
        return [TENS[n // 10]] + ([ONES[n % 10]] if n % 10 else [])
    if n < 1000:
        return [ONES[n // 100], "hundred"] + (spell(n % 100) if n % 100 else [])
    return spell(n // 1000) + ["thousand"] + (spell(n % 1000) if n % 1000 else [])


def encode_number(text: str) -> list[int]:
    """Digits as source token ids (0-9)."""
    if not text.isdigit() or int(text) > MAX_NUMBER or len(text) > 6:
        raise ValueError(f"expected a whole number from 0 to {MAX_NUMBER}, got {text!r}")
    return [int(d) for d in str(int(text))]


_UNSPOKEN = (WORD_ID["<eos>"], WORD_ID["<pad>"])


def decode_words(tokens: list[int]) -> str:
    return " ".join([WORDS[t] for t in tokens if t not in _UNSPOKEN])


# The codec above in the form a native front end runs (server/native/token_lanes.cpp): ASCII digits in, after
# stripping, at most 6 of them and at most MAX_NUMBER, the number's digits as the source; words out, joined by
# spaces, the unspoken ones skipped. What it does not take (Unicode digits, say) goes to encode_number.
NATIVE_CODEC = {"digits_max": MAX_NUMBER, "digits_chars": 6, "words": WORDS, "unspoken": list(_UNSPOKEN)}


def load_default() -> Seq2Seq:
    with resources.as_file(resources.files("cellserve.assets") / ASSET) as path:
        return load(path)


def train(steps: int = 3000, hidden: int = 128, seed: int = 0, out: str | Path | None = None) -> Seq2Seq:
    """Train with teacher forcing in torch, then move the weights into our Seq2Seq (needs torch)."""
    import torch
    from torch import nn

    from cellserve.models.layers import Embedding, Linear
    from cellserve.interop.torch_import import rnn_from_torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    embed = 32
    src_emb, tgt_emb = nn.Embedding(10, embed), nn.Embedding(len(WORDS), embed)
    encoder, decoder = nn.LSTM(embed, hidden, 2), nn.LSTM(embed, hidden, 2)
    head = nn.Linear(hidden, len(WORDS))
    params = [p for m in (src_emb, tgt_emb, encoder, decoder, head) for p in m.parameters()]
    opt = torch.optim.Adam(params, lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss(ignore_index=WORD_ID["<pad>"])
    for step in range(steps):
        digits = int(rng.integers(1, 7))  # one digit count per batch: no source padding needed
        low = 0 if digits == 1 else 10 ** (digits - 1)
        numbers = rng.integers(low, 10 ** digits, 128)
        src = torch.tensor([encode_number(str(n)) for n in numbers]).T
        targets = [[WORD_ID[w] for w in spell(int(n))] + [WORD_ID["<eos>"]] for n in numbers]
        width = max(map(len, targets))
        tgt = torch.tensor([t + [WORD_ID["<pad>"]] * (width - len(t)) for t in targets]).T
        dec_in = torch.cat([torch.full((1, len(numbers)), WORD_ID["<bos>"]), tgt[:-1]])
        _, state = encoder(src_emb(src))
        dec_out, _ = decoder(tgt_emb(dec_in), state)
        loss = loss_fn(head(dec_out).reshape(-1, len(WORDS)), tgt.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 500 == 0 or step == steps - 1:
            print(f"step {step}: loss {loss.item():.4f}")
    np_ = lambda t: t.detach().numpy()  # noqa: E731
    model = Seq2Seq(Embedding(np_(src_emb.weight)), rnn_from_torch(encoder), Embedding(np_(tgt_emb.weight)),
                    rnn_from_torch(decoder), Linear(np_(head.weight), np_(head.bias)),
                    bos_id=WORD_ID["<bos>"], eos_id=WORD_ID["<eos>"])
    if out:
        save(model, out)
    return model


def accuracy(model: Seq2Seq, numbers) -> float:
    right = sum(decode_words(model.translate(np.array(encode_number(str(n))), 16)) == " ".join(spell(int(n)))
                for n in numbers)
    return right / len(numbers)


if __name__ == "__main__":  # python -m cellserve.models.speller: retrain the shipped asset
    target = Path(__file__).resolve().parent.parent / "assets" / ASSET
    trained = train(out=target)
    print(f"saved {target}; exact-match accuracy on 1000 random numbers: "
          f"{accuracy(trained, np.random.default_rng(1).integers(0, MAX_NUMBER + 1, 1000)):.3f}")
