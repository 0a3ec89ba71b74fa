//! `engine prune` end to end on the fixture models (base-like: a finetuned ForCTC folder;
//! base-like-pretraining: the same network as a pretraining checkpoint): each method ends with a
//! mask set at the asked sparsity over the model folder it applies to, OMP's and PARP's masks
//! are global magnitude masks hitting the sparsity exactly, S3-Router-P's are per-matrix, and
//! methods that need a finetuned model say so.

mod common;

use std::path::Path;

use common::cli::{engine, fails_with, ok, s, small_manifest};
use common::fixtures;
use s3router::mask;
use s3router::model::checkpoint::Checkpoint;
use s3router::model::masks::MaskSet;
use s3router::router::kept;

/// Every weight of `ck` under a mask of `set`, with its keep flags.
fn masked_values(set: &MaskSet, ck: &Checkpoint) -> Vec<(String, Vec<f32>, Vec<bool>)> {
    set.masks
        .iter()
        .map(|(name, (shape, bits))| {
            let w = ck.tensor(name).unwrap().to_vec().unwrap();
            assert_eq!(w.len(), shape.iter().product::<usize>(), "{name}");
            (name.clone(), w.clone(), mask::unpack(bits, w.len()))
        })
        .collect()
}

/// The mask drops exactly floor(s * N) of all masked weights, and only ones no larger in
/// magnitude than any it keeps in `reference` (a global magnitude mask of it).
fn assert_global_magnitude_mask(set: &MaskSet, reference: &Checkpoint, sparsity: f64) {
    let all = masked_values(set, reference);
    let total: usize = all.iter().map(|(_, w, _)| w.len()).sum();
    let dropped: usize = all.iter().map(|(_, _, k)| k.iter().filter(|&&k| !k).count()).sum();
    assert_eq!(dropped, (sparsity * total as f64).floor() as usize, "global sparsity is exact");
    let max_dropped = all.iter().flat_map(|(_, w, k)| w.iter().zip(k).filter(|(_, &k)| !k).map(|(v, _)| v.abs())).fold(0.0, f32::max);
    let min_kept = all.iter().flat_map(|(_, w, k)| w.iter().zip(k).filter(|(_, &k)| k).map(|(v, _)| v.abs())).fold(f32::MAX, f32::min);
    assert!(max_dropped <= min_kept, "dropped up to {max_dropped}, kept down to {min_kept}");
    // Global, not per matrix: the matrices' own sparsities differ.
    let per_matrix: Vec<usize> = all.iter().map(|(_, _, k)| k.iter().filter(|&&k| !k).count()).collect();
    assert!(per_matrix.iter().any(|&d| d != per_matrix[0]), "every matrix pruned alike: {per_matrix:?}");
}

/// Pruned weights are zero in the output model.
fn assert_zero_where_dropped(out: &Path) {
    let set = MaskSet::load(out).unwrap();
    for (name, w, keep) in masked_values(&set, &Checkpoint::open_dir(out).unwrap()) {
        assert!(w.iter().zip(&keep).all(|(v, &k)| k || *v == 0.0), "{name}: a dropped weight is not zero");
    }
}

fn prune(method: &str, model: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let tmp = out.parent().unwrap();
    let train = small_manifest(tmp, 4);
    let mut a = vec!["prune", "--method", method, "--model", s(model), "--train", s(&train), "--out", s(out), "--labels", "phn"];
    a.extend(["--skip-unknown", "--steps", "6", "--lr", "1e-3", "--max-tokens", "100000", "--quiet"]);
    a.extend(extra);
    engine(&a)
}

#[test]
fn omp_masks_the_finetuned_magnitudes_and_finetunes_the_rewound_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let (tuned, pretrained) = (fixtures().join("base-like"), fixtures().join("base-like-pretraining"));
    let out = tmp.path().join("omp");
    ok(&prune("omp", &tuned, &out, &["--pretrained", s(&pretrained), "--sparsity", "0.6"]));
    let set = MaskSet::load(&out).unwrap();
    assert_eq!(set.masks.len(), 12, "q/k/v/out and the FFN's two in both layers");
    assert_global_magnitude_mask(&set, &Checkpoint::open_dir(&tuned).unwrap(), 0.6);
    assert_zero_where_dropped(&out);
    // The kept weights trained from the pretrained values (rewound), not the finetuned ones.
    let (start, end) = (Checkpoint::open_dir(&pretrained).unwrap(), Checkpoint::open_dir(&out).unwrap());
    for ((name, w, keep), (_, w0, _)) in masked_values(&set, &end).iter().zip(masked_values(&set, &start)) {
        assert!(w.iter().zip(&w0).zip(keep).any(|((a, b), &k)| k && a != b), "{name}: kept weights did not train");
    }
    ok(&engine(&["infer", "--model", s(&out), "--masks", s(&out), "tests/fixtures/audio/utt0.wav"]));
}

#[test]
fn parp_prunes_globally_and_reprunes_to_the_exact_sparsity() {
    let tmp = tempfile::tempdir().unwrap();
    let pretrained = fixtures().join("base-like-pretraining");
    let out = tmp.path().join("parp");
    ok(&prune("parp", &pretrained, &out, &["--sparsity", "0.5", "--reprune-every", "4"]));
    let set = MaskSet::load(&out).unwrap();
    let end = Checkpoint::open_dir(&out).unwrap();
    // The final re-prune: a global magnitude mask of the trained weights themselves.
    assert_global_magnitude_mask(&set, &end, 0.5);
    assert_zero_where_dropped(&out);
    // Re-pruned after updates 4 and 6 (the last), and each time training had regrown zeros.
    let reprunes: Vec<(u64, u64)> = common::cli::log(&out)
        .iter()
        .filter(|l| l["event"] == "reprune")
        .map(|l| (l["step"].as_u64().unwrap(), l["zeroed"].as_u64().unwrap()))
        .collect();
    assert_eq!(reprunes.iter().map(|r| r.0).collect::<Vec<_>>(), vec![4, 6]);
    assert!(reprunes.iter().all(|r| r.1 > 0), "{reprunes:?}");
}

#[test]
fn s3router_p_learns_per_matrix_masks_over_the_finetuned_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let tuned = fixtures().join("base-like");
    let out = tmp.path().join("s3p");
    ok(&prune("s3router-p", &tuned, &out, &["--sparsity", "0.3"]));
    let set = MaskSet::load(&out).unwrap();
    assert_eq!(set.masks.len(), 12);
    for (name, (shape, bits)) in &set.masks {
        let n: usize = shape.iter().product();
        assert_eq!(mask::unpack(bits, n).iter().filter(|&&k| k).count(), kept(n, 0.3), "{name}: per-matrix top-k");
    }
    // Scores start at W: the initial masks are each matrix's magnitude mask.
    let initial = MaskSet::read_bits(&out.join("initial_masks.safetensors")).unwrap().0;
    let ck = Checkpoint::open_dir(&tuned).unwrap();
    for (name, (_, bits)) in &initial {
        let w = ck.tensor(name).unwrap().to_vec().unwrap();
        assert_eq!(mask::unpack(bits, w.len()), s3router::router::top_k_mask(&w, 0.3), "{name}");
    }
    // The finetuned model the masks apply to sits beside them, unchanged.
    assert_eq!(std::fs::read(out.join("model.safetensors")).unwrap(), std::fs::read(tuned.join("model.safetensors")).unwrap());
    ok(&engine(&["infer", "--model", s(&out), "--masks", s(&out), "tests/fixtures/audio/utt0.wav"]));
}

#[test]
fn bad_pruning_requests_are_refused_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let (tuned, pretrained) = (fixtures().join("base-like"), fixtures().join("base-like-pretraining"));
    let out = tmp.path().join("run");
    fails_with(&prune("s3router-p", &pretrained, &out, &["--sparsity", "0.5"]), "prunes a finetuned model");
    fails_with(&prune("omp", &pretrained, &out, &["--pretrained", s(&pretrained), "--sparsity", "0.5"]), "prunes a finetuned model");
    fails_with(&prune("omp", &tuned, &out, &["--sparsity", "0.5"]), "--method omp needs --pretrained");
    fails_with(&prune("parp", &pretrained, &out, &["--sparsity", "1.2"]), "outside [0, 1)");
    fails_with(&prune("parp", &pretrained, &out, &[]), "--sparsity is required");
    fails_with(&prune("parp", &pretrained, &out, &["--sparsity", "0.5", "--pretrained", s(&tuned)]), "--pretrained is for --method omp");
    let other = fixtures().join("large-like");
    fails_with(&prune("omp", &other, &out, &["--pretrained", s(&pretrained), "--sparsity", "0.5"]), "a different architecture");
    assert!(!out.exists(), "a refused run left an output folder");
}
