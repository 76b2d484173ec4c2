//! Context-coded streams: one rANS stream whose symbol `i` is coded with
//! the frequency table of its context `contexts[i]`, a value the decoder
//! knows before it decodes (see [`crate::codec::context`]). Compared with
//! one stream per context, nothing is reordered: the encoder and decoder
//! only pick a table per symbol.
//!
//! Layout: `n` u32 LE, the context count `k` u8 (1–4), then per context its
//! table as a plain stream's (`k` field u16 LE with the state bits of four
//! states, then (symbol u8, frequency u16 LE) entries summing to 4096, or
//! no entries for a context no element has), then the four final states as
//! u32 big-endian (state 0 first) and the renormalization bytes in decoding
//! order, exactly as a plain stream of four states.

use super::{
    LOW, Model, RansError, STATES, STATES_SHIFT, Slot, TOTAL, put, renormalized, states_code,
    write_table,
};

/// Most contexts a stream has.
pub const MAX_CONTEXTS: usize = 4;

/// Appends `symbols` coded in their `contexts` (each below `k`).
pub fn encode(symbols: &[u8], contexts: &[u8], k: usize, out: &mut Vec<u8>) {
    assert_eq!(symbols.len(), contexts.len(), "a context per symbol");
    assert!((1..=MAX_CONTEXTS).contains(&k));
    let counts = context_histograms(symbols, contexts, k);
    out.extend_from_slice(&(symbols.len() as u32).to_le_bytes());
    out.push(k as u8);
    let mut coders = Vec::with_capacity(k * 256);
    for counts in &counts {
        coders.extend(write_table(counts, STATES, out));
    }
    let coder = |c: u8, s: u8| &coders[(c as usize) << 8 | s as usize];
    // As the plain encoder: back to front, symbol i through state i mod 4,
    // bytes collected reversed (at most 2 per symbol, 4 written at a time).
    let n = symbols.len();
    let mut reversed = vec![0u8; 2 * n + 4 * STATES + 4];
    let mut len = 0;
    let mut states = [LOW; STATES];
    let full = n - n % STATES;
    for j in (full..n).rev() {
        let coder = coder(contexts[j], symbols[j]);
        put(&mut states[j - full], coder, &mut reversed, &mut len);
    }
    let groups = symbols[..full]
        .chunks_exact(STATES)
        .zip(contexts[..full].chunks_exact(STATES));
    for (group, group_contexts) in groups.rev() {
        for j in (0..STATES).rev() {
            let coder = coder(group_contexts[j], group[j]);
            put(&mut states[j], coder, &mut reversed, &mut len);
        }
    }
    reversed.truncate(len);
    for state in states.iter().rev() {
        reversed.extend_from_slice(&state.to_le_bytes());
    }
    out.extend(reversed.iter().rev());
}

/// Each context's symbol counts. Four sets of tables, summed at the end, as
/// [`super::histogram`]: with one, each increment would wait for the
/// previous one to the same counter.
fn context_histograms(symbols: &[u8], contexts: &[u8], k: usize) -> Vec<[u64; 256]> {
    let mut lanes = vec![[[0u32; 256]; MAX_CONTEXTS]; 4];
    let quads = symbols.chunks_exact(4).zip(contexts.chunks_exact(4));
    for (quad, quad_contexts) in quads {
        for (lane, (&s, &c)) in lanes.iter_mut().zip(quad.iter().zip(quad_contexts)) {
            lane[c as usize % MAX_CONTEXTS][s as usize] += 1;
        }
    }
    let tail = symbols.len() - symbols.len() % 4;
    for (&s, &c) in symbols[tail..].iter().zip(&contexts[tail..]) {
        lanes[0][c as usize % MAX_CONTEXTS][s as usize] += 1;
    }
    (0..k)
        .map(|c| std::array::from_fn(|s| lanes.iter().map(|lane| u64::from(lane[c][s])).sum()))
        .collect()
}

/// Decodes a stream made by [`encode`] whose elements have these contexts;
/// returns the symbols and the bytes consumed.
pub fn decode(bytes: &[u8], contexts: &[u8]) -> Result<(Vec<u8>, usize), RansError> {
    let take = |at: usize, len: usize| bytes.get(at..at + len).ok_or(RansError::Truncated);
    let n = u32::from_le_bytes(take(0, 4)?.try_into().expect("4")) as usize;
    if n != contexts.len() {
        return Err(RansError::Count {
            found: n,
            expected: contexts.len(),
        });
    }
    let k = take(4, 1)?[0] as usize;
    if !(1..=MAX_CONTEXTS).contains(&k) {
        return Err(RansError::BadTable);
    }
    // Counted context by context: each a pass the compiler vectorizes (one
    // counter array incremented per element waits on its own stores).
    if contexts.iter().fold(0u8, |m, &c| m.max(c)) as usize >= k {
        return Err(RansError::BadTable);
    }
    let per_context: [usize; MAX_CONTEXTS] =
        std::array::from_fn(|c| contexts.iter().filter(|&&x| x as usize == c).count());
    let mut pos = 5;
    let mut slots: Vec<Slot> = Vec::with_capacity(k * TOTAL as usize);
    for &count in &per_context[..k] {
        let k_field = u16::from_le_bytes(take(pos, 2)?.try_into().expect("2"));
        pos += 2;
        if k_field >> STATES_SHIFT != states_code(STATES) || (k_field & 0x3fff) > 256 {
            return Err(RansError::BadTable);
        }
        let mut freqs = [0u32; 256];
        for _ in 0..(k_field & 0x3fff) {
            let entry = take(pos, 3)?;
            freqs[entry[0] as usize] = u16::from_le_bytes([entry[1], entry[2]]) as u32;
            pos += 3;
        }
        // A context no element has may have an empty table; its slots are
        // never read.
        let model = Model::new(&freqs, count)?;
        match model.slots.len() {
            0 => slots.resize(slots.len() + TOTAL as usize, Slot::default()),
            _ => slots.extend_from_slice(&model.slots),
        }
    }
    let mut states = [0u32; STATES];
    for state in &mut states {
        let raw = take(pos, 4)?;
        pos += 4;
        *state = u32::from_be_bytes(raw.try_into().expect("4"));
        if !(LOW..LOW << 8).contains(state) {
            return Err(RansError::Corrupt);
        }
    }
    let mut out = vec![0u8; n];
    // While every state can take its two bytes: groups of four symbols, no
    // bounds check on the bytes (as the plain decoder's fast path).
    let full = n - n % STATES;
    let mut i = 0;
    for (group, group_contexts) in out[..full]
        .chunks_exact_mut(STATES)
        .zip(contexts[..full].chunks_exact(STATES))
    {
        let Some(window) = bytes.get(pos..pos + 2 * STATES) else {
            break;
        };
        let mut at = 0;
        for ((symbol, &c), state) in group.iter_mut().zip(group_contexts).zip(states.iter_mut()) {
            let slot = slots[(c as usize) << 12 | (*state & (TOTAL - 1)) as usize];
            let x = slot.update(*state);
            *state = renormalized(x, window[at], window[at + 1]);
            at += usize::from(x < LOW) + usize::from(x < LOW >> 8);
            *symbol = slot.symbol();
        }
        pos += at;
        i += STATES;
    }
    for (j, (symbol, &c)) in out[i..].iter_mut().zip(&contexts[i..]).enumerate() {
        let state = &mut states[(i + j) % STATES];
        let slot = slots[(c as usize) << 12 | (*state & (TOTAL - 1)) as usize];
        let x = slot.update(*state);
        let needed = usize::from(x < LOW) + usize::from(x < LOW >> 8);
        *state = match bytes.get(pos..pos + 2) {
            Some(two) => renormalized(x, two[0], two[1]),
            None => {
                let mut y = x;
                for at in pos..pos + needed {
                    y = (y << 8) | u32::from(*bytes.get(at).ok_or(RansError::Truncated)?);
                }
                y
            }
        };
        pos += needed;
        *symbol = slot.symbol();
    }
    if states.iter().any(|&s| s != LOW) {
        return Err(RansError::Corrupt);
    }
    Ok((out, pos))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(n: usize, seed: u64) -> (Vec<u8>, Vec<u8>) {
        let mut x = seed | 1;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let contexts: Vec<u8> = (0..n).map(|_| (next() % 3) as u8).collect();
        let symbols = contexts
            .iter()
            .map(|&c| 100 + (next() % (1 + 10 * c as u64)) as u8)
            .collect();
        (symbols, contexts)
    }

    #[test]
    fn round_trips_and_beats_one_table() {
        for n in [0, 1, 5, 4096, 100_003] {
            let (symbols, contexts) = stream(n, n as u64 + 7);
            let mut out = Vec::new();
            encode(&symbols, &contexts, 3, &mut out);
            let (decoded, used) = decode(&out, &contexts).unwrap();
            assert_eq!(decoded, symbols);
            assert_eq!(used, out.len());
            if n > 4096 {
                let mut plain = Vec::new();
                super::super::encode(&symbols, &mut plain);
                assert!(
                    out.len() < plain.len() * 9 / 10,
                    "{} vs {}",
                    out.len(),
                    plain.len()
                );
            }
        }
    }

    #[test]
    fn wrong_contexts_and_damage_are_errors_not_panics() {
        let (symbols, contexts) = stream(20_000, 3);
        let mut out = Vec::new();
        encode(&symbols, &contexts, 3, &mut out);
        assert!(decode(&out, &contexts[1..]).is_err());
        let mut other = contexts.clone();
        other[5] = 3;
        assert!(decode(&out, &other).is_err());
        for at in (0..out.len()).step_by(97) {
            let mut bad = out.clone();
            bad[at] ^= 0x5a;
            let _ = decode(&bad, &contexts);
            let _ = decode(&out[..at], &contexts);
        }
    }
}
