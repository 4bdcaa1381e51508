//! Deterministic, resumable sampling over a mixture of datasets.
//!
//! # Algorithm
//!
//! Each dataset `i` gets a probability `p_i` from the [`Mixing`] rule. An epoch has `N`
//! samples (`num_samples`, default: the total size of all datasets). For epoch `e`:
//!
//! 1. **Counts.** Dataset `i` gets `floor(N p_i)` samples plus, for the `R = N - sum floor(N p_i)`
//!    leftover samples, systematic sampling on the fractional parts with one uniform draw seeded
//!    by `(seed, e)`: dataset `i` gets one extra with probability exactly `frac(N p_i)`. The
//!    expected count is therefore exactly `N p_i`, and the realised count never differs from it
//!    by one or more. Under [`Mixing::Size`] with the default `N`, `N p_i` is exactly the size,
//!    so every record appears exactly once per epoch (shuffled concatenation).
//! 2. **Order.** The multiset of dataset labels is shuffled (Fisher-Yates, seeded by
//!    `(seed, e)`).
//! 3. **Records.** Each dataset has an endless stream of record indices: a random permutation
//!    of its records (seeded by `(seed, i, cycle)`), then another, and so on. Epoch `e` takes the
//!    next `count_i(e)` entries of that stream, starting where epoch `e-1` stopped. An
//!    up-sampled dataset thus goes through all its records before repeating one; a down-sampled
//!    one shows different records in different epochs.
//!
//! Everything is a pure function of `(seed, epoch)`: [`MixtureSampler::epoch`] rebuilds the order
//! of any epoch, and training resumes at `(epoch, index)` with [`MixtureSampler::iter_from`]. The
//! random numbers come from ChaCha8 (`rand_chacha`, whose output is stable across versions) with
//! our own seed derivation and shuffle, so orders do not change with `rand` upgrades.

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::error::DataError;

/// How the datasets of a mixture are weighted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mixing {
    /// Probability proportional to the dataset size: a shuffled concatenation.
    #[default]
    Size,
    /// Probability proportional to the given weights (`weight` of each dataset, default 1).
    Ratio,
    /// Probability proportional to the square root of the dataset size (InstructBLIP).
    Sqrt,
}

impl Mixing {
    /// The snake_case name used in configs.
    pub fn as_str(self) -> &'static str {
        match self {
            Mixing::Size => "size",
            Mixing::Ratio => "ratio",
            Mixing::Sqrt => "sqrt",
        }
    }
}

/// One sample: which dataset and which record in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SampleRef {
    /// Index of the dataset in the mixture.
    pub dataset: usize,
    /// Index of the record in that dataset.
    pub record: usize,
}

/// Where a training run is in the sample stream; save it in checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct SamplerPosition {
    /// The epoch (0-based).
    pub epoch: u64,
    /// The number of samples of that epoch already consumed.
    pub index: usize,
}

/// A deterministic sampler over several datasets. See the [module docs](self) for the algorithm.
#[derive(Debug, Clone, PartialEq)]
pub struct MixtureSampler {
    sizes: Vec<usize>,
    probabilities: Vec<f64>,
    num_samples: usize,
    seed: u64,
}

impl MixtureSampler {
    /// A sampler over datasets of `sizes`.
    ///
    /// `weights` is used only under [`Mixing::Ratio`] (one positive finite weight per dataset;
    /// `None` means equal weights); it must be `None` for the other rules. `num_samples` is the
    /// epoch length (default: the sum of the sizes).
    pub fn new(
        sizes: &[usize],
        mixing: Mixing,
        weights: Option<&[f64]>,
        num_samples: Option<usize>,
        seed: u64,
    ) -> Result<Self, DataError> {
        if sizes.is_empty() {
            return Err(DataError::Mixture("no datasets".into()));
        }
        if let Some(i) = sizes.iter().position(|&s| s == 0) {
            return Err(DataError::Mixture(format!(
                "dataset {i} is empty (no record loaded)"
            )));
        }
        let raw: Vec<f64> = match (mixing, weights) {
            (Mixing::Ratio, None) => vec![1.0; sizes.len()],
            (Mixing::Ratio, Some(w)) => {
                if w.len() != sizes.len() {
                    return Err(DataError::Mixture(format!(
                        "{} weights for {} datasets",
                        w.len(),
                        sizes.len()
                    )));
                }
                if let Some(i) = w.iter().position(|x| !(x.is_finite() && *x > 0.0)) {
                    return Err(DataError::Mixture(format!(
                        "weight of dataset {i} must be positive and finite, got {}",
                        w[i]
                    )));
                }
                w.to_vec()
            }
            (m, Some(_)) => {
                return Err(DataError::Mixture(format!(
                    "weights are only used with mixing = \"ratio\", not \"{}\"",
                    m.as_str()
                )))
            }
            (Mixing::Size, None) => sizes.iter().map(|&s| s as f64).collect(),
            (Mixing::Sqrt, None) => sizes.iter().map(|&s| (s as f64).sqrt()).collect(),
        };
        let total: f64 = raw.iter().sum();
        let probabilities = raw.iter().map(|w| w / total).collect();
        let num_samples = num_samples.unwrap_or_else(|| sizes.iter().sum());
        if num_samples == 0 {
            return Err(DataError::Mixture("num_samples must be positive".into()));
        }
        Ok(MixtureSampler {
            sizes: sizes.to_vec(),
            probabilities,
            num_samples,
            seed,
        })
    }

    /// The probability of each dataset.
    pub fn probabilities(&self) -> &[f64] {
        &self.probabilities
    }

    /// The dataset sizes.
    pub fn sizes(&self) -> &[usize] {
        &self.sizes
    }

    /// Samples per epoch.
    pub fn num_samples(&self) -> usize {
        self.num_samples
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The expected number of samples of each dataset per epoch (`N p_i`).
    pub fn expected_counts(&self) -> Vec<f64> {
        let n = self.num_samples as f64;
        self.probabilities.iter().map(|p| n * p).collect()
    }

    /// How many samples of each dataset epoch `epoch` has.
    pub fn epoch_counts(&self, epoch: u64) -> Vec<usize> {
        let expected = self.expected_counts();
        let mut counts: Vec<usize> = Vec::with_capacity(expected.len());
        let mut fracs: Vec<f64> = Vec::with_capacity(expected.len());
        for &x in &expected {
            // Guard against float noise: 299.9999999 is 300.
            let r = x.round();
            let (fl, fr) = if (x - r).abs() < 1e-9 {
                (r, 0.0)
            } else {
                (x.floor(), x - x.floor())
            };
            counts.push(fl as usize);
            fracs.push(fr);
        }
        let assigned: usize = counts.iter().sum();
        let rest = self.num_samples.saturating_sub(assigned);
        let frac_sum: f64 = fracs.iter().sum();
        if rest > 0 && frac_sum > 0.0 {
            // Systematic sampling: points u, u+1, ..., u+rest-1 on the cumulative fractional
            // parts, rescaled to sum exactly to `rest`.
            let mut rng = rng_for(self.seed, TAG_COUNTS, epoch, 0);
            let u = unit_f64(&mut rng);
            let scale = rest as f64 / frac_sum;
            let mut cum = 0.0;
            let mut k = 0usize;
            for (i, fr) in fracs.iter().enumerate() {
                cum += fr * scale;
                let upper = if i + 1 == fracs.len() {
                    f64::INFINITY
                } else {
                    cum
                };
                while k < rest && u + (k as f64) < upper {
                    counts[i] += 1;
                    k += 1;
                }
            }
        } else if rest > 0 {
            // Cannot happen with valid probabilities; keep the total exact anyway.
            counts[0] += rest;
        }
        counts
    }

    /// The full order of epoch `epoch`: `num_samples` references.
    pub fn epoch(&self, epoch: u64) -> Vec<SampleRef> {
        let counts = self.epoch_counts(epoch);
        // Stream offsets: how many entries of each dataset's stream earlier epochs consumed.
        let mut offsets = vec![0u64; self.sizes.len()];
        for e in 0..epoch {
            for (o, c) in offsets.iter_mut().zip(self.epoch_counts(e)) {
                *o += c as u64;
            }
        }
        let mut labels: Vec<usize> = Vec::with_capacity(self.num_samples);
        for (i, &c) in counts.iter().enumerate() {
            labels.extend(std::iter::repeat_n(i, c));
        }
        let mut rng = rng_for(self.seed, TAG_ORDER, epoch, 0);
        shuffle(&mut labels, &mut rng);

        let mut streams: Vec<Stream> = offsets
            .iter()
            .enumerate()
            .map(|(i, &o)| Stream::new(self.seed, i, self.sizes[i], o))
            .collect();
        labels
            .into_iter()
            .map(|d| SampleRef {
                dataset: d,
                record: streams[d].next(),
            })
            .collect()
    }

    /// The samples of epoch `position.epoch` from `position.index` on (for resuming).
    pub fn iter_from(&self, position: SamplerPosition) -> impl Iterator<Item = SampleRef> {
        self.epoch(position.epoch).into_iter().skip(position.index)
    }
}

/// Stream tags of the seed derivation (part of the pinned algorithm: do not change).
const TAG_COUNTS: u64 = 1;
const TAG_ORDER: u64 = 2;
const TAG_PERM: u64 = 3;

/// One dataset's endless stream of record indices: permutation after permutation.
struct Stream {
    seed: u64,
    dataset: usize,
    size: usize,
    cycle: u64,
    pos: usize,
    perm: Vec<usize>,
}

impl Stream {
    fn new(seed: u64, dataset: usize, size: usize, offset: u64) -> Self {
        let size64 = size as u64;
        let mut s = Stream {
            seed,
            dataset,
            size,
            cycle: offset / size64,
            pos: (offset % size64) as usize,
            perm: Vec::new(),
        };
        s.fill();
        s
    }

    fn fill(&mut self) {
        self.perm = (0..self.size).collect();
        let mut rng = rng_for(self.seed, TAG_PERM, self.dataset as u64, self.cycle);
        shuffle(&mut self.perm, &mut rng);
    }

    fn next(&mut self) -> usize {
        if self.pos == self.size {
            self.cycle += 1;
            self.pos = 0;
            self.fill();
        }
        let r = self.perm[self.pos];
        self.pos += 1;
        r
    }
}

/// SplitMix64 finaliser, used to derive independent seeds.
fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn rng_for(seed: u64, tag: u64, a: u64, b: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    let mut h = mix64(seed ^ mix64(tag));
    for (j, word) in [a, b, tag, seed].into_iter().enumerate() {
        h = mix64(h ^ word.wrapping_add(j as u64));
        key[j * 8..(j + 1) * 8].copy_from_slice(&h.to_le_bytes());
    }
    ChaCha8Rng::from_seed(key)
}

/// A uniform `f64` in `[0, 1)` from the top 53 bits.
fn unit_f64(rng: &mut ChaCha8Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// A uniform integer in `0..n` (`n > 0`), unbiased (Lemire's method with rejection).
fn below(rng: &mut ChaCha8Rng, n: u64) -> u64 {
    let threshold = n.wrapping_neg() % n;
    loop {
        let m = (rng.next_u64() as u128) * (n as u128);
        if (m as u64) >= threshold {
            return (m >> 64) as u64;
        }
    }
}

/// Fisher-Yates shuffle.
fn shuffle<T>(items: &mut [T], rng: &mut ChaCha8Rng) {
    for i in (1..items.len()).rev() {
        let j = below(rng, i as u64 + 1) as usize;
        items.swap(i, j);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts of each dataset over `epochs` epochs, and the samples drawn.
    fn observed(s: &MixtureSampler, epochs: u64) -> (Vec<usize>, usize) {
        let mut counts = vec![0usize; s.sizes().len()];
        let mut total = 0;
        for e in 0..epochs {
            for r in s.epoch(e) {
                counts[r.dataset] += 1;
                total += 1;
                assert!(r.record < s.sizes()[r.dataset]);
            }
        }
        (counts, total)
    }

    fn assert_within_3_sigma(counts: &[usize], total: usize, p: &[f64]) {
        for (i, (&c, &pi)) in counts.iter().zip(p).enumerate() {
            let n = total as f64;
            let mean = n * pi;
            let sigma = (n * pi * (1.0 - pi)).sqrt();
            assert!(
                (c as f64 - mean).abs() <= 3.0 * sigma + 1.0,
                "dataset {i}: observed {c}, expected {mean:.1} ± 3·{sigma:.1}"
            );
        }
    }

    #[test]
    fn ratio_proportions_within_tolerance() {
        let s = MixtureSampler::new(
            &[10, 1000, 57],
            Mixing::Ratio,
            Some(&[1.0, 3.0, 0.5]),
            Some(333),
            7,
        )
        .unwrap();
        let p = s.probabilities().to_vec();
        assert!((p[0] - 1.0 / 4.5).abs() < 1e-12);
        assert!((p[1] - 3.0 / 4.5).abs() < 1e-12);
        // 333 is not a multiple: the fractional parts are assigned at random per epoch.
        let (counts, total) = observed(&s, 300);
        assert_eq!(total, 333 * 300);
        assert_within_3_sigma(&counts, total, &p);
        // Each epoch is within one of the expectation.
        for e in 0..20 {
            let c = s.epoch_counts(e);
            assert_eq!(c.iter().sum::<usize>(), 333);
            for (ci, xi) in c.iter().zip(s.expected_counts()) {
                assert!((*ci as f64 - xi).abs() < 1.0, "{c:?}");
            }
        }
    }

    #[test]
    fn leftover_assignment_is_unbiased() {
        // Three equal weights and 10 samples: 3.33 each; the extra sample must go to each
        // dataset a third of the time.
        let s = MixtureSampler::new(&[5, 5, 5], Mixing::Ratio, None, Some(10), 1).unwrap();
        let mut extra = [0usize; 3];
        let epochs = 3000;
        for e in 0..epochs {
            for (i, c) in s.epoch_counts(e).iter().enumerate() {
                if *c == 4 {
                    extra[i] += 1;
                }
            }
        }
        assert_within_3_sigma(&extra, epochs as usize, &[1.0 / 3.0; 3]);
    }

    #[test]
    fn sqrt_weights() {
        let s = MixtureSampler::new(&[100, 400, 900], Mixing::Sqrt, None, None, 0).unwrap();
        let p = s.probabilities();
        // sqrt: 10, 20, 30 → 1/6, 2/6, 3/6
        assert!((p[0] - 1.0 / 6.0).abs() < 1e-12);
        assert!((p[1] - 2.0 / 6.0).abs() < 1e-12);
        assert!((p[2] - 3.0 / 6.0).abs() < 1e-12);
        assert_eq!(s.num_samples(), 1400);
        let (counts, total) = observed(&s, 5);
        assert_within_3_sigma(&counts, total, p);
    }

    #[test]
    fn size_mixing_is_a_shuffled_concatenation() {
        let s = MixtureSampler::new(&[3, 7, 11], Mixing::Size, None, None, 99).unwrap();
        for e in 0..4 {
            let mut seen: Vec<SampleRef> = s.epoch(e);
            assert_eq!(seen.len(), 21);
            seen.sort_by_key(|r| (r.dataset, r.record));
            seen.dedup();
            assert_eq!(seen.len(), 21, "every record exactly once in epoch {e}");
        }
    }

    #[test]
    fn upsampled_dataset_cycles_through_all_records_before_repeating() {
        let s = MixtureSampler::new(&[4, 100], Mixing::Ratio, None, Some(40), 3).unwrap();
        // Dataset 0 gets 20 samples per epoch = 5 full passes over its 4 records.
        let order: Vec<usize> = s
            .epoch(0)
            .into_iter()
            .filter(|r| r.dataset == 0)
            .map(|r| r.record)
            .collect();
        assert_eq!(order.len(), 20);
        for pass in order.chunks(4) {
            let mut p = pass.to_vec();
            p.sort();
            assert_eq!(p, vec![0, 1, 2, 3]);
        }
        // Dataset 1 (20 per epoch out of 100): five epochs see every record once.
        let mut all: Vec<usize> = (0..5)
            .flat_map(|e| s.epoch(e))
            .filter(|r| r.dataset == 1)
            .map(|r| r.record)
            .collect();
        all.sort();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn deterministic_and_resumable() {
        let a = MixtureSampler::new(&[50, 20], Mixing::Sqrt, None, Some(64), 1234).unwrap();
        let b = MixtureSampler::new(&[50, 20], Mixing::Sqrt, None, Some(64), 1234).unwrap();
        assert_eq!(a.epoch(0), b.epoch(0));
        assert_eq!(a.epoch(3), b.epoch(3));
        assert_ne!(a.epoch(0), a.epoch(1), "different epochs, different orders");
        let c = MixtureSampler::new(&[50, 20], Mixing::Sqrt, None, Some(64), 1235).unwrap();
        assert_ne!(a.epoch(0), c.epoch(0), "different seeds, different orders");
        let full = a.epoch(2);
        let resumed: Vec<SampleRef> = a
            .iter_from(SamplerPosition {
                epoch: 2,
                index: 17,
            })
            .collect();
        assert_eq!(resumed, full[17..]);
    }

    #[test]
    fn pinned_order() {
        // Guards against accidental changes of the algorithm (which would break resuming runs
        // started with an older build).
        let s = MixtureSampler::new(&[4, 3], Mixing::Ratio, None, Some(9), 42).unwrap();
        let got: Vec<(usize, usize)> = (0..2)
            .flat_map(|e| s.epoch(e))
            .map(|r| (r.dataset, r.record))
            .collect();
        assert_eq!(got, PINNED.to_vec(), "order changed: {got:?}");
    }

    const PINNED: [(usize, usize); 18] = [
        (1, 2),
        (0, 1),
        (1, 1),
        (0, 0),
        (1, 0),
        (1, 2),
        (0, 3),
        (1, 1),
        (0, 2),
        (0, 0),
        (1, 0),
        (1, 1),
        (1, 2),
        (0, 3),
        (0, 1),
        (0, 2),
        (1, 0),
        (1, 2),
    ];

    #[test]
    fn invalid_mixtures() {
        assert!(MixtureSampler::new(&[], Mixing::Size, None, None, 0).is_err());
        let e = MixtureSampler::new(&[3, 0], Mixing::Size, None, None, 0).unwrap_err();
        assert!(e.to_string().contains("dataset 1 is empty"));
        let e =
            MixtureSampler::new(&[3, 4], Mixing::Ratio, Some(&[1.0, -1.0]), None, 0).unwrap_err();
        assert!(e.to_string().contains("weight of dataset 1"));
        let e = MixtureSampler::new(&[3, 4], Mixing::Sqrt, Some(&[1.0, 1.0]), None, 0).unwrap_err();
        assert!(e.to_string().contains("only used with mixing = \"ratio\""));
        assert!(MixtureSampler::new(&[3, 4], Mixing::Ratio, Some(&[1.0]), None, 0).is_err());
        assert!(MixtureSampler::new(&[3], Mixing::Size, None, Some(0), 0).is_err());
    }
}
