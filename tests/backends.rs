//! The backend conformance suite: one set of library-level checks that every
//! storage backend must pass, run against each of them:
//! - RocksDB (the embedded default);
//! - a bucket on the local file system (`file://`);
//! - a bucket on a real S3 server (SeaweedFS, started by `.ci/run` and
//!   `scripts/s3-server.sh`; without one these print "skipped", and fail
//!   when `CKPTVC_REQUIRE_S3` is set, as in CI).

mod common;

use ckptvc::codec::policy::Policy;
use ckptvc::store::object::{COMMIT_VERSION, ErrorTotals};
use ckptvc::store::pending::PendingKey;
use ckptvc::store::{
    Backend, BlobStore, BucketStore, CommitRecord, MetaStore, ObjectId, RefEdit, RefKind,
    RocksStore, StoreConfig, StoreError,
};

fn record(branch: &str, step: u64, parent: Option<ObjectId>) -> CommitRecord {
    CommitRecord {
        version: COMMIT_VERSION,
        parents: parent.into_iter().collect(),
        branch: branch.to_string(),
        step,
        time_ms: 1_700_000_000_000 + step,
        message: format!("step {step}"),
        keyframe: parent.is_none(),
        chain_depth: 0,
        policy: Policy::Lossless,
        input_bytes: 100,
        stored_bytes: 10,
        errors: ErrorTotals::default(),
        files: Vec::new(),
        update_errors: None,
    }
}

fn config() -> StoreConfig {
    StoreConfig {
        keyframe_interval: 7,
        ..StoreConfig::default()
    }
}

/// Blobs: put, flush barrier, has, get, ranged get, sizes, delete.
fn blobs(store: &dyn Backend) {
    let payloads: Vec<Vec<u8>> = (0..40u8)
        .map(|i| {
            (0..(100 + i as usize * 37))
                .map(|j| (j as u8) ^ i)
                .collect()
        })
        .collect();
    let ids: Vec<ObjectId> = payloads.iter().map(|p| ObjectId::of(p)).collect();
    for (id, p) in ids.iter().zip(&payloads) {
        store.put_blob(id, p).unwrap();
    }
    // Putting a blob twice is harmless.
    store.put_blob(&ids[0], &payloads[0]).unwrap();
    store.flush_blobs().unwrap();
    for (id, p) in ids.iter().zip(&payloads) {
        assert!(store.has_blob(id).unwrap());
        assert_eq!(&store.get_blob(id).unwrap(), p, "{}", store.location());
    }
    assert_eq!(
        store.get_blob_range(&ids[5], 3..20).unwrap(),
        payloads[5][3..20]
    );
    // A range past the end is clamped.
    let len = payloads[5].len() as u64;
    assert_eq!(
        store.get_blob_range(&ids[5], len - 2..len + 50).unwrap(),
        payloads[5][len as usize - 2..]
    );
    let absent = ObjectId::of(b"never stored");
    assert!(!store.has_blob(&absent).unwrap());
    assert!(matches!(
        store.get_blob(&absent),
        Err(StoreError::Corrupt { .. })
    ));
    let sizes = store.blob_sizes().unwrap();
    assert_eq!(sizes.len(), ids.len());
    let (count, bytes) = store.blob_totals().unwrap();
    assert_eq!(count, ids.len() as u64);
    assert_eq!(bytes, payloads.iter().map(|p| p.len() as u64).sum::<u64>());
    store.delete_blobs(&ids[..10]).unwrap();
    for id in &ids[..10] {
        assert!(!store.has_blob(id).unwrap());
    }
    for (id, p) in ids.iter().zip(&payloads).skip(10) {
        assert_eq!(&store.get_blob(id).unwrap(), p, "survivor of a delete");
    }
    assert_eq!(store.blob_sizes().unwrap().len(), ids.len() - 10);
}

/// Commits, branches, HEAD and steps.
fn commits(store: &dyn Backend) {
    assert_eq!(store.config().unwrap(), config());
    let first = record("main", 10, None);
    let a = store.publish_commit(&first, &[]).unwrap();
    assert_eq!(a, first.id());
    let second = record("main", 20, Some(a));
    let b = store.publish_commit(&second, &[]).unwrap();
    assert_eq!(store.get_commit(&b).unwrap().unwrap(), second);
    assert_eq!(store.get_commit_summary(&b).unwrap().unwrap().step, 20);
    assert!(store.get_commit(&ObjectId::of(b"nope")).unwrap().is_none());
    assert_eq!(store.branch_tip("main").unwrap(), Some(b));
    assert_eq!(store.head_branch().unwrap(), "main");
    assert_eq!(store.commit_at_step("main", 10).unwrap(), Some(a));
    assert_eq!(store.commit_at_step("main", 15).unwrap(), None);
    assert_eq!(store.branch_steps("main").unwrap(), vec![(10, a), (20, b)]);
    let mut ids = store.commit_ids().unwrap();
    ids.sort();
    let mut want = vec![a, b];
    want.sort();
    assert_eq!(ids, want);

    // A branch forked at `a`.
    let fork = record("exp/x", 30, Some(a));
    let c = store.publish_commit(&fork, &[(10, a)]).unwrap();
    assert_eq!(store.head_branch().unwrap(), "exp/x");
    assert_eq!(store.commit_at_step("exp/x", 10).unwrap(), Some(a));
    let names: Vec<String> = store
        .branches()
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(names, vec!["exp/x".to_string(), "main".to_string()]);
    assert_eq!(store.root_commits().unwrap().len(), 2);

    // Tags and HEAD through a ref edit.
    store
        .apply(&RefEdit {
            set_tags: vec![("best".into(), b)],
            head: Some("main".into()),
            ..RefEdit::default()
        })
        .unwrap();
    assert_eq!(store.tag_target("best").unwrap(), Some(b));
    assert_eq!(store.tags().unwrap(), vec![("best".to_string(), b)]);
    assert_eq!(store.head_branch().unwrap(), "main");
    store
        .apply(&RefEdit {
            delete_tags: vec!["best".into()],
            delete_branches: vec!["exp/x".into()],
            clear_steps: vec!["exp/x".into()],
            delete_commits: vec![c],
            ..RefEdit::default()
        })
        .unwrap();
    assert_eq!(store.tag_target("best").unwrap(), None);
    assert_eq!(store.branch_tip("exp/x").unwrap(), None);
    assert!(store.get_commit(&c).unwrap().is_none());
}

/// Compare-and-swap of refs: only from the expected value.
fn compare_and_swap(store: &dyn Backend) {
    let x = ObjectId::of(b"x");
    let y = ObjectId::of(b"y");
    store
        .compare_and_swap_ref(RefKind::Branch, "cas", None, Some(x))
        .unwrap();
    match store.compare_and_swap_ref(RefKind::Branch, "cas", None, Some(y)) {
        Err(StoreError::RefMoved {
            expected, found, ..
        }) => {
            assert_eq!(expected, None);
            assert_eq!(found, Some(x));
        }
        other => panic!("creating an existing ref must fail, got {other:?}"),
    }
    assert!(matches!(
        store.compare_and_swap_ref(RefKind::Branch, "cas", Some(y), Some(x)),
        Err(StoreError::RefMoved { .. })
    ));
    store
        .compare_and_swap_ref(RefKind::Branch, "cas", Some(x), Some(y))
        .unwrap();
    assert_eq!(store.branch_tip("cas").unwrap(), Some(y));
    store
        .compare_and_swap_ref(RefKind::Branch, "cas", Some(y), None)
        .unwrap();
    assert_eq!(store.branch_tip("cas").unwrap(), None);
    // Recreated after deletion.
    store
        .compare_and_swap_ref(RefKind::Tag, "t", None, Some(x))
        .unwrap();
    assert_eq!(store.tag_target("t").unwrap(), Some(x));
}

/// Shards of a pending step: staged blobs and manifests, invisible until
/// adopted; an abandoned sink leaves nothing; a retried shard replaces its
/// manifest; dropping the pending step keeps adopted blobs.
fn shards(store: &dyn Backend) {
    let key = PendingKey {
        branch: "main".into(),
        step: 99,
        group: "g".into(),
    };
    let payload = |shard: u8, i: u8| -> Vec<u8> { vec![shard ^ i; 1000 + usize::from(i)] };
    let shared = b"shared by both ranks".to_vec();
    for shard in 0..2u8 {
        let sink = store.shard_sink(&key, u32::from(shard)).unwrap();
        for i in 0..5 {
            let p = payload(shard, i);
            sink.put_blob(&ObjectId::of(&p), &p).unwrap();
        }
        sink.put_blob(&ObjectId::of(&shared), &shared).unwrap();
        assert!(sink.has_blob(&ObjectId::of(&shared)).unwrap());
        sink.finish(format!("manifest {shard}").into_bytes())
            .unwrap();
    }
    // Abandoned: never finished.
    let abandoned = store.shard_sink(&key, 2).unwrap();
    abandoned.put_blob(&ObjectId::of(b"x"), b"x").unwrap();
    drop(abandoned);
    let manifests = store.shard_manifests(&key).unwrap();
    assert_eq!(
        manifests,
        vec![(0, b"manifest 0".to_vec()), (1, b"manifest 1".to_vec())]
    );
    // A retried shard replaces its manifest.
    let retry = store.shard_sink(&key, 1).unwrap();
    retry.finish(b"manifest 1 again".to_vec()).unwrap();
    assert_eq!(
        store.shard_manifests(&key).unwrap()[1].1,
        b"manifest 1 again"
    );
    let pending = store.pending_steps().unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].key, key);
    assert_eq!(pending[0].shards, vec![0, 1]);
    store.adopt_shards(&key).unwrap();
    store.adopt_shards(&key).unwrap();
    store.flush_blobs().unwrap();
    store.drop_pending(&key).unwrap();
    assert!(store.pending_steps().unwrap().is_empty());
    assert!(store.shard_manifests(&key).unwrap().is_empty());
    for shard in 0..1u8 {
        for i in 0..5 {
            let p = payload(shard, i);
            assert_eq!(store.get_blob(&ObjectId::of(&p)).unwrap(), p);
        }
    }
    assert_eq!(store.get_blob(&ObjectId::of(&shared)).unwrap(), shared);
}

fn conformance(store: &dyn Backend) {
    blobs(store);
    commits(store);
    compare_and_swap(store);
    shards(store);
}

#[test]
fn rocksdb_backend_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let store = RocksStore::init(&dir.path().join("store"), &config()).unwrap();
    conformance(&store);
}

#[test]
fn file_bucket_backend_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}/bucket", dir.path().display());
    let store = BucketStore::open_or_create(&url, &config()).unwrap();
    assert!(store.probe_conditional_writes().unwrap());
    conformance(&store);
    // What was written is what a new connection reads.
    let again = BucketStore::open(&url).unwrap();
    assert_eq!(again.branch_steps("main").unwrap().len(), 2);
}

#[test]
fn s3_bucket_backend_conforms() {
    let Some(url) = common::s3_url("conformance") else {
        return;
    };
    let store = BucketStore::open_or_create(&url, &config()).unwrap();
    assert!(
        store.probe_conditional_writes().unwrap(),
        "the S3 server must refuse a second create-only PUT"
    );
    conformance(&store);
    let again = BucketStore::open(&url).unwrap();
    assert_eq!(again.branch_steps("main").unwrap().len(), 2);
}

#[test]
fn bucket_packs_blobs_and_detects_damage() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}/bucket", dir.path().display());
    let store = BucketStore::open_or_create(&url, &config()).unwrap();
    let blobs: Vec<Vec<u8>> = (0..500u32).map(|i| i.to_le_bytes().repeat(64)).collect();
    for b in &blobs {
        store.put_blob(&ObjectId::of(b), b).unwrap();
    }
    store.flush_blobs().unwrap();
    // 500 blobs, one pack and one index: two PUTs.
    assert_eq!(store.traffic().puts, 2);
    let packs = std::fs::read_dir(dir.path().join("bucket/packs"))
        .unwrap()
        .count();
    assert_eq!(packs, 1);
    // Flip a byte of the pack: the blob is refused, never returned.
    let pack = std::fs::read_dir(dir.path().join("bucket/packs"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&pack).unwrap();
    bytes[300] ^= 1;
    std::fs::write(&pack, bytes).unwrap();
    let fresh = BucketStore::open(&url).unwrap();
    let err = fresh.get_blob(&ObjectId::of(&blobs[1])).unwrap_err();
    assert!(
        err.to_string().contains("do not hash to its id"),
        "unexpected: {err}"
    );
}
