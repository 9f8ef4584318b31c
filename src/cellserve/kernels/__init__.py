"""Hot loops, and nothing that knows of cells or requests. The native core (kernels/native/: C++, per-kernel
runtime ISA dispatch) runs every matrix product (fp32, block-sparse, int8 and 4/2/1-bit, weights packed
once at load), the LSTM/GRU gate math and their whole-sequence recurrences, and the SRU and QRNN blocks
(one product, then the scan); Numba runs the TreeLSTM node update (treelstm.py). The Python face:
dense.py and quantized.py (packed matrices), recurrence.py (the cell steps' calls).

Thread count: products run on `set_threads(n)` threads, a setting of the calling thread (each engine
sets its own); the default is 1."""

try:
    from cellserve.kernels import _native
except ImportError as exc:  # a source checkout that was never built
    raise ImportError("cellserve's native kernel core is not built: run `make test` (or `pip install -e .`), "
                      f"which compiles it with the system's C++ compiler ({exc})") from exc

from cellserve.kernels import treelstm
from cellserve.kernels.dense import Bf16Dense, BlockSparseDense, Dense
from cellserve.kernels.quantized import QuantizedDense

isa = _native.isa  # the instruction-set path in use: avx512-vbmi-bf16, avx512-bf16, avx512-vbmi, avx512, avx2, portable
isas = _native.isas  # the paths this CPU can run, best first
set_isa = _native.set_isa  # force a path (CELLSERVE_ISA does the same at import)
set_threads = _native.set_threads
get_threads = _native.get_threads


def load_dense(name: str, tensors: dict):
    """The matrix saved under `name` by Dense.tensors, BlockSparseDense.tensors, Bf16Dense.tensors or
    QuantizedDense.tensors."""
    if f"{name}.blocks" in tensors:
        return BlockSparseDense.from_tensors(name, tensors)
    if f"{name}.bf16" in tensors:
        return Bf16Dense.from_tensors(name, tensors)
    return Dense(tensors[name]) if name in tensors else QuantizedDense.from_tensors(name, tensors)


__all__ = ["Bf16Dense", "BlockSparseDense", "Dense", "QuantizedDense", "load_dense", "treelstm", "isa", "isas", "set_isa", "set_threads",
           "get_threads"]
