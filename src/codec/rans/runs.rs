//! Run-coded rANS streams: for symbol streams where one symbol dominates.
//!
//! A lossy residual chunk is mostly "no change": on the 1 GiB benchmark run
//! a residual commit stores 0.3–0.8 bits per element, so one symbol has a
//! probability well above 0.9. The plain coder spends the same table load,
//! multiply and renormalization on each of those near-free symbols as on a
//! rare one, and decoding a chain of residuals was bound by exactly that.
//! Here only the other symbols (the *literals*) pass through rANS, each with
//! the length of the run of dominant symbols before it:
//!
//! - the run length `g` is split into a *bucket* (rANS-coded) and raw extra
//!   bits: `g < 4` is its own bucket; otherwise, with `e = ⌊log2 g⌋`, the
//!   bucket is `2e + (bit e−1 of g)` and the `e − 1` bits below it follow
//!   raw. Two buckets per octave keep the cost within about a percent of
//!   the order-0 entropy of the whole stream on geometric run lengths;
//! - the literals form a second rANS stream;
//! - the dominant symbols after the last literal are implied by `n`.
//!
//! Layout (after the common `n` u32 and `k` u16 fields, whose state bits are
//! [`super::EXTENDED_CODE`], bit 8 clear, and whose low byte is the dominant
//! symbol): extra-bit bytes
//! `b` (u32 LE), the bucket stream and the literal stream (each a plain
//! stream of the same literal count, see the parent module), then `b` bytes
//! of extra bits, least significant bit first.

#[cfg(test)]
use super::histogram;
use super::{RansError, Symbols, coded_bits, decode_plain, encode_plain};

/// Streams shorter than this are coded plainly: the second table and the
/// second set of states would cost more than runs save.
const MIN_LEN: usize = 4096;
/// Runs are considered only when the dominant symbol is at least this
/// frequent; below it, most symbols are literals anyway.
const MIN_DOMINANT_SHARE: f64 = 0.8;
/// Run coding is taken when its estimated size is within this factor of the
/// plain stream's: it decodes several times faster, and that is worth a
/// little size.
pub(super) const SIZE_TOLERANCE: f64 = 1.01;

/// A stream split into runs, ready to write: the two streams with their
/// symbol counts (made during the split, so neither the size estimate nor
/// the writer counts them again).
pub(super) struct Runs {
    dominant: u8,
    buckets: Vec<u8>,
    bucket_counts: [u64; 256],
    literals: Vec<u8>,
    literal_counts: [u64; 256],
    extra: BitWriter,
}

impl Runs {
    /// The run form of `symbols` when it is worth it (see the constants).
    pub(super) fn worth_it(symbols: &[u8], counts: &[u64; 256]) -> Option<Runs> {
        let n = symbols.len();
        let (dominant, &top) = counts.iter().enumerate().max_by_key(|(_, c)| **c)?;
        if n < MIN_LEN || (top as f64) < MIN_DOMINANT_SHARE * n as f64 {
            return None;
        }
        let runs = Runs::split(symbols, counts, dominant as u8);
        (runs.estimated_bits() <= coded_bits(counts) * SIZE_TOLERANCE).then_some(runs)
    }

    /// `counts` is the histogram of `symbols`: the literals' histogram is
    /// it without the dominant symbol, and their number is known up front.
    fn split(symbols: &[u8], counts: &[u64; 256], dominant: u8) -> Runs {
        let literal_count = symbols.len() - counts[usize::from(dominant)] as usize;
        let mut literal_counts = *counts;
        literal_counts[usize::from(dominant)] = 0;
        let mut runs = Runs {
            dominant,
            buckets: Vec::with_capacity(literal_count),
            bucket_counts: [0; 256],
            literals: Vec::with_capacity(literal_count),
            literal_counts,
            extra: BitWriter::default(),
        };
        let mut run_start = 0;
        for_each_literal(symbols, dominant, |at| {
            let (bucket, bits, value) = bucket_of((at - run_start) as u32);
            runs.buckets.push(bucket);
            runs.bucket_counts[usize::from(bucket)] += 1;
            runs.extra.put(value, bits);
            runs.literals.push(symbols[at]);
            run_start = at + 1;
        });
        runs
    }

    fn estimated_bits(&self) -> f64 {
        coded_bits(&self.bucket_counts)
            + coded_bits(&self.literal_counts)
            + self.extra.bits as f64
            + 32.0
    }

    /// Appends the stream, from its `k` field on (the caller wrote `n`).
    pub(super) fn write(self, out: &mut Vec<u8>) {
        let k_field = u16::from(self.dominant) | (super::EXTENDED_CODE << super::STATES_SHIFT);
        out.extend_from_slice(&k_field.to_le_bytes());
        let extra = self.extra.finish();
        out.extend_from_slice(&(extra.len() as u32).to_le_bytes());
        encode_plain(&self.buckets, &self.bucket_counts, out);
        encode_plain(&self.literals, &self.literal_counts, out);
        out.extend_from_slice(&extra);
    }
}

/// Calls `f` with the position of every symbol other than `dominant`, in
/// order. 64 symbols at a time: a mask of the ones that differ, then its
/// set bits. A lossy residual stream has a literal every few symbols, so
/// a filter per byte (what this replaced) took 3 ns per symbol.
#[inline(always)]
fn for_each_literal(symbols: &[u8], dominant: u8, mut f: impl FnMut(usize)) {
    let blocks = symbols.chunks_exact(64);
    let tail = blocks.remainder();
    for (b, block) in blocks.enumerate() {
        let mut mask = differing(block.try_into().expect("64"), dominant);
        while mask != 0 {
            f(b * 64 + mask.trailing_zeros() as usize);
            mask &= mask - 1;
        }
    }
    let tail_start = symbols.len() - tail.len();
    for (i, &s) in tail.iter().enumerate() {
        if s != dominant {
            f(tail_start + i);
        }
    }
}

/// Bit i set where `block[i] != dominant`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn differing(block: &[u8; 64], dominant: u8) -> u64 {
    use std::arch::x86_64::{
        __m128i, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_movemask_epi8, _mm_set1_epi8,
    };
    // SAFETY: SSE2 is part of x86_64's baseline, so these intrinsics run
    // on every CPU this build runs on; each load reads the 16 bytes of
    // `lanes`, unaligned.
    unsafe {
        let splat = _mm_set1_epi8(dominant as i8);
        let mut equal = 0u64;
        for (j, lanes) in block.chunks_exact(16).enumerate() {
            let v = _mm_loadu_si128(lanes.as_ptr().cast::<__m128i>());
            let bits = _mm_movemask_epi8(_mm_cmpeq_epi8(v, splat)) as u32 & 0xFFFF;
            equal |= u64::from(bits) << (16 * j);
        }
        !equal
    }
}

/// Bit i set where `block[i] != dominant`.
#[cfg(not(target_arch = "x86_64"))]
#[inline(always)]
fn differing(block: &[u8; 64], dominant: u8) -> u64 {
    block
        .iter()
        .enumerate()
        .fold(0, |mask, (i, &s)| mask | (u64::from(s != dominant) << i))
}

/// Bucket, extra-bit count and extra-bit value of a run length.
fn bucket_of(run: u32) -> (u8, u32, u64) {
    if run < 4 {
        return (run as u8, 0, 0);
    }
    let e = 31 - run.leading_zeros();
    let half = (run >> (e - 1)) & 1;
    let bits = e - 1;
    (
        (2 * e + half) as u8,
        bits,
        u64::from(run & ((1 << bits) - 1)),
    )
}

/// The run length of a bucket, reading its extra bits from `extra`.
fn run_of(bucket: u8, extra: &mut BitReader<'_>) -> Result<u64, RansError> {
    let bucket = u32::from(bucket);
    if bucket < 4 {
        return Ok(u64::from(bucket));
    }
    let e = bucket / 2;
    if e > 31 {
        return Err(RansError::Corrupt);
    }
    let bits = e - 1;
    let top = u64::from(2 | (bucket & 1)) << bits;
    Ok(top | extra.take(bits)?)
}

/// Decodes a run-coded stream of `n` symbols whose `k` field was
/// `k_field`; `pos` is just after that field. Returns the symbols (as
/// runs: expanding them is the caller's choice) and the bytes consumed.
pub(super) fn decode(
    bytes: &[u8],
    mut pos: usize,
    n: usize,
    k_field: u16,
) -> Result<(Symbols, usize), RansError> {
    if k_field & super::K_MASK > 0xFF {
        return Err(RansError::BadTable);
    }
    let dominant = k_field as u8;
    let u32_at = |at: usize| {
        bytes
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4")) as usize)
            .ok_or(RansError::Truncated)
    };
    let extra_len = u32_at(pos)?;
    pos += 4;
    // The bucket stream's own count field.
    let literal_count = u32_at(pos)?;
    if literal_count > n {
        return Err(RansError::Corrupt);
    }
    let (buckets, used) = decode_plain(&bytes[pos..], literal_count)?;
    pos += used;
    let (literals, used) = decode_plain(&bytes[pos..], literal_count)?;
    pos += used;
    let extra_bytes = bytes
        .get(pos..pos + extra_len)
        .ok_or(RansError::Truncated)?;
    pos += extra_len;
    let mut extra = BitReader::new(extra_bytes);
    let mut positions = Vec::with_capacity(literal_count);
    let mut at = 0u64;
    for (&bucket, &literal) in buckets.iter().zip(&literals) {
        at += run_of(bucket, &mut extra)?;
        if at >= n as u64 || literal == dominant {
            return Err(RansError::Corrupt);
        }
        positions.push(at as u32);
        at += 1;
    }
    // The writer pads to a whole byte, and no further.
    if extra.bytes_used() != extra_len {
        return Err(RansError::Corrupt);
    }
    let symbols = Symbols::Runs {
        len: n,
        dominant,
        positions,
        literals,
    };
    Ok((symbols, pos))
}

/// Bits packed least significant first.
#[derive(Default)]
struct BitWriter {
    bytes: Vec<u8>,
    acc: u64,
    filled: u32,
    bits: u64,
}

impl BitWriter {
    /// Appends the low `bits` (≤ 32) bits of `value`. Whole 32-bit words
    /// leave at once (fewer than 32 bits wait in `acc`): the same bytes as
    /// one at a time, with one branch per call instead of a loop.
    #[inline(always)]
    fn put(&mut self, value: u64, bits: u32) {
        debug_assert!(bits <= 32 && value < 1 << bits.max(1));
        self.acc |= value << self.filled;
        self.filled += bits;
        self.bits += u64::from(bits);
        if self.filled >= 32 {
            self.bytes
                .extend_from_slice(&(self.acc as u32).to_le_bytes());
            self.acc >>= 32;
            self.filled -= 32;
        }
    }

    fn finish(mut self) -> Vec<u8> {
        let bytes = self.filled.div_ceil(8) as usize;
        self.bytes
            .extend_from_slice(&self.acc.to_le_bytes()[..bytes]);
        self.bytes
    }
}

struct BitReader<'a> {
    bytes: &'a [u8],
    next: usize,
    acc: u64,
    filled: u32,
}

impl<'a> BitReader<'a> {
    fn new(bytes: &'a [u8]) -> BitReader<'a> {
        BitReader {
            bytes,
            next: 0,
            acc: 0,
            filled: 0,
        }
    }

    /// The next `bits` (≤ 32) bits.
    fn take(&mut self, bits: u32) -> Result<u64, RansError> {
        while self.filled < bits {
            let byte = *self.bytes.get(self.next).ok_or(RansError::Truncated)?;
            self.acc |= u64::from(byte) << self.filled;
            self.next += 1;
            self.filled += 8;
        }
        let value = self.acc & ((1u64 << bits) - 1);
        self.acc >>= bits;
        self.filled -= bits;
        Ok(value)
    }

    fn bytes_used(&self) -> usize {
        self.next
    }
}

#[cfg(test)]
mod tests {
    use super::super::{decode, encode, entropy_bits_of};
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn buckets_cover_every_run_length() {
        for run in (0..5000).chain([u32::MAX, u32::MAX - 1, 1 << 31, (1 << 31) + 7]) {
            let (bucket, bits, value) = bucket_of(run);
            let mut w = BitWriter::default();
            w.put(value, bits);
            let bytes = w.finish();
            let mut r = BitReader::new(&bytes);
            assert_eq!(run_of(bucket, &mut r).unwrap(), u64::from(run), "run {run}");
        }
    }

    /// Symbols where `dominant` has probability about `1 − 1/every`.
    fn sparse(n: usize, every: u64, seed: u64) -> Vec<u8> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let r = x >> 33;
                if r.is_multiple_of(every) {
                    (r >> 20) as u8 % 9 + 1
                } else {
                    0
                }
            })
            .collect()
    }

    #[test]
    fn sparse_streams_are_run_coded_and_near_their_entropy() {
        for every in [6u64, 30, 300, 30_000] {
            let symbols = sparse(1 << 20, every, every);
            let mut out = Vec::new();
            encode(&symbols, &mut out);
            let k_field = u16::from_le_bytes([out[4], out[5]]);
            assert_eq!(
                k_field >> 14,
                super::super::EXTENDED_CODE,
                "1 in {every} is run-coded"
            );
            assert_eq!(
                decode(&out, symbols.len()).unwrap(),
                (symbols.clone(), out.len())
            );
            let entropy = entropy_bits_of(&histogram(&symbols)) * symbols.len() as f64 / 8.0;
            assert!(
                out.len() as f64 <= entropy * 1.015 + 120.0,
                "1 in {every}: {} bytes, entropy {entropy:.0}",
                out.len()
            );
        }
    }

    #[test]
    fn dense_and_short_streams_stay_plain() {
        for symbols in [sparse(1 << 16, 2, 1), sparse(1000, 100, 2)] {
            let mut out = Vec::new();
            encode(&symbols, &mut out);
            assert_ne!(
                u16::from_le_bytes([out[4], out[5]]) >> 14,
                super::super::EXTENDED_CODE
            );
        }
    }

    #[test]
    fn damaged_run_streams_are_refused() {
        let symbols = sparse(50_000, 40, 7);
        let mut out = Vec::new();
        encode(&symbols, &mut out);
        for cut in [out.len() - 1, out.len() / 2, 12] {
            assert!(decode(&out[..cut], symbols.len()).is_err(), "cut at {cut}");
        }
        // Claiming fewer symbols than the runs reach.
        let mut short = out.clone();
        short[..4].copy_from_slice(&1000u32.to_le_bytes());
        assert!(decode(&short, 1000).is_err());
        // Every single-byte change either fails or decodes to other symbols;
        // none may panic.
        super::super::survives_byte_flips(&out, symbols.len(), 0x5a, 400);
    }

    /// The split, made 64 symbols at a time, against one made a symbol at
    /// a time with one bit written per call: same buckets, literals, extra
    /// bytes and counts.
    fn split_matches_a_plain_loop(symbols: &[u8], dominant: u8) {
        let counts = histogram(symbols);
        let runs = Runs::split(symbols, &counts, dominant);
        let (mut buckets, mut literals, mut bits) = (Vec::new(), Vec::new(), Vec::new());
        let mut run_start = 0;
        for (at, &s) in symbols.iter().enumerate() {
            if s != dominant {
                let (bucket, n, value) = bucket_of((at - run_start) as u32);
                buckets.push(bucket);
                bits.extend((0..n).map(|i| (value >> i) & 1 == 1));
                literals.push(s);
                run_start = at + 1;
            }
        }
        let extra: Vec<u8> = bits
            .chunks(8)
            .map(|byte| {
                byte.iter()
                    .rev()
                    .fold(0u8, |b, &bit| (b << 1) | u8::from(bit))
            })
            .collect();
        assert_eq!(runs.buckets, buckets);
        assert_eq!(runs.literals, literals);
        assert_eq!(runs.bucket_counts, histogram(&buckets));
        assert_eq!(runs.literal_counts, histogram(&literals));
        assert_eq!(runs.extra.bits, bits.len() as u64);
        assert_eq!(runs.extra.finish(), extra);
    }

    proptest! {
        #[test]
        fn run_streams_round_trip(
            runs in proptest::collection::vec((0u32..3000, 1u8..=255), 0..200),
            dominant in any::<u8>(),
            tail in 0usize..5000,
        ) {
            let mut symbols = Vec::new();
            for (run, literal) in runs {
                symbols.extend(std::iter::repeat_n(dominant, run as usize));
                symbols.push(if literal == dominant { literal.wrapping_add(1) } else { literal });
            }
            symbols.extend(std::iter::repeat_n(dominant, tail));
            let mut out = Vec::new();
            encode(&symbols, &mut out);
            prop_assert_eq!(decode(&out, symbols.len()).unwrap(), (symbols, out.len()));
        }

        #[test]
        fn the_split_matches_a_plain_loop(
            symbols in proptest::collection::vec(
                prop_oneof![8 => Just(7u8), 1 => any::<u8>()], 0..3000),
            dominant in prop_oneof![Just(7u8), any::<u8>()],
        ) {
            split_matches_a_plain_loop(&symbols, dominant);
        }
    }
}
