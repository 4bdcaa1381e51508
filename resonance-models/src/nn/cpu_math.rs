//! Element-wise math for the CPU kernels, written so that loops over it vectorise: no branches,
//! no calls into libm (whose scalar `expf` dominated flex's softmax and sigmoid passes).

/// `eˣ` for `x ≤ 0` (scores minus their row maximum), branch-free so that loops over it
/// vectorise: Cody–Waite reduction by ln 2 and Cephes' degree-5 polynomial (relative error
/// ~1e-7). Below −87 (where `eˣ` leaves the normal f32 range) and at `-inf` it returns 0.
#[inline(always)]
pub fn exp_nonpositive(x: f32) -> f32 {
    const LOWEST: f32 = -87.0;
    let keep = if x > LOWEST { 1.0 } else { 0.0 };
    let x = if x > LOWEST { x } else { LOWEST };
    // Round x·log2(e) to the nearest integer n with the 1.5·2²³ trick (no SSE4.1 `round`): the
    // sum's low mantissa bits then hold n, from which 2ⁿ is built below without a float-to-int
    // conversion (Rust's saturating `as i32` would not vectorise).
    const SHIFTER: f32 = 12_582_912.0;
    let shifted = x * std::f32::consts::LOG2_E + SHIFTER;
    let n = shifted - SHIFTER;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e_r = p * r * r + r + 1.0;
    // The mantissa of `shifted` is 2²² + n, so its low nine bits are n + 127 (mod 512) after
    // adding the bias; shifted into the exponent field they make 2ⁿ for n in [−126, 0].
    let two_n = f32::from_bits(shifted.to_bits().wrapping_add(127) << 23);
    e_r * two_n * keep
}

/// The logistic function `σ(x) = 1 / (1 + e⁻ˣ)`, from `e^(−|x|)` so that the exponential never
/// overflows; relative error below 1e-6 wherever `σ(x)` is a normal f32 (x > −87).
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    sigmoid_pair(x).0
}

/// `(σ(x), σ(−x))`: the second is `1 − σ(x)` without the cancellation of computing it so when
/// `σ(x)` is near 1.
#[inline(always)]
pub fn sigmoid_pair(x: f32) -> (f32, f32) {
    let e = exp_nonpositive(-x.abs());
    let inverse = 1.0 / (1.0 + e);
    let (large, small) = (inverse, e * inverse);
    if x >= 0.0 {
        (large, small)
    } else {
        (small, large)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polynomial_exp_is_accurate() {
        let mut worst = 0.0f64;
        for i in 0..200_000 {
            let x = -87.0 * i as f32 / 200_000.0;
            let exact = (x as f64).exp();
            let relative = ((exp_nonpositive(x) as f64) - exact).abs() / exact;
            worst = worst.max(relative);
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpositive(0.0), 1.0);
    }

    #[test]
    fn sigmoid_is_accurate() {
        let mut worst = 0.0f64;
        for i in 0..200_000 {
            let x = -86.0 + 172.0 * i as f32 / 200_000.0;
            let exact = 1.0 / (1.0 + (-(x as f64)).exp());
            let exact_complement = 1.0 / (1.0 + (x as f64).exp());
            let (s, complement) = sigmoid_pair(x);
            worst = worst
                .max(((s as f64) - exact).abs() / exact)
                .max(((complement as f64) - exact_complement).abs() / exact_complement);
        }
        assert!(worst < 1e-6, "worst relative error {worst}");
        assert!(sigmoid(-100.0) < 1e-37);
        assert_eq!(sigmoid(f32::INFINITY), 1.0);
        assert_eq!(sigmoid(f32::NEG_INFINITY), 0.0);
        assert_eq!(sigmoid(0.0), 0.5);
    }
}
