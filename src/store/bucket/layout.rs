//! Where each record lives in a bucket and how it is encoded: object keys,
//! pack indexes and ref entries. Pure: no I/O, so every format detail is
//! unit-tested here. docs/format.md ("Object-storage layout") is the same
//! text for readers in other languages.
//!
//! ```text
//! <prefix>/FORMAT                        "ckptvc-remote 1\n"
//! <prefix>/config                        postcard StoreConfig
//! <prefix>/HEAD                          default branch name (UTF-8)
//! <prefix>/packs/<pack id>               blobs, concatenated
//! <prefix>/index/<pack id>               postcard PackIndex of that pack
//! <prefix>/commits/<commit id>           postcard CommitRecord
//! <prefix>/refs/branch/<name>/<seq>      ref entry (text), seq 20 digits
//! <prefix>/refs/tag/<name>/<seq>
//! <prefix>/probe/<random>                conditional-write probe (deleted)
//! ```

use serde::{Deserialize, Serialize};

use crate::store::RefKind;
use crate::store::object::ObjectId;

/// Content of the `FORMAT` object.
pub const FORMAT_LINE: &str = "ckptvc-remote 1\n";
/// Version of [`PackIndex`].
pub const PACK_INDEX_VERSION: u32 = 1;
/// First line of a ref entry.
pub const REF_MAGIC: &str = "ckptvc-ref 1";

pub const FORMAT_KEY: &str = "FORMAT";
pub const CONFIG_KEY: &str = "config";
pub const HEAD_KEY: &str = "HEAD";
pub const PACKS: &str = "packs";
pub const INDEX: &str = "index";
pub const COMMITS: &str = "commits";
pub const PROBE: &str = "probe";
pub const PENDING: &str = "pending";

/// Digits of a ref entry's sequence number: lexicographic order is numeric
/// order, so a listing is sorted by it.
const SEQ_DIGITS: usize = 20;

pub fn pack_key(pack: &ObjectId) -> String {
    format!("{PACKS}/{pack}")
}

pub fn index_key(pack: &ObjectId) -> String {
    format!("{INDEX}/{pack}")
}

pub fn commit_key(id: &ObjectId) -> String {
    format!("{COMMITS}/{id}")
}

/// The folder of ref entries of one ref, with its trailing `/`.
pub fn ref_dir(kind: RefKind, name: &str) -> String {
    format!("{}{name}/", refs_dir(kind))
}

/// The folder of every ref of a kind, with its trailing `/`.
pub fn refs_dir(kind: RefKind) -> String {
    format!("refs/{}/", kind.noun())
}

pub fn ref_entry_key(kind: RefKind, name: &str, seq: u64) -> String {
    format!("{}{seq:0width$}", ref_dir(kind, name), width = SEQ_DIGITS)
}

/// Splits a key below [`refs_dir`] (the part after it) into the ref name
/// and the entry's sequence number. Names may hold `/`; the sequence is
/// always the last component.
pub fn parse_ref_entry(rest: &str) -> Option<(&str, u64)> {
    let (name, seq) = rest.rsplit_once('/')?;
    if name.is_empty() || seq.len() != SEQ_DIGITS || !seq.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((name, seq.parse().ok()?))
}

/// One ref update: what the ref points at from this entry on (`None`: the
/// ref was deleted), and what it pointed at before (for the reflog).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefEntry {
    pub target: Option<ObjectId>,
    pub previous: Option<ObjectId>,
}

impl RefEntry {
    /// `ckptvc-ref 1\n<target>\n<previous>\n`, each id as 64 hex digits or
    /// `none`.
    pub fn to_text(&self) -> String {
        let show = |id: &Option<ObjectId>| id.map_or_else(|| "none".to_string(), |id| id.to_hex());
        format!(
            "{REF_MAGIC}\n{}\n{}\n",
            show(&self.target),
            show(&self.previous)
        )
    }

    pub fn parse(bytes: &[u8]) -> Result<RefEntry, String> {
        let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_string())?;
        let mut lines = text.lines();
        if lines.next() != Some(REF_MAGIC) {
            return Err(format!("does not start with `{REF_MAGIC}`"));
        }
        let mut id = |what: &str| -> Result<Option<ObjectId>, String> {
            match lines.next() {
                Some("none") => Ok(None),
                Some(hex) => ObjectId::from_hex(hex)
                    .map(Some)
                    .ok_or_else(|| format!("{what} `{hex}` is not a commit id")),
                None => Err(format!("{what} is missing")),
            }
        };
        Ok(RefEntry {
            target: id("target")?,
            previous: id("previous")?,
        })
    }
}

/// Where a blob is inside a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackEntry {
    pub blob: ObjectId,
    pub offset: u64,
    pub len: u64,
}

/// The index object of one pack: every blob in it, in pack order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackIndex {
    pub version: u32,
    /// blake3 of the pack's bytes, also its key.
    pub pack: ObjectId,
    pub pack_len: u64,
    pub entries: Vec<PackEntry>,
}

impl PackIndex {
    pub fn to_bytes(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("serializing to a Vec cannot fail")
    }

    /// Decodes and checks an index: its version, and that every entry lies
    /// inside the pack.
    pub fn from_bytes(bytes: &[u8]) -> Result<PackIndex, String> {
        let index: PackIndex = postcard::from_bytes(bytes).map_err(|e| e.to_string())?;
        if index.version != PACK_INDEX_VERSION {
            return Err(format!(
                "pack index version {} is not supported",
                index.version
            ));
        }
        for entry in &index.entries {
            let end = entry.offset.checked_add(entry.len);
            if end.is_none_or(|end| end > index.pack_len) {
                return Err(format!(
                    "blob {} at {}+{} lies past the pack's end ({})",
                    entry.blob, entry.offset, entry.len, index.pack_len
                ));
            }
        }
        Ok(index)
    }
}

/// Blobs gathered into one pack before upload.
#[derive(Debug, Default)]
pub struct PackBuilder {
    pub bytes: Vec<u8>,
    pub entries: Vec<PackEntry>,
    /// The ids in `entries`, for membership tests in constant time (a pack
    /// of small blobs holds tens of thousands).
    ids: std::collections::HashSet<ObjectId>,
}

impl PackBuilder {
    pub fn contains(&self, blob: &ObjectId) -> bool {
        self.ids.contains(blob)
    }

    pub fn push(&mut self, blob: ObjectId, bytes: &[u8]) {
        self.ids.insert(blob);
        self.entries.push(PackEntry {
            blob,
            offset: self.bytes.len() as u64,
            len: bytes.len() as u64,
        });
        self.bytes.extend_from_slice(bytes);
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The pack's bytes and its index.
    pub fn seal(self) -> (Vec<u8>, PackIndex) {
        let index = PackIndex {
            version: PACK_INDEX_VERSION,
            pack: ObjectId::of(&self.bytes),
            pack_len: self.bytes.len() as u64,
            entries: self.entries,
        };
        (self.bytes, index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ref_entries_round_trip_and_sort_numerically() {
        let a = ObjectId::of(b"a");
        let entry = RefEntry {
            target: Some(a),
            previous: None,
        };
        assert_eq!(RefEntry::parse(entry.to_text().as_bytes()).unwrap(), entry);
        assert!(RefEntry::parse(b"ckptvc-ref 2\nnone\nnone\n").is_err());
        assert!(RefEntry::parse(b"ckptvc-ref 1\nzz\nnone\n").is_err());
        let k9 = ref_entry_key(RefKind::Branch, "exp/a", 9);
        let k10 = ref_entry_key(RefKind::Branch, "exp/a", 10);
        assert!(k9 < k10);
        let rest = k10.strip_prefix(&refs_dir(RefKind::Branch)).unwrap();
        assert_eq!(parse_ref_entry(rest), Some(("exp/a", 10)));
        assert_eq!(parse_ref_entry("main/12"), None);
        assert_eq!(parse_ref_entry("/00000000000000000001"), None);
    }

    #[test]
    fn pack_index_refuses_entries_past_the_end() {
        let mut pack = PackBuilder::default();
        pack.push(ObjectId::of(b"x"), b"x");
        pack.push(ObjectId::of(b"yz"), b"yz");
        let (bytes, index) = pack.seal();
        assert_eq!(bytes, b"xyz");
        assert_eq!(index.pack, ObjectId::of(b"xyz"));
        assert_eq!(PackIndex::from_bytes(&index.to_bytes()).unwrap(), index);
        let mut bad = index.clone();
        bad.entries[1].len = 3;
        assert!(PackIndex::from_bytes(&bad.to_bytes()).is_err());
        let mut old = index;
        old.version = 7;
        assert!(PackIndex::from_bytes(&old.to_bytes()).is_err());
    }
}
