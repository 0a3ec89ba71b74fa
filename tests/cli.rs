//! `engine infer` end to end: transcripts, `--out`, and every bad input the user can give.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{copy_model, fixtures, reference, rel_l2, rewrite_tensors, utterances};
use s3router::model::checkpoint::Checkpoint;

fn engine(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_engine")).args(args).output().unwrap()
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// transformers' tokenizer output with special-token strings removed and spaces tidied.
fn expected_transcripts(model: &str) -> Vec<String> {
    let raw: Vec<String> =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join(model).join("transcripts.json")).unwrap()).unwrap();
    raw.iter()
        .map(|t| {
            let t = ["<s>", "</s>", "<unk>"].iter().fold(t.clone(), |t, s| t.replace(s, ""));
            t.split_whitespace().collect::<Vec<_>>().join(" ")
        })
        .collect()
}

#[test]
fn infer_prints_transformers_transcripts_and_writes_logits() {
    for model in ["base-like", "large-like", "hubert-like", "unispeech-sat-like", "data2vec-like"] {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("logits.safetensors");
        let wavs = utterances();
        let model_dir = fixtures().join(model);
        let mut args = vec!["infer", "--model", path_str(&model_dir), "--out", path_str(&out)];
        args.extend(wavs.iter().map(|p| path_str(p)));
        let o = engine(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let stdout = String::from_utf8(o.stdout).unwrap();
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(lines.len(), wavs.len());
        for ((line, wav), want) in lines.iter().zip(&wavs).zip(expected_transcripts(model)) {
            let (path, text) = line.split_once('\t').unwrap();
            assert_eq!(path, path_str(wav));
            assert_eq!(text, want, "{model}: transcript of {path}");
        }
        let logits = Checkpoint::open(&[out]).unwrap();
        for u in 0..wavs.len() {
            let t = logits.tensor(&format!("logits.{u}")).unwrap();
            let (want, shape) = reference(model, &format!("utt{u}.logits"));
            assert_eq!(t.shape(), &shape[..]);
            assert!(rel_l2(&t.to_vec().unwrap(), &want) <= 1e-4);
        }
    }
}

/// `--files-from LIST` (or standard input) adds to the files named on the command line, in order;
/// MP3 is read like the rest; an empty list is refused by name.
#[test]
fn infer_reads_file_lists() {
    let dir = tempfile::tempdir().unwrap();
    let model = path_str(&fixtures().join("base-like")).to_string();
    let wavs: Vec<String> = utterances().iter().map(|p| path_str(p).to_string()).collect();
    let mp3 = path_str(&fixtures().join("datasets/commonvoice/clips/cv_1.mp3")).to_string();
    let mut args = vec!["infer", "--model", &model, &wavs[0], &wavs[1], &wavs[2], &mp3];
    let direct = engine(&args);
    assert!(direct.status.success(), "{}", String::from_utf8_lossy(&direct.stderr));
    let list = dir.path().join("list.txt");
    std::fs::write(&list, format!("{}\n\n{}\n{}\n", wavs[1], wavs[2], mp3)).unwrap();
    let listed = engine(&["infer", "--model", &model, &wavs[0], "--files-from", path_str(&list)]);
    assert!(listed.status.success(), "{}", String::from_utf8_lossy(&listed.stderr));
    assert_eq!(listed.stdout, direct.stdout);
    let mut child = Command::new(env!("CARGO_BIN_EXE_engine"))
        .args(["infer", "--model", &model, "--files-from", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(format!("{}\n{}\n{}\n{}\n", wavs[0], wavs[1], wavs[2], mp3).as_bytes()).unwrap();
    assert_eq!(child.wait_with_output().unwrap().stdout, direct.stdout);
    std::fs::write(&list, "\n  \n").unwrap();
    args = vec!["infer", "--model", &model, "--files-from", path_str(&list)];
    let empty = engine(&args);
    let e = String::from_utf8_lossy(&empty.stderr);
    assert!(!empty.status.success() && e.contains("list.txt: the list names no files"), "{e}");
}

/// `--beam N` prints what the library's prefix beam search makes of the logits `--out` wrote,
/// through the model's vocabulary; `--beam 0` is refused.
#[test]
fn infer_decodes_by_beam_search_when_asked() {
    use s3router::ctc::beam::prefix_beam_search;
    use s3router::model::vocab::Vocab;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("logits.safetensors");
    let model = fixtures().join("base-like");
    let wavs = utterances();
    let mut args = vec!["infer", "--model", path_str(&model), "--out", path_str(&out), "--beam", "16"];
    args.extend(wavs.iter().map(|p| path_str(p)));
    let o = engine(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8(o.stdout).unwrap();
    let logits = Checkpoint::open(&[out]).unwrap();
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    let (vocab_size, blank) = (config["vocab_size"].as_u64().unwrap() as usize, config["pad_token_id"].as_u64().unwrap() as usize);
    let vocab = Vocab::load(&model.join("vocab.json"), vocab_size, blank).unwrap();
    assert_eq!(stdout.lines().count(), wavs.len());
    for (u, line) in stdout.lines().enumerate() {
        let scores = logits.tensor(&format!("logits.{u}")).unwrap().to_vec().unwrap();
        let best = prefix_beam_search(&scores, vocab_size, blank, 16).remove(0);
        assert_eq!(line.split_once('\t').unwrap().1, vocab.text(&best.ids), "utterance {u}");
    }
    let o = engine(&["infer", "--model", path_str(&model), "--beam", "0", path_str(&wavs[0])]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("--beam"), "{e}");
}

/// Runs `engine infer` expecting failure: one-line error naming `needle`, no panic, no output file.
fn assert_fails(model: &Path, audio: &[&Path], needle: &str) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let mut args = vec!["infer", "--model", path_str(model), "--out", path_str(&out)];
    args.extend(audio.iter().map(|p| path_str(p)));
    let o = engine(&args);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "expected failure ({needle}), got success");
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one-line error expected: {stderr}");
    assert!(stderr.contains(needle), "error should mention {needle:?}: {stderr}");
    assert!(!out.exists(), "no output may be written on failure");
}

#[test]
fn missing_folder_and_files() {
    let wav = &utterances()[0];
    assert_fails(Path::new("/nonexistent/model"), &[wav], "/nonexistent/model");
    for (file, needle) in [("config.json", "config.json"), ("model.safetensors", "model.safetensors"), ("vocab.json", "vocab.json")] {
        let (_d, m) = copy_model("base-like");
        std::fs::remove_file(m.join(file)).unwrap();
        assert_fails(&m, &[wav], needle);
    }
    let (_d, m) = copy_model("base-like");
    assert_fails(&m, &[&m.join("missing.wav")], "missing.wav");
}

#[test]
fn broken_config() {
    let wav = &utterances()[0];
    let (_d, m) = copy_model("base-like");
    std::fs::write(m.join("config.json"), "{ not json").unwrap();
    assert_fails(&m, &[wav], "not valid JSON");
    let (_d, m) = copy_model("base-like");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(m.join("config.json")).unwrap()).unwrap();
    cfg.as_object_mut().unwrap().remove("num_conv_pos_embeddings");
    std::fs::write(m.join("config.json"), cfg.to_string()).unwrap();
    assert_fails(&m, &[wav], "num_conv_pos_embeddings");
}

/// Rewrites a model.safetensors through `edit` (name -> (shape, f32 data)).
#[test]
fn tensor_missing_or_misshapen() {
    let wav = &utterances()[0];
    let name = "wav2vec2.encoder.layers.1.feed_forward.output_dense.weight";
    let (_d, m) = copy_model("base-like");
    rewrite_tensors(&m, |t| t.retain(|(n, _, _)| n != name));
    assert_fails(&m, &[wav], name);

    let (_d, m) = copy_model("base-like");
    rewrite_tensors(&m, |t| {
        let e = t.iter_mut().find(|(n, _, _)| n == name).unwrap();
        e.1 = vec![e.1[1], e.1[0]];
    });
    assert_fails(&m, &[wav], "[50, 36], but the config implies [36, 50]");
}

#[test]
fn truncated_or_corrupt_safetensors() {
    let wav = &utterances()[0];
    let (_d, m) = copy_model("base-like");
    let bytes = std::fs::read(m.join("model.safetensors")).unwrap();
    std::fs::write(m.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    assert_fails(&m, &[wav], "not a valid safetensors file");
    let mut garbage = bytes.clone();
    garbage[8..40].fill(b'#');
    std::fs::write(m.join("model.safetensors"), &garbage).unwrap();
    assert_fails(&m, &[wav], "not a valid safetensors file");
}

#[test]
fn bad_audio() {
    let m = fixtures().join("base-like");
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("readme.wav");
    std::fs::write(&text, "hello").unwrap();
    assert_fails(&m, &[&utterances()[0], &text], "not a WAV, FLAC or MP3 file");

    let spec = hound::WavSpec { channels: 1, sample_rate: 16000, bits_per_sample: 16, sample_format: hound::SampleFormat::Int };
    let empty = dir.path().join("empty.wav");
    hound::WavWriter::create(&empty, spec).unwrap().finalize().unwrap();
    assert_fails(&m, &[&empty], "no audio samples");

    // The base-like feature encoder (kernels 10, 3, 3, 2; strides 5, 2, 2, 2) needs 60 samples.
    let short = dir.path().join("short.wav");
    let mut w = hound::WavWriter::create(&short, spec).unwrap();
    (0..59).for_each(|i| w.write_sample((i * 100) as i16).unwrap());
    w.finalize().unwrap();
    assert_fails(&m, &[&short], "receptive field");
}

#[test]
fn vocab_that_does_not_match_the_model() {
    let (_d, m) = copy_model("base-like");
    std::fs::write(m.join("vocab.json"), r#"{"<pad>": 0, "a": 1, "b": 2}"#).unwrap();
    assert_fails(&m, &[&utterances()[0]], "vocab_size is 12");
}

#[test]
fn score_prints_sclite_table_and_alignments() {
    let dir = tempfile::tempdir().unwrap();
    let (r, h) = (dir.path().join("ref.txt"), dir.path().join("hyp.txt"));
    std::fs::write(&r, "The cat sat on the mat.\nhello world\n").unwrap();
    std::fs::write(&h, "the cat sit on mat\nhello world\n").unwrap();
    let o = engine(&["score", "--ref", path_str(&r), "--hyp", path_str(&h), "--lowercase", "--ignore", ".", "--alignments"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8(o.stdout).unwrap();
    // 8 reference words; 1 substitution + 1 deletion = 25% WER; 1 of 2 sentences wrong.
    assert!(out.contains("| words | 2 | 8 | 75.0 | 12.5 | 12.5 | 0.0 | 25.0 | 50.0 |"), "{out}");
    assert!(out.contains("REF: the cat SAT on THE mat") && out.contains("HYP: the cat SIT on *** mat"), "{out}");
    std::fs::write(&h, "only one line\n").unwrap();
    let o = engine(&["score", "--ref", path_str(&r), "--hyp", path_str(&h)]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("has 2 lines but"));
}

#[test]
fn infer_with_a_mask_set_uses_its_head_and_vocabulary() {
    let model = fixtures().join("base-like");
    let masks = fixtures().join("base-like-masks");
    let wav = &utterances()[0];
    let o = engine(&["infer", "--model", path_str(&model), "--masks", path_str(&masks), path_str(wav)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8(o.stdout).unwrap();
    let transcript = text.trim().split_once('\t').unwrap().1;
    assert!(!transcript.is_empty() && transcript.chars().all(|c| "WXYZ ".contains(c)), "{transcript:?}");
    // A folder that is not a mask set.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(model.join("model.safetensors"), dir.path().join("masks.safetensors")).unwrap();
    let o = engine(&["infer", "--model", path_str(&model), "--masks", path_str(dir.path()), path_str(wav)]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("is not \"s3router-masks-v1\""), "{e}");
}

/// `engine masks apply`: the folder it writes runs, unmasked, as transformers ran the masked
/// model (the fixture's reference logits), and holds exactly the mask's zeros in each masked
/// weight; an occupied output folder or a model the masks do not fit is refused.
#[test]
fn masks_apply_writes_the_masked_model_as_a_plain_folder() {
    let model = fixtures().join("base-like");
    let masks = fixtures().join("base-like-masks");
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("masked");
    let o = engine(&["masks", "apply", "--model", path_str(&model), "--masks", path_str(&masks), "--out", path_str(&folder)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let logits = dir.path().join("logits.safetensors");
    let wavs = utterances();
    let mut args = vec!["infer", "--model", path_str(&folder), "--out", path_str(&logits)];
    args.extend(wavs.iter().map(|p| path_str(p)));
    let o = engine(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = Checkpoint::open(&[logits]).unwrap();
    for u in 0..wavs.len() {
        let (want, shape) = reference("base-like-masks", &format!("utt{u}.logits"));
        let t = got.tensor(&format!("logits.{u}")).unwrap();
        assert_eq!(t.shape(), &shape[..]);
        assert!(rel_l2(&t.to_vec().unwrap(), &want) <= 1e-4, "utterance {u}");
    }
    let set = s3router::model::masks::MaskSet::load(&masks).unwrap();
    let (written, base) = (Checkpoint::open_dir(&folder).unwrap(), Checkpoint::open_dir(&model).unwrap());
    for (name, (_, bits)) in &set.masks {
        let (w, b) = (written.tensor(name).unwrap().to_vec().unwrap(), base.tensor(name).unwrap().to_vec().unwrap());
        let keep = s3router::mask::unpack(bits, w.len());
        assert!(w.iter().zip(&b).zip(&keep).all(|((&w, &b), &k)| w == if k { b } else { 0.0 }), "{name}");
    }
    let o = engine(&["masks", "apply", "--model", path_str(&model), "--masks", path_str(&masks), "--out", path_str(&folder)]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("exists and is not empty"));
    let other = fixtures().join("large-like");
    let out = dir.path().join("other");
    let o = engine(&["masks", "apply", "--model", path_str(&other), "--masks", path_str(&masks), "--out", path_str(&out)]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("base-like-masks") && !out.exists(), "{e}");
    // A failure after the weights are written (an unreadable preprocessor config) leaves no
    // folder behind, half-written or staged.
    let (_keep, broken) = copy_model("base-like");
    std::fs::remove_file(broken.join("preprocessor_config.json")).unwrap();
    std::fs::create_dir(broken.join("preprocessor_config.json")).unwrap();
    let o = engine(&["masks", "apply", "--model", path_str(&broken), "--masks", path_str(&masks), "--out", path_str(&out)]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("preprocessor_config.json"), "{e}");
    let mut left: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|f| f.unwrap().file_name().to_string_lossy().into_owned()).collect();
    left.sort();
    assert_eq!(left, ["logits.safetensors", "masked"], "{e}");
}

/// Every subcommand, nested ones too, says in `--help` what it does (a doc comment clap
/// attaches to the wrong variant leaves one without and another with both).
#[test]
fn every_subcommand_has_a_description() {
    let mut pending = vec![Vec::<String>::new()];
    let mut seen = 0;
    while let Some(path) = pending.pop() {
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("--help");
        let o = engine(&args);
        assert!(o.status.success(), "engine {}", args.join(" "));
        let help = String::from_utf8(o.stdout).unwrap();
        let listed = help.lines().skip_while(|l| *l != "Commands:").skip(1).take_while(|l| l.starts_with("  "));
        for line in listed {
            let (name, about) = line.trim_start().split_once(' ').unwrap_or((line.trim(), ""));
            if name == "help" {
                continue;
            }
            assert!(!about.trim().is_empty(), "engine {} {name}: no description in --help", path.join(" "));
            pending.push(path.iter().cloned().chain([name.to_string()]).collect());
            seen += 1;
        }
    }
    assert!(seen >= 13, "only {seen} subcommands found");
}

/// MMS folders: one vocabulary per language, so a language must be chosen; with `--target-lang`
/// its adapters, head and vocabulary run (transformers' transcripts for the default language).
#[test]
fn mms_folders_run_the_chosen_language() {
    let dir = fixtures().join("mms-like");
    let wavs = utterances();
    let run = |extra: &[&str]| {
        let mut args = vec!["infer", "--model", path_str(&dir)];
        args.extend(extra);
        args.extend(wavs.iter().map(|p| path_str(p)));
        engine(&args)
    };
    let o = run(&[]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--target-lang"), "{}", String::from_utf8_lossy(&o.stderr));
    let o = run(&["--target-lang", "eng"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let texts: Vec<String> = String::from_utf8(o.stdout).unwrap().lines().map(|l| l.split_once('\t').unwrap().1.to_string()).collect();
    assert_eq!(texts, expected_transcripts("mms-like"));
    let o = run(&["--target-lang", "xyz"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let xyz = String::from_utf8(o.stdout).unwrap();
    assert!(xyz.lines().all(|l| l.split_once('\t').unwrap().1.chars().all(|c| "xy ".contains(c))), "{xyz}");
    let o = run(&["--target-lang", "abc"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("adapter.abc.safetensors"));
}

/// `--precision bf16` on the CPU: the demo backbone's transcripts as in f32 where the CPU has
/// AVX512-BF16, a refusal naming it where not; training refuses it on the CPU either way.
#[test]
fn cpu_bf16_inference_transcribes_as_f32() {
    let audio = ["weights/demo-corpus/es/audio/es_dev_00017.flac", "weights/demo-corpus/es/audio/es_dev_00035.flac"];
    let run = |precision: &str| engine(&[&["infer", "--model", "weights/s3r-demo-en", "--precision", precision][..], &audio].concat());
    let (f32_run, bf16_run) = (run("f32"), run("bf16"));
    assert!(f32_run.status.success(), "{}", String::from_utf8_lossy(&f32_run.stderr));
    if s3router::backend::cpu::gemm_bf16::available() {
        assert!(bf16_run.status.success(), "{}", String::from_utf8_lossy(&bf16_run.stderr));
        assert_eq!(String::from_utf8_lossy(&bf16_run.stdout), String::from_utf8_lossy(&f32_run.stdout));
    } else {
        assert!(!bf16_run.status.success() && String::from_utf8_lossy(&bf16_run.stderr).contains("AVX512-BF16"));
    }
    let train = engine(&["train", "--precision", "bf16", "--steps", "1"]);
    assert!(!train.status.success() && String::from_utf8_lossy(&train.stderr).contains("needs --device cuda"));
}
