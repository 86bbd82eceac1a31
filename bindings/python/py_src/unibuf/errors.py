"""The exceptions unibuf raises: one class per kind of ``unibuf::Error``.

Each class also derives from the builtin exception a Python caller would catch for that kind of
problem (``MemoryError``, ``ValueError``, ``IndexError``, ``TypeError``, ``OSError``, ...), so
code written against the builtins keeps working. Every instance carries:

- ``kind``: the Rust variant's name (``"OutOfMemory"``, ``"ShapeMismatch"``, ...);
- ``is_retryable``: whether trying again later (after freeing memory, or once pending work
  completes) can succeed, as ``unibuf::Error::is_retryable`` says;
- the variant's fields as attributes (``requested``, ``expected``, ``got``, ...).
"""

from __future__ import annotations

__all__ = [
    "UnibufError",
    "OutOfMemoryError",
    "NeverFitsError",
    "BudgetExceededError",
    "OutOfBoundsError",
    "ShapeMismatchError",
    "DTypeMismatchError",
    "MisalignedError",
    "NotHostAccessibleError",
    "ReadOnlyError",
    "HostAccessConflictError",
    "WrongDeviceError",
    "InvalidArgumentError",
    "DeviceFaultError",
    "UnsupportedError",
    "BackendUnavailableError",
    "CompileError",
    "FormatError",
    "ExternalError",
    "IoError",
    "DeviceClosedError",
]


class UnibufError(Exception):
    """Base of every unibuf exception."""

    kind: str = "Error"
    is_retryable: bool = False


class OutOfMemoryError(UnibufError, MemoryError):
    """The allocation failed even after the cache was released; freeing buffers can help."""


class NeverFitsError(UnibufError, MemoryError):
    """The request can never fit on this device, whatever is freed."""


class BudgetExceededError(UnibufError, MemoryError):
    """The allocation would pass the memory or residency budget set for the device."""


class OutOfBoundsError(UnibufError, IndexError):
    """An offset, range or index lies outside the object it addresses."""


class ShapeMismatchError(UnibufError, ValueError):
    """Two shapes, lengths or element counts that must agree do not."""


class DTypeMismatchError(UnibufError, TypeError):
    """A dtype does not match the one required."""


class MisalignedError(UnibufError, ValueError):
    """A value is not a multiple of the alignment it needs."""


class NotHostAccessibleError(UnibufError):
    """The host tried to reach memory it cannot (a Private buffer of a discrete GPU)."""


class ReadOnlyError(UnibufError):
    """A write to memory that is read-only."""


class HostAccessConflictError(UnibufError):
    """Host access and device work overlap on the same bytes."""


class WrongDeviceError(UnibufError, ValueError):
    """A buffer, queue or fence of another device was passed."""


class InvalidArgumentError(UnibufError, ValueError):
    """An argument is invalid."""


class DeviceFaultError(UnibufError):
    """The device faulted while executing work; it stays faulted until ``Device.reset()``."""


class UnsupportedError(UnibufError, NotImplementedError):
    """The backend cannot do this."""


class BackendUnavailableError(UnibufError):
    """The backend is not compiled in, or no device of it was found."""


class CompileError(UnibufError):
    """A kernel failed to compile."""


class FormatError(UnibufError, ValueError):
    """A file (weights, traces) is malformed."""


class ExternalError(UnibufError):
    """Foreign work run on a unibuf queue failed."""


class IoError(UnibufError, OSError):
    """An I/O error, with the path or operation."""


class DeviceClosedError(UnibufError):
    """The device was closed (``Device.close()``); its buffers and queues cannot be used."""
