"""PyTorch interop: tensors as unibuf buffers and back, zero-copy, ordered on streams.

``wrap(t)`` takes a tensor as a ``Buffer`` (DLPack, no copy). On CUDA, unibuf's queue waits
device-side for the work PyTorch has enqueued on its current stream; the tensor's storage
stays alive until the last view of the buffer is dropped and the last unibuf work on it has
completed, even if the tensor is deleted meanwhile.

``as_tensor(buf)`` hands a buffer to PyTorch (``torch.from_dlpack``, no copy). PyTorch's
current stream waits device-side for unibuf's pending work on the buffer; no device sync
either way. The buffer's memory stays alive as long as the tensor.

Work PyTorch enqueues on a wrapped tensor *after* ``wrap`` (or unibuf work after
``as_tensor``) is not ordered by itself: wrap again, or join the streams with
``Queue.wait_cuda_stream(torch.cuda.current_stream().cuda_stream)``.

>>> import torch, unibuf.torch as ut
>>> t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
>>> buf = ut.wrap(t)
>>> buf.shape
(2, 3)
>>> ut.as_tensor(buf).sum().item()
15.0
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from ._unibuf import Buffer, Device

__all__ = ["device_for", "wrap", "as_tensor"]

_devices: Dict[Tuple[str, int], Device] = {}
# The same devices keyed by the torch.device objects seen, for the per-call path of `wrap`
# (building a torch.device costs microseconds).
_by_torch_device: Dict["torch.device", Device] = {}


def device_for(device: "torch.device | str | None" = None) -> Device:
    """The unibuf ``Device`` for a PyTorch device ("cpu", "cuda", "cuda:0", "mps"), opened on
    first use and kept. On CUDA it shares PyTorch's primary context."""
    d = torch.device(device if device is not None else "cpu")
    backend = {"cpu": "cpu", "cuda": "cuda", "mps": "metal"}.get(d.type)
    if backend is None:
        raise ValueError(f"unibuf has no backend for PyTorch device {d}")
    key = (backend, d.index or 0)
    dev = _devices.get(key)
    if dev is None or dev.closed:
        dev = Device(backend)
        _devices[key] = dev
    return dev


def wrap(
    t: torch.Tensor,
    device: Optional[Device] = None,
    *,
    read_only: bool = False,
    label: str = "torch",
) -> Buffer:
    """The tensor as a ``Buffer`` of ``device`` (default: ``device_for(t.device)``), sharing
    its memory. The tensor must be contiguous (``t.contiguous()`` first otherwise)."""
    dev = device if device is not None else _by_torch_device.get(t.device)
    if dev is None or dev.closed:
        dev = device_for(t.device)
        _by_torch_device[t.device] = dev
    # PyTorch's DLPack exchange API names its current stream to unibuf, whose queue waits for
    # it (an event, device-side); without the API, PyTorch orders its work before unibuf's
    # queue through the `stream` argument of `__dlpack__`.
    return dev.from_dlpack(t, copy=False, read_only=read_only, label=label)


def as_tensor(buf: Buffer) -> torch.Tensor:
    """The buffer as a tensor sharing its memory; PyTorch's current stream waits for unibuf's
    pending work on it. On CUDA the buffer must be Private (PyTorch refuses pinned-host DLPack
    tensors). Through PyTorch's DLPack exchange API where it has one (``Buffer.export_like``),
    else ``torch.from_dlpack``."""
    kind, index = buf.__dlpack_device__()
    if _PROBE is not None:
        if kind == 2:  # kDLCUDA
            return buf.export_like(_PROBE, stream=_current_raw_stream(index))
        if kind == 1:  # kDLCPU
            return buf.export_like(_PROBE)
    return torch.utils.dlpack.from_dlpack(buf)


# A tensor whose type carries PyTorch's DLPack exchange API (PyTorch 2.9 and later), if any.
_PROBE: Optional[torch.Tensor] = (
    torch.empty(0) if hasattr(torch.Tensor, "__dlpack_c_exchange_api__") else None
)


def _current_raw_stream(index: int) -> int:
    # The raw handle without building a torch.cuda.Stream (several microseconds per call).
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        return int(raw(index))
    return int(torch.cuda.current_stream(index).cuda_stream)
