//! Order-0 range asymmetric numeral system (rANS) coder for byte symbols.
//!
//! The lossy codecs produce one small symbol per element (a quantization
//! level), heavily skewed towards "no change". A static order-0 model costs
//! within a fraction of a percent of the empirical entropy of such a stream,
//! where zstd's Huffman stage cannot go below one bit per symbol.
//!
//! Stream layout: `n` (u32 LE, symbol count), `k` (u16 LE: distinct symbols
//! in bits 0–13; bits 14–15 the number of interleaved states: 0 = one,
//! 2 = two, 3 = four), `k` × (symbol u8, frequency u16 LE) with frequencies
//! summing to 4096, then the rANS bytes: the final encoder states as u32
//! big-endian (state 0 first) followed by the renormalization bytes in
//! decoding order.
//!
//! This build writes four interleaved states (symbol `i` goes through state
//! `i mod 4`, as in F. Giesen's interleaved rans_byte): one state is a chain
//! of dependent operations per symbol (table load, multiply, shift), and
//! independent chains keep the core busy while each waits. Two states, with
//! branchless renormalization, took a 4 GiB lossy commit from 15.3–18.2 s to
//! 12.5–13.6 s; four made decoding about twice as fast again
//! (docs/benchmarks.md). Streams of one and two states, written by earlier
//! builds, still decode; builds before the four-state streams refuse them
//! with "rANS frequency table is invalid".

pub mod contexts;
mod tuples;
pub use tuples::tuple_symbols;
mod runs;

const SCALE_BITS: u32 = 12;
const TOTAL: u32 = 1 << SCALE_BITS;
/// Lower bound of the normalized state interval [L, 256·L).
const LOW: u32 = 1 << 23;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RansError {
    #[error("rANS stream is truncated")]
    Truncated,
    #[error("rANS frequency table is invalid")]
    BadTable,
    #[error("rANS stream is corrupt")]
    Corrupt,
    #[error("rANS stream holds {found} symbols, {expected} expected")]
    Count { found: usize, expected: usize },
}

/// Frequencies scaled to sum to `TOTAL`, every present symbol at least 1,
/// from the symbol counts of a stream of `total` symbols.
fn normalized_frequencies(counts: &[u64; 256], total: u64) -> [u32; 256] {
    let mut freqs = [0u32; 256];
    if total == 0 {
        return freqs;
    }
    for (f, &c) in freqs.iter_mut().zip(counts) {
        if c > 0 {
            *f = ((c * TOTAL as u64 / total) as u32).max(1);
        }
    }
    let mut sum: u32 = freqs.iter().sum();
    // Rounding leaves the sum a little off; settle it on the most frequent
    // symbols, where a unit matters least.
    while sum != TOTAL {
        let (index, _) = freqs
            .iter()
            .enumerate()
            .filter(|(_, f)| sum < TOTAL || **f > 1)
            .max_by_key(|(i, f)| (**f, std::cmp::Reverse(*i)))
            .expect("a present symbol");
        if sum < TOTAL {
            freqs[index] += 1;
            sum += 1;
        } else {
            freqs[index] -= 1;
            sum -= 1;
        }
    }
    freqs
}

/// Symbol counts. Eight tables, summed at the end: the streams are
/// dominated by one symbol, and with one table every increment would wait
/// for the previous one to the same counter. With four, the increments of
/// one table's dominant counter still formed a chain through memory, one
/// link per four symbols: 1.05 ns a symbol on a stream 95% one symbol,
/// against 0.37 with eight (sixteen: 0.58; 2026-11-30, a timing loop over
/// 1M symbols).
pub fn histogram(symbols: &[u8]) -> [u64; 256] {
    const TABLES: usize = 8;
    let mut tables = [[0u32; 256]; TABLES];
    let groups = symbols.chunks_exact(TABLES);
    let tail = groups.remainder();
    for group in groups {
        for (table, &s) in tables.iter_mut().zip(group) {
            table[s as usize] += 1;
        }
    }
    for &s in tail {
        tables[0][s as usize] += 1;
    }
    let mut counts = [0u64; 256];
    for table in &tables {
        for (c, &t) in counts.iter_mut().zip(table) {
            *c += t as u64;
        }
    }
    counts
}

fn cumulative(freqs: &[u32; 256]) -> [u32; 257] {
    let mut cum = [0u32; 257];
    for i in 0..256 {
        cum[i + 1] = cum[i] + freqs[i];
    }
    cum
}

/// Per-symbol encoder constants. The state update
/// `x' = (x / f) · 4096 + x mod f + start` is computed as
/// `x + bias + q · (4096 − f)` with `q = x / f` from a multiply by a
/// precomputed reciprocal instead of a division (exact for x < 2^31; the
/// technique of F. Giesen's rans_byte). Frequency 1 uses the reciprocal
/// 2^32 − 1, which yields `q = x − 1`, folded into the bias.
struct EncSymbol {
    limit: u32,
    rcp_freq: u32,
    rcp_shift: u32,
    bias: u32,
    cmpl_freq: u32,
}

impl EncSymbol {
    fn new(start: u32, freq: u32) -> EncSymbol {
        let limit = ((LOW >> SCALE_BITS) << 8).wrapping_mul(freq);
        let cmpl_freq = TOTAL - freq;
        if freq < 2 {
            return EncSymbol {
                limit,
                rcp_freq: u32::MAX,
                rcp_shift: 0,
                bias: start + TOTAL - 1,
                cmpl_freq,
            };
        }
        let shift = 32 - (freq - 1).leading_zeros(); // ceil(log2(freq))
        EncSymbol {
            limit,
            rcp_freq: (1u64 << (shift + 31)).div_ceil(freq as u64) as u32,
            rcp_shift: shift - 1,
            bias: start,
            cmpl_freq,
        }
    }

    fn step(&self, state: u32) -> u32 {
        let q = (((state as u64 * self.rcp_freq as u64) >> 32) as u32) >> self.rcp_shift;
        state + self.bias + q * self.cmpl_freq
    }
}

/// Bits 14–15 of the `k` field: how many interleaved states the stream
/// has (0 = one, 2 = two, 3 = four), or [`EXTENDED_CODE`].
const STATES_SHIFT: u16 = 14;
/// State bits of an extended stream: run-coded ([`runs`]) or tuple-coded
/// ([`tuples`]), told apart by bit 8 of the `k` field; both hold plain
/// streams inside.
const EXTENDED_CODE: u16 = 1;
/// The symbol-count bits of the `k` field.
const K_MASK: u16 = (1 << STATES_SHIFT) - 1;

/// States this build writes. Four independent dependency chains keep a
/// core's multipliers and load ports busy where two left it waiting on
/// table loads; decoding a 3 GiB keyframe went from 4.6 ns to 2.0 ns per
/// symbol (docs/benchmarks.md).
const STATES: usize = 4;

/// Encodes `symbols`, appending to `out` (four interleaved states).
pub fn encode(symbols: &[u8], out: &mut Vec<u8>) {
    encode_counted(symbols, &histogram(symbols), out);
}

/// [`encode`] for a caller that already has the [`histogram`] of `symbols`.
/// A stream dominated by one symbol is run-coded ([`runs`]), one of a small
/// alphabet tuple-coded ([`tuples`]), when that is about as small: they
/// decode several times faster.
pub fn encode_counted(symbols: &[u8], counts: &[u64; 256], out: &mut Vec<u8>) {
    if let Some(runs) = runs::Runs::worth_it(symbols, counts) {
        out.extend_from_slice(&(symbols.len() as u32).to_le_bytes());
        runs.write(out);
    } else if let Some(tuples) = tuples::Tuples::worth_it(symbols, counts) {
        out.extend_from_slice(&(symbols.len() as u32).to_le_bytes());
        tuples.write(out);
    } else {
        encode_interleaved::<STATES>(symbols, counts, out);
    }
}

/// A stream that is never extended (the parts of an extended one), for a
/// caller that has the [`histogram`] of `symbols`.
fn encode_plain(symbols: &[u8], counts: &[u64; 256], out: &mut Vec<u8>) {
    encode_interleaved::<STATES>(symbols, counts, out);
}

/// The `k` field's state bits for `L` states.
const fn states_code(states: usize) -> u16 {
    match states {
        1 => 0,
        2 => 2,
        4 => 3,
        _ => panic!("1, 2 or 4 states"),
    }
}

/// Writes the frequency table of a stream of `states` states with these
/// symbol counts (its `k` field and entries) and returns each symbol's
/// encoder constants.
fn write_table(counts: &[u64; 256], states: usize, out: &mut Vec<u8>) -> Vec<EncSymbol> {
    let freqs = normalized_frequencies(counts, counts.iter().sum());
    let present: Vec<usize> = (0..256).filter(|&s| freqs[s] > 0).collect();
    let k_field = present.len() as u16 | (states_code(states) << STATES_SHIFT);
    out.extend_from_slice(&k_field.to_le_bytes());
    for &s in &present {
        out.push(s as u8);
        out.extend_from_slice(&(freqs[s] as u16).to_le_bytes());
    }
    let cum = cumulative(&freqs);
    (0..256).map(|s| EncSymbol::new(cum[s], freqs[s])).collect()
}

/// Symbol `i` goes through state `i mod L`.
fn encode_interleaved<const L: usize>(symbols: &[u8], counts: &[u64; 256], out: &mut Vec<u8>) {
    debug_assert_eq!(counts.iter().sum::<u64>(), symbols.len() as u64);
    out.extend_from_slice(&(symbols.len() as u32).to_le_bytes());
    let coders = write_table(counts, L, out);
    // rANS encodes back to front; bytes are collected reversed, into a
    // buffer kept at least 2 bytes per symbol ahead of what is written.
    let mut reversed = vec![0u8; 2 * L + 4];
    let mut len = 0;
    let mut states = [LOW; L];
    let full = symbols.len() - symbols.len() % L;
    for (j, &s) in symbols[full..].iter().enumerate().rev() {
        put(&mut states[j], &coders[s as usize], &mut reversed, &mut len);
    }
    const BLOCK: usize = 1 << 14;
    for block in symbols[..full].rchunks(BLOCK) {
        let needed = len + 2 * block.len() + 4;
        if reversed.len() < needed {
            reversed.resize(needed.max(2 * reversed.len()), 0);
        }
        for group in block.chunks_exact(L).rev() {
            for j in (0..L).rev() {
                put(
                    &mut states[j],
                    &coders[group[j] as usize],
                    &mut reversed,
                    &mut len,
                );
            }
        }
    }
    reversed.truncate(len);
    for state in states.iter().rev() {
        reversed.extend_from_slice(&state.to_le_bytes());
    }
    out.extend(reversed.iter().rev());
}

/// Encodes one symbol into `state`, first moving the state's low bytes out to
/// `reversed[len..]` until it is below the symbol's limit. Without a loop or
/// a branch: how many bytes go (0, 1 or 2: a state is below 2^31 and a limit
/// at least 2^19) is two comparisons, and all four state bytes are written
/// (`reversed` has room), of which `len` keeps that many. The renormalization
/// branch of the plain loop is taken at random, at a misprediction each time.
#[inline(always)]
fn put(state: &mut u32, coder: &EncSymbol, reversed: &mut [u8], len: &mut usize) {
    let x = *state;
    let bytes = u32::from(x >= coder.limit) + u32::from(x as u64 >= (coder.limit as u64) << 8);
    reversed[*len..*len + 4].copy_from_slice(&x.to_le_bytes());
    *len += bytes as usize;
    *state = coder.step(x >> (8 * bytes));
}

/// Decoded symbols, as the stream held them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Symbols {
    /// One byte per symbol.
    Dense(Vec<u8>),
    /// `len` symbols, all `dominant` except `literals[j]` at `positions[j]`
    /// (increasing, each below `len`, no literal equal to `dominant`).
    Runs {
        len: usize,
        dominant: u8,
        positions: Vec<u32>,
        literals: Vec<u8>,
    },
    /// Symbols `t·i .. t·i + t` are the digits of `tuples[i]` in base
    /// `k = alphabet.len()` (most significant first) mapped through
    /// `alphabet`, with `t = width`; then the `tail` symbols.
    Tuples {
        alphabet: Vec<u8>,
        width: usize,
        tuples: Vec<u8>,
        tail: Vec<u8>,
    },
}

impl Symbols {
    pub fn len(&self) -> usize {
        match self {
            Symbols::Dense(s) => s.len(),
            Symbols::Runs { len, .. } => *len,
            Symbols::Tuples {
                width,
                tuples,
                tail,
                ..
            } => width * tuples.len() + tail.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// One byte per symbol.
    pub fn expand(self) -> Vec<u8> {
        match self {
            Symbols::Dense(s) => s,
            Symbols::Runs {
                len,
                dominant,
                positions,
                literals,
            } => {
                let mut out = vec![dominant; len];
                for (&at, &s) in positions.iter().zip(&literals) {
                    out[at as usize] = s;
                }
                out
            }
            Symbols::Tuples {
                alphabet,
                width,
                tuples,
                tail,
            } => {
                let mut out = Vec::with_capacity(width * tuples.len() + tail.len());
                for &t in &tuples {
                    out.extend_from_slice(&tuple_symbols(&alphabet, width, t)[..width]);
                }
                out.extend_from_slice(&tail);
                out
            }
        }
    }
}

/// Decodes a stream made by [`encode`] (or by an earlier build's one-state
/// encoder) that must hold `expected` symbols; returns the symbols and the
/// number of bytes consumed.
pub fn decode(bytes: &[u8], expected: usize) -> Result<(Vec<u8>, usize), RansError> {
    let (symbols, used) = decode_symbols(bytes, expected)?;
    Ok((symbols.expand(), used))
}

/// [`decode`], leaving a run-coded stream as runs.
pub fn decode_symbols(bytes: &[u8], expected: usize) -> Result<(Symbols, usize), RansError> {
    decode_stream(bytes, expected, true)
}

/// [`decode`] of a stream that may not be extended (the parts of one).
fn decode_plain(bytes: &[u8], expected: usize) -> Result<(Vec<u8>, usize), RansError> {
    let (symbols, used) = decode_stream(bytes, expected, false)?;
    Ok((symbols.expand(), used))
}

fn decode_stream(
    bytes: &[u8],
    expected: usize,
    runs_allowed: bool,
) -> Result<(Symbols, usize), RansError> {
    let take = |at: usize, n: usize| bytes.get(at..at + n).ok_or(RansError::Truncated);
    let n = u32::from_le_bytes(take(0, 4)?.try_into().expect("4")) as usize;
    if n != expected {
        return Err(RansError::Count { found: n, expected });
    }
    let k_field = u16::from_le_bytes(take(4, 2)?.try_into().expect("2"));
    if runs_allowed && k_field >> STATES_SHIFT == EXTENDED_CODE {
        return if k_field & tuples::TUPLES_FLAG != 0 {
            tuples::decode(bytes, 6, n, k_field)
        } else {
            runs::decode(bytes, 6, n, k_field)
        };
    }
    let k = (k_field & K_MASK) as usize;
    if k > 256 {
        return Err(RansError::BadTable);
    }
    let mut pos = 6;
    let mut freqs = [0u32; 256];
    for _ in 0..k {
        let entry = take(pos, 3)?;
        freqs[entry[0] as usize] = u16::from_le_bytes([entry[1], entry[2]]) as u32;
        pos += 3;
    }
    let model = Model::new(&freqs, n)?;
    let decoder = Decoder { bytes, pos };
    let (symbols, used) = match k_field >> STATES_SHIFT {
        0 => decoder.run::<1>(&model, n),
        2 => decoder.run::<2>(&model, n),
        3 => decoder.run::<4>(&model, n),
        _ => Err(RansError::BadTable),
    }?;
    Ok((Symbols::Dense(symbols), used))
}

/// The decoding table of a frequency table: for each of the 4096 slots,
/// its symbol and the two constants of the state update, packed so that a
/// symbol costs one table load.
struct Model {
    slots: Vec<Slot>,
}

/// A slot's symbol and state-update constants in one word: bits 0–7 the
/// symbol, 8–19 `freq − 1`, 20–31 `slot − cum[symbol]` (the update is
/// `freq · (x >> 12) + offset`). One 4-byte load per symbol, from a 16 KiB
/// table that stays in L1.
#[derive(Clone, Copy, Default)]
struct Slot(u32);

impl Slot {
    fn new(symbol: u8, freq: u32, offset: u32) -> Slot {
        Slot(u32::from(symbol) | ((freq - 1) << 8) | (offset << 20))
    }

    #[inline(always)]
    fn symbol(self) -> u8 {
        self.0 as u8
    }

    #[inline(always)]
    fn update(self, state: u32) -> u32 {
        let freq = ((self.0 >> 8) & 0xFFF) + 1;
        freq * (state >> SCALE_BITS) + (self.0 >> 20)
    }
}

impl Model {
    fn new(freqs: &[u32; 256], n: usize) -> Result<Model, RansError> {
        let cum = cumulative(freqs);
        // An empty stream has no table to check.
        if n > 0 && cum[256] != TOTAL {
            return Err(RansError::BadTable);
        }
        let mut slots = Vec::new();
        if n > 0 {
            slots.resize(TOTAL as usize, Slot::default());
            for s in 0..256 {
                for slot in cum[s]..cum[s + 1] {
                    slots[slot as usize] = Slot::new(s as u8, freqs[s], slot - cum[s]);
                }
            }
        }
        Ok(Model { slots })
    }
}

/// The state after taking in as many of the next two stream bytes as `x`
/// needs: x ≥ 2^11 (freq ≥ 1, state ≥ 2^23), so 0, 1 or 2. Selected, not
/// branched on (x is random) and not shifted by a variable amount (which
/// would serialize on the shift-count register): the decoding twin of `put`.
#[inline(always)]
fn renormalized(x: u32, b0: u8, b1: u8) -> u32 {
    let one = (x << 8) | u32::from(b0);
    let two = (x << 16) | (u32::from(b0) << 8) | u32::from(b1);
    if x < LOW >> 8 {
        two
    } else if x < LOW {
        one
    } else {
        x
    }
}

/// The renormalization bytes being read.
struct Decoder<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Decoder<'_> {
    fn state(&mut self) -> Result<u32, RansError> {
        let raw = self
            .bytes
            .get(self.pos..self.pos + 4)
            .ok_or(RansError::Truncated)?;
        self.pos += 4;
        let state = u32::from_be_bytes(raw.try_into().expect("4"));
        // Every encoder state lies in [LOW, 256·LOW).
        if !(LOW..LOW << 8).contains(&state) {
            return Err(RansError::Corrupt);
        }
        Ok(state)
    }

    fn symbol(&mut self, model: &Model, state: &mut u32) -> Result<u8, RansError> {
        let slot = model.slots[(*state & (TOTAL - 1)) as usize];
        let x = slot.update(*state);
        let needed = u32::from(x < LOW) + u32::from(x < LOW >> 8);
        *state = match self.bytes.get(self.pos..self.pos + 2) {
            Some(two) => renormalized(x, two[0], two[1]),
            None => self.renormalize_at_end(x)?,
        };
        self.pos += needed as usize;
        Ok(slot.symbol())
    }

    /// Renormalization within the last two bytes of the stream, byte by
    /// byte; advances `pos` by less than the caller adds back.
    fn renormalize_at_end(&mut self, mut x: u32) -> Result<u32, RansError> {
        let start = self.pos;
        while x < LOW {
            let byte = *self.bytes.get(self.pos).ok_or(RansError::Truncated)?;
            x = (x << 8) | u32::from(byte);
            self.pos += 1;
        }
        // `symbol` adds the count of bytes taken; undo the byte-wise advance.
        self.pos = start;
        Ok(x)
    }

    /// `n` symbols through `L` interleaved states (symbol `i` in state
    /// `i mod L`); every state must end where the encoder started it.
    fn run<const L: usize>(
        mut self,
        model: &Model,
        n: usize,
    ) -> Result<(Vec<u8>, usize), RansError> {
        let mut states = [0u32; L];
        for state in &mut states {
            // The encoder writes its states even for an empty stream (found
            // by the rans_decode fuzz target: a stream cut inside them used
            // to count 4 bytes it did not have).
            *state = self.state()?;
        }
        let mut out = vec![0u8; n];
        let full = n - n % L;
        let mut i = 0;
        if n > 0 {
            let slots: &[Slot; TOTAL as usize] =
                model.slots.as_slice().try_into().expect("a table per slot");
            // While every state can take its two bytes, no symbol needs a
            // bounds check or an error path: L independent chains per group.
            let bytes = self.bytes;
            let mut pos = self.pos;
            let mut local = states;
            for group in out[..full].chunks_exact_mut(L) {
                if pos + 2 * L > bytes.len() {
                    break;
                }
                let window = &bytes[pos..pos + 2 * L];
                let mut at = 0;
                for (symbol, state) in group.iter_mut().zip(local.iter_mut()) {
                    let slot = slots[(*state & (TOTAL - 1)) as usize];
                    let x = slot.update(*state);
                    *state = renormalized(x, window[at], window[at + 1]);
                    at += usize::from(x < LOW) + usize::from(x < LOW >> 8);
                    *symbol = slot.symbol();
                }
                pos += at;
                i += L;
            }
            states = local;
            self.pos = pos;
        }
        // The last bytes of the stream, and the symbols after the last
        // whole group: one at a time, with every check.
        while i < n {
            out[i] = self.symbol(model, &mut states[i % L])?;
            i += 1;
        }
        if states.iter().any(|&s| s != LOW) {
            return Err(RansError::Corrupt);
        }
        Ok((out, self.pos))
    }
}

/// The size in bits of a plain stream with these symbol counts: what its
/// quantized frequencies cost the symbols, plus the table and the states.
/// (Within a few bytes of what [`encode`] writes; unlike the entropy, it
/// sees that a symbol rarer than 1/4096 still costs 12 bits.)
pub fn coded_bits(counts: &[u64; 256]) -> f64 {
    let n: u64 = counts.iter().sum();
    let freqs = normalized_frequencies(counts, n);
    let symbols: f64 = counts
        .iter()
        .zip(&freqs)
        .filter(|(c, _)| **c > 0)
        .map(|(&c, &f)| c as f64 * (SCALE_BITS as f64 - f64::from(f).log2()))
        .sum();
    let present = freqs.iter().filter(|&&f| f > 0).count();
    symbols + 8.0 * (6.0 + 3.0 * present as f64 + 4.0 * STATES as f64)
}

/// Empirical order-0 entropy of `symbols`, in bits per symbol.
pub fn entropy_bits(symbols: &[u8]) -> f64 {
    entropy_bits_of(&histogram(symbols))
}

/// Order-0 entropy, in bits per symbol, of a stream with these counts.
pub fn entropy_bits_of(counts: &[u64; 256]) -> f64 {
    let n = counts.iter().sum::<u64>() as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n;
            -p * p.log2()
        })
        .sum()
}

/// Test helper: `stream` (of `n` symbols) with each of its first `count`
/// bytes changed in turn must fail or decode to something; never panic.
#[cfg(test)]
fn survives_byte_flips(stream: &[u8], n: usize, flip: u8, count: usize) {
    for at in 0..stream.len().min(count) {
        let mut bad = stream.to_vec();
        bad[at] ^= flip;
        let _ = decode(&bad, n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Regression (fuzz/artifacts rans_decode crash-2ee9def9): an empty
    /// stream cut inside its final state.
    #[test]
    fn empty_stream_needs_its_state() {
        let crash = [0, 0, 0, 0, 0, 0, 0, 128, 0];
        assert_eq!(decode(&crash, 0), Err(RansError::Truncated));
        let mut ok = Vec::new();
        encode(&[], &mut ok);
        assert_eq!(decode(&ok, 0), Ok((Vec::new(), ok.len())));
        let last = ok.len() - 1;
        ok[last] ^= 1;
        assert_eq!(decode(&ok, 0), Err(RansError::Corrupt));
    }

    /// The one-state encoder of earlier builds (their streams are in
    /// existing stores): kept here to prove they still decode.
    fn encode_one_state(symbols: &[u8], out: &mut Vec<u8>) {
        let freqs = normalized_frequencies(&histogram(symbols), symbols.len() as u64);
        let cum = cumulative(&freqs);
        out.extend_from_slice(&(symbols.len() as u32).to_le_bytes());
        let present: Vec<usize> = (0..256).filter(|&s| freqs[s] > 0).collect();
        out.extend_from_slice(&(present.len() as u16).to_le_bytes());
        for &s in &present {
            out.push(s as u8);
            out.extend_from_slice(&(freqs[s] as u16).to_le_bytes());
        }
        let coders: Vec<EncSymbol> = (0..256).map(|s| EncSymbol::new(cum[s], freqs[s])).collect();
        let mut reversed = Vec::new();
        let mut state = LOW;
        for &s in symbols.iter().rev() {
            let coder = &coders[s as usize];
            while state >= coder.limit {
                reversed.push(state as u8);
                state >>= 8;
            }
            state = coder.step(state);
        }
        reversed.extend_from_slice(&state.to_le_bytes());
        out.extend(reversed.iter().rev());
    }

    #[test]
    fn one_state_streams_of_earlier_builds_decode() {
        // What the previous build's `encode` wrote for [1, 0, 0, 2, 0].
        let golden = [
            5, 0, 0, 0, 3, 0, 0, 154, 9, 1, 51, 3, 2, 51, 3, 57, 221, 186, 176,
        ];
        let mut again = Vec::new();
        encode_one_state(&[1, 0, 0, 2, 0], &mut again);
        assert_eq!(again, golden, "the kept one-state encoder is the old one");
        assert_eq!(
            decode(&golden, 5).unwrap(),
            (vec![1, 0, 0, 2, 0], golden.len())
        );
        let mut empty = Vec::new();
        encode_one_state(&[], &mut empty);
        assert_eq!(decode(&empty, 0).unwrap(), (vec![], empty.len()));
    }

    #[test]
    fn two_state_streams_of_earlier_builds_decode() {
        // What the previous build's `encode` (two states) wrote for
        // [1, 0, 0, 2, 0, 3, 1].
        let symbols = [1, 0, 0, 2, 0, 3, 1];
        let golden = [
            7, 0, 0, 0, 4, 128, 0, 220, 6, 1, 146, 4, 2, 73, 2, 3, 73, 2, 33, 87, 26, 224, 57, 45,
            146, 250,
        ];
        let mut again = Vec::new();
        encode_interleaved::<2>(&symbols, &histogram(&symbols), &mut again);
        assert_eq!(again, golden, "the two-state path is the old encoder");
        assert_eq!(
            decode(&golden, 7).unwrap(),
            (symbols.to_vec(), golden.len())
        );
    }

    fn round_trip(symbols: &[u8]) -> usize {
        let mut out = vec![0xee]; // a prefix, to check offsets
        encode(symbols, &mut out);
        let (decoded, used) = decode(&out[1..], symbols.len()).unwrap();
        assert_eq!(decoded, symbols);
        assert_eq!(used, out.len() - 1);
        out.len() - 1
    }

    proptest! {
        #[test]
        fn round_trips(symbols in proptest::collection::vec(any::<u8>(), 0..5000)) {
            round_trip(&symbols);
        }

        #[test]
        fn two_state_streams_round_trip(symbols in proptest::collection::vec(0u8..9, 0..3000)) {
            let mut out = Vec::new();
            encode_interleaved::<2>(&symbols, &histogram(&symbols), &mut out);
            prop_assert_eq!(decode(&out, symbols.len()).unwrap(), (symbols, out.len()));
        }

        #[test]
        fn one_state_streams_round_trip(symbols in proptest::collection::vec(0u8..6, 0..3000)) {
            let mut out = Vec::new();
            encode_one_state(&symbols, &mut out);
            prop_assert_eq!(decode(&out, symbols.len()).unwrap(), (symbols, out.len()));
        }

        #[test]
        fn round_trips_skewed(symbols in proptest::collection::vec(prop::sample::select(vec![0u8, 0, 0, 0, 0, 0, 0, 1, 2, 255]), 0..5000)) {
            round_trip(&symbols);
        }
    }

    #[test]
    fn reciprocal_step_equals_division() {
        for freq in [1u32, 2, 3, 5, 7, 100, 1000, 2047, 4095] {
            let coder = EncSymbol::new(17.min(TOTAL - freq), freq);
            let limit = ((LOW >> SCALE_BITS) << 8) * freq;
            let mut x = LOW;
            while x < limit {
                let want = ((x / freq) << SCALE_BITS) + x % freq + 17.min(TOTAL - freq);
                assert_eq!(coder.step(x), want, "freq {freq} x {x}");
                x += 1 + x / 97;
            }
        }
    }

    #[test]
    fn single_symbol_and_empty() {
        round_trip(&[]);
        // Header, a one-entry table and four states.
        assert!(round_trip(&[7; 100_000]) <= 25);
    }

    #[test]
    fn close_to_entropy_on_a_skewed_stream() {
        // 90% zeros, the rest spread over 14 levels: like a sparse residual.
        let mut x = 12345u64;
        let symbols: Vec<u8> = (0..1_000_000)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                let r = (x >> 33) % 1000;
                if r < 900 { 0 } else { 1 + (r % 14) as u8 }
            })
            .collect();
        let bytes = round_trip(&symbols) as f64;
        let bound = entropy_bits(&symbols) * symbols.len() as f64 / 8.0;
        assert!(bytes < bound * 1.01 + 100.0, "{bytes} vs entropy {bound}");
    }

    #[test]
    fn damage_is_detected() {
        let mut out = Vec::new();
        encode(&[1, 2, 3, 1, 2, 3, 0, 0, 0, 9], &mut out);
        assert_eq!(
            decode(&out[..out.len() - 1], 10).unwrap_err(),
            RansError::Truncated
        );
        let mut bad = out.clone();
        bad[7] ^= 0xff; // a frequency
        assert!(decode(&bad, 10).is_err());
        assert_eq!(
            decode(&out, 11).unwrap_err(),
            RansError::Count {
                found: 10,
                expected: 11
            }
        );
    }
}
