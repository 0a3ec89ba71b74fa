//! `engine train` end to end on the fixture model and the espeak-ng corpus: learning happens,
//! frozen weights stay untouched, outputs form a mask set that `engine eval` reproduces, a killed
//! and resumed run ends bit-identical, and bad input is refused with a named reason.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::cli::{engine, fails_with, file_hash, log, ok, s, small_manifest, PLAIN};
use common::{copy_model, fixtures, rewrite_tensors};
use s3router::model::checkpoint::Checkpoint;
use s3router::model::masks::MaskSet;
use s3router::router::{kept, top_k_mask};
use s3router::train::checkpoint::TrainState;

#[test]
fn loss_falls_when_overfitting_and_frozen_weights_are_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    std::fs::create_dir(&model).unwrap();
    for f in ["config.json", "model.safetensors", "vocab.json", "preprocessor_config.json"] {
        std::fs::copy(fixtures().join("base-like").join(f), model.join(f)).unwrap();
    }
    let weights = model.join("model.safetensors");
    let (hash, modified) = (file_hash(&weights), std::fs::metadata(&weights).unwrap().modified().unwrap());
    let train = small_manifest(tmp.path(), 4);
    let out = tmp.path().join("run");
    let mut args = vec!["train", "--model", s(&model), "--train", s(&train), "--out", s(&out), "--steps", "60", "--lr", "1e-2"];
    args.extend(PLAIN);
    ok(&engine(&args));
    let losses: Vec<f64> = log(&out).iter().filter_map(|l| l["loss"].as_f64()).collect();
    assert_eq!(losses.len(), 60);
    let (first, last) = (losses[0], losses[50..].iter().sum::<f64>() / 10.0);
    assert!(last < 0.3 * first, "loss {first} -> {last}");
    assert_eq!(file_hash(&weights), hash, "the frozen checkpoint changed");
    assert_eq!(std::fs::metadata(&weights).unwrap().modified().unwrap(), modified);
}

#[test]
fn outputs_form_a_mask_set_that_eval_reproduces() {
    let tmp = tempfile::tempdir().unwrap();
    let train = small_manifest(tmp.path(), 6);
    let valid = fixtures().join("corpus/en/dev.tsv");
    // Sparsity 0 is the head-only baseline: no masked weights at all.
    for (scope, sparsity, per_layer) in [("ffn", "0.3", 2), ("attention", "0.2", 4), ("all", "0.1", 6), ("ffn", "0", 0)] {
        let out = tmp.path().join(format!("{scope}-{sparsity}"));
        let mut args = vec!["train", "--model", "tests/fixtures/base-like", "--train", s(&train), "--valid", s(&valid), "--out", s(&out)];
        args.extend([
            "--steps",
            "6",
            "--lr",
            "1e-2",
            "--mask",
            scope,
            "--sparsity",
            sparsity,
            "--skip-unknown",
            "--labels",
            "phn",
            "--quiet",
        ]);
        ok(&engine(&args));
        let set = MaskSet::load(&out).unwrap();
        assert_eq!(set.masks.len(), 2 * per_layer, "{scope}: masks for 2 layers");
        assert_eq!(set.sparsity, Some(sparsity.parse().unwrap()));
        let scores = Checkpoint::open(&[out.join("scores.safetensors")]).unwrap();
        for (name, (shape, bits)) in &set.masks {
            let want_part = match scope {
                "ffn" => name.contains("feed_forward"),
                "attention" => name.contains("attention"),
                _ => true,
            };
            assert!(want_part, "{scope}: unexpected mask {name}");
            let numel: usize = shape.iter().product();
            let keep = s3router::mask::unpack(bits, numel);
            assert_eq!(keep.iter().filter(|&&k| k).count(), kept(numel, sparsity.parse().unwrap()), "{name}");
            let sc = scores.tensor(name).unwrap();
            assert_eq!(sc.shape(), shape.as_slice());
            assert_eq!(top_k_mask(&sc.to_vec().unwrap(), sparsity.parse().unwrap()), keep, "{name}: mask is the top-k of the scores");
        }
        // The validation numbers of the best checkpoint are what `engine eval --masks` measures.
        let best = out.join("best");
        let valid_json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(best.join("valid.json")).unwrap()).unwrap();
        let e = engine(&[
            "eval",
            "--model",
            "tests/fixtures/base-like",
            "--masks",
            s(&best),
            "--data",
            s(&valid),
            "--labels",
            "phn",
            "--skip-unknown",
            "--json",
        ]);
        ok(&e);
        let eval: serde_json::Value = serde_json::from_slice(&e.stdout).unwrap();
        for key in ["wer", "cer", "uer", "loss", "utterances"] {
            assert_eq!(eval[key], valid_json[key], "{scope}: {key}");
        }
        let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("train_config.json")).unwrap()).unwrap();
        assert_eq!(config["mask"], scope);
    }
}

/// Every regulariser on, two batches per update, validation: killed after its first checkpoint
/// and resumed, the run's outputs, checkpoint and log equal those of a run never interrupted.
/// The interrupted run also recomputes the frozen features every step (no feature cache), so
/// the cache is shown exact too.
#[test]
fn a_killed_and_resumed_run_ends_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let train = small_manifest(tmp.path(), 10);
    let valid = fixtures().join("corpus/en/dev.tsv");
    let args = |out: &Path| -> Vec<String> {
        let a = [
            "train",
            "--model",
            "tests/fixtures/base-like",
            "--train",
            s(&train),
            "--valid",
            s(&valid),
            "--out",
            s(out),
            "--labels",
            "phn",
            "--skip-unknown",
            "--steps",
            "40",
            "--lr",
            "5e-3",
            "--update-freq",
            "2",
            "--max-tokens",
            "80000",
            "--save-every",
            "3",
            "--valid-every",
            "7",
            "--mask",
            "all",
            "--mask-time-prob",
            "0.5",
            "--mask-channel-prob",
            "0.5",
            "--mask-channel-length",
            "4",
            "--layerdrop",
            "0.3",
            "--quiet",
        ];
        a.iter().map(|x| x.to_string()).collect()
    };
    let files = ["scores.safetensors", "masks.safetensors", "head.safetensors", "vocab.json", "best/masks.safetensors", "best/valid.json"];
    let straight = kill_and_resume(tmp.path(), args, 40, &files);
    // The regularisers were live: some updates saw layers dropped (no gradient for their scores).
    let st = TrainState::load(&straight.join("checkpoint.safetensors")).unwrap();
    let steps: Vec<u64> = st.meta["tensor_adam.steps"].split(',').map(|x| x.parse().unwrap()).collect();
    assert!(steps.iter().any(|&n| n < 40) && steps.contains(&40), "Adam step counts {steps:?}");
}

/// Runs `args(out)` (a run of `steps` updates that checkpoints early) straight through, and
/// again on two threads without the feature cache, killed (SIGKILL) after its first checkpoint
/// and resumed; `files`, the checkpoint and the log must come out byte-identical. Returns the
/// straight run's folder.
fn kill_and_resume(tmp: &Path, args: impl Fn(&Path) -> Vec<String>, steps: usize, files: &[&str]) -> PathBuf {
    let straight = tmp.join("straight");
    ok(&Command::new(env!("CARGO_BIN_EXE_engine")).args(args(&straight)).output().unwrap());
    let resumed = tmp.join("resumed");
    let uncached = |out: &Path| -> Vec<String> {
        ["--threads".to_string(), "2".into()].into_iter().chain(args(out)).chain(["--feature-cache-mb".into(), "0".into()]).collect()
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_engine")).args(uncached(&resumed)).spawn().unwrap();
    let checkpoint = resumed.join("checkpoint.safetensors");
    while !checkpoint.exists() {
        assert!(child.try_wait().unwrap().is_none(), "the run ended before its first checkpoint");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let at: usize = TrainState::load(&checkpoint).unwrap().meta["update"].parse().unwrap();
    assert!(at < steps, "killed after the run finished (update {at})");
    let mut again = uncached(&resumed);
    again.push("--resume".into());
    ok(&Command::new(env!("CARGO_BIN_EXE_engine")).args(&again).output().unwrap());
    for f in files.iter().chain(&["checkpoint.safetensors", "train_log.jsonl"]) {
        assert!(std::fs::read(straight.join(f)).unwrap() == std::fs::read(resumed.join(f)).unwrap(), "{f} differs after resuming at {at}");
    }
    straight
}

/// `engine finetune`: the loss falls when overfitting; the output is a model folder whose
/// config and vocabulary fit the task, whose feature encoder is the source's bit for bit while
/// the encoder has moved, and which `engine eval --model` scores exactly as the run's
/// validation did; the source folder is untouched.
#[test]
fn finetune_learns_and_writes_a_model_folder_that_eval_reproduces() {
    let tmp = tempfile::tempdir().unwrap();
    let train = small_manifest(tmp.path(), 4);
    let valid = fixtures().join("corpus/en/dev.tsv");
    let source = fixtures().join("base-like");
    let hash = file_hash(&source.join("model.safetensors"));
    let out = tmp.path().join("run");
    let mut args = vec!["finetune", "--model", s(&source), "--train", s(&train), "--valid", s(&valid), "--out", s(&out)];
    args.extend(["--steps", "40", "--lr", "2e-3", "--valid-every", "20", "--skip-unknown"]);
    args.extend(PLAIN);
    ok(&engine(&args));
    let losses: Vec<f64> = log(&out).iter().filter_map(|l| l["loss"].as_f64()).collect();
    let (first, last) = (losses[0], losses[35..].iter().sum::<f64>() / 5.0);
    assert!(last < 0.3 * first, "loss {first} -> {last}");
    assert_eq!(file_hash(&source.join("model.safetensors")), hash, "the source checkpoint changed");

    let (src, tuned) = (Checkpoint::open_dir(&source).unwrap(), Checkpoint::open_dir(&out).unwrap());
    let vocab: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("vocab.json")).unwrap()).unwrap();
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["vocab_size"].as_u64().unwrap() as usize, vocab.as_object().unwrap().len());
    assert_eq!(tuned.tensor("lm_head.weight").unwrap().shape()[0], vocab.as_object().unwrap().len());
    let (mut same, mut moved) = (0, 0);
    for name in src.names().filter(|n| n.starts_with("wav2vec2.")) {
        let (a, b) = (src.tensor(name).unwrap().to_vec().unwrap(), tuned.tensor(name).unwrap().to_vec().unwrap());
        if name.contains("feature_extractor") {
            assert_eq!(a, b, "{name}: the feature encoder is frozen");
            same += 1;
        } else if a != b {
            moved += 1;
        }
    }
    assert!(same > 0 && moved > 20, "{same} frozen tensors, {moved} trained ones moved");
    let best = out.join("best");
    let valid_json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(best.join("valid.json")).unwrap()).unwrap();
    let e = engine(&["eval", "--model", s(&best), "--data", s(&valid), "--labels", "phn", "--skip-unknown", "--json"]);
    ok(&e);
    let eval: serde_json::Value = serde_json::from_slice(&e.stdout).unwrap();
    for key in ["wer", "cer", "uer", "loss", "utterances"] {
        assert_eq!(eval[key], valid_json[key], "{key}");
    }
    let recipe: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("train_config.json")).unwrap()).unwrap();
    assert_eq!((recipe["learn"].as_str(), recipe["freeze_updates"].as_u64()), (Some("weights"), Some(0)));
}

/// `--freeze-updates`: the first updates train only the head (the encoder, the projection and
/// the time-mask embedding keep their values and their Adam step counts stay behind).
#[test]
fn finetune_freeze_updates_train_only_the_head_first() {
    let tmp = tempfile::tempdir().unwrap();
    let train = small_manifest(tmp.path(), 3);
    let out = tmp.path().join("run");
    let source = fixtures().join("base-like");
    let run = |steps: &str| {
        let mut args = vec!["finetune", "--model", s(&source), "--train", s(&train), "--out", s(&out), "--steps", steps];
        args.extend(["--freeze-updates", "3", "--lr", "1e-3", "--skip-unknown", "--labels", "phn", "--mask-time-prob", "0.5"]);
        args.extend(["--layerdrop", "0", "--overwrite", "--quiet"]);
        ok(&engine(&args));
    };
    run("5");
    let st = TrainState::load(&out.join("checkpoint.safetensors")).unwrap();
    let steps: Vec<u64> = st.meta["adam.steps"].split(',').map(|x| x.parse().unwrap()).collect();
    // Head weight and bias first, then the embedding and every weight.
    assert_eq!(&steps[..2], &[5, 5]);
    assert!(steps[2..].iter().all(|&n| n == 2), "Adam step counts {steps:?}");
    run("3");
    let (src, tuned) = (Checkpoint::open_dir(&source).unwrap(), Checkpoint::open_dir(&out).unwrap());
    for name in src.names().filter(|n| n.starts_with("wav2vec2.encoder.")) {
        assert_eq!(src.tensor(name).unwrap().to_vec().unwrap(), tuned.tensor(name).unwrap().to_vec().unwrap(), "{name} moved while frozen");
    }
}

/// `--train-feature-encoder`: the conv feature encoder's weights move too.
#[test]
fn finetune_can_train_the_feature_encoder() {
    let tmp = tempfile::tempdir().unwrap();
    let train = small_manifest(tmp.path(), 3);
    let out = tmp.path().join("run");
    let source = fixtures().join("base-like");
    let mut args = vec!["finetune", "--model", s(&source), "--train", s(&train), "--out", s(&out), "--steps", "3", "--lr", "1e-3"];
    args.extend(["--skip-unknown", "--labels", "phn", "--layerdrop", "0", "--train-feature-encoder", "--quiet"]);
    ok(&engine(&args));
    let (src, tuned) = (Checkpoint::open_dir(&source).unwrap(), Checkpoint::open_dir(&out).unwrap());
    for name in src.names().filter(|n| n.starts_with("wav2vec2.feature_extractor.")) {
        assert_ne!(src.tensor(name).unwrap().to_vec().unwrap(), tuned.tensor(name).unwrap().to_vec().unwrap(), "{name} did not train");
    }
}

/// Finetuning killed after its first checkpoint and resumed ends bit-identical (regularisers on).
#[test]
fn a_killed_and_resumed_finetuning_ends_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let train = small_manifest(tmp.path(), 6);
    let args = |out: &Path| -> Vec<String> {
        let mut a = vec!["finetune", "--model", "tests/fixtures/base-like", "--train", s(&train), "--out", s(out), "--labels", "phn"];
        a.extend(["--skip-unknown", "--steps", "12", "--lr", "1e-3", "--max-tokens", "80000", "--save-every", "2", "--freeze-updates"]);
        a.extend(["3", "--mask-time-prob", "0.5", "--mask-channel-prob", "0.5", "--mask-channel-length", "4", "--layerdrop", "0.3"]);
        a.push("--quiet");
        a.iter().map(|x| x.to_string()).collect()
    };
    kill_and_resume(tmp.path(), args, 12, &["model.safetensors", "config.json", "vocab.json", "preprocessor_config.json"]);
}

/// --keep-head with the head's vocabulary as a fairseq dictionary (what the official recipes and
/// `engine convert` read): the demo model's vocab.json written as dict.phn.txt trains with its
/// head and ends with the same vocab.json; a dictionary one symbol short is refused by size.
#[test]
fn keep_head_takes_a_fairseq_dictionary() {
    let tmp = tempfile::tempdir().unwrap();
    let train = small_manifest(tmp.path(), 2);
    let model_vocab: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string("weights/s3r-demo-en/vocab.json").unwrap()).unwrap();
    let mut by_id: Vec<(u64, &str)> = model_vocab.iter().map(|(t, id)| (id.as_u64().unwrap(), t.as_str())).collect();
    by_id.sort();
    let symbols: Vec<&str> = by_id.iter().map(|&(_, t)| t).filter(|t| !["<pad>", "<s>", "</s>", "<unk>"].contains(t)).collect();
    let (dict, short) = (tmp.path().join("dict.phn.txt"), tmp.path().join("short.phn.txt"));
    std::fs::write(&dict, symbols.iter().map(|t| format!("{t} 1\n")).collect::<String>()).unwrap();
    std::fs::write(&short, symbols[..symbols.len() - 1].iter().map(|t| format!("{t} 1\n")).collect::<String>()).unwrap();
    let out = tmp.path().join("run");
    let run = |vocab: &Path| {
        let args = ["train", "--model", "weights/s3r-demo-en", "--keep-head", "--vocab", s(vocab), "--train", s(&train), "--labels", "phn"];
        engine(&[&args[..], &["--steps", "1", "--out", s(&out), "--overwrite", "--quiet"]].concat())
    };
    ok(&run(&dict));
    let written: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(out.join("vocab.json")).unwrap()).unwrap();
    assert_eq!(written, model_vocab, "the run's vocabulary is not the head's");
    fails_with(&run(&short), &format!("{} symbols with the blank at 0, but the head of", model_vocab.len() - 1));
}

#[test]
fn bad_input_is_refused_with_a_named_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let train = small_manifest(tmp.path(), 3);
    let out = tmp.path().join("run");
    let base = |extra: &[&str]| -> Output {
        let mut a = vec!["train", "--model", "tests/fixtures/base-like", "--train", s(&train), "--out", s(&out), "--labels", "phn"];
        a.push("--quiet");
        a.extend(extra);
        if !extra.contains(&"--steps") {
            a.extend(["--steps", "2"]);
        }
        engine(&a)
    };
    fails_with(&base(&["--sparsity", "1"]), "outside [0, 1)");
    fails_with(&base(&["--sparsity=-0.1"]), "outside [0, 1)");
    fails_with(&base(&["--dropout", "1.5"]), "--dropout 1.5 is outside");
    fails_with(&base(&["--resume"]), "holds no run to resume");
    assert!(!out.exists(), "a refused run left an output folder");
    // The model's letter head cannot read phonemes.
    fails_with(&base(&["--keep-head"]), "symbols the vocabulary lacks");
    assert!(!out.exists(), "a run that failed to start left an output folder");
    ok(&base(&[]));
    fails_with(&base(&[]), "pass --resume to continue it or --overwrite");
    fails_with(&base(&["--resume", "--sparsity", "0.2"]), "sparsity (run: 0.1, now: 0.2)");
    ok(&base(&["--overwrite", "--steps", "3"]));
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("train_config.json")).unwrap()).unwrap();
    assert_eq!(config["steps"], 3);
    // Masks from a different model: named by eval.
    let e = engine(&["infer", "--model", "tests/fixtures/large-like", "--masks", s(&out), "tests/fixtures/audio/utt0.wav"]);
    fails_with(&e, "mask \"wav2vec2.encoder.layers.0.feed_forward.intermediate_dense.weight\" is for a");
    // The same architecture with other weights (the first value of one masked matrix changed):
    // the base fingerprint the run recorded tells them apart, for one mask set and for several.
    let (_d, other) = copy_model("base-like");
    rewrite_tensors(&other, |t| {
        let w = t.iter_mut().find(|(n, _, _)| n == "wav2vec2.encoder.layers.1.feed_forward.output_dense.weight").unwrap();
        w.2[0] += 0.25;
    });
    let e = engine(&["infer", "--model", s(&other), "--masks", s(&out), "tests/fixtures/audio/utt0.wav"]);
    fails_with(&e, "these masks were learned over other weights than");
    let e = engine(&["infer", "--model", s(&other), "--masks", &format!("a={}", s(&out)), "tests/fixtures/audio/utt0.wav@a"]);
    fails_with(&e, "these masks were learned over other weights than");
    ok(&engine(&["infer", "--model", "tests/fixtures/base-like", "--masks", s(&out), "tests/fixtures/audio/utt0.wav"]));
    // Without a GPU (or kernels), --device cuda names why before touching the output folder.
    if let Some(why) = s3router::backend::cuda::unavailable_reason() {
        fails_with(&base(&["--device", "cuda"]), &why);
        // The demo too, before it announces its first run.
        let demo = engine(&["train", "--device", "cuda", "--out", s(&tmp.path().join("demo"))]);
        fails_with(&demo, &why);
        assert!(!String::from_utf8_lossy(&demo.stderr).contains("[1/2]"), "the demo started before checking the GPU");
    }
    let mut finetune = vec!["finetune", "--model", "tests/fixtures/base-like", "--train", s(&train), "--out", s(&out)];
    finetune.extend(["--overwrite", "--sparsity", "0.5"]);
    fails_with(&engine(&finetune), "weight finetuning has no masks");
}

#[test]
fn repeated_non_finite_losses_stop_the_run_with_the_checkpoint_intact() {
    let tmp = tempfile::tempdir().unwrap();
    let wav = tmp.path().join("nan.wav");
    let spec = hound::WavSpec { channels: 1, sample_rate: 16_000, bits_per_sample: 32, sample_format: hound::SampleFormat::Float };
    let mut w = hound::WavWriter::create(&wav, spec).unwrap();
    for i in 0..16_000 {
        w.write_sample(if i == 8000 { f32::NAN } else { (i as f32 * 0.01).sin() * 0.1 }).unwrap();
    }
    w.finalize().unwrap();
    let manifest = tmp.path().join("nan.tsv");
    std::fs::write(&manifest, format!("{}\nnan.wav\t16000\n", tmp.path().display())).unwrap();
    std::fs::write(tmp.path().join("nan.ltr"), "A B |\n").unwrap();
    let out = tmp.path().join("run");
    let e = engine(&[
        "train",
        "--model",
        "tests/fixtures/base-like",
        "--train",
        s(&manifest),
        "--out",
        s(&out),
        "--steps",
        "10",
        "--max-nonfinite",
        "3",
        "--quiet",
    ]);
    fails_with(&e, "3 updates in a row had a non-finite loss or gradient");
    let skipped = log(&out).iter().filter(|l| l["skipped"].is_string()).count();
    assert_eq!(skipped, 3);
    assert!(!out.join("scores.safetensors").exists(), "no outputs from a failed run");
}

/// `engine masks stats`: weight-rank scores start exactly at the magnitude mask (nothing flipped
/// after an update too small to reorder them); random scores start at a random mask, which
/// differs from the magnitude mask in about 2 s (1 - s) of the weights; neither moves from its
/// initial mask in such an update.
#[test]
fn mask_stats_measure_the_distance_from_the_magnitude_mask() {
    let tmp = tempfile::tempdir().unwrap();
    let train = small_manifest(tmp.path(), 2);
    for (init, lo, hi) in [("weight-rank", 0.0, 0.0), ("random", 0.15, 0.21)] {
        let out = tmp.path().join(init);
        let mut args = vec!["train", "--model", "tests/fixtures/base-like", "--train", s(&train), "--out", s(&out), "--init", init];
        args.extend(["--steps", "1", "--lr", "1e-9", "--sparsity", "0.1"]);
        args.extend(PLAIN);
        ok(&engine(&args));
        let e = engine(&["masks", "stats", "--model", "tests/fixtures/base-like", "--json", s(&out)]);
        ok(&e);
        let rows: Vec<serde_json::Value> = serde_json::from_slice(&e.stdout).unwrap();
        let overall = rows.iter().find(|r| r["name"] == "overall").unwrap();
        let flipped = overall["flipped_from_magnitude"].as_f64().unwrap();
        assert!((lo..=hi).contains(&flipped), "{init}: {flipped}");
        assert_eq!(overall["flipped_from_initial"], 0.0, "{init}");
        assert!((overall["sparsity"].as_f64().unwrap() - 0.1).abs() < 1e-3);
        assert_eq!(rows.iter().filter(|r| r["name"].as_str().unwrap().starts_with("layer ")).count(), 2);
    }
    // Learning moves the masks away from where they started; a run's best/ finds the run's
    // initial masks one folder up.
    let out = tmp.path().join("learning");
    let valid = fixtures().join("corpus/en/dev.tsv");
    let mut args = vec!["train", "--model", "tests/fixtures/base-like", "--train", s(&train), "--valid", s(&valid), "--out", s(&out)];
    args.extend(["--steps", "10", "--lr", "1e-2", "--skip-unknown"]);
    args.extend(PLAIN);
    ok(&engine(&args));
    let e = engine(&["masks", "stats", "--model", "tests/fixtures/base-like", "--json", s(&out.join("best"))]);
    ok(&e);
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&e.stdout).unwrap();
    let moved = rows.iter().find(|r| r["name"] == "overall").unwrap()["flipped_from_initial"].as_f64().unwrap();
    assert!(moved > 0.0 && moved < 0.2, "{moved}");
    let e = engine(&["masks", "stats", "--model", "tests/fixtures/large-like", s(&tmp.path().join("random"))]);
    fails_with(&e, "is for [50, 36], the weight is");
}

/// `engine masks compare` on masks learned for three languages: cosine 1 for a set with itself,
/// chance level sqrt(k_a k_b), per-layer rows, phonetic similarity from the vocabularies, and a
/// correlation row per scope; the CSV has a row per (pair, scope).
#[test]
fn masks_compare_reports_similarity_chance_and_correlation() {
    let tmp = tempfile::tempdir().unwrap();
    let mut dirs = Vec::new();
    for lang in ["en", "es", "fr"] {
        let out = tmp.path().join(lang);
        let train = fixtures().join(format!("corpus/{lang}/train.tsv"));
        let mut args = vec!["train", "--model", "tests/fixtures/base-like", "--train", s(&train), "--out", s(&out), "--steps", "3"];
        args.extend(["--lr", "1e-2", "--sparsity", "0.1"]);
        args.extend(PLAIN);
        ok(&engine(&args));
        dirs.push(format!("{lang}={}", out.display()));
    }
    let csv = tmp.path().join("pairs.csv");
    let plots = tmp.path().join("plots");
    let mut args = vec!["masks", "compare", "--json", "--permutations", "200", "--csv", s(&csv), "--plots", s(&plots)];
    args.extend(dirs.iter().map(String::as_str));
    let e = engine(&args);
    ok(&e);
    let v: serde_json::Value = serde_json::from_slice(&e.stdout).unwrap();
    let pairs = v["pairs"].as_array().unwrap();
    assert_eq!(pairs.len(), 3);
    for p in pairs {
        let (c, chance) = (p["cosine"].as_f64().unwrap(), p["chance"].as_f64().unwrap());
        assert!((chance - 0.9).abs() < 1e-3, "{chance}");
        assert!(c > chance && c <= 1.0, "{c}");
        assert_eq!(p["layers"].as_array().unwrap().len(), 2);
        assert_eq!(p["matrices"].as_array().unwrap().len(), 4);
        let ph = p["phonetic"].as_f64().unwrap();
        assert!(ph > 0.0 && ph < 1.0, "{ph}");
    }
    assert_eq!(v["correlation"].as_array().unwrap().len(), 3, "overall and two layers");
    assert_eq!(std::fs::read_to_string(&csv).unwrap().lines().count(), 1 + 3 * (1 + 2 + 4));
    for (fig, shapes, (w, h)) in [("layers", 3 * 2, (262, 248)), ("matrix", 3 * 3, (318, 248)), ("scatter", 3, (560, 420))] {
        let text = std::fs::read_to_string(plots.join(format!("{fig}.svg"))).unwrap();
        assert!(text.starts_with("<svg") && text.ends_with("</svg>\n"), "{fig}");
        assert_eq!(text.matches("<rect x=").count() + text.matches("<circle").count(), shapes + (fig == "scatter") as usize, "{fig}");
        let png = resvg::tiny_skia::Pixmap::decode_png(&std::fs::read(plots.join(format!("{fig}.png"))).unwrap()).unwrap();
        assert_eq!((png.width(), png.height()), (w, h), "{fig}.png");
    }
    // An inventory file replaces a set's vocabulary: identical inventories have similarity 1.
    let inv = tmp.path().join("es.txt");
    std::fs::write(&inv, std::fs::read_to_string(fixtures().join("corpus/en/train.phn")).unwrap()).unwrap();
    let mut args = vec!["masks", "compare", "--json", "--permutations", "10"];
    let spec = format!("es={}", inv.display());
    args.extend(["--inventory", spec.as_str()]);
    args.extend(dirs.iter().map(String::as_str));
    let e = engine(&args);
    ok(&e);
    let v: serde_json::Value = serde_json::from_slice(&e.stdout).unwrap();
    let en_es = v["pairs"].as_array().unwrap().iter().find(|p| p["a"] == "en" && p["b"] == "es").unwrap();
    assert!((en_es["phonetic"].as_f64().unwrap() - 1.0).abs() < 1e-12, "{en_es}");
    fails_with(&engine(&["masks", "compare", "--inventory", "xx=f", &dirs[0], &dirs[1]]), "no mask set is named \"xx\"");
    let en = tmp.path().join("en");
    let e = engine(&["masks", "compare", "--json", s(&en), s(&en)]);
    ok(&e);
    let v: serde_json::Value = serde_json::from_slice(&e.stdout).unwrap();
    assert_eq!(v["pairs"][0]["cosine"], 1.0);
    let attention = tmp.path().join("attention");
    let train = fixtures().join("corpus/en/train.tsv");
    let mut args = vec!["train", "--model", "tests/fixtures/base-like", "--train", s(&train), "--out", s(&attention), "--steps", "1"];
    args.extend(["--mask", "attention"]);
    args.extend(PLAIN);
    ok(&engine(&args));
    fails_with(&engine(&["masks", "compare", s(&en), s(&attention)]), "cover different matrices");
}

/// HuBERT, UniSpeech-SAT, MMS (through its adapters) and data2vec-audio: masks learned (over
/// bare encoder checkpoints, as facebook/hubert-base-ls960 and facebook/data2vec-audio-base are
/// stored) with a fresh head, and
/// `masks apply` writes a `*ForCTC` folder of the family, under its own tensor names, that runs
/// as the masked model.
#[test]
fn masks_learned_on_other_families_apply_to_a_folder_of_that_family() {
    for (model, model_type, class, prefix) in [
        ("hubert-bare", "hubert", "HubertForCTC", "hubert."),
        ("unispeech-sat-like", "unispeech-sat", "UniSpeechSatForCTC", "unispeech_sat."),
        ("mms-like", "wav2vec2", "Wav2Vec2ForCTC", "wav2vec2."),
        ("data2vec-bare", "data2vec-audio", "Data2VecAudioForCTC", "data2vec_audio."),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let model = format!("tests/fixtures/{model}");
        let train = small_manifest(tmp.path(), 4);
        let run = tmp.path().join("run");
        let mut args = vec!["train", "--model", &model, "--train", s(&train), "--out", s(&run), "--steps", "3"];
        args.extend(PLAIN);
        ok(&engine(&args));
        let folder = tmp.path().join("masked");
        ok(&engine(&["masks", "apply", "--model", &model, "--masks", s(&run), "--out", s(&folder)]));
        let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(folder.join("config.json")).unwrap()).unwrap();
        assert_eq!((config["model_type"].as_str(), config["architectures"][0].as_str()), (Some(model_type), Some(class)));
        let bytes = std::fs::read(folder.join("model.safetensors")).unwrap();
        let names: Vec<String> = safetensors::SafeTensors::deserialize(&bytes).unwrap().names().into_iter().map(str::to_string).collect();
        assert!(names.iter().all(|n| n.starts_with(prefix) || n.starts_with("lm_head.")), "{names:?}");
        let wav = "tests/fixtures/corpus/en/audio/en_dev_00000.flac";
        let applied = engine(&["infer", "--model", s(&folder), wav]);
        let masked = engine(&["infer", "--model", &model, "--masks", s(&run), wav]);
        ok(&applied);
        ok(&masked);
        assert_eq!(applied.stdout, masked.stdout, "{model}");
    }
}

/// `--init-scores`: a run started from another run's scores starts from its masks exactly (the
/// matrices it masked; the others by --init), and refuses a run over other weights, a folder
/// without scores, and weight finetuning.
#[test]
fn init_scores_carry_a_runs_masks_over() {
    let tmp = tempfile::tempdir().unwrap();
    let train = small_manifest(tmp.path(), 3);
    let run = |out: &Path, model: &str, extra: &[&str]| {
        let mut args = vec!["train", "--model", model, "--train", s(&train), "--out", s(out), "--steps", "2", "--sparsity", "0.3"];
        args.extend(PLAIN);
        args.extend(extra);
        engine(&args)
    };
    let first = tmp.path().join("first");
    ok(&run(&first, "tests/fixtures/base-like", &[]));
    let masks = |path: &Path| {
        let bytes = std::fs::read(path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut named: Vec<(String, Vec<u8>)> = st.tensors().into_iter().map(|(n, t)| (n, t.data().to_vec())).collect();
        named.sort();
        named
    };
    let learned = masks(&first.join("masks.safetensors"));
    assert_eq!(learned.len(), 4);

    let second = tmp.path().join("second");
    let o = run(&second, "tests/fixtures/base-like", &["--init-scores", s(&first), "--mask", "all"]);
    ok(&o);
    assert!(String::from_utf8_lossy(&o.stderr).contains("scores of 4 of 12 masked matrices"), "{}", String::from_utf8_lossy(&o.stderr));
    let initial = masks(&second.join("initial_masks.safetensors"));
    assert_eq!(initial.len(), 12);
    for (name, bits) in &learned {
        let carried = &initial.iter().find(|(n, _)| n == name).unwrap().1;
        assert_eq!(carried, bits, "{name}: the second run starts from the first's mask");
    }

    // Another architecture, and the same one with other weights.
    fails_with(&run(&tmp.path().join("large"), "tests/fixtures/large-like", &["--init-scores", s(&first)]), "masks from another model");
    fails_with(&run(&tmp.path().join("hubert"), "tests/fixtures/hubert-like", &["--init-scores", s(&first)]), "other weights");
    fails_with(
        &run(&tmp.path().join("none"), "tests/fixtures/base-like", &["--init-scores", "tests/fixtures/base-like-masks"]),
        "no scores",
    );
    let mut ft = vec!["finetune", "--model", "tests/fixtures/base-like", "--train", s(&train), "--out"];
    let ft_out = tmp.path().join("ft");
    ft.extend([s(&ft_out), "--init-scores", s(&first)]);
    ft.extend(PLAIN);
    fails_with(&engine(&ft), "this run trains weights");
}

/// `--config`: a run's train_config.json replays the run bit for bit; flags after it override
/// it; a recipe of the other subcommand is refused.
#[test]
fn config_replays_a_recipe_and_flags_override_it() {
    let tmp = tempfile::tempdir().unwrap();
    let train = small_manifest(tmp.path(), 3);
    let first = tmp.path().join("first");
    let mut args = vec!["train", "--model", "tests/fixtures/base-like", "--train", s(&train), "--out", s(&first)];
    args.extend(["--steps", "2", "--sparsity", "0.3", "--seed", "5", "--init", "random", "--mask", "all"]);
    args.extend(PLAIN);
    ok(&engine(&args));
    let recipe = first.join("train_config.json");
    let json = |dir: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join("train_config.json")).unwrap()).unwrap()
    };

    let replay = tmp.path().join("replay");
    let o = engine(&["train", "--config", s(&recipe), "--out", s(&replay)]);
    ok(&o);
    assert!(String::from_utf8_lossy(&o.stderr).contains("recipe from"));
    assert_eq!(json(&replay), json(&first));
    for f in ["scores.safetensors", "masks.safetensors", "head.safetensors"] {
        assert!(std::fs::read(first.join(f)).unwrap() == std::fs::read(replay.join(f)).unwrap(), "{f} differs in the replay");
    }

    let changed = tmp.path().join("changed");
    ok(&engine(&["train", "--config", s(&recipe), "--out", s(&changed), "--seed", "9", "--steps=1"]));
    let (mut want, got) = (json(&first), json(&changed));
    want["seed"] = 9.into();
    want["steps"] = 1.into();
    assert_eq!(got, want, "only the flags typed after --config change");

    fails_with(&engine(&["finetune", "--config", s(&recipe), "--out", s(&tmp.path().join("ft"))]), "engine train");
}

/// MMS `--target-lang`: masks learned over language xyz's adapters record it, and `eval`,
/// `infer` and `masks apply` run them over xyz's adapters without being told (`eval` measures the
/// run's own validation numbers), refuse the other adapters, and refuse to share a batch with
/// other tasks; a run over the default adapters learns over another model (other numbers).
#[test]
fn mms_masks_remember_their_language() {
    let tmp = tempfile::tempdir().unwrap();
    let model = "tests/fixtures/mms-like";
    let train = small_manifest(tmp.path(), 4);
    let run = |out: &Path, extra: &[&str]| {
        let mut args = vec!["train", "--model", model, "--train", s(&train), "--valid", s(&train), "--out", s(out), "--steps", "2"];
        args.extend(PLAIN);
        args.extend(extra);
        ok(&engine(&args));
        serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(out.join("best/valid.json")).unwrap()).unwrap()
    };
    let (xyz, default) = (tmp.path().join("xyz"), tmp.path().join("default"));
    let (valid_xyz, valid_default) = (run(&xyz, &["--target-lang", "xyz"]), run(&default, &[]));
    assert_eq!(MaskSet::load(&xyz).unwrap().target_lang.as_deref(), Some("xyz"));
    assert_eq!(MaskSet::load(&default).unwrap().target_lang, None);
    assert_ne!(valid_xyz["loss"], valid_default["loss"], "the two runs ran the same adapters");
    let eval = |masks: &Path, extra: &[&str]| {
        let mut args = vec!["eval", "--model", model, "--masks", s(masks), "--data", s(&train), "--labels", "phn", "--json"];
        args.extend(extra);
        engine(&args)
    };
    for (masks, valid) in [(&default, &valid_default), (&xyz, &valid_xyz)] {
        let e = eval(&masks.join("best"), &[]);
        ok(&e);
        let report: serde_json::Value = serde_json::from_slice(&e.stdout).unwrap();
        for key in ["wer", "uer", "loss"] {
            assert_eq!(report[key], valid[key], "{}: {key}", masks.display());
        }
    }
    fails_with(&eval(&xyz, &["--target-lang", "eng"]), "learned with --target-lang xyz");
    fails_with(&eval(&default, &["--target-lang", "xyz"]), "default adapters");

    // masks apply: xyz's adapters become the folder's own.
    let folder = tmp.path().join("applied");
    ok(&engine(&["masks", "apply", "--model", model, "--masks", s(&xyz), "--out", s(&folder)]));
    let wav = "tests/fixtures/corpus/en/audio/en_dev_00000.flac";
    let applied = engine(&["infer", "--model", s(&folder), wav]);
    let masked = engine(&["infer", "--model", model, "--masks", s(&xyz), wav]);
    ok(&applied);
    ok(&masked);
    assert_eq!(applied.stdout, masked.stdout);

    let tasks = [format!("x={}", xyz.display()), format!("d={}", default.display())];
    let multi = engine(&["infer", "--model", model, "--masks", &tasks[0], "--masks", &tasks[1], &format!("{wav}@x")]);
    fails_with(&multi, "--target-lang xyz");
}

/// `--vocab dict.phn.txt`: a fairseq dictionary gives the task vocabulary `engine vocab --dict`
/// makes of it (the specials, then its symbols in file order).
#[test]
fn a_fairseq_dictionary_is_a_task_vocabulary() {
    let tmp = tempfile::tempdir().unwrap();
    let train = small_manifest(tmp.path(), 3);
    let built = tmp.path().join("built.json");
    ok(&engine(&["vocab", "--data", s(&train), "--labels", "phn", "--out", s(&built)]));
    let map: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(&built).unwrap()).unwrap();
    let mut symbols: Vec<(&String, u64)> = map.iter().map(|(t, id)| (t, id.as_u64().unwrap())).filter(|(_, id)| *id >= 4).collect();
    // Another order than the built one: the dictionary's order must be the one kept.
    symbols.sort_by_key(|&(_, id)| std::cmp::Reverse(id));
    let dict = tmp.path().join("dict.phn.txt");
    std::fs::write(&dict, symbols.iter().map(|(t, _)| format!("{t} 1\n")).collect::<String>()).unwrap();
    let out = tmp.path().join("run");
    let mut args = vec!["train", "--model", "tests/fixtures/base-like", "--train", s(&train), "--out", s(&out), "--steps", "1"];
    args.extend(["--vocab", s(&dict)]);
    args.extend(PLAIN);
    ok(&engine(&args));
    let converted = tmp.path().join("converted.json");
    ok(&engine(&["vocab", "--dict", s(&dict), "--out", s(&converted)]));
    let read = |p: &Path| serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(p).unwrap()).unwrap();
    assert_eq!(read(&out.join("vocab.json")), read(&converted));
    assert_ne!(read(&out.join("vocab.json")), read(&built));
}
