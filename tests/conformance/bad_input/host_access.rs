//! Host access: Private buffers have none, guards are typed, and a guard refuses host and device
//! work that would overlap it.

use super::assert_no_leak;
use unibuf::{Buffer, DType, Device, Error, FillPattern, HostRead, HostWrite, StorageMode};
use unibuf_conformance::device;

/// A Private buffer of 4 f32, reached through transfers only.
fn private(dev: &Device) -> Buffer {
    dev.alloc_labelled("private", DType::F32, &[4], StorageMode::Private)
        .unwrap()
}

/// A Private buffer is reached through transfers instead.
fn reached_by_transfers(dev: &Device, private: &Buffer) {
    dev.queue()
        .upload(private, &[1.0f32, 2.0, 3.0, 4.0])
        .unwrap();
    assert_eq!(private.to_vec::<f32>().unwrap(), [1.0, 2.0, 3.0, 4.0]);
}

/// A Shared buffer of 24 ones in three ranges of 8 (bytes 0..32, 32..64 and 64..96), and a
/// second buffer of 4 to copy to and from.
struct Guarded {
    b: Buffer,
    first: Buffer,
    second: Buffer,
    third: Buffer,
    /// Bytes 16..48: under both guards.
    straddle: Buffer,
    other: Buffer,
}

impl Guarded {
    fn new(dev: &Device) -> Guarded {
        let b = dev
            .alloc_labelled("guarded", DType::F32, &[24], StorageMode::Shared)
            .unwrap();
        dev.queue().fill(&b, FillPattern::of(1.0f32)).unwrap();
        Guarded {
            first: b.slice(0..8).unwrap(),
            second: b.slice(8..16).unwrap(),
            third: b.slice(16..24).unwrap(),
            straddle: b.slice(4..12).unwrap(),
            other: dev
                .alloc_labelled("other", DType::F32, &[4], StorageMode::Shared)
                .unwrap(),
            b,
        }
    }

    /// A read guard on the first range and a write guard on the second; the third is never
    /// guarded.
    fn lock(&self) -> (HostRead<'_, f32>, HostWrite<'_, f32>) {
        (
            self.first.read::<f32>().unwrap(),
            self.second.write::<f32>().unwrap(),
        )
    }

    /// After the refused call: a range of the same allocation outside every guard is fine, as
    /// is a second reader; with the guards gone, the calls the guards refused succeed.
    fn check(&self, dev: &Device, (reader, writer): (HostRead<'_, f32>, HostWrite<'_, f32>)) {
        let q = dev.queue();
        q.fill(&self.third, FillPattern::of(3.0f32)).unwrap();
        q.upload(&self.third.slice(0..2).unwrap(), &[4.0f32, 5.0])
            .unwrap();
        q.copy(&self.third.slice(0..4).unwrap(), &self.other)
            .unwrap();
        assert_eq!(self.other.to_vec::<f32>().unwrap(), [4.0, 5.0, 3.0, 3.0]);
        let second_reader = self.first.read::<f32>().unwrap();
        assert_eq!(&*second_reader, &*reader);
        drop(second_reader);
        drop(writer);
        drop(reader);

        q.fill(&self.b.slice(6..7).unwrap(), FillPattern::of(2.0f32))
            .unwrap();
        q.upload(&self.straddle, &[5.0f32; 8]).unwrap();
        let all = self.b.read::<f32>().unwrap();
        assert_eq!(&all[..4], &[1.0; 4]);
        assert_eq!(&all[4..12], &[5.0; 8]);
        assert_eq!(&all[12..16], &[1.0; 4]);
        assert_eq!(&all[16..], &[4.0, 5.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0]);
    }
}

#[test]
fn host_read_of_a_private_buffer_is_not_host_accessible() {
    let dev = device();
    {
        let private = private(&dev);
        refused!(
            private.read::<f32>(),
            Error::NotHostAccessible {
                what: "host read",
                mode: StorageMode::Private
            },
            ["host read", "Private"]
        );
        reached_by_transfers(&dev, &private);
    }
    assert_no_leak(&dev);
}

#[test]
fn host_write_of_a_private_buffer_is_not_host_accessible() {
    let dev = device();
    {
        let private = private(&dev);
        refused!(
            private.write::<f32>(),
            Error::NotHostAccessible {
                what: "host write",
                mode: StorageMode::Private
            },
            ["host write", "Private"]
        );
        reached_by_transfers(&dev, &private);
    }
    assert_no_leak(&dev);
}

#[test]
fn host_read_with_the_wrong_element_type_is_a_dtype_mismatch() {
    let dev = device();
    {
        let g = Guarded::new(&dev);
        refused!(
            g.b.read::<u32>(),
            Error::DTypeMismatch {
                what: "host read",
                expected: DType::F32,
                got: DType::U32
            },
            ["expected dtype F32, got U32"]
        );
        assert_eq!(&*g.b.read::<f32>().unwrap(), &[1.0; 24]);
    }
    assert_no_leak(&dev);
}

#[test]
fn host_write_with_the_wrong_element_type_is_a_dtype_mismatch() {
    let dev = device();
    {
        let g = Guarded::new(&dev);
        refused!(
            g.b.write::<f64>(),
            Error::DTypeMismatch {
                what: "host write",
                expected: DType::F32,
                got: DType::F64
            },
            ["F32", "F64"]
        );
        assert_eq!(&*g.b.write::<f32>().unwrap(), &[1.0; 24]);
    }
    assert_no_leak(&dev);
}

#[test]
fn host_write_under_a_read_guard_conflicts() {
    let dev = device();
    {
        let g = Guarded::new(&dev);
        let guards = g.lock();
        refused!(
            g.straddle.write::<f32>(),
            Error::HostAccessConflict { what: "host write", label, start: 0, end: 32, held: "read-locked" }
                if label == "guarded",
            ["0..32", "'guarded'", "read-locked"]
        );
        g.check(&dev, guards);
    }
    assert_no_leak(&dev);
}

#[test]
fn host_read_under_a_write_guard_conflicts() {
    let dev = device();
    {
        let g = Guarded::new(&dev);
        let guards = g.lock();
        refused!(
            g.b.slice(10..11).unwrap().read::<f32>(),
            Error::HostAccessConflict {
                what: "host read",
                start: 32,
                end: 64,
                held: "write-locked",
                ..
            },
            ["32..64", "write-locked"]
        );
        g.check(&dev, guards);
    }
    assert_no_leak(&dev);
}

#[test]
fn host_write_under_a_write_guard_conflicts() {
    let dev = device();
    {
        let g = Guarded::new(&dev);
        let guards = g.lock();
        refused!(
            g.b.slice(15..17).unwrap().write::<f32>(),
            Error::HostAccessConflict {
                what: "host write",
                start: 32,
                end: 64,
                held: "write-locked",
                ..
            },
            ["32..64", "write-locked"]
        );
        g.check(&dev, guards);
    }
    assert_no_leak(&dev);
}

#[test]
fn device_fill_under_a_read_guard_conflicts() {
    let dev = device();
    {
        let g = Guarded::new(&dev);
        let guards = g.lock();
        let e = refused!(
            dev.queue()
                .fill(&g.b.slice(6..7).unwrap(), FillPattern::of(2.0f32)),
            Error::HostAccessConflict {
                what: "fill",
                start: 0,
                end: 32,
                held: "read-locked",
                ..
            },
            ["fill", "0..32", "read-locked"]
        );
        assert!(e.is_retryable(), "dropping the guard resolves it");
        g.check(&dev, guards);
    }
    assert_no_leak(&dev);
}

#[test]
fn device_copy_out_of_a_write_guarded_range_conflicts() {
    let dev = device();
    {
        let g = Guarded::new(&dev);
        let guards = g.lock();
        refused!(
            dev.queue().copy(&g.b.slice(10..14).unwrap(), &g.other),
            Error::HostAccessConflict {
                what: "copy",
                start: 32,
                end: 64,
                held: "write-locked",
                ..
            },
            ["copy", "32..64", "write-locked"]
        );
        g.check(&dev, guards);
    }
    assert_no_leak(&dev);
}

#[test]
fn device_copy_into_a_read_guarded_range_conflicts() {
    let dev = device();
    {
        let g = Guarded::new(&dev);
        let guards = g.lock();
        refused!(
            dev.queue().copy(&g.other, &g.b.slice(0..4).unwrap()),
            Error::HostAccessConflict {
                what: "copy",
                start: 0,
                end: 32,
                held: "read-locked",
                ..
            },
            ["copy", "0..32"]
        );
        g.check(&dev, guards);
    }
    assert_no_leak(&dev);
}

#[test]
fn upload_async_into_a_read_guarded_range_conflicts() {
    let dev = device();
    {
        let g = Guarded::new(&dev);
        let guards = g.lock();
        refused!(
            dev.queue()
                .upload_async(&g.b.slice(2..6).unwrap(), &[5.0f32; 4]),
            Error::HostAccessConflict {
                what: "upload",
                start: 0,
                end: 32,
                held: "read-locked",
                ..
            },
            ["upload", "0..32"]
        );
        g.check(&dev, guards);
    }
    assert_no_leak(&dev);
}

#[test]
fn upload_into_a_write_guarded_range_conflicts() {
    let dev = device();
    {
        let g = Guarded::new(&dev);
        let guards = g.lock();
        refused!(
            dev.queue().upload(&g.straddle, &[5.0f32; 8]),
            Error::HostAccessConflict { what: "upload", .. },
            ["upload", "'guarded'"]
        );
        g.check(&dev, guards);
    }
    assert_no_leak(&dev);
}

#[test]
fn download_of_a_write_guarded_range_conflicts() {
    let dev = device();
    {
        let g = Guarded::new(&dev);
        let guards = g.lock();
        refused!(
            dev.queue().download::<f32>(&g.b.slice(8..9).unwrap()),
            Error::HostAccessConflict {
                what: "download",
                start: 32,
                end: 64,
                held: "write-locked",
                ..
            },
            ["download", "32..64", "write-locked"]
        );
        g.check(&dev, guards);
    }
    assert_no_leak(&dev);
}
