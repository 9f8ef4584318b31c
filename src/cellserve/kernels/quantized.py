"""Integer matrix products for quantized weights: int8, and 4/2/1-bit codes packed several to a byte.

Weights are symmetric and per output channel (row): w ~= q * scale[row]. Activations are quantized to
int8 per input row, either dynamically (scale = max|x| / 127, post-training int8) or with a fixed scale
(quantization-aware training fixed the grid, e.g. 1/7 for 4-bit activations of values in [-1, 1]).
Products accumulate in int32 and are scaled back to fp32 once per output: int8 weights are read as 1
byte instead of 4, and the multiply-adds run as 16-bit pairs (vpmaddwd: 32 per instruction, twice an
fp32 FMA's 16). This CPU's VNNI (vpdpbusd, 64 per instruction) is out of Numba's reach, and at small K
the per-output horizontal sum costs as much as the products: measured, int8 here is about as fast as
fp32, not faster (see README, Compression); ONNX Runtime's int8 LSTM is the fast path.

Packed layout (bits < 8): the row-major codes of the whole matrix, flattened and zero padded to a
multiple of 8/bits, are cut into 8/bits planes of equal length P; byte i holds, in bit field s, code
s*P + i. Unpacking is then one long shift-and-mask loop over contiguous bytes, which vectorizes. Kernels
unpack into an int8 scratch once per call, i.e. once per sequence in the LSTM recurrence, and then run
the int8 product: the model is held (and loaded) at 4/2/1 bits, the arithmetic is int8.
Codes are q + OFFSET[bits] (1 bit: q in {-1, +1} stored as 0/1).
"""

from __future__ import annotations

import numpy as np
from numba import njit

OFFSET = {4: 8, 2: 1, 1: 0}
KERNEL = dict(cache=True, nogil=True, error_model="numpy")


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


@njit(inline="always")
def round_code(v, limit):
    """Clip to +-limit and round half away from zero: a compare and a truncation, which vectorize
    (np.rint compiles to a scalar call here). It differs from round-half-even only on exact ties."""
    v = min(max(v, -limit), limit)
    return np.int32(v + np.float32(0.5)) if v >= 0 else np.int32(v - np.float32(0.5))


@njit("void(float32[:, ::1], float32, int8[:, ::1], float32[::1])", **KERNEL)
def quantize_rows(x, static_scale, out, scales):
    """x (M, K) fp32 -> int8 codes in out (M, K) and per-row scales; static_scale 0 means
    dynamic per row (max|x| / 127)."""
    m_total, k_total = x.shape
    for m in range(m_total):
        scale = static_scale
        if scale == 0:
            peak = np.float32(0.0)
            for k in range(k_total):
                peak = max(peak, abs(x[m, k]))
            scale = peak / np.float32(127.0) if peak > 0 else np.float32(1.0)
        inverse = np.float32(1.0) / scale
        for k in range(k_total):
            out[m, k] = np.int8(round_code(x[m, k] * inverse, np.float32(127.0)))
        scales[m] = scale


@njit(inline="always")
def dot_i8(x, m, w, n, k_total):
    """int8 dot product. Numba widens integer products to int64; the final cast to int32 (exact for
    K < 2**17) lets LLVM narrow the loop back to 16x16->32-bit multiply-adds (vpmaddwd)."""
    acc = 0
    for k in range(k_total):
        acc += np.int16(x[m, k]) * np.int16(w[n, k])
    return np.int32(acc)


@njit("void(uint8[::1], int64, int64, int8[::1])", **KERNEL)
def unpack_codes(packed, bits, offset, codes):
    """Packed bytes -> int8 weights (flat, padded length len(packed) * 8/bits), plane by plane; code - offset
    (2 * code - 1 for 1 bit)."""
    planes = packed.shape[0]
    mask = np.int32((1 << bits) - 1)
    for s in range(8 // bits):
        shift = s * bits
        if bits == 1:  # separate loops: a branch inside would stop vectorization
            for i in range(planes):
                codes[s * planes + i] = np.int8(2 * ((np.int32(packed[i]) >> shift) & 1) - 1)
        else:
            for i in range(planes):
                codes[s * planes + i] = np.int8(((np.int32(packed[i]) >> shift) & mask) - offset)


@njit("void(int8[:, ::1], float32[::1], int8[:, ::1], float32[::1], float32[:, ::1])", **KERNEL)
def matmul_i8(xq, x_scales, wq, w_scales, out):
    """out = (xq * x_scales) @ (wq * w_scales).T, int32 accumulation."""
    m_total, k_total = xq.shape
    for m in range(m_total):
        for n in range(wq.shape[0]):
            out[m, n] = np.float32(dot_i8(xq, m, wq, n, k_total)) * x_scales[m] * w_scales[n]


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
    codes = np.empty(packed.size * (8 // bits), dtype=np.int8)
    unpack_codes(packed, bits, OFFSET[bits], codes)
    return codes[: shape[0] * shape[1]].reshape(shape)


class QuantizedDense:
    """A Dense with int8 or packed low-bit weights; same interface (called with fp32 x, returns fp32).

    act_scale: 0 quantizes each input row dynamically; > 0 is the fixed activation grid step."""

    def __init__(self, codes: np.ndarray, scale: np.ndarray, bits: int = 8, act_scale: float = 0.0):
        if bits not in (8, 4, 2, 1):
            raise ValueError(f"weight bits must be 8, 4, 2 or 1, not {bits}")
        self.bits, self.act_scale = int(bits), np.float32(act_scale)
        self.scale = np.ascontiguousarray(scale, dtype=np.float32)
        self.out_features, self.in_features = codes.shape
        self.codes = np.ascontiguousarray(codes, dtype=np.int8) if bits == 8 else pack(codes, bits)

    @classmethod
    def from_float(cls, weight: np.ndarray, bits: int = 8, act_scale: float = 0.0) -> "QuantizedDense":
        q, scale = quantize_weight(weight, bits)
        return cls(q, scale, bits, act_scale)

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scale.nbytes

    def quantize_input(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = np.ascontiguousarray(x, dtype=np.float32)
        xq = np.empty((x.shape[0], self.in_features), dtype=np.int8)
        scales = np.empty(x.shape[0], dtype=np.float32)
        quantize_rows(x, self.act_scale, xq, scales)
        return xq, scales

    def __call__(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        xq, scales = self.quantize_input(x)
        if out is None:
            out = np.empty((x.shape[0], self.out_features), dtype=np.float32)
        matmul_i8(xq, scales, self.int_codes(), self.scale, out)
        return out

    def int_codes(self) -> np.ndarray:
        """(out, in) int8 weights: the stored ones, or packed ones unpacked (a scratch copy)."""
        return self.codes if self.bits == 8 else unpack(self.codes, self.bits, (self.out_features, self.in_features))

    def dense_weight(self) -> np.ndarray:
        return self.int_codes().astype(np.float32) * self.scale[:, None]

    def tensors(self, name: str) -> dict[str, np.ndarray]:
        return {f"{name}.q{self.bits}": self.codes, f"{name}.scale": self.scale,
                f"{name}.act_scale": np.array([self.act_scale], dtype=np.float32),
                f"{name}.shape": np.array([self.out_features, self.in_features], dtype=np.int64)}

    @classmethod
    def from_tensors(cls, name: str, tensors: dict) -> "QuantizedDense":
        bits = next(int(k[len(name) + 2:]) for k in tensors if k.startswith(f"{name}.q"))
        codes = tensors[f"{name}.q{bits}"]
        out_features, in_features = (int(v) for v in tensors[f"{name}.shape"])
        q = codes if bits == 8 else unpack(codes, bits, (out_features, in_features))
        return cls(q.reshape(out_features, in_features), tensors[f"{name}.scale"], bits,
                   float(tensors[f"{name}.act_scale"][0]))
