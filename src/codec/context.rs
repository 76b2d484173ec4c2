//! Context-modelled symbol streams: each symbol of a quantized chunk coded
//! with the rANS table of a context the decoder computes *before* it
//! decodes it ([`rans::contexts`]).
//!
//! One table per stream codes every element as if it were typical. But the
//! decoder already knows something of each element — its base (the parent's
//! value) and, in the scaled and predicted domains, a side — and the
//! distribution of the symbols depends on it: a v element whose parent v̂ is
//! tiny moves by large factors, one whose v̂ is large hardly moves. A table
//! per context lets each fit its elements.
//!
//! The *context value* of element `i` ([`ContextSource`]):
//! - `Ratio` (v as a log ratio): `base[i]`, the parent's v̂;
//! - `Residual`: `|base[i]|`;
//! - `ScaledResidual` (m in units of Adam's update): `|base[i]| /
//!   (√max(side[i], 0) + floor)`, the parent's m̂ in the units m is coded in;
//! - `PredictedResidual`: `|side[i]|`, the prediction of W's change;
//! - the value domains have none (nothing is known of an element).
//!
//! The context of element `i` is the number of the chunk's thresholds
//! (stored, increasing, at most [`MAX_CONTEXTS`] − 1) that its value reaches
//! (`value >= threshold` in f32; a NaN value reaches none), so encoder and
//! decoder agree bit for bit. The encoder picks the thresholds as quantiles
//! of the values and context-codes only when that pays ([`choose`]); only
//! the `compact` preset context-codes at all
//! (`Policy::codes_in_contexts`).

use super::quant::{Domain, Side};
use super::rans;

/// Most contexts a chunk's symbols are coded in.
pub const MAX_CONTEXTS: usize = rans::contexts::MAX_CONTEXTS;

/// Chunks smaller than this are never context-coded: each context's table
/// costs up to ~60 bytes, and a small chunk's savings are smaller.
const MIN_ELEMENTS: usize = 1 << 14;

/// Elements sampled to estimate what contexts save.
const SAMPLE: usize = 1 << 16;

/// Elements sampled to place the thresholds (quantiles need few).
const QUANTILE_SAMPLE: usize = 1 << 12;

/// Contexts must save this share of the plain stream's bytes: they cost a
/// pass computing every element's context, at commit and at decode, and
/// the context-coded stream has no run or tuple form, so its symbols take a
/// rANS step each where a plain stream of a few symbols takes one per
/// tuple (a deep chain decoded ~1.5× as slowly: docs/benchmarks.md).
const MIN_SAVING: f64 = 0.05;

/// And at least this many bytes.
const MIN_SAVING_BYTES: f64 = 64.0;

/// What the decoder knows of each element of a chunk, as a context value
/// (see the module docs), computed on demand.
#[derive(Clone, Copy)]
pub struct ContextSource<'a> {
    kind: Kind,
    base: &'a [f32],
    side: &'a [f32],
    floor: f32,
}

#[derive(Clone, Copy)]
enum Kind {
    Base,
    AbsBase,
    ScaledBase,
    AbsSide,
}

/// The kinds as constants, for the loops specialized per kind.
const BASE: u8 = Kind::Base as u8;
const ABS_BASE: u8 = Kind::AbsBase as u8;
const SCALED_BASE: u8 = Kind::ScaledBase as u8;
const ABS_SIDE: u8 = Kind::AbsSide as u8;

/// An element's context value from its base and side values, for kind `K`
/// (the encoder's and the decoder's, sampled or not: one formula).
#[inline(always)]
fn value<const K: u8>(floor: f32, base: f32, side: f32) -> f32 {
    match K {
        BASE => base,
        ABS_BASE => base.abs(),
        SCALED_BASE => base.abs() / Side::scale(floor, side),
        _ => side.abs(),
    }
}

impl<'a> ContextSource<'a> {
    /// The context values of a chunk in `domain` with this base and side (as
    /// [`super::quant::reconstruct`] takes them); `None` for the value
    /// domains, or when a needed input is missing or of the wrong length.
    pub fn new(
        domain: Domain,
        base: Option<&'a [f32]>,
        side: Option<&'a [f32]>,
        floor: f32,
    ) -> Option<ContextSource<'a>> {
        let base = base?;
        let side_ok = || side.filter(|s| s.len() == base.len());
        // Kinds that read no side see the base in its place: every loop
        // below zips two slices of the chunk's length.
        let (kind, side) = match domain {
            Domain::Value | Domain::ScaledValue => return None,
            Domain::Ratio => (Kind::Base, base),
            Domain::Residual => (Kind::AbsBase, base),
            Domain::ScaledResidual => (Kind::ScaledBase, side_ok()?),
            Domain::PredictedResidual => (Kind::AbsSide, side_ok()?),
        };
        Some(ContextSource {
            kind,
            base,
            side,
            floor,
        })
    }

    pub fn len(&self) -> usize {
        self.base.len()
    }

    pub fn is_empty(&self) -> bool {
        self.base.is_empty()
    }

    /// Every element's context under thresholds `t` (padded).
    fn contexts(&self, t: &[f32; MAX_CONTEXTS - 1]) -> Vec<u8> {
        match self.kind {
            Kind::Base => self.contexts_as::<BASE>(t),
            Kind::AbsBase => self.contexts_as::<ABS_BASE>(t),
            Kind::ScaledBase => self.contexts_as::<SCALED_BASE>(t),
            Kind::AbsSide => self.contexts_as::<ABS_SIDE>(t),
        }
    }

    /// [`ContextSource::contexts`] for kind `K`: a loop over zipped slices
    /// that matches nothing per element, so that it vectorizes.
    #[inline(always)]
    fn contexts_as<const K: u8>(&self, t: &[f32; MAX_CONTEXTS - 1]) -> Vec<u8> {
        let floor = self.floor;
        let values = self.base.iter().zip(self.side);
        values
            .map(|(&b, &s)| context_of(t, value::<K>(floor, b, s)))
            .collect()
    }

    /// Calls `f(i, value)` for every `stride`th element, in order.
    #[inline(always)]
    fn visit(&self, stride: usize, f: impl FnMut(usize, f32)) {
        match self.kind {
            Kind::Base => self.visit_as::<BASE>(stride, f),
            Kind::AbsBase => self.visit_as::<ABS_BASE>(stride, f),
            Kind::ScaledBase => self.visit_as::<SCALED_BASE>(stride, f),
            Kind::AbsSide => self.visit_as::<ABS_SIDE>(stride, f),
        }
    }

    #[inline(always)]
    fn visit_as<const K: u8>(&self, stride: usize, mut f: impl FnMut(usize, f32)) {
        for i in (0..self.base.len()).step_by(stride) {
            f(i, value::<K>(self.floor, self.base[i], self.side[i]));
        }
    }
}

/// Element contexts: how many thresholds each value reaches.
pub fn assign(thresholds: &[f32], source: &ContextSource<'_>) -> Vec<u8> {
    source.contexts(&padded(thresholds))
}

/// A stride that samples about `sample` of `n` elements, odd: tensors'
/// rows are often a power of two long, and an even stride would see only
/// some of their columns.
fn odd_stride(n: usize, sample: usize) -> usize {
    n.div_ceil(sample) | 1
}

/// Thresholds padded to [`MAX_CONTEXTS`] − 1 with NaN, which nothing
/// reaches: one branch-free expression per element.
fn padded(thresholds: &[f32]) -> [f32; MAX_CONTEXTS - 1] {
    let mut t = [f32::NAN; MAX_CONTEXTS - 1];
    t[..thresholds.len()].copy_from_slice(thresholds);
    t
}

#[inline(always)]
fn context_of(t: &[f32; MAX_CONTEXTS - 1], x: f32) -> u8 {
    u8::from(x >= t[0]) + u8::from(x >= t[1]) + u8::from(x >= t[2])
}

/// The thresholds of the contexts to code `symbols` in, when contexts at
/// quantiles of the context values save at least [`MIN_SAVING`] of the stream and
/// [`MIN_SAVING_BYTES`], as estimated on a sample: one threshold (the
/// median) or three (the quartiles), whichever is smaller.
pub fn choose(symbols: &[u8], source: &ContextSource<'_>) -> Option<Vec<f32>> {
    let n = symbols.len();
    if n < MIN_ELEMENTS || source.len() != n {
        return None;
    }
    let mut sorted = Vec::with_capacity(QUANTILE_SAMPLE + 1);
    source.visit(odd_stride(n, QUANTILE_SAMPLE), |_, x| {
        if !x.is_nan() {
            sorted.push(x)
        }
    });
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_unstable_by(f32::total_cmp);
    let quantile = |q: f64| sorted[((sorted.len() - 1) as f64 * q) as usize];
    let mut candidates = [
        vec![quantile(0.5)],
        vec![quantile(0.25), quantile(0.5), quantile(0.75)],
    ];
    candidates.iter_mut().for_each(|t| t.dedup());
    // One pass over the sample counts the symbols of every candidate's
    // contexts (and of none).
    let stride = odd_stride(n, SAMPLE);
    let (t1, t3) = (padded(&candidates[0]), padded(&candidates[1]));
    let mut plain = [0u64; 256];
    let mut counts = [[[0u64; 256]; MAX_CONTEXTS]; 2];
    source.visit(stride, |i, x| {
        let s = symbols[i] as usize;
        plain[s] += 1;
        counts[0][context_of(&t1, x) as usize][s] += 1;
        counts[1][context_of(&t3, x) as usize][s] += 1;
    });
    let scaled = |c: &[u64; 256]| rans::coded_bits(&c.map(|x| x * stride as u64));
    let plain_bits = scaled(&plain);
    let (bits, thresholds) = candidates
        .into_iter()
        .zip(&counts)
        .map(|(t, c)| {
            let streams: f64 = c.iter().take(t.len() + 1).map(scaled).sum();
            (streams + 32.0 * t.len() as f64, t)
        })
        .min_by(|a, b| a.0.total_cmp(&b.0))?;
    let saving = (plain_bits - bits) / 8.0;
    (saving >= MIN_SAVING * plain_bits / 8.0 && saving >= MIN_SAVING_BYTES).then_some(thresholds)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(values: &[f32]) -> ContextSource<'_> {
        ContextSource::new(Domain::Ratio, Some(values), None, 0.0).unwrap()
    }

    #[test]
    fn each_domain_has_its_context_value() {
        let base = [-4.0f32, 1.0];
        let side = [9.0f32, -1.0];
        let values = |d| {
            assign(
                &[0.5, 2.0, 3.5],
                &ContextSource::new(d, Some(&base), Some(&side), 1.0).unwrap(),
            )
        };
        assert_eq!(values(Domain::Ratio), [0, 1]);
        assert_eq!(values(Domain::Residual), [3, 1]);
        // |b| / (√max(side, 0) + floor): 4/4 and 1/1.
        assert_eq!(values(Domain::ScaledResidual), [1, 1]);
        assert_eq!(values(Domain::PredictedResidual), [3, 1]);
        assert!(ContextSource::new(Domain::Value, Some(&base), None, 0.0).is_none());
        assert!(ContextSource::new(Domain::ScaledResidual, Some(&base), None, 0.0).is_none());
        assert!(
            ContextSource::new(
                Domain::PredictedResidual,
                Some(&base),
                Some(&side[..1]),
                0.0
            )
            .is_none()
        );
    }

    #[test]
    fn nan_and_infinite_values_have_contexts() {
        let values = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1.5, 2.0];
        assert_eq!(assign(&[0.0, 1.0, 2.0], &source(&values)), [0, 3, 0, 2, 3]);
    }

    /// Symbols whose spread follows the value: contexts pay and are chosen;
    /// symbols independent of it: none.
    #[test]
    fn contexts_are_chosen_only_where_they_inform() {
        let n = 1 << 17;
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut noise = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as u32
        };
        let values: Vec<f32> = (0..n).map(|i| (i % 4) as f32).collect();
        let informed: Vec<u8> = values
            .iter()
            .map(|&v| {
                let spread = 1 + 20 * v as u32;
                (127 + noise() % spread - spread / 2) as u8
            })
            .collect();
        let thresholds = choose(&informed, &source(&values)).expect("contexts pay");
        assert!(!thresholds.is_empty() && thresholds.len() < MAX_CONTEXTS);
        let blind: Vec<u8> = (0..n).map(|_| (120 + noise() % 15) as u8).collect();
        assert_eq!(choose(&blind, &source(&values)), None);
        assert_eq!(choose(&informed[..1000], &source(&values[..1000])), None);
    }
}
