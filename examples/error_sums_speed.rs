//! Times the error sums of Adam's moments in a lossy commit: the two
//! `squared_error` passes (m against m̂, v against v̂) that were all a
//! commit computed, against `moment_errors`, which also sums the errors in
//! Adam's update, in one pass over the same four arrays. Alternates the two
//! over 256 MB of moments in 1M-element chunks, as a commit meets them
//! (from memory, not from cache), and prints each one's time per element
//! and their ratio: `cargo run --release --example error_sums_speed`.

use std::hint::black_box;
use std::time::Instant;

use ckptvc::codec::distortion::{moment_errors, squared_error};

const ELEMENTS: usize = 16 << 20;
const CHUNK: usize = 1 << 20;
const ROUNDS: usize = 9;

fn main() {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut uniform = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x >> 40) as f32 / (1u64 << 24) as f32
    };
    let m: Vec<f32> = (0..ELEMENTS).map(|_| (uniform() - 0.5) * 2e-3).collect();
    let m_hat: Vec<f32> = m
        .iter()
        .map(|&m| m * (1.0 + (uniform() - 0.5) * 0.2))
        .collect();
    let v: Vec<f32> = (0..ELEMENTS)
        .map(|_| uniform() * uniform() * 1e-6)
        .collect();
    let v_hat: Vec<f32> = v
        .iter()
        .map(|&v| v * (1.0 + (uniform() - 0.5) * 0.1))
        .collect();
    let chunks = || {
        m.chunks(CHUNK)
            .zip(m_hat.chunks(CHUNK))
            .zip(v.chunks(CHUNK).zip(v_hat.chunks(CHUNK)))
    };
    let (mut two_passes, mut fused) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let start = Instant::now();
        for ((m, m_hat), (v, v_hat)) in chunks() {
            black_box((squared_error(m, m_hat), squared_error(v, v_hat)));
        }
        two_passes.push(start.elapsed().as_secs_f64());
        let start = Instant::now();
        for ((m, m_hat), (v, v_hat)) in chunks() {
            black_box(moment_errors(m, m_hat, v, v_hat));
        }
        fused.push(start.elapsed().as_secs_f64());
    }
    let median = |mut t: Vec<f64>| {
        t.sort_by(f64::total_cmp);
        t[t.len() / 2]
    };
    let (a, b) = (median(two_passes), median(fused));
    let per_element = |t: f64| t * 1e9 / ELEMENTS as f64;
    println!(
        "{ELEMENTS} elements of m and v, median of {ROUNDS}: two squared_error passes {:.3} ns/element, \
         moment_errors {:.3} ns/element ({:.2}x)",
        per_element(a),
        per_element(b),
        b / a
    );
}
