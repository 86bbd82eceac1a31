//! Budgets and out of memory: requests that never fit, that do not fit now, whose size
//! overflows, and residency past its budget.

use super::assert_no_leak;
use unibuf::{Budget, DType, Device, Error, FillPattern, StorageMode};
use unibuf_conformance::{builder, device};

/// A device with a 4 MiB memory budget.
fn budgeted() -> Device {
    builder().memory_limit(4 << 20).open().unwrap()
}

/// Whatever was refused, the device still allocates and the memory works.
fn still_allocates(dev: &Device) {
    let b = dev.alloc(DType::U8, &[4096], StorageMode::Private).unwrap();
    dev.queue().fill(&b, FillPattern::u8(0x42)).unwrap();
    assert_eq!(b.to_vec::<u8>().unwrap(), [0x42; 4096]);
}

#[test]
fn six_mib_under_a_4_mib_budget_never_fit() {
    let dev = budgeted();
    refused!(
        dev.alloc(DType::U8, &[6 << 20], StorageMode::Shared),
        Error::NeverFits {
            requested: 6291456,
            limit: 4194304,
            limit_name: "memory budget"
        },
        ["6291456", "4194304", "memory budget"]
    );
    still_allocates(&dev);
    assert_no_leak(&dev);
}

#[test]
fn a_second_3_mib_under_a_4_mib_budget_exceeds_it() {
    let dev = budgeted();
    {
        let first = dev
            .alloc_labelled("first", DType::U8, &[3 << 20], StorageMode::Private)
            .unwrap();
        let e = refused!(
            dev.alloc(DType::U8, &[3 << 20], StorageMode::Private),
            Error::BudgetExceeded {
                which: "memory",
                budget: 4194304,
                ..
            },
            ["memory budget exceeded", "4194304"]
        );
        assert!(e.is_retryable(), "freeing memory can make it fit");
        assert!(dev.memory_stats().ooms >= 1);
        drop(first);
        let second = dev
            .alloc(DType::U8, &[3 << 20], StorageMode::Private)
            .expect("fits once the first is freed");
        dev.queue().fill(&second, FillPattern::u8(1)).unwrap();
        assert_eq!(
            second.slice(0..4096).unwrap().to_vec::<u8>().unwrap(),
            [1; 4096]
        );
    }
    assert_no_leak(&dev);
}

#[test]
fn half_of_usize_max_bytes_never_fit() {
    let dev = budgeted();
    let max_len = dev.info().max_buffer_len;
    let e = refused!(
        dev.alloc(DType::U8, &[usize::MAX / 2], StorageMode::Shared),
        Error::NeverFits { requested, limit, limit_name: "maximum buffer length" }
            if *requested == 1 << 63 && *limit == max_len,
        [(1usize << 63).to_string(), max_len.to_string()]
    );
    assert!(!e.is_retryable());
    still_allocates(&dev);
    assert_no_leak(&dev);
}

#[test]
fn usize_max_bytes_never_fit() {
    let dev = budgeted();
    let max_len = dev.info().max_buffer_len;
    refused!(
        dev.alloc(DType::U8, &[usize::MAX], StorageMode::Private),
        Error::NeverFits { requested: usize::MAX, limit, limit_name: "maximum buffer length" }
            if *limit == max_len,
        [usize::MAX.to_string()]
    );
    still_allocates(&dev);
    assert_no_leak(&dev);
}

#[test]
fn an_alloc_whose_element_count_overflows_is_invalid() {
    let dev = budgeted();
    refused!(
        dev.alloc(DType::F32, &[1 << 40, 1 << 40], StorageMode::Shared),
        Error::InvalidArgument { what: "shape", detail } if detail.contains("overflows"),
        ["[1099511627776, 1099511627776]", "overflows"]
    );
    still_allocates(&dev);
    assert_no_leak(&dev);
}

#[test]
fn an_alloc_whose_byte_size_overflows_is_invalid() {
    let dev = budgeted();
    refused!(
        dev.alloc(DType::F64, &[usize::MAX / 4], StorageMode::Private),
        Error::InvalidArgument { what: "shape", detail } if detail.contains("F64"),
        [(usize::MAX / 4).to_string(), "F64".to_owned()]
    );
    still_allocates(&dev);
    assert_no_leak(&dev);
}

#[test]
fn an_alloc_past_a_budget_set_at_run_time_never_fits() {
    let dev = budgeted();
    dev.set_budget(Budget {
        memory_limit: Some(4096),
        cache_limit: None,
    });
    refused!(
        dev.alloc(DType::U8, &[8192], StorageMode::Shared),
        Error::NeverFits {
            requested: 8192,
            limit: 4096,
            limit_name: "memory budget"
        },
        ["8192", "4096"]
    );
    dev.set_budget(Budget::default());
    // Without the budget the same request fits.
    drop(dev.alloc(DType::U8, &[8192], StorageMode::Shared).unwrap());
    still_allocates(&dev);
    assert_no_leak(&dev);
}

#[test]
fn one_byte_under_a_zero_budget_never_fits() {
    let zero = builder().memory_limit(0).open().unwrap();
    refused!(
        zero.alloc(DType::U8, &[1], StorageMode::Shared),
        Error::NeverFits {
            requested: 256,
            limit: 0,
            limit_name: "memory budget"
        },
        ["256", "the memory budget is 0 bytes"]
    );
    assert_no_leak(&zero);
}

#[test]
fn making_resident_past_the_residency_budget_exceeds_it() {
    let dev = device();
    {
        let b = dev.alloc(DType::U8, &[4096], StorageMode::Shared).unwrap();
        dev.set_residency_budget(Some(1000));
        let e = refused!(
            dev.make_resident(&b),
            Error::BudgetExceeded {
                which: "residency",
                requested: 4096,
                in_use: 0,
                budget: 1000
            },
            ["residency budget", "4096", "1000"]
        );
        assert!(e.is_retryable());
        assert!(!dev.is_resident(&b));
        dev.set_residency_budget(Some(8192));
        dev.make_resident(&b).unwrap();
        assert!(dev.is_resident(&b));
        assert_eq!(dev.residency_stats().resident_bytes, 4096);
    }
    assert_no_leak(&dev);
    assert_eq!(dev.residency_stats().resident_bytes, 0);
}

#[test]
fn making_resident_past_the_residency_budget_with_one_resident_exceeds_it() {
    let dev = device();
    {
        let b = dev.alloc(DType::U8, &[4096], StorageMode::Shared).unwrap();
        dev.set_residency_budget(Some(8192));
        dev.make_resident(&b).unwrap();
        let b2 = dev.alloc(DType::U8, &[8192], StorageMode::Private).unwrap();
        refused!(
            dev.make_resident(&b2),
            Error::BudgetExceeded {
                which: "residency",
                requested: 8192,
                in_use: 4096,
                budget: 8192
            },
            ["8192", "4096 bytes in use"]
        );
        assert_eq!(dev.residency_stats().resident_bytes, 4096);
        assert!(dev.evict(&b).unwrap());
        dev.make_resident(&b2).unwrap();
        assert_eq!(dev.residency_stats().resident_bytes, 8192);
    }
    assert_no_leak(&dev);
    assert_eq!(dev.residency_stats().resident_bytes, 0);
}
