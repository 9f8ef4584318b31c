"""fp32 weight matrices on the native core.

A weight matrix (out_features, in_features) in torch's layout is packed once, when the model loads, into
the panel layout the micro-kernels stream (kernels/native/native.h); products never re-pack it. The
product runs register-blocked tiles of up to 12 rows x 32 columns (AVX-512), 2 x 32 (AVX2) or a
portable path, and GEMV-shaped tiles with k unrolled and prefetch for the 1-3 rows of small batches.
"""

from __future__ import annotations

import numpy as np

from cellserve.kernels import _native


def rows(x) -> np.ndarray:
    """x as float32 rows with a contiguous last dimension (a view when it already is one)."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D batch of rows, got shape {x.shape}")
    if x.dtype != np.float32 or x.strides[1] != 4:
        x = np.ascontiguousarray(x, dtype=np.float32)
    return x


class PackedMatrix:
    """A weight matrix packed for the native core: __call__(x) = x @ W^T, whatever its storage. Subclasses
    set `packed` and `out_features`."""

    def __call__(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        x = rows(x)
        if out is None:
            out = np.empty((x.shape[0], self.out_features), dtype=np.float32)
        _native.gemm(x, self.packed, out)
        return out


class Dense(PackedMatrix):
    """An fp32 weight matrix a cell multiplies by. QuantizedDense, BlockSparseDense and Bf16Dense have the same
    face."""

    bits = 32
    _pack = staticmethod(_native.pack_f32)  # the native layout the product streams

    def __init__(self, weight: np.ndarray):
        weight = np.asarray(weight, dtype=np.float32)
        if weight.ndim != 2:
            raise ValueError(f"a weight matrix must be 2-D, got shape {weight.shape}")
        self.out_features, self.in_features = weight.shape
        self.packed = self._pack(weight)

    @property
    def nbytes(self) -> int:
        return self.out_features * self.in_features * 4

    @property
    def weight(self) -> np.ndarray:
        """The (out, in) matrix, unpacked (a new array)."""
        weight = np.empty((self.out_features, self.in_features), dtype=np.float32)
        self.packed.unpack(weight)
        return weight

    def dense_weight(self) -> np.ndarray:
        """The fp32 matrix (exact here; dequantized for quantized variants)."""
        return self.weight

    def tensors(self, name: str) -> dict[str, np.ndarray]:
        return {name: self.weight}

    def __getstate__(self):  # copy/deepcopy/pickle: the packed buffer is native memory
        return {"weight": self.weight}

    def __setstate__(self, state):
        self.__init__(state["weight"])


class BlockSparseDense(Dense):
    """A Dense whose weight was pruned in blocks of 16 consecutive output rows x 1 input (the rows of one
    vector): whole-zero blocks are not stored, and the product visits only the others, so a 75% sparse
    matrix costs about a quarter of the bytes and multiply-adds."""

    BLOCK = 16
    _pack = staticmethod(_native.pack_bsr)

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes

    def tensors(self, name: str) -> dict[str, np.ndarray]:
        """Only the nonzero blocks: their values (n, 16) and (row block, column) coordinates (n, 2)."""
        rows_padded = -(-self.out_features // self.BLOCK) * self.BLOCK
        weight = np.zeros((rows_padded, self.in_features), np.float32)
        weight[: self.out_features] = self.weight
        blocks = weight.reshape(-1, self.BLOCK, self.in_features).transpose(0, 2, 1)  # (row block, column, 16)
        coords = np.ascontiguousarray(np.argwhere(blocks.any(axis=2)), dtype=np.int32)  # safetensors writes raw buffers
        return {f"{name}.blocks": np.ascontiguousarray(blocks[coords[:, 0], coords[:, 1]]),
                f"{name}.block_coords": coords,
                f"{name}.shape": np.array([self.out_features, self.in_features], np.int64)}

    @classmethod
    def from_tensors(cls, name: str, tensors: dict) -> "BlockSparseDense":
        out_features, in_features = (int(v) for v in tensors[f"{name}.shape"])
        coords = tensors[f"{name}.block_coords"]
        blocks = np.zeros((-(-out_features // cls.BLOCK), in_features, cls.BLOCK), np.float32)
        blocks[coords[:, 0], coords[:, 1]] = tensors[f"{name}.blocks"]
        weight = blocks.transpose(0, 2, 1).reshape(-1, in_features)[:out_features]
        return cls(np.ascontiguousarray(weight))


class Bf16Dense(Dense):
    """A Dense held as bf16 (each weight rounded to the nearest even bf16 once, at load): half the bytes.
    Activations are rounded to bf16 per product and the products accumulate in fp32, on AVX512-BF16's
    vdpbf16ps where the CPU has it, else widened to fp32 on the vector FMAs. Gates and cell state stay fp32."""

    bits = 16
    _pack = staticmethod(_native.pack_bf16)

    @property
    def nbytes(self) -> int:
        return self.out_features * self.in_features * 2

    def tensors(self, name: str) -> dict[str, np.ndarray]:
        """The bf16 bit patterns as uint16 (safetensors' own BF16 type needs a reader that has it)."""
        return {f"{name}.bf16": (self.weight.view(np.uint32) >> 16).astype(np.uint16)}

    @classmethod
    def from_tensors(cls, name: str, tensors: dict) -> "Bf16Dense":
        return cls((tensors[f"{name}.bf16"].astype(np.uint32) << 16).view(np.float32))
