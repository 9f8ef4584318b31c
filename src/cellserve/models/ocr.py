"""Line OCR: a bidirectional RNN over pixel columns with a CTC head (decoded by families/decoding.py)."""

from __future__ import annotations

import numpy as np

from cellserve.models.layers import Linear
from cellserve.models.rnn import RNN, prefixed, unprefixed


def columns(image: np.ndarray, stride: int) -> np.ndarray:
    """(height, width) image -> (steps, height * stride) frames: `stride` adjacent columns per time step."""
    height, width = image.shape
    width -= width % stride
    return np.ascontiguousarray(image[:, :width].T.reshape(width // stride, height * stride), dtype=np.float32)


class OCRModel:
    arch = "ocr"

    def __init__(self, rnn: RNN, head: Linear, alphabet: str, stride: int = 2):
        if head.out_features != len(alphabet) + 1:
            raise ValueError("the CTC head needs one output per character plus the blank")
        self.rnn, self.head, self.alphabet, self.stride = rnn, head, alphabet, int(stride)

    def frames(self, image) -> np.ndarray:
        """A checked line image (height, width) as its time steps; ValueError names what is wrong."""
        image = np.asarray(image, dtype=np.float32)
        height = self.rnn.input_size // self.stride
        if image.ndim != 2 or image.shape[0] != height or image.shape[1] < self.stride:
            raise ValueError(f"image must have shape [{height}, width >= {self.stride}], got {list(image.shape)}")
        if not np.isfinite(image).all():
            raise ValueError("image contains NaN or infinity")
        return columns(image, self.stride)

    def logits(self, image: np.ndarray) -> np.ndarray:
        """(steps, classes) for one line image (height, width)."""
        ys, _ = self.rnn.forward(self.frames(image)[:, None, :])
        return self.head(ys[:, 0])

    @property
    def weight_bytes(self) -> int:
        return self.rnn.weight_bytes + sum(t.nbytes for t in self.head.tensors().values())

    def config(self) -> dict:
        return {"arch": self.arch, "rnn": self.rnn.config(), "alphabet": self.alphabet, "stride": self.stride}

    def tensors(self) -> dict:
        return {**prefixed("rnn", self.rnn.tensors()), **prefixed("head", self.head.tensors())}

    @classmethod
    def from_tensors(cls, config, tensors):
        return cls(RNN.from_tensors(config["rnn"], unprefixed("rnn", tensors)),
                   Linear.from_tensors(unprefixed("head", tensors)), config["alphabet"], config["stride"])
