//! Pair-coded rANS streams: for streams of a small alphabet that no single
//! symbol dominates enough for runs ([`super::runs`]).
//!
//! Residuals of m and v after a large update are like this: the "no change"
//! symbol has a probability of 0.55–0.8, and the stream about one bit per
//! symbol. Decoding is bound by the rANS step per symbol. With at most 15
//! distinct symbols, two consecutive symbols fit in one byte (`a · k + b`
//! over the alphabet's indices), so one step decodes two symbols. The order-0
//! entropy of the pairs is at most twice that of the symbols (less where
//! neighbours correlate); the 12-bit frequency table is what can cost a
//! little, and the encoder takes pairs only when its estimate says they are
//! within [`super::runs::SIZE_TOLERANCE`] of the plain stream.
//!
//! Layout (after the common `n` u32 and `k` u16 fields, whose state bits are
//! [`super::EXTENDED_CODE`] and whose low 9 bits are [`PAIRS_FLAG`] | the
//! alphabet size `k`): the `k` symbols of the alphabet, a plain stream of
//! `⌊n/2⌋` pair symbols, then the last symbol as a byte when `n` is odd.

use super::{RansError, Symbols, coded_bits, decode_plain, encode_plain, histogram};

/// Bit 8 of the `k` field in an extended stream: pairs (else runs, whose
/// low byte is the dominant symbol).
pub(super) const PAIRS_FLAG: u16 = 1 << 8;
/// Largest alphabet whose pairs fit in a byte.
const MAX_ALPHABET: usize = 15;
/// Streams shorter than this are coded plainly (a second table is not
/// worth it).
const MIN_LEN: usize = 4096;

/// A stream as pairs, ready to write.
pub(super) struct Pairs {
    alphabet: Vec<u8>,
    pairs: Vec<u8>,
    tail: Option<u8>,
}

impl Pairs {
    /// The pair form of `symbols` when its alphabet is small enough and it
    /// is about as small as the plain stream.
    pub(super) fn worth_it(symbols: &[u8], counts: &[u64; 256]) -> Option<Pairs> {
        let alphabet: Vec<u8> = (0..=255u8).filter(|&s| counts[s as usize] > 0).collect();
        if symbols.len() < MIN_LEN || alphabet.len() > MAX_ALPHABET || alphabet.len() < 2 {
            return None;
        }
        let mut index = [0u8; 256];
        for (i, &s) in alphabet.iter().enumerate() {
            index[s as usize] = i as u8;
        }
        let k = alphabet.len() as u8;
        let whole = symbols.chunks_exact(2);
        let tail = whole.remainder().first().copied();
        let pairs: Vec<u8> = whole
            .map(|p| index[p[0] as usize] * k + index[p[1] as usize])
            .collect();
        let tail_bits = if tail.is_some() { 8.0 } else { 0.0 };
        let estimate = coded_bits(&histogram(&pairs)) + 8.0 * alphabet.len() as f64 + tail_bits;
        (estimate <= coded_bits(counts) * super::runs::SIZE_TOLERANCE).then_some(Pairs {
            alphabet,
            pairs,
            tail,
        })
    }

    /// Appends the stream, from its `k` field on (the caller wrote `n`).
    pub(super) fn write(self, out: &mut Vec<u8>) {
        let k_field =
            PAIRS_FLAG | self.alphabet.len() as u16 | (super::EXTENDED_CODE << super::STATES_SHIFT);
        out.extend_from_slice(&k_field.to_le_bytes());
        out.extend_from_slice(&self.alphabet);
        encode_plain(&self.pairs, out);
        out.extend(self.tail);
    }
}

/// Decodes a pair-coded stream of `n` symbols whose `k` field was
/// `k_field`; `pos` is just after that field.
pub(super) fn decode(
    bytes: &[u8],
    mut pos: usize,
    n: usize,
    k_field: u16,
) -> Result<(Symbols, usize), RansError> {
    let k = (k_field & 0xFF) as usize;
    if !(2..=MAX_ALPHABET).contains(&k) {
        return Err(RansError::BadTable);
    }
    let alphabet = bytes.get(pos..pos + k).ok_or(RansError::Truncated)?;
    pos += k;
    let (pairs, used) = decode_plain(&bytes[pos..], n / 2)?;
    pos += used;
    if pairs
        .iter()
        .fold(false, |bad, &p| bad | (p as usize >= k * k))
    {
        return Err(RansError::Corrupt);
    }
    let tail = if n % 2 == 1 {
        let last = *bytes.get(pos).ok_or(RansError::Truncated)?;
        if !alphabet.contains(&last) {
            return Err(RansError::Corrupt);
        }
        pos += 1;
        Some(last)
    } else {
        None
    };
    let symbols = Symbols::Pairs {
        alphabet: alphabet.to_vec(),
        pairs,
        tail,
    };
    Ok((symbols, pos))
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
    fn small_alphabets_are_pair_coded_and_stay_small() {
        for (k, keep) in [(3u8, 0.6), (9, 0.7), (15, 0.55)] {
            for n in [(1 << 18) + 1, 1 << 20] {
                let symbols = mid_skewed(n, k, keep, u64::from(k));
                let mut plain = Vec::new();
                super::super::encode_interleaved::<4>(&symbols, &histogram(&symbols), &mut plain);
                let mut out = Vec::new();
                encode(&symbols, &mut out);
                let k_field = u16::from_le_bytes([out[4], out[5]]);
                assert_eq!(k_field >> 14, super::super::EXTENDED_CODE, "k={k} n={n}");
                assert_ne!(k_field & PAIRS_FLAG, 0, "k={k} n={n}");
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
        let mut out = Vec::new();
        encode(&symbols, &mut out);
        assert_eq!(
            u16::from_le_bytes([out[4], out[5]]) >> 14,
            3,
            "four plain states"
        );
    }

    #[test]
    fn damaged_pair_streams_are_refused() {
        let symbols = mid_skewed(20_001, 5, 0.6, 9);
        let mut out = Vec::new();
        encode(&symbols, &mut out);
        for cut in [out.len() - 1, out.len() / 2, 8] {
            assert!(decode(&out[..cut], symbols.len()).is_err(), "cut at {cut}");
        }
        for at in 0..out.len().min(300) {
            let mut bad = out.clone();
            bad[at] ^= 0x21;
            let _ = decode(&bad, symbols.len());
        }
    }

    proptest! {
        #[test]
        fn pair_streams_round_trip(
            n in 4096usize..9000,
            k in 2u8..=15,
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
