//! `unibuf generate --reference FILE`: the run checked against an independent implementation.
//!
//! The file (made by `bench/peers/smollm2_reference.py` with Hugging Face transformers' own
//! GGUF loader, dequantised to f32 on the CPU; `tests/reference/` holds the one for SmolLM2)
//! gives, per prompt, the prompt's token ids, the greedy tokens and a summary of the logits at
//! every scored position. The check:
//!
//! 1. **Tokenizer**: the prompt (a chat prompt rendered with the file's template first) must
//!    encode to the reference's ids, and the generated ids decode to the reference's text.
//! 2. **Logits**, teacher-forced (the reference's tokens are fed, so every step is compared at
//!    the same context): at each step the logits of the reference's top five tokens and of ids
//!    0..8, and the row's log-sum-exp, mean and standard deviation, must be within the
//!    tolerance of the reference's.
//! 3. **Greedy tokens**: the argmax at every step must be the reference's token, except where
//!    the reference's top two logits are closer than twice the tolerance (then either is a
//!    correct pick in f32 arithmetic of another summation order). With teacher forcing this is
//!    the same as free-running greedy decoding agreeing on every token.

use super::model::Llama;
use super::tokenizer::Tokenizer;
use crate::Failure;
use serde_json::{json, Value};
use std::fmt;
use std::path::Path;
use unibuf::ops::Sampling;
use unibuf::DType;

/// The largest |difference| allowed between a logit (or a row statistic) and the reference's,
/// by KV cache dtype. The reference is f32 throughout; unibuf's arithmetic is f32 but its sums
/// run in another order (on SmolLM2 that moves logits of magnitude ~30 by under 1e-4), and a
/// reduced-precision cache rounds every key and value once (relative 2^-11 for f16, 2^-8 for
/// bf16), which moves them by up to about 0.02 (f16) or 0.2 (bf16).
pub fn tolerance(kv: DType) -> f64 {
    match kv {
        DType::F32 => 1e-3,
        DType::F16 => 0.05,
        _ => 0.25,
    }
}

/// One prompt of the reference file.
struct Case {
    name: String,
    /// The text the prompt ids encode (a chat prompt: the rendered template).
    text: String,
    /// For a chat prompt: the messages, to render with the file's template.
    messages: Option<Vec<(String, String)>>,
    add_generation_prompt: bool,
    prompt_ids: Vec<u32>,
    generated_ids: Vec<u32>,
    generated_text: String,
    steps: Vec<StepSummary>,
}

/// The reference's summary of one row of logits.
struct StepSummary {
    top5_ids: Vec<u32>,
    top5_logits: Vec<f64>,
    margin: f64,
    logsumexp: f64,
    mean: f64,
    std: f64,
    first8: Vec<f64>,
}

/// A reference file, read and checked for shape.
pub struct Reference {
    path: String,
    cases: Vec<Case>,
}

fn field<'a>(v: &'a Value, key: &str, at: &str) -> Result<&'a Value, Failure> {
    v.get(key)
        .ok_or_else(|| Failure::new(format!("reference {at}: no field '{key}'")))
}

fn string(v: &Value, key: &str, at: &str) -> Result<String, Failure> {
    field(v, key, at)?
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| Failure::new(format!("reference {at}: '{key}' is not a string")))
}

fn numbers(v: &Value, key: &str, at: &str) -> Result<Vec<f64>, Failure> {
    field(v, key, at)?
        .as_array()
        .and_then(|a| a.iter().map(Value::as_f64).collect::<Option<Vec<_>>>())
        .ok_or_else(|| Failure::new(format!("reference {at}: '{key}' is not a list of numbers")))
}

fn ids(v: &Value, key: &str, at: &str) -> Result<Vec<u32>, Failure> {
    field(v, key, at)?
        .as_array()
        .and_then(|a| {
            a.iter()
                .map(|x| x.as_u64().and_then(|x| u32::try_from(x).ok()))
                .collect::<Option<Vec<_>>>()
        })
        .ok_or_else(|| {
            Failure::new(format!(
                "reference {at}: '{key}' is not a list of token ids"
            ))
        })
}

fn number(v: &Value, key: &str, at: &str) -> Result<f64, Failure> {
    field(v, key, at)?
        .as_f64()
        .ok_or_else(|| Failure::new(format!("reference {at}: '{key}' is not a number")))
}

impl Reference {
    /// Reads a reference file.
    pub fn read(path: &Path) -> Result<Reference, Failure> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Failure::new(format!("reading {}: {e}", path.display())))?;
        let doc: Value = serde_json::from_str(&text)
            .map_err(|e| Failure::new(format!("{}: not JSON: {e}", path.display())))?;
        let prompts = field(&doc, "prompts", "file")?
            .as_array()
            .ok_or_else(|| Failure::new("reference: 'prompts' is not a list"))?;
        let mut cases = Vec::new();
        for p in prompts {
            let name = string(p, "name", "prompt")?;
            let at = format!("prompt '{name}'");
            let messages = match p.get("messages") {
                Some(m) => Some(
                    m.as_array()
                        .ok_or_else(|| Failure::new(format!("reference {at}: bad 'messages'")))?
                        .iter()
                        .map(|m| Ok((string(m, "role", &at)?, string(m, "content", &at)?)))
                        .collect::<Result<Vec<_>, Failure>>()?,
                ),
                None => None,
            };
            let steps = field(p, "steps", &at)?
                .as_array()
                .ok_or_else(|| Failure::new(format!("reference {at}: 'steps' is not a list")))?
                .iter()
                .map(|s| {
                    Ok(StepSummary {
                        top5_ids: ids(s, "top5_ids", &at)?,
                        top5_logits: numbers(s, "top5_logits", &at)?,
                        margin: number(s, "margin", &at)?,
                        logsumexp: number(s, "logsumexp", &at)?,
                        mean: number(s, "mean", &at)?,
                        std: number(s, "std", &at)?,
                        first8: numbers(s, "first8", &at)?,
                    })
                })
                .collect::<Result<Vec<_>, Failure>>()?;
            let case = Case {
                text: string(p, "text", &at)?,
                add_generation_prompt: p
                    .get("add_generation_prompt")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
                messages,
                prompt_ids: ids(p, "prompt_ids", &at)?,
                generated_ids: ids(p, "generated_ids", &at)?,
                generated_text: string(p, "generated_text", &at)?,
                steps,
                name,
            };
            if case.steps.len() != case.generated_ids.len() || case.prompt_ids.is_empty() {
                return Err(Failure::new(format!(
                    "reference {at}: {} steps for {} generated ids, {} prompt ids",
                    case.steps.len(),
                    case.generated_ids.len(),
                    case.prompt_ids.len()
                )));
            }
            cases.push(case);
        }
        if cases.is_empty() {
            return Err(Failure::new("reference: no prompts"));
        }
        Ok(Reference {
            path: path.display().to_string(),
            cases,
        })
    }

    /// Runs every prompt on `model` and checks it; fails at the first disagreement, naming
    /// the prompt, the step and the values.
    pub fn check(
        &self,
        model: &mut Llama,
        tok: &Tokenizer,
        prefill_chunk: usize,
    ) -> Result<CheckSummary, Failure> {
        let tol = tolerance(model.kv_dtype);
        let mut out = CheckSummary {
            path: self.path.clone(),
            kv_dtype: model.kv_dtype,
            tolerance: tol,
            prompts: Vec::new(),
        };
        for case in &self.cases {
            out.prompts
                .push(check_case(model, tok, case, prefill_chunk, tol)?);
        }
        Ok(out)
    }
}

/// What the check of one prompt found.
pub struct CaseSummary {
    name: String,
    prompt_tokens: usize,
    steps: usize,
    /// Steps whose argmax is the reference's token.
    tokens_agreeing: usize,
    /// Steps where the reference's top two are within twice the tolerance.
    near_ties: usize,
    max_logit_diff: f64,
    max_stat_diff: f64,
}

/// What the whole check found.
pub struct CheckSummary {
    path: String,
    kv_dtype: DType,
    tolerance: f64,
    prompts: Vec<CaseSummary>,
}

impl CheckSummary {
    /// The summary as JSON.
    pub fn to_json(&self) -> Value {
        json!({
            "reference": self.path,
            "kv_dtype": self.kv_dtype.to_string(),
            "tolerance": self.tolerance,
            "passed": true,
            "prompts": self.prompts.iter().map(|p| json!({
                "name": p.name, "prompt_tokens": p.prompt_tokens, "steps": p.steps,
                "tokens_agreeing": p.tokens_agreeing, "near_ties": p.near_ties,
                "max_logit_diff": p.max_logit_diff, "max_stat_diff": p.max_stat_diff,
            })).collect::<Vec<_>>(),
        })
    }
}

impl fmt::Display for CheckSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "reference check passed: {} (KV cache {}, tolerance {} on every logit and statistic)",
            self.path, self.kv_dtype, self.tolerance
        )?;
        writeln!(
            f,
            "  {:<10} {:>7} {:>6} {:>9} {:>6} {:>11} {:>11}",
            "prompt", "tokens", "steps", "argmax ok", "ties", "max |dlogit|", "max |dstat|"
        )?;
        for p in &self.prompts {
            writeln!(
                f,
                "  {:<10} {:>7} {:>6} {:>9} {:>6} {:>11.2e} {:>11.2e}",
                p.name,
                p.prompt_tokens,
                p.steps,
                p.tokens_agreeing,
                p.near_ties,
                p.max_logit_diff,
                p.max_stat_diff
            )?;
        }
        Ok(())
    }
}

/// The reference's statistics of a logit row, computed in f64.
fn row_stats(row: &[f32]) -> (f64, f64, f64) {
    let n = row.len() as f64;
    let max = row
        .iter()
        .fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
    let sum_exp: f64 = row.iter().map(|&v| (f64::from(v) - max).exp()).sum();
    let mean = row.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let var = row
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / n;
    (max + sum_exp.ln(), mean, var.sqrt())
}

/// The argmax, the lowest id among equal maxima (as the reference's `torch.argmax`).
fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

fn check_case(
    model: &mut Llama,
    tok: &Tokenizer,
    case: &Case,
    prefill_chunk: usize,
    tol: f64,
) -> Result<CaseSummary, Failure> {
    let at = format!("prompt '{}'", case.name);
    // 1. The tokenizer.
    let text = match &case.messages {
        Some(messages) => {
            let m: Vec<(&str, &str)> = messages
                .iter()
                .map(|(r, c)| (r.as_str(), c.as_str()))
                .collect();
            let rendered = tok.apply_chat_template(&m, case.add_generation_prompt)?;
            if rendered != case.text {
                return Err(Failure::new(format!(
                    "{at}: the chat template renders {rendered:?}; the reference has {:?}",
                    case.text
                )));
            }
            rendered
        }
        None => case.text.clone(),
    };
    let ours = tok.encode(&text, true)?;
    if ours != case.prompt_ids {
        return Err(Failure::new(format!(
            "{at}: the tokenizer gives {ours:?}; the reference has {:?}",
            case.prompt_ids
        )));
    }
    let decoded = tok.decode(&case.generated_ids)?;
    if decoded != case.generated_text {
        return Err(Failure::new(format!(
            "{at}: the generated ids decode to {decoded:?}; the reference has {:?}",
            case.generated_text
        )));
    }
    // 2 and 3. Teacher-forced logits and argmax.
    let mut summary = CaseSummary {
        name: case.name.clone(),
        prompt_tokens: case.prompt_ids.len(),
        steps: case.steps.len(),
        tokens_agreeing: 0,
        near_ties: 0,
        max_logit_diff: 0.0,
        max_stat_diff: 0.0,
    };
    model.reset();
    model.prefill(&case.prompt_ids, prefill_chunk)?;
    for (k, step) in case.steps.iter().enumerate() {
        if k > 0 {
            model.decode(case.generated_ids[k - 1], &Sampling::greedy(), k as u64)?;
        }
        let row = model.queue().download::<f32>(model.logits())?;
        let at = format!("{at}, step {k}");
        let compare = |what: String, ours: f64, want: f64, worst: &mut f64| {
            let d = (ours - want).abs();
            *worst = worst.max(d);
            if d.is_nan() || d > tol {
                return Err(Failure::new(format!(
                    "{at}: {what} is {ours:.5}; the reference has {want:.5} (|difference| {d:.2e} \
                     > tolerance {tol})"
                )));
            }
            Ok(())
        };
        for (&id, &want) in step.top5_ids.iter().zip(&step.top5_logits) {
            let ours = f64::from(row[id as usize]);
            compare(
                format!("logit of token {id}"),
                ours,
                want,
                &mut summary.max_logit_diff,
            )?;
        }
        for (id, &want) in step.first8.iter().enumerate() {
            let ours = f64::from(row[id]);
            compare(
                format!("logit of token {id}"),
                ours,
                want,
                &mut summary.max_logit_diff,
            )?;
        }
        let (lse, mean, std) = row_stats(&row);
        compare(
            "log-sum-exp".into(),
            lse,
            step.logsumexp,
            &mut summary.max_stat_diff,
        )?;
        compare(
            "mean logit".into(),
            mean,
            step.mean,
            &mut summary.max_stat_diff,
        )?;
        compare(
            "logit std".into(),
            std,
            step.std,
            &mut summary.max_stat_diff,
        )?;
        let picked = argmax(&row);
        let want = case.generated_ids[k];
        if picked == want {
            summary.tokens_agreeing += 1;
        } else if step.margin < 2.0 * tol {
            summary.near_ties += 1;
        } else {
            return Err(Failure::new(format!(
                "{at}: the argmax is token {picked}; the reference's is {want} with a margin of \
                 {:.4} over the next",
                step.margin
            )));
        }
    }
    Ok(summary)
}
