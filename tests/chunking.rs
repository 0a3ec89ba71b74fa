//! Long files in windows: `engine infer --chunk-seconds` gives transformers' ASR pipeline
//! transcripts (`chunk_length_s`, `stride_length_s`) on the demo backbone over 15 s of English
//! (tests/fixtures/chunking, from tools/make_chunking_fixtures.py); stitched logits keep the
//! whole file's frame count; windows as long as the file change nothing; bad settings are refused.
//! `--timestamps char|word` gives the pipeline's `return_timestamps` chunks, whole and in windows.

mod common;

use std::path::{Path, PathBuf};

use common::cli::{engine, fails_with, ok, s};
use common::fixtures;
use s3router::data::audio;
use safetensors::SafeTensors;

const MODEL: &str = "weights/s3r-demo-en";

fn expected() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("chunking/expected.json")).unwrap()).unwrap()
}

/// The fixture's utterances back to back, as a float WAV in `dir`.
fn long_wav(dir: &Path) -> PathBuf {
    let want = expected();
    let samples: Vec<f32> =
        want["audio"].as_array().unwrap().iter().flat_map(|f| audio::load(Path::new(f.as_str().unwrap())).unwrap()).collect();
    assert_eq!(samples.len() as u64, want["samples"].as_u64().unwrap());
    let path = dir.join("long.wav");
    let spec = hound::WavSpec { channels: 1, sample_rate: 16_000, bits_per_sample: 32, sample_format: hound::SampleFormat::Float };
    let mut w = hound::WavWriter::create(&path, spec).unwrap();
    samples.iter().for_each(|&x| w.write_sample(x).unwrap());
    w.finalize().unwrap();
    path
}

/// `engine infer` on `wav` with `args`: the transcript and the logits `--out` wrote.
fn infer(wav: &Path, args: &[&str]) -> (String, Vec<f32>, Vec<usize>) {
    let out = wav.with_extension(format!("{}.safetensors", args.join("_").replace([',', '.', '-'], "")));
    let mut all = vec!["infer", "--model", MODEL, "--out", s(&out)];
    all.extend(args);
    all.push(s(wav));
    let run = engine(&all);
    ok(&run);
    let stdout = String::from_utf8(run.stdout).unwrap();
    let (_, text) = stdout.trim_end_matches('\n').split_once('\t').unwrap();
    let bytes = std::fs::read(&out).unwrap();
    let t = SafeTensors::deserialize(&bytes).unwrap().tensor("logits.0").unwrap();
    let logits = t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    (text.to_string(), logits, t.shape().to_vec())
}

#[test]
fn windows_give_the_transformers_pipeline_transcripts() {
    let tmp = tempfile::tempdir().unwrap();
    let wav = long_wav(tmp.path());
    let want = expected();
    let (whole, whole_logits, whole_shape) = infer(&wav, &["--chunk-seconds", "0"]);
    assert_eq!(whole, want["whole"].as_str().unwrap(), "the whole file");
    for case in want["cases"].as_array().unwrap() {
        let seconds = case["chunk_seconds"].to_string();
        let context: Vec<String> = case["context"].as_array().unwrap().iter().map(|c| c.to_string()).collect();
        let context = context.join(",");
        let (text, logits, shape) = infer(&wav, &["--chunk-seconds", &seconds, "--chunk-context", &context]);
        assert_eq!(text, case["text"].as_str().unwrap(), "--chunk-seconds {seconds} --chunk-context {context}");
        assert_eq!(shape, whole_shape, "stitched logits keep one row per frame of the whole file");
        assert_ne!(logits, whole_logits, "windows see less context than the whole file");
    }
}

#[test]
fn timestamps_are_the_transformers_pipeline_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let wav = long_wav(tmp.path());
    for case in expected()["timestamps"].as_array().unwrap() {
        let level = case["level"].as_str().unwrap();
        let mut args = vec!["infer".to_string(), "--model".into(), MODEL.into(), "--timestamps".into(), level.into()];
        match case["chunk_length_s"].as_f64() {
            Some(seconds) => {
                let context: Vec<String> = case["stride_length_s"].as_array().unwrap().iter().map(|c| c.to_string()).collect();
                args.extend(["--chunk-seconds".into(), seconds.to_string(), "--chunk-context".into(), context.join(",")]);
            }
            None => args.extend(["--chunk-seconds".into(), "0".into()]),
        }
        args.push(s(&wav).into());
        let run = engine(&args.iter().map(String::as_str).collect::<Vec<_>>());
        ok(&run);
        let got: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
        let what = format!("{level}, {:?}", case["chunk_length_s"]);
        assert_eq!(got["audio"].as_str(), Some(s(&wav)));
        assert_eq!(got["text"], case["text"], "{what}");
        let (got, want) = (got["chunks"].as_array().unwrap(), case["chunks"].as_array().unwrap());
        assert_eq!(got.len(), want.len(), "{what}");
        for (g, w) in got.iter().zip(want) {
            assert_eq!(g["text"], w["text"], "{what}");
            for i in 0..2 {
                let (a, b) = (g["timestamp"][i].as_f64().unwrap(), w["timestamp"][i].as_f64().unwrap());
                assert_eq!(a, b, "{what}: {g} against {w}");
            }
        }
    }
}

#[test]
fn a_window_longer_than_the_file_changes_nothing_and_the_default_cuts_only_past_the_batch_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let wav = long_wav(tmp.path());
    let (_, whole, _) = infer(&wav, &["--chunk-seconds", "0"]);
    assert_eq!(infer(&wav, &["--chunk-seconds", "16"]).1, whole, "one window holding the whole file");
    assert_eq!(infer(&wav, &[]).1, whole, "15 s is within the default batch limit");
    // Past --batch-seconds the default cuts 30 s windows, or the batch limit's length if shorter,
    // and says so.
    let cut = engine(&["infer", "--model", MODEL, "--batch-seconds", "4", s(&wav)]);
    ok(&cut);
    assert!(String::from_utf8_lossy(&cut.stderr).contains("windows of 4 s"), "{}", String::from_utf8_lossy(&cut.stderr));
    let (text, _, _) = infer(&wav, &["--chunk-seconds", "4"]);
    assert_eq!(String::from_utf8(cut.stdout).unwrap().trim_end().split_once('\t').unwrap().1, text);
}

#[test]
fn bad_chunk_settings_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let wav = long_wav(tmp.path());
    let run = |args: &[&str]| {
        let mut all = vec!["infer", "--model", MODEL];
        all.extend(args);
        all.push(s(&wav));
        engine(&all)
    };
    fails_with(&run(&["--chunk-seconds", "2", "--chunk-context", "1"]), "must be longer than their");
    fails_with(&run(&["--chunk-seconds", "2", "--chunk-context", "0.001,0.5"]), "receptive field");
    fails_with(&run(&["--chunk-seconds", "2", "--chunk-context", "a,0.5"]), "\"a\" is not a number");
    fails_with(&run(&["--chunk-seconds=-1"]), "number of seconds");
    fails_with(&run(&["--chunk-seconds", "0", "--chunk-context", "1"]), "runs every file whole");
}

/// With --beam the words are those of the beam search's transcript, in order, each timed within
/// the file.
#[test]
fn beam_search_timestamps_time_its_own_transcript() {
    let tmp = tempfile::tempdir().unwrap();
    let wav = long_wav(tmp.path());
    let plain = engine(&["infer", "--model", MODEL, "--beam", "8", "--chunk-seconds", "4", s(&wav)]);
    ok(&plain);
    let text = String::from_utf8(plain.stdout).unwrap().trim_end().split_once('\t').unwrap().1.to_string();
    let timed = engine(&["infer", "--model", MODEL, "--beam", "8", "--chunk-seconds", "4", "--timestamps", "word", s(&wav)]);
    ok(&timed);
    let got: serde_json::Value = serde_json::from_slice(&timed.stdout).unwrap();
    assert_eq!(got["text"].as_str(), Some(text.as_str()));
    let words: Vec<&str> = got["chunks"].as_array().unwrap().iter().map(|c| c["text"].as_str().unwrap()).collect();
    assert_eq!(words.join(" "), text);
    let times: Vec<f64> = got["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| [c["timestamp"][0].as_f64().unwrap(), c["timestamp"][1].as_f64().unwrap()])
        .collect();
    let seconds = expected()["samples"].as_f64().unwrap() / 16_000.0;
    assert!(times.windows(2).all(|w| w[0] <= w[1]) && times[0] >= 0.0 && *times.last().unwrap() <= seconds, "{times:?}");
}

/// A file cut into windows that span several batches reports its progress after each batch:
/// windows done so far, out of the windows it has in all.
#[test]
fn progress_counts_a_files_windows_across_batches() {
    use s3router::backend::cpu::CpuBackend;
    use s3router::infer::{BatchLimits, Chunking, Recognizer};
    let tmp = tempfile::tempdir().unwrap();
    let wav = long_wav(tmp.path());
    let be = CpuBackend;
    let mut rec = Recognizer::load(Path::new(MODEL), None, None, &be, false).unwrap();
    rec.decoding.chunking = Some(Chunking::from_seconds(2.0, 0.25, 0.25, &rec.model.config).unwrap());
    let reports = std::sync::Mutex::new(Vec::new());
    let record = |p: &Path, done: usize, total: usize| reports.lock().unwrap().push((p.to_path_buf(), done, total));
    rec.progress = Some(&record);
    let mut windows = 0;
    rec.run(std::slice::from_ref(&wav), BatchLimits { max_utterances: 2, ..BatchLimits::default() }, |u| {
        windows = u.windows;
        Ok(())
    })
    .unwrap();
    let reports = reports.into_inner().unwrap();
    // 15.3 s in 1.5 s steps: 10 windows, 2 per batch, the last batch finishing the file.
    assert_eq!(windows, 10);
    let want: Vec<(PathBuf, usize, usize)> = (1..5).map(|b| (wav.clone(), 2 * b, 10)).collect();
    assert_eq!(reports, want);
}

/// `engine eval` over a dataset holding the long file, with `args`: the JSON report and the
/// one predictions line.
fn eval(dir: &Path, wav: &Path, args: &[&str]) -> (serde_json::Value, serde_json::Value, String) {
    let manifest = dir.join("long.tsv");
    let samples = expected()["samples"].as_u64().unwrap();
    std::fs::write(&manifest, format!("{}\n{}\t{samples}\n", dir.display(), wav.file_name().unwrap().to_str().unwrap())).unwrap();
    std::fs::write(dir.join("long.phn"), REFERENCE.to_string() + "\n").unwrap();
    let predictions = dir.join("predictions.jsonl");
    let mut all = vec!["eval", "--model", MODEL, "--data", s(&manifest), "--labels", "phn", "--json", "--predictions", s(&predictions)];
    all.extend(args);
    let run = engine(&all);
    ok(&run);
    let line = std::fs::read_to_string(&predictions).unwrap();
    (serde_json::from_slice(&run.stdout).unwrap(), serde_json::from_str(&line).unwrap(), String::from_utf8(run.stderr).unwrap())
}

/// A phonemic reference for the long file (its first utterance's; the rates do not matter here).
const REFERENCE: &str = "ʌ ð ɚ z | j ɛ h";

/// Eval cuts long utterances as infer does: hypotheses are the pipeline's transcripts, the loss
/// is the CTC loss of the stitched logits, and the report counts the utterances it cut.
#[test]
fn eval_scores_long_utterances_in_the_pipelines_windows() {
    use s3router::backend::cpu::CpuBackend;
    use s3router::backend::Seqs;
    use s3router::ctc::{ctc_loss, CtcTargets, Reduction};
    use s3router::data::dataset::LabelKind;
    use s3router::data::labels::Labeler;
    use s3router::model::vocab::Vocab;
    use s3router::tensor::Tensor;
    let tmp = tempfile::tempdir().unwrap();
    let wav = long_wav(tmp.path());
    let want = expected();
    let (whole, line, _) = eval(tmp.path(), &wav, &["--chunk-seconds", "0"]);
    assert_eq!((line["hypothesis"].as_str(), whole["windowed"].as_u64()), (want["whole"].as_str(), Some(0)));
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(Path::new(MODEL).join("config.json")).unwrap()).unwrap();
    let vocab = Vocab::load(&Path::new(MODEL).join("vocab.json"), config["vocab_size"].as_u64().unwrap() as usize, 0).unwrap();
    let labels = Labeler::new(&vocab, LabelKind::Phn, "", false).label_all([REFERENCE].into_iter()).unwrap().tokens;
    for case in want["cases"].as_array().unwrap() {
        let seconds = case["chunk_seconds"].to_string();
        let context: Vec<String> = case["context"].as_array().unwrap().iter().map(|c| c.to_string()).collect();
        let args = ["--chunk-seconds", &seconds, "--chunk-context", &context.join(",")];
        let (report, line, _) = eval(tmp.path(), &wav, &args);
        assert_eq!(line["hypothesis"], case["text"], "{args:?}");
        assert_eq!(report["windowed"].as_u64(), Some(1), "{args:?}");
        let (_, logits, shape) = infer(&wav, &args);
        let targets = CtcTargets { labels: labels.clone(), blank: 0, zero_infinity: true };
        let stitched = Tensor::from_vec(logits, &shape);
        let loss = ctc_loss(&CpuBackend, &stitched, &Seqs::new(vec![shape[0]]), &targets, Reduction::Sum).unwrap().losses[0];
        assert_eq!(line["loss"].as_f64().unwrap() as f32, loss, "{args:?}");
        assert_ne!(line["loss"], whole["loss"], "{args:?}: windows see less context");
    }
    // By default only utterances past --batch-seconds are cut, and the report says so.
    let (report, _, stderr) = eval(tmp.path(), &wav, &["--batch-seconds", "4"]);
    assert_eq!(report["windowed"].as_u64(), Some(1));
    assert!(stderr.contains("1 utterances longer than --batch-seconds were recognised in windows of 4 s"), "{stderr}");
    assert_eq!(eval(tmp.path(), &wav, &[]).0, whole, "15 s is within the default batch limit");
}

/// Validation during training cuts utterances past --valid-batch-seconds as eval does, and its
/// log line counts them.
#[test]
fn validation_cuts_utterances_past_its_batch_limit() {
    use common::cli::{log, small_manifest};
    let tmp = tempfile::tempdir().unwrap();
    let wav = long_wav(tmp.path());
    eval(tmp.path(), &wav, &[]); // writes long.tsv and long.phn beside the file
    let train = small_manifest(tmp.path(), 2);
    let (out, valid) = (tmp.path().join("run"), tmp.path().join("long.tsv"));
    let run = |batch: &str| {
        let mut args = vec!["train", "--model", MODEL, "--keep-head", "--train", s(&train), "--labels", "phn", "--steps", "1"];
        args.extend(["--valid", s(&valid), "--valid-batch-seconds", batch, "--out", s(&out), "--overwrite"]);
        ok(&engine(&args));
        log(&out).into_iter().find(|l| l["event"] == "valid").unwrap()
    };
    assert_eq!(run("4")["windowed"].as_u64(), Some(1));
    assert_eq!(run("120")["windowed"].as_u64(), Some(0));
}
