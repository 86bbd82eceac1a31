//! Model-based test of the hazard tracker: random asynchronous uploads, fills, copies and
//! downloads on random views of buffers in every mode, spread over three queues, must leave
//! exactly the bytes a sequential host model predicts. Any missing cross-queue wait, early
//! reuse or early host access shows up as a mismatch.

use unibuf::{Buffer, DType, FillPattern, PendingDownload, StorageMode};
use unibuf_conformance::{buffer, builder, Rng, MODES};

const BUFFERS: usize = 6;
const STEPS: usize = 600;

fn random_range(rng: &mut Rng, len: usize, align: usize) -> (usize, usize) {
    let units = len / align;
    let a = rng.range(0, units);
    let b = rng.range(a + 1, units + 1);
    (a * align, b * align)
}

#[test]
fn random_async_work_matches_a_sequential_model() {
    // Small staging chunks so that staged transfers span several chunks and reuse them.
    let dev = builder().staging(8192, 4).open().unwrap();
    let queues = [
        dev.queue(),
        dev.new_queue("q1").unwrap(),
        dev.new_queue("q2").unwrap(),
    ];
    let mut rng = Rng::new("random_async_work_matches_a_sequential_model");
    let mut bufs: Vec<Buffer> = Vec::new();
    let mut model: Vec<Vec<u8>> = Vec::new();
    for i in 0..BUFFERS {
        let len = rng.range(1, 64) * 1024 + 8 * rng.range(0, 16);
        let b = buffer(&dev, MODES[i % 3], DType::U8, &[len], &format!("b{i}"));
        let init = rng.bytes(len);
        dev.queue().upload(&b, &init).unwrap();
        bufs.push(b);
        model.push(init);
    }
    let mut pending: Vec<(PendingDownload<u8>, Vec<u8>, String)> = Vec::new();
    for step in 0..STEPS {
        let q = &queues[rng.range(0, queues.len())];
        let i = rng.range(0, BUFFERS);
        match rng.range(0, 6) {
            0 => {
                let (a, b) = random_range(&mut rng, model[i].len(), 1);
                let data = rng.bytes(b - a);
                q.upload_async(&bufs[i].slice(a..b).unwrap(), &data)
                    .unwrap();
                model[i][a..b].copy_from_slice(&data);
            }
            1 => {
                let (a, b) = random_range(&mut rng, model[i].len(), 8);
                let v = rng.next_u64();
                let view = bufs[i].slice(a..b).unwrap().cast(DType::U64).unwrap();
                q.fill_async(&view, FillPattern::u64(v)).unwrap();
                for (k, byte) in model[i][a..b].iter_mut().enumerate() {
                    *byte = v.to_ne_bytes()[k % 8];
                }
            }
            2 | 3 => {
                let j = rng.range(0, BUFFERS);
                let n = rng.range(1, model[i].len().min(model[j].len()) + 1);
                let s = rng.range(0, model[i].len() - n + 1);
                let d = rng.range(0, model[j].len() - n + 1);
                if i == j && s < d + n && d < s + n {
                    continue; // overlapping copies are refused (tested in bad_input)
                }
                q.copy_async(
                    &bufs[i].slice(s..s + n).unwrap(),
                    &bufs[j].slice(d..d + n).unwrap(),
                )
                .unwrap();
                let src = model[i][s..s + n].to_vec();
                model[j][d..d + n].copy_from_slice(&src);
            }
            4 => {
                let (a, b) = random_range(&mut rng, model[i].len(), 1);
                let p = q
                    .download_async::<u8>(&bufs[i].slice(a..b).unwrap())
                    .unwrap();
                pending.push((
                    p,
                    model[i][a..b].to_vec(),
                    format!("step {step}: async download b{i}[{a}..{b}]"),
                ));
            }
            _ => {
                let (a, b) = random_range(&mut rng, model[i].len(), 1);
                let view = bufs[i].slice(a..b).unwrap();
                let got: Vec<u8> = if bufs[i].mode() != StorageMode::Private && rng.range(0, 2) == 0
                {
                    view.read::<u8>().unwrap().to_vec()
                } else {
                    q.download(&view).unwrap()
                };
                assert!(
                    got == model[i][a..b],
                    "step {step}: b{i}[{a}..{b}] differs from the model"
                );
            }
        }
        if pending.len() > 8 {
            let (p, want, what) = pending.remove(0);
            assert!(p.wait().unwrap() == want, "{what}");
        }
    }
    for (p, want, what) in pending {
        assert!(p.wait().unwrap() == want, "{what}");
    }
    for (i, b) in bufs.iter().enumerate() {
        assert!(b.to_vec::<u8>().unwrap() == model[i], "final state of b{i}");
    }
    drop(bufs);
    dev.drain().unwrap();
    dev.trim();
    let s = dev.memory_stats();
    assert_eq!(
        (
            s.active_bytes,
            s.reserved_bytes,
            s.external_count,
            s.staging_bytes
        ),
        (0, 0, 0, 0),
        "{s}"
    );
}
