//! The quantized-chunk payload parser and reconstruction (levels, escapes and
//! the rANS stream behind them): the first 3 bytes give the element count, the
//! rest is the payload.
#![no_main]

use ckptvc::codec::quant;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let expected = u32::from_le_bytes([data[0], data[1], data[2], 0]) as usize;
    let Ok(q) = quant::read_payload(&data[3..], expected) else {
        return;
    };
    assert_eq!(q.symbols.len(), expected);
    let base = vec![0.5f32; expected];
    // The same values stand in for a scaled domain's side chunk.
    if let Ok(values) = quant::reconstruct(&q, Some(&base), Some(&base)) {
        assert_eq!(values.len(), expected);
    }
    // A predicted chunk's prediction from the moments it names.
    if let Some(p) = &q.predictor {
        let sides = vec![base.clone(); q.side_refs().len()];
        if let Ok(pred) = quant::prediction(p, &base, &sides) {
            assert_eq!(pred.len(), expected);
            let _ = quant::reconstruct(&q, Some(&base), Some(&pred));
        }
        let _ = quant::prediction(p, &base, &sides[..sides.len() / 2]);
    }
    let _ = quant::reconstruct(&q, None, None);
    let _ = quant::reconstruct(&q, Some(&base), None);
    let _ = quant::reconstruct(&q, Some(&base[..expected / 2]), Some(&base[..expected / 2]));
});
