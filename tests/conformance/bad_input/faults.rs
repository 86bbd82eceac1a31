//! Faults: a kernel that fails or panics faults the device at its fence; the fault is sticky
//! (every later call returns it) until `reset`; and a fault nobody waited for is still the
//! device's state.
//!
//! CPU only: the faulting kernels are Rust CPU functions; other backends would need GPU
//! sources. Elsewhere every test here returns at once.

use super::{assert_no_leak, on_cpu, scale_args, SCALE};
use unibuf::{
    Buffer, CpuKernelArgs, DType, Device, Error, FaultKind, Fence, Kernel, KernelSource,
    LaunchDims, Param, Queue, StorageMode,
};
use unibuf_conformance::device;

fn boom_cpu(_: &mut CpuKernelArgs<'_>) -> Result<(), String> {
    Err("boom".to_owned())
}

fn panic_cpu(_: &mut CpuKernelArgs<'_>) -> Result<(), String> {
    panic!("kaboom")
}

const BOOM: KernelSource = KernelSource {
    name: "bad_input_boom",
    params: &[Param::output("y", DType::F32)],
    cuda: None,
    msl: None,
    cpu: Some(boom_cpu),
};

const PANICKY: KernelSource = KernelSource {
    name: "bad_input_panicky",
    cpu: Some(panic_cpu),
    ..BOOM
};

const DIMS: LaunchDims = LaunchDims::linear(1, 1);

/// A device with the test kernels, `x` = 1..=4, and a launch of `boom` on a queue labelled
/// "faulty step" that nobody has waited for yet.
struct Faulty {
    dev: Device,
    q: Queue,
    faulty: Queue,
    scale: Kernel,
    panicky: Kernel,
    x: Buffer,
    y: Buffer,
    /// The failing launch's fence.
    fence: Fence,
}

impl Faulty {
    fn launch() -> Faulty {
        let dev = device();
        for k in [SCALE, BOOM, PANICKY] {
            dev.register_kernel(k).unwrap();
        }
        let x = dev
            .alloc_labelled("x", DType::F32, &[4], StorageMode::Private)
            .unwrap();
        let y = dev
            .alloc_labelled("y", DType::F32, &[4], StorageMode::Shared)
            .unwrap();
        dev.queue().upload(&x, &[1.0f32, 2.0, 3.0, 4.0]).unwrap();
        let faulty = dev.queue().labelled("faulty step");
        let boom = dev.kernel("bad_input_boom").unwrap();
        let fence = faulty.launch(&boom, DIMS, &[(&y).into()]).unwrap();
        Faulty {
            q: dev.queue(),
            faulty,
            scale: dev.kernel("bad_input_scale").unwrap(),
            panicky: dev.kernel("bad_input_panicky").unwrap(),
            x,
            y,
            fence,
            dev,
        }
    }

    /// The device after the failing launch was waited for: it holds the fault.
    fn faulted() -> Faulty {
        let f = Faulty::launch();
        let e = f.dev.wait(f.fence).expect_err("the failing kernel faults");
        assert!(Faulty::is_boom(&e), "{e:?}");
        f
    }

    /// Whether `e` is the fault of the failing launch.
    fn is_boom(e: &Error) -> bool {
        matches!(e, Error::DeviceFault { kind: FaultKind::Trap, label, detail }
            if label == "faulty step" && detail == "boom")
    }

    /// Reset clears the fault; work succeeds again with correct results.
    fn recover(&self) {
        self.dev.reset().unwrap();
        assert!(self.dev.fault().is_none());
        let z = self
            .dev
            .alloc(DType::F32, &[4], StorageMode::Private)
            .unwrap();
        self.q.upload(&z, &[10.0f32, 20.0, 30.0, 40.0]).unwrap();
        let f = self
            .q
            .launch(&self.scale, DIMS, &scale_args(&z, &self.y, 0.5))
            .unwrap();
        self.dev.wait(f).unwrap();
        assert_eq!(&*self.y.read::<f32>().unwrap(), &[5.0, 10.0, 15.0, 20.0]);
        self.q
            .launch(&self.scale, DIMS, &scale_args(&self.x, &self.y, 3.0))
            .unwrap();
        assert_eq!(
            self.q.download::<f32>(&self.y).unwrap(),
            [3.0, 6.0, 9.0, 12.0]
        );
    }

    /// Recovers, then gives the device back for the leak check.
    fn check(self) -> Device {
        self.recover();
        self.into_device()
    }

    /// The device, with everything else here dropped.
    fn into_device(self) -> Device {
        self.dev
    }
}

#[test]
fn a_kernel_returning_err_faults_at_its_fence() {
    if !on_cpu() {
        return;
    }
    let f = Faulty::launch();
    let fault = refused!(
        f.dev.wait(f.fence),
        Error::DeviceFault { kind: FaultKind::Trap, label, detail }
            if label == "faulty step" && detail == "boom",
        ["kernel trap", "'faulty step'", "boom"]
    );
    assert!(fault.is_device_fault() && !fault.is_retryable());
    assert!(
        matches!(f.dev.fault(), Some(Error::DeviceFault { kind: FaultKind::Trap, label, .. }) if label == "faulty step")
    );
    let dev = f.check();
    assert_no_leak(&dev);
}

// Sticky: every call after the fault returns the same fault, until `reset`.

#[test]
fn alloc_after_a_fault_is_the_fault() {
    if !on_cpu() {
        return;
    }
    let f = Faulty::faulted();
    refused!(
        f.dev.alloc(DType::F32, &[4], StorageMode::Shared),
        e if Faulty::is_boom(e),
        ["'faulty step'", "boom"]
    );
    let dev = f.check();
    assert_no_leak(&dev);
}

#[test]
fn upload_after_a_fault_is_the_fault() {
    if !on_cpu() {
        return;
    }
    let f = Faulty::faulted();
    refused!(
        f.q.upload(&f.y, &[0.5f32; 4]),
        e if Faulty::is_boom(e),
        ["'faulty step'", "boom"]
    );
    let dev = f.check();
    assert_no_leak(&dev);
}

#[test]
fn launch_after_a_fault_is_the_fault() {
    if !on_cpu() {
        return;
    }
    let f = Faulty::faulted();
    refused!(
        f.q.launch(&f.scale, DIMS, &scale_args(&f.x, &f.y, 2.0)),
        e if Faulty::is_boom(e),
        ["'faulty step'", "boom"]
    );
    let dev = f.check();
    assert_no_leak(&dev);
}

#[test]
fn host_read_after_a_fault_is_the_fault() {
    if !on_cpu() {
        return;
    }
    let f = Faulty::faulted();
    refused!(
        f.y.read::<f32>(),
        e if Faulty::is_boom(e),
        ["'faulty step'", "boom"]
    );
    let dev = f.check();
    assert_no_leak(&dev);
}

#[test]
fn copy_after_a_fault_is_the_fault() {
    if !on_cpu() {
        return;
    }
    let f = Faulty::faulted();
    refused!(
        f.q.copy(&f.x, &f.y),
        e if Faulty::is_boom(e),
        ["'faulty step'", "boom"]
    );
    let dev = f.check();
    assert_no_leak(&dev);
}

#[test]
fn a_new_queue_after_a_fault_is_the_fault() {
    if !on_cpu() {
        return;
    }
    let f = Faulty::faulted();
    refused!(
        f.dev.new_queue("after the fault"),
        e if Faulty::is_boom(e),
        ["'faulty step'", "boom"]
    );
    let dev = f.check();
    assert_no_leak(&dev);
}

#[test]
fn drain_after_a_fault_is_the_fault() {
    if !on_cpu() {
        return;
    }
    let f = Faulty::faulted();
    refused!(
        f.dev.drain(),
        e if Faulty::is_boom(e),
        ["'faulty step'", "boom"]
    );
    let dev = f.check();
    assert_no_leak(&dev);
}

#[test]
fn waiting_again_on_the_faulted_queue_is_the_fault() {
    if !on_cpu() {
        return;
    }
    let f = Faulty::faulted();
    refused!(
        f.faulty.wait(f.fence),
        e if Faulty::is_boom(e),
        ["'faulty step'", "boom"]
    );
    let dev = f.check();
    assert_no_leak(&dev);
}

/// A panicking kernel is a fault too, also on a device that recovered from one, named by the
/// kernel when the queue has no label.
#[test]
fn a_panicking_kernel_faults_at_its_fence() {
    if !on_cpu() {
        return;
    }
    let f = Faulty::faulted();
    f.recover();
    let fence = f.q.launch(&f.panicky, DIMS, &[(&f.y).into()]).unwrap();
    refused!(
        f.q.wait(fence),
        Error::DeviceFault { kind: FaultKind::Trap, label, detail }
            if label == "bad_input_panicky" && detail.contains("panicked") && detail.contains("kaboom"),
        ["'bad_input_panicky'", "panicked", "kaboom"]
    );
    assert!(f.dev.fault().is_some());
    f.dev.reset().unwrap();
    f.q.upload(&f.y, &[1.0f32; 4]).unwrap();
    let done =
        f.q.launch(&f.scale, DIMS, &scale_args(&f.x, &f.y, -1.0))
            .unwrap();
    f.dev.wait(done).unwrap();
    assert_eq!(f.y.to_vec::<f32>().unwrap(), [-1.0, -2.0, -3.0, -4.0]);
    let dev = f.into_device();
    assert_no_leak(&dev);
}

// ---- a fault nobody waited for ----------------------------------------------------------------

/// A device whose kernel failed on queue "side" (labelled "unobserved step") with nobody
/// waiting for it, and the fault as `Device::fault` reports it.
struct Unobserved {
    dev: Device,
    _y: Buffer,
    seen: Option<Error>,
}

impl Unobserved {
    fn new() -> Unobserved {
        let dev = device();
        dev.register_kernel(BOOM).unwrap();
        let boom = dev.kernel("bad_input_boom").unwrap();
        let y = dev
            .alloc_labelled("y", DType::F32, &[4], StorageMode::Shared)
            .unwrap();
        let side = dev.new_queue("side").unwrap().labelled("unobserved step");
        side.launch(&boom, DIMS, &[(&y).into()]).unwrap();
        // Nobody waits for the launch: poll the device's own report of its state, bounded.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        let mut seen = dev.fault();
        while seen.is_none() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
            seen = dev.fault();
        }
        assert!(
            seen.is_some(),
            "Device::fault() is still None 3 s after a kernel on queue 'side' failed: the \
             device records a fault only when some call happens to observe it"
        );
        Unobserved { dev, _y: y, seen }
    }

    /// Cleans up whatever the state: observes the fault, then resets. Gives the device back
    /// for the leak check.
    fn check(self) -> Device {
        let _ = self.dev.drain();
        self.dev.reset().unwrap();
        assert!(self.dev.fault().is_none());
        self.dev
    }
}

#[test]
fn device_fault_reports_a_fault_nobody_waited_for() {
    if !on_cpu() {
        return;
    }
    let mut u = Unobserved::new();
    refused!(
        u.seen.take().map_or(Ok(()), Err),
        Error::DeviceFault { kind: FaultKind::Trap, label, detail }
            if label == "unobserved step" && detail == "boom",
        ["'unobserved step'", "boom"]
    );
    let dev = u.check();
    assert_no_leak(&dev);
}

#[test]
fn alloc_after_a_fault_nobody_waited_for_is_the_fault() {
    if !on_cpu() {
        return;
    }
    let u = Unobserved::new();
    refused!(
        u.dev.alloc(DType::F32, &[4], StorageMode::Shared),
        Error::DeviceFault { kind: FaultKind::Trap, label, .. } if label == "unobserved step",
        ["'unobserved step'"]
    );
    let dev = u.check();
    assert_no_leak(&dev);
}
