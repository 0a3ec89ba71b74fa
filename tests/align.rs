//! `engine align`: forced alignment of a dataset's transcripts. Where the model's greedy
//! transcript is the reference, the forced path is the greedy path, so the times are those of
//! `engine infer --timestamps`; wrong transcripts score lower; transcripts too long for their
//! audio are skipped by name.

mod common;

use std::path::Path;

use common::cli::{engine, ok, s};
use common::fixtures;

const MODEL: &str = "weights/s3r-demo-en";

fn json_lines(stdout: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// A fairseq manifest of the English dev utterances with `phn` as their transcripts.
fn manifest(dir: &Path, phn: &[String]) -> std::path::PathBuf {
    let corpus = std::fs::canonicalize(fixtures().join("corpus/en")).unwrap();
    let rows: Vec<String> = std::fs::read_to_string(corpus.join("dev.tsv")).unwrap().lines().skip(1).map(str::to_string).collect();
    let path = dir.join("dev.tsv");
    std::fs::write(&path, format!("{}\n{}\n", corpus.display(), rows.join("\n"))).unwrap();
    std::fs::write(dir.join("dev.phn"), phn.join("\n") + "\n").unwrap();
    path
}

fn references() -> Vec<String> {
    std::fs::read_to_string(fixtures().join("corpus/en/dev.phn")).unwrap().lines().map(str::to_string).collect()
}

#[test]
fn alignments_of_recognised_transcripts_are_the_greedy_timestamps() {
    let tmp = tempfile::tempdir().unwrap();
    let data = manifest(tmp.path(), &references());
    let run = engine(&["align", "--model", MODEL, "--data", s(&data), "--labels", "phn", "--level", "char"]);
    ok(&run);
    let aligned = json_lines(&run.stdout);
    assert_eq!(aligned.len(), 4);
    assert!(String::from_utf8_lossy(&run.stderr).contains("aligned 4 of 4 utterances"));
    for a in &aligned {
        let audio = a["audio"].as_str().unwrap();
        let infer = engine(&["infer", "--model", MODEL, "--timestamps", "char", audio]);
        ok(&infer);
        let greedy = &json_lines(&infer.stdout)[0];
        // The demo backbone recognises these English utterances exactly.
        assert_eq!(a["text"], greedy["text"], "{audio}");
        assert_eq!(a["chunks"], greedy["chunks"], "{audio}: forced and greedy paths differ");
        let score = a["score"].as_f64().unwrap();
        assert!(score < 0.0 && score > -0.5, "{audio}: a recognised transcript scores near 0, not {score}");
    }
}

#[test]
fn wrong_transcripts_score_lower_and_impossible_ones_are_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let right = references();
    let align = |phn: &[String], extra: &[&str]| {
        let dir = tempfile::tempdir_in(tmp.path()).unwrap().keep();
        let data = manifest(&dir, phn);
        let mut args = vec!["align", "--model", MODEL, "--data", s(&data), "--labels", "phn"];
        args.extend(extra);
        let run = engine(&args);
        ok(&run);
        (json_lines(&run.stdout), String::from_utf8_lossy(&run.stderr).into_owned())
    };
    let (good, _) = align(&right, &[]);
    // Each utterance with its neighbour's transcript.
    let rotated: Vec<String> = (0..right.len()).map(|i| right[(i + 1) % right.len()].clone()).collect();
    let (bad, _) = align(&rotated, &[]);
    for (g, b) in good.iter().zip(&bad) {
        assert!(b["score"].as_f64().unwrap() < g["score"].as_f64().unwrap() - 0.5, "{g} against {b}");
        let words: Vec<&str> = b["chunks"].as_array().unwrap().iter().map(|c| c["text"].as_str().unwrap()).collect();
        assert_eq!(words.join(" "), b["text"].as_str().unwrap(), "words in transcript order");
    }
    // The first transcript repeated far beyond what 1.5 s of audio can hold.
    let mut long = right.clone();
    long[1] = std::iter::repeat_n(right[1].as_str(), 40).collect::<Vec<_>>().join(" | ");
    let (some, stderr) = align(&long, &[]);
    assert_eq!(some.len(), 3);
    assert!(stderr.contains("en_dev_00001.flac: skipped: its transcript needs at least") && stderr.contains("aligned 3 of 4"), "{stderr}");
}
