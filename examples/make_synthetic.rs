//! Writes a synthetic training checkpoint for benchmarks: `model.safetensors`
//! (fp32 weights), `optimizer.safetensors` (`.exp_avg`, `.exp_avg_sq`) and
//! `meta.json`, `total_bytes` in all, with value distributions like a real run
//! (weights ~ N(0, 0.02), m ~ N(0, 1e-4), v ~ (m-scale)^2). `--version k`
//! gives the k-th checkpoint of a run: every weight drifts a little per
//! version, so successive versions are realistic delta inputs.
//!
//! Usage: cargo run --release --example make_synthetic -- OUT_DIR TOTAL_BYTES [VERSION]

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

/// xorshift64*: fast, deterministic, good enough for benchmark data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Approximately standard normal (sum of 4 uniforms, rescaled).
    fn normal(&mut self) -> f32 {
        let mut s = 0.0f32;
        for _ in 0..4 {
            s += (self.next() >> 40) as f32 / (1u64 << 24) as f32;
        }
        (s - 2.0) * 1.732
    }
}

const TENSOR_BYTES: u64 = 64 << 20;

/// `fill(tensor, block, buffer)` fills one block of one tensor.
fn write_file(path: &Path, tensors: &[(String, u64)], fill: &dyn Fn(usize, usize, &mut [f32])) {
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    for (name, elements) in tensors {
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F32", "shape": [elements], "data_offsets": [offset, offset + elements * 4]}),
        );
        offset += elements * 4;
    }
    let mut json = serde_json::to_string(&header).unwrap();
    while !json.len().is_multiple_of(8) {
        json.push(' ');
    }
    let mut out = BufWriter::with_capacity(8 << 20, File::create(path).unwrap());
    out.write_all(&(json.len() as u64).to_le_bytes()).unwrap();
    out.write_all(json.as_bytes()).unwrap();
    let mut buf = vec![0f32; 1 << 20];
    for (index, (_, elements)) in tensors.iter().enumerate() {
        let mut left = *elements as usize;
        let mut block = 0;
        while left > 0 {
            let n = left.min(buf.len());
            fill(index, block, &mut buf[..n]);
            let bytes: Vec<u8> = buf[..n].iter().flat_map(|x| x.to_le_bytes()).collect();
            out.write_all(&bytes).unwrap();
            left -= n;
            block += 1;
        }
    }
    out.flush().unwrap();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: make_synthetic OUT_DIR TOTAL_BYTES [VERSION]");
        std::process::exit(2);
    }
    let out = Path::new(&args[1]);
    let total: u64 = args[2].parse().expect("TOTAL_BYTES");
    let version: u64 = args.get(3).map_or(0, |v| v.parse().expect("VERSION"));
    std::fs::create_dir_all(out).unwrap();

    // weights : exp_avg : exp_avg_sq = 1 : 1 : 1
    let params = (total / 3 / TENSOR_BYTES).max(1);
    let per_tensor = (total / 3 / params / 4).max(1);
    let names: Vec<(String, u64)> = (0..params)
        .map(|i| (format!("layers.{i}.weight"), per_tensor))
        .collect();
    let opt: Vec<(String, u64)> = names
        .iter()
        .flat_map(|(n, e)| {
            [
                (format!("{n}.exp_avg"), *e),
                (format!("{n}.exp_avg_sq"), *e),
            ]
        })
        .collect();

    write_file(
        &out.join("model.safetensors"),
        &names,
        &|tensor, block, buf| {
            let seed = (tensor * 1_000_003 + block) as u64;
            let mut base = Rng(seed * 2 + 1);
            let mut drift = Rng((seed + 7) * 1_000_033 + version);
            for x in buf.iter_mut() {
                let w = base.normal() * 0.02;
                *x = w + drift.normal() * 1e-4 * version as f32;
            }
        },
    );
    // Tensors alternate exp_avg, exp_avg_sq: v is the square of an m-like draw.
    write_file(
        &out.join("optimizer.safetensors"),
        &opt,
        &|tensor, block, buf| {
            let seed = (tensor * 1_000_003 + block) as u64;
            let mut rng = Rng((seed + 3) * 7_919 + version * 31);
            let is_sq = tensor % 2 == 1;
            for x in buf.iter_mut() {
                let m = rng.normal() * 1e-4;
                *x = if is_sq { m * m + 1e-12 } else { m };
            }
        },
    );
    std::fs::write(
        out.join("meta.json"),
        format!("{{\"step\": {}, \"synthetic\": true}}\n", version * 100),
    )
    .unwrap();
}
