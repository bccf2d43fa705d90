"""An execution-time model for choosing how a compressed layer computes ``x @ W.T``.

Multiply-add counts alone pick the wrong path: a factorised product is a chain of thin GEMMs and batched matmuls
of small matrices, which run at a fraction of the GFLOP/s of the one large GEMM the dense path makes, and every
extra tensor op has a fixed cost. :class:`CostModel` adds those terms up (a roofline-like sum, in seconds)::

    step  = op_s + matrices * matrix_s + macs / macs_per_s          (one matmul of a factorised path)
    dense = op_s + macs / gemm_macs_per_s + weight_bytes / weight_bytes_per_s    (one GEMM; few tokens: a GEMV
                                                                    that streams the weight from memory)
    csr   = 3 op_s + nnz * tokens / sparse_macs_per_s + nnz * sparse_entry_s       (CSR times dense)
    copy  = bytes / bytes_per_s                                     (rebuilding a weight, transposing an output)

A step is described by ``(batch, m, k, n)``: ``batch`` matrices of shape ``(m, k)`` times ``(k, n)``; ``n == 1``
means one plain 2-D GEMM of ``(batch, k) @ (k, m)`` (no per-matrix cost). Forward and training (forward plus
backward) have separate constants because a backward pass has its own overheads.

The CPU constants were fitted by non-negative least squares to single-thread timings (thread CPU time, which
ignores other processes) of every contiguous core grouping and sweep direction of TT layers 512↔2048 and
256↔1024 at ranks 2/4/8 and 1/32/256 tokens on an AMD EPYC (family 26, AVX-512, 2 cores) with MKL; the sparse
CSR constants from ``torch.sparse.addmm`` / ``addmv`` at 90 % and 98 % sparsity on the same machine. The CUDA
constants are conservative guesses (kernel launch cost dominates small steps), not a calibration. The model only
has to rank the candidates; layers additionally require a margin before leaving the dense path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["CPU_COSTS", "CUDA_COSTS", "CostModel", "PassCosts", "cost_model_for"]


@dataclass(frozen=True)
class PassCosts:
    """Constants of one kind of pass (forward only, or forward plus backward).

    Args:
        op_s: fixed seconds per tensor op (dispatch, Python, autograd bookkeeping).
        matrix_s: extra seconds per matrix of a batched matmul.
        macs_per_s: multiply-adds per second of the thin GEMMs / batched matmuls of a factorised path (one thread).
        gemm_macs_per_s: multiply-adds per second of one large GEMM (one thread).
        sparse_macs_per_s: multiply-adds per second of a CSR times dense product (one thread).
        bytes_per_s: bytes per second of an elementwise pass or copy (one thread).
        weight_bytes_per_s: bytes per second at which a GEMM streams its weight (what bounds it at few tokens).
        sparse_entry_s: seconds per stored entry of a CSR product, paid once per call whatever the token count
            (index decoding: what bounds it at few tokens).
    """

    op_s: float
    matrix_s: float
    macs_per_s: float
    gemm_macs_per_s: float
    sparse_macs_per_s: float
    bytes_per_s: float
    weight_bytes_per_s: float
    sparse_entry_s: float


@dataclass(frozen=True)
class CostModel:
    """Seconds of the steps of a forward (``train=False``) or forward+backward (``train=True``) pass.

    Args:
        forward: constants of an inference pass.
        train: constants of a training pass (forward and backward together).
        thread_scaling: exponent ``a`` in ``threads ** a``, the speed-up of the throughput terms on ``threads``
            threads (fixed costs do not scale).
        margin: a factorised or sparse path is used only when it is predicted to take at most ``margin`` times
            the dense path, so that errors of the model do not make a layer slower than ``nn.Linear``.
        min_saving_s: ... and to save at least this many seconds: at a handful of tokens both paths take a few
            microseconds, where fixed costs the model leaves out (Python, views) decide.
        chunk_bytes: split the tokens of a factorised product into chunks whose largest intermediate has at most
            this many bytes, so that it stays in cache (``None``: never split; right for GPUs).
    """

    forward: PassCosts
    train: PassCosts
    thread_scaling: float = 0.9
    margin: float = 0.8
    min_saving_s: float = 6e-6
    chunk_bytes: int | None = 4 << 20

    def prefers(self, candidate_s: float, dense_s: float, dense_extra_s: float = 0.0) -> bool:
        """Whether a path predicted to take ``candidate_s`` should replace the dense one, which takes ``dense_s``
        for its GEMM plus ``dense_extra_s`` for anything else (e.g. rebuilding ``W``): the margin applies to the
        GEMM, and the saving must be at least ``min_saving_s``."""
        return candidate_s <= self.margin * dense_s + dense_extra_s - self.min_saving_s

    def _pass(self, train: bool) -> PassCosts:
        return self.train if train else self.forward

    def steps_seconds(self, steps: Sequence[tuple[int, int, int, int]], *, train: bool, threads: int = 1) -> float:
        """Seconds of a chain of matmul steps ``(batch, m, k, n)`` (see the module docstring)."""
        c, speed = self._pass(train), max(threads, 1) ** self.thread_scaling
        total = 0.0
        for batch, m, k, n in steps:
            matrices = batch if n > 1 else 0
            total += c.op_s + (matrices * c.matrix_s + batch * m * k * n / c.macs_per_s) / speed
        return total

    def gemm_seconds(self, macs: int, *, weight_bytes: int = 0, train: bool, threads: int = 1) -> float:
        """Seconds of one GEMM of ``macs`` multiply-adds with a weight of ``weight_bytes`` (``nn.Linear``'s
        forward; with its backward if ``train``)."""
        c = self._pass(train)
        streamed = macs / c.gemm_macs_per_s + weight_bytes / c.weight_bytes_per_s
        return c.op_s + streamed / max(threads, 1) ** self.thread_scaling

    def sparse_seconds(self, nnz: int, tokens: int, *, threads: int = 1) -> float:
        """Seconds of one CSR ``(out, in)`` with ``nnz`` entries times dense ``(in, tokens)`` product (three ops:
        transpose, product, copy back); forward only."""
        c = self.forward
        streamed = nnz * tokens / c.sparse_macs_per_s + nnz * c.sparse_entry_s
        return 3 * c.op_s + streamed / max(threads, 1) ** self.thread_scaling

    def copy_seconds(self, nbytes: int, *, train: bool, threads: int = 1) -> float:
        """Seconds of one elementwise pass over ``nbytes`` bytes (three passes' worth when ``train``)."""
        c = self._pass(train)
        return c.op_s + nbytes / c.bytes_per_s / max(threads, 1) ** self.thread_scaling


CPU_COSTS = CostModel(
    forward=PassCosts(
        op_s=7.5e-6,
        matrix_s=1.7e-7,
        macs_per_s=39e9,
        gemm_macs_per_s=43e9,
        sparse_macs_per_s=10e9,
        bytes_per_s=8e9,
        weight_bytes_per_s=50e9,
        sparse_entry_s=0.3e-9,
    ),
    train=PassCosts(
        op_s=5.0e-5,
        matrix_s=4.8e-7,
        macs_per_s=8.9e9,
        gemm_macs_per_s=14e9,
        sparse_macs_per_s=3e9,
        bytes_per_s=2.7e9,
        weight_bytes_per_s=17e9,
        sparse_entry_s=1e-9,
    ),
)

CUDA_COSTS = CostModel(
    forward=PassCosts(
        op_s=1.0e-5,
        matrix_s=2.0e-9,
        macs_per_s=5e12,
        gemm_macs_per_s=2e14,
        sparse_macs_per_s=2e12,
        bytes_per_s=2e12,
        weight_bytes_per_s=4e12,
        sparse_entry_s=2e-12,
    ),
    train=PassCosts(
        op_s=4.0e-5,
        matrix_s=6.0e-9,
        macs_per_s=1.7e12,
        gemm_macs_per_s=6.6e13,
        sparse_macs_per_s=7e11,
        bytes_per_s=7e11,
        weight_bytes_per_s=1.3e12,
        sparse_entry_s=6e-12,
    ),
    thread_scaling=0.0,
    min_saving_s=1e-5,
    chunk_bytes=None,
)


def cost_model_for(device_type: str) -> CostModel:
    """The cost model of a device type (``"cuda"`` or anything else, which gets the CPU model)."""
    return CUDA_COSTS if device_type == "cuda" else CPU_COSTS
