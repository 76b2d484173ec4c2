//! Every codec's decoder through the one entry point the store uses,
//! `codec::decode`, with and without a base chunk: arbitrary blob bytes must
//! give an error or a chunk of exactly the declared length, never a panic, and
//! never more memory than `MAX_RAW_LEN` allows.
#![no_main]

use ckptvc::codec::{BlobHeader, MAX_RAW_LEN, decode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(header) = BlobHeader::parse(data) else {
        assert!(decode(data, None).is_err());
        return;
    };
    assert!(header.raw_len <= MAX_RAW_LEN);
    if let Ok(raw) = decode(data, None) {
        assert!(!header.codec.needs_base());
        assert_eq!(raw.len() as u64, header.raw_len);
    }
    if !header.codec.needs_base() {
        return;
    }
    // A base of the declared length, so residual and ratio blobs get past the
    // length check and exercise their reconstruction: 0.5 in every float
    // type the codec knows, or plain bytes.
    let pattern: &[u8] = match header.elem_size {
        2 => &[0x00, 0x3f],
        4 => &[0x00, 0x00, 0x00, 0x3f],
        8 => &[0, 0, 0, 0, 0, 0, 0xe0, 0x3f],
        _ => &[0x5a],
    };
    let len = header.raw_len as usize;
    let mut base = pattern.repeat(len.div_ceil(pattern.len()));
    base.truncate(len);
    if let Ok(raw) = decode(data, Some(&base)) {
        assert_eq!(raw.len(), base.len());
    }
    // A base of the wrong length is refused, not read out of bounds.
    if !base.is_empty() {
        let _ = decode(data, Some(&base[1..]));
    }
});
