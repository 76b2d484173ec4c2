//! Wider vectors for the hot loops where the CPU has them.
//!
//! Release builds target baseline x86-64, whose vectors are 4 floats wide
//! (SSE2). The loops of lossy coding (quantizing, statistics, reconstruction,
//! error sums) are written so that they vectorize; compiled for AVX2 they
//! process 8 floats per instruction. [`with_avx2!`](crate::with_avx2) calls
//! a function through a copy compiled with AVX2 enabled when the CPU reports
//! it, so one binary runs everywhere and uses AVX2 where it exists.
//!
//! Results are bit-identical either way: Rust never contracts a multiply and
//! an add into an FMA or reassociates float sums on its own, so a wider
//! vector computes each element, and each lane of a sum, in the same order.

/// Whether the AVX2 copies run: the CPU has AVX2 and the environment does
/// not say `CKPTVC_SIMD=baseline` (which the tests use to check that both
/// paths store the same bytes). Decided once per process.
pub fn avx2_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| {
        let baseline = std::env::var_os("CKPTVC_SIMD").is_some_and(|v| v == "baseline");
        #[cfg(target_arch = "x86_64")]
        let available = std::is_x86_feature_detected!("avx2");
        #[cfg(not(target_arch = "x86_64"))]
        let available = false;
        available && !baseline
    })
}

/// An expression: calls `$f($args)` (an `#[inline(always)]` function)
/// through a copy compiled for AVX2 when this CPU has it, else directly. A
/// macro rather than a function taking a closure: the compiler may decline
/// to inline a closure into the AVX2 copy, and then the copy only jumps to
/// the baseline code. It leaves a labeled block, not the caller (a `return`
/// here once skipped the code after it in a caller that went on).
#[macro_export]
macro_rules! with_avx2 {
    ($f:ident($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty) => {'dispatch: {
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx2")]
            fn avx2($($arg: $ty),*) -> $ret {
                $f($($arg),*)
            }
            if $crate::codec::simd::avx2_enabled() {
                // SAFETY: avx2_enabled() checked that the CPU supports AVX2.
                break 'dispatch unsafe { avx2($($arg),*) };
            }
        }
        $f($($arg),*)
    }};
}

/// `x` if `keep`, else +0.0: a bit mask, not a branch. The hot loops sum
/// only finite terms; written as `if keep { x } else { 0.0 }` the compiler
/// may turn the select into a branch or a masked store, and the loop then
/// runs scalar (the planning sums took 2.5× as long). Same result as the
/// select, bit for bit.
#[inline(always)]
pub fn zero_unless(keep: bool, x: f64) -> f64 {
    f64::from_bits(x.to_bits() & 0u64.wrapping_sub(u64::from(keep)))
}

#[cfg(test)]
mod tests {
    #[inline(always)]
    fn sum_of_squares(x: &[f32]) -> [f32; 8] {
        let mut lanes = [0f32; 8];
        for c in x.chunks_exact(8) {
            for l in 0..8 {
                lanes[l] += c[l] * c[l];
            }
        }
        lanes
    }

    fn dispatched(x: &[f32]) -> [f32; 8] {
        crate::with_avx2!(sum_of_squares(x: &[f32]) -> [f32; 8])
    }

    /// The dispatch inside a body that goes on after it.
    fn doubled(x: &[f32]) -> [f32; 8] {
        let lanes = crate::with_avx2!(sum_of_squares(x: &[f32]) -> [f32; 8]);
        lanes.map(|l| 2.0 * l)
    }

    #[test]
    fn the_dispatch_is_an_expression_the_caller_goes_on_after() {
        let x: Vec<f32> = (0..100).map(|i| i as f32).collect();
        assert_eq!(doubled(&x), sum_of_squares(&x).map(|l| 2.0 * l));
    }

    #[test]
    fn same_result_with_and_without() {
        let x: Vec<f32> = (0..10_000).map(|i| (i as f32).sin() * 1e-3).collect();
        assert_eq!(dispatched(&x), sum_of_squares(&x));
    }
}
