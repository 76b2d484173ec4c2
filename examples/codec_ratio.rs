//! Compression of the `keyframe` codec against plain zstd -3 of the same raw
//! tensor bytes, over the tensors of every safetensors file in the given
//! checkpoint directories.
//!
//! Usage: cargo run --release --example codec_ratio -- DIR [DIR...]

use std::path::Path;

use ckptvc::codec;
use ckptvc::format::safetensors::element_size;
use ckptvc::format::{Checkpoint, InputKind};

fn main() {
    let dirs: Vec<String> = std::env::args().skip(1).collect();
    let (mut raw, mut zstd3, mut keyframe) = (0u64, 0u64, 0u64);
    for dir in &dirs {
        let checkpoint = Checkpoint::open(Path::new(dir)).expect("checkpoint");
        for file in &checkpoint.files {
            let InputKind::Safetensors(header) = &file.kind else {
                continue;
            };
            for t in &header.tensors {
                let start = (header.data_start() + t.begin) as usize;
                let bytes = &file.bytes()[start..start + t.byte_len() as usize];
                raw += bytes.len() as u64;
                zstd3 += zstd::bulk::compress(bytes, 3).expect("zstd").len() as u64;
                for chunk in bytes.chunks(4 << 20) {
                    keyframe += codec::encode_keyframe(chunk, element_size(t.dtype)).len() as u64;
                }
            }
        }
    }
    println!("tensor bytes        {raw}");
    println!(
        "zstd -3             {zstd3}  ratio {:.4}",
        raw as f64 / zstd3 as f64
    );
    println!(
        "keyframe codec      {keyframe}  ratio {:.4}",
        raw as f64 / keyframe as f64
    );
    println!(
        "keyframe vs zstd -3 {:.4}x smaller",
        zstd3 as f64 / keyframe as f64
    );
}
