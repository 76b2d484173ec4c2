//! Which parameter each optimizer state entry belongs to.
//!
//! A torch optimizer state dict keys its state by parameter *index*; the
//! names live only in the training script. The lossy policies code a weight
//! with its Adam moments, so they need the pairing, and a wrong pairing would
//! shrink moments by the wrong weight's importance. So we pair only where the
//! answer is certain, and otherwise leave the entry unpaired (stored exactly,
//! under its index name). The rules, strongest first:
//!
//! 1. **Names file.** `ckptvc-params.json` in the checkpoint folder, written
//!    by `python/ckptvc_torch.py` from the live optimizer, lists the name of
//!    every index. An entry is paired with the model tensor of that name when
//!    the shapes agree; if any shape disagrees the file is not trusted at all.
//! 2. **Unique shapes, Trainer folders only.** The Hugging Face Trainer
//!    builds its optimizer from the model's own parameters (split into decay /
//!    no-decay groups, so indices do not follow the model file's order), and
//!    `model*.safetensors` holds every parameter. An entry whose shape no
//!    other entry has, matching the one model tensor of that shape, can only
//!    be that parameter. Outside a Trainer folder (`trainer_state.json`) the
//!    optimizer may hold parameters the model file does not, so shapes prove
//!    nothing and this rule is not used.
//!
//! The order of a `pytorch_model.bin` is not used: the Trainer's decay split
//! reorders the indices, and a custom optimizer may order them any way.

use std::collections::HashMap;

use serde::Deserialize;

/// The names file the Python helper writes next to a checkpoint.
pub const NAMES_FILE: &str = "ckptvc-params.json";

/// The Trainer writes this file last; its presence marks a Trainer folder.
pub const TRAINER_STATE: &str = "trainer_state.json";

/// How the entries of one optimizer file were paired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FilePairing {
    /// The rule that paired them, e.g. "names file" or "unique shapes".
    pub rule: String,
    /// (index, parameter name), for every paired index.
    pub paired: Vec<(i64, String)>,
    /// Indices left unpaired.
    pub unpaired: Vec<i64>,
}

/// What pairing needs to know about one optimizer file.
pub struct OptimizerView<'a> {
    /// Parameter indices in `param_groups` order.
    pub params: &'a [i64],
    /// Shape of each index's `exp_avg` (absent before its first step).
    pub shapes: HashMap<i64, &'a [u64]>,
}

/// Pairs the indices of `optimizer` with the tensors of `model` (name →
/// shape). `names_file` is the content of [`NAMES_FILE`], if present.
pub fn pair(
    optimizer: &OptimizerView<'_>,
    model: &HashMap<&str, &[u64]>,
    names_file: Option<&[u8]>,
    trainer_folder: bool,
    notes: &mut Vec<String>,
) -> FilePairing {
    if let Some(bytes) = names_file {
        match by_names(optimizer, model, bytes) {
            Ok(pairing) => return pairing,
            Err(why) => notes.push(format!("{NAMES_FILE} not used: {why}")),
        }
    }
    if trainer_folder {
        return by_unique_shapes(optimizer, model);
    }
    FilePairing {
        rule: "none (no names file, not a Trainer folder)".into(),
        paired: Vec::new(),
        unpaired: optimizer.params.to_vec(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NamesFile {
    version: u32,
    /// Parameter names by optimizer index.
    params: Vec<String>,
}

fn by_names(
    optimizer: &OptimizerView<'_>,
    model: &HashMap<&str, &[u64]>,
    bytes: &[u8],
) -> Result<FilePairing, String> {
    let file: NamesFile = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if file.version != 1 {
        return Err(format!("version {} is not supported", file.version));
    }
    let mut pairing = FilePairing {
        rule: "names file".into(),
        ..FilePairing::default()
    };
    for &index in optimizer.params {
        let name = usize::try_from(index)
            .ok()
            .and_then(|i| file.params.get(i))
            .ok_or_else(|| format!("it names no parameter {index}"))?;
        let shape = optimizer.shapes.get(&index).copied();
        match (model.get(name.as_str()), shape) {
            (Some(&model_shape), Some(shape)) if model_shape == shape => {
                pairing.paired.push((index, name.clone()));
            }
            (Some(model_shape), Some(shape)) => {
                return Err(format!(
                    "parameter {index} `{name}` has shape {shape:?} in the optimizer but {model_shape:?} in the model"
                ));
            }
            // Not in the model files (a tied weight saved under its other
            // name) or no moments yet: nothing to pair.
            _ => pairing.unpaired.push(index),
        }
    }
    Ok(pairing)
}

fn by_unique_shapes(optimizer: &OptimizerView<'_>, model: &HashMap<&str, &[u64]>) -> FilePairing {
    let mut model_by_shape: HashMap<&[u64], Vec<&str>> = HashMap::new();
    for (&name, &shape) in model {
        model_by_shape.entry(shape).or_default().push(name);
    }
    let mut entries_by_shape: HashMap<&[u64], usize> = HashMap::new();
    for &i in optimizer.params {
        if let Some(&shape) = optimizer.shapes.get(&i) {
            *entries_by_shape.entry(shape).or_default() += 1;
        }
    }
    let mut pairing = FilePairing {
        rule: "unique shapes (Trainer folder)".into(),
        ..FilePairing::default()
    };
    for &index in optimizer.params {
        let unique = optimizer.shapes.get(&index).and_then(|&s| {
            let names = model_by_shape.get(s)?;
            (names.len() == 1 && entries_by_shape[s] == 1).then(|| names[0])
        });
        match unique {
            Some(name) => pairing.paired.push((index, name.to_string())),
            None => pairing.unpaired.push(index),
        }
    }
    pairing
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view<'a>(params: &'a [i64], shapes: &'a [Vec<u64>]) -> OptimizerView<'a> {
        let shapes = (0..).zip(shapes).map(|(i, s)| (i, s.as_slice())).collect();
        OptimizerView { params, shapes }
    }

    #[test]
    fn unique_shapes_pair_only_what_is_forced() {
        let shapes = vec![vec![8, 4], vec![4], vec![4], vec![16]];
        let model: HashMap<&str, &[u64]> = [
            ("emb", &[8u64, 4][..]),
            ("ln.w", &[4][..]),
            ("ln.b", &[4][..]),
            ("head", &[16][..]),
            ("buf", &[16][..]),
        ]
        .into();
        let p = pair(
            &view(&[0, 1, 2, 3], &shapes),
            &model,
            None,
            true,
            &mut vec![],
        );
        // [4] is ambiguous among the entries, [16] among the model tensors.
        assert_eq!(p.paired, vec![(0, "emb".to_string())]);
        assert_eq!(p.unpaired, vec![1, 2, 3]);
        let outside = pair(
            &view(&[0, 1, 2, 3], &shapes),
            &model,
            None,
            false,
            &mut vec![],
        );
        assert!(
            outside.paired.is_empty(),
            "shapes prove nothing outside a Trainer folder"
        );
    }

    #[test]
    fn a_names_file_pairs_everything_or_is_not_trusted() {
        let shapes = vec![vec![4], vec![4]];
        let model: HashMap<&str, &[u64]> = [("a", &[4u64][..]), ("b", &[4][..])].into();
        let names = br#"{"version": 1, "params": ["b", "a"]}"#;
        let p = pair(
            &view(&[0, 1], &shapes),
            &model,
            Some(names),
            false,
            &mut vec![],
        );
        assert_eq!(p.paired, vec![(0, "b".into()), (1, "a".into())]);
        let wrong = vec![vec![4], vec![5]];
        let mut notes = vec![];
        let p = pair(
            &view(&[0, 1], &wrong),
            &model,
            Some(names),
            true,
            &mut notes,
        );
        assert_eq!(p.rule, "unique shapes (Trainer folder)");
        assert!(notes[0].contains("shape"), "{notes:?}");
        let short = br#"{"version": 1, "params": ["a"]}"#;
        let p = pair(
            &view(&[0, 1], &shapes),
            &model,
            Some(short),
            false,
            &mut notes,
        );
        assert!(p.paired.is_empty());
    }
}
