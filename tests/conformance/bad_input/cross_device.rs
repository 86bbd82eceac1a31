//! Cross-device misuse: one device's buffers and fences handed to another device or its queue.
//! Every case is refused with `WrongDevice`, naming both devices.

use super::assert_no_leak;
use unibuf::{Buffer, DType, Device, Error, Fence, FillPattern, Queue, StorageMode};
use unibuf_conformance::device;

/// Device A with buffer `a`, device B with buffer `b` and its queue: the cases hand A's things
/// to B.
struct TwoDevices {
    dev_a: Device,
    dev_b: Device,
    q_b: Queue,
    a: Buffer,
    b: Buffer,
    a_id: u64,
    b_id: u64,
    /// "device #A" and "device #B", which every message names.
    names: [String; 2],
}

impl TwoDevices {
    fn new() -> TwoDevices {
        let (dev_a, dev_b) = (device(), device());
        let (a_id, b_id) = (dev_a.id(), dev_b.id());
        assert_ne!(a_id, b_id);
        TwoDevices {
            q_b: dev_b.queue(),
            a: dev_a
                .alloc_labelled("a", DType::F32, &[8], StorageMode::Shared)
                .unwrap(),
            b: dev_b
                .alloc_labelled("b", DType::F32, &[8], StorageMode::Private)
                .unwrap(),
            a_id,
            b_id,
            names: [format!("device #{a_id}"), format!("device #{b_id}")],
            dev_a,
            dev_b,
        }
    }

    /// Whether `e` is the refusal of A's thing (`what`) on B: `WrongDevice`, expecting B and
    /// given A.
    fn is_wrong_device(&self, e: &Error, what: &str) -> bool {
        matches!(e, Error::WrongDevice { what: w, expected, got }
            if *w == what && *expected == self.b_id && *got == self.a_id)
    }

    /// A pending fill of `a` on device A.
    fn fence_a(&self) -> Fence {
        self.dev_a
            .queue()
            .fill_async(&self.a, FillPattern::of(1.0f32))
            .unwrap()
    }

    /// Each device still works with its own buffers. Gives the devices back for the leak
    /// checks.
    fn check(self) -> (Device, Device) {
        self.dev_a.queue().upload(&self.a, &[2.0f32; 8]).unwrap();
        self.q_b.upload(&self.b, &[3.0f32; 8]).unwrap();
        assert_eq!(self.a.to_vec::<f32>().unwrap(), [2.0; 8]);
        assert_eq!(self.b.to_vec::<f32>().unwrap(), [3.0; 8]);
        (self.dev_a, self.dev_b)
    }
}

#[test]
fn upload_through_another_devices_queue_is_the_wrong_device() {
    let t = TwoDevices::new();
    refused!(
        t.q_b.upload(&t.a, &[1.0f32; 8]),
        e if t.is_wrong_device(e, "upload destination"),
        ["upload destination", &t.names[0], &t.names[1]]
    );
    let (dev_a, dev_b) = t.check();
    assert_no_leak(&dev_a);
    assert_no_leak(&dev_b);
}

#[test]
fn upload_async_through_another_devices_queue_is_the_wrong_device() {
    let t = TwoDevices::new();
    refused!(
        t.q_b.upload_async(&t.a, &[1.0f32; 8]),
        e if t.is_wrong_device(e, "upload destination"),
        ["upload destination", &t.names[0], &t.names[1]]
    );
    let (dev_a, dev_b) = t.check();
    assert_no_leak(&dev_a);
    assert_no_leak(&dev_b);
}

#[test]
fn download_through_another_devices_queue_is_the_wrong_device() {
    let t = TwoDevices::new();
    refused!(
        t.q_b.download::<f32>(&t.a),
        e if t.is_wrong_device(e, "download source"),
        ["download source", &t.names[0], &t.names[1]]
    );
    let (dev_a, dev_b) = t.check();
    assert_no_leak(&dev_a);
    assert_no_leak(&dev_b);
}

#[test]
fn download_async_through_another_devices_queue_is_the_wrong_device() {
    let t = TwoDevices::new();
    refused!(
        t.q_b.download_async::<f32>(&t.a),
        e if t.is_wrong_device(e, "download source"),
        ["download source", &t.names[0], &t.names[1]]
    );
    let (dev_a, dev_b) = t.check();
    assert_no_leak(&dev_a);
    assert_no_leak(&dev_b);
}

#[test]
fn copy_from_another_devices_buffer_is_the_wrong_device() {
    let t = TwoDevices::new();
    refused!(
        t.q_b.copy(&t.a, &t.b),
        e if t.is_wrong_device(e, "copy source"),
        ["copy source", &t.names[0], &t.names[1]]
    );
    let (dev_a, dev_b) = t.check();
    assert_no_leak(&dev_a);
    assert_no_leak(&dev_b);
}

#[test]
fn copy_into_another_devices_buffer_is_the_wrong_device() {
    let t = TwoDevices::new();
    refused!(
        t.q_b.copy_async(&t.b, &t.a),
        e if t.is_wrong_device(e, "copy destination"),
        ["copy destination", &t.names[0], &t.names[1]]
    );
    let (dev_a, dev_b) = t.check();
    assert_no_leak(&dev_a);
    assert_no_leak(&dev_b);
}

#[test]
fn filling_another_devices_buffer_is_the_wrong_device() {
    let t = TwoDevices::new();
    refused!(
        t.q_b.fill(&t.a, FillPattern::of(0.0f32)),
        e if t.is_wrong_device(e, "fill destination"),
        ["fill destination", &t.names[0], &t.names[1]]
    );
    let (dev_a, dev_b) = t.check();
    assert_no_leak(&dev_a);
    assert_no_leak(&dev_b);
}

#[test]
fn making_another_devices_buffer_resident_is_the_wrong_device() {
    let t = TwoDevices::new();
    refused!(
        t.dev_b.make_resident(&t.a),
        e if t.is_wrong_device(e, "buffer"),
        ["buffer", &t.names[0], &t.names[1]]
    );
    let (dev_a, dev_b) = t.check();
    assert_no_leak(&dev_a);
    assert_no_leak(&dev_b);
}

#[test]
fn evicting_another_devices_buffer_is_the_wrong_device() {
    let t = TwoDevices::new();
    refused!(
        t.dev_b.evict(&t.a),
        e if t.is_wrong_device(e, "buffer"),
        ["buffer", &t.names[0], &t.names[1]]
    );
    let (dev_a, dev_b) = t.check();
    assert_no_leak(&dev_a);
    assert_no_leak(&dev_b);
}

#[test]
fn waiting_for_another_devices_fence_is_the_wrong_device() {
    let t = TwoDevices::new();
    let fence_a = t.fence_a();
    refused!(
        t.dev_b.wait(fence_a),
        e if t.is_wrong_device(e, "fence"),
        ["fence", &t.names[0], &t.names[1]]
    );
    t.dev_a.wait(fence_a).unwrap();
    assert_eq!(t.a.to_vec::<f32>().unwrap(), [1.0; 8]);
    let (dev_a, dev_b) = t.check();
    assert_no_leak(&dev_a);
    assert_no_leak(&dev_b);
}

#[test]
fn a_queue_wait_for_another_devices_fence_is_the_wrong_device() {
    let t = TwoDevices::new();
    let fence_a = t.fence_a();
    refused!(
        t.q_b.wait(fence_a),
        e if t.is_wrong_device(e, "fence"),
        ["fence", &t.names[0], &t.names[1]]
    );
    t.dev_a.wait(fence_a).unwrap();
    assert_eq!(t.a.to_vec::<f32>().unwrap(), [1.0; 8]);
    let (dev_a, dev_b) = t.check();
    assert_no_leak(&dev_a);
    assert_no_leak(&dev_b);
}

#[test]
fn is_complete_of_another_devices_fence_is_the_wrong_device() {
    let t = TwoDevices::new();
    let fence_a = t.fence_a();
    refused!(
        t.dev_b.is_complete(fence_a),
        e if t.is_wrong_device(e, "fence"),
        ["fence", &t.names[0], &t.names[1]]
    );
    t.dev_a.wait(fence_a).unwrap();
    assert_eq!(t.a.to_vec::<f32>().unwrap(), [1.0; 8]);
    let (dev_a, dev_b) = t.check();
    assert_no_leak(&dev_a);
    assert_no_leak(&dev_b);
}
