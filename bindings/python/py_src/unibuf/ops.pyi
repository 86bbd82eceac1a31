"""The fused inference ops, one function per ``unibuf::ops`` function.

Each op has two forms, as in Rust: ``op(queue, ...)`` queues the op and returns a fresh output
``Buffer``; ``op_into(queue, ..., out)`` writes a buffer the caller owns and returns the
submission's ``Fence``. Arithmetic is in f32 whatever the storage dtype (float32, float16,
bfloat16), rounded once to the output dtype.
"""

from __future__ import annotations

import builtins
from typing import Any, List, Literal, Sequence, Tuple, final

from ._unibuf import Buffer, Device, Fence, Queue

__all__ = [
    "EmbeddingTable",
    "GGML_MAX_BATCH",
    "GgmlMatrix",
    "Q4Matrix",
    "Q4_GROUPS",
    "Q4_MAX_BATCH",
    "Q8Activations",
    "Q8_BLOCK",
    "SAMPLE_MAX_K",
    "embed_rows",
    "embed_rows_into",
    "ggml_matvec",
    "ggml_matvec_into",
    "matmul",
    "matmul_bt",
    "matmul_bt_into",
    "matmul_into",
    "q4_matvec",
    "q4_matvec_into",
    "q4_matvec_q8",
    "q4_matvec_q8_into",
    "quantize_activations",
    "quantize_activations_into",
    "rms_norm",
    "rms_norm_into",
    "rms_norm_residual",
    "rms_norm_residual_into",
    "rope",
    "rope_into",
    "sample",
    "sample_into",
    "softmax",
    "softmax_into",
    "swiglu",
    "swiglu_into",
]

_RopeStyle = Literal["neox", "interleaved"]

# The constants' docstrings are the doc comments of unibuf::ops (pyo3 gives them none).

Q4_GROUPS: List[int]  # [32, 64, 128]
"""The group sizes (columns per scale) a ``Q4Matrix`` may have."""

Q4_MAX_BATCH: int  # 8
"""The most rows of ``x`` (the batch) one ``q4_matvec`` or ``q4_matvec_q8`` takes."""

Q8_BLOCK: int  # 32
"""Values per quantisation block of ``Q8Activations`` (one scale each); the columns of ``x``
must be a multiple of it."""

GGML_MAX_BATCH: int  # 8
"""The most rows of ``x`` one ``ggml_matvec`` takes."""

SAMPLE_MAX_K: int  # 1024
"""The most candidates a sampling step keeps (``top_k`` at most this; ``top_k == 0`` means this)."""

def rms_norm(queue: Queue, x: Buffer, weight: Buffer, eps: float = 1e-6) -> Buffer:
    """RMSNorm of each row of ``x`` (last dimension) times ``weight`` (``[hidden]``):
    ``x / sqrt(mean(x^2) + eps) * weight``, in x's dtype.
    """

def rms_norm_into(
    queue: Queue, x: Buffer, weight: Buffer, out: Buffer, eps: float = 1e-6
) -> Fence:
    """``rms_norm`` into ``out`` (x's dtype and shape); returns the fence."""

def rms_norm_residual(
    queue: Queue, x: Buffer, residual: Buffer, weight: Buffer, eps: float = 1e-6
) -> Tuple[Buffer, Buffer]:
    """The residual add fused with the norm after it: returns ``(normed, sum)`` with
    ``sum = x + residual`` (rounded to the dtype) and ``normed = rms_norm(sum, weight, eps)``.
    """

def rms_norm_residual_into(
    queue: Queue,
    x: Buffer,
    residual: Buffer,
    weight: Buffer,
    normed_out: Buffer,
    sum_out: Buffer,
    eps: float = 1e-6,
) -> Fence:
    """``rms_norm_residual`` into ``normed_out`` and ``sum_out``; returns the fence."""

def softmax(queue: Queue, x: Buffer) -> Buffer:
    """Softmax of each row (last dimension), computed stably in f32."""

def softmax_into(queue: Queue, x: Buffer, out: Buffer) -> Fence:
    """``softmax`` into ``out``; returns the fence."""

def swiglu(queue: Queue, gate: Buffer, up: Buffer) -> Buffer:
    """SwiGLU: ``silu(gate) * up`` elementwise (same dtype and shape)."""

def swiglu_into(queue: Queue, gate: Buffer, up: Buffer, out: Buffer) -> Fence:
    """``swiglu`` into ``out``; returns the fence."""

def rope(
    queue: Queue,
    x: Buffer,
    positions: Buffer,
    theta_base: float = 10000.0,
    style: _RopeStyle = "neox",
) -> Buffer:
    """Rotary embedding of ``x`` (``[tokens, heads, head_dim]``) at ``positions`` (uint32
    ``[tokens]``). ``style``: "neox" (rotate-half, Llama) or "interleaved" (GPT-J).
    """

def rope_into(
    queue: Queue,
    x: Buffer,
    positions: Buffer,
    out: Buffer,
    theta_base: float = 10000.0,
    style: _RopeStyle = "neox",
) -> Fence:
    """``rope`` into ``out``; returns the fence."""

def matmul(queue: Queue, a: Buffer, b: Buffer) -> Buffer:
    """``a @ b`` (``[m, k] @ [k, n]``; float32, float16 or bfloat16, f32 accumulation) through
    the backend's BLAS: gemm on the CPU, cuBLAS on CUDA, MPS on Metal.
    """

def matmul_into(queue: Queue, a: Buffer, b: Buffer, out: Buffer) -> Fence:
    """``matmul`` into ``out`` (``[m, n]``); returns the fence."""

def matmul_bt(queue: Queue, a: Buffer, b: Buffer) -> Buffer:
    """``a @ b.T`` (``[m, k] @ [n, k].T``: weights stored as PyTorch's ``Linear`` stores them)."""

def matmul_bt_into(queue: Queue, a: Buffer, b: Buffer, out: Buffer) -> Fence:
    """``matmul_bt`` into ``out``; returns the fence."""

def sample(
    queue: Queue,
    logits: Buffer,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    step: int = 0,
) -> Buffer:
    """Samples one token per row of ``logits`` (``[vocab]`` or ``[rows, vocab]``) on the
    device into a uint32 ``[rows]`` buffer. ``temperature=0`` is greedy (argmax, ties to the
    lower id); ``top_k`` (0: the kernel's maximum, 1024) and ``top_p`` restrict the
    candidates; ``(seed, step, row)`` fixes the draw.
    """

def sample_into(
    queue: Queue,
    logits: Buffer,
    out: Buffer,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    step: int = 0,
) -> Fence:
    """``sample`` into ``out`` (uint32 ``[rows]``); returns the fence."""

@final
class Q4Matrix:
    """A 4-bit group-quantised matrix (``rows x cols``, one f16 scale per ``group`` weights of a
    row): packed uint8 codes ``[rows, cols / 2]`` and float16 scales ``[rows, cols / group]``.

    ``Q4Matrix(packed, scales, rows, cols, group)`` makes one over existing buffers (views at
    any offset), checked against the geometry; ``Q4Matrix.quantize`` quantises weights.
    """

    def __new__(
        cls, packed: Buffer, scales: Buffer, rows: int, cols: int, group: int
    ) -> Q4Matrix: ...
    @staticmethod
    def quantize(
        device: Device,
        weights: Any,
        rows: int,
        cols: int,
        group: int = 32,
        label: str = "q4",
    ) -> Q4Matrix:
        """Quantises row-major float32 ``weights`` (a host array or bytes of ``rows * cols``
        values) on the host (scale = max|w| / 7 per group, rounded to f16) and uploads codes
        and scales to ``device``. ``group``: 32, 64 or 128.
        """
    @property
    def packed(self) -> Buffer:
        """The packed codes, uint8 ``[rows, cols / 2]``."""
    @property
    def scales(self) -> Buffer:
        """The scales, float16 ``[rows, cols / group]``."""
    @property
    def rows(self) -> int:
        """Rows of the matrix."""
    @property
    def cols(self) -> int:
        """Columns of the matrix (the length of x)."""
    @property
    def group(self) -> int:
        """Weights per scale: 32, 64 or 128."""
    @property
    def weight_bytes(self) -> int:
        """Bytes of codes and scales (what one matrix-vector product reads)."""
    def dequantize(self, queue: Queue) -> bytes:
        """The dequantised weights (row-major ``rows * cols`` float32) as ``bytes``, downloaded
        through ``queue`` (for references and tests; ``numpy.frombuffer(..., "float32")``).
        """

@final
class Q8Activations:
    """Activations quantised to int8 in blocks of 32 (per-block f32 scales and sums), the input
    of ``q4_matvec_q8``. Allocate once with ``Q8Activations.alloc`` and refill with
    ``quantize_activations_into`` at every step.
    """

    @staticmethod
    def alloc(device: Device, x_shape: Sequence[int], label: str = "q8") -> Q8Activations:
        """Buffers for activations of shape ``x_shape`` (``[cols]`` or ``[batch, cols]``, ``cols``
        a multiple of 32), uninitialised.
        """
    @property
    def values(self) -> Buffer:
        """The int8 values ``[batch, cols]`` (in the kernels' order within each block)."""
    @property
    def sums(self) -> Buffer:
        """The per-block sums, int32 ``[batch, cols / 32]``."""
    @property
    def scales(self) -> Buffer:
        """The per-block scales, float32 ``[batch, cols / 32]``."""
    @property
    def batch(self) -> int:
        """Rows of activations (1 for a 1-D x)."""
    @property
    def cols(self) -> int:
        """Values per row."""

def q4_matvec(queue: Queue, m: Q4Matrix, x: Buffer) -> Buffer:
    """``m @ x`` for a ``Q4Matrix`` and ``x`` of ``[cols]`` or ``[batch, cols]`` (batch up to
    8; float32, float16 or bfloat16) into float32 ``[rows]`` / ``[batch, rows]``.
    """

def q4_matvec_into(queue: Queue, m: Q4Matrix, x: Buffer, out: Buffer) -> Fence:
    """``q4_matvec`` into ``out``; returns the fence."""

def quantize_activations(queue: Queue, x: Buffer) -> Q8Activations:
    """Quantises ``x`` (``[cols]`` or ``[batch, cols]``) to int8 blocks on the device."""

def quantize_activations_into(queue: Queue, x: Buffer, xq: Q8Activations) -> Fence:
    """``quantize_activations`` into ``xq`` (allocated for x's shape); returns the fence."""

def q4_matvec_q8(queue: Queue, m: Q4Matrix, xq: Q8Activations) -> Buffer:
    """``m @ x`` with int8 activations (``dp4a`` on CUDA): the fastest decode matvec."""

def q4_matvec_q8_into(queue: Queue, m: Q4Matrix, xq: Q8Activations, out: Buffer) -> Fence:
    """``q4_matvec_q8`` into ``out``; returns the fence."""

@final
class GgmlMatrix:
    """A ``rows x cols`` matrix in a ggml block format ("Q8_0", "Q4_0" or "Q4_1"), as a GGUF file
    stores it: ``bytes`` is uint8 ``[rows, bytes per row]`` (what ``weights.load`` gives for a
    block-format tensor), read natively by ``ggml_matvec``.

    ``GgmlMatrix(bytes, ggml_type, rows, cols)``; ``cols`` a multiple of 32.
    """

    def __new__(cls, bytes: Buffer, ggml_type: str, rows: int, cols: int) -> GgmlMatrix: ...
    @property
    def bytes(self) -> Buffer:
        """The blocks, uint8 ``[rows, bytes per row]``."""
    @property
    def ggml_type(self) -> str:
        """The block format's name."""
    @property
    def rows(self) -> int:
        """Rows of the matrix."""
    @property
    def cols(self) -> int:
        """Columns of the matrix (the length of x)."""
    def dequantize(self, queue: Queue) -> builtins.bytes:
        """The dequantised weights (row-major ``rows * cols`` float32) as ``bytes``, downloaded
        through ``queue`` (for references and tests)."""

def ggml_matvec(queue: Queue, m: GgmlMatrix, x: Buffer) -> Buffer:
    """``m @ x`` for a ``GgmlMatrix`` and ``x`` (float32, float16 or bfloat16) of ``[cols]`` or
    ``[batch, cols]`` (batch up to 8) into float32 ``[rows]`` / ``[batch, rows]``, the blocks
    read natively."""

def ggml_matvec_into(queue: Queue, m: GgmlMatrix, x: Buffer, out: Buffer) -> Fence:
    """``ggml_matvec`` into ``out``; returns the fence."""

@final
class EmbeddingTable:
    """An embedding table: ``vocab`` rows of ``cols`` values, in a ggml block format
    (``EmbeddingTable.blocks(m)`` of a ``GgmlMatrix``) or float32/float16/bfloat16
    (``EmbeddingTable.rows(buf)`` of a ``[vocab, cols]`` buffer)."""

    @staticmethod
    def blocks(m: GgmlMatrix) -> EmbeddingTable:
        """A table in a ggml block format: the matrix's rows are the vocabulary."""
    @staticmethod
    def rows(table: Buffer) -> EmbeddingTable:
        """A table of float32, float16 or bfloat16 values, ``[vocab, cols]``."""
    @property
    def vocab(self) -> int:
        """Rows in the table."""
    @property
    def cols(self) -> int:
        """Values per row."""

def embed_rows(queue: Queue, table: EmbeddingTable, ids: Buffer, dtype: Any = None) -> Buffer:
    """The rows ``ids`` (uint32 ``[n]``) of ``table`` as a fresh ``[n, cols]`` buffer of
    ``dtype`` (float32, float16 or bfloat16). An id past the vocabulary gives a row of NaN."""

def embed_rows_into(queue: Queue, table: EmbeddingTable, ids: Buffer, out: Buffer) -> Fence:
    """``embed_rows`` into ``out`` (``[n, cols]``); returns the fence."""
