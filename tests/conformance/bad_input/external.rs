//! Wrapping caller memory: writes to read-only memory, shapes larger than the memory, addresses
//! misaligned for the dtype, and nothing to wrap.

use super::{assert_no_leak, page_memory};
use std::sync::Arc;
use unibuf::{Buffer, DType, Device, Error, FillPattern, HostMemory, PageBuffer, StorageMode};
use unibuf_conformance::{device, Rng, TempFile};

/// Caller memory that starts `shift` bytes into a page: legal host memory whose address is
/// deliberately misaligned for wider dtypes.
struct Shifted {
    page: PageBuffer,
    shift: usize,
}

// SAFETY: the page buffer stays at its address while the value lives and is owned by it (so no
// one else writes it); the range `shift..len` lies inside it. Exposed read-only.
unsafe impl HostMemory for Shifted {
    fn as_bytes_ptr(&self) -> *const u8 {
        self.page.as_bytes_ptr().wrapping_add(self.shift)
    }
    fn byte_len(&self) -> usize {
        self.page.byte_len() - self.shift
    }
    fn writable(&self) -> bool {
        false
    }
}

/// A file of 4096 + 100 random bytes: a page and a part, so that a mapping at offset 1 still
/// holds 16 words.
fn random_file(tag: &str) -> (TempFile, Vec<u8>) {
    let mut rng = Rng::new(&format!("bad_input_external_{tag}"));
    let bytes = rng.bytes(4096 + 100);
    (
        TempFile::with_bytes(&mut rng, "bad-input", "bin", &bytes),
        bytes,
    )
}

/// Read-only memory shared through an `Arc` (other owners may read it), wrapped.
struct ArcWeights {
    values: Vec<f32>,
    shared: Arc<PageBuffer>,
    ro: Buffer,
}

impl ArcWeights {
    fn new(dev: &Device) -> ArcWeights {
        let values: Vec<f32> = (0..8).map(|i| i as f32).collect();
        let shared = Arc::new(page_memory(&values));
        let ro = dev
            .wrap_external("arc weights", shared.clone(), DType::F32, &[8])
            .unwrap();
        assert!(!ro.is_writable());
        ArcWeights { values, shared, ro }
    }

    /// Reading it, and copying out of it, are fine; the refused call wrote nothing; and the
    /// wrapped `Arc` is released once the buffer is gone, also after the refused call.
    fn check(self, dev: &Device) {
        assert_eq!(&*self.ro.read::<f32>().unwrap(), &self.values[..]);
        let out = dev.alloc(DType::F32, &[8], StorageMode::Private).unwrap();
        dev.queue().copy(&self.ro, &out).unwrap();
        assert_eq!(out.to_vec::<f32>().unwrap(), self.values);
        assert_eq!(
            &self.shared[..],
            bytemuck::cast_slice::<f32, u8>(&self.values)
        );
        drop((self.ro, out));
        dev.drain().unwrap();
        assert_eq!(
            Arc::strong_count(&self.shared),
            1,
            "the wrapped Arc was released, also after the refused call"
        );
    }
}

/// A read-only mapping of a random file, wrapped as bytes.
struct MappedFile {
    // Fields drop in order: the mapping goes before its file is removed.
    mapped: Buffer,
    bytes: Vec<u8>,
    _file: TempFile,
}

impl MappedFile {
    fn new(dev: &Device) -> MappedFile {
        let (file, bytes) = random_file("mapped");
        // SAFETY: the test owns the file and does not modify it while mapped.
        let map = unsafe { memmap2::Mmap::map(&file.open()) }.unwrap();
        let mapped = dev
            .wrap_external("mapped file", map, DType::U8, &[bytes.len()])
            .unwrap();
        MappedFile {
            mapped,
            bytes,
            _file: file,
        }
    }

    /// The refused call wrote nothing: the mapping still reads as the file.
    fn check(&self) {
        assert_eq!(&*self.mapped.read::<u8>().unwrap(), &self.bytes[..]);
    }
}

#[test]
fn fill_of_read_only_memory_is_refused() {
    let dev = device();
    {
        let w = ArcWeights::new(&dev);
        refused!(
            dev.queue().fill(&w.ro, FillPattern::of(0.0f32)),
            Error::ReadOnly { what: "fill", label } if label == "arc weights",
            ["fill", "'arc weights'", "read-only"]
        );
        w.check(&dev);
    }
    assert_no_leak(&dev);
}

#[test]
fn upload_into_read_only_memory_is_refused() {
    let dev = device();
    {
        let w = ArcWeights::new(&dev);
        refused!(
            dev.queue().upload(&w.ro, &[9.0f32; 8]),
            Error::ReadOnly { what: "upload", label } if label == "arc weights",
            ["upload", "'arc weights'"]
        );
        w.check(&dev);
    }
    assert_no_leak(&dev);
}

#[test]
fn upload_async_into_part_of_read_only_memory_is_refused() {
    let dev = device();
    {
        let w = ArcWeights::new(&dev);
        refused!(
            dev.queue()
                .upload_async(&w.ro.slice(2..4).unwrap(), &[9.0f32; 2]),
            Error::ReadOnly { what: "upload", .. },
            ["upload", "'arc weights'"]
        );
        w.check(&dev);
    }
    assert_no_leak(&dev);
}

#[test]
fn host_write_of_read_only_memory_is_refused() {
    let dev = device();
    {
        let w = ArcWeights::new(&dev);
        refused!(
            w.ro.write::<f32>(),
            Error::ReadOnly { what: "host write", label } if label == "arc weights",
            ["host write", "'arc weights'"]
        );
        w.check(&dev);
    }
    assert_no_leak(&dev);
}

#[test]
fn copy_into_read_only_memory_is_refused() {
    let dev = device();
    {
        let w = ArcWeights::new(&dev);
        let src = dev.alloc(DType::F32, &[8], StorageMode::Private).unwrap();
        dev.queue().fill(&src, FillPattern::of(7.0f32)).unwrap();
        refused!(
            dev.queue().copy(&src, &w.ro),
            Error::ReadOnly { what: "copy", .. },
            ["copy", "'arc weights'"]
        );
        assert_eq!(src.to_vec::<f32>().unwrap(), [7.0; 8]);
        drop(src);
        w.check(&dev);
    }
    assert_no_leak(&dev);
}

#[test]
fn fill_async_of_a_read_only_mapping_is_refused() {
    let dev = device();
    {
        let m = MappedFile::new(&dev);
        refused!(
            dev.queue()
                .fill_async(&m.mapped.slice(4000..4100).unwrap(), FillPattern::u8(0)),
            Error::ReadOnly { what: "fill", label } if label == "mapped file",
            ["fill", "'mapped file'"]
        );
        m.check();
    }
    assert_no_leak(&dev);
}

#[test]
fn host_write_of_a_read_only_mapping_is_refused() {
    let dev = device();
    {
        let m = MappedFile::new(&dev);
        refused!(
            m.mapped.slice(0..1).unwrap().write::<u8>(),
            Error::ReadOnly { what: "host write", label } if label == "mapped file",
            ["host write", "'mapped file'"]
        );
        m.check();
    }
    assert_no_leak(&dev);
}

#[test]
fn copy_async_into_a_read_only_mapping_is_refused() {
    let dev = device();
    {
        let m = MappedFile::new(&dev);
        let bytes_src = dev.alloc(DType::U8, &[100], StorageMode::Shared).unwrap();
        dev.queue().fill(&bytes_src, FillPattern::u8(0x5A)).unwrap();
        refused!(
            dev.queue()
                .copy_async(&bytes_src, &m.mapped.slice(0..100).unwrap()),
            Error::ReadOnly { what: "copy", label } if label == "mapped file",
            ["copy", "'mapped file'"]
        );
        drop(bytes_src);
        m.check();
    }
    assert_no_leak(&dev);
}

#[test]
fn wrapping_a_vec_with_a_shape_larger_than_it_is_out_of_bounds() {
    let dev = device();
    refused!(
        dev.wrap_external("short vec", vec![0.0f32; 10], DType::F32, &[11]),
        Error::OutOfBounds {
            what: "wrap_external: the shape in bytes",
            start: 0,
            end: 44,
            len: 40
        },
        ["0..44", "length 40"]
    );
    assert_no_leak(&dev);
}

#[test]
fn wrapping_a_mapping_with_a_shape_larger_than_it_is_out_of_bounds() {
    let dev = device();
    let (file, _) = random_file("short_map");
    // SAFETY: the test owns the file and does not modify it while mapped.
    let map = unsafe { memmap2::Mmap::map(&file.open()) }.unwrap();
    refused!(
        dev.wrap_external("short map", map, DType::U32, &[1050]),
        Error::OutOfBounds {
            what: "wrap_external: the shape in bytes",
            start: 0,
            end: 4200,
            len: 4196
        },
        ["0..4200", "length 4196"]
    );
    assert_no_leak(&dev);
}

#[test]
fn wrapping_with_a_shape_whose_size_overflows_is_invalid() {
    let dev = device();
    refused!(
        dev.wrap_external("huge", vec![0u8; 16], DType::U16, &[usize::MAX / 2 + 1]),
        Error::InvalidArgument { what: "shape", detail } if detail.contains("overflows"),
        [(usize::MAX / 2 + 1).to_string()]
    );
    assert_no_leak(&dev);
}

#[test]
fn wrapping_a_mapping_at_file_offset_1_as_u32_is_misaligned() {
    let dev = device();
    let (file, _) = random_file("offset_map");
    // SAFETY: the test owns the file and does not modify it while mapped.
    let map = unsafe { memmap2::MmapOptions::new().offset(1).map(&file.open()) }.unwrap();
    let addr = map.as_ptr() as usize;
    assert_eq!(addr % 4, 1, "memmap2 maps an offset inside its page");
    refused!(
        dev.wrap_external("offset map", map, DType::U32, &[16]),
        Error::Misaligned { what: "wrap_external: memory address for the dtype", value, align: 4 }
            if *value == addr,
        [format!("{addr} is not a multiple of 4")]
    );
    assert_no_leak(&dev);
}

#[test]
fn wrapping_memory_2_bytes_into_a_word_as_f32_is_misaligned() {
    let dev = device();
    let shifted = Shifted {
        page: PageBuffer::new(64).unwrap(),
        shift: 2,
    };
    let addr = shifted.as_bytes_ptr() as usize;
    refused!(
        dev.wrap_external("shifted", shifted, DType::F32, &[4]),
        Error::Misaligned { value, align: 4, .. } if *value == addr,
        [addr.to_string(), "multiple of 4".to_owned()]
    );
    // At its own alignment the same kind of memory wraps fine.
    {
        let ok = Shifted {
            page: PageBuffer::from_slice(&[0xFF; 64]).unwrap(),
            shift: 2,
        };
        let halves = dev
            .wrap_external("shifted u16", ok, DType::U16, &[4])
            .unwrap();
        assert_eq!(&*halves.read::<u16>().unwrap(), &[u16::MAX; 4]);
    }
    assert_no_leak(&dev);
}

#[test]
fn alloc_with_storage_mode_external_is_invalid() {
    let dev = device();
    refused!(
        dev.alloc(DType::F32, &[4], StorageMode::External),
        Error::InvalidArgument { what: "mode", detail } if detail.contains("wrap_external"),
        ["mode", "wrap_external"]
    );
    assert_no_leak(&dev);
}

#[test]
fn wrapping_empty_memory_is_invalid() {
    let dev = device();
    refused!(
        dev.wrap_external("empty", Vec::<f32>::new(), DType::F32, &[0]),
        Error::InvalidArgument { what: "wrap_external", detail } if detail.contains("empty"),
        ["0 bytes", "nothing to wrap"]
    );
    assert_no_leak(&dev);
}
