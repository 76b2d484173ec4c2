//! Context-modelled symbol streams: a quantized chunk's symbols split by a
//! context the decoder computes *before* it decodes them, each context's
//! symbols coded as their own rANS stream with their own table.
//!
//! One table per stream codes every element as if it were typical. But the
//! decoder already knows something of each element — its base (the parent's
//! value) and, in the scaled and predicted domains, a side — and the
//! distribution of the symbols depends on it: a v element whose parent v̂ is
//! tiny moves by large factors, one whose v̂ is large hardly moves. Splitting
//! the stream by that knowledge lets each part's table fit its part.
//!
//! The *context value* of element `i` ([`values`]):
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
//! of the values and keeps the split only when it pays ([`choose`]).

use std::borrow::Cow;

use super::quant::{Domain, Side};
use super::rans;

/// Most contexts a chunk's symbols are split into.
pub const MAX_CONTEXTS: usize = 4;

/// Chunks smaller than this are never split: each context's table and
/// states cost ~30 bytes, and a small chunk's savings are smaller.
const MIN_ELEMENTS: usize = 1 << 14;

/// Elements sampled to choose thresholds and to estimate what a split saves.
const SAMPLE: usize = 1 << 18;

/// A split must save this share of the unsplit stream's bytes: decoding a
/// split stream costs a pass over the contexts and a scatter.
const MIN_SAVING: f64 = 0.015;

/// And at least this many bytes.
const MIN_SAVING_BYTES: f64 = 64.0;

/// The context value of every element, for a domain that has one (see the
/// module docs); `None` for the value domains or when a needed input is
/// missing or of the wrong length.
pub fn values<'a>(
    domain: Domain,
    base: Option<&'a [f32]>,
    side: Option<&[f32]>,
    floor: f32,
) -> Option<Cow<'a, [f32]>> {
    let base = base?;
    let side_ok = || side.filter(|s| s.len() == base.len());
    Some(match domain {
        Domain::Value | Domain::ScaledValue => return None,
        Domain::Ratio => Cow::Borrowed(base),
        Domain::Residual => base.iter().map(|b| b.abs()).collect(),
        Domain::ScaledResidual => base
            .iter()
            .zip(side_ok()?)
            .map(|(&b, &s)| b.abs() / Side::scale(floor, s))
            .collect(),
        Domain::PredictedResidual => side_ok()?.iter().map(|p| p.abs()).collect(),
    })
}

/// Element contexts: how many thresholds each value reaches.
pub fn assign(thresholds: &[f32], values: &[f32]) -> Vec<u8> {
    // Padding with NaN keeps one branch-free loop.
    let t = padded(thresholds);
    values.iter().map(|&x| context_of(&t, x)).collect()
}

/// The symbols of each context, in element order.
pub fn split(symbols: &[u8], contexts: &[u8], count: usize) -> Vec<Vec<u8>> {
    let mut streams = vec![Vec::new(); count];
    for (&s, &c) in symbols.iter().zip(contexts) {
        streams[c as usize].push(s);
    }
    streams
}

/// The inverse of [`split`]; an error when the streams' lengths do not match
/// the contexts' counts.
pub fn merge(streams: &[Vec<u8>], contexts: &[u8]) -> Result<Vec<u8>, &'static str> {
    merge_with(streams, contexts.len(), contexts.iter().copied())
}

/// [`merge`] with each element's context computed from its value on the
/// way (one pass, no context vector: the decoder's path).
pub fn merge_by_values(
    streams: &[Vec<u8>],
    thresholds: &[f32],
    values: &[f32],
) -> Result<Vec<u8>, &'static str> {
    let t = padded(thresholds);
    merge_with(
        streams,
        values.len(),
        values.iter().map(|&x| context_of(&t, x)),
    )
}

fn merge_with(
    streams: &[Vec<u8>],
    len: usize,
    contexts: impl Iterator<Item = u8>,
) -> Result<Vec<u8>, &'static str> {
    const MISMATCH: &str = "context streams do not match their contexts' sizes";
    if streams.len() > MAX_CONTEXTS {
        return Err(MISMATCH);
    }
    let mut out = Vec::with_capacity(len);
    let mut rest: [&[u8]; MAX_CONTEXTS] = [&[]; MAX_CONTEXTS];
    for (r, s) in rest.iter_mut().zip(streams) {
        *r = s;
    }
    for c in contexts {
        let stream = &mut rest[c as usize];
        let (&s, tail) = stream.split_first().ok_or(MISMATCH)?;
        *stream = tail;
        out.push(s);
    }
    if rest.iter().any(|r| !r.is_empty()) {
        return Err(MISMATCH);
    }
    Ok(out)
}

/// Thresholds padded to [`MAX_CONTEXTS`] − 1 with NaN, which nothing reaches.
fn padded(thresholds: &[f32]) -> [f32; MAX_CONTEXTS - 1] {
    let mut t = [f32::NAN; MAX_CONTEXTS - 1];
    t[..thresholds.len()].copy_from_slice(thresholds);
    t
}

#[inline(always)]
fn context_of(t: &[f32; MAX_CONTEXTS - 1], x: f32) -> u8 {
    u8::from(x >= t[0]) + u8::from(x >= t[1]) + u8::from(x >= t[2])
}

/// The thresholds to split `symbols` by, when a split by quantiles of
/// `values` saves at least [`MIN_SAVING`] of the stream and
/// [`MIN_SAVING_BYTES`], as estimated on a sample: one threshold (the
/// median) or three (the quartiles), whichever is smaller.
pub fn choose(symbols: &[u8], values: &[f32]) -> Option<Vec<f32>> {
    let n = symbols.len();
    if n < MIN_ELEMENTS || values.len() != n {
        return None;
    }
    let stride = n.div_ceil(SAMPLE);
    let mut sorted: Vec<f32> = values
        .iter()
        .step_by(stride)
        .copied()
        .filter(|x| !x.is_nan())
        .collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_unstable_by(f32::total_cmp);
    let quantile = |q: f64| sorted[((sorted.len() - 1) as f64 * q) as usize];
    let plain = estimated_bits(symbols, values, &[], stride);
    let candidates = [
        vec![quantile(0.5)],
        vec![0.25, 0.5, 0.75].into_iter().map(quantile).collect(),
    ];
    let (bits, thresholds) = candidates
        .into_iter()
        .map(|mut t: Vec<f32>| {
            t.dedup();
            (estimated_bits(symbols, values, &t, stride), t)
        })
        .min_by(|a, b| a.0.total_cmp(&b.0))?;
    let saving = (plain - bits) / 8.0;
    (saving >= MIN_SAVING * plain / 8.0 && saving >= MIN_SAVING_BYTES).then_some(thresholds)
}

/// Estimated bits of the streams a split by `thresholds` writes (empty: the
/// unsplit stream), from every `stride`th element, their thresholds
/// included.
fn estimated_bits(symbols: &[u8], values: &[f32], thresholds: &[f32], stride: usize) -> f64 {
    let sampled: Vec<f32> = values.iter().step_by(stride).copied().collect();
    let contexts = assign(thresholds, &sampled);
    let mut counts = vec![[0u64; 256]; thresholds.len() + 1];
    for (&s, &c) in symbols.iter().step_by(stride).zip(&contexts) {
        counts[c as usize][s as usize] += stride as u64;
    }
    let streams: f64 = counts
        .iter()
        .filter(|c| c.iter().any(|&x| x > 0))
        .map(rans::coded_bits)
        .sum();
    streams + 32.0 * thresholds.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_inverts_split() {
        let symbols: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 11) as u8).collect();
        let values: Vec<f32> = (0..1000u32).map(|i| (i * 13 % 17) as f32).collect();
        for thresholds in [vec![], vec![5.0], vec![2.0, 8.0, 15.0]] {
            let contexts = assign(&thresholds, &values);
            let streams = split(&symbols, &contexts, thresholds.len() + 1);
            assert_eq!(merge(&streams, &contexts).unwrap(), symbols);
            assert_eq!(
                merge_by_values(&streams, &thresholds, &values).unwrap(),
                symbols
            );
        }
    }

    #[test]
    fn nan_and_infinite_values_have_contexts() {
        let t = [0.0, 1.0, 2.0];
        let c = assign(&t, &[f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1.5, 2.0]);
        assert_eq!(c, [0, 3, 0, 2, 3]);
    }

    #[test]
    fn merge_refuses_streams_of_the_wrong_size() {
        let contexts = [0u8, 1, 1, 0];
        assert!(merge(&[vec![1], vec![2, 3]], &contexts).is_err());
        assert!(merge(&[vec![1, 4], vec![2, 3, 5]], &contexts).is_err());
        assert!(merge(&[vec![1, 4]], &contexts).is_err());
    }

    /// Symbols whose spread follows the value: a split pays and is chosen;
    /// symbols independent of it: no split.
    #[test]
    fn a_split_is_chosen_only_where_the_context_informs() {
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
        let thresholds = choose(&informed, &values).expect("a split pays");
        assert!(!thresholds.is_empty() && thresholds.len() < MAX_CONTEXTS);
        let blind: Vec<u8> = (0..n).map(|_| (120 + noise() % 15) as u8).collect();
        assert_eq!(choose(&blind, &values), None);
        assert_eq!(choose(&informed[..1000], &values[..1000]), None);
    }
}
