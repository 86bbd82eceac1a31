"""Weights: safetensors files loaded onto a device at line rate, and the streaming expert
cache for mixtures of experts."""

from __future__ import annotations

import os
import pathlib
from typing import (
    Dict,
    Iterator,
    List,
    Literal,
    Optional,
    Sequence,
    Tuple,
    TypedDict,
    Union,
    final,
    type_check_only,
)

from ._unibuf import Buffer, Device, Fence, Queue

__all__ = ["WeightsFile", "LoadedWeights", "Expert", "ExpertCache", "load"]

_StrPath = Union[str, "os.PathLike[str]"]
_Route = Literal["auto", "zero-copy", "zero_copy", "staged"]

# ---- the dicts returned by the introspection calls (no runtime classes: plain ``dict``s) ----

@type_check_only
class _TensorInfo(TypedDict):
    name: str
    dtype: str
    shape: List[int]
    file_dtype: str
    byte_len: int

@type_check_only
class _LoadReport(TypedDict):
    route: str
    tensors: int
    bytes: int
    copied_bytes: int
    copied_tensors: int
    allocations: int
    readers: int
    seconds: float
    gbps: float
    text: str

@type_check_only
class _ExpertStats(TypedDict):
    hits: int
    prefetch_hits: int
    misses: int
    evictions: int
    prefetches: int
    prefetch_dropped: int
    bytes_read: int
    stall_seconds: float
    resident: int
    hit_rate: float

# ---- classes ---------------------------------------------------------------------------------

@final
class WeightsFile:
    """An open safetensors or GGUF file whose header has been validated (no data read yet).

    ``WeightsFile(path)`` opens ``path``; a malformed file is a ``FormatError`` naming the
    tensor (or GGUF key) and the problem, a missing one an ``IoError``. A GGUF file's
    block-format tensors (Q8_0, Q4_0, Q4_1, ...) load as their bytes: uint8 of shape
    ``[rows, bytes per row]``.
    """

    def __new__(cls, path: _StrPath) -> WeightsFile: ...
    @property
    def path(self) -> pathlib.Path:
        """The file's path."""
    @property
    def tensors(self) -> List[_TensorInfo]:
        """The tensors: ``[{"name", "dtype", "shape", "file_dtype", "byte_len"}]`` in file order."""
    @property
    def format(self) -> str:
        """"safetensors" or "gguf"."""
    @property
    def metadata(self) -> Dict[str, str]:
        """The header's ``__metadata__`` strings (a GGUF file's key-value pairs as text)."""
    @property
    def data_len(self) -> int:
        """Bytes of tensor data."""

@final
class LoadedWeights:
    """Tensors loaded onto a device: a read-only mapping of name to ``Buffer``, with the load's
    ``report``.
    """

    def __getitem__(self, name: str, /) -> Buffer: ...
    def __contains__(self, name: object, /) -> bool: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[str]: ...
    def keys(self) -> List[str]:
        """The tensor names, in load order."""
    def items(self) -> List[Tuple[str, Buffer]]:
        """``(name, Buffer)`` pairs, in load order."""
    @property
    def report(self) -> _LoadReport:
        """The load's report: route, tensors, bytes, copied bytes, allocations, readers, seconds,
        GB/s, and the printed table as ``text``.
        """

def load(
    device: Device,
    file: Union[WeightsFile, _StrPath],
    *,
    names: Optional[Sequence[str]] = None,
    prefix: Optional[str] = None,
    route: _Route = "auto",
    queue: Optional[Queue] = None,
    readers: int = 0,
) -> LoadedWeights:
    """Loads tensors of a safetensors file onto ``device`` at line rate: zero-copy views of the
    mapped file on unified memory, parallel reads through pinned staging into packed device
    allocations on a discrete GPU. ``names`` (a list) or ``prefix`` select tensors (default:
    all). ``route``: "auto" (the above), "zero-copy" (views of the mapped file, also on a
    discrete GPU: read over the bus) or "staged" (always copied); ``queue``: the queue the
    copies go on (default: the device's); ``readers``: threads reading the file on the staged
    route (0: one per core, up to 16). ``file`` is a ``WeightsFile`` or a path. The GIL is
    released while it loads.
    """

@final
class Expert:
    """An expert on the device: its tensors by short name (``expert["w1"]``), and the fence of
    the copy that brought it. It keeps the memory alive after eviction.
    """

    def __getitem__(self, name: str, /) -> Buffer: ...
    def __len__(self) -> int: ...
    def __contains__(self, name: object, /) -> bool: ...
    def __iter__(self) -> Iterator[str]: ...
    def keys(self) -> List[str]:
        """The short tensor names."""
    @property
    def layer(self) -> int:
        """The layer."""
    @property
    def expert(self) -> int:
        """The expert's index in its layer."""
    @property
    def fence(self) -> Fence:
        """The fence of the copy that brought the expert (work using it waits by itself)."""

@final
class ExpertCache:
    """Streams the experts of a mixture-of-experts file through a per-layer device budget: a
    miss reads the expert now, ``prefetch`` reads predicted experts in the background, the
    least recently used is evicted. ``prefix`` is a format string naming expert ``e`` of
    layer ``l``, e.g. ``"layers.{layer}.experts.{expert}."`` (end it with a separator).

    ``ExpertCache(device, file, layers, experts, prefix, budget_per_layer)``: ``file`` is a
    ``WeightsFile`` or a path; ``layers`` x ``experts`` experts are named by ``prefix``; at most
    ``budget_per_layer`` experts (a count, at least 1) of each layer are kept on the device.
    It makes its own copy queue and prefetch thread.
    """

    def __new__(
        cls,
        device: Device,
        file: Union[WeightsFile, _StrPath],
        layers: int,
        experts: int,
        prefix: str,
        budget_per_layer: int,
    ) -> ExpertCache: ...
    def get(self, layer: int, expert: int) -> Expert:
        """Expert ``expert`` of ``layer`` on the device: a hit, a prefetch hit (waits for the
        read if still running) or a miss (reads now). Without the GIL.
        """
    def prefetch(self, layer: int, experts: Sequence[int]) -> None:
        """Reads the predicted ``experts`` of ``layer`` in the background."""
    def wait_prefetches(self) -> None:
        """Blocks (without the GIL) until the queued prefetches are done."""
    def resident(self, layer: int) -> List[int]:
        """The experts of ``layer`` on the device."""
    def stats(self) -> _ExpertStats:
        """Counters: hits, prefetch_hits, misses, evictions, prefetches, prefetch_dropped,
        bytes_read, stall_seconds, resident, hit_rate.
        """
