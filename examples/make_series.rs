//! Writes a synthetic training run for benchmarks: `COUNT` checkpoints of a
//! transformer-shaped fp32 model of about `MODEL_BYTES`, each with Adam's
//! moments, as `OUT_DIR/ck-1` … `OUT_DIR/ck-COUNT`. Each checkpoint folder
//! holds `model.safetensors`, `optimizer.safetensors` (`<name>.exp_avg`,
//! `<name>.exp_avg_sq`) and `meta.json`: three times the model size.
//!
//! Unlike `make_synthetic`, the states are not drawn afresh per checkpoint:
//! the run is simulated. Every optimizer step draws a gradient (a persistent
//! per-weight direction plus noise, so moments correlate over time), updates
//! m and v with Adam's recurrences (β1 = 0.9, β2 = 0.999) and moves every
//! weight by `lr · m̂ / (√v̂ + ε)`. Checkpoints are `STEPS_PER_CHECKPOINT`
//! steps apart after a warm-up, so successive checkpoints differ the way a
//! real run's do: every weight changes a little, m and v drift.
//!
//! Usage: cargo run --release --example make_series -- OUT_DIR MODEL_BYTES COUNT
//! (env `STEPS_PER_CHECKPOINT`, default 10; `WARMUP_STEPS`, default 20;
//! `SEED`, default 0: another seed makes another run of the same shape)

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use rayon::prelude::*;

/// splitmix64 of a counter: a stateless generator, so every element's
/// random stream can be computed in parallel from (seed, index).
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Approximately standard normal from one 64-bit draw (sum of four 16-bit
/// uniforms, rescaled to unit variance).
fn normal(bits: u64) -> f32 {
    let mut s = 0.0f32;
    for k in 0..4 {
        s += ((bits >> (16 * k)) & 0xFFFF) as f32 / 65536.0;
    }
    (s - 2.0) * 1.732
}

/// Transformer-like tensor list: (name, shape), about `model_bytes` of fp32.
fn layout(model_bytes: u64) -> Vec<(String, Vec<u64>)> {
    let d = 1024u64;
    let per_layer = 12 * d * d + 4 * d;
    let embed_rows = 16_000u64;
    let budget = model_bytes / 4;
    let layers = (budget.saturating_sub(embed_rows * d) / per_layer).max(1);
    let mut tensors = vec![("embed.weight".to_string(), vec![embed_rows, d])];
    for l in 0..layers {
        let p = format!("layers.{l}");
        tensors.push((format!("{p}.attn_norm.weight"), vec![d]));
        tensors.push((format!("{p}.attn.qkv.weight"), vec![3 * d, d]));
        tensors.push((format!("{p}.attn.out.weight"), vec![d, d]));
        tensors.push((format!("{p}.mlp_norm.weight"), vec![d]));
        tensors.push((format!("{p}.mlp.up.weight"), vec![4 * d, d]));
        tensors.push((format!("{p}.mlp.down.weight"), vec![d, 4 * d]));
        tensors.push((format!("{p}.attn.qkv.bias"), vec![3 * d]));
        tensors.push((format!("{p}.mlp.up.bias"), vec![d]));
    }
    tensors.push(("final_norm.weight".to_string(), vec![d]));
    tensors
}

struct State {
    w: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    step: u64,
}

const BLOCK: usize = 1 << 16;

/// Salt of every element's random stream (`SEED`).
fn salt() -> u64 {
    env_u64("SEED", 0).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

impl State {
    fn new(len: usize, norms: &[(usize, usize)]) -> State {
        let mut w = vec![0f32; len];
        let salt = salt();
        w.par_chunks_mut(BLOCK).enumerate().for_each(|(b, block)| {
            for (i, x) in block.iter_mut().enumerate() {
                *x = normal(mix(((b * BLOCK + i) as u64 ^ salt) ^ 0xA5A5_0000_0000)) * 0.02;
            }
        });
        // Norm weights start at one, as in a real model.
        for &(start, len) in norms {
            w[start..start + len].fill(1.0);
        }
        State {
            w,
            m: vec![0f32; len],
            v: vec![0f32; len],
            step: 0,
        }
    }

    fn adam_step(&mut self, lr: f32) {
        let (b1, b2, eps) = (0.9f32, 0.999f32, 1e-8f32);
        self.step += 1;
        let t = self.step as i32;
        let c1 = 1.0 - b1.powi(t);
        let c2 = 1.0 - b2.powi(t);
        let step = self.step;
        let salt = salt();
        self.w
            .par_chunks_mut(BLOCK)
            .zip(self.m.par_chunks_mut(BLOCK))
            .zip(self.v.par_chunks_mut(BLOCK))
            .enumerate()
            .for_each(|(b, ((w, m), v))| {
                for i in 0..w.len() {
                    let index = (b * BLOCK + i) as u64 ^ salt;
                    // A per-weight direction that persists, scaled per
                    // weight over four orders of magnitude, plus noise.
                    let fixed = mix(index ^ 0x5EED_0000_0000_0000);
                    let scale = 1e-5 * 10f32.powf(4.0 * ((fixed >> 40) as f32 / 16_777_216.0));
                    let g = scale * (0.3 * normal(fixed) + normal(mix(index ^ (step << 40))));
                    m[i] = b1 * m[i] + (1.0 - b1) * g;
                    v[i] = b2 * v[i] + (1.0 - b2) * g * g;
                    let update = (m[i] / c1) / ((v[i] / c2).sqrt() + eps);
                    w[i] -= lr * update;
                }
            });
    }
}

fn write_safetensors(path: &Path, tensors: &[(String, Vec<u64>, &[f32])]) {
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    for (name, shape, data) in tensors {
        let bytes = data.len() as u64 * 4;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut json = serde_json::to_string(&header).unwrap();
    while !json.len().is_multiple_of(8) {
        json.push(' ');
    }
    let mut out = BufWriter::with_capacity(8 << 20, File::create(path).unwrap());
    out.write_all(&(json.len() as u64).to_le_bytes()).unwrap();
    out.write_all(json.as_bytes()).unwrap();
    for (_, _, data) in tensors {
        for block in data.chunks(1 << 20) {
            let bytes: Vec<u8> = block.iter().flat_map(|x| x.to_le_bytes()).collect();
            out.write_all(&bytes).unwrap();
        }
    }
    out.flush().unwrap();
}

fn write_checkpoint(dir: &Path, tensors: &[(String, Vec<u64>)], state: &State) {
    std::fs::create_dir_all(dir).unwrap();
    let mut start = 0usize;
    let mut model = Vec::new();
    let mut optimizer = Vec::new();
    for (name, shape) in tensors {
        let len = shape.iter().product::<u64>() as usize;
        let range = start..start + len;
        model.push((name.clone(), shape.clone(), &state.w[range.clone()]));
        optimizer.push((
            format!("{name}.exp_avg"),
            shape.clone(),
            &state.m[range.clone()],
        ));
        optimizer.push((format!("{name}.exp_avg_sq"), shape.clone(), &state.v[range]));
        start += len;
    }
    write_safetensors(&dir.join("model.safetensors"), &model);
    write_safetensors(&dir.join("optimizer.safetensors"), &optimizer);
    std::fs::write(
        dir.join("meta.json"),
        format!("{{\"step\": {}, \"synthetic\": true}}\n", state.step),
    )
    .unwrap();
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).map_or(default, |v| v.parse().expect(name))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: make_series OUT_DIR MODEL_BYTES COUNT");
        std::process::exit(2);
    }
    let out = Path::new(&args[1]);
    let model_bytes: u64 = args[2].parse().expect("MODEL_BYTES");
    let count: u64 = args[3].parse().expect("COUNT");
    let per_checkpoint = env_u64("STEPS_PER_CHECKPOINT", 10);
    let warmup = env_u64("WARMUP_STEPS", 20);

    let tensors = layout(model_bytes);
    let mut norms = Vec::new();
    let mut len = 0usize;
    for (name, shape) in &tensors {
        let n = shape.iter().product::<u64>() as usize;
        if name.ends_with("norm.weight") {
            norms.push((len, n));
        }
        len += n;
    }
    eprintln!(
        "{} tensors, {len} parameters ({:.2} GiB per state)",
        tensors.len(),
        len as f64 * 4.0 / (1u64 << 30) as f64
    );
    let mut state = State::new(len, &norms);
    let lr = 3e-5;
    for _ in 0..warmup {
        state.adam_step(lr);
    }
    for k in 1..=count {
        for _ in 0..per_checkpoint {
            state.adam_step(lr);
        }
        let dir = out.join(format!("ck-{k}"));
        write_checkpoint(&dir, &tensors, &state);
        eprintln!("{} (step {})", dir.display(), state.step);
    }
}
