//! `unibuf generate MODEL.gguf`: text generation with a Llama-architecture GGUF model, on any
//! backend. The prompt is tokenized with the file's own byte-level BPE, prefilled in chunks
//! through the GEMM path, then decoded one token per submission (a CUDA graph on CUDA).
//!
//! Prints the text as it is generated, then tokens/s, the submissions per label and the copy
//! audit; `--json` prints all of that as one JSON object instead. `--reference FILE` checks the
//! run against logits and tokens recorded from an independent implementation.

mod config;
mod model;
pub mod reference;
pub mod tokenizer;

use crate::{Context, Failure};
use clap::Parser;
use model::Llama;
use serde_json::json;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokenizer::Tokenizer;
use unibuf::ops::Sampling;
use unibuf::DType;

/// KV cache element types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KvDType {
    /// IEEE half precision.
    F16,
    /// bfloat16.
    Bf16,
    /// Single precision.
    F32,
}

impl From<KvDType> for DType {
    fn from(d: KvDType) -> DType {
        match d {
            KvDType::F16 => DType::F16,
            KvDType::Bf16 => DType::BF16,
            KvDType::F32 => DType::F32,
        }
    }
}

/// `unibuf generate` arguments.
#[derive(Debug, Parser)]
pub struct Args {
    /// The GGUF file (llama architecture; Q8_0, Q4_0 or Q4_1 matrices).
    pub model: PathBuf,
    /// The prompt text.
    #[arg(long, conflicts_with = "prompt_tokens")]
    pub prompt: Option<String>,
    /// The prompt as token ids, comma-separated (e.g. `1,2,3`), instead of text.
    #[arg(long, value_delimiter = ',')]
    pub prompt_tokens: Option<Vec<u32>>,
    /// Wrap the prompt as a user message in the file's chat template.
    #[arg(long, conflicts_with = "prompt_tokens")]
    pub chat: bool,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Always take the most likely token (the default unless a sampling flag is given).
    #[arg(long, conflicts_with_all = ["temperature", "top_k", "top_p"])]
    pub greedy: bool,
    /// Sampling temperature (0 = greedy).
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Keep the k most likely tokens (0 = no limit beyond the sampler's 1024).
    #[arg(long)]
    pub top_k: Option<u32>,
    /// Keep the smallest set of tokens whose probability reaches p.
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Seed of the random draws.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Keep generating past the end-of-sequence token.
    #[arg(long)]
    pub ignore_eos: bool,
    /// The KV cache's element type.
    #[arg(long, value_enum, default_value_t = KvDType::F16)]
    pub kv_dtype: KvDType,
    /// Prompt tokens per prefill chunk.
    #[arg(long, default_value_t = 256)]
    pub prefill_chunk: usize,
    /// The backend (default: $UNIBUF_BACKEND, else the best found).
    #[arg(long)]
    pub backend: Option<String>,
    /// Submit each launch of a decode step on its own instead of one recorded batch (a CUDA
    /// graph): slower, but the submission table then shows every kernel's device time.
    #[arg(long)]
    pub no_graph: bool,
    /// Print one JSON object instead of text and tables.
    #[arg(long)]
    pub json: bool,
    /// Check the run against a reference file (prompts, logit summaries and greedy tokens
    /// recorded from an independent implementation); the run fails if they disagree.
    #[arg(long)]
    pub reference: Option<PathBuf>,
}

impl Args {
    /// The sampling the flags ask for: greedy unless a sampling flag is given.
    fn sampling(&self) -> Result<Sampling, Failure> {
        let sampled = self.temperature.is_some() || self.top_k.is_some() || self.top_p.is_some();
        let s = if self.greedy || !sampled {
            Sampling::greedy()
        } else {
            Sampling {
                temperature: self.temperature.unwrap_or(1.0),
                top_k: self.top_k.unwrap_or(0),
                top_p: self.top_p.unwrap_or(1.0),
                seed: self.seed,
            }
        };
        s.validate()?;
        Ok(s)
    }
}

/// What one generation did.
pub struct Generation {
    /// The prompt's token ids.
    pub prompt: Vec<u32>,
    /// The generated token ids.
    pub generated: Vec<u32>,
    /// Prompt to first token.
    pub prefill: Duration,
    /// The first decode step (it records the step and, on CUDA, instantiates its graph).
    pub first_step: Duration,
    /// The decode steps after the first.
    pub decode: Duration,
}

impl Generation {
    fn prefill_tokens_per_s(&self) -> f64 {
        self.prompt.len() as f64 / self.prefill.as_secs_f64()
    }
    /// Decode tokens per second over the steps after the first.
    fn decode_tokens_per_s(&self) -> Option<f64> {
        let steps = self.generated.len().saturating_sub(2);
        (steps > 0).then(|| steps as f64 / self.decode.as_secs_f64())
    }
}

/// How to generate.
pub struct Options {
    /// Tokens to generate at most.
    pub max_tokens: usize,
    /// How to pick each token.
    pub sampling: Sampling,
    /// Stop after this token (end of sequence), if any.
    pub stop: Option<u32>,
    /// Prompt tokens per prefill chunk.
    pub prefill_chunk: usize,
}

/// Generates after `prompt`; `on_token` sees each token as it comes.
pub fn generate(
    model: &mut Llama,
    prompt: &[u32],
    opts: &Options,
    mut on_token: impl FnMut(u32) -> Result<(), Failure>,
) -> Result<Generation, Failure> {
    let Options {
        max_tokens,
        ref sampling,
        stop,
        prefill_chunk,
    } = *opts;
    let mut g = Generation {
        prompt: prompt.to_vec(),
        generated: Vec::new(),
        prefill: Duration::ZERO,
        first_step: Duration::ZERO,
        decode: Duration::ZERO,
    };
    if max_tokens == 0 {
        return Ok(g);
    }
    model.reset();
    let started = Instant::now();
    model.prefill(prompt, prefill_chunk)?;
    let mut token = model.sample(sampling, 0)?;
    g.prefill = started.elapsed();
    loop {
        g.generated.push(token);
        on_token(token)?;
        if g.generated.len() == max_tokens || Some(token) == stop {
            break;
        }
        let step_started = Instant::now();
        token = model.decode(token, sampling, g.generated.len() as u64)?;
        if g.generated.len() == 1 {
            g.first_step = step_started.elapsed();
        } else {
            g.decode += step_started.elapsed();
        }
    }
    Ok(g)
}

/// Runs `unibuf generate`.
pub fn run(args: &Args, out: &mut dyn Write) -> Result<(), Failure> {
    let sampling = args.sampling()?;
    let (dev, _) = crate::open_device(args.backend.as_deref())?;
    let header = unibuf::weights::gguf::GgufHeader::read(&args.model)
        .context(&format!("reading {}", args.model.display()))?;
    let tok = Tokenizer::from_gguf(&header)?;
    let reference = args
        .reference
        .as_ref()
        .map(|p| reference::Reference::read(p))
        .transpose()?;

    let load_started = Instant::now();
    let (mut model, load) = Llama::load(&dev, &args.model, args.kv_dtype.into())?;
    model.graph = !args.no_graph;
    let kernels = dev.warm_all().context("compiling the kernels")?;
    model.warm_up()?;
    let load_time = load_started.elapsed();
    dev.reset_submission_stats();

    if let Some(reference) = &reference {
        let summary = reference.check(&mut model, &tok, args.prefill_chunk)?;
        if args.json {
            writeln!(out, "{}", summary.to_json())?;
        } else {
            write!(out, "{summary}")?;
        }
        return Ok(());
    }

    let prompt = match (&args.prompt, &args.prompt_tokens) {
        (_, Some(ids)) => ids.clone(),
        (Some(text), None) if args.chat => {
            let rendered = tok.apply_chat_template(&[("user", text.as_str())], true)?;
            tok.encode(&rendered, true)?
        }
        (Some(text), None) => tok.encode(text, false)?,
        (None, None) => {
            return Err(Failure::new(
                "give the prompt with --prompt TEXT or --prompt-tokens 1,2,3",
            ))
        }
    };
    if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= model.cfg.vocab) {
        return Err(Failure::new(format!(
            "prompt token {bad} is outside the vocabulary of {}",
            model.cfg.vocab
        )));
    }
    let stop = (!args.ignore_eos).then(|| tok.eos_id()).flatten();
    let mut stream = tok.stream();
    let opts = Options {
        max_tokens: args.max_tokens,
        sampling,
        stop,
        prefill_chunk: args.prefill_chunk,
    };
    let g = generate(&mut model, &prompt, &opts, |t| {
        if !args.json {
            let piece = stream.push(t)?;
            write!(out, "{piece}")?;
            out.flush()?;
        }
        Ok(())
    })?;
    if !args.json {
        // A character cut short by the last token (invalid UTF-8) is shown as U+FFFD.
        write!(out, "{}", stream.finish())?;
    }
    let text = tok.decode(&g.generated)?;
    let stats = dev.submission_stats();
    let audit = dev.copy_report();
    if args.json {
        let submissions: Vec<_> = stats
            .labels
            .iter()
            .map(|l| {
                json!({
                    "label": l.label, "count": l.count, "encode_ns": l.encode_ns,
                    "wait_ns": l.wait_ns, "gpu_ns": l.gpu_ns, "timed": l.timed,
                })
            })
            .collect();
        let copies: Vec<_> = audit
            .by_direction
            .iter()
            .map(|(d, t, _)| {
                json!({
                    "direction": d.name(), "count": t.count, "bytes": t.bytes,
                    "staged_bytes": t.staged_bytes,
                })
            })
            .collect();
        let doc = json!({
            "model": args.model.display().to_string(),
            "device": dev.info().name,
            "backend": dev.info().backend,
            "kv_dtype": format!("{}", DType::from(args.kv_dtype)),
            "load_s": load_time.as_secs_f64(),
            "weights_bytes": load.bytes,
            "kernels_compiled": kernels,
            "prompt_ids": g.prompt,
            "generated_ids": g.generated,
            "text": text,
            "prefill_tokens_per_s": g.prefill_tokens_per_s(),
            "prefill_ms": g.prefill.as_secs_f64() * 1e3,
            "first_step_ms": g.first_step.as_secs_f64() * 1e3,
            "decode_tokens_per_s": g.decode_tokens_per_s(),
            "submissions": submissions,
            "copies": copies,
        });
        writeln!(out, "{doc}")?;
        return Ok(());
    }
    writeln!(out)?;
    writeln!(out)?;
    writeln!(
        out,
        "{} on {} ({}): {} prompt tokens, {} generated; load {:.2} s",
        args.model.display(),
        dev.info().name,
        dev.info().backend,
        g.prompt.len(),
        g.generated.len(),
        load_time.as_secs_f64()
    )?;
    writeln!(
        out,
        "prefill {:.1} tokens/s ({:.1} ms); decode {} (first step {:.1} ms)",
        g.prefill_tokens_per_s(),
        g.prefill.as_secs_f64() * 1e3,
        g.decode_tokens_per_s()
            .map_or("n/a (fewer than 3 tokens)".to_owned(), |r| format!(
                "{r:.1} tokens/s"
            )),
        g.first_step.as_secs_f64() * 1e3
    )?;
    writeln!(out)?;
    writeln!(out, "submissions (per label)")?;
    write!(out, "{stats}")?;
    writeln!(out)?;
    write!(out, "{audit}")?;
    Ok(())
}
