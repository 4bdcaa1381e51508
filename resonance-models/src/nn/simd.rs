//! The element-wise CPU kernels compiled a second time for AVX2 and chosen at run time.
//!
//! Release builds target the x86-64 baseline (SSE2, four f32 lanes) so that one binary runs on
//! every x86-64 CPU. The kernels' loops are written to vectorise; run through [`wide!`] on a CPU
//! with AVX2 they are compiled with eight lanes instead. Rust never fuses `a * b + c` into one
//! rounding by itself, and each lane of a vector add, multiply, divide or square root rounds as
//! the scalar operation does, so both paths give the same bits: the choice changes speed only.

/// Runs the code it is given compiled with AVX2 where the CPU has it (detected once), as the
/// baseline build otherwise; the code's value is returned.
///
/// The code is written out twice, once in each branch: a closure called from both would be one
/// function, too large to be inlined into either, and only code inlined into [`with_avx2`] is
/// compiled for the wider vectors. For the same reason the code should hold its loops itself,
/// or call functions marked `#[inline(always)]`. One branch runs it as a closure, so it must not
/// `return` or use `?`.
macro_rules! wide {
    ($($body:tt)*) => {{
        #[cfg(target_arch = "x86_64")]
        let value = if $crate::nn::simd::has_avx2() {
            // SAFETY: the CPU supports AVX2 (checked just above).
            unsafe { $crate::nn::simd::with_avx2(|| { $($body)* }) }
        } else {
            $($body)*
        };
        #[cfg(not(target_arch = "x86_64"))]
        let value = { $($body)* };
        value
    }};
}
pub(crate) use wide;

/// Whether [`wide!`] runs its code with AVX2: the CPU has it and `RESONANCE_SIMD=baseline`
/// (for A/B timing) is not set. Decided once.
pub fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static CHOSEN: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *CHOSEN.get_or_init(|| {
            let baseline = std::env::var("RESONANCE_SIMD")
                .is_ok_and(|value| value.eq_ignore_ascii_case("baseline"));
            std::arch::is_x86_feature_detected!("avx2") && !baseline
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Calls `kernel` from a function compiled with AVX2, so that the code inlined into it is.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
pub unsafe fn with_avx2<R>(kernel: impl FnOnce() -> R) -> R {
    kernel()
}

#[cfg(test)]
mod tests {
    use crate::nn::cpu_math::{exp_nonpositive, sigmoid_pair};

    /// The same loops through both paths give the same bits (division, square root, the
    /// polynomial exponential and eight-lane partial sums included).
    #[test]
    fn both_paths_agree_to_the_bit() {
        let values: Vec<f32> = (0..4099)
            .map(|i| ((i as f32) * 0.618_034).sin() * 40.0 - 3.0)
            .collect();
        #[inline(always)]
        fn kernel(values: &[f32]) -> (Vec<f32>, [f32; 8]) {
            let mut out = vec![0.0f32; values.len()];
            for (y, &x) in out.iter_mut().zip(values) {
                let (s, c) = sigmoid_pair(x);
                *y = x * s / (c + 1.0).sqrt() + exp_nonpositive(-x.abs());
            }
            let mut partial = [0.0f32; 8];
            for chunk in out.chunks_exact(8) {
                for (p, &y) in partial.iter_mut().zip(chunk) {
                    *p += y * y;
                }
            }
            (out, partial)
        }
        let baseline = kernel(&values);
        let chosen = wide!(kernel(&values));
        let bits = |(out, partial): &(Vec<f32>, [f32; 8])| {
            out.iter()
                .chain(partial)
                .map(|v| v.to_bits())
                .collect::<Vec<_>>()
        };
        assert_eq!(bits(&baseline), bits(&chosen));
    }
}
