//! Times `codec::shuffle::split` of fp32 bytes into their four planes, the
//! first step of coding a lossless keyframe, against the byte-by-byte
//! scatter it replaced (kept here as the baseline). Alternates the two over
//! 4 MiB chunks of 256 MiB, as a keyframe meets them, and prints the median
//! time per byte of each and their ratio:
//! `cargo run --release --example split_speed`.

use std::hint::black_box;
use std::time::Instant;

use ckptvc::codec::shuffle::split;

const BYTES: usize = 256 << 20;
const CHUNK: usize = 4 << 20;
const ROUNDS: usize = 9;

/// The scatter `split` used for 4-byte elements before.
fn split_scatter(raw: &[u8]) -> Vec<u8> {
    let n = raw.len() / 4;
    let mut out = vec![0u8; raw.len()];
    let (p0, rest) = out.split_at_mut(n);
    let (p1, rest) = rest.split_at_mut(n);
    let (p2, p3) = rest.split_at_mut(n);
    let outputs = p0.iter_mut().zip(p1.iter_mut()).zip(p2.iter_mut().zip(p3));
    for (e, ((b0, b1), (b2, b3))) in raw.chunks_exact(4).zip(outputs) {
        (*b0, *b1, *b2, *b3) = (e[0], e[1], e[2], e[3]);
    }
    out
}

fn seconds_per_byte(raw: &[u8], f: &dyn Fn(&[u8]) -> Vec<u8>) -> f64 {
    let start = Instant::now();
    for chunk in raw.chunks(CHUNK) {
        black_box(f(black_box(chunk)));
    }
    start.elapsed().as_secs_f64() / raw.len() as f64
}

fn main() {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let raw: Vec<u8> = (0..BYTES / 4)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 * 0.02).to_le_bytes()
        })
        .collect();
    assert_eq!(split(&raw[..CHUNK], 4), split_scatter(&raw[..CHUNK]));
    let (mut before, mut after) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        if round % 2 == 0 {
            before.push(seconds_per_byte(&raw, &split_scatter));
            after.push(seconds_per_byte(&raw, &|c| split(c, 4)));
        } else {
            after.push(seconds_per_byte(&raw, &|c| split(c, 4)));
            before.push(seconds_per_byte(&raw, &split_scatter));
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (b, a) = (median(&mut before), median(&mut after));
    println!(
        "split of fp32 planes: scatter {:.3} ns/byte, split {:.3} ns/byte, ratio {:.2}",
        b * 1e9,
        a * 1e9,
        a / b
    );
}
