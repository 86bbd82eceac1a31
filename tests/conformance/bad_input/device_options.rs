//! Device and builder options, waits that could never complete, kernel constants.

use super::assert_no_leak;
use unibuf::{Buffer, DType, Device, Error, Fence, FillPattern, Queue, QueueId, StorageMode};
use unibuf_conformance::{builder, device};

// ---- opening (a refused open leaves no device to check for leaks) -----------------------------

#[test]
fn opening_an_unknown_backend_is_unavailable() {
    refused!(
        Device::open("nosuch"),
        Error::BackendUnavailable { name, reason } if name == "nosuch" && reason.contains("unknown"),
        ["'nosuch'", "not available"]
    );
}

#[test]
fn a_builder_with_an_unknown_backend_is_unavailable() {
    refused!(
        Device::builder().backend("Cpu ").open(),
        Error::BackendUnavailable { name, .. } if name == "Cpu ",
        ["'Cpu '"]
    );
}

#[test]
fn staging_chunks_below_4096_bytes_are_invalid() {
    refused!(
        builder().staging(1024, 4).open(),
        Error::InvalidArgument { what: "staging", detail } if detail.contains("1024 bytes x 4"),
        ["staging", "1024 bytes x 4", "4096"]
    );
}

#[test]
fn staging_with_no_chunks_is_invalid() {
    refused!(
        builder().staging(1 << 20, 0).open(),
        Error::InvalidArgument { what: "staging", detail } if detail.contains("1048576 bytes x 0"),
        ["1048576 bytes x 0"]
    );
}

#[test]
fn a_ledger_capacity_of_0_is_invalid() {
    refused!(
        builder().ledger_capacity(0).open(),
        Error::InvalidArgument {
            what: "ledger_capacity",
            ..
        },
        ["ledger_capacity", "at least 1"]
    );
}

// ---- waits: those that could never complete are refused at once, never a hang ----------------

/// A device whose queue has completed one fill.
struct Waited {
    dev: Device,
    q: Queue,
    b: Buffer,
    /// The fill's fence.
    done: Fence,
    /// The epochs the queue has submitted.
    submitted: u64,
}

impl Waited {
    fn new() -> Waited {
        let dev = device();
        let q = dev.queue();
        let b = dev.alloc(DType::U8, &[64], StorageMode::Shared).unwrap();
        let done = q.fill_async(&b, FillPattern::u8(1)).unwrap();
        dev.wait(done).unwrap();
        let submitted = q.last_fence().epoch;
        assert!(submitted >= 1);
        Waited {
            dev,
            q,
            b,
            done,
            submitted,
        }
    }

    /// A refused wait is no fault, and the real fence is still complete with the fill's bytes
    /// in place. Gives the device back for the leak check.
    fn check(self) -> Device {
        assert!(self.dev.fault().is_none(), "refused waits are not faults");
        assert!(self.dev.is_complete(self.done).unwrap());
        assert_eq!(self.b.to_vec::<u8>().unwrap(), [1; 64]);
        self.dev
    }
}

#[test]
fn waiting_for_an_epoch_never_submitted_is_invalid() {
    let w = Waited::new();
    let submitted = w.submitted;
    refused!(
        w.dev.wait(Fence { device: w.dev.id(), queue: w.q.id(), epoch: 1_000_000 }),
        Error::InvalidArgument { what: "epoch", detail }
            if detail.contains("1000000") && detail.contains(&format!("submitted {submitted} epochs")),
        ["1000000".to_owned(), format!("{}", w.q.id())]
    );
    let dev = w.check();
    assert_no_leak(&dev);
}

#[test]
fn a_queue_wait_for_the_next_epoch_of_an_idle_queue_is_invalid() {
    let w = Waited::new();
    let q2 = w.dev.new_queue("second").unwrap();
    refused!(
        q2.wait(Fence { device: w.dev.id(), queue: q2.id(), epoch: 1 }),
        Error::InvalidArgument { what: "epoch", detail } if detail.contains("cannot wait for 1"),
        ["submitted 0 epochs", "cannot wait for 1"]
    );
    drop(q2);
    let dev = w.check();
    assert_no_leak(&dev);
}

#[test]
fn waiting_on_a_queue_that_does_not_exist_is_invalid() {
    let w = Waited::new();
    refused!(
        w.dev.wait(Fence { device: w.dev.id(), queue: QueueId(999), epoch: 1 }),
        Error::InvalidArgument { what: "queue", detail } if detail.contains("queue 999"),
        ["queue 999 does not exist"]
    );
    let dev = w.check();
    assert_no_leak(&dev);
}

#[test]
fn is_complete_on_a_queue_that_does_not_exist_is_invalid() {
    let w = Waited::new();
    refused!(
        w.dev.is_complete(Fence { device: w.dev.id(), queue: QueueId(77), epoch: 3 }),
        Error::InvalidArgument { what: "queue", detail } if detail.contains("queue 77"),
        ["queue 77 does not exist"]
    );
    let dev = w.check();
    assert_no_leak(&dev);
}

#[test]
fn is_complete_on_an_epoch_never_submitted_is_invalid() {
    let w = Waited::new();
    refused!(
        w.dev.is_complete(Fence { epoch: w.done.epoch + 1_000_000, ..w.done }),
        Error::InvalidArgument { what: "fence", detail } if detail.contains("never will complete"),
        ["never will complete"]
    );
    let dev = w.check();
    assert_no_leak(&dev);
}

// ---- kernel constants -------------------------------------------------------------------------

#[test]
fn a_constant_name_that_is_not_an_identifier_is_invalid() {
    let dev = device();
    refused!(
        dev.kernel_with("anything", &unibuf::Constants::new().with("N=1 -DX", 2)),
        Error::InvalidArgument { what: "constants", detail } if detail.contains("not an identifier"),
        ["N=1 -DX", "not an identifier"]
    );
    assert_no_leak(&dev);
}
