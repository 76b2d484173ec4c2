//! Byte-plane splitting: for elements of `k` bytes, plane `p` holds byte `p` of
//! every element. In float tensors the planes holding sign and exponent are
//! highly repetitive while the low mantissa planes are near-random, so an
//! entropy coder does much better on the split form than on interleaved bytes.
//! A trailing partial element (never produced by valid tensors) is kept as is.

/// `raw` → planes. `elem_size` of 1 is the identity.
pub fn split(raw: &[u8], elem_size: usize) -> Vec<u8> {
    if elem_size <= 1 {
        return raw.to_vec();
    }
    let n = raw.len() / elem_size;
    let mut out = vec![0u8; raw.len()];
    let (planes, tail) = out.split_at_mut(n * elem_size);
    if elem_size == 4 && n > 0 {
        let (p0, rest) = planes.split_at_mut(n);
        let (p1, rest) = rest.split_at_mut(n);
        let (p2, p3) = rest.split_at_mut(n);
        split_words(&raw[..n * 4], [p0, p1, p2, p3]);
    } else {
        for (i, element) in raw.chunks_exact(elem_size).enumerate() {
            for (p, &byte) in element.iter().enumerate() {
                planes[p * n + i] = byte;
            }
        }
    }
    tail.copy_from_slice(&raw[n * elem_size..]);
    out
}

/// Elements of 4 bytes (fp32, the common case) into their 4 planes, a
/// block at a time: the block's words are read once, then each plane is a
/// shift and a narrowing of them, a loop the compiler vectorizes. The
/// byte-by-byte scatter this replaced was not vectorized and took a quarter
/// of a lossless keyframe's CPU.
fn split_words(raw: &[u8], planes: [&mut [u8]; 4]) {
    // 4 KiB of words and 1 KiB of each plane: all of it stays in L1.
    const BLOCK: usize = 1024;
    let mut words = [0u32; BLOCK];
    let mut planes = planes;
    for (b, bytes) in raw.chunks(4 * BLOCK).enumerate() {
        let words = &mut words[..bytes.len() / 4];
        for (w, e) in words.iter_mut().zip(bytes.chunks_exact(4)) {
            *w = u32::from_le_bytes([e[0], e[1], e[2], e[3]]);
        }
        let start = b * BLOCK;
        for (p, plane) in planes.iter_mut().enumerate() {
            let shift = 8 * p as u32;
            let out = &mut plane[start..start + words.len()];
            for (o, &w) in out.iter_mut().zip(words.iter()) {
                *o = (w >> shift) as u8;
            }
        }
    }
}

/// Planes → `raw`; the inverse of [`split`].
pub fn join(planes: &[u8], elem_size: usize) -> Vec<u8> {
    if elem_size <= 1 {
        return planes.to_vec();
    }
    let n = planes.len() / elem_size;
    let mut out = Vec::with_capacity(planes.len());
    let separate: Vec<&[u8]> = (0..elem_size)
        .map(|p| &planes[p * n..(p + 1) * n])
        .collect();
    interleave(&separate, &mut out);
    out.extend_from_slice(&planes[n * elem_size..]);
    out
}

/// Appends the elements whose byte `p` is `planes[p][i]`, for planes of
/// equal length that need not be contiguous: one pass over the output
/// (writing plane by plane would touch it once per plane).
pub fn interleave(planes: &[&[u8]], out: &mut Vec<u8>) {
    let n = planes.first().map_or(0, |p| p.len());
    let start = out.len();
    out.resize(start + planes.len() * n, 0);
    let elements = &mut out[start..];
    if let [p0, p1, p2, p3] = planes {
        let sources = p0.iter().zip(p1.iter()).zip(p2.iter().zip(p3.iter()));
        for (element, ((&b0, &b1), (&b2, &b3))) in elements.chunks_exact_mut(4).zip(sources) {
            element.copy_from_slice(&[b0, b1, b2, b3]);
        }
    } else if !planes.is_empty() {
        for (i, element) in elements.chunks_exact_mut(planes.len()).enumerate() {
            for (byte, plane) in element.iter_mut().zip(planes) {
                *byte = plane[i];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn planes_are_grouped() {
        let raw = [1, 2, 3, 4, 5, 6, 7, 8, 9];
        assert_eq!(split(&raw, 4), [1, 5, 2, 6, 3, 7, 4, 8, 9]);
    }

    proptest! {
        #[test]
        fn split_puts_byte_p_of_element_i_at_p_n_plus_i(
            raw in proptest::collection::vec(any::<u8>(), 0..13_000),
            k in 1usize..9,
        ) {
            let n = raw.len() / k;
            let mut expected = raw.clone();
            if k > 1 {
                for i in 0..n {
                    for p in 0..k {
                        expected[p * n + i] = raw[i * k + p];
                    }
                }
            }
            prop_assert_eq!(split(&raw, k), expected);
        }

        #[test]
        fn join_inverts_split(raw in proptest::collection::vec(any::<u8>(), 0..3000), k in 1usize..9) {
            prop_assert_eq!(join(&split(&raw, k), k), raw);
        }
    }
}
