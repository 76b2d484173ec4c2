//! Lossless coding of one chunk: keyframe, xor-delta, or a verbatim reuse of
//! the parent's reference when the chunk did not change.

use super::Encoded;
use super::Session;
use super::plan::{OPAQUE, TensorSlot};
use crate::codec;
use crate::format::InputFile;
use crate::format::safetensors::element_size;
use crate::store::ObjectId;

/// A chunk of an opaque file: plain zstd, deduplicated by content.
pub fn encode_opaque(
    session: &Session<'_>,
    file: &InputFile,
    key: (usize, usize),
    offset: u64,
    len: u64,
) -> anyhow::Result<Encoded> {
    let raw = file.copy_out(offset as usize, len as usize);
    let blob = codec::encode_zstd(&raw);
    session.finish_chunk((key.0, OPAQUE, key.1), &raw, blob, None, None)
}

/// A tensor chunk: the smaller of keyframe and xor-delta against the parent.
pub fn encode_tensor(
    session: &Session<'_>,
    slot: &TensorSlot<'_>,
    index: usize,
) -> anyhow::Result<Encoded> {
    // A file on disk is read into one private copy, so that the hash and the
    // encoding see the same bytes even if the file is modified meanwhile. A
    // checkpoint in memory is borrowed, as the lossy coder does: it is the
    // caller's snapshot or tensors, held still for the commit (a copy cost
    // 5% of a keyframe's CPU time).
    let raw = slot.read(index);
    let encoded = encode_read_chunk(session, slot, index, &raw)?;
    // Only after the parent's chunk was read: the cache may be the parent's
    // file, overwritten in place (tipcache::CacheWriter::reuse).
    session.cache_chunk(slot.cache_offset(index), &raw)?;
    session.note_source(slot, index, &raw);
    Ok(encoded)
}

fn encode_read_chunk(
    session: &Session<'_>,
    slot: &TensorSlot<'_>,
    index: usize,
    raw: &[u8],
) -> anyhow::Result<Encoded> {
    let key = (slot.file_index, slot.tensor_index, index);
    let raw_hash = ObjectId::of(raw);
    let parent_chunk = slot.parent_chunk(index);
    // An unchanged chunk (a frozen layer, a repeated commit) reuses the
    // parent's reference verbatim: no new blob. A keyframe commit may only
    // reuse standalone references.
    if let Some(previous) = parent_chunk
        && previous.raw_hash == raw_hash
        && (session.allow_delta || !previous.codec.needs_base())
    {
        return Ok(Encoded {
            key,
            chunk: previous.clone(),
            new: false,
            error: None,
            update_error: None,
        });
    }
    let parent = session
        .parent
        .filter(|_| parent_chunk.is_some() && session.allow_delta);
    let parent_raw = match parent {
        Some(parent) => Some(session.reconstructor.chunk(&parent, slot.addr(index))?),
        None => None,
    };
    let (blob, is_delta) =
        codec::encode_lossless(raw, parent_raw.as_deref(), element_size(slot.info.dtype));
    let base = parent.filter(|_| is_delta);
    session.finish_chunk(key, raw, blob, base, Some(raw_hash))
}
