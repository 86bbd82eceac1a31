//! The sticky fault state: once work on a device faults, every later call fails with that
//! fault until the device is reset.
//!
//! A GPU fault poisons the context (CUDA) or leaves the results of the faulting command buffer
//! undefined (Metal), so going on as if nothing happened would hand out wrong data. The first
//! fault found is kept and returned by every later call, naming the submission that faulted.

use crate::error::{Error, Result};
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// The first device fault seen since the last reset, if any.
#[derive(Default)]
pub(crate) struct FaultState {
    first: Mutex<Option<Error>>,
    /// Whether `first` holds a fault. Every call checks, so the lock is taken only once one
    /// is recorded. Set under the lock after the fault is stored and cleared with it, so the
    /// flag never outlives the fault.
    faulted: AtomicBool,
}

impl FaultState {
    /// The recorded fault as an error, if there is one.
    pub fn check(&self) -> Result<()> {
        if !self.faulted.load(Ordering::Acquire) {
            return Ok(());
        }
        match &*self.first.lock() {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    /// Passes `result` through, recording a device fault in it as the sticky state unless one
    /// is recorded already (the first fault is the one that explains the rest).
    pub fn note<T>(&self, device: u64, result: Result<T>) -> Result<T> {
        if let Err(e @ Error::DeviceFault { .. }) = &result {
            let mut first = self.first.lock();
            first.get_or_insert_with(|| {
                tracing::error!(
                    device,
                    "device fault, the device stays faulted until reset: {e}"
                );
                e.clone()
            });
            self.faulted.store(true, Ordering::Release);
            drop(first);
        }
        result
    }

    /// Forgets the recorded fault (after the backend has reset its context).
    pub fn clear(&self) {
        let mut first = self.first.lock();
        *first = None;
        self.faulted.store(false, Ordering::Release);
        drop(first);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::FaultKind;

    fn fault(label: &str) -> Error {
        Error::DeviceFault {
            kind: FaultKind::Trap,
            label: label.to_owned(),
            detail: String::new(),
        }
    }

    #[test]
    fn the_first_fault_sticks_until_cleared() {
        let faults = FaultState::default();
        assert!(faults.check().is_ok());
        assert!(faults.note(1, Ok::<_, Error>(3)).is_ok());
        // Other errors pass through without faulting the device.
        let other = faults.note::<()>(1, Err(Error::invalid("x", "y")));
        assert!(other.is_err());
        assert!(faults.check().is_ok());
        assert!(faults.note::<()>(1, Err(fault("first"))).is_err());
        assert!(faults.note::<()>(1, Err(fault("second"))).is_err());
        match faults.check() {
            Err(Error::DeviceFault { label, .. }) => assert_eq!(label, "first"),
            other => panic!("expected the first fault, got {other:?}"),
        }
        faults.clear();
        assert!(faults.check().is_ok());
    }
}
