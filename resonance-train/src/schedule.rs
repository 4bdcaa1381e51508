//! Learning-rate schedules with linear warmup, as transformers defines them
//! (`get_{constant,linear,cosine}_schedule_with_warmup`), plugged into Burn's scheduler trait.

use burn::optim::lr_scheduler::{LrScheduler, LrSchedulerRecord};
use burn::optim::LearningRate;
use resonance_core::config::ScheduleKind;

/// The multiplier of the peak learning rate at optimizer step `step` (0-based): the first step of
/// a warmup runs at 0, exactly as a transformers `LambdaLR` does.
pub fn lr_factor(kind: ScheduleKind, step: u64, warmup: u64, total: u64) -> f64 {
    if step < warmup {
        return step as f64 / warmup.max(1) as f64;
    }
    let decay_steps = total.saturating_sub(warmup).max(1) as f64;
    let progress = (step - warmup) as f64 / decay_steps;
    match kind {
        ScheduleKind::Constant => 1.0,
        ScheduleKind::Linear => ((total.saturating_sub(step)) as f64 / decay_steps).max(0.0),
        ScheduleKind::Cosine => (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
    }
}

/// A warmup + decay schedule for one parameter group.
#[derive(Debug, Clone)]
pub struct WarmupSchedule {
    pub peak: f64,
    pub kind: ScheduleKind,
    pub warmup: u64,
    pub total: u64,
    /// The optimizer step the next call to `step` serves.
    pub next_step: u64,
}

impl WarmupSchedule {
    pub fn new(peak: f64, kind: ScheduleKind, warmup: u64, total: u64) -> Self {
        WarmupSchedule {
            peak,
            kind,
            warmup,
            total,
            next_step: 0,
        }
    }

    /// The learning rate at optimizer step `step`.
    pub fn lr_at(&self, step: u64) -> f64 {
        self.peak * lr_factor(self.kind, step, self.warmup, self.total)
    }
}

impl LrScheduler for WarmupSchedule {
    fn step(&mut self) -> LearningRate {
        let lr = self.lr_at(self.next_step);
        self.next_step += 1;
        lr
    }

    fn to_record(&self) -> LrSchedulerRecord {
        LrSchedulerRecord::new().with_scalar("next_step", self.next_step)
    }

    fn load_record(&mut self, record: LrSchedulerRecord) {
        if let Some(step) = record.scalar::<u64>("next_step") {
            self.next_step = step;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_matches_transformers() {
        // transformers: get_cosine_schedule_with_warmup(opt, 2, 10) lambdas for steps 0..10.
        let expected = [
            0.0,
            0.5,
            1.0,
            0.961_939_766_255_643_4,
            0.853_553_390_593_273_7,
            0.691_341_716_182_544_9,
            0.5,
            0.308_658_283_817_455_1,
            0.146_446_609_406_726_24,
            0.038_060_233_744_356_6,
        ];
        for (step, want) in expected.iter().enumerate() {
            let got = lr_factor(ScheduleKind::Cosine, step as u64, 2, 10);
            assert!((got - want).abs() < 1e-12, "step {step}: {got} vs {want}");
        }
    }

    #[test]
    fn linear_and_constant() {
        assert_eq!(lr_factor(ScheduleKind::Linear, 0, 0, 4), 1.0);
        assert_eq!(lr_factor(ScheduleKind::Linear, 3, 0, 4), 0.25);
        assert_eq!(lr_factor(ScheduleKind::Linear, 2, 2, 6), 1.0);
        assert_eq!(lr_factor(ScheduleKind::Constant, 1, 4, 10), 0.25);
        assert_eq!(lr_factor(ScheduleKind::Constant, 9, 4, 10), 1.0);
    }

    #[test]
    fn scheduler_resumes_from_its_record() {
        let mut a = WarmupSchedule::new(1e-3, ScheduleKind::Cosine, 1, 8);
        let _ = (a.step(), a.step(), a.step());
        let mut b = WarmupSchedule::new(1e-3, ScheduleKind::Cosine, 1, 8);
        b.load_record(a.to_record());
        for _ in 0..5 {
            assert_eq!(a.step(), b.step());
        }
    }
}
