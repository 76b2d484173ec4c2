//! Quantized tensor chunks: one symbol per element, entropy-coded with rANS,
//! mapped back to values through a table of levels.
//!
//! Reconstruction of element `i` with symbol `s = sym[i]`:
//! - `s == ESCAPE`: the next value of the escape list, exactly (outliers,
//!   NaN/Inf, elements without a usable base);
//! - domain `Value`: `level[s]`;
//! - domain `Residual`: `base[i] + level[s]`;
//! - domain `Ratio`: `base[i] * level[s]` (log-domain coding of positive
//!   values such as Adam's v: the level table holds the factors);
//! - domains `ScaledValue` and `ScaledResidual`: `level[s] * scale[i]`, and
//!   `base[i]` plus that, with `scale[i] = sqrt(max(side[i], 0)) + floor`,
//!   `side` being another tensor's chunk at the same position (file and chunk
//!   index) of the same commit (Adam's m coded in units of its own update:
//!   the side is the commit's v̂, so the step of each element follows √v̂
//!   as Adam's division by √v does, and every element's update gets the
//!   same relative precision);
//! - domain `PredictedResidual`: `base[i] + pred[i] + level[s]`, where
//!   `pred[i] = a·u[i] + b·u_base[i] + c·base[i]` predicts W's change from
//!   Adam's moments: `u = m̂ / (√max(v̂, 0) + floor)` is the update
//!   direction of this commit's m̂ and v̂ (`u_base`: of the base commit's),
//!   read from the optimizer's chunks at the same chunk index, and `a`, `b`,
//!   `c` are fitted per chunk by the encoder (a non-finite prediction counts
//!   as 0);
//!
//! all in f32, then rounded to the stored float type. Encoder and decoder use
//! the same [`reconstruct`], so the encoder knows the decoder's output
//! exactly (closed loop).
//!
//! Payload layout (after the common blob header): domain u8, float type u8,
//! levels (kind u8: 0 = table, then count u16 LE and f32 LE each; 1 = linear
//! or 2 = exp, then the step as f32 LE), escape count u32 LE, escapes as f32
//! LE, then the rANS stream of symbols.
//!
//! Context-coded symbols (see [`super::context`]): bit 7 of the domain byte
//! set; after the escapes, the threshold count `t` (u8, at most 3) and the
//! `t` thresholds as f32 LE, then one context-coded rANS stream
//! ([`rans::contexts`]) of `t + 1` tables. Builds before them refuse such a
//! payload ("domain").

use super::context;
use super::float::FloatType;
use super::rans;

/// Bit of the domain byte that marks a context-coded payload.
const CONTEXTS_FLAG: u8 = 0x80;

/// Symbol reserved for "exact value follows in the escape list".
pub const ESCAPE: u8 = 255;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Domain {
    Value,
    Residual,
    Ratio,
    ScaledValue,
    ScaledResidual,
    PredictedResidual,
}

impl Domain {
    const ALL: [Domain; 6] = [
        Domain::Value,
        Domain::Residual,
        Domain::Ratio,
        Domain::ScaledValue,
        Domain::ScaledResidual,
        Domain::PredictedResidual,
    ];

    fn id(self) -> u8 {
        match self {
            Domain::Value => 0,
            Domain::Residual => 1,
            Domain::Ratio => 2,
            Domain::ScaledValue => 3,
            Domain::ScaledResidual => 4,
            Domain::PredictedResidual => 5,
        }
    }

    fn from_id(id: u8) -> Option<Domain> {
        Domain::ALL.into_iter().find(|d| d.id() == id)
    }

    /// Whether decoding needs the chunk at the same position of the base
    /// commit.
    pub fn needs_base(self) -> bool {
        !matches!(self, Domain::Value | Domain::ScaledValue)
    }

    /// Whether the level is multiplied by a scale taken from a side chunk.
    pub fn needs_side(self) -> bool {
        matches!(self, Domain::ScaledValue | Domain::ScaledResidual)
    }

    /// Whether a prediction from other tensors' chunks is added (W's change
    /// predicted from Adam's moments).
    pub fn needs_prediction(self) -> bool {
        matches!(self, Domain::PredictedResidual)
    }
}

/// The side chunk of a scaled domain: the chunk at the same position (file,
/// chunk index) of tensor `tensor` in the same commit, stored as `float`.
#[derive(Debug, Clone, PartialEq)]
pub struct Side {
    pub tensor: String,
    pub float: FloatType,
    /// Added to √side, so that elements whose side is 0 get a nonzero step
    /// (Adam's ε plays this part in its update).
    pub floor: f32,
}

impl Side {
    /// The per-element scale: √max(side, 0) + floor, in f32 (NaN sides
    /// count as 0: `max` returns the number).
    #[inline(always)]
    pub fn scale(floor: f32, side: f32) -> f32 {
        side.max(0.0).sqrt() + floor
    }
}

/// How a `PredictedResidual` chunk predicts W's change from Adam's moments:
/// where m and v are and the fitted coefficients (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct Predictor {
    /// The file holding m and v (the optimizer's), and their tensor names.
    pub file: String,
    pub m: String,
    pub v: String,
    pub m_float: FloatType,
    pub v_float: FloatType,
    /// Added to √v̂ (Adam's ε).
    pub floor: f32,
    /// Weights of this commit's update direction, the base commit's, and
    /// the base value (weight decay). A zero second weight means the base
    /// commit's moments are not read.
    pub coef: [f32; 3],
}

impl Predictor {
    /// Adam's update direction for one element, in f32 (shared by encoder
    /// and decoder, so that both compute the same bits).
    #[inline(always)]
    pub fn update(floor: f32, m: f32, v: f32) -> f32 {
        m / (v.max(0.0).sqrt() + floor)
    }

    /// The prediction of one element from its updates and base value; 0
    /// where that is not finite.
    #[inline(always)]
    pub fn predict(coef: [f32; 3], u: f32, u_base: f32, base: f32) -> f32 {
        let p = coef[0] * u + coef[1] * u_base + coef[2] * base;
        if p.is_finite() { p } else { 0.0 }
    }

    pub(crate) fn uses_base_moments(&self) -> bool {
        self.coef[1] != 0.0
    }
}

/// A chunk a decoder needs besides the base: chunk index as the decoded
/// chunk's, of `tensor` in `file` (`None`: the decoded chunk's file), of
/// the same commit or (`in_base`) of the base commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SideRef {
    pub file: Option<String>,
    pub tensor: String,
    pub float: FloatType,
    pub in_base: bool,
}

/// What a payload with this side or predictor needs fetched, in the order
/// the decoder takes the chunks.
fn side_refs(side: Option<&Side>, predictor: Option<&Predictor>) -> Vec<SideRef> {
    let mut refs = Vec::new();
    if let Some(side) = side {
        refs.push(SideRef {
            file: None,
            tensor: side.tensor.clone(),
            float: side.float,
            in_base: false,
        });
    }
    if let Some(p) = predictor {
        let commits: &[bool] = if p.uses_base_moments() {
            &[false, true]
        } else {
            &[false]
        };
        for &in_base in commits {
            for (tensor, float) in [(&p.m, p.m_float), (&p.v, p.v_float)] {
                refs.push(SideRef {
                    file: Some(p.file.clone()),
                    tensor: tensor.clone(),
                    float,
                    in_base,
                });
            }
        }
    }
    refs
}

/// The prediction of a `PredictedResidual` chunk from its base and its side
/// chunks as f32, in [`side_refs`] order (m, v of this commit, then of the
/// base commit when used). The encoder calls it too, so both compute the
/// same bits by construction: where the base commit's moments are not used
/// their update is 0, not `0 ·` an update that may be infinite or NaN.
#[inline(always)]
pub fn prediction<S: AsRef<[f32]>>(
    p: &Predictor,
    base: &[f32],
    sides: &[S],
) -> Result<Vec<f32>, QuantError> {
    let wanted = if p.uses_base_moments() { 4 } else { 2 };
    if sides.len() != wanted || sides.iter().any(|s| s.as_ref().len() != base.len()) {
        return Err(QuantError::Invalid(
            "moment chunks missing or of the wrong length",
        ));
    }
    let (m, v) = (sides[0].as_ref(), sides[1].as_ref());
    let (floor, coef) = (p.floor, p.coef);
    // Zipped slices, not indices: no bounds checks, so the loops vectorize.
    // Written by `filled`, not collected: `collect` is a call the encoder's
    // AVX2 copy does not inline, and it ran 4 lanes wide.
    let updates = m
        .iter()
        .zip(v)
        .map(|(&m, &v)| Predictor::update(floor, m, v));
    let n = base.len();
    let out = if p.uses_base_moments() {
        let (mb, vb) = (sides[2].as_ref(), sides[3].as_ref());
        let base_updates = mb
            .iter()
            .zip(vb)
            .map(|(&m, &v)| Predictor::update(floor, m, v));
        let terms = updates.zip(base_updates).zip(base);
        filled(
            n,
            terms.map(|((u, ub), &b)| Predictor::predict(coef, u, ub, b)),
        )
    } else {
        let terms = updates.zip(base);
        filled(n, terms.map(|(u, &b)| Predictor::predict(coef, u, 0.0, b)))
    };
    Ok(out)
}

/// Largest |level index| of a uniform quantizer: symbols 0..=254 stand for
/// levels -127..=127.
pub const MAX_LEVEL: i32 = 127;

/// The level of each symbol.
#[derive(Debug, Clone, PartialEq)]
pub enum Levels {
    /// An explicit table (index = symbol), at most 255 entries: codebooks.
    Table(Vec<f32>),
    /// Symbol `s` is `(s − 127) · step`.
    Linear(f32),
    /// Symbol `s` is `exp((s − 127) · step)`, computed in f64 and rounded to
    /// f32, so that libm differences in the last f64 bit do not show.
    Exp(f32),
}

impl Levels {
    pub fn table(&self) -> Vec<f32> {
        let symbols = 0..=(2 * MAX_LEVEL) as u8;
        match self {
            Levels::Table(t) => t.clone(),
            Levels::Linear(step) => symbols.map(|s| linear_level(*step, s)).collect(),
            Levels::Exp(step) => (-MAX_LEVEL..=MAX_LEVEL)
                .map(|q| (q as f64 * *step as f64).exp() as f32)
                .collect(),
        }
    }

    fn write(&self, out: &mut Vec<u8>) {
        match self {
            Levels::Table(t) => {
                assert!(t.len() <= ESCAPE as usize, "at most 255 levels");
                out.push(0);
                out.extend_from_slice(&(t.len() as u16).to_le_bytes());
                t.iter()
                    .for_each(|l| out.extend_from_slice(&l.to_le_bytes()));
            }
            Levels::Linear(step) => {
                out.push(1);
                out.extend_from_slice(&step.to_le_bytes());
            }
            Levels::Exp(step) => {
                out.push(2);
                out.extend_from_slice(&step.to_le_bytes());
            }
        }
    }
}

/// A quantized chunk before entropy coding.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantized {
    pub domain: Domain,
    pub float: FloatType,
    /// For the scaled domains; `None` otherwise.
    pub side: Option<Side>,
    /// For `PredictedResidual`; `None` otherwise.
    pub predictor: Option<Predictor>,
    pub levels: Levels,
    pub symbols: Vec<u8>,
    pub escapes: Vec<f32>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QuantError {
    #[error("quantized payload is truncated")]
    Truncated,
    #[error("quantized payload is invalid: {0}")]
    Invalid(&'static str),
    #[error(transparent)]
    Rans(#[from] rans::RansError),
}

impl Quantized {
    /// The chunks a decoder must fetch besides the base (see [`SideRef`]).
    pub fn side_refs(&self) -> Vec<SideRef> {
        side_refs(self.side.as_ref(), self.predictor.as_ref())
    }
}

/// The reconstructed values of a quantized chunk, in f32 rounded to the
/// stored type. `base` (f32) is required for every domain but the two
/// value domains; `side` (f32) for the scaled ones (the side chunk) and for
/// `PredictedResidual` (the [`prediction`]).
pub fn reconstruct(
    q: &Quantized,
    base: Option<&[f32]>,
    side: Option<&[f32]>,
) -> Result<Vec<f32>, QuantError> {
    crate::with_simd!(reconstruct_values(q: &Quantized, base: Option<&[f32]>, side: Option<&[f32]>) -> Result<Vec<f32>, QuantError>)
}

#[inline(always)]
fn reconstruct_values(
    q: &Quantized,
    base: Option<&[f32]>,
    side: Option<&[f32]>,
) -> Result<Vec<f32>, QuantError> {
    if q.domain.needs_base() && base.is_none_or(|b| b.len() != q.symbols.len()) {
        return Err(QuantError::Invalid("base missing or of the wrong length"));
    }
    if q.domain.needs_side() != q.side.is_some() {
        return Err(QuantError::Invalid("side does not match the domain"));
    }
    if q.domain.needs_prediction() != q.predictor.is_some() {
        return Err(QuantError::Invalid("predictor does not match the domain"));
    }
    let takes_side = q.domain.needs_side() || q.domain.needs_prediction();
    if takes_side && side.is_none_or(|s| s.len() != q.symbols.len()) {
        return Err(QuantError::Invalid(
            "side chunk missing or of the wrong length",
        ));
    }
    let (table, count) = padded_levels(&q.levels)?;
    let (escapes, without_level) = symbol_census(&q.symbols, count);
    if without_level {
        return Err(QuantError::Invalid("symbol without a level"));
    }
    if escapes != q.escapes.len() {
        return Err(QuantError::Invalid("escape count does not match"));
    }
    let n = q.symbols.len();
    let base = base.unwrap_or(&[]);
    let (side, floor) = (
        side.unwrap_or(&[]),
        q.side.as_ref().map_or(0.0, |s| s.floor),
    );
    // Every symbol's level is computed (linear levels) or looked up in one
    // 256-entry table (the escape's entry a NaN placeholder) in a loop
    // without branches or bounds checks, so that it vectorizes; escapes are
    // put in place after it. The lookup is eight scalar loads per vector,
    // the computation four instructions (and the same bits: `linear_level`).
    let mut out = match q.levels {
        Levels::Linear(step) => {
            values_of_levels(q, n, base, side, floor, |s| linear_level(step, *s))
        }
        _ => values_of_levels(q, n, base, side, floor, |s| table[*s as usize]),
    };
    if !q.escapes.is_empty() {
        let positions = q.symbols.iter().enumerate().filter(|(_, s)| **s == ESCAPE);
        for ((i, _), &x) in positions.zip(&q.escapes) {
            out[i] = x;
        }
    }
    if q.float != FloatType::F32 {
        out.iter_mut().for_each(|x| *x = q.float.round(*x));
    }
    Ok(out)
}

/// The values of `q`'s `n` symbols in its domain before escapes, each
/// symbol's level given by `level`. One loop per domain: the per-element
/// work is a level and at most one add or multiply (scaled: a square root
/// more).
#[inline(always)]
fn values_of_levels(
    q: &Quantized,
    n: usize,
    base: &[f32],
    side: &[f32],
    floor: f32,
    level: impl Fn(&u8) -> f32 + Copy,
) -> Vec<f32> {
    let with_base = || q.symbols.iter().zip(base);
    match q.domain {
        Domain::Value => filled(n, q.symbols.iter().map(level)),
        Domain::Residual => filled(n, with_base().map(|(s, b)| b + level(s))),
        Domain::Ratio => filled(n, with_base().map(|(s, b)| b * level(s))),
        Domain::ScaledValue => {
            let terms = q.symbols.iter().zip(side);
            filled(n, terms.map(|(s, &v)| level(s) * Side::scale(floor, v)))
        }
        Domain::ScaledResidual => {
            let terms = with_base().zip(side);
            filled(
                n,
                terms.map(|((s, b), &v)| b + level(s) * Side::scale(floor, v)),
            )
        }
        Domain::PredictedResidual => {
            let terms = with_base().zip(side);
            filled(n, terms.map(|((s, b), p)| b + p + level(s)))
        }
    }
}

/// Symbol `s`'s level under `Levels::Linear(step)`: level q = s − 127
/// times the step, in f32. The one definition, for the level table and for
/// the reconstruction's loops, which compute it rather than look it up.
/// Builds before 2026-11-30 computed `(q as f64 * step as f64) as f32`,
/// the same bits: |q| ≤ 127 times a 24-bit significand is exact in f64, so
/// both are the exact product rounded once to f32 (tested). (The escape
/// symbol gets a value too; it is replaced.)
#[inline(always)]
fn linear_level(step: f32, s: u8) -> f32 {
    (i32::from(s) - MAX_LEVEL) as f32 * step
}

/// How many symbols are escapes, and whether any other symbol has no
/// level. Blocks of 128 symbols with byte-wide counters and no early exit,
/// so that the loop vectorizes; a non-escape symbol s counts as s + 1 in
/// the maximum (it fits a byte, and 0 then means "none").
#[inline(always)]
fn symbol_census(symbols: &[u8], levels: usize) -> (usize, bool) {
    let (mut escapes, mut top) = (0usize, 0u8);
    for block in symbols.chunks(128) {
        let mut block_escapes = 0u8;
        for &s in block {
            let escape = s == ESCAPE;
            block_escapes += u8::from(escape);
            top = top.max(if escape { 0 } else { s + 1 });
        }
        escapes += usize::from(block_escapes);
    }
    (escapes, usize::from(top) > levels)
}

/// A vector of the first `n` of `values`, written without zeroing it
/// first: a zeroed vector is a `memset` of it, 5% of a residual commit's
/// time when the quantizer made four of them per chunk.
#[inline(always)]
fn filled(n: usize, values: impl ExactSizeIterator<Item = f32>) -> Vec<f32> {
    assert!(values.len() >= n, "fewer values than elements");
    let mut out = Vec::with_capacity(n);
    for (slot, x) in out.spare_capacity_mut()[..n].iter_mut().zip(values) {
        slot.write(x);
    }
    // SAFETY: `values` has at least `n` items (asserted above), so the
    // loop wrote each of the first `n` slots.
    unsafe { out.set_len(n) };
    out
}

/// A quantized chunk as read back, its symbols left as the stream held
/// them (runs, for a sparse residual), for [`reconstruct_f32_onto`].
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    pub domain: Domain,
    pub float: FloatType,
    pub side: Option<Side>,
    pub predictor: Option<Predictor>,
    pub levels: Levels,
    pub symbols: ChunkSymbols,
    pub escapes: Vec<f32>,
}

/// The symbols of a [`Decoded`] chunk.
#[derive(Debug, Clone, PartialEq)]
pub enum ChunkSymbols {
    /// As the stream held them: runs, tuples or one byte per element.
    Plain(rans::Symbols),
    /// Still context-coded: [`Decoded::resolve`] decodes them, since their
    /// contexts need the base and side.
    InContexts(ContextCoded),
}

/// The symbols of a context-coded payload, still coded: its thresholds and
/// its stream.
#[derive(Debug, Clone, PartialEq)]
pub struct ContextCoded {
    pub thresholds: Vec<f32>,
    pub stream: Vec<u8>,
    /// Symbols the stream holds (from its header).
    pub len: usize,
}

impl Decoded {
    /// The chunks a decoder must fetch besides the base (see [`SideRef`]).
    pub fn side_refs(&self) -> Vec<SideRef> {
        side_refs(self.side.as_ref(), self.predictor.as_ref())
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match &self.symbols {
            ChunkSymbols::Plain(symbols) => symbols.len(),
            ChunkSymbols::InContexts(coded) => coded.len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The chunk with its context-coded symbols (if any) decoded, their
    /// contexts computed from the base and side (as [`reconstruct`] takes
    /// them).
    pub fn resolve(
        mut self,
        base: Option<&[f32]>,
        side: Option<&[f32]>,
    ) -> Result<Decoded, QuantError> {
        let ChunkSymbols::InContexts(coded) = &self.symbols else {
            return Ok(self);
        };
        let floor = self.side.as_ref().map_or(0.0, |s| s.floor);
        let source = context::ContextSource::new(self.domain, base, side, floor)
            .filter(|source| source.len() == coded.len)
            .ok_or(QuantError::Invalid(
                "base or side of a context-coded chunk missing or of the wrong length",
            ))?;
        let contexts = context::assign(&coded.thresholds, &source);
        let (merged, used) = rans::contexts::decode(&coded.stream, &contexts)?;
        if used != coded.stream.len() {
            return Err(QuantError::Invalid("trailing bytes"));
        }
        self.symbols = ChunkSymbols::Plain(rans::Symbols::Dense(merged));
        Ok(self)
    }

    /// The chunk with one symbol byte per element; an error for a
    /// context-coded chunk not [`Decoded::resolve`]d.
    pub fn expand(self) -> Result<Quantized, QuantError> {
        let ChunkSymbols::Plain(symbols) = self.symbols else {
            return Err(QuantError::Invalid(
                "a context-coded chunk needs its base to decode",
            ));
        };
        Ok(Quantized {
            domain: self.domain,
            float: self.float,
            side: self.side,
            predictor: self.predictor,
            levels: self.levels,
            symbols: symbols.expand(),
            escapes: self.escapes,
        })
    }
}

/// [`reconstruct`] of f32 residuals or ratios, computed where the base is:
/// `values` holds the base as little-endian f32 and receives the result,
/// bit for bit what [`reconstruct`] returns. Decoding a chain of residuals
/// this way allocates nothing per link, and a run of "no change" symbols
/// costs one vectorized add or multiply per element instead of a table
/// lookup and a branch.
pub fn reconstruct_f32_onto(q: &Decoded, values: &mut [u8]) -> Result<(), QuantError> {
    let ChunkSymbols::Plain(symbols) = &q.symbols else {
        return Err(QuantError::Invalid("in place: resolve the contexts first"));
    };
    if q.float != FloatType::F32 || !matches!(q.domain, Domain::Residual | Domain::Ratio) {
        return Err(QuantError::Invalid(
            "in place: only f32 residuals and ratios",
        ));
    }
    if values.len() != symbols.len() * 4 {
        return Err(QuantError::Invalid("base missing or of the wrong length"));
    }
    let (levels, count) = padded_levels(&q.levels)?;
    let mut escapes = q.escapes.iter().copied();
    let levels = Levels256 { levels, count };
    let result = match q.domain {
        Domain::Residual => apply_onto(symbols, &levels, &mut escapes, values, |b, l| b + l),
        Domain::Ratio => apply_onto(symbols, &levels, &mut escapes, values, |b, l| b * l),
        Domain::Value
        | Domain::ScaledValue
        | Domain::ScaledResidual
        | Domain::PredictedResidual => {
            unreachable!("checked above")
        }
    };
    result?;
    if escapes.next().is_some() {
        return Err(QuantError::Invalid("escape count does not match"));
    }
    Ok(())
}

/// The level of every symbol, NaN for symbols without one (and `ESCAPE`),
/// so that a symbol indexes without a bounds check; and how many symbols
/// have one.
fn padded_levels(levels: &Levels) -> Result<([f32; 256], usize), QuantError> {
    let table = levels.table();
    if table.len() > ESCAPE as usize {
        return Err(QuantError::Invalid("more than 255 levels"));
    }
    let mut padded = [f32::NAN; 256];
    padded[..table.len()].copy_from_slice(&table);
    Ok((padded, table.len()))
}

/// A chunk's levels as [`padded_levels`] gives them.
struct Levels256 {
    levels: [f32; 256],
    /// Symbols below this have a level.
    count: usize,
}

/// `value = op(value, level)` for one little-endian f32.
#[inline(always)]
fn apply_one(value: &mut [u8], level: f32, op: impl Fn(f32, f32) -> f32) {
    value.copy_from_slice(&op(f32_at(value), level).to_le_bytes());
}

fn apply_onto(
    symbols: &rans::Symbols,
    levels: &Levels256,
    escapes: &mut impl ExactSizeIterator<Item = f32>,
    values: &mut [u8],
    op: impl Fn(f32, f32) -> f32 + Copy,
) -> Result<(), QuantError> {
    let Levels256 { levels, count } = levels;
    let count = *count;
    let invalid = |s: u8| s != ESCAPE && s as usize >= count;
    let no_escapes = escapes.len() == 0;
    let mut escape = |value: &mut [u8]| -> Result<(), QuantError> {
        let x = escapes
            .next()
            .ok_or(QuantError::Invalid("escape count does not match"))?;
        value.copy_from_slice(&x.to_le_bytes());
        Ok(())
    };
    match symbols {
        rans::Symbols::Runs {
            dominant,
            positions,
            literals,
            ..
        } if *dominant != ESCAPE => {
            if invalid(*dominant) || literals.iter().any(|&s| invalid(s)) {
                return Err(QuantError::Invalid("symbol without a level"));
            }
            let level = levels[*dominant as usize];
            let mut start = 0;
            for (&at, &s) in positions.iter().zip(literals) {
                let at = at as usize * 4;
                map_f32(&mut values[start..at], |b| op(b, level));
                let value = &mut values[at..at + 4];
                if s == ESCAPE {
                    escape(value)?;
                } else {
                    apply_one(value, levels[s as usize], op);
                }
                start = at + 4;
            }
            map_f32(&mut values[start..], |b| op(b, level));
        }
        rans::Symbols::Tuples {
            alphabet,
            width,
            tuples,
            tail,
        } if !alphabet.contains(&ESCAPE) => {
            if alphabet.iter().any(|&s| invalid(s)) {
                return Err(QuantError::Invalid("symbol without a level"));
            }
            let tuple_levels = tuple_levels(alphabet, *width, levels);
            let whole = width * tuples.len() * 4;
            match width {
                2 => apply_tuples::<2>(&mut values[..whole], tuples, &tuple_levels, op),
                3 => apply_tuples::<3>(&mut values[..whole], tuples, &tuple_levels, op),
                4 => apply_tuples::<4>(&mut values[..whole], tuples, &tuple_levels, op),
                5 => apply_tuples::<5>(&mut values[..whole], tuples, &tuple_levels, op),
                6 => apply_tuples::<6>(&mut values[..whole], tuples, &tuple_levels, op),
                7 => apply_tuples::<7>(&mut values[..whole], tuples, &tuple_levels, op),
                8 => apply_tuples::<8>(&mut values[..whole], tuples, &tuple_levels, op),
                _ => return Err(QuantError::Invalid("tuple width")),
            }
            for (value, &s) in values[whole..].chunks_exact_mut(4).zip(tail) {
                apply_one(value, levels[s as usize], op);
            }
        }
        symbols => {
            let expanded;
            let dense = match symbols {
                rans::Symbols::Dense(dense) => dense,
                runs => {
                    expanded = runs.clone().expand();
                    &expanded
                }
            };
            // One pass that folds (no early exit, so it vectorizes), then a
            // branch-free one; escapes are few and patched after it.
            if dense.iter().fold(false, |bad, &s| bad | invalid(s)) {
                return Err(QuantError::Invalid("symbol without a level"));
            }
            for (value, &s) in values.chunks_exact_mut(4).zip(dense) {
                apply_one(value, levels[s as usize], op);
            }
            if no_escapes {
                return Ok(());
            }
            for (i, _) in dense.iter().enumerate().filter(|(_, s)| **s == ESCAPE) {
                escape(&mut values[4 * i..4 * i + 4])?;
            }
        }
    }
    Ok(())
}

/// The levels of every tuple value's symbols: one lookup per tuple.
fn tuple_levels(alphabet: &[u8], width: usize, levels: &[f32; 256]) -> Vec<[f32; 8]> {
    (0..=255u8)
        .map(|t| {
            let symbols = rans::tuple_symbols(alphabet, width, t);
            std::array::from_fn(|j| levels[symbols[j] as usize])
        })
        .collect()
}

/// `op(base, level)` for `W` elements per tuple (the width is a constant
/// so that the inner loop unrolls).
#[inline(always)]
fn apply_tuples<const W: usize>(
    values: &mut [u8],
    tuples: &[u8],
    tuple_levels: &[[f32; 8]],
    op: impl Fn(f32, f32) -> f32,
) {
    for (group, &t) in values.chunks_exact_mut(4 * W).zip(tuples) {
        let levels = &tuple_levels[t as usize];
        for (j, value) in group.chunks_exact_mut(4).enumerate() {
            apply_one(value, levels[j], &op);
        }
    }
}

fn f32_at(bytes: &[u8]) -> f32 {
    f32::from_le_bytes(bytes.try_into().expect("4 bytes"))
}

/// `f` applied to each little-endian f32 of `bytes`, in place.
#[inline(always)]
fn map_f32(bytes: &mut [u8], f: impl Fn(f32) -> f32) {
    for value in bytes.chunks_exact_mut(4) {
        let x = f(f32_at(value));
        value.copy_from_slice(&x.to_le_bytes());
    }
}

/// Serializes a quantized chunk into `out` (the payload part of a blob).
pub fn write_payload(q: &Quantized, out: &mut Vec<u8>) {
    write_payload_with(q, None, out);
}

/// The contexts a chunk's symbols are coded in: the thresholds and each
/// element's context ([`context::assign`]).
pub struct ContextPlan {
    pub thresholds: Vec<f32>,
    pub contexts: Vec<u8>,
}

/// The contexts that pay for coding `q`'s symbols ([`context::choose`]),
/// given the base and side its decoder will have (as [`reconstruct`] takes
/// them); `None` where none pays or the domain has no context.
pub fn context_plan(
    q: &Quantized,
    base: Option<&[f32]>,
    side: Option<&[f32]>,
) -> Option<ContextPlan> {
    let floor = q.side.as_ref().map_or(0.0, |s| s.floor);
    let source = context::ContextSource::new(q.domain, base, side, floor)?;
    let thresholds = context::choose(&q.symbols, &source)?;
    let contexts = context::assign(&thresholds, &source);
    Some(ContextPlan {
        thresholds,
        contexts,
    })
}

/// [`write_payload`], the symbols coded in `plan`'s contexts when given.
pub fn write_payload_with(q: &Quantized, plan: Option<&ContextPlan>, out: &mut Vec<u8>) {
    let flag = if plan.is_some() { CONTEXTS_FLAG } else { 0 };
    out.push(q.domain.id() | flag);
    out.push(q.float.id());
    if let Some(side) = &q.side {
        out.push(side.float.id());
        out.extend_from_slice(&side.floor.to_le_bytes());
        assert!(
            side.tensor.len() <= u16::MAX as usize,
            "tensor names fit a u16"
        );
        out.extend_from_slice(&(side.tensor.len() as u16).to_le_bytes());
        out.extend_from_slice(side.tensor.as_bytes());
    }
    if let Some(p) = &q.predictor {
        for name in [&p.file, &p.m, &p.v] {
            write_name(name, out);
        }
        out.push(p.m_float.id());
        out.push(p.v_float.id());
        out.extend_from_slice(&p.floor.to_le_bytes());
        p.coef
            .iter()
            .for_each(|c| out.extend_from_slice(&c.to_le_bytes()));
    }
    q.levels.write(out);
    out.extend_from_slice(&(q.escapes.len() as u32).to_le_bytes());
    q.escapes
        .iter()
        .for_each(|e| out.extend_from_slice(&e.to_le_bytes()));
    let Some(plan) = plan else {
        rans::encode(&q.symbols, out);
        return;
    };
    assert!(plan.thresholds.len() < context::MAX_CONTEXTS);
    assert_eq!(plan.contexts.len(), q.symbols.len(), "a context per symbol");
    out.push(plan.thresholds.len() as u8);
    plan.thresholds
        .iter()
        .for_each(|t| out.extend_from_slice(&t.to_le_bytes()));
    let count = plan.thresholds.len() + 1;
    rans::contexts::encode(&q.symbols, &plan.contexts, count, out);
}

fn write_name(name: &str, out: &mut Vec<u8>) {
    assert!(name.len() <= u16::MAX as usize, "names fit a u16");
    out.extend_from_slice(&(name.len() as u16).to_le_bytes());
    out.extend_from_slice(name.as_bytes());
}

/// Parses a payload that must hold `expected` symbols (known from the blob
/// header), which bounds the work spent on a damaged one.
pub fn read_payload(bytes: &[u8], expected: usize) -> Result<Quantized, QuantError> {
    read_payload_runs(bytes, expected)?.expand()
}

/// Whether a payload's symbols are context-coded.
pub fn is_context_coded(payload: &[u8]) -> bool {
    payload.first().is_some_and(|d| d & CONTEXTS_FLAG != 0)
}

/// The chunks a payload needs besides its base, without decoding its
/// symbols: what a decoder must fetch first (empty for most payloads).
pub fn read_side_refs(bytes: &[u8]) -> Result<Vec<SideRef>, QuantError> {
    let mut reader = Reader { bytes, pos: 0 };
    let head = read_head(&mut reader)?;
    Ok(side_refs(head.side.as_ref(), head.predictor.as_ref()))
}

/// A cursor over a payload.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], QuantError> {
        let end = self.pos.checked_add(n).ok_or(QuantError::Truncated)?;
        let slice = self.bytes.get(self.pos..end).ok_or(QuantError::Truncated)?;
        self.pos = end;
        Ok(slice)
    }
}

/// A payload's first fields.
struct Head {
    domain: Domain,
    contexted: bool,
    float: FloatType,
    side: Option<Side>,
    predictor: Option<Predictor>,
}

fn read_float(r: &mut Reader<'_>, what: &'static str) -> Result<FloatType, QuantError> {
    FloatType::from_id(r.take(1)?[0]).ok_or(QuantError::Invalid(what))
}

fn read_name(r: &mut Reader<'_>) -> Result<String, QuantError> {
    let len = u16::from_le_bytes(r.take(2)?.try_into().expect("2")) as usize;
    Ok(std::str::from_utf8(r.take(len)?)
        .map_err(|_| QuantError::Invalid("side tensor name is not UTF-8"))?
        .to_string())
}

/// Domain, float type, side and predictor: the payload's first fields.
fn read_head(r: &mut Reader<'_>) -> Result<Head, QuantError> {
    let byte = r.take(1)?[0];
    let domain = Domain::from_id(byte & !CONTEXTS_FLAG).ok_or(QuantError::Invalid("domain"))?;
    let contexted = byte & CONTEXTS_FLAG != 0;
    if contexted && !domain.needs_base() {
        return Err(QuantError::Invalid("context-coded value domain"));
    }
    let float = read_float(r, "float type")?;
    let mut head = Head {
        domain,
        contexted,
        float,
        side: None,
        predictor: None,
    };
    if domain.needs_side() {
        let side_float = read_float(r, "side float type")?;
        let floor = f32s(r.take(4)?)[0];
        let tensor = read_name(r)?;
        head.side = Some(Side {
            tensor,
            float: side_float,
            floor,
        });
    }
    if domain.needs_prediction() {
        let (file, m, v) = (read_name(r)?, read_name(r)?, read_name(r)?);
        let m_float = read_float(r, "m float type")?;
        let v_float = read_float(r, "v float type")?;
        let floor = f32s(r.take(4)?)[0];
        let c = f32s(r.take(12)?);
        head.predictor = Some(Predictor {
            file,
            m,
            v,
            m_float,
            v_float,
            floor,
            coef: [c[0], c[1], c[2]],
        });
    }
    Ok(head)
}

/// [`read_payload`], leaving the symbols as runs where the stream has them.
pub fn read_payload_runs(bytes: &[u8], expected: usize) -> Result<Decoded, QuantError> {
    let mut reader = Reader { bytes, pos: 0 };
    let Head {
        domain,
        contexted,
        float,
        side,
        predictor,
    } = read_head(&mut reader)?;
    let mut take = |n: usize| reader.take(n);
    let levels = match take(1)?[0] {
        0 => {
            let n = u16::from_le_bytes(take(2)?.try_into().expect("2")) as usize;
            if n > ESCAPE as usize {
                return Err(QuantError::Invalid("more than 255 levels"));
            }
            Levels::Table(f32s(take(n * 4)?))
        }
        1 => Levels::Linear(f32s(take(4)?)[0]),
        2 => Levels::Exp(f32s(take(4)?)[0]),
        _ => return Err(QuantError::Invalid("level kind")),
    };
    let n_escapes = u32::from_le_bytes(take(4)?.try_into().expect("4")) as usize;
    if n_escapes > expected {
        return Err(QuantError::Invalid("more escapes than elements"));
    }
    let escapes = f32s(take(
        n_escapes.checked_mul(4).ok_or(QuantError::Truncated)?,
    )?);
    let symbols = if contexted {
        ChunkSymbols::InContexts(read_context_coded(&mut reader, expected)?)
    } else {
        let (symbols, used) = rans::decode_symbols(&bytes[reader.pos..], expected)?;
        reader.pos += used;
        ChunkSymbols::Plain(symbols)
    };
    if reader.pos != bytes.len() {
        return Err(QuantError::Invalid("trailing bytes"));
    }
    Ok(Decoded {
        domain,
        float,
        side,
        predictor,
        levels,
        symbols,
        escapes,
    })
}

/// The thresholds and stream of a context-coded payload (the rest of it),
/// which must hold `expected` symbols; the stream is decoded by
/// [`Decoded::resolve`].
fn read_context_coded(r: &mut Reader<'_>, expected: usize) -> Result<ContextCoded, QuantError> {
    let count = r.take(1)?[0] as usize;
    if count >= context::MAX_CONTEXTS {
        return Err(QuantError::Invalid("too many context thresholds"));
    }
    let thresholds = f32s(r.take(4 * count)?);
    if thresholds.iter().any(|t| t.is_nan()) {
        return Err(QuantError::Invalid("a context threshold is NaN"));
    }
    let stream = r.take(r.bytes.len() - r.pos)?;
    let len = stream
        .get(..4)
        .map(|b| u32::from_le_bytes(b.try_into().expect("4")) as usize)
        .ok_or(QuantError::Truncated)?;
    if len != expected {
        return Err(rans::RansError::Count {
            found: len,
            expected,
        }
        .into());
    }
    Ok(ContextCoded {
        thresholds,
        stream: stream.to_vec(),
        len,
    })
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_linear_level_is_the_exact_product_rounded_once() {
        let steps = [
            1e-4f32,
            0.0371,
            0.5,
            3.0e38,
            f32::MIN_POSITIVE / 3.0,
            1.0 + f32::EPSILON,
            0.0,
            -0.0,
        ];
        let mut x = 0x9e37_79b9u32;
        let random = (0..1000).map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            f32::from_bits(x & 0x7fff_ffff)
        });
        for step in steps.into_iter().chain(random).filter(|s| s.is_finite()) {
            for q in -MAX_LEVEL..=MAX_LEVEL {
                let exact_then_rounded = (q as f64 * step as f64) as f32;
                let s = (q + MAX_LEVEL) as u8;
                assert_eq!(
                    linear_level(step, s).to_bits(),
                    exact_then_rounded.to_bits(),
                    "step {step:e}, level {q}"
                );
            }
            assert_eq!(Levels::Linear(step).table().len(), 255);
        }
    }

    /// The reconstruction, one table lookup per symbol and escapes put in
    /// place after, equals the element-by-element formula of every domain
    /// (the decoder's definition), escapes and non-finite inputs included,
    /// in f32 and bf16.
    mod reconstruct_reference {
        use super::*;
        use proptest::prelude::*;

        fn reference(q: &Quantized, base: &[f32], side: &[f32]) -> Vec<f32> {
            let levels = q.levels.table();
            let floor = q.side.as_ref().map_or(0.0, |s| s.floor);
            let mut escapes = q.escapes.iter();
            let value = |i: usize, l: f32| match q.domain {
                Domain::Value => l,
                Domain::Residual => base[i] + l,
                Domain::Ratio => base[i] * l,
                Domain::ScaledValue => l * Side::scale(floor, side[i]),
                Domain::ScaledResidual => base[i] + l * Side::scale(floor, side[i]),
                Domain::PredictedResidual => base[i] + side[i] + l,
            };
            q.symbols
                .iter()
                .enumerate()
                .map(|(i, &s)| match s {
                    ESCAPE => *escapes.next().expect("counted"),
                    _ => value(i, levels[s as usize]),
                })
                .map(|x| q.float.round(x))
                .collect()
        }

        fn element() -> impl Strategy<Value = (u8, f32, f32, f32)> {
            let value = prop_oneof![
                8 => -4.0f32..4.0,
                1 => Just(f32::NAN),
                1 => Just(f32::INFINITY),
                1 => Just(0.0f32),
            ];
            (
                prop_oneof![6 => 100u8..=154, 1 => Just(ESCAPE), 1 => 0u8..=254],
                value.clone(),
                value,
                -1.0f32..1.0,
            )
        }

        proptest! {
            #[test]
            fn matches_the_formula(
                elements in proptest::collection::vec(element(), 0..600),
                domain in 0..Domain::ALL.len(),
                bf16 in any::<bool>(),
                step in 1e-4f32..0.5,
            ) {
                let domain = Domain::ALL[domain];
                let symbols: Vec<u8> = elements.iter().map(|e| e.0).collect();
                let base: Vec<f32> = elements.iter().map(|e| e.1).collect();
                let side: Vec<f32> = elements.iter().map(|e| e.2).collect();
                let escapes: Vec<f32> = elements
                    .iter()
                    .filter(|e| e.0 == ESCAPE)
                    .map(|e| e.3)
                    .collect();
                let side_of = |tensor: &str| Side {
                    tensor: tensor.into(),
                    float: FloatType::F32,
                    floor: 1e-3,
                };
                let q = Quantized {
                    domain,
                    float: if bf16 { FloatType::BF16 } else { FloatType::F32 },
                    side: domain.needs_side().then(|| side_of("v")),
                    predictor: domain.needs_prediction().then(|| Predictor {
                        file: "f".into(),
                        m: "m".into(),
                        v: "v".into(),
                        m_float: FloatType::F32,
                        v_float: FloatType::F32,
                        floor: 1e-8,
                        coef: [1.0, 0.0, 0.0],
                    }),
                    levels: Levels::Linear(step),
                    symbols,
                    escapes,
                };
                let got = reconstruct(&q, Some(&base), Some(&side)).unwrap();
                let want = reference(&q, &base, &side);
                // Bits, but one NaN for all: which NaN `0·inf` (a scaled level
                // 0 on an infinite side) or `NaN + x` yields depends on the
                // operand order the compiler picks, in either loop. Encoder
                // and decoder call this same function, so they agree.
                let bits = |v: &[f32]| {
                    v.iter()
                        .map(|x| if x.is_nan() { u32::MAX } else { x.to_bits() })
                        .collect::<Vec<_>>()
                };
                prop_assert_eq!(bits(&got), bits(&want));
            }
        }
    }

    /// The census (escape count, a symbol without a level) agrees with
    /// counting one symbol at a time, across block edges, with every
    /// symbol an escape, and with the bad symbol alone at the end.
    #[test]
    fn symbol_census_agrees_with_a_plain_count() {
        let naive = |symbols: &[u8], levels: usize| {
            let escapes = symbols.iter().filter(|&&s| s == ESCAPE).count();
            let bad = symbols.iter().any(|&s| s != ESCAPE && s as usize >= levels);
            (escapes, bad)
        };
        let mut state = 12345u32;
        let mut next = || {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (state >> 24) as u8
        };
        for len in [0, 1, 127, 128, 129, 1000, 4099] {
            let random: Vec<u8> = (0..len).map(|_| next()).collect();
            let mut tail_bad = vec![ESCAPE; len];
            if len > 0 {
                tail_bad[len - 1] = 9;
            }
            for symbols in [random, vec![ESCAPE; len], tail_bad] {
                for levels in [0, 1, 9, 10, 200, 254, 255] {
                    assert_eq!(
                        symbol_census(&symbols, levels),
                        naive(&symbols, levels),
                        "len {len}, levels {levels}"
                    );
                }
            }
        }
    }

    /// Every tuple width (the encoder may take any from 2 up to what fits
    /// a byte), reconstructed in place, equals the reconstruction of the
    /// same symbols one by one. Regression: widths 6 and 7 were applied
    /// as 8 (found by the benchmark's checkout, as a checksum mismatch).
    #[test]
    fn every_tuple_width_reconstructs_in_place() {
        for (alphabet, widths) in [
            (vec![3u8, 4], 2..=8),
            (vec![1, 4, 9], 2..=5),
            (vec![0, 1, 2, 3], 2..=4),
        ] {
            for width in widths {
                let k = alphabet.len();
                let tuples: Vec<u8> = (0..1000u32)
                    .map(|i| ((i * 37 + 11) % k.pow(width as u32) as u32) as u8)
                    .collect();
                let tail = vec![alphabet[1]; width - 1];
                let symbols = rans::Symbols::Tuples {
                    alphabet: alphabet.clone(),
                    width,
                    tuples,
                    tail,
                };
                let dense = symbols.clone().expand();
                let base: Vec<f32> = (0..dense.len()).map(|i| 1.0 + i as f32 * 1e-3).collect();
                let levels = Levels::Table((0..10).map(|l| l as f32 * 0.25 - 1.0).collect());
                for domain in [Domain::Residual, Domain::Ratio] {
                    let expected = reconstruct(
                        &Quantized {
                            domain,
                            float: FloatType::F32,
                            side: None,
                            predictor: None,
                            levels: levels.clone(),
                            symbols: dense.clone(),
                            escapes: vec![],
                        },
                        Some(&base),
                        None,
                    )
                    .unwrap();
                    let decoded = Decoded {
                        domain,
                        float: FloatType::F32,
                        side: None,
                        predictor: None,
                        levels: levels.clone(),
                        symbols: ChunkSymbols::Plain(symbols.clone()),
                        escapes: vec![],
                    };
                    let mut values: Vec<u8> = base.iter().flat_map(|x| x.to_le_bytes()).collect();
                    reconstruct_f32_onto(&decoded, &mut values).unwrap();
                    let got: Vec<f32> = values
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                        .collect();
                    assert!(got == expected, "k={k} width={width} {domain:?}");
                }
            }
        }
    }

    #[test]
    fn payload_round_trips_and_reconstructs() {
        let q = Quantized {
            domain: Domain::Residual,
            float: FloatType::F32,
            side: None,
            predictor: None,
            levels: Levels::Table(vec![0.0, 0.5, -0.5]),
            symbols: vec![0, 1, 2, ESCAPE, 1],
            escapes: vec![f32::NAN],
        };
        let mut bytes = Vec::new();
        write_payload(&q, &mut bytes);
        let back = read_payload(&bytes, 5).unwrap();
        assert_eq!(back.symbols, q.symbols);
        assert!(back.escapes[0].is_nan());
        let base = [1.0, 1.0, 1.0, 1.0, 2.0];
        let x = reconstruct(&back, Some(&base), None).unwrap();
        assert_eq!(&x[..3], &[1.0, 1.5, 0.5]);
        assert!(x[3].is_nan());
        assert_eq!(x[4], 2.5);
        assert!(reconstruct(&back, None, None).is_err());
        assert!(read_payload(&bytes, 6).is_err(), "symbol count is checked");
        assert_eq!(
            read_payload(&bytes[..bytes.len() - 1], 5).unwrap_err(),
            QuantError::Rans(rans::RansError::Truncated)
        );
    }

    /// A scaled payload names its side; it round-trips, needs the side to
    /// reconstruct, and scales each level by √side + floor (NaN or negative
    /// sides count as 0).
    #[test]
    fn scaled_payload_names_its_side() {
        let q = Quantized {
            domain: Domain::ScaledResidual,
            float: FloatType::F32,
            side: Some(Side {
                tensor: "layer.exp_avg_sq".into(),
                float: FloatType::BF16,
                floor: 0.5,
            }),
            predictor: None,
            levels: Levels::Linear(0.25),
            symbols: vec![127 + 2, 127, ESCAPE, 127 - 4],
            escapes: vec![7.0],
        };
        let mut bytes = Vec::new();
        write_payload(&q, &mut bytes);
        let named = SideRef {
            file: None,
            tensor: "layer.exp_avg_sq".into(),
            float: FloatType::BF16,
            in_base: false,
        };
        assert_eq!(read_side_refs(&bytes).unwrap(), vec![named]);
        let back = read_payload(&bytes, 4).unwrap();
        assert_eq!(back, q);
        let base = [1.0, 2.0, 3.0, 4.0];
        let side = [4.0, f32::NAN, 9.0, -1.0];
        let x = reconstruct(&back, Some(&base), Some(&side)).unwrap();
        assert_eq!(x, vec![1.0 + 0.5 * 2.5, 2.0, 7.0, 4.0 - 1.0 * 0.5]);
        assert!(reconstruct(&back, Some(&base), None).is_err());
        assert!(reconstruct(&back, Some(&base), Some(&side[..3])).is_err());
        let value = Quantized {
            domain: Domain::ScaledValue,
            ..q.clone()
        };
        let x = reconstruct(&value, None, Some(&side)).unwrap();
        assert_eq!(x[0], 0.5 * 2.5);
        assert_eq!(read_side_refs(&bytes[..8]), Err(QuantError::Truncated));
        let unscaled = Quantized {
            domain: Domain::Residual,
            side: None,
            ..q
        };
        let mut bytes = Vec::new();
        write_payload(&unscaled, &mut bytes);
        assert_eq!(read_side_refs(&bytes).unwrap(), vec![]);
    }

    /// A predicted payload names m and v of its commit, and of the base
    /// only when their weight is nonzero; it round-trips, and decodes as
    /// base + prediction + level, the prediction 0 where not finite.
    #[test]
    fn predicted_payload_names_its_moments() {
        let predictor = Predictor {
            file: "optimizer.safetensors".into(),
            m: "w.exp_avg".into(),
            v: "w.exp_avg_sq".into(),
            m_float: FloatType::F32,
            v_float: FloatType::BF16,
            floor: 1e-8,
            coef: [-0.5, 0.25, -0.125],
        };
        let q = Quantized {
            domain: Domain::PredictedResidual,
            float: FloatType::F32,
            side: None,
            predictor: Some(predictor.clone()),
            levels: Levels::Linear(0.5),
            symbols: vec![127, 128, 127, 127],
            escapes: vec![],
        };
        let mut bytes = Vec::new();
        write_payload(&q, &mut bytes);
        assert_eq!(read_payload(&bytes, 4).unwrap(), q);
        let refs = read_side_refs(&bytes).unwrap();
        let names: Vec<(&str, bool)> = refs
            .iter()
            .map(|r| (r.tensor.as_str(), r.in_base))
            .collect();
        assert_eq!(
            names,
            [
                ("w.exp_avg", false),
                ("w.exp_avg_sq", false),
                ("w.exp_avg", true),
                ("w.exp_avg_sq", true)
            ]
        );
        assert!(
            refs.iter()
                .all(|r| r.file.as_deref() == Some("optimizer.safetensors"))
        );
        assert_eq!(refs[1].float, FloatType::BF16);
        let base = vec![1.0, 2.0, 4.0, 8.0];
        let m = vec![2.0, 0.0, f32::INFINITY, 1.0];
        let v = vec![4.0, 1.0, 1.0, -1.0];
        let sides = [m.clone(), v.clone(), vec![1.0; 4], vec![1.0; 4]];
        let pred = prediction(&predictor, &base, &sides).unwrap();
        // u = m / (√max(v,0) + 1e-8); pred = -0.5·u + 0.25·1 − 0.125·base
        assert!((pred[0] - (-0.5 * 1.0 + 0.25 - 0.125)).abs() < 1e-6);
        assert_eq!(pred[2], 0.0, "a non-finite prediction counts as 0");
        let x = reconstruct(&q, Some(&base), Some(&pred)).unwrap();
        assert_eq!(x[1], 2.0 + pred[1] + 0.5);
        assert!(reconstruct(&q, Some(&base), None).is_err());
        assert!(prediction(&predictor, &base, &sides[..2]).is_err());
        let own_only = Predictor {
            coef: [1.0, 0.0, 0.0],
            ..predictor
        };
        let q = Quantized {
            predictor: Some(own_only),
            ..q
        };
        let mut bytes = Vec::new();
        write_payload(&q, &mut bytes);
        assert_eq!(
            read_side_refs(&bytes).unwrap().len(),
            2,
            "the base's moments are not read"
        );
    }
}
