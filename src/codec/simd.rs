//! Wider vectors for the hot loops where the CPU has them.
//!
//! Release builds target baseline x86-64, whose vectors are 4 floats wide
//! (SSE2). The loops of lossy coding (quantizing, statistics, reconstruction,
//! error sums) are written so that they vectorize; compiled for AVX2 they
//! process 8 floats per instruction, for AVX-512 16 (and eight f64 lane
//! sums in one register). [`with_simd!`](crate::with_simd) calls a function
//! through a copy compiled for the widest of these the CPU reports, so one
//! binary runs everywhere and uses what each machine has.
//!
//! Results are bit-identical either way: Rust never contracts a multiply and
//! an add into an FMA or reassociates float sums on its own, so a wider
//! vector computes each element, and each lane of a sum, in the same order.

/// The vector extensions the dispatched copies use, narrowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Baseline,
    Avx2,
    /// AVX-512 F, BW, DQ and VL.
    Avx512,
}

/// The widest [`Level`] this CPU has, capped by `CKPTVC_SIMD` (`baseline`
/// or `avx2`: the tests check that every level stores the same bytes).
/// Decided once per process.
pub fn level() -> Level {
    static LEVEL: std::sync::OnceLock<Level> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| {
        let cap = match std::env::var("CKPTVC_SIMD").as_deref() {
            Ok("baseline") => Level::Baseline,
            Ok("avx2") => Level::Avx2,
            _ => Level::Avx512,
        };
        available().min(cap)
    })
}

#[cfg(target_arch = "x86_64")]
fn available() -> Level {
    use std::is_x86_feature_detected as has;
    if has!("avx512f") && has!("avx512bw") && has!("avx512dq") && has!("avx512vl") {
        Level::Avx512
    } else if has!("avx2") {
        Level::Avx2
    } else {
        Level::Baseline
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn available() -> Level {
    Level::Baseline
}

/// Whether the AVX2 copies (and the hand-written AVX2 kernels) may run:
/// [`level`] is AVX2 or wider.
pub fn avx2_enabled() -> bool {
    level() >= Level::Avx2
}

/// An expression: calls `$f($args)` (an `#[inline(always)]` function)
/// through a copy compiled for AVX-512 or AVX2, the widest [`level`]
/// allows, else directly. A macro rather than a function taking a closure:
/// the compiler may decline to inline a closure into the wider copy, and
/// then the copy only jumps to the baseline code. It leaves a labeled
/// block, not the caller (a `return` here once skipped the code after it in
/// a caller that went on).
#[macro_export]
macro_rules! with_simd {
    ($f:ident($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty) => {'dispatch: {
        #[cfg(target_arch = "x86_64")]
        {
            use $crate::codec::simd::{Level, level};
            #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
            fn avx512($($arg: $ty),*) -> $ret {
                $f($($arg),*)
            }
            #[target_feature(enable = "avx2")]
            fn avx2($($arg: $ty),*) -> $ret {
                $f($($arg),*)
            }
            match level() {
                // SAFETY: level() found these extensions on this CPU.
                Level::Avx512 => break 'dispatch unsafe { avx512($($arg),*) },
                // SAFETY: as above.
                Level::Avx2 => break 'dispatch unsafe { avx2($($arg),*) },
                Level::Baseline => {}
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
        crate::with_simd!(sum_of_squares(x: &[f32]) -> [f32; 8])
    }

    /// The dispatch inside a body that goes on after it.
    fn doubled(x: &[f32]) -> [f32; 8] {
        let lanes = crate::with_simd!(sum_of_squares(x: &[f32]) -> [f32; 8]);
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
