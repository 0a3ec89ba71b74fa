//! Running the `engine` binary from integration tests, and the small corpus manifests they train on.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::fixtures;

pub fn engine(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_engine")).args(args).output().unwrap()
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

pub fn ok(out: &Output) {
    assert!(out.status.success(), "engine failed: {}", String::from_utf8_lossy(&out.stderr));
}

pub fn fails_with(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected a failure mentioning {needle:?}");
    assert!(err.contains(needle), "error does not mention {needle:?}: {err}");
}

/// A fairseq manifest over the first `n` English corpus training utterances, in `dir`.
pub fn small_manifest(dir: &Path, n: usize) -> PathBuf {
    let corpus = std::fs::canonicalize(fixtures().join("corpus/en")).unwrap();
    let tsv = std::fs::read_to_string(corpus.join("train.tsv")).unwrap();
    let rows: Vec<&str> = tsv.lines().skip(1).take(n).collect();
    let manifest = dir.join("small.tsv");
    std::fs::write(&manifest, format!("{}\n{}\n", corpus.display(), rows.join("\n"))).unwrap();
    let phn = std::fs::read_to_string(corpus.join("train.phn")).unwrap();
    std::fs::write(dir.join("small.phn"), phn.lines().take(n).collect::<Vec<_>>().join("\n") + "\n").unwrap();
    manifest
}

/// Regularisers off, a constant high learning rate: a setting where the loss must fall.
pub const PLAIN: &[&str] = &[
    "--labels",
    "phn",
    "--schedule",
    "constant",
    "--mask-time-prob",
    "0",
    "--mask-channel-prob",
    "0",
    "--dropout",
    "0",
    "--attention-dropout",
    "0",
    "--activation-dropout",
    "0",
    "--layerdrop",
    "0",
    "--quiet",
];

pub fn log(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("train_log.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

pub fn file_hash(p: &Path) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::fs::read(p).unwrap().hash(&mut h);
    h.finish()
}
