//! `diff`: how two commits' tensors differ, tensor by tensor.

use crate::repo::Repo;
use std::collections::{BTreeMap, BTreeSet};

use rayon::prelude::*;
use serde::Serialize;

use super::reconstruct::{ChunkAddr, Reconstructor};
use super::rev::resolve;
use crate::codec::float::FloatType;
use crate::store::{CommitRecord, ObjectId, TensorEntry};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    Same,
    Changed,
    Added,
    Removed,
    /// dtype or shape differs: no element-wise comparison.
    Reshaped,
}

#[derive(Debug, Clone, Serialize)]
pub struct TensorDiff {
    pub file: String,
    pub tensor: String,
    pub change: Change,
    pub dtype_a: Option<String>,
    pub dtype_b: Option<String>,
    pub shape_a: Option<Vec<u64>>,
    pub shape_b: Option<Vec<u64>>,
    /// ‖B − A‖ / ‖A‖ over the elements (float dtypes, finite elements).
    pub rel_l2: Option<f64>,
    /// max |B − A| (float dtypes, finite elements).
    pub max_abs: Option<f64>,
    /// Fraction of elements whose bytes differ.
    pub changed_fraction: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DiffReport {
    pub a: String,
    pub b: String,
    pub tensors: Vec<TensorDiff>,
}

pub fn diff(store: &Repo, rev_a: &str, rev_b: &str) -> anyhow::Result<DiffReport> {
    let (id_a, id_b) = (
        resolve(store.backend(), rev_a)?,
        resolve(store.backend(), rev_b)?,
    );
    let reconstructor = Reconstructor::new(store);
    let (rec_a, rec_b) = (reconstructor.record(&id_a)?, reconstructor.record(&id_b)?);
    // Tensors by (file, name): one lookup each, in name order.
    let index = |r: &'_ CommitRecord| -> BTreeMap<(String, String), TensorEntry> {
        r.files
            .iter()
            .flat_map(|f| {
                f.tensors()
                    .iter()
                    .map(|t| ((f.name.clone(), t.name.clone()), t.clone()))
            })
            .collect()
    };
    let (a, b) = (index(&rec_a), index(&rec_b));
    let names: BTreeSet<&(String, String)> = a.keys().chain(b.keys()).collect();
    let tensors = names
        .into_par_iter()
        .map(|key| {
            let (file, name) = key;
            compare(
                &reconstructor,
                (&id_a, &id_b),
                file,
                name,
                a.get(key).cloned(),
                b.get(key).cloned(),
            )
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(DiffReport {
        a: id_a.to_hex(),
        b: id_b.to_hex(),
        tensors,
    })
}

fn compare(
    reconstructor: &Reconstructor<'_>,
    (id_a, id_b): (&ObjectId, &ObjectId),
    file: &str,
    name: &str,
    a: Option<TensorEntry>,
    b: Option<TensorEntry>,
) -> anyhow::Result<TensorDiff> {
    let mut out = TensorDiff {
        file: file.to_string(),
        tensor: name.to_string(),
        change: Change::Same,
        dtype_a: a.as_ref().map(|t| t.dtype.clone()),
        dtype_b: b.as_ref().map(|t| t.dtype.clone()),
        shape_a: a.as_ref().map(|t| t.shape.clone()),
        shape_b: b.as_ref().map(|t| t.shape.clone()),
        rel_l2: None,
        max_abs: None,
        changed_fraction: None,
    };
    let (a, b) = match (a, b) {
        (None, _) => {
            return Ok(TensorDiff {
                change: Change::Added,
                ..out
            });
        }
        (_, None) => {
            return Ok(TensorDiff {
                change: Change::Removed,
                ..out
            });
        }
        (Some(a), Some(b)) if a.dtype != b.dtype || a.shape != b.shape => {
            return Ok(TensorDiff {
                change: Change::Reshaped,
                ..out
            });
        }
        (Some(a), Some(b)) => (a, b),
    };
    let element = a.element_size();
    let float = FloatType::from_dtype(&a.dtype);
    let mut sums = Sums::default();
    for index in 0..a.chunks.len().max(b.chunks.len()) {
        let addr = ChunkAddr {
            file,
            tensor: Some(name),
            index,
        };
        let (bytes_a, bytes_b) = if a.chunks.get(index) == b.chunks.get(index) {
            // Same reference: same bytes, no need to decode.
            let n = a.chunks.get(index).map_or(0, |c| c.raw_len) as usize / element;
            sums.elements += n;
            if let Some(f) = float {
                let values = f.to_f32(&reconstructor.chunk(id_a, addr)?);
                sums.norm += values
                    .iter()
                    .filter(|x| x.is_finite())
                    .map(|&x| (x as f64).powi(2))
                    .sum::<f64>();
            }
            continue;
        } else {
            (
                reconstructor.chunk(id_a, addr)?,
                reconstructor.chunk(id_b, addr)?,
            )
        };
        sums.add(&bytes_a, &bytes_b, element, float);
    }
    out.changed_fraction = Some(if sums.elements == 0 {
        0.0
    } else {
        sums.changed as f64 / sums.elements as f64
    });
    if float.is_some() {
        out.rel_l2 = Some(if sums.norm > 0.0 {
            (sums.err / sums.norm).sqrt()
        } else if sums.err > 0.0 {
            f64::INFINITY
        } else {
            0.0
        });
        out.max_abs = Some(sums.max_abs);
    }
    out.change = if sums.changed > 0 {
        Change::Changed
    } else {
        Change::Same
    };
    Ok(out)
}

#[derive(Default)]
struct Sums {
    elements: usize,
    changed: usize,
    err: f64,
    norm: f64,
    max_abs: f64,
}

impl Sums {
    fn add(&mut self, a: &[u8], b: &[u8], element: usize, float: Option<FloatType>) {
        self.elements += a.len() / element;
        self.changed += a
            .chunks_exact(element)
            .zip(b.chunks_exact(element))
            .filter(|(x, y)| x != y)
            .count();
        if let Some(f) = float {
            for (x, y) in f.to_f32(a).into_iter().zip(f.to_f32(b)) {
                if x.is_finite() && y.is_finite() {
                    let d = (y - x) as f64;
                    self.err += d * d;
                    self.norm += (x as f64) * (x as f64);
                    self.max_abs = self.max_abs.max(d.abs());
                }
            }
        }
    }
}
