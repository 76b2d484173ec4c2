//! Writes a seed corpus for each fuzz target into `fuzz/corpus/<target>/`:
//! valid blobs of every codec, rANS streams, quantized payloads and small
//! safetensors files, so that fuzzing starts from inputs that get deep into
//! the decoders instead of failing at the first header byte.
//!
//! Run: `cargo +nightly run --release --example seeds` in `fuzz/`.

use std::path::Path;

use ckptvc::codec::float::FloatType;
use ckptvc::codec::quant::{self, Domain, ESCAPE, Levels, Quantized};
use ckptvc::codec::{self, rans};

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    std::fs::create_dir_all(&dir).expect("create corpus dir");
    std::fs::write(dir.join(name), bytes).expect("write seed");
}

fn floats(n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7919 % 101) as f32 - 50.0) * scale)
        .collect()
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn quantized(domain: Domain, float: FloatType, levels: Levels, n: usize) -> Quantized {
    let count = levels.table().len() as u8;
    let symbols: Vec<u8> = (0..n)
        .map(|i| {
            if i % 37 == 5 {
                ESCAPE
            } else {
                (i * 31 % count as usize) as u8
            }
        })
        .collect();
    let escapes = symbols
        .iter()
        .filter(|&&s| s == ESCAPE)
        .enumerate()
        .map(|(i, _)| if i == 1 { f32::NAN } else { i as f32 })
        .collect();
    Quantized {
        domain,
        float,
        side: None,
        predictor: None,
        levels,
        symbols,
        escapes,
    }
}

/// A prefix of 3 bytes (symbol count, as the rANS and quant targets read it)
/// and then the stream.
fn with_count(n: usize, stream: &[u8]) -> Vec<u8> {
    let mut out = (n as u32).to_le_bytes()[..3].to_vec();
    out.extend_from_slice(stream);
    out
}

/// The hostile-input corpus of the integration tests (tests/data/corpus),
/// small files only: libFuzzer works on inputs of a few KiB.
fn safetensors_seeds() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/corpus");
    for entry in std::fs::read_dir(corpus)
        .expect("tests/data/corpus")
        .flatten()
    {
        let path = entry.path();
        if path.is_file() && entry.metadata().is_ok_and(|m| m.len() < 64 << 10) {
            let name = path.file_name().expect("file name").to_string_lossy();
            write(
                "safetensors_header",
                &name,
                &std::fs::read(&path).expect("read seed"),
            );
        }
    }
}

/// The small torch files of the Trainer fixture (the optimizer's is 600 KB,
/// too slow to mutate; its pickle opcodes also appear in rng_state.pth).
fn torch_seeds() {
    let run = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/trainer-run/checkpoint-10");
    for name in ["rng_state.pth", "scheduler.pt", "training_args.bin"] {
        let bytes = std::fs::read(run.join(name)).expect("fixture torch file");
        write("torch_file", name, &bytes);
    }
}

fn main() {
    safetensors_seeds();
    torch_seeds();
    let raw = f32_bytes(&floats(300, 0.01));
    let base = f32_bytes(&floats(300, 0.0101));
    write(
        "blob_decode",
        "zstd",
        &codec::encode_zstd(b"opaque file bytes, opaque file bytes"),
    );
    write("blob_decode", "keyframe", &codec::encode_keyframe(&raw, 4));
    write(
        "blob_decode",
        "keyframe-bf16",
        &codec::encode_keyframe(&raw[..301], 2),
    );
    write(
        "blob_decode",
        "xor-delta",
        &codec::encode_xor_delta(&raw, &base, 4),
    );
    let cases = [
        (
            "value-table",
            Domain::Value,
            FloatType::F32,
            Levels::Table(vec![0.0, 0.5, -0.5, 2.0]),
        ),
        (
            "residual-linear",
            Domain::Residual,
            FloatType::F32,
            Levels::Linear(1e-3),
        ),
        (
            "ratio-exp",
            Domain::Ratio,
            FloatType::F32,
            Levels::Exp(0.01),
        ),
        (
            "residual-bf16",
            Domain::Residual,
            FloatType::BF16,
            Levels::Linear(1e-2),
        ),
        (
            "value-f16",
            Domain::Value,
            FloatType::F16,
            Levels::Table(vec![1.0, 3.0]),
        ),
        (
            "scaled-residual",
            Domain::ScaledResidual,
            FloatType::F32,
            Levels::Linear(0.1),
        ),
        (
            "scaled-value-bf16",
            Domain::ScaledValue,
            FloatType::BF16,
            Levels::Linear(0.1),
        ),
        (
            "predicted-residual",
            Domain::PredictedResidual,
            FloatType::F32,
            Levels::Linear(0.1),
        ),
    ];
    for (name, domain, float, levels) in cases {
        let mut q = quantized(domain, float, levels, 200);
        if domain.needs_side() {
            q.side = Some(quant::Side {
                tensor: "w.exp_avg_sq".into(),
                float,
                floor: 1e-8,
            });
        }
        if domain.needs_prediction() {
            q.predictor = Some(quant::Predictor {
                file: "optimizer.safetensors".into(),
                m: "w.exp_avg".into(),
                v: "w.exp_avg_sq".into(),
                m_float: float,
                v_float: float,
                floor: 1e-8,
                coef: [-1e-3, 2e-4, -1e-5],
            });
        }
        write(
            "blob_decode",
            &format!("quant-{name}"),
            &codec::encode_quant(&q),
        );
        let mut payload = Vec::new();
        quant::write_payload(&q, &mut payload);
        write("quant_payload", name, &with_count(200, &payload));
    }
    for (name, symbols) in [
        (
            "skewed",
            (0..500)
                .map(|i| if i % 9 == 0 { 3 } else { 0 })
                .collect::<Vec<u8>>(),
        ),
        ("uniform", (0..500).map(|i| (i % 256) as u8).collect()),
        ("constant", vec![7; 1000]),
        ("empty", vec![]),
        // Extended streams (run- and tuple-coded) need 4096 symbols or more.
        (
            "runs",
            (0..6000u32)
                .map(|i| if i % 37 == 0 { (i % 5) as u8 + 1 } else { 0 })
                .collect(),
        ),
        (
            "tuples",
            (0..6000u32)
                .map(|i| [4u8, 4, 5, 4, 9][(i * 7 % 5) as usize])
                .collect(),
        ),
    ] {
        let mut stream = Vec::new();
        rans::encode(&symbols, &mut stream);
        write("rans_decode", name, &with_count(symbols.len(), &stream));
    }
}
