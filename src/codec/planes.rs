//! The lossless payload of keyframes and xor-deltas: byte planes, each
//! stored raw, rANS-coded or zstd-coded, whichever is smallest.
//!
//! In trained fp32 tensors the two low mantissa bytes are close to random (8
//! bits of entropy per byte), the third byte nearly so, and only the byte with
//! the sign and exponent is compressible (about 3–4 bits). zstd spends most
//! of its time searching the random planes for matches that are not there;
//! an order-0 coder on the one plane that has redundancy gets as close to its
//! entropy as zstd's Huffman stage (closer: it is not limited to whole bits),
//! and copying the others costs a memcpy. On the benchmark series this is
//! both faster than `zstd -3` and smaller (docs/benchmarks.md).
//!
//! Payload layout, for `elem_size` planes of `n = raw_len / elem_size` bytes:
//! per plane a mode byte (0 = raw: `n` bytes follow; 1 = rANS: a
//! [`super::rans`] stream of `n` symbols follows; 2 = zstd: a u32 LE length
//! and a zstd frame of that many bytes holding the `n` bytes), then the
//! `raw_len mod elem_size` trailing bytes as they are (never produced by
//! valid tensors).

use super::{rans, shuffle};

const RAW: u8 = 0;
const RANS: u8 = 1;
const ZSTD: u8 = 2;

/// A plane with at least this fraction of zero bytes is also tried with
/// zstd: runs of zeros (never-updated rows of an embedding's m and v, zero
/// biases) cost an order-0 coder a fraction of a bit per byte each, and
/// zstd almost nothing. Dense planes skip the try, which would cost time.
const ZERO_SHARE_FOR_ZSTD: u64 = 8;
const PLANE_ZSTD_LEVEL: i32 = 1;

/// A plane is entropy-coded only when that saves at least this fraction:
/// a nearly random plane would cost coding and decoding time for nothing.
const MIN_SAVING: f64 = 0.02;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanesError {
    #[error("plane payload is truncated")]
    Truncated,
    #[error("unknown plane mode {0}")]
    Mode(u8),
    #[error("plane {plane}: {source}")]
    Rans {
        plane: usize,
        source: rans::RansError,
    },
    #[error("plane payload has {0} bytes after its end")]
    Trailing(usize),
    #[error("plane {plane}: zstd frame does not decode to the plane: {detail}")]
    Zstd { plane: usize, detail: String },
}

/// `data` cut into planes, with each plane's coding decided: what an
/// encoder needs, and what it will cost, before any coding is done. Commit
/// analyses a chunk both as it is and xor'ed with its parent, and codes only
/// the smaller.
pub struct Analysis<'a> {
    /// The planes one after the other ([`shuffle::split`]), without the tail.
    planes: Vec<u8>,
    /// How each plane is coded: `None` for raw.
    coded: Vec<Option<Coded>>,
    tail: &'a [u8],
}

enum Coded {
    /// rANS, with the plane's counts and its order-0 size.
    Rans {
        counts: Box<[u64; 256]>,
        bytes: usize,
    },
    /// A zstd frame, already made.
    Zstd(Vec<u8>),
}

impl Coded {
    fn len(&self) -> usize {
        match self {
            Coded::Rans { bytes, .. } => *bytes,
            Coded::Zstd(frame) => 4 + frame.len(),
        }
    }
}

/// How a plane is best stored: `None` for raw.
fn choose(plane: &[u8]) -> Option<Coded> {
    let counts = rans::histogram(plane);
    let n = plane.len();
    // Bytes an order-0 coder would need: the plane's entropy.
    let bytes = (rans::entropy_bits_of(&counts) * n as f64 / 8.0) as usize;
    let mut best = Coded::Rans {
        counts: Box::new(counts),
        bytes,
    };
    if counts[0] * ZERO_SHARE_FOR_ZSTD >= n as u64 {
        let frame = zstd::bulk::compress(plane, PLANE_ZSTD_LEVEL).expect("zstd into a Vec");
        if 4 + frame.len() < best.len() {
            best = Coded::Zstd(frame);
        }
    }
    (best.len() < (n as f64 * (1.0 - MIN_SAVING)) as usize).then_some(best)
}

impl<'a> Analysis<'a> {
    pub fn of(data: &'a [u8], elem_size: usize) -> Analysis<'a> {
        let elem_size = elem_size.max(1);
        let whole = data.len() - data.len() % elem_size;
        let mut planes = shuffle::split(data, elem_size);
        planes.truncate(whole);
        let n = whole / elem_size;
        let coded = (0..elem_size)
            .map(|p| choose(&planes[p * n..(p + 1) * n]))
            .collect();
        Analysis {
            planes,
            coded,
            tail: &data[whole..],
        }
    }

    fn plane(&self, p: usize) -> &[u8] {
        let n = self.planes.len() / self.coded.len();
        &self.planes[p * n..(p + 1) * n]
    }

    /// Payload bytes [`Analysis::write`] will produce, within the coder's
    /// overhead (its table and a fraction of a percent).
    pub fn estimated_len(&self) -> usize {
        let planes: usize = (self.coded.iter().enumerate())
            .map(|(p, coded)| 1 + coded.as_ref().map_or(self.plane(p).len(), Coded::len))
            .sum();
        planes + self.tail.len()
    }

    /// Appends the payload to `out`.
    pub fn write(&self, out: &mut Vec<u8>) {
        for (p, coded) in self.coded.iter().enumerate() {
            let plane = self.plane(p);
            match coded {
                Some(Coded::Rans { counts, .. }) => {
                    out.push(RANS);
                    rans::encode_counted(plane, counts, out);
                }
                Some(Coded::Zstd(frame)) => {
                    out.push(ZSTD);
                    out.extend_from_slice(&(frame.len() as u32).to_le_bytes());
                    out.extend_from_slice(frame);
                }
                None => {
                    out.push(RAW);
                    out.extend_from_slice(plane);
                }
            }
        }
        out.extend_from_slice(self.tail);
    }
}

/// Appends the planes payload of `data` to `out`.
pub fn encode(data: &[u8], elem_size: usize, out: &mut Vec<u8>) {
    Analysis::of(data, elem_size).write(out);
}

/// Decodes a payload made by [`encode`] of `raw_len` bytes.
pub fn decode(payload: &[u8], raw_len: usize, elem_size: usize) -> Result<Vec<u8>, PlanesError> {
    let elem_size = elem_size.max(1);
    let n = raw_len / elem_size;
    // Every plane first (raw ones borrowed from the payload), then one
    // interleaving pass: writing plane by plane touched the output
    // `elem_size` times.
    let mut decoded: Vec<Vec<u8>> = Vec::new();
    let mut sources: Vec<(bool, usize)> = Vec::with_capacity(elem_size);
    let mut pos = 0;
    for p in 0..elem_size {
        let mode = *payload.get(pos).ok_or(PlanesError::Truncated)?;
        pos += 1;
        match mode {
            RAW => {
                payload.get(pos..pos + n).ok_or(PlanesError::Truncated)?;
                sources.push((false, pos));
                pos += n;
            }
            RANS => {
                let (symbols, used) = rans::decode(&payload[pos..], n)
                    .map_err(|source| PlanesError::Rans { plane: p, source })?;
                pos += used;
                sources.push((true, decoded.len()));
                decoded.push(symbols);
            }
            ZSTD => {
                let len = payload.get(pos..pos + 4).ok_or(PlanesError::Truncated)?;
                let len = u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize;
                pos += 4;
                let frame = payload.get(pos..pos + len).ok_or(PlanesError::Truncated)?;
                pos += len;
                let zstd_error = |detail: String| PlanesError::Zstd { plane: p, detail };
                // `n` bounds what the frame may claim (fuzzed).
                let plane =
                    zstd::bulk::decompress(frame, n).map_err(|e| zstd_error(e.to_string()))?;
                if plane.len() != n {
                    return Err(zstd_error(format!("{} bytes, {n} expected", plane.len())));
                }
                sources.push((true, decoded.len()));
                decoded.push(plane);
            }
            other => return Err(PlanesError::Mode(other)),
        }
    }
    let planes: Vec<&[u8]> = sources
        .iter()
        .map(|&(is_decoded, at)| {
            if is_decoded {
                decoded[at].as_slice()
            } else {
                &payload[at..at + n]
            }
        })
        .collect();
    let mut out = Vec::with_capacity(raw_len);
    shuffle::interleave(&planes, &mut out);
    let tail = payload
        .get(pos..pos + raw_len % elem_size)
        .ok_or(PlanesError::Truncated)?;
    out.extend_from_slice(tail);
    pos += tail.len();
    if pos != payload.len() {
        return Err(PlanesError::Trailing(payload.len() - pos));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn floats(n: usize) -> Vec<u8> {
        let mut x = 0x1234_5678u32;
        (0..n)
            .flat_map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let v = (f64::from(x) / f64::from(u32::MAX) - 0.5) * 0.04;
                (v as f32).to_le_bytes()
            })
            .collect()
    }

    #[test]
    fn float_planes_code_only_what_pays() {
        let data = floats(100_000);
        let mut out = Vec::new();
        encode(&data, 4, &mut out);
        // The two low mantissa planes are stored raw, the exponent plane coded.
        assert_eq!(out[0], RAW);
        assert_eq!(out[1 + 100_000], RAW);
        assert!(out.len() < data.len() * 95 / 100, "{}", out.len());
        assert_eq!(decode(&out, data.len(), 4).unwrap(), data);
        let estimate = Analysis::of(&data, 4).estimated_len();
        assert!(
            estimate.abs_diff(out.len()) < out.len() / 100,
            "{estimate} vs {}",
            out.len()
        );
    }

    #[test]
    fn constant_data_is_tiny() {
        let data: Vec<u8> = std::iter::repeat_n(1.0f32.to_le_bytes(), 1 << 16)
            .flatten()
            .collect();
        let mut out = Vec::new();
        encode(&data, 4, &mut out);
        assert!(out.len() < 200, "{}", out.len());
        assert_eq!(decode(&out, data.len(), 4).unwrap(), data);
    }

    #[test]
    fn planes_with_zero_runs_go_to_zstd() {
        // Half the elements zero (rows an optimizer never touched), half random.
        let mut data = floats(50_000);
        data.extend(std::iter::repeat_n(0u8, 200_000));
        let mut out = Vec::new();
        encode(&data, 4, &mut out);
        assert_eq!(out[0], ZSTD, "the low mantissa plane: zero runs and noise");
        assert_eq!(decode(&out, data.len(), 4).unwrap(), data);
        // Cheaper than order-0 coding could be (≥ 1 bit per zero byte saved).
        assert!(out.len() < 50_000 * 4 * 95 / 100, "{}", out.len());
        let mut bad = out.clone();
        bad[5] ^= 0xff; // inside the first plane's zstd frame
        assert!(decode(&bad, data.len(), 4).is_err());
    }

    #[test]
    fn damage_is_reported() {
        let data = floats(1000);
        let mut out = Vec::new();
        encode(&data, 4, &mut out);
        assert!(matches!(
            decode(&out[..out.len() - 1], data.len(), 4),
            Err(PlanesError::Rans { plane: 3, .. })
        ));
        assert_eq!(decode(&[], data.len(), 4), Err(PlanesError::Truncated));
        assert_eq!(
            decode(&[RAW, 1, 2], data.len(), 4),
            Err(PlanesError::Truncated)
        );
        let mut longer = out.clone();
        longer.push(0);
        assert_eq!(
            decode(&longer, data.len(), 4),
            Err(PlanesError::Trailing(1))
        );
        let mut bad_mode = out.clone();
        bad_mode[0] = 9;
        assert_eq!(decode(&bad_mode, data.len(), 4), Err(PlanesError::Mode(9)));
    }

    proptest! {
        #[test]
        fn round_trips(data in proptest::collection::vec(any::<u8>(), 0..5000), k in 1usize..9, skew in 0u8..4) {
            // Skewed bytes exercise the rANS planes, uniform ones the raw.
            let data: Vec<u8> = data.iter().map(|b| b >> (2 * skew)).collect();
            let mut out = Vec::new();
            encode(&data, k, &mut out);
            prop_assert_eq!(decode(&out, data.len(), k).unwrap(), data);
        }
    }
}
