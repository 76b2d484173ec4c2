//! Lossy policies for a parameter's weights W and Adam moments m (exp_avg)
//! and v (exp_avg_sq): per-tensor planning from statistics, then per-chunk
//! quantization. Pure functions; the repo layer feeds them slices.
//!
//! Two families:
//! - [`Policy::Excp`] — ExCP (Li et al., ICML 2024) as published, our
//!   reference point: weight residuals kept where |dW| > median(|dW|) ·
//!   min(2.5, α/√mean(v)), m kept where |m| > β·mean(|m|) and dW kept, v kept
//!   with m and zeroed elsewhere; each coded with a 1-D k-means codebook of
//!   2^bits − 1 centres (symbol 0 = dropped). Codebooks are f32 here: the
//!   reference code's f16 codebooks flush v ≈ 1e-9 to 0, and wherever m
//!   survives with v = 0 the first resumed Adam step is lr·m/ε.
//! - [`Policy::Tuned`] — ours. W: residual against the parent's
//!   reconstruction, uniform quantizer whose step is a fixed fraction of the
//!   tensor's RMS weight (a distortion target per tensor; the rate follows
//!   from how much the tensor moved). m: uniform quantizer, step a fraction of
//!   the tensor's RMS m. v: coded in the log domain as a ratio to the parent's
//!   reconstructed v (v moves slowly, β2 ≈ 0.999), so v̂ is never 0 where v
//!   was not and its relative error is bounded by the step. Symbols are
//!   rANS-coded; out-of-range values and NaN/Inf are stored exactly.
//!   What the presets were until 2026-11-30; records made then name it.
//! - [`Policy::Guided`] — the presets since: the tuned coding with each
//!   error tied to what resuming from it does. W's step is also bounded by
//!   a fraction of how far W moved since the parent (late in a run the
//!   change is small against W, and an error of a fixed fraction of W would
//!   dwarf it). m is coded in units of Adam's update: element i's step is a
//!   fraction of RMS(m/(√v̂ + ε)) times √v̂ᵢ + ε, with v̂ the commit's own
//!   reconstructed v (a side chunk, decoded first), so that every element's update, not
//!   m's plain value, gets the same relative precision; a uniform step on m
//!   had let the update of elements with small v (rare tokens, norms) carry
//!   most of the resumed drift. And every step follows the precision the
//!   tensor is stored in ([`precision_factor`]).
//! - [`Policy::Predictive`] — today's presets: the guided coding, with W
//!   coded after its own m and v as what a prediction from them misses.
//!   AdamW moved each weight by about lr·m̂/(√v̂ + ε) per step (and shrank it
//!   by its weight decay), so W − Ŵ_parent is predicted as the sum
//!   a·u + b·u_parent + c·Ŵ_parent, u being that update direction from this
//!   commit's m̂ and v̂ and u_parent from the parent's; a, b, c are fitted
//!   per chunk by least squares and stored (quant domain
//!   `PredictedResidual`). The step is the guided one; the residual coded is
//!   smaller, and where it falls below the step, so does the error.

use serde::{Deserialize, Serialize};

use super::float::FloatType;
use super::quant::{Domain, ESCAPE, Levels, MAX_LEVEL, Predictor, Quantized, Side};
use super::simd::zero_unless;

/// How a commit codes parameters that have Adam state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Policy {
    /// Bit-exact: keyframe / xor-delta only.
    Lossless,
    Excp {
        alpha: f32,
        beta: f32,
        bits: u8,
    },
    /// `preset` names it (`compact`, `balanced`, `faithful`, or `custom`).
    Tuned {
        preset: String,
        /// W quantizer step as a fraction of RMS(W).
        w_step: f32,
        /// m quantizer step as a fraction of RMS(m).
        m_step: f32,
        /// v quantizer step in natural-log units (≈ relative error bound × 2).
        v_log_step: f32,
    },
    /// The presets of 2026-11-30 (module docs); `preset` as for `Tuned`.
    Guided {
        preset: String,
        /// W step as a fraction of RMS(W)…
        w_step: f32,
        /// …or of the RMS of W's change since the parent (W − Ŵ_parent less
        /// the parent's own error), whichever is smaller (0: no such bound).
        w_update_step: f32,
        /// m step as a fraction of RMS(m / (√v̂ + ε)), element i's step
        /// scaled by √v̂ᵢ + ε (v̂: this commit's reconstructed v).
        m_step: f32,
        /// v quantizer step in natural-log units.
        v_log_step: f32,
    },
    /// The presets since W is predicted (2026-11-30, after Guided): `Guided`
    /// with W predicted from the moments (module docs); the same knobs.
    Predictive {
        preset: String,
        w_step: f32,
        w_update_step: f32,
        m_step: f32,
        v_log_step: f32,
    },
}

/// Adam's ε as torch's AdamW defaults it: the floor of m's per-element
/// scale, √v̂ + ε, as in Adam's update.
pub const ADAM_EPS: f32 = 1e-8;

/// How much coarser than in fp32 a tensor stored as `float` is coded under
/// the same preset. A preset promises drift against the damage of the
/// stored precision: rounding to bf16 for fp32 and fp16 tensors, but one
/// ulp for a tensor already in bf16 (rounding it to bf16 changes nothing),
/// whose RMS error is 2√3 times rounding's (an ulp against a uniform error
/// of ±½ ulp).
pub fn precision_factor(float: FloatType) -> f32 {
    match float {
        FloatType::BF16 => 2.0 * 3f32.sqrt(),
        FloatType::F32 | FloatType::F16 => 1.0,
    }
}

impl Policy {
    pub const PRESETS: [&str; 5] = ["lossless", "excp", "compact", "balanced", "faithful"];

    pub fn preset(name: &str) -> Option<Policy> {
        let guided = |w_step, w_update_step, m_step, v_log_step| Policy::Predictive {
            preset: name.to_string(),
            w_step,
            w_update_step,
            m_step,
            v_log_step,
        };
        Some(match name {
            "lossless" => Policy::Lossless,
            "excp" => Policy::Excp {
                alpha: 5e-5,
                beta: 2.0,
                bits: 4,
            },
            // Chosen on the regimes benchmark (docs/benchmarks.md, "Presets
            // across kinds of run"): four kinds of run, each mark at two
            // points of each.
            // W's step is also bounded by a multiple of W's change since
            // the parent (see `update_bound`): late in a run the change is
            // far smaller than a fixed fraction of W.
            // compact's change bound was 3 until 2026-11-30: at 3 the step
            // rounded most of a long interval's residual to zero, and W's
            // error, which carries into resumed training one for one, was
            // 2× what a bound of 2 gives for 1% more of W's bits.
            "compact" => guided(0.065, 2.0, 8.0, 2.25),
            "balanced" => guided(0.02, 1.0, 3.0, 0.8),
            "faithful" => guided(0.008, 1.0, 0.8, 0.3),
            _ => return None,
        })
    }

    pub fn name(&self) -> &str {
        match self {
            Policy::Lossless => "lossless",
            Policy::Excp { .. } => "excp",
            Policy::Tuned { preset, .. }
            | Policy::Guided { preset, .. }
            | Policy::Predictive { preset, .. } => preset,
        }
    }

    /// Whether lossy chunks are context-coded where that saves ≥ 5% of a
    /// stream ([`super::context`]): only under `compact`, the preset that
    /// trades speed for size. A context-coded stream takes a rANS step per
    /// symbol where a plain one of a few symbols takes one per tuple: on a
    /// chain of 8 commits, checkout decoded 1.45× as long (docs/benchmarks.md),
    /// for 0.4–4.2% smaller commits.
    pub fn codes_in_contexts(&self) -> bool {
        matches!(self, Policy::Predictive { preset, .. } if preset == "compact")
    }

    /// The policy a commit codes with: a store's default policy named
    /// `compact`, `balanced` or `faithful` means the preset, so it becomes
    /// today's (the knobs recorded with it are those of the day the store
    /// was made: `Tuned`, `Guided`, or `Predictive` with other steps);
    /// anything else (`custom` knobs included) is kept as it is.
    pub fn current(self) -> Policy {
        match &self {
            Policy::Tuned { preset, .. }
            | Policy::Guided { preset, .. }
            | Policy::Predictive { preset, .. }
                if preset != "custom" =>
            {
                Policy::preset(preset).unwrap_or(self)
            }
            _ => self,
        }
    }

    /// The guided knobs (w_step, w_update_step, m_step, v_log_step) and
    /// whether W is predicted, for `Guided` and `Predictive`.
    fn guided_knobs(&self) -> Option<([f32; 4], bool)> {
        match *self {
            Policy::Guided {
                w_step,
                w_update_step,
                m_step,
                v_log_step,
                ..
            } => Some(([w_step, w_update_step, m_step, v_log_step], false)),
            Policy::Predictive {
                w_step,
                w_update_step,
                m_step,
                v_log_step,
                ..
            } => Some(([w_step, w_update_step, m_step, v_log_step], true)),
            _ => None,
        }
    }

    /// A guided policy from its knobs: `Predictive` when W is predicted.
    fn guided(
        preset: String,
        [w_step, w_update_step, m_step, v_log_step]: [f32; 4],
        predict: bool,
    ) -> Policy {
        if predict {
            Policy::Predictive {
                preset,
                w_step,
                w_update_step,
                m_step,
                v_log_step,
            }
        } else {
            Policy::Guided {
                preset,
                w_step,
                w_update_step,
                m_step,
                v_log_step,
            }
        }
    }

    /// Whether planning needs statistics of whole tensors (a separate pass
    /// before coding): ExCP's median and codebooks do. The tuned policies
    /// scale their steps by the RMS of each chunk (a tensor's first 2^20
    /// elements, then the next, …), which they can take in the coding pass.
    pub fn plans_per_tensor(&self) -> bool {
        matches!(self, Policy::Excp { .. })
    }

    pub fn is_lossless(&self) -> bool {
        matches!(self, Policy::Lossless)
    }

    /// One line describing the policy and its parameters.
    pub fn describe(&self) -> String {
        match self {
            Policy::Lossless => "lossless".into(),
            Policy::Excp { alpha, beta, bits } => {
                format!("excp(alpha={alpha}, beta={beta}, bits={bits})")
            }
            Policy::Tuned {
                preset,
                w_step,
                m_step,
                v_log_step,
            } => format!("{preset}(w_step={w_step}, m_step={m_step}, v_log_step={v_log_step})"),
            Policy::Guided {
                preset,
                w_step,
                w_update_step,
                m_step,
                v_log_step,
            } => format!(
                "{preset}(w_step={w_step}, w_update_step={w_update_step}, m_step={m_step} of the update, v_log_step={v_log_step})"
            ),
            Policy::Predictive {
                preset,
                w_step,
                w_update_step,
                m_step,
                v_log_step,
            } => format!(
                "{preset}(w_step={w_step}, w_update_step={w_update_step}, m_step={m_step} of the update, v_log_step={v_log_step}, W predicted from m̂ and v̂)"
            ),
        }
    }
}

/// Parameters that adjust a preset (the CLI's `--alpha`, `--w-step`, ...).
#[derive(Debug, Default, Clone, Copy)]
pub struct Knobs {
    pub alpha: Option<f32>,
    pub beta: Option<f32>,
    pub bits: Option<u8>,
    pub w_step: Option<f32>,
    pub w_update_step: Option<f32>,
    pub m_step: Option<f32>,
    pub v_log_step: Option<f32>,
    /// `Some(false)`: code W without predicting it from the moments.
    pub w_predicted: Option<bool>,
}

impl Knobs {
    /// `policy` (or none: the store's default) with the knobs applied on
    /// top: excp's knobs imply excp, the step knobs turn a tuned preset
    /// (balanced unless one is named) into `custom`.
    pub fn apply(self, policy: Option<Policy>) -> Result<Option<Policy>, String> {
        let Knobs {
            alpha,
            beta,
            bits,
            w_step,
            w_update_step,
            m_step,
            v_log_step,
            w_predicted,
        } = self;
        let excp_knobs = alpha.is_some() || beta.is_some() || bits.is_some();
        let tuned_knobs = w_step.is_some()
            || w_update_step.is_some()
            || m_step.is_some()
            || v_log_step.is_some()
            || w_predicted.is_some();
        if excp_knobs && tuned_knobs {
            return Err(
            "the excp knobs (alpha, beta, bits) and the step knobs (w_step, w_update_step, m_step, v_log_step, W prediction) do not mix".into()
        );
        }
        if tuned_knobs {
            let base = policy.map_or_else(
                || Policy::preset("balanced").expect("preset"),
                Policy::current,
            );
            if let Some(([w, u, m, v], predicted)) = base.guided_knobs() {
                let knobs = [
                    w_step.unwrap_or(w),
                    w_update_step.unwrap_or(u),
                    m_step.unwrap_or(m),
                    v_log_step.unwrap_or(v),
                ];
                let predict = w_predicted.unwrap_or(predicted);
                return Ok(Some(Policy::guided("custom".into(), knobs, predict)));
            }
            return match base {
                Policy::Tuned { .. } if w_update_step.is_some() || w_predicted.is_some() => Err(
                    "w_update_step and W prediction apply to the presets made since 2026-11-30 only"
                        .into(),
                ),
                Policy::Tuned {
                    w_step: w,
                    m_step: m,
                    v_log_step: v,
                    ..
                } => Ok(Some(Policy::Tuned {
                    preset: "custom".into(),
                    w_step: w_step.unwrap_or(w),
                    m_step: m_step.unwrap_or(m),
                    v_log_step: v_log_step.unwrap_or(v),
                })),
                _ => Err(
                    "w_step, w_update_step, m_step and v_log_step apply to compact, balanced and faithful only"
                        .into(),
                ),
            };
        }
        if !excp_knobs {
            return Ok(policy);
        }
        let base = policy.unwrap_or_else(|| Policy::preset("excp").expect("preset"));
        let Policy::Excp {
            alpha: a,
            beta: b,
            bits: n,
        } = base
        else {
            return Err("alpha, beta and bits apply to the excp policy only".into());
        };
        Ok(Some(Policy::Excp {
            alpha: alpha.unwrap_or(a),
            beta: beta.unwrap_or(b),
            bits: bits.unwrap_or(n),
        }))
    }
}

/// Largest number of samples per tensor used for medians and k-means.
const MAX_SAMPLES: u64 = 16_384;

/// One sampled element: (dW, m, v, dm) with dm = m − m̂_parent.
pub type Sample = (f32, f32, f32, f32);

/// Statistics of a chunk of a parameter group, combined in chunk order so the
/// result does not depend on the thread count.
#[derive(Debug, Clone, Default)]
pub struct GroupStats {
    pub count: u64,
    pub sum_w2: f64,
    pub sum_m2: f64,
    pub sum_abs_m: f64,
    pub sum_v: f64,
    /// Σ (m − m̂_parent)²: whether m is cheaper coded as a residual.
    pub sum_dm2: f64,
    /// Σ (W − Ŵ_parent)² (guided policies).
    pub sum_dw2: f64,
    /// The chunk's `parent_w_error` (guided policies; the largest of merged
    /// chunks').
    pub parent_w_error: f32,
    /// Σ u² and Σ (u − û_parent)², u = m / (√v + ε): m in units of Adam's
    /// update, as it is coded (guided policies with a side; the coding
    /// scales by this commit's v̂, within v's log step of v).
    pub sum_u2: f64,
    pub sum_du2: f64,
    pub samples: Vec<Sample>,
}

impl GroupStats {
    /// Statistics of one chunk starting at element `first` of a tensor of
    /// `numel` elements. Non-finite elements are left out.
    pub fn of_chunk(first: u64, numel: u64, chunk: &GroupChunk<'_>) -> GroupStats {
        let stride = numel.div_ceil(MAX_SAMPLES).max(1);
        let mut stats = GroupStats::default();
        for i in 0..chunk.w.len() {
            let (wi, mi, vi) = (chunk.w[i], chunk.m[i], chunk.v[i]);
            let dw = wi - chunk.parent_w[i];
            let dm = mi - chunk.parent_m[i];
            if !(dw.is_finite() && dm.is_finite() && vi.is_finite()) {
                continue;
            }
            stats.count += 1;
            stats.sum_w2 += (wi as f64).powi(2);
            stats.sum_m2 += (mi as f64).powi(2);
            stats.sum_dm2 += (dm as f64).powi(2);
            stats.sum_dw2 += (dw as f64).powi(2);
            stats.sum_abs_m += mi.abs() as f64;
            stats.sum_v += vi as f64;
            if (first + i as u64).is_multiple_of(stride) {
                stats.samples.push((dw, mi, vi, dm));
            }
        }
        stats
    }

    /// What the tuned policies plan from: `count`, `sum_w2`, `sum_m2` and
    /// `sum_dm2` as [`GroupStats::of_chunk`] computes them (`sum_abs_m`,
    /// `sum_v` and the samples, which only ExCP uses, are left empty). Eight
    /// independent lanes over zipped slices, no branches and no bounds
    /// checks, so the loop vectorizes.
    pub fn tuned_sums_of_chunk(chunk: &GroupChunk<'_>) -> GroupStats {
        crate::with_simd!(tuned_sums(chunk: &GroupChunk<'_>) -> GroupStats)
    }

    /// What the guided policies plan from: [`GroupStats::tuned_sums_of_chunk`]
    /// and `sum_dw2`, `sum_u2`, `sum_du2` (the latter two only with a side).
    ///
    /// One pass over the five inputs (three passes cost 19% of a commit's
    /// CPU time, memory-bound), with the sums of each in the same lanes and
    /// order as the separate passes made them, so the plans are identical.
    pub fn guided_sums_of_chunk(chunk: &GroupChunk<'_>) -> GroupStats {
        let mut stats = if chunk.side_tensor.is_some() {
            crate::with_simd!(guided_sums_scaled(chunk: &GroupChunk<'_>) -> GroupStats)
        } else {
            crate::with_simd!(guided_sums_unscaled(chunk: &GroupChunk<'_>) -> GroupStats)
        };
        stats.parent_w_error = chunk.parent_w_error;
        stats
    }

    pub fn merge(mut self, other: GroupStats) -> GroupStats {
        self.count += other.count;
        self.sum_dw2 += other.sum_dw2;
        self.parent_w_error = self.parent_w_error.max(other.parent_w_error);
        self.sum_u2 += other.sum_u2;
        self.sum_du2 += other.sum_du2;
        self.sum_w2 += other.sum_w2;
        self.sum_m2 += other.sum_m2;
        self.sum_abs_m += other.sum_abs_m;
        self.sum_v += other.sum_v;
        self.sum_dm2 += other.sum_dm2;
        self.samples.extend(other.samples);
        self
    }

    fn mean(&self, sum: f64) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            sum / self.count as f64
        }
    }
}

#[inline(always)]
fn tuned_sums(chunk: &GroupChunk<'_>) -> GroupStats {
    lane_sums::<false, false>(chunk)
}

#[inline(always)]
fn guided_sums_scaled(chunk: &GroupChunk<'_>) -> GroupStats {
    lane_sums::<true, true>(chunk)
}

#[inline(always)]
fn guided_sums_unscaled(chunk: &GroupChunk<'_>) -> GroupStats {
    lane_sums::<true, false>(chunk)
}

/// The planning sums of a chunk in one pass: `count`, Σ W², Σ m², Σ (m −
/// m̂_parent)² over the elements whose W and m changes and v are finite;
/// with `GUIDED` also Σ (W − Ŵ_parent)² over the finite changes, and with
/// `SCALED` Σ u², Σ (u − û_parent)² over the finite terms. Eight lanes
/// (element i in lane i % 8) over zipped slices, no bounds checks, so the
/// loop vectorizes; each sum in the lanes and order of the separate passes
/// this replaced (kept in the tests as its reference).
///
/// u = m / (√v + ε) with this commit's v (v̂, what m is coded against,
/// differs from v by less than v's log step). Not the parent's v: early in
/// training v grows by 10× and more between commits for some elements, and
/// m over the parent's √v̂ is then heavy-tailed where m over this commit's
/// is bounded (Adam's update is); a step sized from the former zeroed every
/// m of a ZeRO fixture's layer.
#[inline(always)]
fn lane_sums<const GUIDED: bool, const SCALED: bool>(chunk: &GroupChunk<'_>) -> GroupStats {
    const LANES: usize = 8;
    let n = chunk.w.len();
    let (w, m, v) = (&chunk.w[..n], &chunk.m[..n], &chunk.v[..n]);
    let (pw, pm) = (&chunk.parent_w[..n], &chunk.parent_m[..n]);
    let mut count = [0u32; LANES];
    let [mut w2, mut m2, mut dm2, mut dw2, mut u2, mut du2] = [[0f64; LANES]; 6];
    let mut add = |lane: usize, wi: f32, mi: f32, vi: f32, pwi: f32, pmi: f32| {
        let (dw, dm) = (wi - pwi, mi - pmi);
        let finite = dw.is_finite() & dm.is_finite() & vi.is_finite();
        let keep = |x: f32| zero_unless(finite, x as f64);
        count[lane] += u32::from(finite);
        w2[lane] += keep(wi) * keep(wi);
        m2[lane] += keep(mi) * keep(mi);
        dm2[lane] += keep(dm) * keep(dm);
        if GUIDED {
            let d = dw as f64;
            dw2[lane] += zero_unless(d.is_finite(), d * d);
        }
        if SCALED {
            let scale = Side::scale(ADAM_EPS, vi);
            let (u, du) = ((mi / scale) as f64, (dm / scale) as f64);
            let ok = u.is_finite() & du.is_finite();
            u2[lane] += zero_unless(ok, u * u);
            du2[lane] += zero_unless(ok, du * du);
        }
    };
    let groups = w
        .chunks_exact(LANES)
        .zip(m.chunks_exact(LANES))
        .zip(v.chunks_exact(LANES))
        .zip(pw.chunks_exact(LANES).zip(pm.chunks_exact(LANES)));
    for (((w, m), v), (pw, pm)) in groups {
        for lane in 0..LANES {
            add(lane, w[lane], m[lane], v[lane], pw[lane], pm[lane]);
        }
    }
    for i in n - n % LANES..n {
        add(i % LANES, w[i], m[i], v[i], pw[i], pm[i]);
    }
    let total = |lanes: [f64; LANES]| lanes.iter().sum();
    GroupStats {
        count: count.iter().map(|&c| c as u64).sum(),
        sum_w2: total(w2),
        sum_m2: total(m2),
        sum_dm2: total(dm2),
        sum_dw2: total(dw2),
        sum_u2: total(u2),
        sum_du2: total(du2),
        ..GroupStats::default()
    }
}

/// `w_update_step` × the RMS of how far W moved since the parent, or
/// infinity where that is not known to be more than the parent's own
/// error. W − Ŵ_parent is the change plus the parent's error (independent
/// of it, of RMS `parent_w_error` × RMS(W)), so the change's RMS is
/// √(RMS(W − Ŵ_parent)² − error²). Only a change clearly larger than the
/// error (RMS(W − Ŵ_parent)² above 1.5 error²) is trusted: a checkpoint
/// committed again, or a frozen tensor, has no change beyond the error and
/// gets no bound, so its residual stays in the quantizer's zero. In steady
/// state the bound holds the error at w_update_step/√12 of the change,
/// which keeps it engaged (change² + error² > 1.5 error²) for
/// w_update_step < √24.
fn update_bound(w_update_step: f32, stats: &GroupStats) -> f64 {
    let (moved2, error2) = (
        stats.mean(stats.sum_dw2),
        (stats.parent_w_error as f64).powi(2) * stats.mean(stats.sum_w2),
    );
    if w_update_step <= 0.0 || moved2 <= 1.5 * error2 {
        return f64::INFINITY;
    }
    w_update_step as f64 * (moved2 - error2).sqrt()
}

/// Per-tensor decisions, shared by all chunks of the tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorPlan {
    Excp {
        w_threshold: f32,
        m_threshold: f32,
        w_centres: Vec<f32>,
        m_centres: Vec<f32>,
        v_centres: Vec<f32>,
    },
    Tuned {
        w_step: f32,
        m_step: f32,
        /// Code m as a residual against m̂_parent (it moved less than its size).
        m_residual: bool,
        v_log_step: f32,
    },
    Guided {
        w_step: f32,
        /// In units of m's per-element scale when `m_scaled`, else of m.
        m_step: f32,
        m_residual: bool,
        /// m coded in units of √v̂ + ε, this commit's v̂ (it has a side).
        m_scaled: bool,
        v_log_step: f32,
        /// W coded as what its prediction from m̂ and v̂ misses, where the
        /// chunk's moments can be found by a decoder (`Predictive`).
        w_predicted: bool,
    },
}

/// The plan of a group whose W, m and v are stored as `floats`, from its
/// statistics (for the guided policies, [`GroupStats::guided_sums_of_chunk`]
/// of the same chunk, whose `side_tensor` says whether m can be scaled).
pub fn plan(policy: &Policy, stats: &GroupStats, floats: [FloatType; 3]) -> Option<TensorPlan> {
    match policy {
        Policy::Lossless => None,
        Policy::Excp { alpha, beta, bits } => {
            let centres = (1usize << (*bits).clamp(1, 7)) - 1;
            let mut abs_dw: Vec<f32> = stats.samples.iter().map(|s| s.0.abs()).collect();
            abs_dw.sort_by(f32::total_cmp);
            let median = abs_dw.get(abs_dw.len() / 2).copied().unwrap_or(0.0);
            let mean_v = stats.mean(stats.sum_v).max(f64::MIN_POSITIVE);
            let factor = (*alpha as f64 / mean_v.sqrt()).min(2.5);
            let w_threshold = (median as f64 * factor) as f32;
            let m_threshold = (*beta as f64 * stats.mean(stats.sum_abs_m)) as f32;
            let kept_w: Vec<f32> = stats
                .samples
                .iter()
                .filter(|s| s.0.abs() > w_threshold)
                .map(|s| s.0)
                .collect();
            let kept_m: Vec<&Sample> = stats
                .samples
                .iter()
                .filter(|s| s.0.abs() > w_threshold && s.1.abs() > m_threshold)
                .collect();
            Some(TensorPlan::Excp {
                w_threshold,
                m_threshold,
                w_centres: kmeans(&kept_w, centres),
                m_centres: kmeans(&kept_m.iter().map(|s| s.1).collect::<Vec<_>>(), centres),
                v_centres: kmeans(&kept_m.iter().map(|s| s.2).collect::<Vec<_>>(), centres),
            })
        }
        Policy::Tuned {
            w_step,
            m_step,
            v_log_step,
            ..
        } => Some(TensorPlan::Tuned {
            w_step: (*w_step as f64 * stats.mean(stats.sum_w2).sqrt()) as f32,
            m_step: (*m_step as f64 * stats.mean(stats.sum_m2).sqrt()) as f32,
            // Same step either way, so the same error bound; the residual is
            // cheaper when its spread is clearly smaller (a frozen or slowly
            // changing tensor), the value when m turned over since the parent.
            m_residual: stats.sum_dm2 < 0.5 * stats.sum_m2,
            v_log_step: *v_log_step,
        }),
        Policy::Guided { .. } | Policy::Predictive { .. } => {
            let ([w_step, w_update_step, m_step, v_log_step], w_predicted) =
                policy.guided_knobs().expect("a guided policy");
            let (w_step, w_update_step, m_step, v_log_step) =
                (&w_step, &w_update_step, &m_step, &v_log_step);
            let rms = |sum: f64| stats.mean(sum).sqrt();
            let [wf, mf, vf] = floats.map(|f| precision_factor(f) as f64);
            // The stored precision scales the weights' step, not the bound
            // on the change: that one is about the change, whatever W's dtype.
            let w_step =
                (*w_step as f64 * rms(stats.sum_w2) * wf).min(update_bound(*w_update_step, stats));
            // With no side (m and v in different files), m is coded as the
            // tuned policies code it, in its own units.
            let m_scaled = stats.sum_u2 > 0.0;
            let (m2, dm2) = if m_scaled {
                (stats.sum_u2, stats.sum_du2)
            } else {
                (stats.sum_m2, stats.sum_dm2)
            };
            Some(TensorPlan::Guided {
                w_step: w_step as f32,
                m_step: (*m_step as f64 * rms(m2) * mf) as f32,
                m_residual: dm2 < 0.5 * m2,
                m_scaled,
                v_log_step: (*v_log_step as f64 * vf) as f32,
                w_predicted,
            })
        }
    }
}

/// 1-D k-means (Lloyd, 25 iterations) from quantile initialization:
/// deterministic. Returns sorted centres, at most `k`, none for no data.
pub fn kmeans(values: &[f32], k: usize) -> Vec<f32> {
    let mut data: Vec<f32> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if data.is_empty() || k == 0 {
        return Vec::new();
    }
    data.sort_by(f32::total_cmp);
    let n = data.len();
    let mut centres: Vec<f32> = (0..k)
        .map(|i| data[((2 * i + 1) * n / (2 * k)).min(n - 1)])
        .collect();
    centres.dedup();
    for _ in 0..25 {
        let mut sums = vec![0f64; centres.len()];
        let mut counts = vec![0u64; centres.len()];
        for &x in &data {
            let c = nearest(&centres, x);
            sums[c] += x as f64;
            counts[c] += 1;
        }
        let mut moved = false;
        for c in 0..centres.len() {
            if counts[c] > 0 {
                let mean = (sums[c] / counts[c] as f64) as f32;
                moved |= mean != centres[c];
                centres[c] = mean;
            }
        }
        centres.sort_by(f32::total_cmp);
        if !moved {
            break;
        }
    }
    centres
}

/// Index of the centre nearest to `x` (centres sorted ascending).
fn nearest(centres: &[f32], x: f32) -> usize {
    let i = centres.partition_point(|&c| c < x);
    if i == 0 {
        0
    } else if i == centres.len() || x - centres[i - 1] <= centres[i] - x {
        i - 1
    } else {
        i
    }
}

/// One chunk of a parameter group, as f32: input W, m, v and the parent's
/// reconstructed W, m and v.
pub struct GroupChunk<'a> {
    pub w: &'a [f32],
    pub m: &'a [f32],
    pub v: &'a [f32],
    pub parent_w: &'a [f32],
    pub parent_m: &'a [f32],
    pub parent_v: &'a [f32],
    pub w_float: FloatType,
    pub m_float: FloatType,
    pub v_float: FloatType,
    /// Relative L2 error of the parent's W (its record's `rel_error`; 0
    /// when exact): what of W − Ŵ_parent is the parent's error, not change.
    pub parent_w_error: f32,
    /// The name v is stored under, when a decoder finds it at the same
    /// position (same file and chunk index) as m: then m can be coded in
    /// units of this commit's √v̂ (guided policies).
    pub side_tensor: Option<&'a str>,
    /// Where a decoder of W's chunk finds this group's m and v (same chunk
    /// index, this commit and the parent): then W can be predicted from
    /// them (`Predictive`).
    pub moments: Option<Moments<'a>>,
}

/// The file and tensor names of a group's m and v.
#[derive(Debug, Clone, Copy)]
pub struct Moments<'a> {
    pub file: &'a str,
    pub m: &'a str,
    pub v: &'a str,
}

/// Quantizes one chunk: (W, m, v).
pub fn quantize(plan: &TensorPlan, chunk: &GroupChunk<'_>) -> [Quantized; 3] {
    quantize_keeping_recons(plan, chunk).0
}

/// Reconstructions (W, m, v) a quantizer made on the way (m in units of v̂
/// needs v̂; W predicted from the moments needs all three).
pub type Recons = [Option<Vec<f32>>; 3];

/// What a quantizer made on the way besides its streams, so the caller need
/// not make it again: the [`Recons`], and W's prediction when W is coded
/// against one (its context values: [`super::context`]).
pub struct Made {
    pub recons: Recons,
    pub prediction: Option<Vec<f32>>,
}

impl Made {
    fn recons(recons: Recons) -> Made {
        Made {
            recons,
            prediction: None,
        }
    }
}

/// [`quantize`], and what the quantizer made on the way.
pub fn quantize_keeping_recons(
    plan: &TensorPlan,
    chunk: &GroupChunk<'_>,
) -> ([Quantized; 3], Made) {
    crate::with_simd!(quantize_chunk(plan: &TensorPlan, chunk: &GroupChunk<'_>) -> ([Quantized; 3], Made))
}

#[inline(always)]
fn quantize_chunk(plan: &TensorPlan, chunk: &GroupChunk<'_>) -> ([Quantized; 3], Made) {
    match plan {
        TensorPlan::Excp {
            w_threshold,
            m_threshold,
            w_centres,
            m_centres,
            v_centres,
        } => {
            let n = chunk.w.len();
            let mut w = codebook_stream(Domain::Residual, chunk.w_float, w_centres, n);
            let mut m = codebook_stream(Domain::Value, chunk.m_float, m_centres, n);
            let mut v = codebook_stream(Domain::Value, chunk.v_float, v_centres, n);
            for i in 0..chunk.w.len() {
                let dw = chunk.w[i] - chunk.parent_w[i];
                let keep_w = dw.abs() > *w_threshold;
                let keep_m = keep_w && chunk.m[i].abs() > *m_threshold;
                push_codebook(&mut w, w_centres, dw, chunk.w[i], keep_w);
                push_codebook(&mut m, m_centres, chunk.m[i], chunk.m[i], keep_m);
                push_codebook(&mut v, v_centres, chunk.v[i], chunk.v[i], keep_m);
            }
            ([w, m, v], Made::recons([None, None, None]))
        }
        TensorPlan::Tuned {
            w_step,
            m_step,
            m_residual,
            v_log_step,
        } => {
            let steps = [*w_step, *m_step, *v_log_step];
            let (streams, v_hat) = uniform_streams(chunk, steps, *m_residual, None);
            (streams, Made::recons([None, None, v_hat]))
        }
        TensorPlan::Guided {
            w_step,
            m_step,
            m_residual,
            m_scaled,
            v_log_step,
            w_predicted,
        } => {
            let side = chunk.side_tensor.filter(|_| *m_scaled);
            match chunk.moments.filter(|_| *w_predicted) {
                Some(moments) => {
                    let (m, v, v_hat) =
                        moment_streams(chunk, [*m_step, *v_log_step], *m_residual, side);
                    predict_w(chunk, [m, v], v_hat, *w_step, moments)
                }
                None => {
                    let steps = [*w_step, *m_step, *v_log_step];
                    let (streams, v_hat) = uniform_streams(chunk, steps, *m_residual, side);
                    (streams, Made::recons([None, None, v_hat]))
                }
            }
        }
    }
}

/// W coded, after m and v, as what its prediction from this commit's m̂
/// and v̂ (and the parent's) misses, when the prediction removes enough of
/// W's change to pay for itself; else as a plain residual. Returns the
/// three reconstructions either way (made for the prediction).
#[inline(always)]
fn predict_w(
    chunk: &GroupChunk<'_>,
    [m, v]: [Quantized; 2],
    v_hat: Option<Vec<f32>>,
    w_step: f32,
    moments: Moments<'_>,
) -> ([Quantized; 3], Made) {
    let valid = "the streams just made are valid";
    let v_hat = v_hat
        .unwrap_or_else(|| super::quant::reconstruct(&v, Some(chunk.parent_v), None).expect(valid));
    let m_base = m.domain.needs_base().then_some(chunk.parent_m);
    let m_side = m.domain.needs_side().then_some(v_hat.as_slice());
    let m_hat = super::quant::reconstruct(&m, m_base, m_side).expect(valid);
    let updates = Updates {
        m: &m_hat,
        v: &v_hat,
        parent_m: chunk.parent_m,
        parent_v: chunk.parent_v,
    };
    let header = moments.file.len() + moments.m.len() + moments.v.len() + PREDICTOR_FIXED_BYTES;
    let fit = fit_prediction(chunk.w, chunk.parent_w, &updates)
        .filter(|fit| fit.pays(chunk.w.len(), header));
    let Some(Fit { coef, .. }) = fit else {
        let w = plain_w(chunk, w_step);
        let w_hat = super::quant::reconstruct(&w, Some(chunk.parent_w), None).expect(valid);
        return (
            [w, m, v],
            Made::recons([Some(w_hat), Some(m_hat), Some(v_hat)]),
        );
    };
    let mut predicted = uniform_stream(
        Domain::PredictedResidual,
        chunk.w_float,
        Levels::Linear(w_step),
        chunk.w.len(),
    );
    let predictor = Predictor {
        file: moments.file.to_string(),
        m: moments.m.to_string(),
        v: moments.v.to_string(),
        m_float: chunk.m_float,
        v_float: chunk.v_float,
        floor: ADAM_EPS,
        coef,
    };
    // The decoder's own function, with the moments it will read.
    let moments: [&[f32]; 4] = [&m_hat, &v_hat, chunk.parent_m, chunk.parent_v];
    let read = if predictor.uses_base_moments() { 4 } else { 2 };
    let pred = super::quant::prediction(&predictor, chunk.parent_w, &moments[..read])
        .expect("the moments are the chunk's length");
    predicted.predictor = Some(predictor);
    let targets = chunk.parent_w.iter().zip(&pred).map(|(&b, &p)| b + p);
    let coded = chunk.w.iter().zip(targets).map(|(&x, t)| x - t);
    fill_uniform(&mut predicted, w_step, chunk.w, coded);
    let w_hat =
        super::quant::reconstruct(&predicted, Some(chunk.parent_w), Some(&pred)).expect(valid);
    let made = Made {
        recons: [Some(w_hat), Some(m_hat), Some(v_hat)],
        prediction: Some(pred),
    };
    ([predicted, m, v], made)
}

/// The prediction must leave at most this share of W's change (energy) to
/// code: below a tenth less, the bits saved do not pay for reading the
/// moments at decode.
const PREDICTION_MIN_GAIN: f64 = 0.9;

/// A predictor's payload bytes besides the three names (their lengths,
/// float types, floor, weights).
const PREDICTOR_FIXED_BYTES: usize = 3 * 2 + 2 + 4 + 12;

/// A fitted prediction of W's change: its weights, and the change's energy
/// over the finite elements before and after it (the latter from the
/// normal equations).
struct Fit {
    coef: [f32; 3],
    before: f64,
    after: f64,
}

impl Fit {
    /// Whether predicting pays: at most [`PREDICTION_MIN_GAIN`] of the
    /// change's energy left, and the bits it saves over `n` elements (½·log2
    /// of the energy ratio each, what a Gaussian residual at a fine step
    /// saves; less at a coarse one) at least twice the predictor's `header`
    /// bytes.
    fn pays(&self, n: usize, header: usize) -> bool {
        let saved_bytes = 0.5 * (self.before / self.after).log2() * n as f64 / 8.0;
        self.after <= PREDICTION_MIN_GAIN * self.before && saved_bytes >= 2.0 * header as f64
    }
}

/// The moments a prediction reads: this commit's m̂, v̂ and the parent's.
struct Updates<'a> {
    m: &'a [f32],
    v: &'a [f32],
    parent_m: &'a [f32],
    parent_v: &'a [f32],
}

impl Updates<'_> {
    /// Element i's update direction, this commit's and the parent's (as the
    /// decoder computes them).
    #[inline(always)]
    fn at(&self, i: usize) -> (f32, f32) {
        (
            Predictor::update(ADAM_EPS, self.m[i], self.v[i]),
            Predictor::update(ADAM_EPS, self.parent_m[i], self.parent_v[i]),
        )
    }
}

/// Every how many elements the fit samples: three weights need far fewer
/// than a chunk's million, and the fit is the predictor's main cost.
const FIT_STRIDE: usize = 16;

/// Least-squares weights (a, b, c) of W − Ŵ_parent ≈ a·u + b·u_parent +
/// c·Ŵ_parent over the finite elements of every [`FIT_STRIDE`]th, in f64,
/// with the energies scaled to the whole chunk; `None` when the system is
/// degenerate (no finite elements, a frozen tensor).
fn fit_prediction(w: &[f32], base: &[f32], updates: &Updates<'_>) -> Option<Fit> {
    // The six distinct products of the symmetric normal matrix, the right
    // side and Σd².
    let mut sums = [0f64; 10];
    for i in (0..w.len()).step_by(FIT_STRIDE) {
        let (u, u_parent) = updates.at(i);
        let (x0, x1, x2) = (u as f64, u_parent as f64, base[i] as f64);
        let d = w[i] as f64 - x2;
        if !(d.is_finite() && x0.is_finite() && x1.is_finite()) {
            continue;
        }
        let terms = [
            x0 * x0,
            x0 * x1,
            x0 * x2,
            x1 * x1,
            x1 * x2,
            x2 * x2,
            x0 * d,
            x1 * d,
            x2 * d,
            d * d,
        ];
        for (sum, t) in sums.iter_mut().zip(terms) {
            *sum += t;
        }
    }
    let [s00, s01, s02, s11, s12, s22, b0, b1, b2, dd] = sums;
    let ata = [[s00, s01, s02], [s01, s11, s12], [s02, s12, s22]];
    let atd = [b0, b1, b2];
    let x = solve3(ata, atd)?;
    let coef = x.map(|c| c as f32);
    let explained: f64 = x.iter().zip(atd).map(|(c, b)| c * b).sum();
    let scale = FIT_STRIDE as f64;
    coef.iter().all(|c| c.is_finite()).then_some(Fit {
        coef,
        before: dd * scale,
        after: (dd - explained).max(0.0) * scale,
    })
}

/// Solves a symmetric 3×3 system by Gaussian elimination with partial
/// pivoting; a variable whose pivot is negligible (a feature that is zero
/// or a multiple of another) gets weight 0.
fn solve3(mut a: [[f64; 3]; 3], mut b: [f64; 3]) -> Option<[f64; 3]> {
    let scale = (0..3).map(|i| a[i][i]).fold(0f64, f64::max);
    if scale.is_nan() || scale <= 0.0 {
        return None;
    }
    let tiny = scale * 1e-12;
    let mut used = [false; 3];
    for col in 0..3 {
        let pivot = (col..3).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[pivot][col].abs() <= tiny {
            continue;
        }
        a.swap(col, pivot);
        b.swap(col, pivot);
        used[col] = true;
        for row in 0..3 {
            if row != col {
                let f = a[row][col] / a[col][col];
                let pivot_row = a[col];
                for (x, p) in a[row].iter_mut().zip(pivot_row) {
                    *x -= f * p;
                }
                b[row] -= f * b[col];
            }
        }
    }
    // After full elimination each used row has one nonzero in its column.
    let mut x = [0f64; 3];
    for i in 0..3 {
        if used[i] {
            x[i] = b[i] / a[i][i];
        }
    }
    used.iter().any(|&u| u).then_some(x)
}

/// The uniform quantizers' streams: W as a residual, m as a residual or a
/// value (scaled by its side when one is named), v as a log ratio.
#[inline(always)]
fn uniform_streams(
    chunk: &GroupChunk<'_>,
    [w_step, m_step, v_log_step]: [f32; 3],
    m_residual: bool,
    m_side: Option<&str>,
) -> ([Quantized; 3], Option<Vec<f32>>) {
    let w = plain_w(chunk, w_step);
    let (m, v, v_hat) = moment_streams(chunk, [m_step, v_log_step], m_residual, m_side);
    ([w, m, v], v_hat)
}

/// W as a residual against Ŵ_parent.
#[inline(always)]
fn plain_w(chunk: &GroupChunk<'_>, w_step: f32) -> Quantized {
    let n = chunk.w.len();
    let mut w = uniform_stream(Domain::Residual, chunk.w_float, Levels::Linear(w_step), n);
    fill_uniform(
        &mut w,
        w_step,
        chunk.w,
        differences(chunk.w, chunk.parent_w),
    );
    w
}

/// m (as a residual or a value, scaled by its side when one is named) and
/// v (as a log ratio), and v̂ when m's side needed it.
#[inline(always)]
fn moment_streams(
    chunk: &GroupChunk<'_>,
    [m_step, v_log_step]: [f32; 2],
    m_residual: bool,
    m_side: Option<&str>,
) -> (Quantized, Quantized, Option<Vec<f32>>) {
    let n = chunk.w.len();
    let mut v = uniform_stream(Domain::Ratio, chunk.v_float, Levels::Exp(v_log_step), n);
    let log_ratios = chunk.v.iter().zip(chunk.parent_v);
    fill_uniform(
        &mut v,
        v_log_step,
        chunk.v,
        log_ratios.map(|(&v, &p)| log_ratio(v, p)),
    );
    match m_side {
        Some(tensor) => {
            // m's side is v as the decoder will have it: this commit's v̂.
            let v_hat = super::quant::reconstruct(&v, Some(chunk.parent_v), None)
                .expect("the v stream just made is valid");
            let m = scaled_m(chunk, tensor, &v_hat, m_step, m_residual);
            (m, v, Some(v_hat))
        }
        None => (plain_m(chunk, m_step, m_residual), v, None),
    }
}

/// m in its own units, as a residual against m̂_parent or as a value.
#[inline(always)]
fn plain_m(chunk: &GroupChunk<'_>, step: f32, residual: bool) -> Quantized {
    let domain = if residual {
        Domain::Residual
    } else {
        Domain::Value
    };
    let mut q = uniform_stream(domain, chunk.m_float, Levels::Linear(step), chunk.m.len());
    if residual {
        fill_uniform(&mut q, step, chunk.m, differences(chunk.m, chunk.parent_m));
    } else {
        fill_uniform(&mut q, step, chunk.m, chunk.m.iter().copied());
    }
    q
}

/// m in units of √v̂ + ε, v̂ the commit's reconstructed v: its side.
#[inline(always)]
fn scaled_m(
    chunk: &GroupChunk<'_>,
    side_tensor: &str,
    v_hat: &[f32],
    step: f32,
    residual: bool,
) -> Quantized {
    let domain = if residual {
        Domain::ScaledResidual
    } else {
        Domain::ScaledValue
    };
    let mut q = uniform_stream(domain, chunk.m_float, Levels::Linear(step), chunk.m.len());
    q.side = Some(Side {
        tensor: side_tensor.to_string(),
        float: chunk.v_float,
        floor: ADAM_EPS,
    });
    let scales = v_hat.iter().map(|&v| Side::scale(ADAM_EPS, v));
    if residual {
        let coded = differences(chunk.m, chunk.parent_m)
            .zip(scales)
            .map(|(d, s)| in_units(d, s));
        fill_uniform(&mut q, step, chunk.m, coded);
    } else {
        let coded = chunk.m.iter().zip(scales).map(|(&m, s)| in_units(m, s));
        fill_uniform(&mut q, step, chunk.m, coded);
    }
    q
}

/// `x / scale`, NaN (an escape: exact) where the scale is not finite. An
/// infinite √v̂ would put every finite m at level 0, and the decoder's
/// `0 · ∞` would make it NaN.
#[inline(always)]
fn in_units(x: f32, scale: f32) -> f32 {
    if scale.is_finite() {
        x / scale
    } else {
        f32::NAN
    }
}

fn codebook_stream(domain: Domain, float: FloatType, centres: &[f32], len: usize) -> Quantized {
    let mut levels = vec![0.0];
    levels.extend_from_slice(centres);
    Quantized {
        domain,
        float,
        side: None,
        predictor: None,
        levels: Levels::Table(levels),
        symbols: Vec::with_capacity(len),
        escapes: Vec::new(),
    }
}

/// Symbol 0 (dropped: zero, or no change for residuals) or the nearest
/// centre; a non-finite input is kept exactly rather than spread.
#[inline(always)]
fn push_codebook(q: &mut Quantized, centres: &[f32], coded: f32, exact: f32, keep: bool) {
    if !exact.is_finite() || !coded.is_finite() {
        q.symbols.push(ESCAPE);
        q.escapes.push(exact);
    } else if keep && !centres.is_empty() {
        q.symbols.push(1 + nearest(centres, coded) as u8);
    } else {
        q.symbols.push(0);
    }
}

fn uniform_stream(domain: Domain, float: FloatType, levels: Levels, len: usize) -> Quantized {
    Quantized {
        domain,
        float,
        side: None,
        predictor: None,
        levels,
        symbols: Vec::with_capacity(len),
        escapes: Vec::new(),
    }
}

/// Fills `q.symbols` with the uniform levels of `coded(i)` for every index
/// of `exact`, and `q.escapes` with `exact[i]` wherever the level is out of
/// range or not finite. Two passes, because the first (the hot loop of
/// lossy commits) has no branches and no pushes, so it vectorizes; escapes
/// are rare.
#[inline(always)]
fn fill_uniform(q: &mut Quantized, step: f32, exact: &[f32], coded: impl Iterator<Item = f32>) {
    q.symbols.clear();
    q.symbols.resize(exact.len(), ESCAPE);
    let mut escaped = exact.len();
    if step > 0.0 {
        // A 32-bit count (the payload's counts are u32 anyway): a 64-bit
        // one made the compiler use 4 lanes where AVX2 has 8.
        let mut count = 0u32;
        for (symbol, c) in q.symbols.iter_mut().zip(coded) {
            let t = c / step;
            // |round(t)| <= 127 exactly when |t| < 127.5 (false for NaN).
            let in_range = t.abs() < MAX_LEVEL as f32 + 0.5;
            let level = round_small(if in_range { t } else { 0.0 });
            *symbol = if in_range {
                (level + MAX_LEVEL) as u8
            } else {
                ESCAPE
            };
            count += u32::from(!in_range);
        }
        escaped = count as usize;
    }
    q.escapes.clear();
    if escaped > 0 {
        q.escapes.reserve(escaped);
        q.escapes.extend(
            q.symbols
                .iter()
                .zip(exact)
                .filter(|(s, _)| **s == ESCAPE)
                .map(|(_, x)| *x),
        );
    }
}

/// `x − parent`, element by element.
#[inline(always)]
fn differences<'a>(x: &'a [f32], parent: &'a [f32]) -> impl Iterator<Item = f32> + 'a {
    x.iter().zip(parent).map(|(x, p)| x - p)
}

/// `t.round()` (half away from zero) for |t| < 127.5, without a libm call
/// and in a form that vectorizes: truncation is one instruction and
/// `t − trunc(t)` is exact there.
#[inline(always)]
fn round_small(t: f32) -> i32 {
    debug_assert!(t.abs() < MAX_LEVEL as f32 + 0.5);
    // SAFETY: |t| < 127.5, so its truncation is a representable i32.
    let whole: i32 = unsafe { t.to_int_unchecked() };
    let fraction = t - whole as f32;
    whole + i32::from(fraction >= 0.5) - i32::from(fraction <= -0.5)
}

/// ln(v / v̂_parent), the coded value of v; NaN (an escape) where the ratio
/// is not representable. Written with selects rather than early returns so
/// the quantizer's v loop vectorizes.
#[inline(always)]
fn log_ratio(v: f32, parent: f32) -> f32 {
    let ratio = v / parent;
    let ln = fast_ln(ratio);
    // Beyond e^±80 the f32 level table overflows: exact instead. A ratio
    // below the smallest normal f32 is out of that range too, and is where
    // `fast_ln`'s bit split would not hold.
    let coded = v > 0.0
        && parent > 0.0
        && parent.is_finite()
        && (f32::MIN_POSITIVE..=f32::MAX).contains(&ratio)
        && ln.abs() < 80.0;
    // Unchanged (notably v = 0 for rows that never had a gradient, like
    // unused embeddings) is level 0: exact.
    if v == parent {
        0.0
    } else if coded {
        ln
    } else {
        f32::NAN
    }
}

/// Natural log of a positive normal f32, in plain arithmetic (no libm call,
/// so loops over it vectorize): x = 2^e · m with m in [√½, √2), and
/// ln m = 2·atanh(s), s = (m − 1)/(m + 1), |s| < 0.172, summed to s⁹
/// (the next term is below 7e-10). Near 1, where v's ratios sit, within
/// 2e-7 + 1e-6·|ln x| of the exact value, and within 2e-5 (a few f32 ulps
/// of the result) over the whole normal range (tested); the result only picks a
/// quantizer level, and the level table is what both encoder and decoder use,
/// so the closed loop does not depend on it being exact.
#[inline(always)]
fn fast_ln(x: f32) -> f32 {
    const SQRT_2: f32 = std::f32::consts::SQRT_2;
    let bits = x.to_bits();
    let exponent = ((bits >> 23) & 0xff) as i32 - 127;
    let mantissa = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000);
    let high = mantissa > SQRT_2;
    let m = if high { mantissa * 0.5 } else { mantissa };
    let e = (exponent + i32::from(high)) as f32;
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let series = 2.0 + s2 * (2.0 / 3.0 + s2 * (2.0 / 5.0 + s2 * (2.0 / 7.0 + s2 * (2.0 / 9.0))));
    e * std::f32::consts::LN_2 + s * series
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::quant::reconstruct;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_small_matches_round(t in -127.49f32..127.49) {
            prop_assert_eq!(round_small(t), t.round() as i32);
        }
    }

    #[test]
    fn round_small_on_ties() {
        for t in [
            0.5f32,
            -0.5,
            1.5,
            -1.5,
            126.5,
            -126.5,
            0.49999997,
            -0.49999997,
            0.0,
            -0.0,
        ] {
            assert_eq!(round_small(t), t.round() as i32, "{t}");
        }
    }

    fn chunk<'a>(
        w: &'a [f32],
        m: &'a [f32],
        v: &'a [f32],
        p: &'a [f32],
        vp: &'a [f32],
    ) -> GroupChunk<'a> {
        GroupChunk {
            w,
            m,
            v,
            parent_w: p,
            // Far from m: m is coded as a value, not a residual.
            parent_m: vp,
            parent_v: vp,
            w_float: FloatType::F32,
            m_float: FloatType::F32,
            v_float: FloatType::F32,
            parent_w_error: 0.0,
            side_tensor: None,
            moments: None,
        }
    }

    const F32S: [FloatType; 3] = [FloatType::F32; 3];

    #[test]
    fn fast_ln_matches_ln() {
        let mut worst = 0f32;
        let mut x = f32::MIN_POSITIVE;
        while x < 1e30 {
            for k in 0..64 {
                let y = x * (1.0 + k as f32 / 64.0);
                worst = worst.max((fast_ln(y) - y.ln()).abs());
            }
            x *= 1.7;
        }
        assert!(worst < 2e-5, "worst absolute error {worst}");
        assert_eq!(fast_ln(1.0), 0.0);
        // Near 1, where v's ratios sit, the error is relative to ln itself.
        for k in 1..2000 {
            let y = 1.0 + (k as f32 - 1000.0) * 1e-4;
            let (fast, exact) = (fast_ln(y), (y as f64).ln() as f32);
            assert!(
                (fast - exact).abs() <= 2e-7 + 1e-6 * exact.abs(),
                "{y}: {fast} vs {exact}"
            );
        }
    }

    #[test]
    fn log_ratio_escapes_what_it_cannot_code() {
        assert_eq!(log_ratio(0.0, 0.0), 0.0);
        assert_eq!(log_ratio(2e-9, 2e-9), 0.0);
        assert!((log_ratio(2e-9, 1e-9) - std::f32::consts::LN_2).abs() < 1e-6);
        for (v, p) in [
            (0.0, 1e-9),
            (1e-9, 0.0),
            (-1.0, 1.0),
            (f32::NAN, 1.0),
            (1.0, f32::INFINITY),
            (f32::INFINITY, 1.0),
            (1e30, 1e-30),
            (1e-30, 1e30),
        ] {
            assert!(log_ratio(v, p).is_nan(), "{v} / {p}");
        }
    }

    /// The one-pass sums of the tuned policies are those of the two-pass
    /// statistics, non-finite elements left out alike, on lengths that are
    /// and are not a multiple of the lane count.
    #[test]
    fn chunk_sums_match_full_statistics() {
        for n in [0, 1, 7, 8, 9, 1001] {
            let w = series(n, 1, 2.0);
            let mut m = series(n, 2, 0.1);
            let v: Vec<f32> = series(n, 3, 1.0).iter().map(|x| x * x).collect();
            let p = series(n, 4, 2.0);
            if n > 5 {
                m[3] = f32::NAN;
                m[5] = f32::INFINITY;
            }
            let c = chunk(&w, &m, &v, &p, &v);
            let (full, sums) = (
                GroupStats::of_chunk(0, n as u64, &c),
                GroupStats::tuned_sums_of_chunk(&c),
            );
            assert_eq!(full.count, sums.count, "n = {n}");
            for (a, b) in [
                (full.sum_w2, sums.sum_w2),
                (full.sum_m2, sums.sum_m2),
                (full.sum_dm2, sums.sum_dm2),
            ] {
                assert!(
                    (a - b).abs() <= 1e-12 * a.abs().max(1.0),
                    "n = {n}: {a} vs {b}"
                );
            }
        }
    }

    fn series(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
            })
            .collect()
    }

    /// Parent weights, weights that moved a little from them, and a momentum.
    fn moving_weights(n: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let p = series(n, 1, 0.1);
        let w = p
            .iter()
            .zip(series(n, 2, 0.002))
            .map(|(a, b)| a + b)
            .collect();
        (p, w, series(n, 3, 1e-3))
    }

    #[test]
    fn knobs_adjust_presets() {
        let none = Knobs::default();
        assert_eq!(none.apply(None), Ok(None));
        let alpha = Knobs {
            alpha: Some(1e-4),
            ..none
        };
        assert_eq!(
            alpha.apply(None),
            Ok(Some(Policy::Excp {
                alpha: 1e-4,
                beta: 2.0,
                bits: 4
            }))
        );
        let step = Knobs {
            w_step: Some(0.5),
            ..none
        };
        let Ok(Some(Policy::Predictive { preset, w_step, .. })) =
            step.apply(Policy::preset("faithful"))
        else {
            panic!()
        };
        assert_eq!((preset.as_str(), w_step), ("custom", 0.5));
        // Without W's prediction: the guided coding of 2026-11-30.
        let unpredicted = Knobs {
            w_predicted: Some(false),
            ..none
        };
        let Ok(Some(Policy::Guided { preset, w_step, .. })) =
            unpredicted.apply(Policy::preset("faithful"))
        else {
            panic!()
        };
        assert_eq!((preset.as_str(), w_step), ("custom", 0.008));
        // A store made with 2026-11-30's presets codes with today's.
        let guided = Policy::Guided {
            preset: "balanced".into(),
            w_step: 0.02,
            w_update_step: 1.0,
            m_step: 3.0,
            v_log_step: 0.8,
        };
        assert_eq!(guided.current(), Policy::preset("balanced").unwrap());
        // A store made with the first predictive `compact` (change bound 3,
        // m step 6, v log step 1.5) codes with today's.
        let first_compact = Policy::Predictive {
            preset: "compact".into(),
            w_step: 0.065,
            w_update_step: 3.0,
            m_step: 6.0,
            v_log_step: 1.5,
        };
        assert_eq!(first_compact.current(), Policy::preset("compact").unwrap());
        let custom = Policy::Predictive {
            preset: "custom".into(),
            w_step: 0.065,
            w_update_step: 3.0,
            m_step: 6.0,
            v_log_step: 1.5,
        };
        assert_eq!(custom.clone().current(), custom);
        // A store's default recorded before the presets changed: the preset
        // means today's, its knobs still apply, and old custom knobs stay.
        let old = Policy::Tuned {
            preset: "faithful".into(),
            w_step: 0.008,
            m_step: 1.0,
            v_log_step: 0.3,
        };
        assert_eq!(old.clone().current(), Policy::preset("faithful").unwrap());
        assert!(matches!(
            step.apply(Some(old)),
            Ok(Some(Policy::Predictive { .. }))
        ));
        let old_custom = Policy::Tuned {
            preset: "custom".into(),
            w_step: 0.01,
            m_step: 1.0,
            v_log_step: 0.3,
        };
        assert_eq!(old_custom.clone().current(), old_custom);
        let update = Knobs {
            w_update_step: Some(1.0),
            ..none
        };
        assert!(update.apply(Some(old_custom)).is_err());
        assert!(step.apply(Policy::preset("excp")).is_err());
        assert!(alpha.apply(Policy::preset("balanced")).is_err());
        assert!(
            Knobs {
                w_step: Some(1.0),
                ..alpha
            }
            .apply(None)
            .is_err()
        );
    }

    #[test]
    fn extreme_v_ratios_are_stored_exactly() {
        let v = [1e30f32, 1e-30, 2.0];
        let vp = [1e-30f32, 1e30, 1.0];
        let zeros = [0.0f32; 3];
        let input = GroupChunk {
            w: &zeros,
            m: &zeros,
            v: &v,
            parent_w: &zeros,
            parent_m: &zeros,
            parent_v: &vp,
            w_float: FloatType::F32,
            m_float: FloatType::F32,
            v_float: FloatType::F32,
            parent_w_error: 0.0,
            side_tensor: None,
            moments: None,
        };
        let policy = Policy::preset("compact").unwrap();
        let plan = plan(&policy, &GroupStats::of_chunk(0, 3, &input), F32S).unwrap();
        let [_, _, qv] = quantize(&plan, &input);
        let v_hat = reconstruct(&qv, Some(&vp), None).unwrap();
        assert_eq!(&v_hat[..2], &v[..2]);
        assert!(v_hat.iter().all(|x| x.is_finite()));
    }

    #[test]
    fn kmeans_finds_clusters() {
        let data: Vec<f32> = (0..300)
            .map(|i| [1.0, 5.0, 9.0][i % 3] + (i % 7) as f32 * 0.01)
            .collect();
        let c = kmeans(&data, 3);
        assert_eq!(c.len(), 3);
        assert!(
            (c[0] - 1.03).abs() < 0.05 && (c[1] - 5.03).abs() < 0.05 && (c[2] - 9.03).abs() < 0.05,
            "{c:?}"
        );
        assert_eq!(nearest(&c, 4.0), 1);
        assert!(kmeans(&[], 15).is_empty());
    }

    #[test]
    fn tuned_errors_are_bounded_and_v_never_zeroed() {
        let n = 10_000;
        let (p, w, m) = moving_weights(n);
        let vp: Vec<f32> = series(n, 4, 1.0)
            .iter()
            .map(|x| x * x * 1e-6 + 1e-12)
            .collect();
        let v: Vec<f32> = vp.iter().map(|x| x * 1.01).collect();
        let policy = Policy::preset("balanced").unwrap();
        let input = chunk(&w, &m, &v, &p, &vp);
        let plan = plan(&policy, &GroupStats::of_chunk(0, n as u64, &input), F32S).unwrap();
        let [qw, qm, qv] = quantize(&plan, &input);
        let w_hat = reconstruct(&qw, Some(&p), None).unwrap();
        let m_hat = reconstruct(&qm, None, None).unwrap();
        let v_hat = reconstruct(&qv, Some(&vp), None).unwrap();
        let TensorPlan::Guided {
            w_step,
            m_step,
            m_scaled: false,
            v_log_step,
            ..
        } = plan
        else {
            panic!()
        };
        for i in 0..n {
            assert!((w_hat[i] - w[i]).abs() <= w_step * 0.51, "w {i}");
            assert!((m_hat[i] - m[i]).abs() <= m_step * 0.51, "m {i}");
            assert!(v_hat[i] > 0.0);
            assert!((v_hat[i] / v[i]).ln().abs() <= v_log_step * 0.51, "v {i}");
        }
    }

    #[test]
    fn excp_drops_small_changes_and_zeroes_v_with_m() {
        let n = 10_000;
        let (p, w, m) = moving_weights(n);
        let v: Vec<f32> = m.iter().map(|x| x * x + 1e-9).collect();
        let policy = Policy::preset("excp").unwrap();
        let input = chunk(&w, &m, &v, &p, &v);
        let plan = plan(&policy, &GroupStats::of_chunk(0, n as u64, &input), F32S).unwrap();
        let [qw, qm, qv] = quantize(&plan, &input);
        assert!(qw.symbols.contains(&0) && qw.symbols.iter().any(|&s| s > 0));
        for i in 0..n {
            assert_eq!(
                qm.symbols[i] == 0,
                qv.symbols[i] == 0,
                "v kept exactly where m is"
            );
            if qm.symbols[i] != 0 {
                assert_ne!(qw.symbols[i], 0, "m kept only where dW kept");
            }
        }
        assert!(reconstruct(&qv, None, None).unwrap().contains(&0.0));
    }

    #[test]
    fn non_finite_values_stay_where_they_are() {
        let p = vec![0.5f32; 8];
        let mut w = vec![0.51f32; 8];
        w[3] = f32::NAN;
        let mut m = vec![1e-3f32; 8];
        m[5] = f32::INFINITY;
        let mut v = vec![1e-6f32; 8];
        v[6] = f32::NEG_INFINITY;
        for name in ["excp", "balanced"] {
            let policy = Policy::preset(name).unwrap();
            let input = chunk(&w, &m, &v, &p, &v);
            let plan = plan(&policy, &GroupStats::of_chunk(0, 8, &input), F32S).unwrap();
            let [qw, qm, qv] = quantize(&plan, &input);
            let w_hat = reconstruct(&qw, Some(&p), None).unwrap();
            let m_hat = reconstruct(&qm, None, None).unwrap();
            let v_hat = reconstruct(&qv, Some(&v), None).unwrap();
            assert!(
                w_hat[3].is_nan() && m_hat[5] == f32::INFINITY && v_hat[6] == f32::NEG_INFINITY
            );
            for i in [0, 1, 2, 4, 7] {
                assert!(
                    w_hat[i].is_finite() && m_hat[i].is_finite() && v_hat[i].is_finite(),
                    "{name} {i}"
                );
            }
        }
    }

    /// A parent W and Adam moments of `n` elements, as W's prediction tests
    /// use them.
    fn weights_and_moments(n: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let v = series(n, 4, 1e-6).iter().map(|x| x.abs() + 1e-8).collect();
        (series(n, 1, 0.1), series(n, 3, 1e-3), v)
    }

    /// Where the parent's moments get weight 0, the encoder's prediction is
    /// the decoder's even at an element whose parent m is NaN (the
    /// encoder once computed `0 · NaN` there and the decoder, which does not
    /// read those moments, 0: the commit's recorded hash then disagreed
    /// with what checkout decodes).
    #[test]
    fn a_nan_parent_moment_of_weight_zero_predicts_as_the_decoder_does() {
        use super::super::quant::{prediction, reconstruct};
        let n = 20_000;
        let (p, m, v) = weights_and_moments(n);
        let mut parent_m = m.clone();
        parent_m[7] = f32::NAN;
        let lr = 1e-3f32;
        let noise = series(n, 5, 2e-5);
        let w: Vec<f32> = (0..n)
            .map(|i| p[i] - lr * m[i] / (v[i].sqrt() + ADAM_EPS) + noise[i])
            .collect();
        let input = GroupChunk {
            parent_m: &parent_m,
            side_tensor: Some("x.exp_avg_sq"),
            moments: Some(Moments {
                file: "optimizer.safetensors",
                m: "x.exp_avg",
                v: "x.exp_avg_sq",
            }),
            ..chunk(&w, &m, &v, &p, &v)
        };
        let faithful = Policy::preset("faithful").unwrap();
        let plan = plan(&faithful, &GroupStats::guided_sums_of_chunk(&input), F32S).unwrap();
        let ([qw, qm, qv], made) = quantize_keeping_recons(&plan, &input);
        let predictor = qw.predictor.clone().expect("W is predicted");
        assert_eq!(predictor.coef[1], 0.0, "{:?}", predictor.coef);
        let v_hat = reconstruct(&qv, Some(&v), None).unwrap();
        let m_hat = reconstruct(&qm, Some(&parent_m), Some(&v_hat)).unwrap();
        let pred = prediction(&predictor, &p, &[m_hat, v_hat]).unwrap();
        let w_hat = reconstruct(&qw, Some(&p), Some(&pred)).unwrap();
        // The first element where encoder and decoder differ, if any.
        let differ = |a: &[f32], b: &[f32]| a.iter().zip(b).position(|(x, y)| x != y);
        assert_eq!(differ(made.prediction.as_deref().unwrap(), &pred), None);
        assert_eq!(differ(made.recons[0].as_deref().unwrap(), &w_hat), None);
    }

    /// Under a preset, W whose change is mostly Adam's update (−lr·m/√v,
    /// with weight decay) is coded as what the prediction from this
    /// commit's m̂ and v̂ misses: the fitted weight is close to −lr, the
    /// stream decodes from the moments as a decoder gets them, and the same
    /// step costs fewer bits than without the prediction. A change the
    /// moments do not predict is coded as before.
    #[test]
    fn w_is_coded_as_what_the_moments_do_not_predict() {
        use super::super::quant::{prediction, reconstruct};
        let n = 20_000;
        let (p, m, v) = weights_and_moments(n);
        let noise = series(n, 5, 2e-5);
        let lr = 1e-3f32;
        let w: Vec<f32> = (0..n)
            .map(|i| p[i] * (1.0 - lr * 0.01) - lr * m[i] / (v[i].sqrt() + ADAM_EPS) + noise[i])
            .collect();
        let moments = Moments {
            file: "optimizer.safetensors",
            m: "x.exp_avg",
            v: "x.exp_avg_sq",
        };
        let input = GroupChunk {
            parent_m: &m,
            side_tensor: Some("x.exp_avg_sq"),
            moments: Some(moments),
            ..chunk(&w, &m, &v, &p, &v)
        };
        let faithful = Policy::preset("faithful").unwrap();
        let stats = GroupStats::guided_sums_of_chunk(&input);
        let plan = plan(&faithful, &stats, F32S).unwrap();
        let ([qw, qm, qv], made) = quantize_keeping_recons(&plan, &input);
        let recons = made.recons;
        assert_eq!(qw.domain, Domain::PredictedResidual);
        let predictor = qw.predictor.clone().unwrap();
        assert!(
            (predictor.coef[0] / -lr - 1.0).abs() < 0.05,
            "{:?}",
            predictor.coef
        );
        assert_eq!(predictor.file, "optimizer.safetensors");
        let v_hat = reconstruct(&qv, Some(&v), None).unwrap();
        let m_hat = reconstruct(&qm, Some(&m), Some(&v_hat)).unwrap();
        // The parent's moments equal this commit's here (u and u_parent
        // collinear): their weight is 0 and they are not read.
        assert_eq!(predictor.coef[1], 0.0);
        assert_eq!(qw.side_refs().len(), 2);
        let sides = [m_hat.clone(), v_hat.clone()];
        let pred = prediction(&predictor, &p, &sides).unwrap();
        let w_hat = reconstruct(&qw, Some(&p), Some(&pred)).unwrap();
        assert_eq!(recons[0].as_deref(), Some(w_hat.as_slice()));
        assert_eq!(recons[1].as_deref(), Some(m_hat.as_slice()));
        let bits = |q: &Quantized| {
            let mut out = Vec::new();
            super::super::quant::write_payload(q, &mut out);
            out.len()
        };
        let guided = Knobs {
            w_predicted: Some(false),
            ..Knobs::default()
        }
        .apply(Some(faithful.clone()))
        .unwrap()
        .unwrap();
        let plain_plan = super::plan(&guided, &stats, F32S).unwrap();
        let [plain_w, _, _] = quantize(&plain_plan, &input);
        assert_eq!(plain_w.domain, Domain::Residual);
        assert!(
            bits(&qw) * 2 < bits(&plain_w),
            "{} vs {}",
            bits(&qw),
            bits(&plain_w)
        );
        // A change unrelated to the moments: no prediction.
        let moved: Vec<f32> = p
            .iter()
            .zip(series(n, 6, 2e-3))
            .map(|(a, b)| a + b)
            .collect();
        let unrelated = GroupChunk { w: &moved, ..input };
        let stats = GroupStats::guided_sums_of_chunk(&unrelated);
        let plan = super::plan(&faithful, &stats, F32S).unwrap();
        let [qw, _, _] = quantize(&plan, &unrelated);
        assert_eq!(qw.domain, Domain::Residual);
    }

    // The separate passes lane_sums replaced, as its reference.
    fn tuned_sums_reference(chunk: &GroupChunk<'_>) -> GroupStats {
        const LANES: usize = 8;
        let n = chunk.w.len();
        let (w, m, v) = (&chunk.w[..n], &chunk.m[..n], &chunk.v[..n]);
        let (pw, pm) = (&chunk.parent_w[..n], &chunk.parent_m[..n]);
        let mut count = [0u32; LANES];
        let [mut w2, mut m2, mut dm2] = [[0f64; LANES]; 3];
        let mut add = |lane: usize, wi: f32, mi: f32, vi: f32, pwi: f32, pmi: f32| {
            let (dw, dm) = (wi - pwi, mi - pmi);
            let finite = dw.is_finite() && dm.is_finite() && vi.is_finite();
            let keep = |x: f32| if finite { x as f64 } else { 0.0 };
            count[lane] += u32::from(finite);
            w2[lane] += keep(wi) * keep(wi);
            m2[lane] += keep(mi) * keep(mi);
            dm2[lane] += keep(dm) * keep(dm);
        };
        let groups = w
            .chunks_exact(LANES)
            .zip(m.chunks_exact(LANES))
            .zip(v.chunks_exact(LANES))
            .zip(pw.chunks_exact(LANES).zip(pm.chunks_exact(LANES)));
        for (((w, m), v), (pw, pm)) in groups {
            for lane in 0..LANES {
                add(lane, w[lane], m[lane], v[lane], pw[lane], pm[lane]);
            }
        }
        for i in n - n % LANES..n {
            add(i % LANES, w[i], m[i], v[i], pw[i], pm[i]);
        }
        GroupStats {
            count: count.iter().map(|&c| c as u64).sum(),
            sum_w2: w2.iter().sum(),
            sum_m2: m2.iter().sum(),
            sum_dm2: dm2.iter().sum(),
            ..GroupStats::default()
        }
    }

    /// Σ (x − parent)² over the finite differences, in eight lanes.
    fn squared_differences(x: &[f32], parent: &[f32]) -> f64 {
        const LANES: usize = 8;
        let mut sums = [0f64; LANES];
        let add = |sum: &mut f64, x: f32, p: f32| {
            let d = (x - p) as f64;
            *sum += if d.is_finite() { d * d } else { 0.0 };
        };
        let (xs, ps) = (x.chunks_exact(LANES), parent.chunks_exact(LANES));
        let (x_tail, p_tail) = (xs.remainder(), ps.remainder());
        for (x, p) in xs.zip(ps) {
            for lane in 0..LANES {
                add(&mut sums[lane], x[lane], p[lane]);
            }
        }
        for (lane, (&x, &p)) in x_tail.iter().zip(p_tail).enumerate() {
            add(&mut sums[lane], x, p);
        }
        sums.iter().sum()
    }

    /// (Σ u², Σ (u − û_parent)²) with u = m / (√v + ε), v this commit's
    /// (why: `lane_sums`), over the finite terms.
    fn update_sums(chunk: &GroupChunk<'_>) -> (f64, f64) {
        let (mut u2, mut du2) = ([0f64; 8], [0f64; 8]);
        let elements = chunk.m.iter().zip(chunk.parent_m).zip(chunk.v);
        for (i, ((&m, &pm), &v)) in elements.enumerate() {
            let scale = Side::scale(ADAM_EPS, v);
            let (u, du) = ((m / scale) as f64, ((m - pm) / scale) as f64);
            let ok = u.is_finite() && du.is_finite();
            u2[i % 8] += if ok { u * u } else { 0.0 };
            du2[i % 8] += if ok { du * du } else { 0.0 };
        }
        (u2.iter().sum(), du2.iter().sum())
    }

    /// The one-pass sums equal the separate passes' bit for bit, with
    /// non-finite elements of every input and a tail beyond the lanes.
    #[test]
    fn one_pass_guided_sums_equal_the_separate_passes() {
        let n = 10_003;
        let mut w = series(n, 11, 1.0);
        let mut m = series(n, 12, 1e-3);
        let mut v: Vec<f32> = series(n, 13, 1e-6).iter().map(|x| x.abs()).collect();
        let p = series(n, 14, 1.0);
        let mut pm = series(n, 15, 1e-3);
        w[3] = f32::NAN;
        m[100] = f32::INFINITY;
        v[2000] = f32::NAN;
        pm[n - 1] = f32::NEG_INFINITY;
        v[77] = 0.0;
        for side in [None, Some("x.exp_avg_sq")] {
            let input = GroupChunk {
                parent_m: &pm,
                side_tensor: side,
                parent_w_error: 0.25,
                ..chunk(&w, &m, &v, &p, &v)
            };
            let fused = GroupStats::guided_sums_of_chunk(&input);
            assert_eq!(fused.parent_w_error, 0.25);
            let tuned = tuned_sums_reference(&input);
            let tuned_pass = GroupStats::tuned_sums_of_chunk(&input);
            assert_eq!(tuned_pass.count, tuned.count);
            assert_eq!(tuned_pass.sum_w2.to_bits(), tuned.sum_w2.to_bits());
            assert_eq!(tuned_pass.sum_m2.to_bits(), tuned.sum_m2.to_bits());
            assert_eq!(tuned_pass.sum_dm2.to_bits(), tuned.sum_dm2.to_bits());
            assert_eq!(tuned_pass.sum_dw2, 0.0);
            assert_eq!(fused.count, tuned.count);
            assert_eq!(fused.sum_w2.to_bits(), tuned.sum_w2.to_bits());
            assert_eq!(fused.sum_m2.to_bits(), tuned.sum_m2.to_bits());
            assert_eq!(fused.sum_dm2.to_bits(), tuned.sum_dm2.to_bits());
            let dw2 = squared_differences(&w, &p);
            assert_eq!(fused.sum_dw2.to_bits(), dw2.to_bits());
            let (u2, du2) = if side.is_some() {
                update_sums(&input)
            } else {
                (0.0, 0.0)
            };
            assert_eq!(fused.sum_u2.to_bits(), u2.to_bits());
            assert_eq!(fused.sum_du2.to_bits(), du2.to_bits());
        }
    }

    /// Where v̂ is infinite (a diverged element), m scaled by it is kept
    /// exactly instead of becoming `0 · ∞ = NaN` in the decoder, as a value
    /// and as a residual; the other elements keep their bound.
    #[test]
    fn an_infinite_v_leaves_m_exact() {
        let n = 4_000;
        let u = series(n, 7, 2.0);
        let mut v: Vec<f32> = series(n, 8, 1e-8).iter().map(|x| x.abs() + 1e-9).collect();
        v[17] = f32::INFINITY;
        let m: Vec<f32> = u
            .iter()
            .zip(&v)
            .map(|(u, v)| u * v.sqrt().min(1e-4))
            .collect();
        let (p, w, _) = moving_weights(n);
        let pm_residual: Vec<f32> = m.iter().map(|x| x * 0.9).collect();
        for parent_m in [vec![0.0f32; n], pm_residual] {
            let input = GroupChunk {
                parent_m: &parent_m,
                side_tensor: Some("x.exp_avg_sq"),
                ..chunk(&w, &m, &v, &p, &v)
            };
            for name in ["compact", "balanced", "faithful"] {
                let policy = Policy::preset(name).unwrap();
                let stats = GroupStats::guided_sums_of_chunk(&input);
                let plan = plan(&policy, &stats, F32S).unwrap();
                let [_, qm, qv] = quantize(&plan, &input);
                assert!(qm.side.is_some(), "{name}: m is scaled");
                let v_hat = reconstruct(&qv, Some(&v), None).unwrap();
                assert_eq!(v_hat[17], f32::INFINITY, "{name}");
                let m_hat = reconstruct(&qm, Some(&parent_m), Some(&v_hat)).unwrap();
                assert_eq!(m_hat[17], m[17], "{name}");
                assert!(m_hat.iter().all(|x| x.is_finite()), "{name}");
            }
        }
    }

    /// m's step is sized in the units m is coded in, this commit's √v̂:
    /// where v grew a hundredfold since the parent (early training), m over
    /// the parent's √v is heavy-tailed and a step sized from it zeroed
    /// every m (a ZeRO fixture's layer, balanced: m's error was 100%).
    #[test]
    fn m_step_is_sized_against_this_commits_v() {
        let n = 20_000;
        let u = series(n, 7, 2.0);
        let parent_v: Vec<f32> = series(n, 8, 1e-8).iter().map(|x| x.abs() + 1e-9).collect();
        let v: Vec<f32> = parent_v
            .iter()
            .enumerate()
            .map(|(i, &p)| if i % 10 == 0 { p * 100.0 } else { p })
            .collect();
        let m: Vec<f32> = u.iter().zip(&v).map(|(u, v)| u * v.sqrt()).collect();
        let (p, w, _) = moving_weights(n);
        let pm = vec![0.0f32; n];
        let input = GroupChunk {
            parent_m: &pm,
            side_tensor: Some("x.exp_avg_sq"),
            ..chunk(&w, &m, &v, &p, &parent_v)
        };
        let balanced = Policy::preset("balanced").unwrap();
        let stats = GroupStats::guided_sums_of_chunk(&input);
        let Some(TensorPlan::Guided {
            m_step,
            m_scaled: true,
            ..
        }) = plan(&balanced, &stats, F32S)
        else {
            panic!("a scaled guided plan")
        };
        let ([_, _, knob, _], _) = balanced.guided_knobs().unwrap();
        let rms_u = (u.iter().map(|x| (x * x) as f64).sum::<f64>() / n as f64).sqrt() as f32;
        assert!(
            (m_step / (knob * rms_u) - 1.0).abs() < 0.01,
            "{m_step} vs {knob} × {rms_u}"
        );
        let [_, qm, qv] = quantize(&plan(&balanced, &stats, F32S).unwrap(), &input);
        let v_hat = reconstruct(&qv, Some(&parent_v), None).unwrap();
        let m_hat = reconstruct(&qm, Some(&pm), Some(&v_hat)).unwrap();
        // A step of 3 RMS keeps the tails (|u| > 1.5 RMS): an eighth of a
        // uniform u; none at a step sized from the parent's v (10 RMS).
        let kept = m_hat.iter().filter(|x| **x != 0.0).count();
        assert!(kept > n / 20, "{kept} of {n} m elements kept");
    }

    /// A guided plan's m error is bounded element by element in units of
    /// the side (√v̂ + ε), so elements with a small v get a fine step;
    /// its W step is the smaller of its two bounds; bf16 tensors get steps
    /// 2√3 times coarser; the streams decode with the side as the decoder
    /// gets it.
    #[test]
    fn guided_errors_follow_the_update() {
        let n = 10_000;
        let (p, w, m) = moving_weights(n);
        // v spanning eight decades: a uniform m step would swamp the small ones.
        let vp: Vec<f32> = (0..n)
            .map(|i| 10f32.powi(-((i % 9) as i32)) * 1e-4)
            .collect();
        let v: Vec<f32> = vp.iter().map(|x| x * 1.01).collect();
        let m: Vec<f32> = m
            .iter()
            .zip(&vp)
            .map(|(x, v)| x * v.sqrt() * 50.0)
            .collect();
        let pm = vec![0.0f32; n];
        // A bound tight enough to be the step here (the weights' step is
        // 0.008 × RMS(W) ≈ 2.3e-4; the change's RMS ≈ 5.8e-4).
        let policy = Knobs {
            w_update_step: Some(0.2),
            ..Knobs::default()
        }
        .apply(Policy::preset("faithful"))
        .unwrap()
        .unwrap();
        let input = GroupChunk {
            parent_m: &pm,
            side_tensor: Some("x.exp_avg_sq"),
            ..chunk(&w, &m, &v, &p, &vp)
        };
        let stats = GroupStats::guided_sums_of_chunk(&input);
        let plan = plan(&policy, &stats, F32S).unwrap();
        let TensorPlan::Guided {
            w_step,
            m_step,
            m_scaled: true,
            ..
        } = plan
        else {
            panic!("{plan:?}")
        };
        let rms_dw = (stats.sum_dw2 / n as f64).sqrt() as f32;
        assert!(
            (w_step - 0.2 * rms_dw).abs() <= 1e-4 * rms_dw,
            "W step bounded by the change"
        );
        // All of W − Ŵ_parent the parent's own error (a checkpoint committed
        // again): no bound, the step is the weights'.
        let rms_w = (stats.sum_w2 / n as f64).sqrt() as f32;
        let repeat = GroupStats {
            parent_w_error: rms_dw / rms_w,
            ..stats.clone()
        };
        let Some(TensorPlan::Guided {
            w_step: w_repeat, ..
        }) = super::plan(&policy, &repeat, F32S)
        else {
            panic!()
        };
        assert!(
            (w_repeat - 0.008 * rms_w).abs() <= 1e-6 * rms_w,
            "{w_repeat} vs {rms_w}"
        );
        let [qw, qm, qv] = quantize(&plan, &input);
        assert_eq!(qm.side.as_ref().unwrap().tensor, "x.exp_avg_sq");
        assert!(
            reconstruct(&qm, Some(&pm), None).is_err(),
            "the side is required"
        );
        let v_hat = reconstruct(&qv, Some(&vp), None).unwrap();
        let m_hat = reconstruct(&qm, Some(&pm), Some(&v_hat)).unwrap();
        let w_hat = reconstruct(&qw, Some(&p), None).unwrap();
        for i in 0..n {
            let scale = Side::scale(ADAM_EPS, v_hat[i]);
            assert!((m_hat[i] - m[i]).abs() <= 0.51 * m_step * scale, "m {i}");
            assert!((w_hat[i] - w[i]).abs() <= 0.51 * w_step, "w {i}");
        }
        let bf16 = plan_for_floats(&policy, &stats, [FloatType::BF16; 3]);
        let ratio = |a: f32, b: f32| (a / b - 2.0 * 3f32.sqrt()).abs() < 1e-3;
        let TensorPlan::Guided {
            w_step: w16,
            m_step: m16,
            v_log_step: v16,
            ..
        } = bf16
        else {
            panic!()
        };
        let TensorPlan::Guided { v_log_step, .. } = plan else {
            panic!()
        };
        assert!(ratio(m16, m_step) && ratio(v16, v_log_step));
        // Here the change bounds W's step, and that bound is not scaled.
        assert_eq!(w16, w_step);
        let Some(TensorPlan::Guided { w_step: w16, .. }) =
            super::plan(&policy, &repeat, [FloatType::BF16; 3])
        else {
            panic!()
        };
        assert!(ratio(w16, w_repeat), "the weights' step is");
        // Without a side, m is coded in its own units, as before.
        let plain = GroupChunk {
            side_tensor: None,
            moments: None,
            ..input
        };
        let plan = super::plan(&policy, &GroupStats::guided_sums_of_chunk(&plain), F32S).unwrap();
        let [_, qm, _] = quantize(&plan, &plain);
        assert!(qm.side.is_none() && !qm.domain.needs_side());
    }

    fn plan_for_floats(policy: &Policy, stats: &GroupStats, floats: [FloatType; 3]) -> TensorPlan {
        plan(policy, stats, floats).unwrap()
    }
}
