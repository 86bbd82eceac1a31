//! Storage modes (what the caller asks for) and memory kinds (what a backend allocates).

/// Where a buffer's bytes live and who can touch them.
///
/// | mode | Metal | CUDA | CPU |
/// |---|---|---|---|
/// | Shared | StorageModeShared | pinned host memory mapped into the device | host memory |
/// | Private | StorageModePrivate | device memory | host memory the API refuses to map |
/// | External | no-copy buffer over caller memory | registered host memory | the memory itself |
/// | Auto | Shared | Private | Shared |
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StorageMode {
    /// The CPU and the device see the same bytes.
    Shared,
    /// Device-only; the host reaches it through staging transfers.
    Private,
    /// Caller-owned host memory wrapped without copying. Only created by wrapping.
    External,
    /// Memory another framework owns (a PyTorch tensor, a cudarc buffer, an `MTLBuffer`),
    /// wrapped without copying ([`Device::wrap_foreign`](crate::Device::wrap_foreign)). Host
    /// access works where the memory is host memory.
    Foreign,
    /// Shared on unified memory, Private on a discrete GPU.
    Auto,
}

impl StorageMode {
    /// Whether the host can read and write buffers of this mode directly. Foreign memory can
    /// be either: ask the buffer ([`Buffer::is_host_accessible`](crate::Buffer)).
    pub const fn host_accessible(self) -> bool {
        matches!(self, StorageMode::Shared | StorageMode::External)
    }

    /// The mode `Auto` stands for on a device with or without unified memory.
    pub const fn resolve(self, unified_memory: bool) -> StorageMode {
        match self {
            StorageMode::Auto if unified_memory => StorageMode::Shared,
            StorageMode::Auto => StorageMode::Private,
            other => other,
        }
    }

    /// The backend memory kind behind a resolved mode.
    pub(crate) const fn memory_kind(self) -> MemoryKind {
        match self {
            StorageMode::Private => MemoryKind::Device,
            StorageMode::External => MemoryKind::HostRegistered,
            StorageMode::Foreign => MemoryKind::Foreign,
            StorageMode::Shared | StorageMode::Auto => MemoryKind::HostShared,
        }
    }

    /// A short lower-case name for reports.
    pub const fn name(self) -> &'static str {
        match self {
            StorageMode::Shared => "shared",
            StorageMode::Private => "private",
            StorageMode::External => "external",
            StorageMode::Foreign => "foreign",
            StorageMode::Auto => "auto",
        }
    }
}

/// What may be done with memory: read and written, or only read.
///
/// Memory handed over read-only (a read-only mapping of a weights file, a tensor another
/// framework shares for reading) is `ReadOnly`: every write to it (a kernel output, an upload,
/// a host write guard) is refused with [`Error::ReadOnly`](crate::Error::ReadOnly), and the
/// backend registers it for reads only where the platform can. How one submission touches
/// memory is [`Access`](crate::Access).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MemoryAccess {
    /// Reads and writes.
    ReadWrite,
    /// Reads only.
    ReadOnly,
}

impl MemoryAccess {
    /// `ReadWrite` if `writable`, else `ReadOnly`.
    pub const fn writable_if(writable: bool) -> MemoryAccess {
        if writable {
            MemoryAccess::ReadWrite
        } else {
            MemoryAccess::ReadOnly
        }
    }

    /// Whether writes are allowed.
    pub const fn is_writable(self) -> bool {
        matches!(self, MemoryAccess::ReadWrite)
    }
}

/// The kinds of raw memory a backend hands out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MemoryKind {
    /// Device-local memory, not mapped for the host.
    Device,
    /// Host memory the device can address (pinned and mapped on CUDA, shared on Metal).
    HostShared,
    /// Caller memory registered with (wrapped for) the device, never allocated by the backend.
    HostRegistered,
    /// Memory another framework allocated and owns (`Backend::wrap_foreign`); never freed by
    /// the backend.
    Foreign,
}
