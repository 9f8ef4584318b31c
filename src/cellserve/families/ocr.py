"""The line OCR family: line images ([height, width] or [batch, height, width], ink bright on dark) in,
text out. The bidirectional recognizer reads whole lines, a layer direction per stage; the CTC head's
scores are decoded greedily."""

from __future__ import annotations

import numpy as np

from cellserve.engine.frames import frames_runner
from cellserve.families.base import Family, TensorSpec, check_float
from cellserve.families.decoding import ctc_text
from cellserve.models.ocr import OCRModel


def recognize(model: OCRModel, image: np.ndarray) -> str:
    """The text of one line image (height, width), without the engine."""
    return ctc_text(model.logits(image), model.alphabet)


class OCRFamily(Family):
    arch = "ocr"

    def __init__(self, model: OCRModel):
        super().__init__(model)
        self.rnn = model.rnn
        self.inputs = [TensorSpec("image", "FP32", [-1, model.rnn.input_size // model.stride, -1])]
        self.outputs = [TensorSpec("text", "BYTES", [-1])]

    def runner(self, capacity, block_steps=1, step_loop="native"):
        return frames_runner(self, capacity, block_steps, step_loop)

    def requests(self, tensors):
        self.check_names(tensors)
        images = tensors["image"]
        check_float(images, "image")
        if images.ndim == 2:
            images = images[None]
        if images.ndim != 3:
            raise ValueError(f"input 'image' must have shape [height, width] or [batch, height, width], "
                             f"got {list(images.shape)}")
        return [{"image": image} for image in images]

    def frames_of(self, inputs: dict) -> np.ndarray:
        return self.model.frames(inputs.get("image"))

    def result_of(self, inputs: dict, ys: np.ndarray, finals: list) -> dict:
        return {"text": ctc_text(self.model.head(ys), self.model.alphabet)}

    def outputs_of(self, results):
        return {"text": np.array([r["text"].encode() for r in results], dtype=object)}
