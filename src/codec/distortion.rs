//! The error of a reconstruction against its input: Σ (x̂ − x)² and Σ x²
//! over the finite inputs, what a tensor's recorded relative error is made
//! of (summed over its chunks).
//!
//! Every lossy chunk of every role goes through this once per commit, so it
//! has an AVX2 kernel. The plain loop did not vectorize: converting eight
//! f32 lanes into eight f64 sums, the compiler fell back to a scalar loop
//! with a branch per element (7% of a residual commit's time). Both forms
//! add the same terms in the same lanes in the same order, so they return
//! the same sums bit for bit (tested below).

/// (Σ (x̂ − x)², Σ x²) over the elements whose input `x` is finite, of the
/// first `min(input.len(), recon.len())` elements.
pub fn squared_error(input: &[f32], recon: &[f32]) -> (f64, f64) {
    #[cfg(target_arch = "x86_64")]
    if super::simd::avx2_enabled() {
        // SAFETY: avx2_enabled() checked that the CPU supports AVX2.
        return unsafe { squared_error_avx2(input, recon) };
    }
    squared_error_plain(input, recon)
}

/// Eight independent f64 sums (element i in lane i % 8), so the loop is not
/// one long dependency chain; each term is a product then a sum (no fused
/// multiply-add), in element order.
const LANES: usize = 8;

/// The reference: per-lane sums, then the lanes summed in order.
fn squared_error_plain(input: &[f32], recon: &[f32]) -> (f64, f64) {
    let mut sums = LaneSums::default();
    let n = input.len().min(recon.len());
    for (i, (&x, &y)) in input[..n].iter().zip(&recon[..n]).enumerate() {
        sums.add(i % LANES, x, y);
    }
    sums.total()
}

#[derive(Default)]
struct LaneSums {
    err: [f64; LANES],
    norm: [f64; LANES],
}

impl LaneSums {
    /// Adds element (x, x̂ = y) to `lane`; a non-finite x adds zero to both.
    #[inline(always)]
    fn add(&mut self, lane: usize, x: f32, y: f32) {
        let finite = x.is_finite();
        let d = if finite { (y - x) as f64 } else { 0.0 };
        let x = if finite { x as f64 } else { 0.0 };
        self.err[lane] += d * d;
        self.norm[lane] += x * x;
    }

    fn total(&self) -> (f64, f64) {
        (self.err.iter().sum(), self.norm.iter().sum())
    }
}

/// The same sums, eight elements per step: the f32 differences and inputs
/// masked to zero where the input is not finite (as the select does), then
/// widened to f64 four lanes at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn squared_error_avx2(input: &[f32], recon: &[f32]) -> (f64, f64) {
    use std::arch::x86_64::{
        __m256, __m256d, _CMP_LT_OQ, _mm256_add_pd, _mm256_and_ps, _mm256_castps256_ps128,
        _mm256_castsi256_ps, _mm256_cmp_ps, _mm256_cvtps_pd, _mm256_extractf128_ps,
        _mm256_loadu_ps, _mm256_mul_pd, _mm256_set1_epi32, _mm256_set1_ps, _mm256_setzero_pd,
        _mm256_storeu_pd, _mm256_sub_ps,
    };
    let n = input.len().min(recon.len());
    let full = n - n % LANES;
    // err and norm, lanes 0–3 and 4–7.
    let mut acc: [__m256d; 4] = [_mm256_setzero_pd(); 4];
    let magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let infinity = _mm256_set1_ps(f32::INFINITY);
    let add_squares = |acc: &mut __m256d, v: __m256, high: bool| {
        let half = if high {
            _mm256_extractf128_ps::<1>(v)
        } else {
            _mm256_castps256_ps128(v)
        };
        let wide = _mm256_cvtps_pd(half);
        *acc = _mm256_add_pd(*acc, _mm256_mul_pd(wide, wide));
    };
    for (xs, ys) in input[..full]
        .chunks_exact(LANES)
        .zip(recon[..full].chunks_exact(LANES))
    {
        // SAFETY: each load reads the 8 floats of a chunk of exactly 8.
        let (x, y) = unsafe { (_mm256_loadu_ps(xs.as_ptr()), _mm256_loadu_ps(ys.as_ptr())) };
        // |x| < ∞ is false for ±∞ and NaN (ordered compare).
        let finite = _mm256_cmp_ps::<_CMP_LT_OQ>(_mm256_and_ps(x, magnitude), infinity);
        let d = _mm256_and_ps(_mm256_sub_ps(y, x), finite);
        let x = _mm256_and_ps(x, finite);
        add_squares(&mut acc[0], d, false);
        add_squares(&mut acc[1], d, true);
        add_squares(&mut acc[2], x, false);
        add_squares(&mut acc[3], x, true);
    }
    let mut sums = LaneSums::default();
    // SAFETY: each store writes 4 f64 into a half of an 8-element array.
    unsafe {
        _mm256_storeu_pd(sums.err.as_mut_ptr(), acc[0]);
        _mm256_storeu_pd(sums.err.as_mut_ptr().add(4), acc[1]);
        _mm256_storeu_pd(sums.norm.as_mut_ptr(), acc[2]);
        _mm256_storeu_pd(sums.norm.as_mut_ptr().add(4), acc[3]);
    }
    for (lane, (&x, &y)) in input[full..n].iter().zip(&recon[full..n]).enumerate() {
        sums.add(lane, x, y);
    }
    sums.total()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn special(pick: u8, x: f32) -> f32 {
        match pick % 16 {
            0 => f32::NAN,
            1 => f32::INFINITY,
            2 => f32::NEG_INFINITY,
            3 => 0.0,
            4 => -0.0,
            5 => f32::MAX,
            6 => f32::MIN_POSITIVE / 4.0,
            _ => x,
        }
    }

    #[test]
    fn sums_finite_terms_only() {
        let input = [1.0, f32::NAN, 2.0, f32::INFINITY];
        let recon = [1.5, 0.0, 2.0, 0.0];
        assert_eq!(squared_error(&input, &recon), (0.25, 5.0));
    }

    proptest! {
        #[test]
        fn the_kernel_matches_the_plain_sums(
            elements in prop::collection::vec((any::<u8>(), -1e3f32..1e3, -1.0f32..1.0, any::<u8>()), 0..200),
        ) {
            let input: Vec<f32> = elements.iter().map(|&(p, x, _, _)| special(p, x)).collect();
            let recon: Vec<f32> = elements
                .iter()
                .zip(&input)
                .map(|(&(_, _, d, q), &x)| special(q, x + d))
                .collect();
            let plain = squared_error_plain(&input, &recon);
            let dispatched = squared_error(&input, &recon);
            prop_assert_eq!(plain.0.to_bits(), dispatched.0.to_bits());
            prop_assert_eq!(plain.1.to_bits(), dispatched.1.to_bits());
        }
    }
}
