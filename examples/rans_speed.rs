//! Times the rANS coder on a plane of fp32 exponent bytes (the symbol mix
//! of a keyframe's coded plane): `cargo run --release --example rans_speed`.

use std::time::Instant;

fn main() {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let symbols: Vec<u8> = (0..(16 << 20))
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let u = (x >> 11) as f64 / (1u64 << 53) as f64;
            // Exponent bytes of N(0, 0.02)-like weights: a few dozen values.
            (0x3c - (u.ln().abs() * 2.0) as i32).clamp(0, 255) as u8 ^ ((x & 1) as u8) << 7
        })
        .collect();
    let mut out = Vec::new();
    let start = Instant::now();
    ckptvc::codec::rans::encode(&symbols, &mut out);
    let enc = start.elapsed();
    let start = Instant::now();
    let (back, _) = ckptvc::codec::rans::decode(&out, symbols.len()).unwrap();
    let dec = start.elapsed();
    assert_eq!(back, symbols);
    let n = symbols.len() as f64;
    println!(
        "{} symbols, {:.2} bits each: encode {:.2} ns/symbol, decode {:.2} ns/symbol",
        symbols.len(),
        out.len() as f64 * 8.0 / n,
        enc.as_nanos() as f64 / n,
        dec.as_nanos() as f64 / n
    );
}
