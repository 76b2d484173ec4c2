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
        // The common case (fp32) unrolled, without index arithmetic.
        let outputs = p0.iter_mut().zip(p1.iter_mut()).zip(p2.iter_mut().zip(p3));
        for (e, ((b0, b1), (b2, b3))) in raw.chunks_exact(4).zip(outputs) {
            (*b0, *b1, *b2, *b3) = (e[0], e[1], e[2], e[3]);
        }
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
        fn join_inverts_split(raw in proptest::collection::vec(any::<u8>(), 0..3000), k in 1usize..9) {
            prop_assert_eq!(join(&split(&raw, k), k), raw);
        }
    }
}
