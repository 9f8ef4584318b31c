"""Quantized weight matrices: int8, and 4/2/1-bit codes stored several to a byte.

Weights are symmetric and per output channel (row): w ~= q * scale[row]. Activations are quantized to
int8 per input row on the way into each product, either dynamically (scale = max|x| / 127, post-training
int8) or with a fixed scale (quantization-aware training fixed the grid, e.g. 1/7 for 4-bit activations
of values in [-1, 1]). The native core multiplies int8 activations by int8 or 4/2/1-bit weights with
int32 accumulation (VNNI's vpdpbusd on AVX-512: 64 multiply-adds per instruction; vpmaddwd on AVX2) and
scales back to fp32 once per output: exact integer math, tested against numpy. Weights below 8 bits stay
at their width in memory, several to a byte, and are widened in registers inside the product
(kernels/native/isa_avx512.cpp), so a 4-bit matrix streams half the bytes of an int8 one.

File layout of codes below 8 bits: the row-major codes of the whole matrix, flattened and zero padded to
a multiple of 8/bits, are cut into 8/bits planes of equal length P; byte i holds, in bit field s, code
s*P + i. Codes are q + OFFSET[bits] (1 bit: q in {-1, +1} stored as 0/1).
"""

from __future__ import annotations

import numpy as np

from cellserve.kernels import _native
from cellserve.kernels.dense import PackedMatrix, rows

OFFSET = {4: 8, 2: 1, 1: 0}


def qmax(bits: int) -> int:
    """Largest code of a symmetric grid: 127 for 8 bits, 7 for 4, 1 for 2 (ternary) and 1 bit (binary)."""
    return max(1, 2 ** (bits - 1) - 1)


def quantize_weight(weight: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-row symmetric codes and scales. Same rule as compress.qat's fake quantizer, so a model trained
    with it converts exactly. 1 bit: sign(w) * mean|w| (binary nets); 2 bits: ternary with the
    threshold 0.7 * mean|w| (ternary weight networks); more: max|w| / qmax."""
    weight = np.asarray(weight, dtype=np.float32)
    scale = weight_scale(weight, bits)
    if bits == 1:
        q = np.where(weight >= 0, 1, -1)
    else:
        q = np.clip(np.round(weight / scale[:, None]), -qmax(bits), qmax(bits))
    return q.astype(np.int8), scale


def weight_scale(weight: np.ndarray, bits: int) -> np.ndarray:
    mean_abs = np.abs(weight).mean(axis=1)
    if bits == 1:
        scale = mean_abs
    elif bits == 2:
        scale = 1.4 * mean_abs
    else:
        scale = np.abs(weight).max(axis=1) / qmax(bits)
    return np.maximum(scale, np.float32(1e-12)).astype(np.float32)


def quantize_rows(x: np.ndarray, static_scale: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """x (M, K) -> int8 codes (M, K) and per-row scales, by the rule every int8 product applies to its
    input: round half away from zero, clip to +-127; static_scale 0 means max|x| / 127 per row."""
    x = rows(x)
    codes = np.empty(x.shape, dtype=np.int8)
    scales = np.empty(x.shape[0], dtype=np.float32)
    _native.quantize(x, float(static_scale), codes, scales)
    return codes, scales


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """int8 codes (N, K) -> flat uint8 planes (see the module doc)."""
    per = 8 // bits
    flat = q.astype(np.int32).ravel()
    codes = np.zeros(-(-flat.size // per) * per, dtype=np.int32)
    codes[: flat.size] = (flat + 1) // 2 if bits == 1 else flat + OFFSET[bits]
    planes = codes.reshape(per, -1)
    packed = np.zeros(planes.shape[1], dtype=np.int32)
    for s in range(per):
        packed |= planes[s] << (s * bits)
    return packed.astype(np.uint8)


def unpack(packed: np.ndarray, bits: int, shape: tuple[int, int]) -> np.ndarray:
    """The inverse of pack: flat uint8 planes -> int8 codes of `shape`."""
    shifts = np.arange(0, 8, bits, dtype=np.uint8)[:, None]
    fields = ((np.asarray(packed, dtype=np.uint8)[None, :] >> shifts) & ((1 << bits) - 1)).astype(np.int8)
    codes = 2 * fields - 1 if bits == 1 else fields - OFFSET[bits]
    return codes.ravel()[: shape[0] * shape[1]].reshape(shape)


class QuantizedDense(PackedMatrix):
    """A Dense with int8 or low-bit weights; same interface (called with fp32 x, returns fp32).

    act_scale: 0 quantizes each input row dynamically; > 0 is the fixed activation grid step."""

    def __init__(self, codes: np.ndarray, scale: np.ndarray, bits: int = 8, act_scale: float = 0.0):
        if bits not in (8, 4, 2, 1):
            raise ValueError(f"weight bits must be 8, 4, 2 or 1, not {bits}")
        codes = np.asarray(codes, dtype=np.int8)
        if codes.ndim != 2 or np.abs(codes.astype(np.int32)).max(initial=0) > qmax(bits):
            raise ValueError(f"{bits}-bit codes must be a 2-D array within +-{qmax(bits)}")
        self.bits, self.act_scale = int(bits), float(np.float32(act_scale))
        self.scale = np.ascontiguousarray(scale, dtype=np.float32)
        self.out_features, self.in_features = codes.shape
        self.packed = _native.pack_s8(codes, self.scale, self.act_scale, self.bits)

    @classmethod
    def from_float(cls, weight: np.ndarray, bits: int = 8, act_scale: float = 0.0) -> "QuantizedDense":
        q, scale = quantize_weight(weight, bits)
        return cls(q, scale, bits, act_scale)

    @property
    def nbytes(self) -> int:
        """Bytes of the weights at their bit width (as saved) plus the scales."""
        return -(-self.out_features * self.in_features * self.bits // 8) + self.scale.nbytes

    def quantize_input(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The int8 codes and row scales this matrix's product gives x."""
        return quantize_rows(x, self.act_scale)

    def int_codes(self) -> np.ndarray:
        """(out, in) int8 codes (a new array)."""
        codes = np.empty((self.out_features, self.in_features), dtype=np.int8)
        self.packed.unpack(codes)
        return codes

    def dense_weight(self) -> np.ndarray:
        return self.int_codes().astype(np.float32) * self.scale[:, None]

    def tensors(self, name: str) -> dict[str, np.ndarray]:
        codes = self.int_codes()
        return {f"{name}.q{self.bits}": codes if self.bits == 8 else pack(codes, self.bits),
                f"{name}.scale": self.scale, f"{name}.act_scale": np.array([self.act_scale], dtype=np.float32),
                f"{name}.shape": np.array([self.out_features, self.in_features], dtype=np.int64)}

    @classmethod
    def from_tensors(cls, name: str, tensors: dict) -> "QuantizedDense":
        bits = next(int(k[len(name) + 2:]) for k in tensors if k.startswith(f"{name}.q"))
        codes = tensors[f"{name}.q{bits}"]
        out_features, in_features = (int(v) for v in tensors[f"{name}.shape"])
        q = codes if bits == 8 else unpack(codes, bits, (out_features, in_features))
        return cls(q.reshape(out_features, in_features), tensors[f"{name}.scale"], bits,
                   float(tensors[f"{name}.act_scale"][0]))

    def __getstate__(self):
        return {"codes": self.int_codes(), "scale": self.scale, "bits": self.bits, "act_scale": self.act_scale}

    def __setstate__(self, state):
        self.__init__(state["codes"], state["scale"], state["bits"], state["act_scale"])
