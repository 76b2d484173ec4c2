//! The error of a reconstruction against its input: Σ (x̂ − x)² and Σ x²
//! over the finite inputs, what a tensor's recorded relative error is made
//! of (summed over its chunks). For Adam's moments also the error they put
//! into Adam's update ([`moment_errors`]): what a resumed run feels of them.
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

/// The sums behind the recorded errors of one chunk of Adam's moments m
/// and v (with their reconstructions m̂, v̂), in one pass over the four.
///
/// Besides each moment's own error, the error it puts into Adam's update
/// direction u = m / (√v + ε): m's error is small or large only relative to
/// √v (an m error of 46% in m's units was 23% of the update on a fine-tune
/// run), and v's error only matters through 1/√v. Bias correction scales m
/// and √v by step-dependent constants that cancel in a relative error, up
/// to where it scales ε; ε is [`ADAM_EPS`](super::policy::ADAM_EPS) here.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct MomentErrors {
    /// (Σ (m̂ − m)², Σ m²): exactly what [`squared_error`]`(m, m̂)` returns.
    pub m: (f64, f64),
    /// (Σ (v̂ − v)², Σ v²): exactly what [`squared_error`]`(v, v̂)` returns.
    pub v: (f64, f64),
    /// Σ (û − u)² with û = m̂ / (√v + ε) (m's share), m / (√v̂ + ε) (v's
    /// share) and m̂ / (√v̂ + ε) (both), over the elements whose m and v
    /// are finite.
    pub update: [f64; 3],
    /// Σ u² over the same elements.
    pub update_norm: f64,
}

/// [`MomentErrors`] of the first `n` elements, `n` the shortest length.
pub fn moment_errors(m: &[f32], m_hat: &[f32], v: &[f32], v_hat: &[f32]) -> MomentErrors {
    #[cfg(target_arch = "x86_64")]
    if super::simd::avx2_enabled() {
        // SAFETY: avx2_enabled() checked that the CPU supports AVX2.
        return unsafe { moment_errors_avx2(m, m_hat, v, v_hat) };
    }
    moment_errors_plain(m, m_hat, v, v_hat)
}

fn shortest(slices: [&[f32]; 4]) -> usize {
    slices.iter().map(|s| s.len()).min().unwrap_or(0)
}

/// The reference: per-lane sums in element order, then the lanes in order.
fn moment_errors_plain(m: &[f32], m_hat: &[f32], v: &[f32], v_hat: &[f32]) -> MomentErrors {
    let mut sums = MomentLanes::default();
    let n = shortest([m, m_hat, v, v_hat]);
    let full = n - n % LANES;
    // Eight lanes at a time, so that the update's f32 terms vectorize.
    for start in (0..full).step_by(LANES) {
        let group = |x: &[f32]| -> [f32; LANES] { x[start..start + LANES].try_into().unwrap() };
        sums.add_group(start, [group(m), group(m_hat), group(v), group(v_hat)]);
    }
    for i in full..n {
        sums.add(i, [m[i], m_hat[i], v[i], v_hat[i]]);
    }
    sums.total()
}

/// √max(v, 0) + ε, the scale Adam divides m by (a NaN v counts as 0, as
/// `max` returns the number).
#[inline(always)]
fn scale(v: f32) -> f32 {
    v.max(0.0).sqrt() + super::policy::ADAM_EPS
}

/// The update u and its changes, written so that no two nearly equal
/// quotients are subtracted (the errors are often 1e-4 of the update, and
/// ExCP's zeroed v makes 1/ŝ 1e8): with s, ŝ the scales and q = 1/(s·ŝ),
/// u = m·ŝ·q, m's share (m̂ − m)·ŝ·q, v's m·(s − ŝ)·q (= m/ŝ − m/s), and
/// both m's + m̂·(s − ŝ)·q (= m̂/ŝ − m/s). One division per element (the
/// costliest operation here): these are statistics, and the kernel and the
/// reference compute them with the same operations in the same order.
#[inline(always)]
fn update_terms(m: f32, m_hat: f32, v: f32, v_hat: f32) -> [f32; 4] {
    let (s, s_hat) = (scale(v), scale(v_hat));
    let q = 1.0 / (s * s_hat);
    let (dm, ds) = (m_hat - m, s - s_hat);
    let m_share = dm * s_hat * q;
    let both = m_share + m_hat * ds * q;
    [m_share, m * ds * q, both, m * s_hat * q]
}

/// Elements per lane whose update terms are squared and summed in f32
/// before joining the lane's f64 sum: widening every term to f64 made the
/// update's sums cost more than the moments' own.
const BLOCK: usize = 16;

/// Per lane: the moments' own sums, and the squared update terms (m's
/// share, v's, both, u) in f64 with the current block's f32 sums.
#[derive(Default)]
struct MomentLanes {
    m: LaneSums,
    v: LaneSums,
    update: [[f64; LANES]; 4],
    block: [[f32; LANES]; 4],
}

impl MomentLanes {
    /// Adds element `i`: lane i % 8; the block ends after element i when
    /// i + 1 is a multiple of 8 · BLOCK, as the kernel's does.
    #[inline(always)]
    fn add(&mut self, i: usize, [m, m_hat, v, v_hat]: [f32; 4]) {
        let lane = i % LANES;
        self.m.add(lane, m, m_hat);
        self.v.add(lane, v, v_hat);
        let counted = m.is_finite() && v.is_finite();
        for (block, term) in self.block.iter_mut().zip(update_terms(m, m_hat, v, v_hat)) {
            let t = if counted { term } else { 0.0 };
            block[lane] += t * t;
        }
        if (i + 1).is_multiple_of(LANES * BLOCK) {
            self.end_block();
        }
    }

    /// Adds elements `start..start + 8` (`start` a multiple of 8): the
    /// same terms in the same lanes as eight calls of [`Self::add`].
    #[inline(always)]
    fn add_group(&mut self, start: usize, [m, m_hat, v, v_hat]: [[f32; LANES]; 4]) {
        for lane in 0..LANES {
            self.m.add(lane, m[lane], m_hat[lane]);
            self.v.add(lane, v[lane], v_hat[lane]);
        }
        let mut terms = [[0.0f32; LANES]; 4];
        for lane in 0..LANES {
            let counted = m[lane].is_finite() && v[lane].is_finite();
            let t = update_terms(m[lane], m_hat[lane], v[lane], v_hat[lane]);
            for (terms, t) in terms.iter_mut().zip(t) {
                terms[lane] = if counted { t } else { 0.0 };
            }
        }
        for (block, terms) in self.block.iter_mut().zip(&terms) {
            for lane in 0..LANES {
                block[lane] += terms[lane] * terms[lane];
            }
        }
        if (start + LANES).is_multiple_of(LANES * BLOCK) {
            self.end_block();
        }
    }

    fn end_block(&mut self) {
        for (sums, block) in self.update.iter_mut().zip(&mut self.block) {
            for (sum, b) in sums.iter_mut().zip(block.iter_mut()) {
                *sum += *b as f64;
                *b = 0.0;
            }
        }
    }

    fn total(mut self) -> MomentErrors {
        self.end_block();
        let [m, v, both, norm] = self.update.map(|lanes| lanes.iter().sum());
        MomentErrors {
            m: self.m.total(),
            v: self.v.total(),
            update: [m, v, both],
            update_norm: norm,
        }
    }
}

/// The same sums, eight elements per step: the moments' own as
/// `squared_error_avx2` does them (masked, widened to f64, squared, added);
/// the update's terms squared and added in f32 for BLOCK steps, then
/// widened and added to f64 sums.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn moment_errors_avx2(m: &[f32], m_hat: &[f32], v: &[f32], v_hat: &[f32]) -> MomentErrors {
    use std::arch::x86_64::{
        __m256, __m256d, _CMP_LT_OQ, _mm256_add_pd, _mm256_add_ps, _mm256_and_ps,
        _mm256_castps256_ps128, _mm256_castsi256_ps, _mm256_cmp_ps, _mm256_cvtps_pd, _mm256_div_ps,
        _mm256_extractf128_ps, _mm256_loadu_ps, _mm256_max_ps, _mm256_mul_pd, _mm256_mul_ps,
        _mm256_set1_epi32, _mm256_set1_ps, _mm256_setzero_pd, _mm256_setzero_ps, _mm256_sqrt_ps,
        _mm256_storeu_pd, _mm256_storeu_ps, _mm256_sub_ps,
    };
    let n = shortest([m, m_hat, v, v_hat]);
    let full = n - n % LANES;
    let halves = |x: __m256| [_mm256_castps256_ps128(x), _mm256_extractf128_ps::<1>(x)];
    // The moments' own sums (m err, m norm, v err, v norm), lanes 0–3 and 4–7.
    let mut own = [[_mm256_setzero_pd(); 2]; 4];
    let add_squares = |acc: &mut [__m256d; 2], x: __m256| {
        for (sum, half) in acc.iter_mut().zip(halves(x)) {
            let wide = _mm256_cvtps_pd(half);
            *sum = _mm256_add_pd(*sum, _mm256_mul_pd(wide, wide));
        }
    };
    // The update's: f64 sums, and the block's f32 sums.
    let mut update = [[_mm256_setzero_pd(); 2]; 4];
    let mut block = [_mm256_setzero_ps(); 4];
    let end_block = |update: &mut [[__m256d; 2]; 4], block: &mut [__m256; 4]| {
        for (sums, b) in update.iter_mut().zip(block.iter_mut()) {
            for (sum, half) in sums.iter_mut().zip(halves(*b)) {
                *sum = _mm256_add_pd(*sum, _mm256_cvtps_pd(half));
            }
            *b = _mm256_setzero_ps();
        }
    };
    let magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let infinity = _mm256_set1_ps(f32::INFINITY);
    let (one, zero, eps) = (
        _mm256_set1_ps(1.0),
        _mm256_setzero_ps(),
        _mm256_set1_ps(super::policy::ADAM_EPS),
    );
    let finite = |x: __m256| _mm256_cmp_ps::<_CMP_LT_OQ>(_mm256_and_ps(x, magnitude), infinity);
    // max(v, 0) returns its second operand, 0, where v is NaN, as f32::max does.
    let scale = |v: __m256| _mm256_add_ps(_mm256_sqrt_ps(_mm256_max_ps(v, zero)), eps);
    for (step, start) in (0..full).step_by(LANES).enumerate() {
        // SAFETY: start + 8 <= full <= every slice's length.
        let [m, m_hat, v, v_hat] =
            unsafe { [m, m_hat, v, v_hat].map(|s| _mm256_loadu_ps(s.as_ptr().add(start))) };
        let (m_finite, v_finite) = (finite(m), finite(v));
        add_squares(
            &mut own[0],
            _mm256_and_ps(_mm256_sub_ps(m_hat, m), m_finite),
        );
        add_squares(&mut own[1], _mm256_and_ps(m, m_finite));
        add_squares(
            &mut own[2],
            _mm256_and_ps(_mm256_sub_ps(v_hat, v), v_finite),
        );
        add_squares(&mut own[3], _mm256_and_ps(v, v_finite));
        // As update_terms, operation for operation.
        let (s, s_hat) = (scale(v), scale(v_hat));
        let q = _mm256_div_ps(one, _mm256_mul_ps(s, s_hat));
        let (dm, ds) = (_mm256_sub_ps(m_hat, m), _mm256_sub_ps(s, s_hat));
        let times_q = |a: __m256, b: __m256| _mm256_mul_ps(_mm256_mul_ps(a, b), q);
        let m_share = times_q(dm, s_hat);
        let both = _mm256_add_ps(m_share, times_q(m_hat, ds));
        let terms = [m_share, times_q(m, ds), both, times_q(m, s_hat)];
        let counted = _mm256_and_ps(m_finite, v_finite);
        for (b, term) in block.iter_mut().zip(terms) {
            let t = _mm256_and_ps(term, counted);
            *b = _mm256_add_ps(*b, _mm256_mul_ps(t, t));
        }
        if (step + 1).is_multiple_of(BLOCK) {
            end_block(&mut update, &mut block);
        }
    }
    let mut sums = MomentLanes::default();
    let own_lanes = [
        &mut sums.m.err,
        &mut sums.m.norm,
        &mut sums.v.err,
        &mut sums.v.norm,
    ];
    // SAFETY: each store writes 4 f64 into a half of an 8-element array,
    // or 8 f32 into an 8-element array.
    unsafe {
        for (out, acc) in own_lanes
            .into_iter()
            .chain(&mut sums.update)
            .zip(own.iter().chain(&update))
        {
            _mm256_storeu_pd(out.as_mut_ptr(), acc[0]);
            _mm256_storeu_pd(out.as_mut_ptr().add(4), acc[1]);
        }
        for (out, b) in sums.block.iter_mut().zip(&block) {
            _mm256_storeu_ps(out.as_mut_ptr(), *b);
        }
    }
    // The tail continues the current block, lane i % 8 as in the reference.
    for i in full..n {
        sums.add(i, [m[i], m_hat[i], v[i], v_hat[i]]);
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

    proptest! {
        #[test]
        fn the_moment_kernel_matches_the_plain_sums(
            elements in prop::collection::vec(
                (any::<u8>(), -1.0f32..1.0, -0.1f32..0.1, any::<u8>(), 0.0f32..1e-4, -1.0f32..1.0, any::<u8>()),
                0..200,
            ),
        ) {
            let m: Vec<f32> = elements.iter().map(|e| special(e.0, e.1)).collect();
            let m_hat: Vec<f32> = elements.iter().zip(&m).map(|(e, &m)| special(e.3, m + e.2)).collect();
            let v: Vec<f32> = elements.iter().map(|e| special(e.6, e.4)).collect();
            let v_hat: Vec<f32> = elements.iter().zip(&v).map(|(e, &v)| v * (1.0 + e.5)).collect();
            let plain = moment_errors_plain(&m, &m_hat, &v, &v_hat);
            let dispatched = moment_errors(&m, &m_hat, &v, &v_hat);
            // Bit for bit, but for a NaN's sign and payload: which operand's
            // NaN an operation passes on depends on the order the compiler
            // gives commutative operands (records store NaN as one value).
            let canonical = |x: f64| if x.is_nan() { f64::NAN.to_bits() } else { x.to_bits() };
            let bits = |e: &MomentErrors| {
                [e.m.0, e.m.1, e.v.0, e.v.1, e.update[0], e.update[1], e.update[2], e.update_norm]
                    .map(canonical)
            };
            prop_assert_eq!(bits(&plain), bits(&dispatched));
            // The moments' own sums are squared_error's, bit for bit (NaN
            // where a reconstruction is NaN, as there).
            let pair_bits = |(a, b): (f64, f64)| (canonical(a), canonical(b));
            prop_assert_eq!(pair_bits(plain.m), pair_bits(squared_error(&m, &m_hat)));
            prop_assert_eq!(pair_bits(plain.v), pair_bits(squared_error(&v, &v_hat)));
        }
    }

    #[test]
    fn update_errors_weigh_m_by_one_over_root_v() {
        // Two elements: m's error is the same, but the first has a large v,
        // so it barely moves the update; v's error is 21% of v (10% of √v).
        let (m, m_hat) = ([1e-3f32, 1e-3], [1.1e-3f32, 1.1e-3]);
        let v = [1e-2f32, 1e-6];
        let v_hat = [1e-2f32, 1.21e-6];
        let e = moment_errors(&m, &m_hat, &v, &v_hat);
        let exact = |m: f64, v: f64| m / (v.sqrt() + 1e-8);
        let u = [exact(1e-3, 1e-2), exact(1e-3, 1e-6)];
        let norm = u[0] * u[0] + u[1] * u[1];
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-4 * b.abs();
        assert!(close(e.update_norm, norm), "{e:?}");
        // m's share: 10% of every u.
        assert!(close(e.update[0], 0.01 * norm), "{e:?}");
        // v's share: only the second element, u / 1.1 − u.
        let dv = u[1] / 1.1 - u[1];
        assert!(close(e.update[1], dv * dv), "{e:?}");
        // Both: the second element's 1.1 / 1.1 cancels.
        let d0 = 0.1 * u[0];
        assert!(close(e.update[2], d0 * d0), "{e:?}");
    }

    #[test]
    fn elements_with_non_finite_moments_are_not_counted() {
        let m = [1.0f32, f32::NAN, 2.0, 1.0];
        let m_hat = [1.0f32, 0.0, 2.0, 1.0];
        let v = [1.0f32, 1.0, f32::INFINITY, 4.0];
        let v_hat = v;
        let e = moment_errors(&m, &m_hat, &v, &v_hat);
        assert_eq!(e.update, [0.0; 3]);
        let expected = 1.0 + 0.25;
        assert!((e.update_norm - expected).abs() < 1e-6, "{e:?}");
    }
}
