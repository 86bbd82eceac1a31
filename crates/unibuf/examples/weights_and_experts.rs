//! Weights: a safetensors file loaded onto the device, and a mixture-of-experts layer's experts
//! streamed through the expert cache.
//!
//! ```text
//! cargo run -p unibuf --example weights_and_experts
//! UNIBUF_BACKEND=cuda cargo run -p unibuf --features cuda --example weights_and_experts
//! ```
//!
//! The example writes a small checkpoint to a temporary folder: two dense tensors and, for each
//! of 2 layers, 8 experts of one matrix each. `WeightsFile::open` validates the whole header
//! first; `load` maps the file and hands out views of it on unified memory (zero copy) or
//! streams it into device memory on a discrete GPU. The experts stay in the file:
//! `ExpertCache` keeps at most 3 per layer on the device, reads misses when they are routed to
//! and prefetches predicted ones in the background on its own copy queue.

use safetensors::Dtype;
use std::collections::HashMap;
use unibuf::half::f16;
use unibuf::ops;
use unibuf::weights::{ExpertCache, ExpertLayout, Selection, WeightsFile};
use unibuf::{Device, Error};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const LAYERS: usize = 2;
const EXPERTS: usize = 8;
const BUDGET: usize = 3; // experts of each layer on the device at most
const HIDDEN: usize = 64;
const FFN: usize = 128;

/// Element `i` of expert `e` of layer `l`: small dyadic values, so products are exact in f32.
fn expert_value(l: usize, e: usize, i: usize) -> f32 {
    ((i * 7 + e * 3 + l) % 9) as f32 * 0.25 - 1.0
}

fn main() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("unibuf-weights-example-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = run(&dir);
    std::fs::remove_dir_all(&dir)?;
    result
}

fn run(dir: &std::path::Path) -> Result<()> {
    // A checkpoint as a training framework would write it (here with the safetensors crate).
    let f32s = |v: &mut dyn Iterator<Item = f32>| v.flat_map(f32::to_le_bytes).collect();
    let mut norm = (0..HIDDEN).map(|i| 1.0 + i as f32 / 64.0);
    let embed = (0..4 * HIDDEN).flat_map(|i| f16::from_f32(i as f32 / 8.0).to_le_bytes());
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = vec![
        ("norm".into(), Dtype::F32, vec![HIDDEN], f32s(&mut norm)),
        ("embed".into(), Dtype::F16, vec![4, HIDDEN], embed.collect()),
    ];
    for (l, e) in (0..LAYERS).flat_map(|l| (0..EXPERTS).map(move |e| (l, e))) {
        let mut w = (0..FFN * HIDDEN).map(|i| expert_value(l, e, i));
        let name = format!("layers.{l}.experts.{e}.w_up");
        tensors.push((name, Dtype::F32, vec![FFN, HIDDEN], f32s(&mut w)));
    }
    let views = tensors.iter().map(|(name, dtype, shape, bytes)| {
        let view = safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes);
        view.map(|v| (name.as_str(), v))
    });
    let path = dir.join("moe.safetensors");
    let views: Vec<_> = views.collect::<std::result::Result<_, _>>()?;
    safetensors::serialize_to_file(views, None::<HashMap<String, String>>, &path)?;

    // Validate, then load the dense tensors.
    let dev = Device::new()?;
    let file = WeightsFile::open(&path)?;
    println!(
        "{}: {} tensors, {} bytes of data",
        file.format(),
        file.tensors().len(),
        file.data_len()
    );
    let dense = file.load(&dev, &dev.queue(), &Selection::names(["norm", "embed"]))?;
    print!("{}", dense.report()); // GB/s and a table by dtype
    let norm = dense.get("norm").ok_or("no norm")?;
    ensure(
        norm.to_vec::<f32>()?[63] == 1.0 + 63.0 / 64.0,
        "norm loaded",
    )?;
    let embed = dense.get("embed").ok_or("no embed")?;
    ensure(embed.shape() == [4, HIDDEN], "embed's shape")?;
    ensure(
        embed.to_vec::<f16>()?[9].to_f32() == 9.0 / 8.0,
        "embed's values",
    )?;
    if dev.info().unified_memory {
        println!(
            "unified memory: the tensors are views of the mapped file ({:?})",
            norm.mode()
        );
    }

    // A bad file is a Format error naming the problem, before any data moves.
    let bad = dir.join("truncated.safetensors");
    let bytes = std::fs::read(&path)?;
    std::fs::write(&bad, &bytes[..bytes.len() - 100])?;
    match WeightsFile::open(&bad) {
        Err(e @ Error::Format { .. }) => println!("truncated file refused: {e}"),
        other => return Err(format!("a truncated file opened: {:?}", other.is_ok()).into()),
    }

    // The experts: expert e of layer l is every tensor named "layers.{l}.experts.{e}.*".
    let layout = ExpertLayout::by_prefix(&file, LAYERS, EXPERTS, |l, e| {
        format!("layers.{l}.experts.{e}.")
    })?;
    let cache = ExpertCache::new(&dev, &file, layout, BUDGET)?;
    let compute = dev.new_queue("compute")?;
    let x: Vec<f32> = (0..HIDDEN).map(|i| (i % 4) as f32 * 0.5).collect();
    let xb = dev.from_slice("x", &x, &[1, HIDDEN])?;
    let mut gets = 0;
    for token in 0..12 {
        for l in 0..LAYERS {
            // A stand-in router: two experts per token and layer.
            let route = |l: usize| [(token * 3 + l) % EXPERTS, (token * 5 + 1 + l) % EXPERTS];
            if l + 1 < LAYERS {
                cache.prefetch(l + 1, &route(l + 1))?; // read the next layer's while this one runs
            }
            for e in route(l) {
                let expert = cache.get(l, e)?; // on the device now, or being copied there
                gets += 1;
                // Work on another queue waits for the expert's copy on the device by itself.
                let y = ops::matmul_bt(&compute, &xb, expert.get("w_up").ok_or("no w_up")?)?;
                let y = compute.download::<f32>(&y)?;
                for (r, &got) in y.iter().enumerate() {
                    let want: f32 = (0..HIDDEN)
                        .map(|i| expert_value(l, e, r * HIDDEN + i) * x[i])
                        .sum();
                    ensure(got == want, "expert product")?;
                }
            }
        }
    }
    cache.wait_prefetches();
    let s = cache.stats();
    println!(
        "expert cache after {gets} gets: {s:?}, hit rate {:.2}",
        s.hit_rate()
    );
    ensure(
        s.hits + s.prefetch_hits + s.misses == gets,
        "every get counted",
    )?;
    ensure(
        s.evictions > 0 && s.resident <= LAYERS * BUDGET,
        "the budget",
    )?;
    let within = (0..LAYERS).all(|l| cache.resident(l).len() <= BUDGET);
    ensure(within, "the budget holds in every layer")?;
    println!("ok");
    Ok(())
}

/// Fails the example with `what` unless `ok`.
fn ensure(ok: bool, what: &str) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(format!("wrong result: {what}").into())
    }
}
