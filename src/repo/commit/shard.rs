//! One rank's shard of a step committed by many (see [`crate::repo::seal`]).
//!
//! The same encoding as a whole commit, with three differences: only the
//! files of this rank are planned (against the same files of the base
//! commit), new blobs go to the shard's staging area instead of the store,
//! and no lock is taken before sealing. The rank's reconstruction cache
//! holds its own files only, under `cache/shards/<K>-of-<N>/`, named by
//! the identity of those files ([`seal::files_id`]), so memory and cache
//! scale with the shard, not the model.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Serialize;

use super::{
    CommitOptions, Session, assemble_manifest, encode_or_abandon, needs_keyframe, new_blob_totals,
    plan, relative_per_tensor, role_sums, tensor_errors, tensor_update_errors,
};
use crate::codec::policy::Policy;
use crate::format::Checkpoint;
use crate::repo::Repo;
use crate::repo::error::RepoError;
use crate::repo::progress::Progress;
use crate::repo::reconstruct::Reconstructor;
use crate::repo::seal::{self, Sealed, Shard, ShardManifest, shard_of};
use crate::repo::tipcache::{self, CacheLayout, CacheReader, CacheWriter, SourceMapWriter};
use crate::store::pending::PendingKey;
use crate::store::{CommitRecord, ObjectId};

/// What committing one shard did (`--json` prints it).
#[derive(Debug, Clone, Serialize)]
pub struct ShardOutcome {
    pub branch: String,
    pub step: u64,
    pub group: String,
    pub shard: Shard,
    pub files: usize,
    pub input_bytes: u64,
    pub stored_bytes: u64,
    pub new_blobs: u64,
    pub keyframe: bool,
    /// Delta bases read from this rank's reconstruction cache, and decoded
    /// from blobs because it did not have them.
    pub bases_from_cache: u64,
    pub bases_decoded: u64,
    /// The commit this shard was coded against.
    #[serde(serialize_with = "serialize_opt_id")]
    pub base: Option<ObjectId>,
    /// The sealed commit, once every shard has arrived (sealed by this
    /// process, or found sealed by another).
    pub sealed: Option<Sealed>,
    pub notes: Vec<String>,
}

fn serialize_opt_id<S: serde::Serializer>(id: &Option<ObjectId>, s: S) -> Result<S::Ok, S::Error> {
    match id {
        Some(id) => s.serialize_some(&id.to_hex()),
        None => s.serialize_none(),
    }
}

/// This shard's cache directory.
fn shard_cache_dir(repo: &Repo, shard: Shard) -> PathBuf {
    repo.cache_dir()
        .join("shards")
        .join(format!("{}-of-{}", shard.index, shard.count))
}

/// Commits `checkpoint`, rank `shard.index`'s files of step
/// `options.step` ([`open_shard_input`] of the step's directory, or its
/// state in memory), as its shard of that step, then seals the step if
/// every shard has arrived. Every file must be this rank's
/// ([`seal::rank_of`]: `rankK/model.safetensors`, `__K_0.distcp`, …).
pub fn commit_shard(
    repo: &Repo,
    checkpoint: &Checkpoint,
    options: &CommitOptions,
    shard: Shard,
    group: &str,
    progress: &dyn Progress,
) -> anyhow::Result<ShardOutcome> {
    check_ranks(checkpoint, shard)?;
    let view = repo.reopen()?;
    let key = PendingKey {
        branch: match &options.branch {
            Some(b) => b.clone(),
            None => view.head_branch()?,
        },
        step: options.step,
        group: group.to_string(),
    };
    if let Some(existing) = view.commit_at_step(&key.branch, key.step)? {
        return Err(RepoError::StepExists {
            branch: key.branch,
            step: key.step,
            commit: existing.short(),
        }
        .into());
    }
    let base = match view.branch_tip(&key.branch)? {
        Some(id) => Some((id, crate::repo::walk::require_commit(view.backend(), &id)?)),
        None => None,
    };
    if let Some((id, record)) = &base
        && options.step < record.step
    {
        anyhow::bail!(
            "step {} is lower than step {} of the tip {} of branch `{}`",
            options.step,
            record.step,
            id.short(),
            key.branch
        );
    }
    let names: std::collections::HashSet<&str> =
        checkpoint.files.iter().map(|f| f.name.as_str()).collect();
    let base_files = base.as_ref().map(|(id, record)| {
        let mut sub = record.clone();
        sub.files.retain(|f| names.contains(f.name.as_str()));
        (*id, sub)
    });
    let config = view.config()?;
    let policy = options
        .policy
        .clone()
        .unwrap_or_else(|| config.policy.clone().current());
    let keyframe = options.force_keyframe
        || base
            .as_ref()
            .is_none_or(|(_, r)| needs_keyframe(r, r.input_bytes, &config));
    let plan = plan::plan(
        checkpoint,
        config.chunk_bytes as u64,
        base_files.as_ref().map(|(_, r)| r),
        !keyframe && !policy.is_lossless(),
    );
    let cache_dir = shard_cache_dir(&view, shard);
    let reconstructor = Reconstructor::new(&view);
    if let Some((id, sub)) = &base_files {
        reconstructor.use_cache(
            *id,
            CacheReader::open(&cache_dir, &seal::files_id(&sub.files), sub),
        );
    }
    // As in `commit`: a keyframe from files keeps a source map; one with
    // no file to map (inputs in memory) writes the cache a residual does.
    let on_disk = checkpoint.files.iter().all(|f| f.on_disk());
    let (cache, sources) = if keyframe && on_disk {
        let paths: Vec<&Path> = checkpoint.files.iter().map(|f| f.path.as_path()).collect();
        (None, SourceMapWriter::new(&cache_dir, &paths).ok())
    } else {
        (
            Some(shard_cache_writer(&cache_dir, base_files.as_ref(), &plan)?),
            None,
        )
    };
    let sink = view.shard_sink(&key, shard.index)?;
    let mut session = Session {
        sink: sink.as_ref(),
        reconstructor,
        parent: base.as_ref().map(|(id, _)| *id),
        cache,
        sources,
        allow_delta: !keyframe,
    };
    let encoded = encode_or_abandon(&mut session, &plan, &policy, progress)?;
    let (new_blobs, stored_bytes) = new_blob_totals(&encoded);
    let errors = tensor_errors(&encoded);
    let update_sums = tensor_update_errors(&encoded);
    let update_errors = (!update_sums.is_empty()).then(|| seal::ShardUpdateErrors {
        tensors: relative_per_tensor(&update_sums),
        role_sums: role_sums(&plan, &update_sums),
    });
    let manifest = ShardManifest {
        version: seal::MANIFEST_VERSION,
        shard: shard.index,
        count: shard.count,
        base: session.parent,
        keyframe,
        chain_depth: if keyframe {
            0
        } else {
            base.as_ref().map_or(0, |(_, r)| r.chain_depth + 1)
        },
        policy: if keyframe { Policy::Lossless } else { policy },
        message: options.message.clone(),
        time_ms: seal::now_ms(),
        input_bytes: checkpoint.total_bytes(),
        stored_bytes,
        error_sums: role_sums(&plan, &errors),
        files: assemble_manifest(checkpoint, encoded, &errors),
        update_errors,
    };
    let files_id = seal::files_id(&manifest.files);
    let outcome_files = manifest.files.len();
    let input_bytes = manifest.input_bytes;
    let (bases_from_cache, bases_decoded) = session.reconstructor.sources();
    let Session { cache, sources, .. } = session;
    sink.finish(manifest.to_bytes())?;
    // The shard is durable; its cache is a best-effort accelerator.
    let cached = sources.is_none_or(|m| m.finish(&files_id).is_ok())
        && cache.is_none_or(|c| c.finish(&files_id).is_ok());
    if cached {
        tipcache::prune(&cache_dir, &[files_id]);
    }
    let sealed = seal::try_seal(repo, &key, shard.count, options.lock_wait)?;
    Ok(ShardOutcome {
        branch: key.branch,
        step: key.step,
        group: key.group,
        shard,
        files: outcome_files,
        input_bytes,
        stored_bytes,
        new_blobs,
        keyframe,
        bases_from_cache,
        bases_decoded,
        base: base.map(|(id, _)| id),
        sealed,
        notes: checkpoint.notes.clone(),
    })
}

/// This rank's new cache file: its base's, overwritten in place when the
/// layouts match (as a commit along a branch does; the base's cache is
/// dropped after this commit anyway, since a rank keeps one), else a new
/// one.
fn shard_cache_writer(
    cache_dir: &Path,
    base: Option<&(ObjectId, CommitRecord)>,
    plan: &plan::Plan<'_>,
) -> anyhow::Result<CacheWriter> {
    if let Some((_, files)) = base
        && CacheLayout::of_record(files) == plan.layout
        && let Some(writer) =
            CacheWriter::reuse(cache_dir, &seal::files_id(&files.files), &plan.layout)
    {
        return Ok(writer);
    }
    CacheWriter::create(cache_dir, plan.layout.total())
        .with_context(|| format!("cannot create the cache in {}", cache_dir.display()))
}

/// Opens rank `shard.index`'s files of step directory `dir`, refusing a
/// file of a rank the step does not have. The files that describe them (a
/// DCP step's `.metadata`) are read for what they say, then left to their
/// own rank.
pub fn open_shard_input(repo: &Repo, dir: &Path, shard: Shard) -> anyhow::Result<Checkpoint> {
    let outside = std::cell::RefCell::new(None);
    let mut checkpoint = Checkpoint::open_selected(dir, repo.local_root(), &|name| {
        let rank = shard_of(name);
        if rank >= shard.count {
            outside.borrow_mut().get_or_insert((name.to_string(), rank));
        }
        rank == shard.index
    })?;
    if let Some((name, rank)) = outside.into_inner() {
        anyhow::bail!(
            "{}: belongs to rank {rank}, but the step has {} shards (--shard {shard})",
            dir.join(name).display(),
            shard.count
        );
    }
    checkpoint.retain_files(|name| shard_of(name) == shard.index);
    Ok(checkpoint)
}

/// Every file must be this shard's.
fn check_ranks(checkpoint: &Checkpoint, shard: Shard) -> anyhow::Result<()> {
    for file in &checkpoint.files {
        let rank = shard_of(&file.name);
        if rank >= shard.count {
            anyhow::bail!(
                "{}: belongs to rank {rank}, but the step has {} shards (shard {shard})",
                file.path.display(),
                shard.count,
            );
        }
        if rank != shard.index {
            anyhow::bail!(
                "{}: belongs to rank {rank}, not to shard {shard}: each rank commits its own files",
                file.path.display(),
            );
        }
    }
    Ok(())
}
