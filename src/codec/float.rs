//! The float storage types lossy codecs read and write, converted to and from
//! f32 (all arithmetic is in f32; results are rounded to the stored type).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FloatType {
    F32,
    BF16,
    F16,
}

impl FloatType {
    /// The float type of a safetensors dtype name, if lossy codecs handle it.
    pub fn from_dtype(dtype: &str) -> Option<FloatType> {
        match dtype {
            "F32" => Some(FloatType::F32),
            "BF16" => Some(FloatType::BF16),
            "F16" => Some(FloatType::F16),
            _ => None,
        }
    }

    pub fn id(self) -> u8 {
        match self {
            FloatType::F32 => 0,
            FloatType::BF16 => 1,
            FloatType::F16 => 2,
        }
    }

    pub fn from_id(id: u8) -> Option<FloatType> {
        [FloatType::F32, FloatType::BF16, FloatType::F16]
            .into_iter()
            .find(|t| t.id() == id)
    }

    pub fn size(self) -> usize {
        match self {
            FloatType::F32 => 4,
            FloatType::BF16 | FloatType::F16 => 2,
        }
    }

    /// Little-endian bytes → f32 (whole elements only).
    pub fn to_f32(self, bytes: &[u8]) -> Vec<f32> {
        match self {
            FloatType::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            FloatType::BF16 => bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            FloatType::F16 => bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        }
    }

    /// f32 → little-endian bytes, rounding to nearest even.
    pub fn from_f32(self, values: &[f32]) -> Vec<u8> {
        match self {
            FloatType::F32 => values.iter().flat_map(|x| x.to_le_bytes()).collect(),
            FloatType::BF16 => values
                .iter()
                .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                .collect(),
            FloatType::F16 => values
                .iter()
                .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                .collect(),
        }
    }

    /// Rounds an f32 to what this type can hold.
    pub fn round(self, x: f32) -> f32 {
        match self {
            FloatType::F32 => x,
            FloatType::BF16 => half::bf16::from_f32(x).to_f32(),
            FloatType::F16 => half::f16::from_f32(x).to_f32(),
        }
    }
}
