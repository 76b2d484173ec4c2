//! The safetensors header parser, fed whole "files": it must accept or refuse
//! with a `FormatError`, never panic, and what it accepts must be consistent.
#![no_main]

use ckptvc::format::safetensors::parse_header;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(header) = parse_header(std::path::Path::new("fuzz.safetensors"), data) else {
        return;
    };
    // An accepted header's tensors must lie inside the file, in order and
    // without overlap: the commit path slices the file with these offsets.
    let data_len = data.len() as u64 - header.data_start();
    let mut end = 0;
    for tensor in &header.tensors {
        assert!(tensor.begin >= end && tensor.begin <= tensor.end);
        assert!(tensor.end <= data_len);
        end = tensor.end;
    }
});
