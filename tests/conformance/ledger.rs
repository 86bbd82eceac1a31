//! The copy ledger: what is recorded, what is not, and the exported trace.

use unibuf::{DType, Direction, FillPattern, StorageMode};
use unibuf_conformance::{buffer, device};

/// Each transfer is one record with its direction, modes, bytes, staging and call site; views,
/// wrapping and host access record nothing.
#[test]
fn ledger_counts_every_transfer_and_nothing_else() {
    let dev = device();
    let q = dev.queue().labelled("audit");
    let private = dev
        .alloc_labelled("p", DType::F32, &[1000], StorageMode::Private)
        .unwrap();
    let shared = dev
        .alloc_labelled("s", DType::F32, &[1000], StorageMode::Shared)
        .unwrap();
    let ext = buffer(&dev, StorageMode::External, DType::F32, &[1000], "e");
    let _view = private.slice(10..20).unwrap().reshape(&[2, 5]).unwrap();
    drop(shared.read::<f32>().unwrap());
    assert_eq!(
        dev.ledger().total().count,
        0,
        "views, wraps and host reads copy nothing"
    );

    let data = vec![1.5f32; 1000];
    let upload_line = line!() + 1; // the next line is the call site the ledger must name
    q.upload(&private, &data).unwrap();
    q.upload(&shared, &data).unwrap();
    q.copy(&private, &ext).unwrap();
    q.fill(&shared, FillPattern::of(0.0f32)).unwrap();
    let _: Vec<f32> = q.download(&private).unwrap();
    let _: Vec<f32> = q.download(&ext.slice(0..10).unwrap()).unwrap();

    let totals = dev.ledger().totals();
    let h2d = totals[&Direction::HostToDevice];
    assert_eq!(
        (h2d.count, h2d.bytes, h2d.staged_bytes),
        (2, 8000, 4000),
        "one staged (Private), one direct (Shared)"
    );
    let d2h = totals[&Direction::DeviceToHost];
    assert_eq!((d2h.count, d2h.bytes, d2h.staged_bytes), (2, 4040, 4000));
    assert_eq!(
        (
            totals[&Direction::DeviceToDevice].count,
            totals[&Direction::DeviceToDevice].bytes
        ),
        (1, 4000)
    );
    assert_eq!(
        (
            totals[&Direction::Fill].count,
            totals[&Direction::Fill].bytes
        ),
        (1, 4000)
    );

    let records = dev.ledger().records();
    assert_eq!(records.len(), 6);
    let first = &records[0];
    assert_eq!(first.label, "audit");
    assert_eq!((first.src, first.dst), (None, Some(StorageMode::Private)));
    assert!(
        first.site.file().ends_with("ledger.rs"),
        "{}",
        first.site.file()
    );
    assert_eq!(first.site.line(), upload_line);
    assert!(
        first.fence.is_some() && records[1].fence.is_none(),
        "only the staged upload used the queue"
    );
    assert_eq!(
        (records[2].src, records[2].dst),
        (Some(StorageMode::Private), Some(StorageMode::External))
    );

    let report = dev.copy_report().to_string();
    assert!(report.contains("copy audit: 6 transfers"), "{report}");
    assert!(
        report.contains(&format!("ledger.rs:{upload_line}")),
        "{report}"
    );
    dev.ledger().clear();
    assert_eq!(dev.ledger().total().count, 0);
}

/// The Chrome trace holds the copies on the host track and the submissions on their queues'
/// tracks, with thread names; its string values are escaped.
#[test]
fn chrome_trace_shows_copies_and_submissions_per_queue() {
    let dev = device();
    let q2 = dev.new_queue("loader \"two\"").unwrap();
    let b = dev
        .alloc(DType::U8, &[1 << 16], StorageMode::Private)
        .unwrap();
    dev.queue().fill(&b, FillPattern::u8(1)).unwrap();
    q2.upload(&b, &vec![2u8; 1 << 16]).unwrap();
    dev.drain().unwrap();
    let trace = dev.chrome_trace();
    assert!(trace.starts_with('{') && trace.trim_end().ends_with('}'));
    assert!(trace.contains("\"traceEvents\""));
    assert!(trace.contains("\"cat\":\"copy\"") && trace.contains("host->device 64.00 KiB"));
    if dev.info().timestamps {
        assert!(
            trace.contains("\"cat\":\"gpu\",\"ph\":\"X\",\"pid\":1,\"tid\":1"),
            "default queue track"
        );
        assert!(
            trace.contains("\"cat\":\"gpu\",\"ph\":\"X\",\"pid\":1,\"tid\":2"),
            "second queue track"
        );
    }
    assert!(
        trace.contains("queue 1 (loader \\\"two\\\")"),
        "thread names are escaped"
    );
    let opens = trace.matches('{').count();
    assert_eq!(opens, trace.matches('}').count(), "balanced braces");
    let path = std::env::temp_dir().join(format!("unibuf-trace-{}.json", std::process::id()));
    dev.write_chrome_trace(&path).unwrap();
    assert_eq!(
        std::fs::read_to_string(&path).unwrap().len(),
        dev.chrome_trace().len()
    );
    std::fs::remove_file(path).unwrap();
}
