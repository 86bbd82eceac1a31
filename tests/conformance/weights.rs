//! Weights: safetensors files onto the device on every route, bad files, and the expert cache.
//!
//! Files are written by the safetensors crate's serializer from fresh random data, by hand
//! (a layout independent of the crate, with misaligned tensors), and by the Python library
//! (committed fixtures from `bench/peers/make_fixture.py`).

use safetensors::tensor::TensorView;
use safetensors::Dtype;
use std::path::{Path, PathBuf};
use unibuf::weights::{ExpertCache, ExpertLayout, LoadOptions, Route, Selection, WeightsFile};
use unibuf::{Buffer, DType, Device, Error, StorageMode};
use unibuf_conformance::{builder, device, Rng, TempFile};

/// A tensor to write: name, file dtype, shape, bytes.
struct Source {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

fn bits(d: Dtype) -> usize {
    d.bitsize()
}

/// Random tensors of every dtype the format has that unibuf loads (natively or as bytes), with
/// odd shapes, a scalar and an empty one.
fn random_tensors(rng: &mut Rng, prefix: &str) -> Vec<Source> {
    let dtypes = [
        Dtype::F16,
        Dtype::BF16,
        Dtype::F32,
        Dtype::F64,
        Dtype::I8,
        Dtype::U8,
        Dtype::I16,
        Dtype::U16,
        Dtype::I32,
        Dtype::U32,
        Dtype::I64,
        Dtype::U64,
        Dtype::BOOL,
        Dtype::F8_E4M3,
        Dtype::F8_E5M2,
        Dtype::C64,
    ];
    let mut out = Vec::new();
    for (i, d) in dtypes.into_iter().enumerate() {
        let shape = match i % 4 {
            0 => vec![rng.range(1, 40), rng.range(1, 9)],
            1 => vec![rng.range(1, 300)],
            2 => vec![rng.range(1, 5), rng.range(1, 5), rng.range(1, 7)],
            _ => vec![rng.range(100, 3000)],
        };
        let n: usize = shape.iter().product();
        let mut bytes = rng.bytes(n * bits(d) / 8);
        if d == Dtype::BOOL {
            bytes.iter_mut().for_each(|b| *b &= 1);
        }
        out.push(Source {
            name: format!("{prefix}{}", d.to_string().to_lowercase()),
            dtype: d,
            shape,
            bytes,
        });
    }
    out.push(Source {
        name: format!("{prefix}scalar"),
        dtype: Dtype::F32,
        shape: vec![],
        bytes: rng
            .elements::<f32>(1)
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
    });
    out.push(Source {
        name: format!("{prefix}empty"),
        dtype: Dtype::BF16,
        shape: vec![0, 5],
        bytes: vec![],
    });
    out
}

/// Writes `tensors` with the safetensors crate's serializer.
fn write_with_crate(path: &Path, tensors: &[Source]) {
    let views: Vec<(&str, TensorView<'_>)> = tensors
        .iter()
        .map(|t| {
            (
                t.name.as_str(),
                TensorView::new(t.dtype, t.shape.clone(), &t.bytes).expect("a valid view"),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).expect("serialize");
}

/// The bytes of a buffer, through a byte view (a host read or a staged download).
fn bytes_of(b: &Buffer) -> Vec<u8> {
    b.cast(DType::U8)
        .expect("byte view")
        .to_vec::<u8>()
        .expect("read back")
}

/// The unibuf dtype a file dtype loads as.
fn buffer_dtype(d: Dtype) -> DType {
    DType::from_name(&d.to_string()).unwrap_or(DType::U8)
}

fn check_loaded(weights: &unibuf::weights::LoadedWeights, tensors: &[Source]) {
    assert_eq!(weights.len(), tensors.len());
    for t in tensors {
        let b = weights
            .get(&t.name)
            .unwrap_or_else(|| panic!("{} loaded", t.name));
        assert_eq!(b.dtype(), buffer_dtype(t.dtype), "{}", t.name);
        if b.dtype().name() == t.dtype.to_string() || bits(t.dtype) == 8 {
            assert_eq!(b.shape(), &t.shape[..], "{}", t.name);
        } else {
            assert_eq!(b.shape(), &[t.bytes.len()], "{}", t.name);
        }
        assert_eq!(bytes_of(b), t.bytes, "{}: bytes differ", t.name);
    }
}

/// Every dtype round-trips bit-exactly on the zero-copy and the staged route, with several
/// groups and many staging pieces.
#[test]
fn every_dtype_round_trips_on_every_route() {
    let mut rng = Rng::new("every_dtype_round_trips_on_every_route");
    let tensors = random_tensors(&mut rng, "t.");
    let file = TempFile::new(&mut rng, "weights-dtypes", "safetensors");
    write_with_crate(file.path(), &tensors);
    let wf = WeightsFile::open(file.path()).unwrap();
    assert_eq!(wf.tensors().len(), tensors.len());

    // Small staging chunks and groups so that tensors span pieces and groups.
    let dev = builder().staging(4096, 4).open().unwrap();
    let q = dev.new_queue("weights").unwrap();
    for route in [Route::Auto, Route::ZeroCopy, Route::Staged] {
        let before = dev.ledger().total();
        let opts = LoadOptions {
            route,
            group_bytes: 8192,
            readers: 3,
            ..LoadOptions::default()
        };
        let w = wf.load_with(&dev, &q, &Selection::All, &opts).unwrap();
        let r = w.report().clone();
        let expect = match route {
            Route::Auto if dev.info().unified_memory => Route::ZeroCopy,
            Route::Auto => Route::Staged,
            other => other,
        };
        assert_eq!(r.route, expect);
        assert_eq!(
            r.bytes,
            tensors.iter().map(|t| t.bytes.len() as u64).sum::<u64>()
        );
        let copies = dev.ledger().total().count - before.count;
        match r.route {
            Route::ZeroCopy => {
                // The crate's serializer orders tensors by alignment: every one is a view.
                assert_eq!(r.copied_tensors, 0);
                assert_eq!(copies, 0, "zero copy records no transfer");
                for (_, b) in w.iter() {
                    assert_eq!(b.mode(), StorageMode::External);
                    assert!(!b.is_writable(), "views of a read-only mapping");
                }
            }
            _ => {
                assert!(r.allocations > 1, "{} groups", r.allocations);
                assert!(copies as usize >= r.allocations, "one record per piece");
                assert!(dev.ledger().total().staged_bytes - before.staged_bytes >= r.bytes);
                for (_, b) in w.iter() {
                    assert_eq!(b.mode(), StorageMode::Private);
                }
            }
        }
        check_loaded(&w, &tensors);
        assert!(r.by_dtype.iter().map(|d| d.tensors).sum::<usize>() == tensors.len());
        drop(w);
        dev.drain().unwrap();
        assert_eq!(dev.memory_stats().active_bytes, 0, "{route:?} left memory");
        assert_eq!(
            dev.memory_stats().external_count,
            0,
            "{route:?} left a wrap"
        );
    }
}

/// Chosen tensors only, by name and by prefix; the views of one group share its allocation.
#[test]
fn chosen_tensors_load_as_views() {
    let mut rng = Rng::new("chosen_tensors_load_as_views");
    let mut tensors = random_tensors(&mut rng, "a.");
    tensors.extend(random_tensors(&mut rng, "b."));
    let file = TempFile::new(&mut rng, "weights-chosen", "safetensors");
    write_with_crate(file.path(), &tensors);
    let wf = WeightsFile::open(file.path()).unwrap();
    let dev = device();
    let q = dev.queue();
    let pick: Vec<&Source> = tensors.iter().filter(|_| rng.range(0, 2) == 1).collect();
    let names: Vec<String> = pick.iter().map(|t| t.name.clone()).collect();
    for route in [Route::ZeroCopy, Route::Staged] {
        let opts = LoadOptions {
            route,
            ..LoadOptions::default()
        };
        let w = wf
            .load_with(&dev, &q, &Selection::names(names.clone()), &opts)
            .unwrap();
        assert_eq!(w.len(), pick.len());
        for t in &tensors {
            assert_eq!(w.get(&t.name).is_some(), names.contains(&t.name));
        }
        for t in &pick {
            assert_eq!(bytes_of(w.get(&t.name).unwrap()), t.bytes);
        }
        let views: Vec<&Buffer> = w.iter().map(|(_, b)| b).collect();
        if views.len() > 1 {
            assert!(
                views[0].shares_memory_with(views[1]),
                "{route:?}: one allocation"
            );
        }
        let b = wf
            .load_with(&dev, &q, &Selection::Prefix("b.".into()), &opts)
            .unwrap();
        assert_eq!(b.len(), tensors.len() / 2);
        assert!(b.iter().all(|(n, _)| n.starts_with("b.")));
    }
    match wf.load(&dev, &q, &Selection::names(["a.f32", "nope"])) {
        Err(Error::InvalidArgument { detail, .. }) => {
            assert!(detail.contains("'nope'"), "{detail}")
        }
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

/// Writes a file by hand: length, JSON padded to 8 bytes, data.
fn write_by_hand(path: &Path, json: &str, data: &[u8]) {
    let mut j = json.as_bytes().to_vec();
    while !j.len().is_multiple_of(8) {
        j.push(b' ');
    }
    let mut f = (j.len() as u64).to_le_bytes().to_vec();
    f.extend_from_slice(&j);
    f.extend_from_slice(data);
    std::fs::write(path, f).unwrap();
}

/// A hand-written layout (independent of the crate's serializer) whose F32 and I16 tensors
/// sit at odd offsets: zero copy copies exactly those two (recorded), views the rest; the
/// staged route aligns everything.
#[test]
fn misaligned_tensors_are_copied_not_misviewed() {
    let mut rng = Rng::new("misaligned_tensors_are_copied_not_misviewed");
    let a = rng.bytes(3);
    let f: Vec<f32> = rng.elements(5);
    let h: Vec<i16> = rng.elements(3);
    let u = rng.bytes(17);
    let mut data = a.clone();
    data.extend(f.iter().flat_map(|x| x.to_le_bytes())); // 3..23
    data.extend(h.iter().flat_map(|x| x.to_le_bytes())); // 23..29
    data.extend(&u); // 29..46
    let json = r#"{"__metadata__":{"by":"hand"},"u":{"dtype":"U8","shape":[17],"data_offsets":[29,46]},"a":{"dtype":"U8","shape":[3],"data_offsets":[0,3]},"f":{"dtype":"F32","shape":[5],"data_offsets":[3,23]},"h":{"dtype":"I16","shape":[3,1],"data_offsets":[23,29]}}"#;
    let file = TempFile::new(&mut rng, "weights-hand", "safetensors");
    write_by_hand(file.path(), json, &data);
    let wf = WeightsFile::open(file.path()).unwrap();
    assert_eq!(wf.metadata().get("by").map(String::as_str), Some("hand"));
    let names: Vec<&str> = wf.tensors().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["a", "f", "h", "u"], "file order");
    let dev = device();
    let q = dev.queue();
    for route in [Route::ZeroCopy, Route::Staged] {
        let before = dev.ledger().total().count;
        let opts = LoadOptions {
            route,
            ..LoadOptions::default()
        };
        let w = wf.load_with(&dev, &q, &Selection::All, &opts).unwrap();
        assert_eq!(w.get("f").unwrap().to_vec::<f32>().unwrap(), f);
        assert_eq!(w.get("h").unwrap().to_vec::<i16>().unwrap(), h);
        assert_eq!(w.get("h").unwrap().shape(), &[3, 1]);
        assert_eq!(w.get("a").unwrap().to_vec::<u8>().unwrap(), a);
        assert_eq!(w.get("u").unwrap().to_vec::<u8>().unwrap(), u);
        for (_, b) in w.iter() {
            assert_eq!(b.device_address() % b.dtype().size() as u64, 0, "aligned");
        }
        if route == Route::ZeroCopy {
            let r = w.report();
            assert_eq!(r.copied_tensors, 2, "f and h");
            assert_eq!(r.copied_bytes, 26);
            let after = dev.ledger().total().count;
            // The two copies, then the four to_vec reads above (host reads are recorded too).
            let records = dev.ledger().records();
            let copies = records
                .iter()
                .skip(before as usize)
                .filter(|c| c.direction == unibuf::Direction::HostToDevice)
                .count();
            assert_eq!(copies, 2, "{} records", after - before);
            assert_eq!(w.get("a").unwrap().mode(), StorageMode::External);
            assert_ne!(w.get("f").unwrap().mode(), StorageMode::External);
        }
    }
}

/// A valid file to corrupt: two F32 tensors.
fn good_json() -> &'static str {
    r#"{"x":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"y":{"dtype":"F32","shape":[3],"data_offsets":[16,28]}}"#
}

fn expect_format(path: &Path, what_has: &str, detail_has: &[&str]) {
    match WeightsFile::open(path) {
        Err(Error::Format { what, detail }) => {
            assert!(
                what.contains(what_has),
                "'{what}' lacks '{what_has}' ({detail})"
            );
            for s in detail_has {
                assert!(detail.contains(s), "'{detail}' lacks '{s}'");
            }
        }
        other => panic!("expected a Format error, got {other:?}"),
    }
}

/// Each kind of bad file is a Format error naming the tensor (or the header) and the problem.
#[test]
fn bad_files_are_format_errors_naming_the_problem() {
    let mut rng = Rng::new("bad_files_are_format_errors_naming_the_problem");
    let f = TempFile::new(&mut rng, "weights-bad", "safetensors");
    let p = f.path();
    let data = rng.bytes(28);

    std::fs::write(p, b"").unwrap();
    expect_format(p, "header", &["empty"]);

    std::fs::write(p, [9u8, 0, 0]).unwrap();
    expect_format(p, "header", &["3 bytes"]);

    write_by_hand(p, good_json(), &data[..20]);
    expect_format(p, "tensor 'y'", &["[16, 28]", "20 bytes", "truncated"]);

    let mut bytes = std::fs::read(p).unwrap();
    bytes[..8].copy_from_slice(&4000u64.to_le_bytes());
    std::fs::write(p, &bytes).unwrap();
    expect_format(p, "header", &["4000 bytes", "lying"]);

    bytes[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(p, &bytes).unwrap();
    expect_format(p, "header", &["MAX_HEADER_BYTES"]);

    write_by_hand(p, &good_json().replace("[16,28]", "[8,20]"), &data);
    expect_format(p, "tensor 'y'", &["overlap", "tensor 'x'"]);

    write_by_hand(p, &good_json().replace("[16,28]", "[16,40]"), &data);
    expect_format(p, "tensor 'y'", &["[16, 40]", "end past"]);

    write_by_hand(
        p,
        &good_json().replace("\"shape\":[3]", "\"shape\":[4]"),
        &data,
    );
    expect_format(p, "tensor 'y'", &["hold 12 bytes", "needs 16"]);

    write_by_hand(
        p,
        &good_json().replace("\"F32\",\"shape\":[3]", "\"Q9\",\"shape\":[3]"),
        &data,
    );
    expect_format(p, "tensor 'y'", &["Q9"]);

    let mut bad_name = Vec::new();
    write_by_hand(p, good_json(), &data);
    bad_name.extend(std::fs::read(p).unwrap());
    let at = bad_name.windows(3).position(|w| w == b"\"y\"").unwrap() + 1;
    bad_name[at] = 0xC3; // a lone UTF-8 lead byte
    std::fs::write(p, &bad_name).unwrap();
    expect_format(p, "header", &["UTF-8"]);

    write_by_hand(p, &good_json().replace("\"y\"", "\"x\""), &data);
    expect_format(p, "tensor 'x'", &["twice"]);

    write_by_hand(p, "{\"x\":", &[]);
    expect_format(p, "header", &["JSON"]);

    write_by_hand(p, good_json(), &[data.as_slice(), &[0u8; 3]].concat());
    expect_format(p, "header", &["3 bytes trailing"]);

    match WeightsFile::open(p.with_extension("missing")) {
        Err(Error::Io { .. }) => {}
        other => panic!("expected an Io error, got {other:?}"),
    }
}

/// A file that shrinks after its header was validated fails the load with a Format error, and
/// whatever the load allocated is released.
#[test]
fn a_file_truncated_while_loading_leaks_nothing() {
    let mut rng = Rng::new("a_file_truncated_while_loading_leaks_nothing");
    let tensors = random_tensors(&mut rng, "t.");
    let file = TempFile::new(&mut rng, "weights-shrink", "safetensors");
    write_with_crate(file.path(), &tensors);
    let wf = WeightsFile::open(file.path()).unwrap();
    let len = std::fs::metadata(file.path()).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(file.path())
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    let dev = builder().staging(4096, 4).open().unwrap();
    let q = dev.queue();
    for route in [Route::Staged, Route::ZeroCopy] {
        let opts = LoadOptions {
            route,
            group_bytes: 4096,
            ..LoadOptions::default()
        };
        match wf.load_with(&dev, &q, &Selection::All, &opts) {
            Err(Error::Format { detail, .. }) => {
                assert!(
                    detail.contains("ended before") || detail.contains("changed size"),
                    "{detail}"
                )
            }
            other => panic!("{route:?}: expected a Format error, got {other:?}"),
        }
        dev.drain().unwrap();
        let s = dev.memory_stats();
        assert_eq!((s.active_bytes, s.external_count), (0, 0), "{route:?}");
    }
}

/// Per tensor: name, file dtype, shape, zlib CRC-32 of its bytes, as printed by
/// `bench/peers/make_fixture.py` when it wrote `data/python_numpy.safetensors`.
const FIXTURE_NUMPY: &[(&str, &str, &[usize], u32)] = &[
    ("bool", "BOOL", &[3, 3], 0x3becb97f),
    ("empty", "F32", &[0, 4], 0x00000000),
    ("f16", "F16", &[3, 5], 0xcf7f39e2),
    ("f32", "F32", &[7], 0x0467f3ae),
    ("f64", "F64", &[2, 3, 2], 0xf3351396),
    ("i16", "I16", &[5], 0x9b944ed6),
    ("i32", "I32", &[4], 0x99091827),
    ("i64", "I64", &[5], 0x33e0226f),
    ("i8", "I8", &[11], 0x16a94bd1),
    ("scalar", "F32", &[], 0xc21cba2e),
    ("u16", "U16", &[6], 0x07c7a714),
    ("u32", "U32", &[3], 0x9d8ce365),
    ("u64", "U64", &[4], 0xaa9509c5),
    ("u8", "U8", &[13], 0x10225017),
];

/// As `FIXTURE_NUMPY`, for `data/python_torch.safetensors`, written by
/// `safetensors.torch.save_file` (PyTorch 2.11, safetensors 0.8) with `make_fixture.py --torch`.
const FIXTURE_TORCH: &[(&str, &str, &[usize], u32)] = &[
    ("bf16", "BF16", &[2, 9], 0x1fd4ef4f),
    ("bool", "BOOL", &[7], 0xf7975aff),
    ("f16", "F16", &[5], 0x02a4d152),
    ("f32", "F32", &[3, 3], 0x4ff4439e),
    ("f8_e4m3", "F8_E4M3", &[8], 0x69bc70c8),
    ("i64", "I64", &[3], 0x12d2f816),
    ("i8", "I8", &[6], 0xdd50633f),
    ("u8", "U8", &[10], 0x0d40421f),
];

/// A checked-in fixture: beside the suite's sources where it was built, else under
/// `tests/conformance/data` of the current directory or one of its ancestors (bundled binaries
/// run inside a repository checkout on another machine, where the build path does not exist).
fn fixture(name: &str) -> PathBuf {
    let built = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("data")
        .join(name);
    if built.exists() {
        return built;
    }
    let cwd = std::env::current_dir().expect("a current directory");
    cwd.ancestors()
        .map(|d| d.join("tests/conformance/data").join(name))
        .find(|p| p.exists())
        .unwrap_or(built)
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut c = flate2::Crc::new();
    c.update(bytes);
    c.sum()
}

/// The script's ramp: i * 0.37 mod 10 - 5 in f64.
fn ramp(n: usize) -> Vec<f64> {
    (0..n).map(|i| (i as f64 * 0.37) % 10.0 - 5.0).collect()
}

fn check_fixture(
    path: &Path,
    expect: &[(&str, &str, &[usize], u32)],
) -> unibuf::weights::LoadedWeights {
    let wf = WeightsFile::open(path).unwrap();
    assert_eq!(wf.tensors().len(), expect.len());
    let dev = device();
    let mut last = None;
    for route in [Route::ZeroCopy, Route::Staged] {
        let opts = LoadOptions {
            route,
            ..LoadOptions::default()
        };
        let w = wf
            .load_with(&dev, &dev.queue(), &Selection::All, &opts)
            .unwrap();
        for (name, dtype, shape, crc) in expect {
            let t = wf.tensor(name).unwrap();
            assert_eq!(
                (t.file_dtype.as_str(), t.file_shape.as_slice()),
                (*dtype, *shape)
            );
            let b = w.get(name).unwrap();
            assert_eq!(crc32(&bytes_of(b)), *crc, "{name} on {route:?}");
        }
        last = Some(w);
    }
    last.unwrap()
}

/// A file written by the Python safetensors library reads bit-exactly, and values recomputed
/// here from the script's formulas agree.
#[test]
fn python_written_files_read_bit_exactly() {
    let w = check_fixture(&fixture("python_numpy.safetensors"), FIXTURE_NUMPY);
    let f32s: Vec<f32> = ramp(7).into_iter().map(|x| x as f32).collect();
    assert_eq!(w.get("f32").unwrap().to_vec::<f32>().unwrap(), f32s);
    let f64s = w.get("f64").unwrap().to_vec::<f64>().unwrap();
    assert_eq!(f64s, ramp(12));
    let f16s: Vec<half::f16> = ramp(15).into_iter().map(half::f16::from_f64).collect();
    assert_eq!(w.get("f16").unwrap().to_vec::<half::f16>().unwrap(), f16s);
    let i64s = w.get("i64").unwrap().to_vec::<i64>().unwrap();
    assert_eq!(i64s, [-(1i64 << 62), -1, 0, 1, (1 << 62) + 12345]);
    let bools = w.get("bool").unwrap().to_vec::<u8>().unwrap();
    assert_eq!(bools, [1, 0, 0, 1, 0, 0, 1, 0, 0]);
    assert_eq!(w.get("scalar").unwrap().to_vec::<f32>().unwrap(), [2.5]);
    assert_eq!(w.get("empty").unwrap().shape(), &[0, 4]);
}

/// A file written by `safetensors.torch` (bfloat16, bool, float8 included) reads bit-exactly;
/// the float values agree with the script's formulas rounded here.
#[test]
fn torch_written_files_read_bit_exactly() {
    let w = check_fixture(&fixture("python_torch.safetensors"), FIXTURE_TORCH);
    let bf16s: Vec<half::bf16> = ramp(18)
        .into_iter()
        .map(|x| half::bf16::from_f32(x as f32))
        .collect();
    let b = w.get("bf16").unwrap();
    assert_eq!((b.dtype(), b.shape()), (DType::BF16, &[2, 9][..]));
    assert_eq!(b.to_vec::<half::bf16>().unwrap(), bf16s);
    let f16s: Vec<half::f16> = ramp(5)
        .into_iter()
        .map(|x| half::f16::from_f32(x as f32))
        .collect();
    assert_eq!(w.get("f16").unwrap().to_vec::<half::f16>().unwrap(), f16s);
    let f32s: Vec<f32> = ramp(9).into_iter().map(|x| x as f32).collect();
    assert_eq!(w.get("f32").unwrap().to_vec::<f32>().unwrap(), f32s);
    assert_eq!(
        w.get("bool").unwrap().to_vec::<u8>().unwrap(),
        [0, 1, 0, 1, 0, 1, 0]
    );
    assert_eq!(
        w.get("i64").unwrap().to_vec::<i64>().unwrap(),
        [-(1i64 << 40), 7, 1 << 50]
    );
    let f8 = w.get("f8_e4m3").unwrap();
    assert_eq!(
        (f8.dtype(), f8.shape()),
        (DType::U8, &[8][..]),
        "FP8 loads as bytes"
    );
    assert_eq!(
        WeightsFile::open(fixture("python_torch.safetensors"))
            .unwrap()
            .metadata()["format"],
        "pt"
    );
}

// ---- the expert cache ---------------------------------------------------------------------

/// Each expert's tensors' bytes by short name, `[layer][expert]`.
type ExpertBytes = Vec<Vec<Vec<(String, Vec<u8>)>>>;

/// A MoE file: `layers` x `experts` experts of three tensors (odd shapes, F32 and BF16), plus a
/// shared tensor; returns the file and each expert's tensors' bytes by short name.
fn moe_file(rng: &mut Rng, layers: usize, experts: usize) -> (TempFile, ExpertBytes) {
    let (d, h) = (rng.range(3, 17), rng.range(5, 40));
    let mut tensors = vec![Source {
        name: "embed".into(),
        dtype: Dtype::F32,
        shape: vec![7, d],
        bytes: rng.bytes(7 * d * 4),
    }];
    let mut expect = Vec::new();
    for l in 0..layers {
        let mut row = Vec::new();
        for e in 0..experts {
            let mut ex = Vec::new();
            for (short, dtype, shape) in [
                ("w1", Dtype::F32, vec![h, d]),
                ("w2", Dtype::BF16, vec![d, h]),
                ("w3", Dtype::F32, vec![h]),
            ] {
                let n: usize = shape.iter().product::<usize>() * bits(dtype) / 8;
                let bytes = rng.bytes(n);
                ex.push((short.to_owned(), bytes.clone()));
                tensors.push(Source {
                    name: format!("layers.{l}.experts.{e}.{short}"),
                    dtype,
                    shape,
                    bytes,
                });
            }
            row.push(ex);
        }
        expect.push(row);
    }
    let file = TempFile::new(rng, "weights-moe", "safetensors");
    write_with_crate(file.path(), &tensors);
    (file, expect)
}

fn moe_layout(wf: &WeightsFile, layers: usize, experts: usize) -> ExpertLayout {
    ExpertLayout::by_prefix(wf, layers, experts, |l, e| {
        format!("layers.{l}.experts.{e}.")
    })
    .unwrap()
}

fn check_expert(h: &unibuf::weights::ExpertHandle, expect: &[(String, Vec<u8>)]) {
    for (short, bytes) in expect {
        let b = h.get(short).unwrap_or_else(|| panic!("{short}"));
        assert_eq!(
            &bytes_of(b),
            bytes,
            "layer {} expert {} {short}",
            h.layer(),
            h.expert()
        );
    }
}

/// Random gets against a reference LRU model: hits, misses and evictions agree exactly, every
/// expert's bytes are the file's, and nothing stays allocated once the cache is gone.
#[test]
fn expert_cache_agrees_with_an_lru_model() {
    let mut rng = Rng::new("expert_cache_agrees_with_an_lru_model");
    let (layers, experts, budget) = (2, 7, 3);
    let (file, expect) = moe_file(&mut rng, layers, experts);
    let wf = WeightsFile::open(file.path()).unwrap();
    let dev = device();
    let cache = ExpertCache::new(&dev, &wf, moe_layout(&wf, layers, experts), budget).unwrap();
    let mut model: Vec<Vec<usize>> = vec![Vec::new(); layers]; // most recent last
    let (mut hits, mut misses, mut evictions, mut bytes) = (0u64, 0u64, 0u64, 0u64);
    for _ in 0..80 {
        let (l, e) = (rng.range(0, layers), rng.range(0, experts));
        let h = cache.get(l, e).unwrap();
        check_expert(&h, &expect[l][e]);
        let m = &mut model[l];
        if let Some(i) = m.iter().position(|&x| x == e) {
            m.remove(i);
            hits += 1;
        } else {
            if m.len() == budget {
                m.remove(0);
                evictions += 1;
            }
            misses += 1;
            bytes += expect[l][e]
                .iter()
                .map(|(_, b)| b.len() as u64)
                .sum::<u64>();
        }
        m.push(e);
    }
    let s = cache.stats();
    assert_eq!(
        (s.hits, s.misses, s.evictions),
        (hits, misses, evictions),
        "{s}"
    );
    assert_eq!(s.bytes_read, bytes);
    assert_eq!(s.prefetch_hits, 0);
    assert!(s.stall > std::time::Duration::ZERO);
    for (l, m) in model.iter().enumerate() {
        let mut m = m.clone();
        m.sort_unstable();
        assert_eq!(cache.resident(l), m);
    }
    assert!(cache.get(layers, 0).is_err());
    assert!(cache.get(0, experts).is_err());
    drop(cache);
    dev.drain().unwrap();
    let st = dev.memory_stats();
    assert_eq!((st.active_bytes, st.external_count), (0, 0));
}

/// Prefetched experts count as prefetch hits on first use and plain hits after; a prefetch
/// evicts the least recently used expert it does not ask for, and is dropped when the budget
/// is taken by experts still being read.
#[test]
fn expert_prefetch_hits_evictions_and_drops() {
    let mut rng = Rng::new("expert_prefetch_hits_evictions_and_drops");
    let (file, expect) = moe_file(&mut rng, 1, 6);
    let wf = WeightsFile::open(file.path()).unwrap();
    let dev = device();
    let cache = ExpertCache::new(&dev, &wf, moe_layout(&wf, 1, 6), 2).unwrap();
    cache.prefetch(0, &[1, 2]).unwrap();
    cache.wait_prefetches();
    check_expert(&cache.get(0, 1).unwrap(), &expect[0][1]); // prefetch hit
    check_expert(&cache.get(0, 1).unwrap(), &expect[0][1]); // hit
    cache.prefetch(0, &[3]).unwrap(); // evicts 2 (1 was used since)
    assert_eq!(cache.resident(0), [1, 3]);
    check_expert(&cache.get(0, 3).unwrap(), &expect[0][3]); // prefetch hit (maybe waiting)
    check_expert(&cache.get(0, 2).unwrap(), &expect[0][2]); // miss, evicts 1
    assert_eq!(cache.resident(0), [2, 3]);
    let s = cache.stats();
    assert_eq!(
        (
            s.hits,
            s.prefetch_hits,
            s.misses,
            s.evictions,
            s.prefetches,
            s.prefetch_dropped
        ),
        (1, 2, 1, 2, 3, 0),
        "{s}"
    );
    assert!((s.hit_rate() - 0.75).abs() < 1e-9);
    let per: Vec<u64> = expect[0]
        .iter()
        .map(|ex| ex.iter().map(|(_, b)| b.len() as u64).sum())
        .collect();
    assert_eq!(s.bytes_read, per[1] + per[2] + per[3] + per[2]);
    // Prefetching experts already there does nothing.
    cache.prefetch(0, &[2, 3]).unwrap();
    assert_eq!(cache.stats().prefetches, 3);

    // Budget 1: the second of two prefetches finds only the first (still being read, or
    // asked for in the same call) and is dropped.
    let one = ExpertCache::new(&dev, &wf, moe_layout(&wf, 1, 6), 1).unwrap();
    one.prefetch(0, &[4, 5]).unwrap();
    let s = one.stats();
    assert_eq!((s.prefetches, s.prefetch_dropped), (1, 1));
    check_expert(&one.get(0, 4).unwrap(), &expect[0][4]);
    // A handle outlives its eviction and keeps its bytes.
    let kept = one.get(0, 4).unwrap();
    check_expert(&one.get(0, 0).unwrap(), &expect[0][0]);
    assert_eq!(one.resident(0), [0]);
    check_expert(&kept, &expect[0][4]);
    drop((one, kept, cache));
    dev.drain().unwrap();
    let st = dev.memory_stats();
    assert_eq!((st.active_bytes, st.external_count), (0, 0));
}

/// Expert copies run on the cache's own queue; work on another queue that reads an expert is
/// ordered after its copy by the runtime (a device-side wait), with no host wait in `get`.
#[test]
fn expert_copies_are_ordered_for_other_queues() {
    let mut rng = Rng::new("expert_copies_are_ordered_for_other_queues");
    let (file, expect) = moe_file(&mut rng, 1, 3);
    let wf = WeightsFile::open(file.path()).unwrap();
    let dev = device();
    let cache = ExpertCache::new(&dev, &wf, moe_layout(&wf, 1, 3), 3).unwrap();
    cache.prefetch(0, &[0, 1, 2]).unwrap();
    let compute = dev.new_queue("compute").unwrap();
    for (e, ex) in expect[0].iter().enumerate() {
        let h = cache.get(0, e).unwrap();
        assert_eq!(h.fence().queue, cache.queue().id());
        let w1 = h.get("w1").unwrap();
        let dst = dev
            .alloc(w1.dtype(), w1.shape(), StorageMode::Private)
            .unwrap();
        compute.copy(w1, &dst).unwrap();
        assert_eq!(bytes_of(&dst), ex[0].1);
    }
    let _ = Device::clone(&dev);
}

/// The public types can be shared across threads.
#[test]
fn weights_types_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<WeightsFile>();
    send_sync::<unibuf::weights::LoadedWeights>();
    send_sync::<ExpertCache>();
    send_sync::<unibuf::weights::ExpertHandle>();
}

/// Several threads getting and prefetching experts at once: every expert's bytes are right,
/// every get is counted once, and no layer holds more than its budget.
#[test]
fn expert_cache_is_consistent_under_concurrent_use() {
    let mut rng = Rng::new("expert_cache_is_consistent_under_concurrent_use");
    let (layers, experts, budget) = (2, 5, 2);
    let (file, expect) = moe_file(&mut rng, layers, experts);
    let wf = WeightsFile::open(file.path()).unwrap();
    let dev = device();
    let cache = ExpertCache::new(&dev, &wf, moe_layout(&wf, layers, experts), budget).unwrap();
    let seeds: Vec<u64> = (0..4).map(|_| rng.next_u64()).collect();
    std::thread::scope(|s| {
        for seed in seeds {
            let (cache, expect) = (&cache, &expect);
            s.spawn(move || {
                let mut x = seed | 1;
                let mut next = |n: usize| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x % n as u64) as usize
                };
                for _ in 0..25 {
                    let (l, e) = (next(layers), next(experts));
                    if next(4) == 0 {
                        cache.prefetch(l, &[next(experts)]).unwrap();
                    }
                    check_expert(&cache.get(l, e).unwrap(), &expect[l][e]);
                    for l in 0..layers {
                        assert!(cache.resident(l).len() <= budget);
                    }
                }
            });
        }
    });
    cache.wait_prefetches();
    let s = cache.stats();
    assert_eq!(s.hits + s.prefetch_hits + s.misses, 100, "{s}");
    drop(cache);
    dev.drain().unwrap();
    assert_eq!(dev.memory_stats().active_bytes, 0);
}
