//! A batch's rows split over the CPU's compute threads, each shard's forward and backward on its
//! own thread (data parallelism across cores).
//!
//! Splitting every matrix product over the cores leaves them idle between products: the two
//! halves of a product end apart (the cores of a VM run at different speeds for hundreds of
//! milliseconds), every split repacks the operand it does not divide, and Burn's element-wise
//! operations run on one thread while the other waits. A shard per thread runs whole products
//! and its own element-wise work side by side with the others, and meets them once, at the end
//! of the backward pass. On the benchmark the SFT step went from 5.9-6.4 s to 5.2 s and the DPO
//! step from 9.1-9.3 s to 8.6-8.9 s (`docs/PERFORMANCE.md`).
//!
//! A loss can be sharded when it is a sum over rows (each shard normalised by the whole batch's
//! count): SFT's token-averaged cross-entropy, the pair losses of DPO and its variants, SimPO's
//! mean (weighted by the shard's share of the pairs). The shards' gradients are added in shard
//! order and the shard boundaries depend only on the row and thread counts, so a run is
//! reproducible on the same machine; the bits differ from the unsharded batch by float rounding
//! (the sums run in a different order).

use std::ops::Range;
use std::sync::OnceLock;

use burn::module::Module;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::{Device, Tensor};
use rayon::prelude::*;
use resonance_models::vision::clip::{add_vision_tower_calls, replace_vision_tower_calls};

use crate::error::Result;

/// How many shards a batch of `rows` is split into on `device`: one per compute thread of
/// Rayon's pool on the CPU backend (at most one per row), one elsewhere (a GPU runs a product
/// on all its cores at once). `RESONANCE_SHARDS=1` keeps the whole batch together.
pub fn shard_count(device: &Device, rows: usize) -> usize {
    let cpu = device.clone().inner() == Device::flex();
    if !cpu || rows < 2 {
        return 1;
    }
    rayon::current_num_threads()
        .min(shard_limit().unwrap_or(usize::MAX))
        .clamp(1, rows)
}

/// `RESONANCE_SHARDS`, read once: a positive number caps the shards; any other value is
/// ignored, with a warning that names it.
fn shard_limit() -> Option<usize> {
    static LIMIT: OnceLock<Option<usize>> = OnceLock::new();
    *LIMIT.get_or_init(|| {
        let value = std::env::var("RESONANCE_SHARDS").ok()?;
        match value.trim().parse::<usize>() {
            Ok(n) if n > 0 => Some(n),
            _ => {
                tracing::warn!(
                    "RESONANCE_SHARDS={value:?} is not a positive number of shards; ignored"
                );
                None
            }
        }
    })
}

/// `rows` split into `shards` contiguous ranges whose lengths differ by at most one (the first
/// ones longer).
pub fn shard_ranges(rows: usize, shards: usize) -> Vec<Range<usize>> {
    let shards = shards.clamp(1, rows.max(1));
    let (base, extra) = (rows / shards, rows % shards);
    let mut start = 0;
    (0..shards)
        .map(|i| {
            let len = base + usize::from(i < extra);
            let range = start..start + len;
            start += len;
            range
        })
        .collect()
}

/// Runs `run` on every shard, side by side on Rayon's threads, and returns what each returned
/// (in shard order) with the sum of their gradients.
///
/// `run` returns the shard's loss, already normalised for the whole batch, and a value of its
/// own (metrics). With one shard it runs on `model` itself on the calling thread, which is the
/// unsharded computation exactly. With several, each shard runs on a fork of `model` whose
/// parameters are new autodiff leaves sharing the same storage, so that the shards record
/// separate graphs, which Burn's autodiff backpropagates concurrently (one graph holds a lock
/// through its whole backward pass).
pub fn sharded_gradients<M, S, R, F>(
    model: &M,
    device: &Device,
    shards: Vec<S>,
    run: F,
) -> Result<(Vec<R>, GradientsParams)>
where
    M: Module,
    S: Send,
    R: Send,
    F: Fn(&M, S) -> Result<(Tensor<1>, R)> + Sync,
{
    if shards.len() <= 1 {
        let mut values = Vec::with_capacity(1);
        let mut grads = GradientsParams::new();
        for shard in shards {
            let (loss, value) = run(model, shard)?;
            grads = GradientsParams::from_grads(loss.backward(), model);
            values.push(value);
        }
        return Ok((values, grads));
    }
    let replicas: Vec<M> = shards.iter().map(|_| model.clone().fork(device)).collect();
    let outcomes: Vec<Result<(R, GradientsParams, usize)>> = shards
        .into_par_iter()
        .zip(replicas)
        .map(|(shard, replica)| {
            // The shard's own image encodings, even when this thread runs another shard
            // inside this one (work stealing), go back to the calling thread's count.
            let outer = replace_vision_tower_calls(0);
            let outcome = run(&replica, shard).map(|(loss, value)| {
                let grads = GradientsParams::from_grads(loss.backward(), &replica);
                (value, grads)
            });
            let encodings = replace_vision_tower_calls(outer);
            outcome.map(|(value, grads)| (value, grads, encodings))
        })
        .collect();
    let mut values = Vec::with_capacity(outcomes.len());
    let mut accumulator = GradientsAccumulator::<M>::new();
    for outcome in outcomes {
        let (value, grads, encodings) = outcome?;
        add_vision_tower_calls(encodings);
        accumulator.accumulate(model, grads);
        values.push(value);
    }
    Ok((values, accumulator.grads()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_cover_the_rows_in_order_with_near_equal_lengths() {
        assert_eq!(shard_ranges(4, 2), vec![0..2, 2..4]);
        assert_eq!(shard_ranges(5, 2), vec![0..3, 3..5]);
        assert_eq!(shard_ranges(7, 3), vec![0..3, 3..5, 5..7]);
        assert_eq!(shard_ranges(2, 8), vec![0..1, 1..2]);
        assert_eq!(shard_ranges(3, 1), vec![0..3]);
        assert_eq!(shard_ranges(0, 2), vec![0..0]);
    }
}
