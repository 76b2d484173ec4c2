//! DeepSpeed ZeRO checkpoints (`global_stepN/`): each rank's optimizer file
//! `zero_pp_rank_K_mp_rank_00_optim_states.pt` holds flat fp32 partitions
//! (the master weights) and their Adam moments, one flat tensor per
//! parameter group. This module cuts those flat storages back into the
//! parameters' pieces, named `fc1.weight[0:4096]` (elements of the
//! flattened parameter), `….exp_avg`, `….exp_avg_sq`, so the lossy policies
//! code each piece of master weight with its own moments, as for any
//! parameter. The cuts cover each storage exactly, padding included (as
//! pieces of their own), so a checkout writes the same bytes back.
//!
//! Where the pieces are, as DeepSpeed's `zero_to_fp32.py` reassembles them
//! (`param_shapes` from the model states file gives names and sizes, per
//! parameter group, in flat order; W is the data-parallel world size):
//! - **ZeRO-1/2**: a group's parameters lie back to back (each followed by
//!   `param_alignment_paddings` zeros, normally none), the group is padded to
//!   a multiple of 2·W and cut into W equal slices; rank r's fp32 storage
//!   and moments hold slice r (the last rank's fp32 *tensor* is a view
//!   without the padding, its storage is the whole slice).
//! - **ZeRO-3**: every parameter of n elements puts ⌈n/W⌉ elements in each
//!   rank's flat group, at the same offset on every rank; the last rank's
//!   piece ends in padding (whose bytes are arbitrary, NaN seen).
//!
//! A file whose layout does not add up is left as read (whole flat
//! tensors, coded losslessly when unpaired), with a note.

use std::collections::HashMap;

use super::safetensors::TensorInfo;
use super::torch::TorchFile;
use super::torch::pickle::{Id, Node, Pickle, torch_size};
use super::{InputFile, InputKind, torch};

/// One parameter's place in a flat group: (name, elements, padding after).
type ParamSlot = (String, u64, u64);

/// A contiguous run of a flat storage, in elements.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Piece {
    /// `Some((parameter, lo, hi))` for a parameter's elements, `None` for
    /// padding.
    param: Option<(String, u64, u64)>,
    start: u64,
    len: u64,
}

/// Finds every ZeRO optimizer file among `files` and cuts its flat
/// partitions into parameter pieces.
pub(crate) fn read_zero_directories(files: &mut [InputFile], notes: &mut Vec<String>) {
    let optimizer_files: Vec<usize> = (0..files.len())
        .filter(|&i| {
            rank_of(&files[i].name).is_some() && files[i].name.ends_with("optim_states.pt")
        })
        .collect();
    let mut shapes_by_dir: HashMap<String, Option<Vec<Vec<ParamSlot>>>> = HashMap::new();
    for fi in optimizer_files {
        let dir = parent(&files[fi].name).to_string();
        let shapes = shapes_by_dir
            .entry(dir.clone())
            .or_insert_with(|| param_shapes(files, &dir))
            .clone();
        let Some(shapes) = shapes else {
            notes.push(format!(
                "{}: its flat partitions stay whole (no model states file with `param_shapes` beside it)",
                files[fi].name
            ));
            continue;
        };
        if let Err(why) = split_file(&mut files[fi], &shapes) {
            notes.push(format!(
                "{}: its flat partitions stay whole: {why}",
                files[fi].name
            ));
        }
    }
}

fn parent(name: &str) -> &str {
    name.rsplit_once('/').map_or("", |(dir, _)| dir)
}

fn rank_of(name: &str) -> Option<u64> {
    let base = name.rsplit('/').next()?;
    let rest = &base[base.find("zero_pp_rank_")? + "zero_pp_rank_".len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// `param_shapes` of the directory's model states file (`mp_rank_00_…` under
/// ZeRO-1/2, `zero_pp_rank_0_…` under ZeRO-3): per group, (name, numel).
fn param_shapes(files: &[InputFile], dir: &str) -> Option<Vec<Vec<ParamSlot>>> {
    let mut candidates: Vec<&InputFile> = files
        .iter()
        .filter(|f| parent(&f.name) == dir && f.name.ends_with("model_states.pt"))
        .collect();
    candidates.sort_by_key(|f| rank_of(&f.name).unwrap_or(0));
    let file = candidates.first()?;
    let p = torch::parse_pickle(file.bytes()).ok()?;
    let groups = p.seq(p.get(p.root, "param_shapes")?)?;
    groups
        .iter()
        .map(|&g| {
            p.dict(g)?
                .iter()
                .map(|&(k, v)| {
                    let numel = torch_size(&p, v).ok()?.iter().product();
                    Some((p.str(k)?.to_string(), numel, 0))
                })
                .collect()
        })
        .collect()
}

/// The storages of one flat group in an optimizer file: tensor indices of
/// the fp32 partition and its two moments.
struct FlatGroup {
    w: usize,
    m: usize,
    v: usize,
}

fn split_file(file: &mut InputFile, shapes: &[Vec<ParamSlot>]) -> Result<(), String> {
    let rank = rank_of(&file.name).ok_or("no rank in the name")?;
    let p = torch::parse_pickle(file.bytes())?;
    let InputKind::Torch(torch) = &mut file.kind else {
        return Err("not read as a torch file".into());
    };
    let osd = p
        .get(p.root, "optimizer_state_dict")
        .ok_or("no `optimizer_state_dict`")?;
    let stage = zero_stage(&p, osd).ok_or("no `zero_stage`")?;
    let world = partition_count(&p, osd).ok_or("no `partition_count`")?;
    if rank >= world {
        return Err(format!("rank {rank} of {world}"));
    }
    let (flat_key, inner) = if stage >= 3 {
        ("fp32_flat_groups", "optimizer_state_dict")
    } else {
        ("single_partition_of_fp32_groups", "base_optimizer_state")
    };
    let groups = p
        .seq(p.get(osd, flat_key).ok_or(format!("no `{flat_key}`"))?)
        .ok_or("flat groups are not a list")?
        .len();
    if groups != shapes.len() {
        return Err(format!(
            "{groups} flat groups but {} groups of param_shapes",
            shapes.len()
        ));
    }
    let paddings = alignment_paddings(&p, osd);
    let mut cuts: Vec<(usize, Vec<Piece>, &str)> = Vec::new();
    for (g, group_shapes) in shapes.iter().enumerate() {
        let state_index = state_index(&p, osd, inner, g).ok_or("no param_groups params")?;
        let prefix = format!("optimizer_state_dict.{inner}.state.{state_index}");
        let flat = FlatGroup {
            w: storage_of(torch, &format!("optimizer_state_dict.{flat_key}.{g}"))?,
            m: storage_of(torch, &format!("{prefix}.exp_avg"))?,
            v: storage_of(torch, &format!("{prefix}.exp_avg_sq"))?,
        };
        let numel = |i: usize| torch.tensors[i].shape.iter().product::<u64>();
        let slice = numel(flat.w);
        if numel(flat.m) != slice || numel(flat.v) != slice {
            return Err(format!(
                "group {g}: fp32 storage of {slice} elements but moments of {} and {}",
                numel(flat.m),
                numel(flat.v)
            ));
        }
        let mut params = group_shapes.clone();
        if let Some(pads) = paddings.as_ref().and_then(|p| p.get(g)) {
            for (slot, &pad) in params.iter_mut().zip(pads) {
                slot.2 = pad;
            }
        }
        let pieces = if stage >= 3 {
            zero3_pieces(&params, rank, world, slice)?
        } else {
            zero12_pieces(&params, rank, world, slice)?
        };
        cuts.push((flat.w, pieces.clone(), ""));
        cuts.push((flat.m, pieces.clone(), ".exp_avg"));
        cuts.push((flat.v, pieces, ".exp_avg_sq"));
    }
    apply_cuts(torch, cuts);
    Ok(())
}

/// Pieces of rank `rank`'s slice under ZeRO-1/2.
fn zero12_pieces(
    params: &[ParamSlot],
    rank: u64,
    world: u64,
    slice: u64,
) -> Result<Vec<Piece>, String> {
    let total: u64 = params.iter().map(|(_, n, pad)| n + pad).sum();
    if total > slice * world || slice * world - total >= slice {
        return Err(format!(
            "{total} parameter elements do not fill {world} slices of {slice}"
        ));
    }
    let (from, to) = (rank * slice, (rank + 1) * slice);
    let mut pieces = Vec::new();
    let mut at = 0u64;
    for (name, n, pad) in params {
        let (lo, hi) = (at.max(from), (at + n).min(to));
        if lo < hi {
            pieces.push(Piece {
                param: Some((name.clone(), lo - at, hi - at)),
                start: lo - from,
                len: hi - lo,
            });
        }
        at += n + pad;
    }
    Ok(fill_gaps(pieces, slice))
}

/// Pieces of rank `rank`'s flat group under ZeRO-3.
fn zero3_pieces(
    params: &[ParamSlot],
    rank: u64,
    world: u64,
    slice: u64,
) -> Result<Vec<Piece>, String> {
    let mut pieces = Vec::new();
    let mut at = 0u64;
    for (name, n, _) in params {
        let each = n.div_ceil(world);
        let lo = (rank * each).min(*n);
        let real = (n - lo).min(each);
        if real > 0 {
            pieces.push(Piece {
                param: Some((name.clone(), lo, lo + real)),
                start: at,
                len: real,
            });
        }
        at += each;
    }
    if at != slice {
        return Err(format!(
            "parameters take {at} elements per rank but the flat group has {slice}"
        ));
    }
    Ok(fill_gaps(pieces, slice))
}

/// Adds padding pieces between and after `pieces` so they cover `[0, len)`.
fn fill_gaps(pieces: Vec<Piece>, len: u64) -> Vec<Piece> {
    let mut out = Vec::with_capacity(pieces.len() + 1);
    let mut at = 0;
    for piece in pieces {
        if piece.start > at {
            out.push(Piece {
                param: None,
                start: at,
                len: piece.start - at,
            });
        }
        at = piece.start + piece.len;
        out.push(piece);
    }
    if len > at {
        out.push(Piece {
            param: None,
            start: at,
            len: len - at,
        });
    }
    out
}

/// Replaces each cut storage by its pieces. The pieces of one storage are
/// contiguous, and all but the last have no CRC fields: the storage's CRC
/// covers them all (see `TorchContent` in docs/format.md).
fn apply_cuts(torch: &mut TorchFile, cuts: Vec<(usize, Vec<Piece>, &str)>) {
    let by_tensor: HashMap<usize, (Vec<Piece>, &str)> = cuts
        .into_iter()
        .map(|(t, pieces, suffix)| (t, (pieces, suffix)))
        .collect();
    let old_tensors = std::mem::take(&mut torch.tensors);
    let old_crcs = std::mem::take(&mut torch.crc_fields);
    let old_paths = std::mem::take(&mut torch.paths);
    for (i, ((info, crc), paths)) in old_tensors
        .into_iter()
        .zip(old_crcs)
        .zip(old_paths)
        .enumerate()
    {
        let Some((pieces, suffix)) = by_tensor.get(&i) else {
            torch.tensors.push(info);
            torch.crc_fields.push(crc);
            torch.paths.push(paths);
            continue;
        };
        let elem = u64::from(info.dtype.bitsize() as u32 / 8);
        let whole = paths.first().cloned().unwrap_or_else(|| info.name.clone());
        for (k, piece) in pieces.iter().enumerate() {
            let name = match &piece.param {
                Some((param, lo, hi)) => format!("{param}[{lo}:{hi}]{suffix}"),
                None => format!("{whole}[{}:{}]", piece.start, piece.start + piece.len),
            };
            torch.tensors.push(TensorInfo {
                name,
                dtype: info.dtype,
                shape: vec![piece.len],
                begin: info.begin + piece.start * elem,
                end: info.begin + (piece.start + piece.len) * elem,
            });
            let last = k + 1 == pieces.len();
            torch
                .crc_fields
                .push(if last { crc.clone() } else { Vec::new() });
            torch.paths.push(Vec::new());
        }
    }
}

/// The storage a pickle path uses.
fn storage_of(torch: &TorchFile, path: &str) -> Result<usize, String> {
    torch
        .paths
        .iter()
        .position(|paths| paths.iter().any(|p| p == path))
        .ok_or_else(|| format!("no tensor at `{path}`"))
}

fn int_of(p: &Pickle, id: Id) -> Option<u64> {
    p.int(id).and_then(|v| u64::try_from(v).ok())
}

/// `ZeroStageEnum(2)`, pickled as the enum class called with its value.
fn zero_stage(p: &Pickle, osd: Id) -> Option<u64> {
    let stage = p.get(osd, "zero_stage")?;
    match p.node(stage) {
        Node::Call { args, .. } => int_of(p, *p.seq(*args)?.first()?),
        _ => int_of(p, stage),
    }
}

/// The data-parallel world size: an int, or one per group.
fn partition_count(p: &Pickle, osd: Id) -> Option<u64> {
    let count = p.get(osd, "partition_count")?;
    match p.seq(count) {
        Some(per_group) => int_of(p, *per_group.first()?),
        None => int_of(p, count),
    }
}

fn alignment_paddings(p: &Pickle, osd: Id) -> Option<Vec<Vec<u64>>> {
    p.seq(p.get(osd, "param_alignment_paddings")?)?
        .iter()
        .map(|&g| p.seq(g)?.iter().map(|&x| int_of(p, x)).collect())
        .collect()
}

/// The optimizer state index of flat group `g` (`param_groups[g].params[0]`).
fn state_index(p: &Pickle, osd: Id, inner: &str, g: usize) -> Option<i64> {
    let groups = p.seq(p.get(p.get(osd, inner)?, "param_groups")?)?;
    p.int(*p.seq(p.get(*groups.get(g)?, "params")?)?.first()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(name: &str, n: u64) -> ParamSlot {
        (name.into(), n, 0)
    }

    #[test]
    fn zero2_slices_straddle_parameters() {
        // 5 + 6 = 11 elements, 2 ranks: padded to 12, slices of 6.
        let params = [slot("a", 5), slot("b", 6)];
        let r0 = zero12_pieces(&params, 0, 2, 6).unwrap();
        assert_eq!(r0[0].param, Some(("a".into(), 0, 5)));
        assert_eq!(r0[1].param, Some(("b".into(), 0, 1)));
        let r1 = zero12_pieces(&params, 1, 2, 6).unwrap();
        assert_eq!(r1[0].param, Some(("b".into(), 1, 6)));
        assert_eq!((r1[1].param.clone(), r1[1].start, r1[1].len), (None, 5, 1));
    }

    #[test]
    fn zero3_pads_each_parameter_on_the_last_rank() {
        let params = [slot("a", 5), slot("b", 4)];
        let r1 = zero3_pieces(&params, 1, 2, 5).unwrap();
        let got: Vec<_> = r1
            .iter()
            .map(|p| (p.param.clone(), p.start, p.len))
            .collect();
        assert_eq!(
            got,
            vec![
                (Some(("a".into(), 3, 5)), 0, 2),
                (None, 2, 1),
                (Some(("b".into(), 2, 4)), 3, 2),
            ]
        );
        assert!(zero3_pieces(&params, 1, 2, 6).is_err());
    }
}
