"""The fused inference ops, one function per ``unibuf::ops`` function.

Each op has two forms, as in Rust: ``op(queue, ...)`` queues the op and returns a fresh output
``Buffer``; ``op_into(queue, ..., out)`` writes a buffer the caller owns and returns the
submission's ``Fence``. Arithmetic is in f32 whatever the storage dtype (float32, float16,
bfloat16), rounded once to the output dtype.
"""

from __future__ import annotations

from . import _unibuf

_ops = _unibuf.ops

Q4Matrix = _ops.Q4Matrix
Q8Activations = _ops.Q8Activations
GgmlMatrix = _ops.GgmlMatrix
EmbeddingTable = _ops.EmbeddingTable
Q4_GROUPS = _ops.Q4_GROUPS
Q4_MAX_BATCH = _ops.Q4_MAX_BATCH
Q8_BLOCK = _ops.Q8_BLOCK
SAMPLE_MAX_K = _ops.SAMPLE_MAX_K
GGML_MAX_BATCH = _ops.GGML_MAX_BATCH

rms_norm = _ops.rms_norm
rms_norm_into = _ops.rms_norm_into
rms_norm_residual = _ops.rms_norm_residual
rms_norm_residual_into = _ops.rms_norm_residual_into
softmax = _ops.softmax
softmax_into = _ops.softmax_into
swiglu = _ops.swiglu
swiglu_into = _ops.swiglu_into
rope = _ops.rope
rope_into = _ops.rope_into
matmul = _ops.matmul
matmul_into = _ops.matmul_into
matmul_bt = _ops.matmul_bt
matmul_bt_into = _ops.matmul_bt_into
sample = _ops.sample
sample_into = _ops.sample_into
q4_matvec = _ops.q4_matvec
q4_matvec_into = _ops.q4_matvec_into
quantize_activations = _ops.quantize_activations
quantize_activations_into = _ops.quantize_activations_into
q4_matvec_q8 = _ops.q4_matvec_q8
q4_matvec_q8_into = _ops.q4_matvec_q8_into
ggml_matvec = _ops.ggml_matvec
ggml_matvec_into = _ops.ggml_matvec_into
embed_rows = _ops.embed_rows
embed_rows_into = _ops.embed_rows_into

__all__ = [name for name in dir() if not name.startswith("_") and name != "annotations"]
