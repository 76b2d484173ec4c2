//! Lossy coding of a weight group (W, m, v): each chunk planned (from its
//! own statistics, or for ExCP from the whole tensor's) and quantized
//! against the parent's reconstruction. What goes into the cache, and what
//! the record's checksum covers, is the reconstruction: exactly what
//! checkout returns and what the next commit takes its residuals against
//! (closed loop).

use std::borrow::Cow;

use anyhow::Context;

use super::plan::{Group, Plan};
use super::{Encoded, Session};
use crate::codec;
use crate::codec::float::FloatType;
use crate::codec::policy::{GroupChunk, GroupStats, Moments, Policy, TensorPlan};

/// Input and parent values of one chunk of a group, as f32.
struct Loaded<'p> {
    /// The inputs, borrowed where the checkpoint is in memory as f32.
    w: Cow<'p, [f32]>,
    m: Cow<'p, [f32]>,
    v: Cow<'p, [f32]>,
    parent_w: Vec<f32>,
    parent_m: Vec<f32>,
    parent_v: Vec<f32>,
    floats: [FloatType; 3],
    /// v's tensor name, when m's side can be v (see [`side_tensor`]).
    side_tensor: Option<String>,
    /// The parent's recorded relative error of W.
    parent_w_error: f32,
    /// m's file and m's and v's names, when W's decoder finds them (see
    /// [`moments`]).
    moments: Option<(String, String, String)>,
}

impl Loaded<'_> {
    fn chunk(&self) -> GroupChunk<'_> {
        GroupChunk {
            w: &self.w,
            m: &self.m,
            v: &self.v,
            parent_w: &self.parent_w,
            parent_m: &self.parent_m,
            parent_v: &self.parent_v,
            w_float: self.floats[0],
            m_float: self.floats[1],
            v_float: self.floats[2],
            parent_w_error: self.parent_w_error,
            side_tensor: self.side_tensor.as_deref(),
            moments: self
                .moments
                .as_ref()
                .map(|(file, m, v)| Moments { file, m, v }),
        }
    }

    /// The parent values a stream of `role` (0 = W, 1 = m, 2 = v) is coded against.
    fn base(&self, role: usize) -> &[f32] {
        [&self.parent_w, &self.parent_m, &self.parent_v][role]
    }
}

/// Loads chunk `index` of `group`. With `for_stats` (ExCP's whole-tensor
/// statistics pass), the parent values those statistics do not use are not
/// read (each costs a cache read, a checksum and a conversion): only Ŵ is,
/// for the median of |dW|; in place of m̂ and v̂ stand the inputs, whose
/// difference to themselves is zero where finite.
fn load<'p>(
    session: &Session<'_>,
    plan: &'p Plan<'_>,
    group: Group,
    index: usize,
    for_stats: bool,
) -> anyhow::Result<Loaded<'p>> {
    let parent = session.parent.context("lossy coding needs a parent")?;
    let floats = floats(plan, group);
    let input = |s: usize, f: FloatType| plan.slots[s].read_values(index, f);
    let recon = |s: usize, f: FloatType| {
        session
            .reconstructor
            .chunk_values(&parent, plan.slots[s].addr(index), f)
    };
    let (w, m, v) = (
        input(group.w, floats[0]),
        input(group.m, floats[1]),
        input(group.v, floats[2]),
    );
    let (parent_m, parent_v) = if for_stats {
        (m.to_vec(), v.to_vec())
    } else {
        (recon(group.m, floats[1])?, recon(group.v, floats[2])?)
    };
    Ok(Loaded {
        parent_w: recon(group.w, floats[0])?,
        w,
        m,
        v,
        parent_m,
        parent_v,
        floats,
        side_tensor: side_tensor(plan, group, index),
        moments: moments(plan, group, index),
        parent_w_error: plan.slots[group.w].parent.map_or(0.0, |t| t.rel_error),
    })
}

/// v's name, when a decoder of m's chunk `index` finds v's chunk of the
/// same elements in the same commit: same file, same chunk length and
/// dtype (the decoder looks the side up by file, name and index).
fn side_tensor(plan: &Plan<'_>, group: Group, index: usize) -> Option<String> {
    let (m, v) = (&plan.slots[group.m], &plan.slots[group.v]);
    let (m_addr, v_addr) = (m.addr(index), v.addr(index));
    let same_elements = m.chunk_len == v.chunk_len && m.info.dtype == v.info.dtype;
    (m_addr.file == v_addr.file && same_elements).then(|| v.info.name.clone())
}

/// Where a decoder of W's chunk `index` finds the same elements of m and v:
/// m's file and m's and v's names, when their chunks hold as many elements
/// as W's (the decoder looks them up by file, name and index).
fn moments(plan: &Plan<'_>, group: Group, index: usize) -> Option<(String, String, String)> {
    let (w, m, v) = (
        &plan.slots[group.w],
        &plan.slots[group.m],
        &plan.slots[group.v],
    );
    let elements =
        |s: &super::plan::TensorSlot<'_>| s.chunk_len * 8 / s.info.dtype.bitsize() as u64;
    let aligned = elements(w) == elements(m) && elements(w) == elements(v);
    let (m_addr, v_addr) = (m.addr(index), v.addr(index));
    (aligned && m_addr.file == v_addr.file).then(|| {
        (
            m_addr.file.to_string(),
            m.info.name.clone(),
            v.info.name.clone(),
        )
    })
}

/// Statistics of chunk `index` of `group`, for ExCP's whole-tensor plan.
pub fn chunk_stats(
    session: &Session<'_>,
    plan: &Plan<'_>,
    group: Group,
    index: usize,
) -> anyhow::Result<GroupStats> {
    let x = load(session, plan, group, index, true)?;
    let w = &plan.slots[group.w];
    let first = index as u64 * (w.chunk_len * 8 / w.info.dtype.bitsize() as u64);
    Ok(GroupStats::of_chunk(first, w.numel(), &x.chunk()))
}

/// Plans a group from the statistics of all its chunks, in chunk order.
pub fn plan_group(
    plan: &Plan<'_>,
    group: Group,
    policy: &Policy,
    stats: Vec<GroupStats>,
) -> Option<TensorPlan> {
    let total = stats
        .into_iter()
        .fold(GroupStats::default(), GroupStats::merge);
    codec::policy::plan(policy, &total, floats(plan, group))
}

fn floats(plan: &Plan<'_>, group: Group) -> [FloatType; 3] {
    [group.w, group.m, group.v].map(|s| plan.slots[s].float().expect("groups hold float tensors"))
}

/// Quantizes chunk `index` of `group`: three encoded chunks, W, m, v.
/// `tensor_plan` is the whole tensor's plan for policies that make one;
/// otherwise the chunk is planned from its own statistics.
pub fn encode_chunk(
    session: &Session<'_>,
    plan: &Plan<'_>,
    policy: &Policy,
    group: Group,
    tensor_plan: Option<&TensorPlan>,
    index: usize,
) -> anyhow::Result<Vec<Encoded>> {
    let x = load(session, plan, group, index, false)?;
    let chunk_plan;
    let tensor_plan = match tensor_plan {
        Some(p) => p,
        None => {
            let stats = match policy {
                Policy::Guided { .. } | Policy::Predictive { .. } => {
                    GroupStats::guided_sums_of_chunk(&x.chunk())
                }
                _ => GroupStats::tuned_sums_of_chunk(&x.chunk()),
            };
            chunk_plan = codec::policy::plan(policy, &stats, x.floats)
                .context("lossy group without a lossy policy")?;
            &chunk_plan
        }
    };
    let (streams, made) = codec::policy::quantize_keeping_recons(tensor_plan, &x.chunk());
    let mut recons = made.recons;
    let inputs = [&x.w, &x.m, &x.v];
    let mut out = Vec::with_capacity(3);
    // v first: a scaled m's side is this commit's v̂, as decoders find it
    // (a predicted W's reconstruction the quantizer has made).
    for role in [2, 0, 1] {
        if recons[role].is_some() {
            continue;
        }
        let q = &streams[role];
        let base_values = q.domain.needs_base().then(|| x.base(role));
        let side_values = q
            .domain
            .needs_side()
            .then(|| recons[2].as_deref())
            .flatten();
        let recon = codec::quant::reconstruct(q, base_values, side_values)
            .context("quantizer produced an invalid stream")?;
        recons[role] = Some(recon);
    }
    let errors = chunk_errors(inputs, &recons);
    for (role, (q, slot_index)) in streams.iter().zip([group.w, group.m, group.v]).enumerate() {
        let slot = &plan.slots[slot_index];
        let recon = recons[role].take().expect("reconstructed above");
        let raw = q.float.bytes_of(&recon);
        session.cache_chunk(slot.cache_offset(index), &raw)?;
        let base = q.domain.needs_base().then_some(session.parent).flatten();
        let blob = if policy.codes_in_contexts() {
            // Contexts come from what the decoder will have besides the
            // symbols: the base, and the side (m's: this commit's v̂, still
            // in `recons`; a predicted W's: its prediction).
            let base_values = q.domain.needs_base().then(|| x.base(role));
            let side_values = if q.domain.needs_prediction() {
                made.prediction.as_deref()
            } else {
                q.domain
                    .needs_side()
                    .then(|| recons[2].as_deref())
                    .flatten()
            };
            codec::encode_quant_in_context(q, base_values, side_values)
        } else {
            codec::encode_quant(q)
        };
        let mut encoded = session.finish_chunk(
            (slot.file_index, slot.tensor_index, index),
            &raw,
            blob,
            base,
            None,
        )?;
        (encoded.error, encoded.update_error) = errors[role];
        out.push(encoded);
    }
    Ok(out)
}

/// Per role (W, m, v): (Σ squared error, Σ squared input), and the error
/// in Adam's update as (Σ squared change of the update, Σ squared update):
/// for m and v each one's share, for W both together (the update W's
/// resumed run takes). The update's share needs m and v element for
/// element; where their chunks differ in length it is left out.
type ChunkErrors = [(Option<(f64, f64)>, Option<(f64, f64)>); 3];

fn chunk_errors(inputs: [&Cow<'_, [f32]>; 3], recons: &[Option<Vec<f32>>; 3]) -> ChunkErrors {
    let recon = |role: usize| recons[role].as_deref().expect("reconstructed above");
    let own = |role: usize| Some(codec::distortion::squared_error(inputs[role], recon(role)));
    let (m, v) = (inputs[1], inputs[2]);
    let aligned = [m.len(), recon(1).len(), recon(2).len()]
        .iter()
        .all(|&n| n == v.len());
    if !aligned {
        return [(own(0), None), (own(1), None), (own(2), None)];
    }
    let e = codec::distortion::moment_errors(m, recon(1), v, recon(2));
    let share = |i: usize| Some((e.update[i], e.update_norm));
    [
        (own(0), share(2)),
        (Some(e.m), share(0)),
        (Some(e.v), share(1)),
    ]
}
