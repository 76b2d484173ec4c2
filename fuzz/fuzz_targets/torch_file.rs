//! `format::torch::parse` on arbitrary bytes (a hostile or damaged
//! `optimizer.pt`): an error or a layout that stays inside the file, never a
//! panic. Every tensor must lie in the file, tensors must not overlap, and
//! every CRC field must be four bytes inside the file and outside every
//! tensor, since checkout writes at those offsets after the data.
#![no_main]

use ckptvc::format::torch;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(file) = torch::parse(data) else {
        return;
    };
    let len = data.len() as u64;
    let all_fields: Vec<u64> = file.crc_fields.iter().flatten().copied().collect();
    let mut end = 0;
    for (t, fields) in file.tensors.iter().zip(&file.crc_fields) {
        assert!(t.begin >= end && t.begin <= t.end && t.end <= len);
        end = t.end;
        for &f in fields {
            assert!(f + 4 <= len);
        }
        // No CRC field inside any tensor's data.
        assert!(all_fields.iter().all(|&f| f + 4 <= t.begin || f >= t.end));
    }
});
