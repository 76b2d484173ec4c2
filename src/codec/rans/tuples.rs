//! Tuple-coded rANS streams: for streams of a small alphabet that no single
//! symbol dominates enough for runs ([`super::runs`]).
//!
//! Residuals of m and v after a large update are like this: the "no change"
//! symbol has a probability of 0.55–0.8, 2–3 symbols occur, and the stream
//! costs about one bit per symbol. Decoding is bound by the rANS step per
//! symbol. With `k` distinct symbols, `t` consecutive ones fit in one byte
//! when `k^t ≤ 256` (as base-`k` digits of their alphabet indices, the first
//! symbol most significant): one step then decodes `t` symbols (8 for
//! `k = 2`, 5 for `k = 3`, 2 for up to 16). The order-0 entropy of the
//! tuples is at most `t` times that of the symbols (less where neighbours
//! correlate); the 12-bit frequency table is what can cost, since a tuple
//! rarer than 1/4096 is charged 12 bits. The encoder takes the widest tuple
//! whose estimate is within [`super::runs::SIZE_TOLERANCE`] of the plain
//! stream, or none.
//!
//! Layout (after the common `n` u32 and `k` u16 fields, whose state bits are
//! [`super::EXTENDED_CODE`] and whose low 9 bits are [`TUPLES_FLAG`] | the
//! alphabet size `k`): the width `t` u8, the `k` symbols of the alphabet, a
//! plain stream of `⌊n/t⌋` tuple symbols (each below `k^t`), then the
//! `n mod t` last symbols as bytes.

use super::{RansError, Symbols, coded_bits, decode_plain, encode_plain, histogram};

/// Bit 8 of the `k` field in an extended stream: tuples (else runs, whose
/// low byte is the dominant symbol).
pub(super) const TUPLES_FLAG: u16 = 1 << 8;
/// Largest alphabet whose pairs fit in a byte.
const MAX_ALPHABET: usize = 16;
/// Streams shorter than this are coded plainly (a second table is not
/// worth it).
const MIN_LEN: usize = 4096;

/// The widest tuple of an alphabet of `k` symbols that fits in a byte.
fn max_width(k: usize) -> usize {
    let mut width = 1;
    while k.pow(width as u32 + 1) <= 256 {
        width += 1;
    }
    width
}

/// A stream as tuples, ready to write, with the tuples' symbol counts.
pub(super) struct Tuples {
    alphabet: Vec<u8>,
    width: usize,
    tuples: Vec<u8>,
    counts: [u64; 256],
    tail: Vec<u8>,
}

impl Tuples {
    /// The tuple form of `symbols`, as wide as keeps it about as small as
    /// the plain stream, when its alphabet is small enough.
    pub(super) fn worth_it(symbols: &[u8], counts: &[u64; 256]) -> Option<Tuples> {
        let alphabet: Vec<u8> = (0..=255u8).filter(|&s| counts[s as usize] > 0).collect();
        let k = alphabet.len();
        if symbols.len() < MIN_LEN || !(2..=MAX_ALPHABET).contains(&k) {
            return None;
        }
        let mut index = [0u8; 256];
        for (i, &s) in alphabet.iter().enumerate() {
            index[s as usize] = i as u8;
        }
        let budget = coded_bits(counts) * super::runs::SIZE_TOLERANCE;
        (2..=max_width(k)).rev().find_map(|width| {
            let whole = symbols.len() - symbols.len() % width;
            let tail = symbols[whole..].to_vec();
            let tuples = tuples_of(&symbols[..whole], width, k, &index);
            let counts = histogram(&tuples);
            let estimate = coded_bits(&counts) + 8.0 * (k + tail.len() + 1) as f64;
            (estimate <= budget).then(|| Tuples {
                alphabet: alphabet.clone(),
                width,
                tuples,
                counts,
                tail,
            })
        })
    }

    /// Appends the stream, from its `k` field on (the caller wrote `n`).
    pub(super) fn write(self, out: &mut Vec<u8>) {
        let k_field = TUPLES_FLAG
            | (self.alphabet.len() as u16 & 0xFF)
            | (super::EXTENDED_CODE << super::STATES_SHIFT);
        out.extend_from_slice(&k_field.to_le_bytes());
        out.push(self.width as u8);
        out.extend_from_slice(&self.alphabet);
        encode_plain(&self.tuples, &self.counts, out);
        out.extend_from_slice(&self.tail);
    }
}

/// One tuple symbol per `width` symbols (a multiple of `width` of them):
/// their alphabet indices as base-`k` digits, the first most significant.
/// One copy of the loop per width, so that the digits' loop unrolls.
fn tuples_of(symbols: &[u8], width: usize, k: usize, index: &[u8; 256]) -> Vec<u8> {
    fn of<const W: usize>(symbols: &[u8], k: usize, index: &[u8; 256]) -> Vec<u8> {
        let k = k as u32;
        symbols
            .chunks_exact(W)
            .map(|t| {
                t.iter()
                    .fold(0u32, |v, &s| v * k + u32::from(index[usize::from(s)]))
                    as u8
            })
            .collect()
    }
    match width {
        2 => of::<2>(symbols, k, index),
        3 => of::<3>(symbols, k, index),
        4 => of::<4>(symbols, k, index),
        5 => of::<5>(symbols, k, index),
        6 => of::<6>(symbols, k, index),
        7 => of::<7>(symbols, k, index),
        8 => of::<8>(symbols, k, index),
        _ => unreachable!("tuples are 2 to 8 symbols wide"),
    }
}

/// Decodes a tuple-coded stream of `n` symbols whose `k` field was
/// `k_field`; `pos` is just after that field.
pub(super) fn decode(
    bytes: &[u8],
    mut pos: usize,
    n: usize,
    k_field: u16,
) -> Result<(Symbols, usize), RansError> {
    // An alphabet of 16 has a low byte of 16; 0 and 1 are invalid, and
    // the bits between the flag and the state bits are unused.
    let k = (k_field & 0xFF) as usize;
    if !(2..=MAX_ALPHABET).contains(&k) || k_field & super::K_MASK & !0x1FF != 0 {
        return Err(RansError::BadTable);
    }
    let width = *bytes.get(pos).ok_or(RansError::Truncated)? as usize;
    if !(2..=max_width(k)).contains(&width) {
        return Err(RansError::BadTable);
    }
    pos += 1;
    let alphabet = bytes
        .get(pos..pos + k)
        .ok_or(RansError::Truncated)?
        .to_vec();
    pos += k;
    let (tuples, used) = decode_plain(&bytes[pos..], n / width)?;
    pos += used;
    let limit = k.pow(width as u32);
    if tuples
        .iter()
        .fold(false, |bad, &t| bad | (t as usize >= limit))
    {
        return Err(RansError::Corrupt);
    }
    let tail = bytes
        .get(pos..pos + n % width)
        .ok_or(RansError::Truncated)?
        .to_vec();
    if tail.iter().any(|s| !alphabet.contains(s)) {
        return Err(RansError::Corrupt);
    }
    pos += tail.len();
    let symbols = Symbols::Tuples {
        alphabet,
        width,
        tuples,
        tail,
    };
    Ok((symbols, pos))
}

/// The symbols of tuple `value` of `width` over `alphabet`, first first.
pub fn tuple_symbols(alphabet: &[u8], width: usize, value: u8) -> [u8; 8] {
    let k = alphabet.len();
    let mut out = [0u8; 8];
    let mut v = value as usize;
    for slot in out[..width].iter_mut().rev() {
        *slot = alphabet[v % k];
        v /= k;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::{decode, encode};
    use super::*;
    use proptest::prelude::*;

    /// A stream of `k` symbols, "no change" (symbol 40) with probability
    /// about `keep`.
    fn mid_skewed(n: usize, k: u8, keep: f64, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if (x % 1000) as f64 / 1000.0 < keep {
                    40
                } else {
                    41 + ((x >> 20) % u64::from(k - 1)) as u8
                }
            })
            .collect()
    }

    #[test]
    fn small_alphabets_are_tuple_coded_and_stay_small() {
        for (k, keep) in [(2u8, 0.6), (3, 0.7), (9, 0.7), (16, 0.55)] {
            for n in [(1 << 18) + 1, 1 << 20] {
                let symbols = mid_skewed(n, k, keep, u64::from(k));
                let mut plain = Vec::new();
                super::super::encode_interleaved::<4>(&symbols, &histogram(&symbols), &mut plain);
                let mut out = Vec::new();
                encode(&symbols, &mut out);
                let k_field = u16::from_le_bytes([out[4], out[5]]);
                assert_eq!(k_field >> 14, super::super::EXTENDED_CODE, "k={k} n={n}");
                assert_ne!(k_field & TUPLES_FLAG, 0, "k={k} n={n}");
                assert!(
                    out.len() as f64 <= plain.len() as f64 * 1.01,
                    "k={k}: {} vs {}",
                    out.len(),
                    plain.len()
                );
                assert_eq!(decode(&out, n).unwrap(), (symbols, out.len()));
            }
        }
    }

    #[test]
    fn large_alphabets_stay_plain() {
        let symbols = mid_skewed(1 << 16, 20, 0.6, 3);
        assert_eq!(max_width(2), 8);
        assert_eq!(max_width(3), 5);
        assert_eq!(max_width(16), 2);
        assert_eq!(max_width(17), 1);
        let mut out = Vec::new();
        encode(&symbols, &mut out);
        assert_eq!(
            u16::from_le_bytes([out[4], out[5]]) >> 14,
            3,
            "four plain states"
        );
    }

    #[test]
    fn damaged_tuple_streams_are_refused() {
        let symbols = mid_skewed(20_001, 5, 0.6, 9);
        let mut out = Vec::new();
        encode(&symbols, &mut out);
        for cut in [out.len() - 1, out.len() / 2, 8] {
            assert!(decode(&out[..cut], symbols.len()).is_err(), "cut at {cut}");
        }
        super::super::survives_byte_flips(&out, symbols.len(), 0x21, 300);
    }

    proptest! {
        #[test]
        fn tuple_streams_round_trip(
            n in 4096usize..9000,
            k in 2u8..=16,
            keep in 0.3f64..0.8,
            seed in any::<u64>(),
        ) {
            let symbols = mid_skewed(n, k, keep, seed);
            let mut out = Vec::new();
            encode(&symbols, &mut out);
            prop_assert_eq!(decode(&out, n).unwrap(), (symbols, out.len()));
        }
    }
}
