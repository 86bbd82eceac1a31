# Type stubs for the compiled core of unibuf (``unibuf._unibuf``, a pyo3 extension module): the
# classes ``unibuf`` re-exports, with the ``ops`` and ``weights`` submodules (registered in
# ``sys.modules`` as ``unibuf._unibuf.ops`` and ``unibuf._unibuf.weights``) that ``unibuf.ops``
# and ``unibuf.weights`` re-export.
#
# Every docstring here is the runtime ``__doc__`` (the Rust doc comment, as pyo3 exposes it);
# where pyo3 exposes none (slot methods such as ``__len__``, module constants, type-only
# aliases) it is the Rust doc comment of the item. The extension module, ``__version__`` and
# ``FEATURES`` have no doc comment, hence the comments below instead of docstrings.

from __future__ import annotations

import builtins
import os
from typing import (
    Any,
    Dict,
    Iterator,
    List,
    Literal,
    Optional,
    Sequence,
    SupportsFloat,
    SupportsIndex,
    Tuple,
    TypedDict,
    Union,
    final,
    overload,
    type_check_only,
)

from . import ops as ops
from . import weights as weights
from .errors import UnibufError

__all__ = [
    "Device",
    "Queue",
    "Fence",
    "Buffer",
    "CopyReport",
    "backends",
    "__version__",
    "FEATURES",
    "ops",
    "weights",
]

# Names: NumPy's and PyTorch's ("float32", "half", "torch.bfloat16") or unibuf's ("f32",
# "BF16"), case-insensitive. Type-only: not present at runtime (see stubtest-allowlist.txt).
DTypeLike = Union[str, Any]
"""A dtype argument: a name, or any object whose ``str()`` is one (``torch.float16``,
``numpy.dtype('float32')``)."""

_StrPath = Union[str, "os.PathLike[str]"]

# The version of the unibuf crate this module was built from.
__version__: str

# The optional backends compiled in: a subset of ["cuda", "metal"] (the CPU backend is always
# there).
FEATURES: List[str]

# ---- the dicts returned by the introspection calls (no runtime classes: plain ``dict``s) ----

@type_check_only
class _DeviceInfo(TypedDict):
    name: str
    backend: str
    unified_memory: bool
    total_memory: int
    page_size: int
    max_buffer_len: int
    alloc_alignment: int
    timestamps: bool

@type_check_only
class _MemoryStats(TypedDict):
    active_bytes: int
    active_count: int
    requested_bytes: int
    peak_active_bytes: int
    reserved_bytes: int
    peak_reserved_bytes: int
    cached_bytes: int
    cached_count: int
    virtual_memory: bool
    cache_hits: int
    device_allocs: int
    device_frees: int
    device_call_ns: int
    oom_retries: int
    ooms: int
    external_bytes: int
    external_count: int
    foreign_bytes: int
    foreign_count: int
    staging_bytes: int
    growable_bytes: int
    growable_count: int

@type_check_only
class _Budget(TypedDict):
    memory_limit: Optional[int]
    cache_limit: Optional[int]

@type_check_only
class _LabelStats(TypedDict):
    label: str
    count: int
    encode_ns: int
    wait_ns: int
    waits: int
    gpu_ns: int
    timed: int

@type_check_only
class _SubmissionStats(TypedDict):
    gpu_timing: bool
    labels: List[_LabelStats]

@type_check_only
class _DirectionTotals(TypedDict):
    count: int
    bytes: int
    staged_bytes: int
    host_ns: int
    device_ns: Optional[int]

@type_check_only
class _SiteTotals(TypedDict):
    site: str
    direction: str
    count: int
    bytes: int
    staged_bytes: int

@type_check_only
class _BackendStatus(TypedDict):
    name: str
    compiled: bool
    found: bool
    detail: str

# ---- classes ---------------------------------------------------------------------------------

@final
class Device:
    """A device of one backend ("cpu", "cuda", "metal"): allocates buffers, makes queues, keeps the
    memory accounting, the copy ledger and the submission stats.

    ``Device(backend=None, *, memory_limit=None, cache_limit=None, gpu_timing=False)`` opens
    one: ``backend`` is "cpu", "cuda" or "metal", or None for ``UNIBUF_BACKEND``, else the best
    available. ``memory_limit`` caps the bytes the allocator holds (live plus cached),
    ``cache_limit`` the cached bytes; ``gpu_timing`` records device time per submission on
    CUDA (about a microsecond of host time each). Use it as a context manager, or call
    ``close()``, to drain it and refuse further work.
    """

    def __new__(
        cls,
        backend: Optional[str] = None,
        *,
        memory_limit: Optional[int] = None,
        cache_limit: Optional[int] = None,
        gpu_timing: bool = False,
    ) -> Device: ...
    @property
    def id(self) -> int:
        """The device's number in this process (fences and errors name it)."""
    @property
    def backend(self) -> str:
        """The backend's name: "cpu", "cuda" or "metal"."""
    @property
    def name(self) -> str:
        """The device's name as the driver gives it."""
    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called."""
    def info(self) -> _DeviceInfo:
        """What the backend reports: name, backend, unified_memory, total_memory, page_size,
        max_buffer_len, alloc_alignment, timestamps.
        """
    def queue(self, label: Optional[str] = None) -> Queue:
        """The device's default queue, or a labelled handle of it (the label names its
        submissions in the stats and traces). The same stream as every other handle.
        """
    def new_queue(self, label: str) -> Queue:
        """A new queue with its own stream (work on it runs concurrently with other queues';
        unibuf orders it by the buffers' fences).
        """
    def alloc(
        self,
        shape: Sequence[int],
        dtype: Optional[DTypeLike] = None,
        *,
        mode: str = "auto",
        label: str = "python",
    ) -> Buffer:
        """Allocates a buffer of ``shape`` and ``dtype`` in ``mode`` ("auto": Shared on unified
        memory, Private on a discrete GPU; "shared": host-visible; "private": device-only).
        ``dtype`` defaults to float32. Its contents are undefined until written.
        """
    def from_host(
        self,
        data: Any,
        *,
        dtype: Optional[DTypeLike] = None,
        shape: Optional[Sequence[int]] = None,
        mode: str = "auto",
        label: str = "python",
    ) -> Buffer:
        """A new buffer holding a copy of host data: ``bytes``, or any C-contiguous host object
        that speaks DLPack (a NumPy array, a CPU tensor). An array keeps its dtype (a
        different ``dtype`` is a ``DTypeMismatchError``) and its shape unless ``shape`` gives
        another of the same element count; bytes are uint8 unless ``dtype`` says otherwise,
        1-D unless ``shape`` is given.
        """
    def from_dlpack(
        self,
        obj: Any,
        *,
        copy: Optional[bool] = None,
        read_only: bool = False,
        label: str = "dlpack",
        producer_stream: Optional[int] = None,
    ) -> Buffer:
        """Takes a tensor of another framework without copying, through DLPack (``__dlpack__``):
        a PyTorch, CuPy, JAX or NumPy array on this device's memory. The buffer is Foreign
        memory; the producer's object stays alive until the last view is dropped and the last
        unibuf work that used it completes.

        Streams: by default the producer is asked to make the data ready on this device's
        queue (``__dlpack__(stream=...)``). With ``producer_stream`` (a ``CUstream`` as an
        integer, e.g. ``torch.cuda.current_stream().cuda_stream``) the producer is asked for no
        synchronisation and unibuf's queue waits for that stream instead, device-side.
        ``copy`` has the Array API's meaning: None copies only what cannot be shared (a strided
        tensor, into a fresh buffer: a recorded device copy), False never copies (a strided
        tensor is an ``InvalidArgumentError``), True always copies.
        """
    def memory_stats(self) -> _MemoryStats:
        """The allocator's accounting: active, reserved, cached, peak, foreign and staging bytes,
        cache hits, device calls, OOM retries.
        """
    def memory_by_label(self) -> List[Tuple[str, int, int]]:
        """Live memory per label: a list of ``(label, bytes, buffers)``, most bytes first."""
    def budget(self) -> _Budget:
        """The memory budget: ``{"memory_limit": int | None, "cache_limit": int | None}``."""
    def set_budget(
        self, *, memory_limit: Optional[int] = None, cache_limit: Optional[int] = None
    ) -> None:
        """Sets the memory budget (None lifts a limit)."""
    def set_residency_budget(self, bytes: Optional[int] = None) -> None:
        """Caps the bytes made resident (Metal residency sets; elsewhere accounting only)."""
    def trim(self) -> int:
        """Releases cached blocks whose work is complete; returns the bytes released."""
    def copy_report(self) -> CopyReport:
        """The copy audit: every byte moved, by direction and by call site (``CopyReport``;
        ``str()`` prints the table).
        """
    def clear_copy_ledger(self) -> None:
        """Forgets the copy ledger's records and totals (to audit one phase of a program)."""
    def submission_stats(self) -> _SubmissionStats:
        """Per-label submission counts and host/device times: ``{"gpu_timing": bool, "labels":
        [{"label", "count", "encode_ns", "wait_ns", "waits", "gpu_ns", "timed"}]}``.
        """
    def reset_submission_stats(self) -> None:
        """Zeroes the submission stats."""
    def chrome_trace(self) -> str:
        """The submissions and copies as a Chrome trace (JSON text for chrome://tracing or
        Perfetto).
        """
    def write_chrome_trace(self, path: _StrPath) -> None:
        """Writes the Chrome trace to ``path``."""
    def warm_all(self) -> int:
        """Compiles every registered kernel now (instead of on first use); returns how many."""
    def drain(self) -> None:
        """Blocks (without the GIL) until every queue's submitted work completes."""
    def wait(self, fence: Fence) -> None:
        """Blocks (without the GIL) until ``fence`` completes."""
    def is_complete(self, fence: Fence) -> bool:
        """Whether ``fence`` has completed (never blocks)."""
    def fault(self) -> Optional[UnibufError]:
        """The sticky device fault, as the exception it would raise, or None."""
    def reset(self) -> None:
        """Clears a device fault after the faulted work has been dealt with."""
    def close(self) -> None:
        """Drains the device (without the GIL), releases its cached memory and refuses all later
        work with ``DeviceClosedError``: allocations, queues, transfers, fills, ops, waits,
        views, DLPack exchanges, loads and expert reads, on the device, its queues and its
        buffers. What was recorded stays readable (info, memory stats, the copy report,
        submission stats, traces, buffer properties). Memory still viewed by live buffers (or
        exported through DLPack) is freed when they are. Closing twice is a no-op.
        """
    def __enter__(self) -> Device: ...
    def __exit__(self, *_args: object) -> Literal[False]: ...

@final
class Queue:
    """A queue of a device: transfers, fills and ops run on it in order. A label names its
    submissions in the stats, faults and traces (``queue.labelled("decode")``).
    """

    @property
    def device(self) -> Device:
        """The device this queue belongs to."""
    @property
    def label(self) -> Optional[str]:
        """The queue's label, or None for the unlabelled default."""
    @property
    def id(self) -> int:
        """The queue's number on its device (fences name it)."""
    def labelled(self, label: str) -> Queue:
        """A handle of the same queue whose submissions carry ``label``."""
    def upload(self, dst: Buffer, src: Any) -> None:
        """Copies host data into ``dst`` and returns once the data is on the device (the source
        may then be reused). ``src`` is ``bytes`` or a host DLPack object (a NumPy array, a CPU
        tensor) of ``dst``'s dtype and element count, C-contiguous. Staged where the hardware
        needs it; the GIL is released while it runs.
        """
    def download(self, src: Buffer) -> bytes:
        """The contents of ``src`` as ``bytes`` (blocks without the GIL until the work writing
        it is done).
        """
    def download_into(self, src: Buffer, out: Any) -> None:
        """Copies ``src`` into ``out``, a writable C-contiguous host DLPack object (a NumPy
        array) of its dtype and element count. Blocks without the GIL until done.
        """
    def copy(self, src: Buffer, dst: Buffer) -> None:
        """Copies ``src`` into ``dst`` (same dtype and length) on the device and waits for it
        (without the GIL); ``copy_async`` returns at once with a fence.
        """
    def copy_async(self, src: Buffer, dst: Buffer) -> Fence:
        """Queues a device copy of ``src`` into ``dst`` and returns its fence at once."""
    def fill(self, dst: Buffer, value: Union[SupportsFloat, SupportsIndex]) -> None:
        """Fills ``dst`` with ``value`` (converted to its dtype) and waits."""
    def fill_async(self, dst: Buffer, value: Union[SupportsFloat, SupportsIndex]) -> Fence:
        """Queues a fill of ``dst`` with ``value`` and returns its fence at once."""
    def wait(self, fence: Fence) -> None:
        """Blocks (without the GIL) until ``fence`` completes."""
    def drain(self) -> None:
        """Blocks (without the GIL) until everything submitted to this queue completes."""
    def last_fence(self) -> Fence:
        """The fence of the last submission to this queue."""
    def native(self) -> int:
        """The native queue as an integer: the ``CUstream`` on CUDA (for
        ``torch.cuda.ExternalStream``), the ``MTLCommandQueue`` on Metal, 0 on the CPU.
        """
    def wait_cuda_stream(self, stream: int) -> Fence:
        """Makes this queue's later work wait, device-side, for everything enqueued so far on a
        foreign CUDA stream (a ``CUstream`` as an integer, e.g.
        ``torch.cuda.current_stream().cuda_stream``). Returns the wait's fence.

        The stream must be a live stream of this device's context.
        """

@final
class Fence:
    """A point in one queue's work: complete once the queue has run everything submitted before
    it. Returned by asynchronous calls and by the ``*_into`` ops; wait with ``Queue.wait``.
    """

    @property
    def device(self) -> int:
        """The device's id."""
    @property
    def queue(self) -> int:
        """The queue's number on its device."""
    @property
    def epoch(self) -> int:
        """The epoch on that queue (0: complete from the start)."""
    def __eq__(self, value: object, /) -> bool: ...
    def __ne__(self, value: object, /) -> bool: ...
    def __hash__(self) -> int: ...

@final
class Buffer:
    """A typed, row-major view of device memory: a whole allocation or a view of one (``rows``,
    ``slice``, ``reshape``, ``cast``, ``buf[i:j]``). Views share memory and keep it alive;
    unibuf reuses memory only after the last view is gone and the last work that used it has
    completed.

    Hand a buffer to PyTorch, NumPy, CuPy or JAX without copying through DLPack
    (``torch.from_dlpack(buf)``, ``numpy.from_dlpack(buf)``); the consumer's stream is
    ordered after unibuf's pending work on it.
    """

    @property
    def dtype(self) -> str:
        """The dtype's NumPy / PyTorch name ("float32", "bfloat16", ...)."""
    @property
    def shape(self) -> Tuple[int, ...]:
        """The shape, row-major."""
    @property
    def ndim(self) -> int:
        """The number of dimensions."""
    @property
    def size(self) -> int:
        """Elements in the view."""
    @property
    def nbytes(self) -> int:
        """Bytes in the view."""
    @property
    def byte_offset(self) -> int:
        """The view's offset in its allocation, in bytes."""
    @property
    def mode(self) -> str:
        """The storage mode: "shared", "private", "external" or "foreign"."""
    @property
    def label(self) -> str:
        """The label given at allocation (stats, errors and the ledger name it)."""
    @property
    def is_host_accessible(self) -> bool:
        """Whether the host can address the memory (Shared, External, host Foreign memory)."""
    @property
    def is_writable(self) -> bool:
        """Whether the memory can be written (False over read-only mappings and read-only
        imports).
        """
    @property
    def device_address(self) -> int:
        """The address of the first element on the device (for foreign kernels)."""
    @property
    def device(self) -> Device:
        """The device the buffer lives on."""
    def shares_memory_with(self, other: Buffer) -> bool:
        """Whether two views share one allocation."""
    def slice(self, start: Optional[int] = None, stop: Optional[int] = None) -> Buffer:
        """A 1-D view of elements ``start:stop`` of the flattened buffer."""
    def rows(self, start: Optional[int] = None, stop: Optional[int] = None) -> Buffer:
        """A view of rows ``start:stop`` along the first dimension."""
    @overload
    def reshape(self, shape: Sequence[int], /) -> Buffer:
        """The same elements with another shape of the same element count."""
    @overload
    def reshape(self, *shape: int) -> Buffer:
        """The same elements with another shape of the same element count."""
    def cast(self, dtype: DTypeLike) -> Buffer:
        """The same bytes as another dtype (the last dimension rescaled by the size ratio)."""
    def __getitem__(self, key: Union[SupportsIndex, builtins.slice], /) -> Buffer:
        """``buf[i:j]``: rows ``i:j`` (step 1); ``buf[i]``: row ``i`` without its first
        dimension.
        """
    def __len__(self) -> int:
        """The length of the first dimension (a 0-d buffer has none: ``TypeError``)."""
    def __iter__(self) -> Iterator[Buffer]:
        """Iterates over the rows (``buf[0]``, ``buf[1]``, ...), as NumPy does."""
    def numpy(self) -> Any:
        """A copy of the contents as a NumPy array (downloaded from device memory, or copied from
        host memory); for a zero-copy view of host memory use ``numpy.from_dlpack(buf)``.
        bfloat16 has no NumPy dtype: ``cast("uint16")`` first, or use PyTorch.
        """
    def export_like(self, like: Any, *, stream: Optional[int] = None) -> Any:
        """The buffer as an object of ``like``'s framework (e.g. a ``torch.Tensor`` when ``like``
        is one), zero-copy, through the framework's DLPack C exchange API
        (``__dlpack_c_exchange_api__``): no Python-level ``from_dlpack`` runs, which is what
        makes it fast. ``stream`` is the framework's current stream on this device (a
        ``CUstream`` as an integer; 0 is the legacy default stream), which waits device-side for
        unibuf's pending work on the buffer, as the ``stream`` of ``__dlpack__``; None waits on
        the host. ``UnsupportedError`` if the framework has no exchange API."""
    def native(self) -> int:
        """The native handle as an integer: the ``CUdeviceptr`` on CUDA, the ``id<MTLBuffer>``
        on Metal (add ``byte_offset``), the host address on the CPU.
        """
    def __dlpack_device__(self) -> Tuple[int, int]:
        """The DLPack device: ``(device_type, device_id)`` (1: CPU, 2: CUDA, 3: CUDA host, 8:
        Metal).
        """
    def __dlpack__(
        self,
        *,
        stream: Optional[Any] = None,
        max_version: Optional[Tuple[int, int]] = None,
        dl_device: Optional[Tuple[int, int]] = None,
        copy: Optional[bool] = None,
    ) -> Any:
        """Exports the view through DLPack, zero-copy (a ``dltensor_versioned`` capsule when the
        consumer passes ``max_version`` >= (1, 0), else a legacy ``dltensor``). unibuf's
        pending work on the buffer is ordered before ``stream`` (device-side on CUDA); with no
        stream the call waits for it, without the GIL. ``copy=True`` and other devices are
        refused (``BufferError``): unibuf exports only what it can share.
        """

@final
class CopyReport:
    """The copy audit: the bytes moved per direction ("host->device", "device->host",
    "device->device", "fill", and "shared" for zero-byte hand-overs such as DLPack exchanges)
    and per call site. ``str(report)`` is the table ``unibuf`` prints.
    """

    @property
    def directions(self) -> Dict[str, _DirectionTotals]:
        """Per direction: ``{name: {"count", "bytes", "staged_bytes", "host_ns", "device_ns"}}``
        (``device_ns`` None where the backend does not time copies).
        """
    @property
    def sites(self) -> List[_SiteTotals]:
        """Per call site and direction, most bytes first: ``[{"site", "direction", "count",
        "bytes", "staged_bytes"}]``. Sites are ``file:line`` of the caller into unibuf.
        """
    @property
    def total_bytes(self) -> int:
        """Bytes moved in every direction together (zero-byte "shared" records add nothing)."""
    @property
    def dropped_records(self) -> int:
        """Detailed records dropped from the ring (the totals still include them)."""

def backends() -> List[_BackendStatus]:
    """Every backend, best first: ``[{"name", "compiled", "found", "detail"}]``."""
