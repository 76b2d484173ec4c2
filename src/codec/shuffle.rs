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
    for (i, element) in raw.chunks_exact(elem_size).enumerate() {
        for (p, &byte) in element.iter().enumerate() {
            out[p * n + i] = byte;
        }
    }
    let tail = n * elem_size;
    out[tail..].copy_from_slice(&raw[tail..]);
    out
}

/// Planes → `raw`; the inverse of [`split`].
pub fn join(planes: &[u8], elem_size: usize) -> Vec<u8> {
    if elem_size <= 1 {
        return planes.to_vec();
    }
    let n = planes.len() / elem_size;
    let mut out = vec![0u8; planes.len()];
    for (i, element) in out.chunks_exact_mut(elem_size).enumerate() {
        for (p, byte) in element.iter_mut().enumerate() {
            *byte = planes[p * n + i];
        }
    }
    let tail = n * elem_size;
    out[tail..].copy_from_slice(&planes[tail..]);
    out
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
