//! The model's dimensions, taken from the flags and checked: every refusal names the flag.

use super::Args;
use crate::Failure;
use unibuf::ops::{Sampling, Q4_GROUPS, SAMPLE_MAX_K};

/// The dimensions of the MoE decoder and of the run, in host units.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Config {
    /// Width of the residual stream.
    pub hidden: usize,
    /// Inner width of each expert's SwiGLU MLP.
    pub ffn: usize,
    pub layers: usize,
    /// Experts per layer.
    pub experts: usize,
    /// Experts each token runs per layer (the router's top-k).
    pub active: usize,
    /// Experts per layer the cache keeps on the device.
    pub budget: usize,
    pub vocab: usize,
    pub tokens: usize,
    /// Columns per q4 scale: the largest of 128, 64, 32 that divides both `hidden` and `ffn`.
    pub group: usize,
    pub sampling: Sampling,
}

/// The product of `factors`, saturating: with every flag at its maximum some sizes exceed
/// even u128, and a saturated size is refused all the same.
fn mul(factors: &[u128]) -> u128 {
    factors.iter().fold(1, |p, &f| p.saturating_mul(f))
}

/// The sum of `terms`, saturating.
fn add(terms: &[u128]) -> u128 {
    terms.iter().fold(0, |s, &t| s.saturating_add(t))
}

/// Bytes of `rows x cols` q4 weights in `group`s: the codes plus the f16 scales.
pub fn q4_bytes(rows: u128, cols: u128, group: u128) -> u128 {
    add(&[mul(&[rows, cols / 2]), mul(&[2, rows, cols / group])])
}

impl Config {
    pub fn new(args: &Args) -> Result<Config, Failure> {
        let hidden = args.hidden as usize;
        let ffn = args.ffn as usize;
        let Some(group) = Q4_GROUPS
            .iter()
            .rev()
            .copied()
            .find(|g| hidden.is_multiple_of(*g) && ffn.is_multiple_of(*g))
        else {
            let flag = if !hidden.is_multiple_of(Q4_GROUPS[0]) {
                format!("--hidden {hidden}")
            } else {
                format!("--ffn {ffn}")
            };
            return Err(Failure::new(format!(
                "{flag} is not a multiple of {}: the weights are 4-bit quantised in groups of 32, 64 or 128 columns",
                Q4_GROUPS[0]
            )));
        };
        let experts = args.experts as usize;
        let active = args.experts_per_token as usize;
        if active > experts {
            return Err(Failure::new(format!(
                "--experts-per-token {active} is more than --experts {experts}"
            )));
        }
        let budget = args.budget as usize;
        if budget > experts {
            return Err(Failure::new(format!(
                "--budget {budget} is more than --experts {experts}: the cache keeps at most every expert of a layer"
            )));
        }
        if !args.temperature.is_finite() || args.temperature < 0.0 {
            return Err(Failure::new(format!(
                "--temperature {} must be finite and not negative (0 picks the most likely token)",
                args.temperature
            )));
        }
        if !(args.top_p > 0.0 && args.top_p <= 1.0) {
            return Err(Failure::new(format!(
                "--top-p {} is outside (0, 1]",
                args.top_p
            )));
        }
        if args.top_k > SAMPLE_MAX_K {
            return Err(Failure::new(format!(
                "--top-k {} is more than the sampler's {SAMPLE_MAX_K} candidates (0 means {SAMPLE_MAX_K})",
                args.top_k
            )));
        }
        Ok(Config {
            hidden,
            ffn,
            layers: args.layers as usize,
            experts,
            active,
            budget,
            vocab: args.vocab as usize,
            tokens: args.tokens as usize,
            group,
            sampling: Sampling {
                temperature: args.temperature,
                top_k: args.top_k,
                top_p: args.top_p,
                seed: args.seed,
            },
        })
    }

    /// Whether sampling always takes the most likely token.
    pub fn greedy(&self) -> bool {
        self.sampling.temperature == 0.0 || self.sampling.top_k == 1
    }

    /// The flags that set the sizes, for messages.
    pub fn flags(&self) -> String {
        format!(
            "--hidden {} --ffn {} --layers {} --experts {} --budget {} --vocab {} --tokens {}",
            self.hidden, self.ffn, self.layers, self.experts, self.budget, self.vocab, self.tokens
        )
    }

    /// Bytes of one expert in the file: w1 and w3 (`[ffn, hidden]`) and w2 (`[hidden, ffn]`).
    pub fn expert_bytes(&self) -> u128 {
        let (h, f, g) = (self.hidden as u128, self.ffn as u128, self.group as u128);
        add(&[mul(&[2, q4_bytes(f, h, g)]), q4_bytes(h, f, g)])
    }

    /// Bytes of the dense tensors (everything but the experts): embedding and norms (f32),
    /// routers and the LM head (q4).
    pub fn dense_bytes(&self) -> u128 {
        let (h, l, e, v, g) = (
            self.hidden as u128,
            self.layers as u128,
            self.experts as u128,
            self.vocab as u128,
            self.group as u128,
        );
        add(&[
            mul(&[4, v, h]),
            mul(&[4, l + 1, h]),
            mul(&[l, q4_bytes(e, h, g)]),
            q4_bytes(v, h, g),
        ])
    }

    /// Bytes of tensor data in the generated file.
    pub fn file_bytes(&self) -> u128 {
        let experts = mul(&[
            self.layers as u128,
            self.experts as u128,
            self.expert_bytes(),
        ]);
        add(&[self.dense_bytes(), experts])
    }

    /// Bytes on the device and on the host (saturating, so that no flag values can overflow).
    pub fn footprint(&self) -> (u128, u128) {
        let (h, f, e, v, t) = (
            self.hidden as u128,
            self.ffn as u128,
            self.experts as u128,
            self.vocab as u128,
            self.tokens as u128,
        );
        let cached = mul(&[
            self.layers as u128,
            self.budget as u128,
            self.expert_bytes(),
        ]);
        // Two residual buffers, the normed input, the expert's gate, up, activation and
        // output, two router outputs, and each token's final hidden state and logits.
        let activations = mul(&[4, add(&[4 * h, 3 * f, 2 * e, mul(&[t, h + v])])]);
        // The cache's three read buffers of 2 MiB granules, about one expert each.
        let reads = mul(&[3, add(&[self.expert_bytes(), 2 << 20])]);
        let device = add(&[self.dense_bytes(), cached, activations, reads]);
        // The reference holds the whole file, its f64 results and the downloaded ones.
        let host = add(&[self.file_bytes(), mul(&[12, t, h + v])]);
        (device, host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn config(flags: &[&str]) -> Result<Config, Failure> {
        let cli = Cli::try_parse_from(std::iter::once("demo").chain(flags.iter().copied()))
            .expect("valid flags");
        Config::new(&cli.args)
    }

    #[test]
    fn group_is_the_largest_that_divides_both_widths() {
        assert_eq!(config(&[]).expect("defaults").group, 128);
        let c = config(&["--hidden", "96", "--ffn", "256"]).expect("valid");
        assert_eq!(c.group, 32);
        let c = config(&["--hidden", "192", "--ffn", "320"]).expect("valid");
        assert_eq!(c.group, 64);
    }

    #[test]
    fn refusals_name_the_flag() {
        for (flags, needle) in [
            (&["--hidden", "100"][..], "--hidden 100"),
            (&["--ffn", "1000"][..], "--ffn 1000"),
            (
                &["--experts", "4", "--experts-per-token", "5"][..],
                "--experts-per-token 5",
            ),
            (&["--experts", "4", "--budget", "5"][..], "--budget 5"),
            (&["--temperature", "-1"][..], "--temperature -1"),
            (&["--top-p", "0"][..], "--top-p"),
            (&["--top-k", "5000"][..], "--top-k"),
        ] {
            let err = config(flags).expect_err("refused").to_string();
            assert!(err.contains(needle), "{flags:?}: {err}");
        }
    }

    #[test]
    fn sizes_add_up_and_cannot_overflow() {
        let c = config(&["--hidden", "512", "--ffn", "1408"]).expect("valid");
        // w1, w3: 1408 x 512, w2: 512 x 1408, groups of 128.
        let one = 1408 * 512 / 2 + 2 * 1408 * 4;
        let two = 512 * 1408 / 2 + 2 * 512 * 11;
        assert_eq!(c.expert_bytes(), 2 * one + two);
        assert!(c.file_bytes() > 4 * 8 * c.expert_bytes());
        let max = u32::MAX as usize;
        let huge = Config {
            hidden: max,
            ffn: max,
            layers: max,
            experts: max,
            budget: max,
            vocab: max,
            tokens: max,
            ..c
        };
        assert!(huge.footprint().0 > u64::MAX as u128);
        assert_eq!(huge.file_bytes(), u128::MAX);
    }
}
