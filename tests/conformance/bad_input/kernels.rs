//! Kernels: registrations the registry refuses, kernels that cannot compile, and the checks a
//! launch makes before anything runs (arguments, dims, overlap, devices, read-only memory, host
//! guards).

use super::{assert_no_leak, can_launch, page_memory, scale_args, SCALE, SCALE_PARAMS};
use std::sync::Arc;
use unibuf::{
    Buffer, DType, Device, Error, Kernel, KernelSource, LaunchDims, Param, Queue, StorageMode,
};
use unibuf_conformance::{backend_name, device};

/// Two parameters named alike.
const TWICE_PARAMS: &[Param] = &[
    Param::input("x", DType::F32),
    Param::output("x", DType::F32),
];

/// A kernel with no source for any backend.
const NO_SOURCE: KernelSource = KernelSource {
    name: "bad_input_no_source",
    params: SCALE_PARAMS,
    cuda: None,
    msl: None,
    cpu: None,
};

// ---- registry and compile (every backend) -----------------------------------------------------

/// A device with the test kernel and the kernel without a source registered.
fn registered() -> Device {
    let dev = device();
    dev.register_kernel(SCALE).unwrap();
    dev.register_kernel(NO_SOURCE).unwrap();
    dev
}

/// The refused call left nothing behind in the registry (besides the built-in ops' kernels).
fn assert_only_the_test_kernels(dev: &Device) {
    let user_kernels: Vec<&str> = dev
        .kernel_names()
        .into_iter()
        .filter(|n| !n.starts_with("unibuf_"))
        .collect();
    assert_eq!(user_kernels, ["bad_input_no_source", "bad_input_scale"]);
}

#[test]
fn registering_a_duplicate_name_is_invalid() {
    let dev = registered();
    refused!(
        dev.register_kernel(SCALE),
        Error::InvalidArgument { what: "kernel", detail } if detail.contains("already registered"),
        ["'bad_input_scale'", "already registered"]
    );
    assert_only_the_test_kernels(&dev);
    assert_no_leak(&dev);
}

#[test]
fn registering_duplicate_parameter_names_is_invalid() {
    let dev = registered();
    refused!(
        dev.register_kernel(KernelSource {
            name: "bad_input_twice",
            params: TWICE_PARAMS,
            ..SCALE
        }),
        Error::InvalidArgument { what: "kernel", detail } if detail.contains("twice"),
        ["'bad_input_twice'", "parameter 'x' twice"]
    );
    assert_only_the_test_kernels(&dev);
    assert_no_leak(&dev);
}

#[test]
fn registering_an_empty_name_is_invalid() {
    let dev = registered();
    refused!(
        dev.register_kernel(KernelSource { name: "", ..SCALE }),
        Error::InvalidArgument { what: "kernel", detail } if detail.contains("empty"),
        ["name is empty"]
    );
    assert_only_the_test_kernels(&dev);
    assert_no_leak(&dev);
}

#[test]
fn registering_65_parameters_is_invalid() {
    let dev = registered();
    let many: Vec<Param> = (0..65)
        .map(|i| Param::input(Box::leak(format!("p{i}").into_boxed_str()), DType::U8))
        .collect();
    refused!(
        dev.register_kernel(KernelSource {
            name: "bad_input_many",
            params: Box::leak(many.into_boxed_slice()),
            ..SCALE
        }),
        Error::InvalidArgument { what: "kernel", detail } if detail.contains("65 parameters"),
        ["'bad_input_many'", "65 parameters", "at most 64"]
    );
    assert_only_the_test_kernels(&dev);
    assert_no_leak(&dev);
}

#[test]
fn looking_up_an_unknown_kernel_is_invalid() {
    let dev = registered();
    refused!(
        dev.kernel("bad_input_nosuch"),
        Error::InvalidArgument { what: "kernel", detail }
            if detail.contains("known: bad_input_no_source, bad_input_scale"),
        ["'bad_input_nosuch'", "known: bad_input_no_source, bad_input_scale"]
    );
    assert_only_the_test_kernels(&dev);
    assert_no_leak(&dev);
}

/// What the compile log names as missing for the backend under test.
fn missing_source() -> &'static str {
    match backend_name().as_str() {
        "cpu" => "no CPU implementation",
        "cuda" => "no CUDA source",
        _ => "",
    }
}

#[test]
fn compiling_a_kernel_without_a_source_for_this_backend_fails() {
    let dev = registered();
    let missing = missing_source();
    refused!(
        dev.kernel("bad_input_no_source"),
        Error::Compile { kernel, log } if kernel == "bad_input_no_source" && log.contains(missing),
        ["'bad_input_no_source'", missing]
    );
    // The kernel that has a source compiles.
    assert!(dev.kernel("bad_input_scale").is_ok());
    assert_no_leak(&dev);
}

#[test]
fn warm_all_with_a_kernel_without_a_source_for_this_backend_fails() {
    let dev = registered();
    refused!(
        dev.warm_all(),
        Error::Compile { kernel, .. } if kernel == "bad_input_no_source",
        ["'bad_input_no_source'"]
    );
    assert_no_leak(&dev);
}

// ---- launch checks (where the test kernel has a source) ---------------------------------------

/// Two devices with the test kernel, and the buffers the refused launches name.
struct Launch {
    dev: Device,
    dev_b: Device,
    q: Queue,
    k: Kernel,
    k_b: Kernel,
    /// 1..=8, Private.
    x: Buffer,
    y: Buffer,
    ints: Buffer,
    /// 16 f32: room for an input and an output that overlap.
    both: Buffer,
    x_b: Buffer,
    /// Read-only caller memory holding -1.
    ro: Buffer,
}

/// The dims of the refused launches, valid in themselves so that only the check under test
/// refuses. None of those launches runs: 64 threads would pass the 8 elements, which the test
/// kernel does not guard against.
const DIMS: LaunchDims = LaunchDims::linear(1, 64);

impl Launch {
    fn new() -> Launch {
        let dev = device();
        let dev_b = device();
        dev.register_kernel(SCALE).unwrap();
        dev_b.register_kernel(SCALE).unwrap();
        let x = dev
            .alloc_labelled("x", DType::F32, &[8], StorageMode::Private)
            .unwrap();
        dev.queue()
            .upload(&x, &[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
            .unwrap();
        Launch {
            q: dev.queue(),
            k: dev.kernel("bad_input_scale").unwrap(),
            k_b: dev_b.kernel("bad_input_scale").unwrap(),
            x,
            y: dev
                .alloc_labelled("y", DType::F32, &[8], StorageMode::Shared)
                .unwrap(),
            ints: dev.alloc(DType::I32, &[8], StorageMode::Shared).unwrap(),
            both: dev
                .alloc_labelled("both", DType::F32, &[16], StorageMode::Shared)
                .unwrap(),
            x_b: dev_b.alloc(DType::F32, &[8], StorageMode::Shared).unwrap(),
            ro: dev
                .wrap_external(
                    "ro out",
                    Arc::new(page_memory(&[-1.0; 8])),
                    DType::F32,
                    &[8],
                )
                .unwrap(),
            dev,
            dev_b,
        }
    }

    /// Nothing was recorded by the refused launch; a valid one works and neither device
    /// faulted. Gives the devices back for the leak checks.
    fn check(self) -> (Device, Device) {
        assert_eq!(
            self.dev.memory_stats().active_count,
            4,
            "x, y, ints and both; the wrapped one counts apart"
        );
        let f = self
            .q
            .launch(
                &self.k,
                LaunchDims::linear(1, 8),
                &scale_args(&self.x, &self.y, 2.0),
            )
            .unwrap();
        self.dev.wait(f).unwrap();
        assert_eq!(
            &*self.y.read::<f32>().unwrap(),
            &[2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0, 16.0]
        );
        assert!(self.dev.fault().is_none() && self.dev_b.fault().is_none());
        (self.dev, self.dev_b)
    }
}

#[test]
fn launching_with_too_few_arguments_is_a_shape_mismatch() {
    if !can_launch() {
        return;
    }
    let l = Launch::new();
    refused!(
        l.q.launch(&l.k, DIMS, &[(&l.x).into(), (&l.y).into()]),
        Error::ShapeMismatch { what: "kernel arguments", expected, got }
            if expected == "3 for 'bad_input_scale'" && got == "2",
        ["expected 3 for 'bad_input_scale', got 2"]
    );
    let (dev, dev_b) = l.check();
    assert_no_leak(&dev);
    assert_no_leak(&dev_b);
}

#[test]
fn launching_with_too_many_arguments_is_a_shape_mismatch() {
    if !can_launch() {
        return;
    }
    let l = Launch::new();
    refused!(
        l.q.launch(
            &l.k,
            DIMS,
            &[(&l.x).into(), (&l.y).into(), 2.0f32.into(), 1u32.into()]
        ),
        Error::ShapeMismatch { what: "kernel arguments", got, .. } if got == "4",
        ["got 4"]
    );
    let (dev, dev_b) = l.check();
    assert_no_leak(&dev);
    assert_no_leak(&dev_b);
}

#[test]
fn launching_with_a_buffer_of_the_wrong_dtype_is_a_dtype_mismatch() {
    if !can_launch() {
        return;
    }
    let l = Launch::new();
    refused!(
        l.q.launch(&l.k, DIMS, &scale_args(&l.ints, &l.y, 2.0)),
        Error::DTypeMismatch {
            what: "kernel argument",
            expected: DType::F32,
            got: DType::I32
        },
        ["expected dtype F32, got I32"]
    );
    let (dev, dev_b) = l.check();
    assert_no_leak(&dev);
    assert_no_leak(&dev_b);
}

#[test]
fn launching_with_a_scalar_where_a_buffer_is_expected_is_invalid() {
    if !can_launch() {
        return;
    }
    let l = Launch::new();
    refused!(
        l.q.launch(&l.k, DIMS, &[1.0f32.into(), (&l.y).into(), 2.0f32.into()]),
        Error::InvalidArgument { what: "kernel argument", detail }
            if detail.contains("argument 0 ('x')"),
        ["argument 0 ('x')", "'bad_input_scale'", "Scalar(F32(1.0))"]
    );
    let (dev, dev_b) = l.check();
    assert_no_leak(&dev);
    assert_no_leak(&dev_b);
}

#[test]
fn launching_with_a_buffer_where_a_scalar_is_expected_is_invalid() {
    if !can_launch() {
        return;
    }
    let l = Launch::new();
    refused!(
        l.q.launch(&l.k, DIMS, &[(&l.x).into(), (&l.y).into(), (&l.x).into()]),
        Error::InvalidArgument { what: "kernel argument", detail }
            if detail.contains("argument 2 ('factor')"),
        ["argument 2 ('factor')", "Scalar(F32)"]
    );
    let (dev, dev_b) = l.check();
    assert_no_leak(&dev);
    assert_no_leak(&dev_b);
}

#[test]
fn launching_with_a_scalar_of_the_wrong_type_is_invalid() {
    if !can_launch() {
        return;
    }
    let l = Launch::new();
    refused!(
        l.q.launch(&l.k, DIMS, &[(&l.x).into(), (&l.y).into(), 2u32.into()]),
        Error::InvalidArgument { what: "kernel argument", detail }
            if detail.contains("U32(2)"),
        ["argument 2 ('factor')", "U32(2)"]
    );
    let (dev, dev_b) = l.check();
    assert_no_leak(&dev);
    assert_no_leak(&dev_b);
}

#[test]
fn launching_with_a_zero_grid_dimension_is_invalid() {
    if !can_launch() {
        return;
    }
    let l = Launch::new();
    refused!(
        l.q.launch(
            &l.k,
            LaunchDims { grid: [4, 0, 1], block: [64, 1, 1] },
            &scale_args(&l.x, &l.y, 2.0)
        ),
        Error::InvalidArgument { what: "launch dims", detail } if detail.contains("[4, 0, 1]"),
        ["grid [4, 0, 1]", "zero dimension"]
    );
    let (dev, dev_b) = l.check();
    assert_no_leak(&dev);
    assert_no_leak(&dev_b);
}

#[test]
fn launching_with_a_zero_block_dimension_is_invalid() {
    if !can_launch() {
        return;
    }
    let l = Launch::new();
    refused!(
        l.q.launch(&l.k, LaunchDims::linear(1, 0), &scale_args(&l.x, &l.y, 2.0)),
        Error::InvalidArgument { what: "launch dims", detail } if detail.contains("block [0, 1, 1]"),
        ["block [0, 1, 1]"]
    );
    let (dev, dev_b) = l.check();
    assert_no_leak(&dev);
    assert_no_leak(&dev_b);
}

#[test]
fn launching_more_than_1024_threads_per_block_is_invalid() {
    if !can_launch() {
        return;
    }
    let l = Launch::new();
    refused!(
        l.q.launch(
            &l.k,
            LaunchDims { grid: [1, 1, 1], block: [64, 32, 1] },
            &scale_args(&l.x, &l.y, 2.0)
        ),
        Error::InvalidArgument { what: "launch dims", detail } if detail.contains("2048 threads"),
        ["block [64, 32, 1]", "2048 threads", "at most 1024"]
    );
    let (dev, dev_b) = l.check();
    assert_no_leak(&dev);
    assert_no_leak(&dev_b);
}

#[test]
fn launching_a_grid_past_the_limits_is_invalid() {
    if !can_launch() {
        return;
    }
    let l = Launch::new();
    refused!(
        l.q.launch(
            &l.k,
            LaunchDims { grid: [1, 70_000, 1], block: [64, 1, 1] },
            &scale_args(&l.x, &l.y, 2.0)
        ),
        Error::InvalidArgument { what: "launch dims", detail } if detail.contains("70000"),
        ["grid [1, 70000, 1]", "65535"]
    );
    let (dev, dev_b) = l.check();
    assert_no_leak(&dev);
    assert_no_leak(&dev_b);
}

#[test]
fn launching_with_an_output_that_overlaps_an_input_is_invalid() {
    if !can_launch() {
        return;
    }
    let l = Launch::new();
    refused!(
        l.q.launch(
            &l.k,
            DIMS,
            &scale_args(&l.both.slice(0..8).unwrap(), &l.both.slice(4..12).unwrap(), 2.0)
        ),
        Error::InvalidArgument { what: "kernel arguments", detail }
            if detail.contains("bytes 0..32 and 16..48"),
        ["overlaps", "bytes 0..32 and 16..48", "'both'"]
    );
    let (dev, dev_b) = l.check();
    assert_no_leak(&dev);
    assert_no_leak(&dev_b);
}

#[test]
fn launching_in_place_is_invalid() {
    if !can_launch() {
        return;
    }
    let l = Launch::new();
    refused!(
        l.q.launch(&l.k, DIMS, &scale_args(&l.y, &l.y, 2.0)),
        Error::InvalidArgument { what: "kernel arguments", detail }
            if detail.contains("bytes 0..32 and 0..32"),
        ["bytes 0..32 and 0..32", "'y'"]
    );
    let (dev, dev_b) = l.check();
    assert_no_leak(&dev);
    assert_no_leak(&dev_b);
}

#[test]
fn launching_a_kernel_of_another_device_is_the_wrong_device() {
    if !can_launch() {
        return;
    }
    let l = Launch::new();
    let (a, b) = (l.dev.id(), l.dev_b.id());
    refused!(
        l.q.launch(&l.k_b, DIMS, &scale_args(&l.x, &l.y, 2.0)),
        Error::WrongDevice { what: "kernel", expected, got } if *expected == a && *got == b,
        [format!("device #{b}"), format!("device #{a}")]
    );
    let (dev, dev_b) = l.check();
    assert_no_leak(&dev);
    assert_no_leak(&dev_b);
}

#[test]
fn launching_with_a_buffer_of_another_device_is_the_wrong_device() {
    if !can_launch() {
        return;
    }
    let l = Launch::new();
    let (a, b) = (l.dev.id(), l.dev_b.id());
    refused!(
        l.q.launch(&l.k, DIMS, &scale_args(&l.x_b, &l.y, 2.0)),
        Error::WrongDevice { what: "kernel argument", expected, got }
            if *expected == a && *got == b,
        [format!("device #{b}")]
    );
    let (dev, dev_b) = l.check();
    assert_no_leak(&dev);
    assert_no_leak(&dev_b);
}

#[test]
fn launching_into_read_only_memory_is_refused() {
    if !can_launch() {
        return;
    }
    let l = Launch::new();
    refused!(
        l.q.launch(&l.k, DIMS, &scale_args(&l.x, &l.ro, 2.0)),
        Error::ReadOnly { what: "launch", label } if label == "ro out",
        ["launch", "'ro out'"]
    );
    assert_eq!(
        &*l.ro.read::<f32>().unwrap(),
        &[-1.0; 8],
        "nothing was written"
    );
    let (dev, dev_b) = l.check();
    assert_no_leak(&dev);
    assert_no_leak(&dev_b);
}

#[test]
fn launching_into_a_range_under_a_host_read_guard_conflicts() {
    if !can_launch() {
        return;
    }
    let l = Launch::new();
    {
        let guard = l.y.slice(6..8).unwrap();
        let _held = guard.read::<f32>().unwrap();
        refused!(
            l.q.launch(&l.k, DIMS, &scale_args(&l.x, &l.y, 2.0)),
            Error::HostAccessConflict { what: "launch", label, start: 24, end: 32, held: "read-locked" }
                if label == "y",
            ["launch", "24..32", "'y'"]
        );
    }
    let (dev, dev_b) = l.check();
    assert_no_leak(&dev);
    assert_no_leak(&dev_b);
}
