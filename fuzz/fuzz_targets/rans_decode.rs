//! The rANS symbol decoder on its own: the first 3 bytes give the symbol count
//! the caller expects (up to 16M, the most a 64 MiB chunk of f32 holds), the
//! rest is the stream.
#![no_main]

use ckptvc::codec::rans;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let expected = u32::from_le_bytes([data[0], data[1], data[2], 0]) as usize;
    let stream = &data[3..];
    if let Ok((symbols, used)) = rans::decode(stream, expected) {
        assert_eq!(symbols.len(), expected);
        assert!(used <= stream.len());
    }
});
