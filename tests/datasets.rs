//! Dataset readers on small checked-in examples of each layout, their bad inputs, and
//! `engine eval --json` against loss and error counts computed from transformers' logits.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::fixtures;
use s3router::data::audio;
use s3router::data::dataset::{open, DatasetOptions, Format, LabelKind, Subset};

fn datasets() -> PathBuf {
    fixtures().join("datasets")
}

fn opts() -> DatasetOptions {
    DatasetOptions::default()
}

#[test]
fn fairseq_manifest_with_each_label_file() {
    let tsv = datasets().join("fairseq/test.tsv");
    for (labels, first) in [(LabelKind::Ltr, "B A D | C A F E |"), (LabelKind::Wrd, "BAD CAFE"), (LabelKind::Phn, "B A D | C A F E")] {
        let d = open(&tsv, &DatasetOptions { labels, ..opts() }).unwrap();
        assert_eq!(d.utterances.len(), 3);
        assert_eq!(d.utterances[0].text, first);
        assert_eq!(d.utterances[1].samples, Some(1601));
        assert_eq!(d.utterances[2].audio, Path::new("tests/fixtures/audio/utt2.wav"));
    }
}

/// A manifest whose relative root does not exist from the working directory, but names the
/// manifest's own folder (a corpus committed with a repository-relative root, read from
/// elsewhere), resolves to that folder; a root that exists from here is taken as fairseq does.
#[test]
fn relative_manifest_roots_fall_back_to_the_manifest_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("corpora").join("xx");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy("tests/fixtures/audio/utt0.wav", dir.join("a.wav")).unwrap();
    std::fs::write(dir.join("train.tsv"), "corpora/xx\na.wav\t100\n").unwrap();
    std::fs::write(dir.join("train.ltr"), "A |\n").unwrap();
    let d = open(&dir.join("train.tsv"), &opts()).unwrap();
    assert_eq!(d.utterances[0].audio, std::path::absolute(dir.join("a.wav")).unwrap());
    std::fs::write(dir.join("train.tsv"), "tests/fixtures/audio\nutt0.wav\t100\n").unwrap();
    let d = open(&dir.join("train.tsv"), &opts()).unwrap();
    assert_eq!(d.utterances[0].audio, Path::new("tests/fixtures/audio/utt0.wav"));
}

#[test]
fn librispeech_tree_and_librilight_subsets() {
    let d = open(&datasets().join("librispeech"), &opts()).unwrap();
    let ids: Vec<&str> = d.utterances.iter().map(|u| u.id.as_str()).collect();
    assert_eq!(ids, ["11-22-0000", "11-22-0001", "11-22-0002"]);
    assert_eq!(d.utterances[2].text, "FACE A BEE");
    let ft = datasets().join("librispeech_finetuning");
    for (subset, n) in [(Subset::TenMin, 1), (Subset::OneHour, 2), (Subset::TenHours, 3)] {
        let d = open(&ft, &DatasetOptions { subset: Some(subset), ..opts() }).unwrap();
        assert_eq!(d.utterances.len(), n, "{subset:?}");
    }
}

#[test]
fn commonvoice_columns_found_by_header_and_mp3_decodes() {
    let d = open(&datasets().join("commonvoice"), &DatasetOptions { split: "test".into(), ..opts() }).unwrap();
    assert_eq!(d.utterances[1].text, "deaf");
    assert!(d.utterances[1].audio.ends_with("clips/cv_1.mp3"));
    let samples = audio::load(&d.utterances[1].audio).unwrap();
    // MP3 frames pad the 1601-sample clip; the decoder returns at least the original length.
    assert!(samples.len() >= 1601 && samples.len() < 1601 + 3000, "{} samples", samples.len());
}

#[test]
fn json_lines_with_relative_paths_and_durations() {
    let d = open(&datasets().join("jsonl/test.jsonl"), &opts()).unwrap();
    assert_eq!(d.utterances[0].samples, Some(3203));
    assert!(d.utterances[0].audio.is_file());
    assert_eq!(d.utterances[2].text, "face a bee");
}

#[test]
fn every_missing_file_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let tsv = dir.path().join("big.tsv");
    let rows: String = (0..25).map(|i| format!("missing{i}.wav\t100\n")).collect();
    std::fs::write(&tsv, format!("{}\n{rows}", dir.path().display())).unwrap();
    std::fs::write(dir.path().join("big.ltr"), "A |\n".repeat(25)).unwrap();
    let e = open(&tsv, &opts()).err().unwrap().to_string();
    assert!(e.starts_with("25 of 25 audio files are missing") && e.contains("and 15 more (all listed in "), "{e}");
    let list = e.rsplit("all listed in ").next().unwrap().trim_end_matches(')');
    let listed = std::fs::read_to_string(list).unwrap();
    assert_eq!(listed.lines().count(), 25);
    assert!(listed.contains("missing24.wav"));
    std::fs::remove_file(list).unwrap();
}

#[test]
fn layouts_are_detected_or_forced() {
    let tsv = datasets().join("fairseq/test.tsv");
    assert!(open(&tsv, &DatasetOptions { format: Some(Format::Jsonl), ..opts() }).is_err());
    let e = open(&datasets().join("fairseq"), &opts()).err().unwrap().to_string();
    assert!(e.contains("not a fairseq .tsv"), "{e}");
}

#[test]
fn bad_datasets_are_reported_before_work_starts() {
    let dir = tempfile::tempdir().unwrap();
    let tsv = dir.path().join("train.tsv");
    std::fs::write(&tsv, format!("{}\na.wav\t100\nb.wav\t200\nc.wav\t300\n", dir.path().display())).unwrap();
    std::fs::write(dir.path().join("train.ltr"), "A |\nB |\n").unwrap();
    let e = open(&tsv, &opts()).err().unwrap().to_string();
    assert!(e.contains("train.ltr has 2 lines but") && e.contains("lists 3 utterances"), "{e}");
    std::fs::write(dir.path().join("train.ltr"), "A |\nB |\nC |\n").unwrap();
    let e = open(&tsv, &opts()).err().unwrap().to_string();
    assert!(e.contains("3 of 3 audio files are missing") && e.contains("a.wav") && e.contains("c.wav"), "{e}");
    for name in ["a.wav", "b.wav"] {
        std::fs::copy(fixtures().join("audio/utt1.wav"), dir.path().join(name)).unwrap();
    }
    std::fs::write(dir.path().join("c.wav"), "RIFF but not really").unwrap();
    let e = open(&tsv, &opts()).err().unwrap().to_string();
    assert!(e.contains("1 of 3 audio files are not readable audio") && e.contains("c.wav"), "{e}");
    std::fs::write(&tsv, format!("{}\n", dir.path().display())).unwrap();
    std::fs::write(dir.path().join("train.ltr"), "").unwrap();
    assert!(open(&tsv, &opts()).err().unwrap().to_string().contains("holds no utterances"));
}

fn eval_json(data: &Path, extra: &[&str]) -> serde_json::Value {
    let model = fixtures().join("base-like");
    let mut args = vec!["eval", "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap(), "--json"];
    args.extend(extra);
    let o = Command::new(env!("CARGO_BIN_EXE_engine")).args(&args).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn eval_json_matches_transformers_and_jiwer() {
    let want: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(datasets().join("expected_eval.json")).unwrap()).unwrap();
    for (data, extra) in [
        (datasets().join("fairseq/test.tsv"), vec!["--labels", "wrd"]),
        (datasets().join("fairseq/test.tsv"), vec!["--labels", "ltr"]),
        (datasets().join("librispeech"), vec![]),
        (datasets().join("jsonl/test.jsonl"), vec![]),
    ] {
        let got = eval_json(&data, &extra);
        assert_eq!(got["utterances"], 3);
        let (g, w) = (got["loss"].as_f64().unwrap(), want["loss"].as_f64().unwrap());
        assert!(((g - w) / w).abs() <= 1e-4, "{}: loss {g} vs {w}", data.display());
        for rate in ["wer", "cer", "uer"] {
            for k in ["sub", "del", "ins", "ref_len"] {
                assert_eq!(got[format!("{rate}_{k}")], want[rate][k], "{}: {rate}_{k}", data.display());
            }
            let c = &want[rate];
            let errors = c["sub"].as_f64().unwrap() + c["del"].as_f64().unwrap() + c["ins"].as_f64().unwrap();
            assert!((got[rate].as_f64().unwrap() - errors / c["ref_len"].as_f64().unwrap()).abs() < 1e-12);
        }
    }
}

/// `--predictions`: one line per utterance in dataset order, whose hypotheses are transformers'
/// transcripts and whose error counts sum to jiwer's totals.
#[test]
fn eval_predictions_hold_each_utterance_and_sum_to_the_report() {
    let want: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(datasets().join("expected_eval.json")).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("predictions.jsonl");
    let report = eval_json(&datasets().join("librispeech"), &["--predictions", file.to_str().unwrap()]);
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&file).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3);
    let hyps: Vec<&str> = lines.iter().map(|l| l["hypothesis"].as_str().unwrap()).collect();
    let refs: Vec<&str> = lines.iter().map(|l| l["reference"].as_str().unwrap()).collect();
    assert_eq!(serde_json::json!(hyps), want["hypotheses"]);
    assert_eq!(refs, ["BAD CAFE", "DEAF", "FACE A BEE"], "the transcripts, in dataset order");
    for rate in ["wer", "cer", "uer"] {
        let sum = |key: &str| lines.iter().map(|l| l[format!("{rate}_{key}")].as_u64().unwrap()).sum::<u64>();
        let c = &want[rate];
        assert_eq!(sum("errors"), ["sub", "del", "ins"].iter().map(|k| c[k].as_u64().unwrap()).sum::<u64>(), "{rate}");
        assert_eq!(sum("ref_len"), c["ref_len"].as_u64().unwrap(), "{rate}");
    }
    let mean_loss = lines.iter().map(|l| l["loss"].as_f64().unwrap()).sum::<f64>() / 3.0;
    assert!((mean_loss - report["loss"].as_f64().unwrap()).abs() <= 1e-4 * mean_loss);
    // A folder that is not there is refused before any work.
    let o = Command::new(env!("CARGO_BIN_EXE_engine"))
        .args([
            "eval",
            "--model",
            "tests/fixtures/base-like",
            "--data",
            "tests/fixtures/datasets/librispeech",
            "--predictions",
            "/nonexistent/p.jsonl",
        ])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("--predictions /nonexistent/p.jsonl") && !e.contains("evaluated"), "{e}");
}

/// `--beam` changes only the decoding: the same loss and reference lengths, and the JSON says
/// which decoder ran.
#[test]
fn eval_reports_its_decoder() {
    let data = datasets().join("librispeech");
    let (greedy, beam) = (eval_json(&data, &[]), eval_json(&data, &["--beam", "8"]));
    assert_eq!((greedy["decoder"].as_str(), beam["decoder"].as_str()), (Some("greedy"), Some("beam 8")));
    assert_eq!(greedy["loss"], beam["loss"]);
    for rate in ["wer_ref_len", "cer_ref_len", "uer_ref_len"] {
        assert_eq!(greedy[rate], beam[rate]);
    }
}

#[test]
fn eval_names_symbols_missing_from_the_vocabulary() {
    let dir = tempfile::tempdir().unwrap();
    let jsonl = dir.path().join("x.jsonl");
    let wav = std::fs::canonicalize(fixtures().join("audio/utt0.wav")).unwrap();
    std::fs::write(&jsonl, format!("{{\"audio_filepath\": \"{}\", \"text\": \"bad zebra!\"}}\n", wav.display())).unwrap();
    let model = fixtures().join("base-like");
    let o = Command::new(env!("CARGO_BIN_EXE_engine"))
        .args(["eval", "--model", model.to_str().unwrap(), "--data", jsonl.to_str().unwrap()])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("symbols the vocabulary lacks") && e.contains("\"Z\"") && e.contains("\"!\""), "{e}");
    let o = Command::new(env!("CARGO_BIN_EXE_engine"))
        .args([
            "eval",
            "--model",
            model.to_str().unwrap(),
            "--data",
            jsonl.to_str().unwrap(),
            "--skip-unknown",
            "--chars-to-ignore",
            "!",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn duration_filters_use_headers_and_refuse_an_empty_result() {
    // LibriSpeech records no lengths: FLAC headers give 3203, 1601 and 4799 samples.
    let ls = datasets().join("librispeech");
    let d = open(&ls, &DatasetOptions { min_duration: Some(0.15), max_duration: Some(0.25), ..opts() }).unwrap();
    assert_eq!(d.utterances.len(), 1);
    assert_eq!(d.utterances[0].samples, Some(3203));
    let e = open(&ls, &DatasetOptions { min_duration: Some(5.0), ..opts() }).err().unwrap().to_string();
    assert!(e.contains("none of its 3 utterances is within the duration limits"), "{e}");
}

#[test]
fn vocab_command_builds_from_transcripts() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("vocab.json");
    let data = datasets().join("fairseq/test.tsv");
    let o = Command::new(env!("CARGO_BIN_EXE_engine"))
        .args(["vocab", "--data", data.to_str().unwrap(), "--labels", "wrd", "--lowercase", "--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    // BAD CAFE / DEAF / FACE A BEE: e and a 5 times, f 3, b/c/d 2 each.
    assert_eq!(v["<pad>"], 0);
    assert_eq!(v["|"], 4);
    assert_eq!((v["a"].as_u64(), v["e"].as_u64(), v["f"].as_u64(), v["b"].as_u64()), (Some(5), Some(6), Some(7), Some(8)));
}
