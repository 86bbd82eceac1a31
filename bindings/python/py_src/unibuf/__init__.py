"""unibuf: the GPU memory and dispatch runtime for ML inference, from Python.

Typed buffers and zero-copy views on the CPU, CUDA and Metal backends; queues whose fences
make asynchronous work safe; fused inference ops (``unibuf.ops``); safetensors weights and a
streaming expert cache (``unibuf.weights``); a copy ledger that audits every byte moved
(``Device.copy_report()``); and DLPack both ways, so buffers are shared with PyTorch
(``unibuf.torch``), NumPy, CuPy and JAX without copying.

>>> import numpy as np, unibuf
>>> dev = unibuf.Device("cpu")
>>> q = dev.queue()
>>> x = dev.from_host(np.arange(8, dtype=np.float32).reshape(2, 4))
>>> w = dev.from_host(np.ones(4, dtype=np.float32))
>>> y = unibuf.ops.rms_norm(q, x, w, 1e-6)
>>> y.shape
(2, 4)
"""

from __future__ import annotations

from typing import Any, Optional

from . import errors, ops, weights
from ._unibuf import FEATURES, Buffer, CopyReport, Device, Fence, Queue, __version__, backends
from .errors import *  # noqa: F401,F403  (the exception classes are part of the API)

__all__ = [
    "Buffer",
    "CopyReport",
    "Device",
    "FEATURES",
    "Fence",
    "Queue",
    "__version__",
    "backends",
    "default_device",
    "errors",
    "from_dlpack",
    "ops",
    "weights",
]
__all__ += errors.__all__

_default: Optional[Device] = None


def default_device() -> Device:
    """The process's default device: ``Device()`` (``UNIBUF_BACKEND``, else the best
    available), opened on first use and reopened if it was closed."""
    global _default
    if _default is None or _default.closed:
        _default = Device()
    return _default


def from_dlpack(
    obj: Any,
    device: Optional[Device] = None,
    *,
    copy: Optional[bool] = None,
    read_only: bool = False,
    label: str = "dlpack",
    producer_stream: Optional[int] = None,
) -> Buffer:
    """Takes ``obj`` (anything with ``__dlpack__``) as a ``Buffer`` of ``device`` (default:
    ``default_device()``) without copying; see ``Device.from_dlpack``."""
    dev = device if device is not None else default_device()
    return dev.from_dlpack(
        obj, copy=copy, read_only=read_only, label=label, producer_stream=producer_stream
    )
