//! Every dtype safetensors defines, empty tensors, odd lengths, multi-chunk
//! tensors and NaN/Inf payloads survive commit → checkout byte for byte.

mod common;

use common::*;

/// (dtype, bits per element)
const DTYPES: [(&str, usize); 22] = [
    ("F64", 64),
    ("F32", 32),
    ("F16", 16),
    ("BF16", 16),
    ("F8_E4M3", 8),
    ("F8_E5M2", 8),
    ("F8_E8M0", 8),
    ("F8_E4M3FNUZ", 8),
    ("F8_E5M2FNUZ", 8),
    ("F6_E2M3", 6),
    ("F6_E3M2", 6),
    ("F4", 4),
    ("C64", 64),
    ("I64", 64),
    ("I32", 32),
    ("I16", 16),
    ("I8", 8),
    ("U64", 64),
    ("U32", 32),
    ("U16", 16),
    ("U8", 8),
    ("BOOL", 8),
];

struct Lcg(u64);

impl Lcg {
    fn byte(&mut self) -> u8 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 56) as u8
    }
}

/// A safetensors file with one tensor per dtype (odd element counts), an
/// empty tensor, and a 4.4 MB F32 tensor full of NaN/Inf/denormals that
/// spans two chunks. `version` changes some bytes.
fn build(version: u64) -> Vec<u8> {
    let mut rng = Lcg(version + 1);
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    let mut add = |name: String,
                   dtype: &str,
                   shape: Vec<u64>,
                   bytes: Vec<u8>,
                   data: &mut Vec<u8>| {
        let begin = data.len();
        data.extend_from_slice(&bytes);
        header.insert(
            name,
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [begin, data.len()]}),
        );
    };
    for (i, (dtype, bits)) in DTYPES.iter().enumerate() {
        // Sub-byte dtypes need a whole number of bytes: 8 elements of any width do.
        let elements = if bits % 8 == 0 { 1001 + i as u64 } else { 1000 };
        let len = (elements as usize * bits).div_ceil(8);
        let bytes: Vec<u8> = (0..len).map(|_| rng.byte()).collect();
        add(
            format!("t.{dtype}"),
            dtype,
            vec![elements],
            bytes,
            &mut data,
        );
    }
    add("empty".into(), "F32", vec![0, 7], vec![], &mut data);
    let specials = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0, 1e-42, 3.5];
    let big: Vec<u8> = (0..1_100_003u64)
        .flat_map(|i| specials[((i + version) % 6) as usize].to_le_bytes())
        .collect();
    add("big".into(), "F32", vec![1_100_003], big, &mut data);
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let json = serde_json::to_string(&header).unwrap();
    let mut file = (json.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(json.as_bytes());
    file.extend_from_slice(&data);
    file
}

#[test]
fn all_dtypes_round_trip() {
    let env = Env::init();
    for version in [1u64, 2, 3] {
        let dir = env.path(&format!("in{version}"));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("model.safetensors"), build(version)).unwrap();
        std::fs::write(dir.join("sub/notes.txt"), format!("version {version}\n")).unwrap();
        std::fs::write(dir.join("empty.bin"), b"").unwrap();
        env.commit(&dir, version * 10);
    }
    for version in [1u64, 2, 3] {
        let out = env.checkout(&(version * 10).to_string(), &format!("out{version}"));
        assert_same_files(&env.path(&format!("in{version}")), &out);
    }
    let show = env.json(&["show", "30"]);
    let big = show["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["tensor"] == "big")
        .unwrap()
        .clone();
    assert_eq!(big["chunks"], 2, "4.4 MB tensor spans two 4 MiB chunks");
}
