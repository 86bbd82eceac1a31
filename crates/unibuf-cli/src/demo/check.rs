//! The comparison of the device's run with the f64 reference.

use super::config::Config;
use super::model::Step;
use super::reference::RefStep;

/// The largest accepted `max |device - reference| / max |reference|` of any vector compared
/// (a step's router logits, final hidden state or logits). The weights are identical on both
/// sides (q4 dequantisation is exact), so the difference is the device's f32 arithmetic alone:
/// unit roundoff 6e-8, dot products of up to `ffn` terms (typically sqrt(n) roundings, about
/// 2e-6 of the result for n = 1408, at worst n of them), the RMS norms and SiLU in f32, and
/// those errors carried along the residual stream through every layer. Measured on the CPU
/// backend with the default sizes, the largest relative error is about 1e-6; GPU kernels sum
/// in other orders and use fused multiply-adds, which changes errors by small factors. 1e-4
/// leaves two orders of magnitude of margin while any real bug (a wrong scale, nibble order,
/// expert or weight) shows up as errors of order 1e-2 to 1.
pub const TOLERANCE: f64 = 1e-4;

/// How closely one device vector matches its reference.
#[derive(Debug)]
pub struct Agreement {
    /// Elements compared.
    pub compared: usize,
    /// Positions where the device or the reference is NaN or infinite.
    pub non_finite: usize,
    pub max_abs_err: f64,
    pub max_abs_ref: f64,
}

impl Agreement {
    pub fn measure(device: &[f32], reference: &[f64]) -> Agreement {
        let mut a = Agreement {
            compared: device.len().min(reference.len()),
            non_finite: 0,
            max_abs_err: 0.0,
            max_abs_ref: 0.0,
        };
        for (&d, &r) in device.iter().zip(reference) {
            // f64::max ignores NaN, so non-finite values are counted, never folded in.
            if !d.is_finite() || !r.is_finite() {
                a.non_finite += 1;
                continue;
            }
            a.max_abs_err = a.max_abs_err.max((f64::from(d) - r).abs());
            a.max_abs_ref = a.max_abs_ref.max(r.abs());
        }
        a
    }

    /// The error relative to the vector's magnitude.
    pub fn relative(&self) -> f64 {
        self.max_abs_err / self.max_abs_ref
    }

    /// Why the check fails, if it does.
    pub fn verdict(&self, expected: usize) -> Result<(), String> {
        if self.compared != expected {
            return Err(format!(
                "compared {} values, expected {expected}",
                self.compared
            ));
        }
        if self.non_finite > 0 {
            return Err(format!("{} values are NaN or infinite", self.non_finite));
        }
        if self.max_abs_ref == 0.0 {
            return Err("the reference is all zeros, so the comparison proves nothing".into());
        }
        if self.relative() > TOLERANCE {
            return Err(format!(
                "max |device - reference| = {:.3e} is {:.3e} of max |reference| = {:.4}, above {TOLERANCE:e}",
                self.max_abs_err,
                self.relative(),
                self.max_abs_ref
            ));
        }
        Ok(())
    }
}

/// Two values whose reference logits differ by less than this may be ordered either way by the
/// device: each device logit is within `TOLERANCE * max |logit|` of the reference's (checked
/// first), so their difference is within twice that.
fn margin(logits: &[f64]) -> f64 {
    2.0 * TOLERANCE * logits.iter().fold(0.0f64, |m, v| m.max(v.abs()))
}

/// The `n`-th largest of `values` (`n >= 1`).
fn nth_largest(values: &[f64], n: usize) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| b.total_cmp(a));
    v[(n - 1).min(v.len() - 1)]
}

/// What the check found.
#[derive(Debug, Default)]
pub struct Summary {
    /// Worst relative errors: router logits, final hidden states, logits.
    pub router: f64,
    pub hidden: f64,
    pub logits: f64,
    /// Routing decisions checked, and those where the device's set differs from the
    /// reference's top-k within the margin (a near-tie, not an error).
    pub decisions: usize,
    pub near_ties: usize,
}

/// Checks every step: router logits, expert choices, final hidden state, logits, and that the
/// sampled token is one the sampler could pick. `hidden` and `logits` are the device's
/// `[tokens, hidden]` and `[tokens, vocab]`.
pub fn check(
    cfg: &Config,
    steps: &[Step],
    refs: &[RefStep],
    hidden: &[f32],
    logits: &[f32],
) -> Result<Summary, String> {
    if steps.len() != refs.len() {
        return Err(format!(
            "{} device steps, {} reference steps",
            steps.len(),
            refs.len()
        ));
    }
    let (h, v) = (cfg.hidden, cfg.vocab);
    let mut s = Summary::default();
    for (t, (step, r)) in steps.iter().zip(refs).enumerate() {
        for (l, (layer, ref_logits)) in step.layers.iter().zip(&r.router).enumerate() {
            let at = |what: &str| format!("step {t}, layer {l}: {what}");
            let a = Agreement::measure(&layer.router, ref_logits);
            a.verdict(cfg.experts)
                .map_err(|why| at(&format!("router logits: {why}")))?;
            s.router = s.router.max(a.relative());

            let mut chosen = layer.chosen.clone();
            chosen.sort_unstable();
            chosen.dedup();
            if chosen.len() != cfg.active || chosen.iter().any(|&e| e >= cfg.experts) {
                return Err(at(&format!(
                    "the device ran experts {:?}; expected {} distinct experts below {}",
                    layer.chosen, cfg.active, cfg.experts
                )));
            }
            let kth = nth_largest(ref_logits, cfg.active);
            let m = margin(ref_logits);
            if let Some(&e) = layer.chosen.iter().find(|&&e| ref_logits[e] < kth - m) {
                return Err(at(&format!(
                    "the device ran expert {e} (reference logit {:.6}), outside the reference's top {} (k-th logit {kth:.6}, margin {m:.1e})",
                    ref_logits[e], cfg.active
                )));
            }
            s.decisions += 1;
            if layer.chosen.iter().any(|&e| ref_logits[e] < kth) {
                s.near_ties += 1;
            }
        }
        let at = |what: &str| format!("step {t}: {what}");
        let a = Agreement::measure(&hidden[t * h..(t + 1) * h], &r.hidden);
        a.verdict(h)
            .map_err(|why| at(&format!("final hidden state: {why}")))?;
        s.hidden = s.hidden.max(a.relative());
        let row = &logits[t * v..(t + 1) * v];
        let a = Agreement::measure(row, &r.logits);
        a.verdict(v).map_err(|why| at(&format!("logits: {why}")))?;
        s.logits = s.logits.max(a.relative());

        // The sampled token must be one of the sampler's candidates: the argmax when greedy,
        // else among the top-k (the random draw itself is not replayed).
        let n = if cfg.greedy() {
            1
        } else {
            cfg.sampling.candidates(v)
        };
        let nth = nth_largest(&r.logits, n);
        let m = margin(&r.logits);
        if r.logits[step.output] < nth - m {
            return Err(at(&format!(
                "the device sampled token {} (reference logit {:.6}), not among the reference's top {n} (n-th logit {nth:.6})",
                step.output, r.logits[step.output]
            )));
        }
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agreement_rejects_nan_zero_references_and_large_errors() {
        let r = [1.0, -2.0, 0.5];
        assert!(Agreement::measure(&[1.0, -2.0, 0.5], &r).verdict(3).is_ok());
        assert!(Agreement::measure(&[1.0, -2.0, 0.51], &r)
            .verdict(3)
            .is_err());
        assert!(Agreement::measure(&[1.0, f32::NAN, 0.5], &r)
            .verdict(3)
            .is_err());
        assert!(Agreement::measure(&[1.0, -2.0, 0.5], &[1.0, f64::NAN, 0.5])
            .verdict(3)
            .is_err());
        assert!(Agreement::measure(&[0.0; 3], &[0.0; 3]).verdict(3).is_err());
        assert!(Agreement::measure(&[1.0, -2.0], &r).verdict(3).is_err());
    }

    use crate::demo::model::LayerStep;
    use unibuf::ops::Sampling;

    /// One step of a model with hidden 2, vocab 3, one layer of 3 experts (top 2), whose
    /// device results equal the reference except where a test changes them.
    fn fixture() -> (Config, Step, RefStep) {
        let cfg = Config {
            hidden: 2,
            ffn: 2,
            layers: 1,
            experts: 3,
            active: 2,
            budget: 2,
            vocab: 3,
            tokens: 1,
            group: 32,
            sampling: Sampling::greedy(),
        };
        let step = Step {
            input: 0,
            layers: vec![LayerStep {
                router: vec![1.0, 3.0, 2.0],
                chosen: vec![1, 2],
                predicted: Vec::new(),
            }],
            output: 2,
            time: std::time::Duration::ZERO,
        };
        let r = RefStep {
            router: vec![vec![1.0, 3.0, 2.0]],
            hidden: vec![0.5, -1.0],
            logits: vec![0.0, 1.0, 4.0],
        };
        (cfg, step, r)
    }

    fn run(cfg: &Config, step: &Step, r: &RefStep) -> Result<Summary, String> {
        check(
            cfg,
            std::slice::from_ref(step),
            std::slice::from_ref(r),
            &[0.5, -1.0],
            &[0.0, 1.0, 4.0],
        )
    }

    #[test]
    fn a_faithful_run_passes() {
        let (cfg, step, r) = fixture();
        let s = run(&cfg, &step, &r).expect("passes");
        assert_eq!((s.decisions, s.near_ties), (1, 0));
    }

    #[test]
    fn a_wrong_expert_or_token_fails_and_a_near_tie_does_not() {
        let (cfg, mut step, mut r) = fixture();
        step.layers[0].chosen = vec![1, 0];
        let err = run(&cfg, &step, &r).expect_err("expert 0 is third");
        assert!(
            err.contains("step 0, layer 0") && err.contains("expert 0"),
            "{err}"
        );

        // Expert 0's reference logit within the margin of expert 2's: either may be chosen.
        r.router[0][0] = 2.0 - 1e-5;
        step.layers[0].router[0] = 2.0 - 1e-5;
        let s = run(&cfg, &step, &r).expect("a near tie");
        assert_eq!(s.near_ties, 1);

        let (cfg, mut step, r) = fixture();
        step.output = 1;
        let err = run(&cfg, &step, &r).expect_err("token 1 is not the argmax");
        assert!(err.contains("sampled token 1"), "{err}");

        let (cfg, step, mut r) = fixture();
        r.hidden[1] = -1.01;
        let err = run(&cfg, &step, &r).expect_err("hidden state differs");
        assert!(err.contains("final hidden state"), "{err}");
    }

    #[test]
    fn nth_largest_counts_from_one() {
        let v = [0.5, 3.0, -1.0, 2.0];
        assert_eq!(nth_largest(&v, 1), 3.0);
        assert_eq!(nth_largest(&v, 2), 2.0);
        assert_eq!(nth_largest(&v, 9), -1.0);
    }
}
