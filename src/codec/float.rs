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
            FloatType::F32 => unpack(bytes, |b: [u8; 4]| f32::from_le_bytes(b)),
            FloatType::BF16 => unpack(bytes, |b| half::bf16::from_le_bytes(b).to_f32()),
            FloatType::F16 => unpack(bytes, |b| half::f16::from_le_bytes(b).to_f32()),
        }
    }

    /// f32 → little-endian bytes, rounding to nearest even.
    pub fn from_f32(self, values: &[f32]) -> Vec<u8> {
        match self {
            FloatType::F32 => {
                // Not `flat_map(..).collect()`: this form compiles to a copy.
                let mut out = vec![0u8; values.len() * 4];
                for (o, x) in out.chunks_exact_mut(4).zip(values) {
                    o.copy_from_slice(&x.to_le_bytes());
                }
                out
            }
            FloatType::BF16 => pack16(values, |x| half::bf16::from_f32(x).to_le_bytes()),
            FloatType::F16 => pack16(values, |x| half::f16::from_f32(x).to_le_bytes()),
        }
    }

    /// `values` as stored bytes: borrowed for f32 on little-endian machines
    /// (the values already are the bytes), converted otherwise.
    pub fn bytes_of(self, values: &[f32]) -> std::borrow::Cow<'_, [u8]> {
        if self == FloatType::F32 && cfg!(target_endian = "little") {
            std::borrow::Cow::Borrowed(crate::format::as_bytes(values))
        } else {
            std::borrow::Cow::Owned(self.from_f32(values))
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
/// Little-endian values of `N` bytes each, converted. An explicit loop into
/// a sized buffer, not `collect()`: for f32 this compiles to a copy.
fn unpack<const N: usize>(bytes: &[u8], convert: impl Fn([u8; N]) -> f32) -> Vec<f32> {
    let mut out = vec![0f32; bytes.len() / N];
    for (o, b) in out.iter_mut().zip(bytes.chunks_exact(N)) {
        *o = convert(b.try_into().expect("chunks of N bytes"));
    }
    out
}

/// 16-bit values packed into little-endian bytes.
fn pack16(values: &[f32], convert: impl Fn(f32) -> [u8; 2]) -> Vec<u8> {
    let mut out = vec![0u8; values.len() * 2];
    for (o, &x) in out.chunks_exact_mut(2).zip(values) {
        o.copy_from_slice(&convert(x));
    }
    out
}
