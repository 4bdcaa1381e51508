//! Preference losses as pure functions on per-sequence log-probabilities.
//!
//! Every function takes `Tensor<1>` values with the batch as the only dimension and returns
//! per-example losses (reduce with `.mean()`), so they are differentiable when the inputs live on
//! an autodiff device. Rewards are always detached, as TRL logs them. The formulas follow TRL
//! 1.16.0 and are checked against TRL's own code by `fixtures/losses/generate.py` and
//! `tests/losses.rs`; see `docs/ADDING_A_LOSS.md`.
//!
//! Notation: `lc = log π(y_c|x) − log π_ref(y_c|x)`, `lr` likewise for the rejected answer,
//! `Δ = lc − lr`, `β` = `beta`, `ε` = `label_smoothing`, `σ` the sigmoid, `logσ` its log.

use burn::tensor::activation::{log_sigmoid, relu, sigmoid};
use burn::tensor::{Tensor, TensorData};
use resonance_core::config::RankingLoss;
use serde::{Deserialize, Serialize};

/// A loss configuration that TRL would reject, or an input that the loss type needs but was missing.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LossConfigError {
    /// `beta` must be finite and > 0 (several losses divide by it).
    #[error("beta must be finite and > 0, got {0}")]
    Beta(f64),
    /// `label_smoothing` outside the range that the loss type accepts.
    #[error("label_smoothing {value} out of range for loss type `{loss_type}`: {expected}")]
    LabelSmoothing {
        loss_type: &'static str,
        value: f64,
        expected: &'static str,
    },
    /// The loss type normalises by completion length but no lengths were passed.
    #[error("loss type `{0}` needs the completion lengths of chosen and rejected")]
    LengthsRequired(&'static str),
    /// A non-finite or non-positive parameter other than beta.
    #[error("{name} must be finite and > 0, got {value}")]
    Parameter { name: &'static str, value: f64 },
}

pub use resonance_core::config::DpoLossType;

/// Parameters of [`dpo_loss`]. Defaults are TRL's `DPOConfig` defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DpoLossConfig {
    /// Which DPO variant.
    pub loss_type: DpoLossType,
    /// Inverse temperature β (τ for IPO). Default 0.1.
    pub beta: f64,
    /// ε: cDPO smoothing for `sigmoid`, flip probability for `robust` (in [0, 0.5)), EXO's ε (in (0, 1)).
    /// Ignored by the other types. Default 0.
    pub label_smoothing: f64,
    /// Ignore the reference: its log-probs are taken as 0 (so `lc = log π(y_c|x)`).
    pub reference_free: bool,
    /// τ of DiscoPOP. Default 0.05.
    pub discopop_tau: f64,
}

impl Default for DpoLossConfig {
    fn default() -> Self {
        Self {
            loss_type: DpoLossType::Sigmoid,
            beta: 0.1,
            label_smoothing: 0.0,
            reference_free: false,
            discopop_tau: 0.05,
        }
    }
}

impl DpoLossConfig {
    /// Checks the ranges that TRL enforces (and β > 0, which TRL does not check).
    pub fn validate(&self) -> Result<(), LossConfigError> {
        check_beta(self.beta)?;
        let eps = self.label_smoothing;
        let name = self.loss_type.as_str();
        let bad = |expected| LossConfigError::LabelSmoothing {
            loss_type: name,
            value: eps,
            expected,
        };
        match self.loss_type {
            DpoLossType::Robust if !(0.0..0.5).contains(&eps) => Err(bad("[0, 0.5)")),
            DpoLossType::ExoPair if !(eps > 0.0 && eps < 1.0) => Err(bad("(0, 1)")),
            DpoLossType::Sigmoid | DpoLossType::Ddpo if !(0.0..=0.5).contains(&eps) => {
                Err(bad("[0, 0.5]"))
            }
            DpoLossType::Discopop
                if !(self.discopop_tau.is_finite() && self.discopop_tau > 0.0) =>
            {
                Err(LossConfigError::Parameter {
                    name: "discopop_tau",
                    value: self.discopop_tau,
                })
            }
            _ => Ok(()),
        }
    }
}

fn check_beta(beta: f64) -> Result<(), LossConfigError> {
    if beta.is_finite() && beta > 0.0 {
        Ok(())
    } else {
        Err(LossConfigError::Beta(beta))
    }
}

/// Per-example losses and the detached rewards of a paired preference loss.
#[derive(Debug, Clone)]
pub struct DpoLossOutput {
    /// Per-example loss `[batch]`; the training loss is its mean.
    pub losses: Tensor<1>,
    /// `β·lc`, detached (TRL's `rewards/chosen` before averaging).
    pub chosen_rewards: Tensor<1>,
    /// `β·lr`, detached (TRL's `rewards/rejected` before averaging).
    pub rejected_rewards: Tensor<1>,
}

/// `−(1−ε)·logσ(x) − ε·logσ(−x)`; plain `−logσ(x)` when ε = 0.
fn smoothed_neg_log_sigmoid(x: Tensor<1>, eps: f64) -> Tensor<1> {
    if eps == 0.0 {
        return log_sigmoid(x).neg();
    }
    log_sigmoid(x.clone())
        .mul_scalar(-(1.0 - eps))
        .sub(log_sigmoid(x.neg()).mul_scalar(eps))
}

/// DPO and its variants on summed per-sequence log-probs, as TRL 1.16's `DPOTrainer._compute_loss`.
///
/// With `lc = πc − refc`, `lr = πr − refr` (refs = 0 when `reference_free`), `Δ = lc − lr`:
///
/// | `loss_type` | per-example loss |
/// |---|---|
/// | `sigmoid` | `−logσ(βΔ)`; cDPO when ε > 0: `−(1−ε)logσ(βΔ) − ε·logσ(−βΔ)` |
/// | `robust` | `(−(1−ε)logσ(βΔ) + ε·logσ(−βΔ)) / (1−2ε)` |
/// | `hinge` | `relu(1 − βΔ)` |
/// | `ipo` | `(lc/Lc − lr/Lr − 1/(2β))²`, `L = max(length, 1)` |
/// | `exo_pair` | `σ(βΔ)(logσ(βΔ) − log(1−ε)) + σ(−βΔ)(logσ(−βΔ) − log ε)` |
/// | `nca_pair` | `−logσ(βlc) − ½logσ(−βlc) − ½logσ(−βlr)` |
/// | `bco_pair` | `−logσ(βlc) − logσ(−βlr)` |
/// | `sppo_hard` | `(lc − 1/(2β))² + (lr + 1/(2β))²` |
/// | `apo_zero` | `1 − σ(βlc) + σ(βlr)` |
/// | `apo_down` | `σ(βlc) + 1 − σ(β(lc − lr))` |
/// | `discopop` | `(1−m)(−logσ(βΔ)) + m·exp(−βΔ)`, `m = σ(βΔ/τ)` |
/// | `sigmoid_norm` | `−logσ(β(lc/Lc − lr/Lr))` |
/// | `ddpo` | as `sigmoid` (cDPO with ε), on DDPO-weighted log-probs (see below) |
///
/// Rewards are `β·lc` and `β·lr` (detached) for every type, as TRL logs them.
///
/// `lengths` = (chosen, rejected) completion token counts, needed by `ipo` and `sigmoid_norm`.
/// `ddpo` is VL-RLHF's dense DPO (`src/vlrlhf/base/trainer.py` `VLDPOTrainer.dpo_loss` l.261-265:
/// the sigmoid branch with cDPO smoothing; rewards l.288-299): the formula is `sigmoid`'s, the
/// difference lies in the inputs, which the caller must compute with `dpo::ddpo_token_weights`
/// and [`weighted_token_sum`] (only the tokens of the modified spans count) for policy and
/// reference alike. Its rewards are then `β·lc`, `β·lr` of those weighted log-probs, as VL-RLHF's.
///
/// Note: TRL 1.16 ignores `label_smoothing` for `sigmoid`; here ε > 0 gives cDPO (the formula of
/// TRL's `CPOTrainer.cpo_loss` and of older DPO trainers). With ε = 0 the two agree.
pub fn dpo_loss(
    policy_chosen: Tensor<1>,
    policy_rejected: Tensor<1>,
    ref_chosen: Tensor<1>,
    ref_rejected: Tensor<1>,
    lengths: Option<(Tensor<1>, Tensor<1>)>,
    config: &DpoLossConfig,
) -> Result<DpoLossOutput, LossConfigError> {
    config.validate()?;
    let kind = config.loss_type;
    if kind.needs_lengths() && lengths.is_none() {
        return Err(LossConfigError::LengthsRequired(kind.as_str()));
    }
    let beta = config.beta;
    let eps = config.label_smoothing;
    let (lc, lr) = if config.reference_free {
        (policy_chosen, policy_rejected)
    } else {
        (
            policy_chosen.sub(ref_chosen),
            policy_rejected.sub(ref_rejected),
        )
    };
    let delta = lc.clone().sub(lr.clone());
    let length_averaged_delta = || {
        let (len_c, len_r) = lengths.clone().expect("checked above");
        lc.clone()
            .div(len_c.clamp_min(1.0))
            .sub(lr.clone().div(len_r.clamp_min(1.0)))
    };
    let losses = match kind {
        DpoLossType::Sigmoid | DpoLossType::Ddpo => {
            smoothed_neg_log_sigmoid(delta.mul_scalar(beta), eps)
        }
        DpoLossType::Robust => {
            let x = delta.mul_scalar(beta);
            log_sigmoid(x.clone())
                .mul_scalar(-(1.0 - eps))
                .add(log_sigmoid(x.neg()).mul_scalar(eps))
                .div_scalar(1.0 - 2.0 * eps)
        }
        DpoLossType::Hinge => relu(delta.mul_scalar(-beta).add_scalar(1.0)),
        DpoLossType::Ipo => length_averaged_delta()
            .sub_scalar(1.0 / (2.0 * beta))
            .square(),
        DpoLossType::ExoPair => {
            let x = delta.mul_scalar(beta);
            let qw = sigmoid(x.clone());
            let ql = sigmoid(x.clone().neg());
            let log_qw = log_sigmoid(x.clone());
            let log_ql = log_sigmoid(x.neg());
            qw.mul(log_qw.sub_scalar((-eps).ln_1p()))
                .add(ql.mul(log_ql.sub_scalar(eps.ln())))
        }
        DpoLossType::NcaPair => {
            let c = lc.clone().mul_scalar(beta);
            let r = lr.clone().mul_scalar(beta);
            log_sigmoid(c.clone())
                .neg()
                .sub(log_sigmoid(c.neg()).mul_scalar(0.5))
                .sub(log_sigmoid(r.neg()).mul_scalar(0.5))
        }
        DpoLossType::BcoPair => {
            let c = lc.clone().mul_scalar(beta);
            let r = lr.clone().mul_scalar(beta);
            log_sigmoid(c).neg().sub(log_sigmoid(r.neg()))
        }
        DpoLossType::SppoHard => {
            let m = 0.5 / beta;
            lc.clone()
                .sub_scalar(m)
                .square()
                .add(lr.clone().add_scalar(m).square())
        }
        DpoLossType::ApoZero => sigmoid(lc.clone().mul_scalar(beta))
            .neg()
            .add_scalar(1.0)
            .add(sigmoid(lr.clone().mul_scalar(beta))),
        DpoLossType::ApoDown => sigmoid(lc.clone().mul_scalar(beta))
            .add_scalar(1.0)
            .sub(sigmoid(delta.mul_scalar(beta))),
        DpoLossType::Discopop => {
            let x = delta.mul_scalar(beta);
            let m = sigmoid(x.clone().div_scalar(config.discopop_tau));
            let logistic = log_sigmoid(x.clone()).neg();
            let exponential = x.neg().exp();
            logistic
                .mul(m.clone().neg().add_scalar(1.0))
                .add(exponential.mul(m))
        }
        DpoLossType::SigmoidNorm => log_sigmoid(length_averaged_delta().mul_scalar(beta)).neg(),
    };
    Ok(DpoLossOutput {
        losses,
        chosen_rewards: lc.detach().mul_scalar(beta),
        rejected_rewards: lr.detach().mul_scalar(beta),
    })
}

/// `Σ_k w[r][k]·logp[r][k]` per row: the sequence log-prob of DDPO (and, with weights 1 on the
/// answer tokens, the plain one). `per_token_logps` and `weights` are `[rows, tokens]`.
///
/// VL-RLHF's `get_batch_logps` (`src/vlrlhf/base/trainer.py` l.185-188) sums the per-token
/// log-probs under its 0/1 DDPO mask without averaging; the weights come from
/// `dpo::ddpo_token_weights`.
pub fn weighted_token_sum(per_token_logps: Tensor<2>, weights: Tensor<2>) -> Tensor<1> {
    let [rows, _] = per_token_logps.dims();
    (per_token_logps * weights).sum_dim(1).reshape([rows])
}

/// Length-averaged log-probs: `sum / max(length, 1)` (TRL's `average_log_prob=True`).
pub fn length_average(summed_logps: Tensor<1>, lengths: Tensor<1>) -> Tensor<1> {
    summed_logps.div(lengths.clamp_min(1.0))
}

/// Parameters of [`simpo_loss`]. Defaults are TRL's `CPOConfig` with `loss_type="simpo"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimpoConfig {
    /// β. Default 0.1 (TRL's CPO default; the SimPO paper uses 2–2.5).
    pub beta: f64,
    /// Target reward margin γ (TRL's `simpo_gamma`). Default 0.5.
    pub gamma: f64,
    /// ε, conservative smoothing as in cDPO. Default 0.
    pub label_smoothing: f64,
}

impl Default for SimpoConfig {
    fn default() -> Self {
        Self {
            beta: 0.1,
            gamma: 0.5,
            label_smoothing: 0.0,
        }
    }
}

/// SimPO, as TRL's `CPOTrainer.cpo_loss` with `loss_type="simpo"` (reference-free).
///
/// Inputs are **length-averaged** policy log-probs `ac`, `ar` (see [`length_average`]).
/// `x = ac − ar − γ/β`; loss `= −(1−ε)logσ(βx) − ε·logσ(−βx)`; rewards `β·ac`, `β·ar` (detached).
pub fn simpo_loss(
    policy_chosen_avg: Tensor<1>,
    policy_rejected_avg: Tensor<1>,
    config: &SimpoConfig,
) -> Result<DpoLossOutput, LossConfigError> {
    check_beta(config.beta)?;
    if !(0.0..=0.5).contains(&config.label_smoothing) {
        return Err(LossConfigError::LabelSmoothing {
            loss_type: "simpo",
            value: config.label_smoothing,
            expected: "[0, 0.5]",
        });
    }
    let beta = config.beta;
    let logits = policy_chosen_avg
        .clone()
        .sub(policy_rejected_avg.clone())
        .sub_scalar(config.gamma / beta);
    Ok(DpoLossOutput {
        losses: smoothed_neg_log_sigmoid(logits.mul_scalar(beta), config.label_smoothing),
        chosen_rewards: policy_chosen_avg.detach().mul_scalar(beta),
        rejected_rewards: policy_rejected_avg.detach().mul_scalar(beta),
    })
}

/// Output of [`orpo_odds_ratio_loss`].
#[derive(Debug, Clone)]
pub struct OrpoOutput {
    /// TRL's `losses`: `β·logσ(log_odds)` per example. **Sign as in TRL**: this is a log-likelihood
    /// to maximise; the ORPO training loss is `nll_chosen − losses.mean()`.
    pub losses: Tensor<1>,
    /// `β·ac`, detached.
    pub chosen_rewards: Tensor<1>,
    /// `β·ar`, detached.
    pub rejected_rewards: Tensor<1>,
    /// `log_odds` per example (TRL logs its mean as `log_odds_chosen`).
    pub log_odds: Tensor<1>,
}

/// `log(1 − exp(x))` for `x < 0`, stable on both sides of `−ln 2` as TRL's `log1mexp`.
///
/// Below `−ln 2`: `log1p(−exp(x))`. Above: `log(−expm1(x))`, with `−expm1(x)` evaluated as
/// `−x·(1 + x/2! + x²/3! + … + x⁸/9!)` (Burn has no `expm1`; the series is exact to f32 on
/// `[−ln 2, 0)`). Each branch sees its input clamped to its own side so that the unused branch
/// contributes neither NaN nor infinite gradients.
pub fn log1mexp(x: Tensor<1>) -> Tensor<1> {
    const T: f64 = -std::f64::consts::LN_2;
    let below = x.clone().lower_elem(T);
    let xa = x.clone().clamp_max(T);
    let branch_a = xa.exp().neg().log1p();
    let xb = x.clamp(T, -1e-30);
    // Horner: 1 + x/2 (1 + x/3 (1 + x/4 (... (1 + x/9))))
    let mut poly = xb.clone().div_scalar(9.0).add_scalar(1.0);
    for k in (2..=8).rev() {
        poly = poly.mul(xb.clone()).div_scalar(k as f64).add_scalar(1.0);
    }
    let branch_b = xb.neg().log().add(poly.log());
    branch_b.mask_where(below, branch_a)
}

/// ORPO's odds-ratio term, as TRL's `ORPOTrainer.odds_ratio_loss`.
///
/// Inputs are **length-averaged** policy log-probs `ac`, `ar`.
/// `log_odds = (ac − ar) − (log(1−e^{ac}) − log(1−e^{ar}))`; `losses = β·logσ(log_odds)`;
/// rewards `β·ac`, `β·ar`. TRL's training loss is `nll − losses.mean()` (note the sign).
pub fn orpo_odds_ratio_loss(
    policy_chosen_avg: Tensor<1>,
    policy_rejected_avg: Tensor<1>,
    beta: f64,
) -> Result<OrpoOutput, LossConfigError> {
    check_beta(beta)?;
    let log_odds = policy_chosen_avg
        .clone()
        .sub(policy_rejected_avg.clone())
        .sub(log1mexp(policy_chosen_avg.clone()).sub(log1mexp(policy_rejected_avg.clone())));
    Ok(OrpoOutput {
        losses: log_sigmoid(log_odds.clone()).mul_scalar(beta),
        chosen_rewards: policy_chosen_avg.detach().mul_scalar(beta),
        rejected_rewards: policy_rejected_avg.detach().mul_scalar(beta),
        log_odds,
    })
}

/// KTO variants; serde names are TRL's `KTOConfig.loss_type` strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum KtoLossType {
    /// KTO (Eq. 7 of the paper) with the batch KL estimate as reference point.
    #[default]
    Kto,
    /// Unpaired APO-zero: no KL term.
    ApoZeroUnpaired,
}

/// Parameters of [`kto_loss`]. Defaults are TRL's `KTOConfig` defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KtoConfig {
    /// Which variant.
    pub loss_type: KtoLossType,
    /// β. Default 0.1.
    pub beta: f64,
    /// λ_D, weight of desirable examples. Default 1.
    pub desirable_weight: f64,
    /// λ_U, weight of undesirable examples. Default 1.
    pub undesirable_weight: f64,
}

impl Default for KtoConfig {
    fn default() -> Self {
        Self {
            loss_type: KtoLossType::Kto,
            beta: 0.1,
            desirable_weight: 1.0,
            undesirable_weight: 1.0,
        }
    }
}

/// Output of [`kto_loss`].
#[derive(Debug, Clone)]
pub struct KtoLossOutput {
    /// Per-example weighted loss `[batch]`, **in input order** (TRL concatenates desirable then
    /// undesirable; the mean, TRL's loss, is the same).
    pub losses: Tensor<1>,
    /// `β·(π − ref)` per example, detached.
    pub rewards: Tensor<1>,
}

/// KTO's reference point: `max(0, mean(π_KL − ref_KL))` over the mismatched (prompt, completion)
/// pairs of the batch, as a detached number (TRL detaches it too).
pub fn kto_kl_estimate(policy_kl_logps: Tensor<1>, ref_kl_logps: Tensor<1>) -> f64 {
    let mean: f64 = policy_kl_logps
        .sub(ref_kl_logps)
        .mean()
        .detach()
        .try_into_vec_as::<f64>()
        .map(|v| v[0])
        .unwrap_or(f64::NAN);
    mean.max(0.0)
}

/// KTO on summed per-sequence log-probs, as TRL 1.16's `KTOTrainer._compute_loss`.
///
/// With `l = π − ref` and `z = kl` (see [`kto_kl_estimate`]):
/// - `kto`: desirable `λ_D·(1 − σ(β(l − z)))`, undesirable `λ_U·(1 − σ(β(z − l)))`;
/// - `apo_zero_unpaired`: desirable `λ_D·(1 − σ(βl))`, undesirable `λ_U·σ(βl)` (`kl` unused).
///
/// Rewards `β·l`, detached.
pub fn kto_loss(
    policy: Tensor<1>,
    reference: Tensor<1>,
    desirable: &[bool],
    kl: f64,
    config: &KtoConfig,
) -> Result<KtoLossOutput, LossConfigError> {
    check_beta(config.beta)?;
    for (name, value) in [
        ("desirable_weight", config.desirable_weight),
        ("undesirable_weight", config.undesirable_weight),
    ] {
        if !(value.is_finite() && value >= 0.0) {
            return Err(LossConfigError::Parameter { name, value });
        }
    }
    let device = policy.device();
    let n = desirable.len();
    let d: Vec<f32> = desirable.iter().map(|&b| f32::from(u8::from(b))).collect();
    let d = Tensor::<1>::from_data(TensorData::new(d, [n]), &device);
    let u = d.clone().neg().add_scalar(1.0);
    let beta = config.beta;
    let l = policy.sub(reference);
    let (chosen, rejected) = match config.loss_type {
        KtoLossType::Kto => (
            sigmoid(l.clone().sub_scalar(kl).mul_scalar(beta))
                .neg()
                .add_scalar(1.0),
            sigmoid(l.clone().neg().add_scalar(kl).mul_scalar(beta))
                .neg()
                .add_scalar(1.0),
        ),
        KtoLossType::ApoZeroUnpaired => {
            let s = sigmoid(l.clone().mul_scalar(beta));
            (s.clone().neg().add_scalar(1.0), s)
        }
    };
    let losses = chosen
        .mul(d.mul_scalar(config.desirable_weight))
        .add(rejected.mul(u.mul_scalar(config.undesirable_weight)));
    Ok(KtoLossOutput {
        losses,
        rewards: l.detach().mul_scalar(beta),
    })
}

/// Output of [`bradley_terry_loss`].
#[derive(Debug, Clone)]
pub struct BradleyTerryOutput {
    /// `−logσ(r_c − r_r − m)` per pair.
    pub losses: Tensor<1>,
    /// The training loss `[1]`: `mean(losses) + c·mean((r_c + r_r)²)`.
    pub loss: Tensor<1>,
}

/// Bradley–Terry reward-model loss, as TRL's `RewardTrainer.compute_loss`.
///
/// `losses = −logσ(r_c − r_r − m)` (`m` = optional per-pair margin);
/// `loss = mean(losses) + c·mean((r_c + r_r)²)` where `c` = `center_rewards_coefficient` if set.
pub fn bradley_terry_loss(
    rewards_chosen: Tensor<1>,
    rewards_rejected: Tensor<1>,
    margin: Option<Tensor<1>>,
    center_rewards_coefficient: Option<f64>,
) -> BradleyTerryOutput {
    let mut diff = rewards_chosen.clone().sub(rewards_rejected.clone());
    if let Some(m) = margin {
        diff = diff.sub(m);
    }
    let losses = log_sigmoid(diff).neg();
    let mut loss = losses.clone().mean();
    if let Some(c) = center_rewards_coefficient {
        loss = loss.add(
            rewards_chosen
                .add(rewards_rejected)
                .square()
                .mean()
                .mul_scalar(c),
        );
    }
    BradleyTerryOutput { losses, loss }
}

/// Reward-model loss on ranked lists `rewards` `[n, K]` (column 0 the best answer): one loss per
/// list.
///
/// * [`RankingLoss::Pairwise`]: the mean over the `K(K−1)/2` pairs `i < j` of `−logσ(r_i − r_j)`
///   (InstructGPT's comparisons; for `K = 2` exactly [`bradley_terry_loss`]'s per-pair loss).
/// * [`RankingLoss::PlackettLuce`]: `−Σ_{i<K} (r_i − log Σ_{j≥i} exp r_j)`, the negative
///   log-likelihood of the whole ranking (Vision-LLM-Alignment's `rm_training_main.py`, whose
///   last term `i = K−1` is 0). For `K = 2` it equals the pairwise loss.
pub fn ranking_loss(rewards: Tensor<2>, kind: RankingLoss) -> Tensor<1> {
    let [n, k] = rewards.dims();
    let column = |i: usize| rewards.clone().narrow(1, i, 1).reshape([n]);
    match kind {
        RankingLoss::Pairwise => {
            let mut terms = Vec::new();
            for i in 0..k {
                for j in i + 1..k {
                    terms.push(log_sigmoid(column(i).sub(column(j))).neg());
                }
            }
            let count = terms.len().max(1) as f64;
            match terms.into_iter().reduce(|a, b| a.add(b)) {
                Some(sum) => sum.div_scalar(count),
                None => Tensor::zeros([n], &rewards.device()),
            }
        }
        RankingLoss::PlackettLuce => {
            let mut total: Option<Tensor<1>> = None;
            for i in 0..k.saturating_sub(1) {
                let rest = rewards.clone().narrow(1, i, k - i);
                // log Σ exp, shifted by the row maximum for stability.
                let max = rest.clone().max_dim(1);
                let lse = rest
                    .sub(max.clone())
                    .exp()
                    .sum_dim(1)
                    .log()
                    .add(max)
                    .reshape([n]);
                let term = lse.sub(column(i));
                total = Some(match total {
                    Some(t) => t.add(term),
                    None => term,
                });
            }
            total.unwrap_or_else(|| Tensor::zeros([n], &rewards.device()))
        }
    }
}
