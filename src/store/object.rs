//! Object identities and the commit record, the one structured object.
//!
//! Records are serialized with postcard (stable 1.x wire format). Every record
//! carries a version field first, so a future layout can be told apart and a
//! reader refuses what it does not understand instead of misreading it.

use serde::{Deserialize, Serialize};

use crate::codec::Codec;
use crate::codec::policy::Policy;

/// Version of [`CommitRecord`]'s layout. Version 2 added
/// [`FileContent::Torch`]; a version-1 record is a valid version-2 record
/// without it, so both are read. Version 3 lets a torch tensor have no CRC
/// fields, its storage's CRC continuing into the next tensor (a storage cut
/// into pieces); records that need it are written as version 3, all others
/// as version 2, so that older builds keep reading them. Version 4 may hold
/// [`Policy::Guided`] (the presets since 2026-11-30), which older builds
/// cannot parse; only records that do are written as version 4. Version 5
/// may hold [`Policy::Predictive`] (the presets since W is predicted, 2026-11-30), whose
/// blobs older builds cannot decode (quant domain 5); only records that do
/// are written as version 5. Version 6 appends [`UpdateErrors`] after the
/// files (the errors lossy coding put into Adam's update); records of
/// lossy commits of Adam's state are written as version 6.
pub const COMMIT_VERSION: u32 = 6;

/// The first version whose records end with [`UpdateErrors`].
const UPDATE_ERRORS_VERSION: u32 = 6;

/// The version a record with these files, this policy and these update
/// errors is written as.
pub fn version_for(
    files: &[FileEntry],
    policy: &Policy,
    update_errors: Option<&UpdateErrors>,
) -> u32 {
    if update_errors.is_some() {
        return UPDATE_ERRORS_VERSION;
    }
    match policy {
        Policy::Predictive { .. } => return 5,
        Policy::Guided { .. } => return 4,
        _ => {}
    }
    let cut_storage = files.iter().any(|f| match &f.content {
        FileContent::Torch(t) => t.crc_fields.iter().any(Vec::is_empty),
        _ => false,
    });
    if cut_storage { 3 } else { 2 }
}

/// The oldest record layout this build reads.
pub const OLDEST_COMMIT_VERSION: u32 = 1;

/// A blake3 hash: the key of a blob (hash of its encoded bytes), of a commit
/// (hash of its postcard record), and the checksum of a chunk's raw bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ObjectId(pub [u8; 32]);

impl ObjectId {
    pub fn of(bytes: &[u8]) -> ObjectId {
        ObjectId(*blake3::hash(bytes).as_bytes())
    }

    pub fn to_hex(&self) -> String {
        // `log` prints thousands of ids: a table lookup, not `format!` per byte.
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut hex = String::with_capacity(64);
        for &b in &self.0 {
            hex.push(DIGITS[usize::from(b >> 4)] as char);
            hex.push(DIGITS[usize::from(b & 15)] as char);
        }
        hex
    }

    /// The first 12 hex digits, as `log` prints them.
    pub fn short(&self) -> String {
        self.to_hex()[..12].to_string()
    }

    pub fn from_hex(hex: &str) -> Option<ObjectId> {
        if hex.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(ObjectId(out))
    }

    pub fn from_slice(bytes: &[u8]) -> Option<ObjectId> {
        Some(ObjectId(bytes.try_into().ok()?))
    }
}

/// For `#[serde(serialize_with = "crate::store::object::hex")]`: an id in
/// an outcome (JSON) as its 64 hex digits. Records keep the derived 32-byte
/// form.
pub fn hex<S: serde::Serializer>(id: &ObjectId, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&id.to_hex())
}

impl std::fmt::Display for ObjectId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl std::fmt::Debug for ObjectId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ObjectId({})", self.short())
    }
}

/// One chunk of a tensor or opaque file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    /// Key of the encoded blob.
    pub blob: ObjectId,
    pub codec: Codec,
    /// Length of the decoded chunk.
    pub raw_len: u64,
    /// Length of the encoded blob.
    pub stored_len: u64,
    /// blake3 of the decoded chunk: checkout verifies every chunk against it.
    pub raw_hash: ObjectId,
    /// For codecs that need a base: the commit whose chunk at the same
    /// position (file, tensor, index) is the base. A commit whose chunk did
    /// not change copies its parent's reference verbatim, base included, so
    /// an unchanged chunk costs no new blob.
    pub base: Option<ObjectId>,
}

/// One tensor of a safetensors file. Its chunks, decoded and concatenated,
/// are the tensor's bytes in the data section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorEntry {
    pub name: String,
    /// safetensors dtype name, e.g. `F32`, `BF16`.
    pub dtype: String,
    pub shape: Vec<u64>,
    /// Relative L2 error ‖x̂ − x‖ / ‖x‖ of the stored tensor against the
    /// input (0 for lossless coding).
    pub rel_error: f32,
    pub chunks: Vec<ChunkRef>,
}

impl TensorEntry {
    pub fn raw_bytes(&self) -> u64 {
        self.chunks.iter().map(|c| c.raw_len).sum()
    }

    pub fn stored_bytes(&self) -> u64 {
        self.chunks.iter().map(|c| c.stored_len).sum()
    }

    /// Bytes per element, from the stored bytes and the shape (1 for an
    /// empty tensor, whose size says nothing).
    pub fn element_size(&self) -> usize {
        let numel: u64 = self.shape.iter().product();
        (self.raw_bytes().checked_div(numel).unwrap_or(1) as usize).max(1)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FileContent {
    /// Stored as zstd chunks, byte for byte.
    Opaque { chunks: Vec<ChunkRef> },
    /// The original header bytes (length prefix + JSON + padding) followed by
    /// the tensors in data-offset order.
    Safetensors {
        header: Vec<u8>,
        tensors: Vec<TensorEntry>,
    },
    /// A `torch.save` zip file (record version 2).
    Torch(TorchContent),
}

/// A `torch.save` zip file: every byte that is not tensor storage kept
/// verbatim, the storages as tensors. Checkout writes the skeleton and the
/// tensors at their offsets, then the CRC-32 of each storage's decoded bytes
/// at its CRC fields (lossy coding changes the bytes; lossless coding gives
/// back the original CRCs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TorchContent {
    /// The file's bytes outside every tensor, in file order.
    pub skeleton: Vec<u8>,
    /// Storages in file order.
    pub tensors: Vec<TensorEntry>,
    /// Absolute offset of each tensor's first byte.
    pub offsets: Vec<u64>,
    /// For each tensor, the absolute offsets of its record's CRC-32 fields.
    pub crc_fields: Vec<Vec<u64>>,
    /// For an optimizer state dict: how its entries were paired with parameters.
    pub pairing: Option<PairingRecord>,
}

/// How an optimizer file's state entries were paired with parameter names
/// (see `format::pairing`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairingRecord {
    pub rule: String,
    /// (optimizer index, parameter name).
    pub paired: Vec<(i64, String)>,
    /// Indices kept under their index names and coded without a weight.
    pub unpaired: Vec<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Path relative to the checkpoint directory, `/`-separated.
    pub name: String,
    pub size: u64,
    pub content: FileContent,
}

impl FileEntry {
    /// Every chunk of the file in output order.
    pub fn chunks(&self) -> Box<dyn Iterator<Item = &ChunkRef> + '_> {
        match &self.content {
            FileContent::Opaque { chunks } => Box::new(chunks.iter()),
            FileContent::Safetensors { tensors, .. }
            | FileContent::Torch(TorchContent { tensors, .. }) => {
                Box::new(tensors.iter().flat_map(|t| t.chunks.iter()))
            }
        }
    }

    pub fn tensors(&self) -> &[TensorEntry] {
        match &self.content {
            FileContent::Opaque { .. } => &[],
            FileContent::Safetensors { tensors, .. }
            | FileContent::Torch(TorchContent { tensors, .. }) => tensors,
        }
    }

    pub fn tensors_mut(&mut self) -> &mut [TensorEntry] {
        match &mut self.content {
            FileContent::Opaque { .. } => &mut [],
            FileContent::Safetensors { tensors, .. }
            | FileContent::Torch(TorchContent { tensors, .. }) => tensors,
        }
    }
}

/// Relative L2 errors of a commit's lossy-coded weights (W) and Adam moments
/// (m = exp_avg, v = exp_avg_sq), each over all such tensors together.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ErrorTotals {
    pub w: f32,
    pub m: f32,
    pub v: f32,
}

/// How much lossy coding of Adam's moments changed Adam's update
/// u = m / (√v + ε), relative to it: ‖û − u‖ / ‖u‖ (see
/// `codec::distortion::MomentErrors`). This, not m's error in m's own units,
/// is what a resumed run feels: an m error of 46% of m was 23% of the update
/// on a fine-tune run, because large m comes with large v there.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UpdateErrors {
    /// Over every lossy-coded (W, m, v) group of the commit together.
    pub totals: UpdateTotals,
    /// Per tensor, in (file, tensor) order.
    pub tensors: Vec<TensorUpdateError>,
}

/// Relative errors of Adam's update from m's error alone (v exact), from
/// v's alone, and from both: the update the resumed run takes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct UpdateTotals {
    pub m: f32,
    pub v: f32,
    pub both: f32,
}

/// One tensor's update error: for an m tensor m's share, for a v tensor v's
/// share, for a weight W both together (the error of W's next update).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TensorUpdateError {
    /// Index of the file in the record's `files`.
    pub file: u32,
    /// Index of the tensor in that file's tensors.
    pub tensor: u32,
    pub error: f32,
}

impl UpdateErrors {
    /// The error recorded for tensor `tensor` of file `file` (`tensors` is
    /// in (file, tensor) order).
    pub fn of(&self, file: usize, tensor: usize) -> Option<f32> {
        let key = (file as u32, tensor as u32);
        let at = self
            .tensors
            .binary_search_by_key(&key, |t| (t.file, t.tensor));
        at.ok().map(|i| self.tensors[i].error)
    }
}

/// A commit: one checkpoint at one step on one branch.
///
/// Serialized as its fields in order (postcard), then, from version 6 on,
/// `Option<UpdateErrors>`: a record of an earlier version is one of
/// version 6 without that tail, so every version reads through one struct.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommitRecord {
    pub version: u32,
    pub parents: Vec<ObjectId>,
    pub branch: String,
    pub step: u64,
    /// Milliseconds since the Unix epoch.
    pub time_ms: u64,
    pub message: String,
    /// Every chunk of this commit decodes without a parent.
    pub keyframe: bool,
    /// Commits since the last keyframe commit on this chain (0 for a keyframe).
    /// No chunk's delta chain is longer than this.
    pub chain_depth: u32,
    /// The policy (with its parameters) the commit was coded with.
    pub policy: Policy,
    /// Sum of the input files' sizes.
    pub input_bytes: u64,
    /// Encoded bytes of the blobs this commit added to the store (blobs that
    /// already existed cost nothing and are not counted).
    pub stored_bytes: u64,
    pub errors: ErrorTotals,
    pub files: Vec<FileEntry>,
    /// Version 6 on: the errors in Adam's update. `None` in older records
    /// (not measured) and in records of commits without lossy moments,
    /// which are written as their older version.
    #[serde(skip)]
    pub update_errors: Option<UpdateErrors>,
}

impl CommitRecord {
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = postcard::to_stdvec(self).expect("serializing to a Vec cannot fail");
        if self.version >= UPDATE_ERRORS_VERSION {
            let tail = postcard::to_stdvec(&self.update_errors);
            bytes.extend(tail.expect("serializing to a Vec cannot fail"));
        }
        bytes
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<CommitRecord, String> {
        check_version(bytes)?;
        let (mut record, tail) =
            postcard::take_from_bytes::<CommitRecord>(bytes).map_err(|e| e.to_string())?;
        if record.version >= UPDATE_ERRORS_VERSION {
            record.update_errors = postcard::from_bytes(tail)
                .map_err(|e| format!("the record's update errors do not parse: {e}"))?;
        }
        Ok(record)
    }

    pub fn id(&self) -> ObjectId {
        ObjectId::of(&self.to_bytes())
    }

    pub fn first_parent(&self) -> Option<ObjectId> {
        self.parents.first().copied()
    }

    /// Every chunk of every file.
    pub fn chunks(&self) -> impl Iterator<Item = &ChunkRef> + '_ {
        self.files.iter().flat_map(FileEntry::chunks)
    }

    /// Finds a tensor by file and tensor name.
    pub fn tensor(&self, file: &str, tensor: &str) -> Option<&TensorEntry> {
        self.files
            .iter()
            .find(|f| f.name == file)?
            .tensors()
            .iter()
            .find(|t| t.name == tensor)
    }
}

/// The leading fields of a [`CommitRecord`], everything but the file list:
/// what `log` prints. Postcard writes a struct as its fields in order with
/// no framing, so a summary decodes from the front of a record's bytes and
/// the (large) file list is never parsed. Keep the fields identical to
/// `CommitRecord`'s, in the same order; a test checks it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommitSummary {
    pub version: u32,
    pub parents: Vec<ObjectId>,
    pub branch: String,
    pub step: u64,
    pub time_ms: u64,
    pub message: String,
    pub keyframe: bool,
    pub chain_depth: u32,
    pub policy: Policy,
    pub input_bytes: u64,
    pub stored_bytes: u64,
    pub errors: ErrorTotals,
}

impl CommitSummary {
    pub fn from_record_bytes(bytes: &[u8]) -> Result<CommitSummary, String> {
        check_version(bytes)?;
        postcard::take_from_bytes(bytes)
            .map(|(summary, _files)| summary)
            .map_err(|e| e.to_string())
    }

    pub fn first_parent(&self) -> Option<ObjectId> {
        self.parents.first().copied()
    }
}

impl From<&CommitRecord> for CommitSummary {
    fn from(r: &CommitRecord) -> CommitSummary {
        CommitSummary {
            version: r.version,
            parents: r.parents.clone(),
            branch: r.branch.clone(),
            step: r.step,
            time_ms: r.time_ms,
            message: r.message.clone(),
            keyframe: r.keyframe,
            chain_depth: r.chain_depth,
            policy: r.policy.clone(),
            input_bytes: r.input_bytes,
            stored_bytes: r.stored_bytes,
            errors: r.errors,
        }
    }
}

/// A record's version when it is newer than this build reads.
pub fn newer_version(bytes: &[u8]) -> Option<u32> {
    let (version, _) = postcard::take_from_bytes::<u32>(bytes).ok()?;
    (version > COMMIT_VERSION).then_some(version)
}

/// The version is the first field of every commit record: read it alone
/// first so that a newer layout gets a clear message rather than a confusing
/// decode error.
fn check_version(bytes: &[u8]) -> Result<(), String> {
    let (version, _) = postcard::take_from_bytes::<u32>(bytes).map_err(|e| e.to_string())?;
    if !(OLDEST_COMMIT_VERSION..=COMMIT_VERSION).contains(&version) {
        return Err(format!(
            "commit record version {version} is not supported (this build reads {OLDEST_COMMIT_VERSION} to {COMMIT_VERSION})"
        ));
    }
    Ok(())
}

/// Marks a commit record kept zstd-compressed (local store version 2, and
/// in buckets). No record starts with it: a record starts with its version,
/// at least 1, so an older reader refuses a compressed record as version 0.
const COMPRESSED: u8 = 0;

/// How a record is kept: as it is, or compressed when that saves a tenth
/// (the verbatim bytes of a distributed checkpoint's torch zips, ~470 KB
/// per commit of a 2.5M-parameter model, compress 15-fold).
pub fn pack_record(bytes: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    if bytes.len() >= 4096
        && let Ok(packed) = zstd::bulk::compress(bytes, 3)
        && packed.len() + 1 < bytes.len() / 10 * 9
    {
        let mut out = Vec::with_capacity(packed.len() + 1);
        out.push(COMPRESSED);
        out.extend_from_slice(&packed);
        return out.into();
    }
    bytes.into()
}

/// A record's bytes from how they are kept.
pub fn unpack_record<'a>(
    id: &ObjectId,
    stored: &'a [u8],
) -> Result<std::borrow::Cow<'a, [u8]>, super::StoreError> {
    match stored.split_first() {
        Some((&COMPRESSED, packed)) => {
            zstd::stream::decode_all(packed)
                .map(Into::into)
                .map_err(|e| super::StoreError::Corrupt {
                    what: format!("commit {id}"),
                    detail: format!("compressed record does not decompress: {e}"),
                })
        }
        _ => Ok(stored.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CommitRecord {
        CommitRecord {
            version: COMMIT_VERSION,
            parents: vec![ObjectId::of(b"p")],
            branch: "main".into(),
            step: 20,
            time_ms: 1,
            message: "m".into(),
            keyframe: false,
            chain_depth: 1,
            policy: Policy::Lossless,
            input_bytes: 10,
            stored_bytes: 5,
            errors: ErrorTotals::default(),
            update_errors: None,
            files: vec![FileEntry {
                name: "meta.json".into(),
                size: 2,
                content: FileContent::Opaque {
                    chunks: vec![ChunkRef {
                        blob: ObjectId::of(b"b"),
                        codec: Codec::Zstd,
                        raw_len: 2,
                        stored_len: 20,
                        raw_hash: ObjectId::of(b"{}"),
                        base: None,
                    }],
                },
            }],
        }
    }

    #[test]
    fn record_round_trips_and_id_is_stable() {
        let record = sample();
        let bytes = record.to_bytes();
        assert_eq!(CommitRecord::from_bytes(&bytes).unwrap(), record);
        assert_eq!(record.id(), ObjectId::of(&bytes));
    }

    #[test]
    fn summary_is_a_prefix_of_the_record() {
        let mut record = sample();
        record.policy = Policy::preset("balanced").unwrap();
        record.errors = ErrorTotals {
            w: 1e-3,
            m: 2e-3,
            v: 3e-3,
        };
        record.message = "a message".into();
        let summary = CommitSummary::from_record_bytes(&record.to_bytes()).unwrap();
        assert_eq!(summary, CommitSummary::from(&record));
        // The summary alone serializes to exactly the record's leading bytes.
        let prefix = postcard::to_stdvec(&summary).unwrap();
        assert!(record.to_bytes().starts_with(&prefix));
    }

    #[test]
    fn update_errors_follow_the_files_and_older_records_read_without_them() {
        let mut record = sample();
        record.version = 5;
        let old = record.to_bytes();
        assert_eq!(CommitRecord::from_bytes(&old).unwrap().update_errors, None);
        record.version = 6;
        record.update_errors = Some(UpdateErrors {
            totals: UpdateTotals {
                m: 0.2,
                v: 0.05,
                both: 0.21,
            },
            tensors: vec![TensorUpdateError {
                file: 0,
                tensor: 3,
                error: 0.25,
            }],
        });
        let bytes = record.to_bytes();
        // A version-6 record is the version-5 layout plus the tail.
        assert_eq!(bytes[1..old.len()], old[1..]);
        let read = CommitRecord::from_bytes(&bytes).unwrap();
        assert_eq!(read, record);
        assert_eq!(read.update_errors.unwrap().of(0, 3), Some(0.25));
        // The summary still decodes from the front.
        assert_eq!(
            CommitSummary::from_record_bytes(&bytes).unwrap(),
            CommitSummary::from(&record)
        );
        // A cut tail is refused, not read as "no errors".
        let err = CommitRecord::from_bytes(&bytes[..bytes.len() - 2]).unwrap_err();
        assert!(err.contains("update errors"), "{err}");
    }

    #[test]
    fn newer_versions_are_refused_clearly() {
        let mut record = sample();
        record.version = 7;
        let err = CommitRecord::from_bytes(&record.to_bytes()).unwrap_err();
        assert!(err.contains("version 7"), "{err}");
        let id = record.id();
        let err = crate::store::backend::decode_commit(&id, &record.to_bytes()).unwrap_err();
        assert!(
            matches!(err, crate::store::StoreError::TooNew { version: 7, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("newer ckptvc"), "{err}");
        assert_eq!(newer_version(&sample().to_bytes()), None);
    }

    #[test]
    fn large_records_are_kept_compressed_and_read_back() {
        let mut record = sample();
        record.message = "x".repeat(10_000);
        let bytes = record.to_bytes();
        let packed = pack_record(&bytes);
        assert!(packed.len() < bytes.len() / 10 && packed[0] == COMPRESSED);
        assert_eq!(
            unpack_record(&record.id(), &packed).unwrap().as_ref(),
            &bytes[..]
        );
        let small = sample().to_bytes();
        assert_eq!(
            pack_record(&small).as_ref(),
            &small[..],
            "small records stay as they are"
        );
        assert_eq!(
            unpack_record(&record.id(), &small).unwrap().as_ref(),
            &small[..]
        );
    }

    #[test]
    fn hex_round_trips() {
        let id = ObjectId::of(b"x");
        assert_eq!(ObjectId::from_hex(&id.to_hex()), Some(id));
        assert_eq!(ObjectId::from_hex("zz"), None);
    }
}
