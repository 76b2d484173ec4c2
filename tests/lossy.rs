//! Lossy policies through the real binary on the fixture run.

mod common;

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use ckptvc::repo::commit::MIN_LOSSY_ELEMENTS;
use common::*;
use safetensors::SafeTensors;

const POLICIES: [&str; 4] = ["excp", "compact", "balanced", "faithful"];

/// All float tensors of the safetensors files in `dir`, by name, as f32.
fn tensors(dir: &Path) -> HashMap<String, Vec<f32>> {
    let mut out = HashMap::new();
    for file in ["model.safetensors", "optimizer.safetensors"] {
        let bytes = std::fs::read(dir.join(file)).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        for (name, view) in st.tensors() {
            if view.dtype() == safetensors::Dtype::F32 {
                let values = view
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                    .collect();
                out.insert(name, values);
            }
        }
    }
    out
}

/// ‖û − u‖ / ‖u‖ of Adam's update u = m / (√v + ε), with û from m̂ and v
/// (m's share), m and v̂ (v's), and both, as `show` defines them.
fn update_errors(m: &[f32], m_hat: &[f32], v: &[f32], v_hat: &[f32]) -> [f64; 3] {
    let u = |m: f32, v: f32| m as f64 / ((v.max(0.0) as f64).sqrt() + 1e-8);
    let mut sums = [0.0f64; 4];
    for i in 0..m.len() {
        let exact = u(m[i], v[i]);
        let shares = [u(m_hat[i], v[i]), u(m[i], v_hat[i]), u(m_hat[i], v_hat[i])];
        for (sum, share) in sums.iter_mut().zip(shares) {
            *sum += (share - exact).powi(2);
        }
        sums[3] += exact * exact;
    }
    [0, 1, 2].map(|k| (sums[k] / sums[3]).sqrt())
}

/// Every update error `show` reports matches one computed from the input
/// and the checkout; returns how many tensors had one.
fn check_update_errors(
    policy: &str,
    show: &serde_json::Value,
    input: &HashMap<String, Vec<f32>>,
    output: &HashMap<String, Vec<f32>>,
) -> usize {
    let reported: HashMap<&str, f64> = show["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| Some((e["tensor"].as_str()?, e["update_error"].as_f64()?)))
        .collect();
    for (name, &error) in &reported {
        let param = name.trim_end_matches("_sq").trim_end_matches(".exp_avg");
        let (m, v) = (format!("{param}.exp_avg"), format!("{param}.exp_avg_sq"));
        let [m_share, v_share, both] =
            update_errors(&input[&m], &output[&m], &input[&v], &output[&v]);
        let expected = if *name == m {
            m_share
        } else if *name == v {
            v_share
        } else {
            both
        };
        assert!(
            (error - expected).abs() <= 1e-3 * expected + 1e-6,
            "{policy} {name}: update error reported {error}, measured {expected}"
        );
    }
    reported.len()
}

fn rel_error(x: &[f32], y: &[f32]) -> f64 {
    let (e, n) = x.iter().zip(y).fold((0.0, 0.0), |(e, n), (&a, &b)| {
        (e + ((a - b) as f64).powi(2), n + (a as f64).powi(2))
    });
    if n == 0.0 { 0.0 } else { (e / n).sqrt() }
}

#[test]
fn every_policy_round_trips_with_the_recorded_error() {
    for policy in POLICIES {
        let env = Env::init_with(&["--policy", policy]);
        for step in STEPS {
            env.commit(&fixture(step), step);
        }
        for step in [40, 120] {
            let out = env.checkout(&step.to_string(), &format!("out{step}"));
            // Opaque files and the headers are exact; files keep their size.
            assert_eq!(
                std::fs::read(out.join("meta.json")).unwrap(),
                std::fs::read(fixture(step).join("meta.json")).unwrap()
            );
            let input = tensors(&fixture(step));
            let output = tensors(&out);
            let show = env.json(&["show", &step.to_string()]);
            assert!(
                show["policy"].as_str().unwrap().starts_with(policy),
                "{policy}"
            );
            let (mut lossy, mut small) = (0, 0);
            for entry in show["entries"].as_array().unwrap() {
                let Some(name) = entry["tensor"].as_str() else {
                    continue;
                };
                let Some(x) = input.get(name) else { continue };
                let recorded = entry["rel_error"].as_f64().unwrap();
                let measured = rel_error(x, &output[name]);
                assert!(
                    (recorded - measured).abs() <= 1e-4 * measured.max(1e-3),
                    "{policy} {name}: recorded {recorded}, measured {measured}"
                );
                if recorded > 0.0 {
                    lossy += 1;
                    assert!(x.len() as u64 >= MIN_LOSSY_ELEMENTS, "{policy} {name}");
                    small += usize::from(x.len() < 4096);
                    if policy != "excp" && name.ends_with(".exp_avg_sq") {
                        let zeroed = x
                            .iter()
                            .zip(&output[name])
                            .filter(|(a, b)| **a > 0.0 && **b == 0.0)
                            .count();
                        assert_eq!(zeroed, 0, "{policy} zeroed v in {name}");
                    }
                } else {
                    assert_eq!(x, &output[name], "{policy} {name} should be exact");
                }
            }
            assert!(lossy >= 3 * 8, "{policy}: only {lossy} lossy tensors");
            let measured = check_update_errors(policy, &show, &input, &output);
            assert!(measured >= 3 * 8, "{policy}: {measured} update errors");
            let totals = &show["update_error"];
            assert!(totals["both"].as_f64().unwrap() > 0.0, "{policy}: {totals}");
            // Biases and norms with their moments are lossy too: in a small
            // model they were a fifth of a residual commit's bytes.
            assert!(small >= 3 * 8, "{policy}: only {small} small lossy tensors");
        }
        // `compact` codes chunks in contexts (v's by the parent's v̂) where
        // that pays; the checkouts above read them back.
        let coded = context_coded_chunks(&env, "120");
        if policy == "compact" {
            assert!(coded > 0, "compact context-coded no chunk");
        } else {
            assert_eq!(coded, 0, "{policy} context-coded {coded} chunks");
        }
        let log = env.json(&["log"]);
        assert!(log[0]["error_w"].as_f64().unwrap() > 0.0);
        assert!(
            log[0]["ratio"].as_f64().unwrap() > 2.0,
            "{policy}: {}",
            log[0]
        );
    }
}

/// How many chunks of commit `rev` are context-coded.
fn context_coded_chunks(env: &Env, rev: &str) -> usize {
    use ckptvc::codec;
    use ckptvc::repo::{Repo, rev};
    let store = Repo::open(env.repo()).unwrap();
    let id = rev::resolve(store.backend(), rev).unwrap();
    let record = store.get_commit(&id).unwrap().unwrap();
    record
        .files
        .iter()
        .flat_map(|file| file.tensors())
        .flat_map(|tensor| &tensor.chunks)
        .filter(|chunk| codec::is_context_coded(&store.get_blob(&chunk.blob).unwrap()).unwrap())
        .count()
}

#[test]
fn checkout_equals_the_reference_the_next_commit_used() {
    let env = Env::init_with(&["--policy", "balanced"]);
    for step in [20, 40] {
        env.commit(&fixture(step), step);
    }
    let id = env.commit(&fixture(60), 60);
    let cached = cached_chunks(&env.repo().join("cache/tips").join(&id), &id);
    env.commit(&fixture(80), 80);
    std::fs::remove_dir_all(env.repo().join("cache")).unwrap();
    let data = data_sections(&env.checkout("60", "out"));
    assert_eq!(data.len(), cached.len());
    assert!(
        data == cached,
        "checkout differs from the reconstruction step 80 was coded against"
    );
}

/// The chunk bytes of a cache file in layout order, without the gaps that
/// align large tensors, after checking its footer (the entry count, the
/// commit id it names and the magic; layout in docs/format.md).
fn cached_chunks(path: &Path, id: &str) -> Vec<u8> {
    let mut bytes = std::fs::read(path).unwrap();
    let footer = bytes.split_off(bytes.len() - 56);
    assert_eq!(&footer[40..], b"ckptvc-cache-v2\0");
    let hex: String = footer[8..40].iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(hex, id, "the footer names the commit");
    let count = u64::from_le_bytes(footer[..8].try_into().unwrap()) as usize;
    let entries = bytes.split_off(bytes.len() - 24 * count);
    let field = |e: &[u8], i: usize| u64::from_le_bytes(e[i * 8..i * 8 + 8].try_into().unwrap());
    let mut chunks = Vec::new();
    let mut end = 0;
    for entry in entries.chunks_exact(24) {
        let (offset, len) = (field(entry, 0) as usize, field(entry, 1) as usize);
        assert!(offset >= end, "entries are sorted and do not overlap");
        let gap = offset - end;
        assert!(
            gap == 0 || (gap < 4096 && offset % 4096 == 0),
            "only alignment gaps"
        );
        chunks.extend_from_slice(&bytes[offset..offset + len]);
        end = offset + len;
    }
    chunks
}

/// A commit along a branch takes every delta base from the parent's cache;
/// with one cache chunk damaged, exactly the chunks whose hash no longer
/// matches are decoded from blobs, and the result is the same commit as with
/// an intact cache (same manifest, same checkout).
#[test]
fn commit_reads_bases_from_the_cache_and_survives_its_damage() {
    let commit = |env: &Env, step: u64| env.commit_json(&fixture(step), step);
    let (intact, damaged) = (
        Env::init_with(&["--policy", "balanced"]),
        Env::init_with(&["--policy", "balanced"]),
    );
    for env in [&intact, &damaged] {
        commit(env, 20);
        commit(env, 40);
    }
    let tip = damaged.json(&["log"])[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let cache = damaged.repo().join("cache/tips").join(&tip);
    let mut bytes = std::fs::read(&cache).unwrap();
    bytes[1000] ^= 0x40;
    std::fs::write(&cache, bytes).unwrap();

    let clean = commit(&intact, 60);
    assert_eq!(clean["bases_decoded"], 0, "{clean}");
    assert!(clean["bases_from_cache"].as_u64().unwrap() > 0, "{clean}");
    let repaired = commit(&damaged, 60);
    let decoded = repaired["bases_decoded"].as_u64().unwrap();
    assert!(
        (1..=3).contains(&decoded),
        "one damaged chunk, decoded {decoded}: {repaired}"
    );
    assert_eq!(
        intact.json(&["show", "60"])["entries"],
        damaged.json(&["show", "60"])["entries"]
    );
    let outs = [intact.checkout("60", "out"), damaged.checkout("60", "out")];
    assert_eq!(file_digests(&outs[0]), file_digests(&outs[1]));
}

/// A keyframe keeps no copy of its reconstruction, only a map of where its
/// chunks are in its input files: the next commit takes every base from
/// there. If an input file changed after the keyframe, its chunks are
/// decoded from blobs instead, with the same result.
#[test]
fn keyframe_bases_come_from_its_input_files_while_they_are_unchanged() {
    let commit = |env: &Env, dir: &Path, step: u64| env.commit_json(dir, step);
    let envs = [
        Env::init_with(&["--policy", "balanced"]),
        Env::init_with(&["--policy", "balanced"]),
    ];
    for env in &envs {
        copy_dir(&fixture(20), &env.path("ck20"));
        let keyframe = commit(env, &env.path("ck20"), 20);
        let id = keyframe["id"].as_str().unwrap();
        let tips = env.repo().join("cache/tips");
        assert!(tips.join(format!("{id}.sources")).is_file());
        assert!(!tips.join(id).exists(), "no copy of the checkpoint");
    }
    // The second run's model file is rewritten after its commit (same size,
    // other bytes at the end, where the last tensor is).
    let model = envs[1].path("ck20/model.safetensors");
    let mut bytes = std::fs::read(&model).unwrap();
    let last = bytes.len() - 1;
    bytes[last - 100..].iter_mut().for_each(|b| *b ^= 0x10);
    std::fs::write(&model, bytes).unwrap();

    let kept = commit(&envs[0], &fixture(40), 40);
    assert_eq!(kept["bases_decoded"], 0, "{kept}");
    let from_sources = kept["bases_from_cache"].as_u64().unwrap();
    assert!(from_sources > 0, "{kept}");
    let changed = commit(&envs[1], &fixture(40), 40);
    let decoded = changed["bases_decoded"].as_u64().unwrap();
    assert!((1..from_sources).contains(&decoded), "{changed}");
    assert_eq!(
        envs[0].json(&["show", "40"])["entries"],
        envs[1].json(&["show", "40"])["entries"]
    );
    let outs = [envs[0].checkout("40", "out"), envs[1].checkout("40", "out")];
    assert_eq!(file_digests(&outs[0]), file_digests(&outs[1]));
}

/// What the reconstruction cache of a checkout of the fixture holds: every
/// tensor's bytes in record order (files by name, tensors in data-offset
/// order), which is the data section of each safetensors file.
fn data_sections(out: &Path) -> Vec<u8> {
    let mut data = Vec::new();
    for file in ["model.safetensors", "optimizer.safetensors"] {
        let bytes = std::fs::read(out.join(file)).unwrap();
        let header_len = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        data.extend_from_slice(&bytes[header_len..]);
    }
    data
}

/// A commit along a branch overwrites its parent's cache in place (the
/// parent stops being a tip); a fork leaves the other branch's tip cache
/// alone. Either way each tip's cache equals a checkout decoded from blobs.
#[test]
fn caches_are_reused_along_a_branch_and_kept_for_other_tips() {
    let env = Env::init_with(&["--policy", "balanced"]);
    let tips = env.repo().join("cache/tips");
    env.commit(&fixture(20), 20);
    let main_40 = env.commit(&fixture(40), 40);
    let inode = |id: &str| std::fs::metadata(tips.join(id)).unwrap().ino();
    let main_40_file = inode(&main_40);
    let fork_60 = env.commit_on("fork", &fixture(60), 60);
    assert_eq!(
        inode(&main_40),
        main_40_file,
        "a fork leaves main's tip cache"
    );
    assert_ne!(inode(&fork_60), main_40_file);
    let main_60 = env.commit_on("main", &fixture(60), 60);
    assert!(!tips.join(&main_40).exists(), "main@40 is no tip any more");
    assert_eq!(
        inode(&main_60),
        main_40_file,
        "main@60 overwrote main@40's cache"
    );
    let mut caches: Vec<(String, Vec<u8>)> = [&fork_60, &main_60]
        .iter()
        .map(|id| (id.to_string(), cached_chunks(&tips.join(id), id)))
        .collect();
    caches.sort();
    let mut names: Vec<String> = std::fs::read_dir(&tips)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        caches.iter().map(|(id, _)| id.clone()).collect::<Vec<_>>()
    );
    std::fs::remove_dir_all(env.repo().join("cache")).unwrap();
    for (id, cached) in caches {
        let decoded = data_sections(&env.checkout(&id, &format!("out-{id}")));
        assert!(decoded == cached, "cache of {id} differs from its checkout");
    }
}

/// A keyframe ends a chain: the old tip's cache file is kept as the spare,
/// and the next commit writes its cache over it (overwriting cached pages
/// instead of allocating new ones), with the right content.
#[test]
fn a_keyframe_leaves_the_old_cache_as_the_spare_for_the_next_commit() {
    let env = Env::init_with(&["--policy", "balanced"]);
    let tips = env.repo().join("cache/tips");
    env.commit(&fixture(20), 20);
    let main_40 = env.commit(&fixture(40), 40);
    let old_file = std::fs::metadata(tips.join(&main_40)).unwrap().ino();
    let keyframe = env.commit_args(&["--step", "60", "--keyframe"], &fixture(60));
    assert_eq!(
        std::fs::metadata(tips.join("spare")).unwrap().ino(),
        old_file
    );
    assert!(tips.join(format!("{keyframe}.sources")).is_file());
    let main_80 = env.commit(&fixture(80), 80);
    assert_eq!(
        std::fs::metadata(tips.join(&main_80)).unwrap().ino(),
        old_file
    );
    assert!(!tips.join("spare").exists());
    let cached = cached_chunks(&tips.join(&main_80), &main_80);
    std::fs::remove_dir_all(env.repo().join("cache")).unwrap();
    assert!(data_sections(&env.checkout(&main_80, "out")) == cached);
}

#[test]
fn encoding_does_not_depend_on_thread_count() {
    assert_same_encoding(
        &["lossless", "excp", "balanced"],
        ("1", "native"),
        ("2", "native"),
    );
}

/// The AVX-512 and AVX2 copies of the hot loops (codec::simd) store
/// exactly what the baseline x86-64 code stores. A level the CPU lacks
/// falls back to a narrower one, and the comparison then shows less, but
/// still passes.
#[test]
fn encoding_does_not_depend_on_vector_width() {
    for policy in ["excp", "balanced", "faithful"] {
        let baseline = encode_fixture(policy, ("2", "baseline"));
        for widest in ["avx2", "native"] {
            assert_eq!(
                encode_fixture(policy, ("2", widest)),
                baseline,
                "{policy}, {widest}"
            );
        }
    }
}

/// Each policy encodes the fixture identically under settings `a` and `b`.
fn assert_same_encoding(policies: &[&str], a: (&str, &str), b: (&str, &str)) {
    for policy in policies {
        assert_eq!(
            encode_fixture(policy, a),
            encode_fixture(policy, b),
            "{policy}"
        );
    }
}

/// Commits steps 20, 40, 60 of the fixture with `policy`, `(threads, simd)`
/// set through RAYON_NUM_THREADS and CKPTVC_SIMD; returns the manifest of
/// step 60 (blob ids included) and the digests of its checkout.
fn encode_fixture(
    policy: &str,
    (threads, simd): (&str, &str),
) -> (serde_json::Value, Vec<(String, String)>) {
    let env = Env::init_with(&["--policy", policy]);
    for step in [20, 40, 60] {
        env.cmd()
            .env("RAYON_NUM_THREADS", threads)
            .env("CKPTVC_SIMD", simd)
            .args(["commit", "--step", &step.to_string()])
            .arg(fixture(step))
            .assert()
            .success();
    }
    let out = env.checkout("60", "out");
    (
        env.json(&["show", "60"])["entries"].clone(),
        file_digests(&out),
    )
}

#[test]
fn an_unchanged_checkpoint_costs_nearly_nothing() {
    let env = Env::init_with(&["--policy", "balanced"]);
    env.commit(&fixture(20), 20);
    env.commit(&fixture(40), 40);
    // Committed again, four times: every tensor equals its parent's input,
    // and the residuals against the reconstruction fall inside the
    // quantizer's zero. Regression: a W step bounded by the change since
    // the parent's reconstruction (its own error, when nothing moved)
    // shrank commit after commit.
    for step in 41..45 {
        env.commit(&fixture(40), step);
        let log = env.json(&["log"]);
        let stored = log[0]["stored_bytes"].as_f64().unwrap();
        let input = log[0]["input_bytes"].as_f64().unwrap();
        assert!(stored < input * 0.01, "step {step}: {stored} of {input}");
    }
}

#[test]
fn nan_and_inf_stay_put() {
    for policy in ["excp", "balanced"] {
        let env = Env::init_with(&["--policy", policy]);
        env.commit(&fixture(20), 20);
        let dir = env.path("damaged");
        copy_dir(&fixture(40), &dir);
        let target = "blocks.0.mlp.0.weight";
        let poison = |file: &str, name: &str, index: usize, value: f32| {
            let path = dir.join(file);
            let mut bytes = std::fs::read(&path).unwrap();
            let st = SafeTensors::deserialize(&bytes).unwrap();
            let view = st.tensor(name).unwrap();
            let offset = view.data().as_ptr() as usize - bytes.as_ptr() as usize + index * 4;
            bytes[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
            std::fs::write(&path, bytes).unwrap();
        };
        poison("model.safetensors", target, 7, f32::NAN);
        poison(
            "optimizer.safetensors",
            &format!("{target}.exp_avg"),
            11,
            f32::INFINITY,
        );
        poison(
            "optimizer.safetensors",
            &format!("{target}.exp_avg_sq"),
            13,
            f32::NEG_INFINITY,
        );
        env.commit(&dir, 40);
        let out = tensors(&env.checkout("40", "out"));
        let w = &out[target];
        let m = &out[&format!("{target}.exp_avg")];
        let v = &out[&format!("{target}.exp_avg_sq")];
        assert!(
            w[7].is_nan() && m[11] == f32::INFINITY && v[13] == f32::NEG_INFINITY,
            "{policy}"
        );
        let finite = |x: &[f32], skip: usize| {
            x.iter()
                .enumerate()
                .all(|(i, y)| i == skip || y.is_finite())
        };
        assert!(
            finite(w, 7) && finite(m, 11) && finite(v, 13),
            "{policy}: non-finite spread"
        );
        // And the next commit, against this reconstruction, is clean again.
        env.commit(&fixture(60), 60);
        let out = tensors(&env.checkout("60", "out60"));
        assert!(out[target].iter().all(|x| x.is_finite()), "{policy}");
    }
}

/// Rewrites the safetensors file at `path`, tensor by tensor (in name order):
/// `edit` returns the new dtype, shape and bytes of each.
fn rewrite_safetensors(
    path: &Path,
    edit: impl Fn(&str, &safetensors::tensor::TensorView<'_>) -> (&'static str, Vec<usize>, Vec<u8>),
) {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for name in names {
        let (dtype, shape, payload) = edit(&name, &st.tensor(&name).unwrap());
        let begin = data.len();
        data.extend_from_slice(&payload);
        header.insert(
            name,
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [begin, data.len()]}),
        );
    }
    let json = serde_json::to_string(&header).unwrap();
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(json.as_bytes());
    out.extend_from_slice(&data);
    std::fs::write(path, out).unwrap();
}

/// The fixture's dtypes by name: F32 tensors and the I64 position_ids buffer.
fn dtype_name(view: &safetensors::tensor::TensorView<'_>) -> &'static str {
    if view.dtype() == safetensors::Dtype::F32 {
        "F32"
    } else {
        "I64"
    }
}

/// A copy of fixture `step` whose weights (not the optimizer state) are bf16.
fn bf16_fixture(env: &Env, step: u64) -> std::path::PathBuf {
    let dir = env.path(&format!("bf16-{step}"));
    copy_dir(&fixture(step), &dir);
    rewrite_safetensors(&dir.join("model.safetensors"), |_, view| {
        if view.dtype() != safetensors::Dtype::F32 {
            return (
                dtype_name(view),
                view.shape().to_vec(),
                view.data().to_vec(),
            );
        }
        let bf16 = view
            .data()
            .chunks_exact(4)
            .flat_map(|b| {
                half::bf16::from_f32(f32::from_le_bytes(b.try_into().unwrap())).to_le_bytes()
            })
            .collect();
        ("BF16", view.shape().to_vec(), bf16)
    });
    dir
}

#[test]
fn bf16_weights_are_reconstructed_in_bf16() {
    let env = Env::init_with(&["--policy", "balanced"]);
    for step in [20, 40, 60] {
        env.commit(&bf16_fixture(&env, step), step);
    }
    let out = env.checkout("60", "out");
    let input = std::fs::read(env.path("bf16-60").join("model.safetensors")).unwrap();
    let output = std::fs::read(out.join("model.safetensors")).unwrap();
    assert_eq!(input.len(), output.len());
    let (a, b) = (
        SafeTensors::deserialize(&input).unwrap(),
        SafeTensors::deserialize(&output).unwrap(),
    );
    let show = env.json(&["show", "60"]);
    let to_f32 = |d: &[u8]| -> Vec<f32> {
        d.chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect()
    };
    let name = "blocks.0.mlp.0.weight";
    let (x, y) = (a.tensor(name).unwrap(), b.tensor(name).unwrap());
    assert_eq!(y.dtype(), safetensors::Dtype::BF16);
    let err = rel_error(&to_f32(x.data()), &to_f32(y.data()));
    let entry = show["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["tensor"] == name)
        .unwrap()
        .clone();
    assert_eq!(entry["codecs"][0], "quant-delta");
    assert!(err > 0.0 && err < 0.05, "{err}");
    assert!(
        (entry["rel_error"].as_f64().unwrap() - err).abs() < 1e-4,
        "{entry} vs {err}"
    );
}

#[test]
fn a_tensor_whose_shape_changed_is_stored_losslessly() {
    let env = Env::init_with(&["--policy", "balanced"]);
    env.commit(&fixture(20), 20);
    // Step 40 with head.weight (and its moments) cut to half its rows: the
    // parent has no tensor of that shape to take a residual against.
    let dir = env.path("reshaped");
    copy_dir(&fixture(40), &dir);
    for file in ["model.safetensors", "optimizer.safetensors"] {
        rewrite_safetensors(&dir.join(file), |name, view| {
            if name.starts_with("head.weight") {
                let half = view.data().len() / 2;
                let shape = vec![view.shape()[0] / 2, view.shape()[1]];
                (dtype_name(view), shape, view.data()[..half].to_vec())
            } else {
                (
                    dtype_name(view),
                    view.shape().to_vec(),
                    view.data().to_vec(),
                )
            }
        });
    }
    env.commit(&dir, 40);
    let show = env.json(&["show", "40"]);
    for entry in show["entries"].as_array().unwrap() {
        let name = entry["tensor"].as_str().unwrap_or_default();
        if name.starts_with("head.weight") {
            assert_eq!(entry["codecs"][0], "keyframe", "{name}");
            assert_eq!(entry["rel_error"], 0.0);
        } else if name == "blocks.0.mlp.0.weight" {
            assert_eq!(entry["codecs"][0], "quant-delta");
        }
    }
    let out = env.checkout("40", "out");
    assert_eq!(tensors(&out)["head.weight"], tensors(&dir)["head.weight"]);
}

/// The fixture's tensors as buffers, as a training loop would hand them
/// over: (file name, [(tensor, dtype, shape, bytes)]).
type MemoryFiles = Vec<(String, Vec<(String, String, Vec<u64>, Vec<u8>)>)>;

fn fixture_buffers(dir: &Path) -> MemoryFiles {
    ["model.safetensors", "optimizer.safetensors"]
        .iter()
        .map(|file| {
            let bytes = std::fs::read(dir.join(file)).unwrap();
            let st = SafeTensors::deserialize(&bytes).unwrap();
            let tensors = st
                .tensors()
                .into_iter()
                .map(|(name, view)| {
                    let shape = view.shape().iter().map(|&d| d as u64).collect();
                    (
                        name,
                        format!("{:?}", view.dtype()),
                        shape,
                        view.data().to_vec(),
                    )
                })
                .collect();
            (file.to_string(), tensors)
        })
        .collect()
}

/// Commit from memory and load into memory, with no file in between:
/// lossless is bit for bit; `balanced` pairs the moments with their weights
/// by name and every tensor comes back within the error `show` reports.
#[test]
fn commit_from_memory_and_load_into_memory() {
    use ckptvc::format::{MemoryCheckpoint, MemoryFile, MemoryTensor};
    use ckptvc::repo::{self, CommitOptions, NoProgress, Repo, load::Snapshot};
    use ckptvc::store::StoreConfig;
    for policy in ["lossless", "balanced"] {
        let tmp = tempfile::tempdir().unwrap();
        let config = StoreConfig {
            policy: ckptvc::codec::policy::Policy::preset(policy).unwrap(),
            // Small chunks: the range reads below cross chunk boundaries.
            chunk_bytes: 64 << 10,
            ..StoreConfig::default()
        };
        let store = Repo::init(tmp.path().join("store"), &config).unwrap();
        let steps = [20, 40, 60];
        let buffers: Vec<MemoryFiles> = steps
            .iter()
            .map(|s| fixture_buffers(&fixture(*s)))
            .collect();
        for (step, files) in steps.iter().zip(&buffers) {
            let mut memory: Vec<MemoryFile<'_>> = files
                .iter()
                .map(|(name, tensors)| MemoryFile::Tensors {
                    name: name.clone(),
                    tensors: tensors
                        .iter()
                        .map(|(n, d, s, b)| MemoryTensor {
                            name: n.clone(),
                            dtype: d.clone(),
                            shape: s.clone(),
                            data: b,
                        })
                        .collect(),
                })
                .collect();
            memory.push(MemoryFile::Bytes {
                name: "extra.json".into(),
                data: br#"{"scheduler": {"last_epoch": 3}}"#,
            });
            let checkpoint = MemoryCheckpoint::new(memory).unwrap();
            let options = CommitOptions {
                step: *step,
                ..CommitOptions::default()
            };
            let outcome = repo::commit_checkpoint(
                &store.reopen().unwrap(),
                &checkpoint,
                &options,
                &NoProgress,
            )
            .unwrap();
            // Every residual reads its bases from the cache, the first one
            // too: a keyframe from memory (no file to map) writes one.
            if !outcome.record.keyframe {
                assert_eq!(outcome.bases_decoded, 0, "{policy} step {step}");
                assert!(outcome.bases_from_cache > 0, "{policy} step {step}");
            }
        }
        let store = store.reopen().unwrap();
        let show = repo::show(&store, "60").unwrap();
        if policy == "balanced" {
            assert!(!show.commit.keyframe);
            assert!(
                show.commit.error_m > 0.0,
                "the moments were coded lossily: {policy}"
            );
        }
        let snapshot = Snapshot::open(&store, "60").unwrap();
        assert_eq!(
            snapshot.read_file("extra.json").unwrap(),
            br#"{"scheduler": {"last_epoch": 3}}"#
        );
        let errors: HashMap<String, f32> = show
            .entries
            .iter()
            .filter_map(|e| Some((e.tensor.clone()?, e.rel_error)))
            .collect();
        for (file, tensors) in &buffers[2] {
            for (name, dtype, _, original) in tensors {
                let mut out = vec![0u8; original.len()];
                snapshot.read_tensor_into(file, name, &mut out).unwrap();
                assert_range_reads_match(&snapshot, file, name, &out);
                if policy == "lossless" || dtype != "F32" {
                    assert_eq!(&out, original, "{policy}: {file} {name}");
                } else {
                    let f = |b: &[u8]| -> Vec<f32> {
                        b.chunks_exact(4)
                            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                            .collect()
                    };
                    let err = rel_error(&f(original), &f(&out));
                    assert!(
                        err <= errors[name] as f64 * 1.001 + 1e-9,
                        "{name}: {err} > {}",
                        errors[name]
                    );
                }
            }
        }
        let wrong = snapshot.read_tensor_into(
            "model.safetensors",
            "blocks.0.attn.in_proj_bias",
            &mut [0u8; 3],
        );
        assert!(
            wrong
                .unwrap_err()
                .to_string()
                .contains("buffer given is 3 bytes")
        );
        let size = snapshot.read_tensor("model.safetensors", "blocks.0.attn.in_proj_bias");
        let size = size.unwrap().len() as u64;
        let outside = snapshot.read_tensor_range_into(
            "model.safetensors",
            "blocks.0.attn.in_proj_bias",
            size - 2,
            &mut [0u8; 3],
        );
        let message = outside.unwrap_err().to_string();
        assert!(message.contains("are outside tensor"), "{message}");
    }
}

/// Reading a tensor piece by piece, in pieces that do not line up with its
/// chunks (odd sizes, some spanning several chunks), gives its bytes.
fn assert_range_reads_match(
    snapshot: &ckptvc::repo::load::Snapshot<'_>,
    file: &str,
    tensor: &str,
    whole: &[u8],
) {
    // 7-byte pieces only of small tensors: each piece decodes its chunks.
    let pieces: &[usize] = if whole.len() <= 4096 {
        &[7, 1000]
    } else {
        &[40_000, 150_001]
    };
    for &piece in pieces {
        let mut joined = Vec::with_capacity(whole.len());
        for offset in (0..whole.len()).step_by(piece) {
            let mut out = vec![0u8; piece.min(whole.len() - offset)];
            snapshot
                .read_tensor_range_into(file, tensor, offset as u64, &mut out)
                .unwrap();
            joined.extend_from_slice(&out);
        }
        assert!(joined == whole, "{file} {tensor}: pieces of {piece} bytes");
    }
}

/// The presets code each m in units of its own commit's v̂: lossy m chunks
/// name their v as a side (found at the same file and chunk index), no
/// other chunk names one, and fsck and checkout decode them (the same bytes
/// twice).
#[test]
fn moments_are_coded_in_units_of_their_own_v() {
    use ckptvc::codec;
    use ckptvc::repo::{Repo, rev};
    use ckptvc::store::FileContent;
    let env = Env::init_with(&["--policy", "faithful"]);
    for step in [20, 40, 60] {
        env.commit(&fixture(step), step);
    }
    let before = env.checkout("60", "before");
    let store = Repo::open(env.repo()).unwrap();
    let id = rev::resolve(store.backend(), "60").unwrap();
    let record = store.get_commit(&id).unwrap().unwrap();
    let mut sides = 0;
    for file in &record.files {
        if !matches!(file.content, FileContent::Safetensors { .. }) {
            continue;
        }
        for tensor in file.tensors() {
            for chunk in &tensor.chunks {
                let blob = store.get_blob(&chunk.blob).unwrap();
                let named = codec::sides_of(&blob).unwrap();
                let Some(side) = named.first() else {
                    continue;
                };
                if side.file.is_some() {
                    continue; // a predicted W: see the next test
                }
                assert!(tensor.name.ends_with(".exp_avg"), "{}", tensor.name);
                assert_eq!(named.len(), 1);
                assert_eq!(side.tensor, format!("{}_sq", tensor.name));
                assert!(!side.in_base);
                sides += 1;
            }
        }
    }
    assert!(sides > 0, "no m chunk names a side");
    drop(store);
    env.cmd().arg("fsck").assert().success();
    let again = env.checkout("60", "again");
    assert_same_files(&before, &again);
}

/// The presets code W after its m and v, as what a prediction from them
/// misses: W chunks name the optimizer file's m and v of their commit (and
/// of the base); every such commit decodes to its recorded checksums
/// (fsck), and after a prune that drops the commits in between (chunks
/// keeping dropped bases, whose moments gc must keep too), the kept commits
/// check out as before.
#[test]
fn weights_are_predicted_from_their_moments_and_survive_prune() {
    use ckptvc::codec;
    use ckptvc::repo::{Repo, rev};
    use ckptvc::store::FileContent;
    let env = Env::init_with(&["--policy", "faithful"]);
    let steps = [20, 40, 60, 80, 100, 120];
    for step in steps {
        env.commit(&fixture(step), step);
    }
    let before: Vec<_> = [60, 120]
        .iter()
        .map(|s| env.checkout(&s.to_string(), &format!("before-{s}")))
        .collect();
    let store = Repo::open(env.repo()).unwrap();
    let id = rev::resolve(store.backend(), "120").unwrap();
    let record = store.get_commit(&id).unwrap().unwrap();
    let (mut predicted, mut split) = (0, 0);
    for file in &record.files {
        if !matches!(file.content, FileContent::Safetensors { .. }) {
            continue;
        }
        for tensor in file.tensors() {
            for chunk in &tensor.chunks {
                let blob = store.get_blob(&chunk.blob).unwrap();
                split += usize::from(codec::is_context_coded(&blob).unwrap());
                let named = codec::sides_of(&blob).unwrap();
                if named.first().is_none_or(|s| s.file.is_none()) {
                    continue;
                }
                assert_eq!(file.name, "model.safetensors");
                let m = format!("{}.exp_avg", tensor.name);
                assert_eq!(named[0].tensor, m);
                assert_eq!(named[1].tensor, format!("{m}_sq"));
                assert!(
                    named
                        .iter()
                        .all(|s| s.file.as_deref() == Some("optimizer.safetensors"))
                );
                assert!(!named[0].in_base && !named[1].in_base);
                assert!(named.len() == 2 || (named.len() == 4 && named[2].in_base));
                predicted += 1;
            }
        }
    }
    assert!(predicted > 0, "no W chunk is predicted");
    // Only `compact` context-codes (see every_policy_round_trips…).
    assert_eq!(split, 0, "faithful context-coded {split} chunks");
    drop(store);
    env.cmd().arg("fsck").assert().success();
    env.cmd()
        .args(["prune", "--keep-last", "1", "--keep-every", "60"])
        .assert()
        .success();
    env.cmd().arg("fsck").assert().success();
    for (s, expected) in [60, 120].iter().zip(&before) {
        let after = env.checkout(&s.to_string(), &format!("after-{s}"));
        assert_same_files(expected, &after);
    }
}

/// Writes an F32-only safetensors file.
fn write_f32_safetensors(path: &Path, tensors: &[(&str, Vec<usize>, &[f32])]) {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, shape, values) in tensors {
        let begin = data.len();
        data.extend(values.iter().flat_map(|x| x.to_le_bytes()));
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [begin, data.len()]}),
        );
    }
    let json = serde_json::to_string(&header).unwrap();
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(json.as_bytes());
    out.extend_from_slice(&data);
    std::fs::write(path, out).unwrap();
}

/// Checkpoints of a weight large enough for the cache's direct I/O (12 MiB,
/// three chunks) and its Adam moments, trained `steps` synthetic steps.
fn large_adam_run(root: &Path, checkpoints: &[u64]) -> Vec<std::path::PathBuf> {
    let n = 3 << 20;
    let noise = |i: usize, step: u64| {
        let x = (i as u64 ^ step.wrapping_mul(0x9e37_79b9_7f4a_7c15))
            .wrapping_mul(0xbf58_476d_1ce4_e5b9);
        ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 1e-2
    };
    let mut w: Vec<f32> = (0..n).map(|i| noise(i, 0) * 10.0).collect();
    let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
    let mut dirs = Vec::new();
    for step in 1..=*checkpoints.iter().max().unwrap() {
        for i in 0..n {
            let g = noise(i, step) + 1e-3 * w[i];
            m[i] = 0.9 * m[i] + 0.1 * g;
            v[i] = 0.999 * v[i] + 0.001 * g * g;
            w[i] -= 1e-3 * m[i] / (v[i].sqrt() + 1e-8);
        }
        if checkpoints.contains(&step) {
            let dir = root.join(format!("step-{step}"));
            std::fs::create_dir_all(&dir).unwrap();
            write_f32_safetensors(
                &dir.join("model.safetensors"),
                &[("w", vec![1024, 3072], &w)],
            );
            write_f32_safetensors(
                &dir.join("optimizer.safetensors"),
                &[
                    ("w.exp_avg", vec![1024, 3072], &m),
                    ("w.exp_avg_sq", vec![1024, 3072], &v),
                ],
            );
            let meta = serde_json::json!({"adam_step": step, "betas": [0.9, 0.999], "eps": 1e-8,
                "lr": 1e-3, "step": step, "weight_decay": 0.0});
            std::fs::write(dir.join("meta.json"), meta.to_string()).unwrap();
            dirs.push(dir);
        }
    }
    dirs
}

/// Writes back and drops every reconstruction cache file of `repo` from
/// the page cache, as a training process's memory would push them out.
fn evict_caches(repo: &Path) {
    use std::os::fd::AsRawFd;
    let Ok(entries) = std::fs::read_dir(repo.join("cache/tips")) else {
        return;
    };
    for entry in entries {
        let file = std::fs::File::open(entry.unwrap().path()).unwrap();
        file.sync_all().unwrap();
        // SAFETY: a valid descriptor; the call only advises the kernel.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    }
}

/// Residual commits whose parent's cache is out of the page cache (read and
/// written around it, src/repo/cache_io.rs) store what commits through the
/// page cache store, take every base from the cache, and check out alike.
#[test]
fn a_cold_cache_commits_as_a_warm_one() {
    let warm = Env::init_with(&["--policy", "balanced"]);
    let cold = Env::init_with(&["--policy", "balanced"]);
    let dirs = large_adam_run(&warm.path("run"), &[5, 10, 15]);
    let fields = [
        "stored_bytes",
        "ratio",
        "error_w",
        "error_m",
        "error_v",
        "keyframe",
    ];
    for (i, dir) in dirs.iter().enumerate() {
        let step = (5 * (i + 1)).to_string();
        let commit = |env: &Env, io: &str| -> serde_json::Value {
            let out = env
                .cmd()
                .env("CKPTVC_DIRECT_IO", io)
                .args(["--json", "commit", "--step", &step])
                .arg(dir)
                .assert()
                .success();
            serde_json::from_slice(&out.get_output().stdout).unwrap()
        };
        let through = commit(&warm, "off");
        evict_caches(&cold.repo());
        let around = commit(&cold, "on");
        for field in fields {
            assert_eq!(through[field], around[field], "step {step}: {field}");
        }
        if i > 0 {
            assert_eq!(around["keyframe"], false, "{around}");
            assert_eq!(around["bases_decoded"], 0, "{around}");
            assert_eq!(around["bases_from_cache"], through["bases_from_cache"]);
        }
    }
    evict_caches(&cold.repo());
    for step in ["10", "15"] {
        let (a, b) = (
            warm.checkout(step, &format!("w{step}")),
            cold.checkout(step, &format!("c{step}")),
        );
        for file in ["model.safetensors", "optimizer.safetensors"] {
            assert!(
                std::fs::read(a.join(file)).unwrap() == std::fs::read(b.join(file)).unwrap(),
                "{step} {file}"
            );
        }
    }
}

/// A store in memory (tmpfs: before Linux 6.6 it refuses `O_DIRECT`, and
/// its blob files and caches then go through the page cache) commits and
/// checks out as a store on a disk does.
#[test]
fn a_store_on_tmpfs_commits_as_on_a_disk() {
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() {
        println!("skipped: no /dev/shm");
        return;
    }
    let disk = Env::init_with(&["--policy", "balanced"]);
    let tmpfs = Env {
        tmp: tempfile::tempdir_in(shm).unwrap(),
    };
    tmpfs
        .cmd()
        .args(["init", "--policy", "balanced"])
        .assert()
        .success();
    let dirs = large_adam_run(&disk.path("run"), &[5, 10]);
    for (i, dir) in dirs.iter().enumerate() {
        let step = (5 * (i + 1)).to_string();
        let commit = |env: &Env| -> serde_json::Value {
            let out = env
                .cmd()
                .args(["--json", "commit", "--step", &step])
                .arg(dir)
                .assert()
                .success();
            serde_json::from_slice(&out.get_output().stdout).unwrap()
        };
        let (on_disk, in_memory) = (commit(&disk), commit(&tmpfs));
        for field in ["stored_bytes", "error_w", "error_m", "bases_from_cache"] {
            assert_eq!(on_disk[field], in_memory[field], "step {step}: {field}");
        }
    }
    let (a, b) = (disk.checkout("10", "d10"), tmpfs.checkout("10", "t10"));
    for file in ["model.safetensors", "optimizer.safetensors"] {
        assert!(
            std::fs::read(a.join(file)).unwrap() == std::fs::read(b.join(file)).unwrap(),
            "{file}"
        );
    }
    tmpfs.cmd().arg("fsck").assert().success();
}
