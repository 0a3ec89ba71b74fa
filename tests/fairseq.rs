//! `engine convert`: fairseq wav2vec 2.0 checkpoints, written by fairseq 0.12.2 itself, against
//! what fairseq's modules compute from them (tools/make_fairseq_fixtures.py).

mod common;

use std::path::{Path, PathBuf};

use common::cli::{engine, fails_with, ok, s};
use common::{fixtures, rel_l2, utterances};
use s3router::backend::cpu::CpuBackend;
use s3router::data::audio;
use s3router::mask::unpack;
use s3router::model::checkpoint::Checkpoint;
use s3router::model::config::Family;
use s3router::model::fairseq::{convert, Kind};
use s3router::model::masks::MaskSet;
use s3router::model::preprocess::Preprocessor;
use s3router::model::vocab::Vocab;
use s3router::model::Wav2Vec2;

const TOL: f64 = 1e-4;

fn fairseq(name: &str) -> PathBuf {
    fixtures().join("fairseq").join(name)
}

fn dict() -> PathBuf {
    fairseq("dict.ltr.txt")
}

fn reference(name: &str) -> Vec<f32> {
    let ck = Checkpoint::open(&[fairseq("reference.safetensors")]).unwrap();
    ck.tensor(name).unwrap().to_vec().unwrap()
}

/// The test utterances as the converted folder's preprocessor gives them to the model.
fn inputs(folder: &Path) -> Vec<Vec<f32>> {
    let pre = Preprocessor::load(folder).unwrap();
    utterances().iter().map(|p| pre.apply(audio::load(p).unwrap())).collect()
}

/// Runs each test utterance through `model` (preprocessed as the converted folder `out` says)
/// and compares its `what` (`encoder_out` or `logits`) with fairseq's `name.utt<i>.<what>`.
fn matches_fairseq(model: &Wav2Vec2, out: &Path, name: &str, what: &str) {
    let be = CpuBackend;
    for (u, x) in inputs(out).iter().enumerate() {
        let got = match what {
            "logits" => model.logits(&be, &[x], None).unwrap().0,
            _ => model.encode(&be, &[x], None).unwrap().0,
        };
        let err = rel_l2(&got.to_vec().unwrap(), &reference(&format!("{name}.utt{u}.{what}")));
        assert!(err <= TOL, "{name} utt{u} {what}: rel L2 {err:.2e}");
    }
}

/// Converts `checkpoint` into a new folder in a temporary directory.
fn converted(checkpoint: &str, dict: Option<&Path>) -> (tempfile::TempDir, PathBuf, Kind) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("model");
    let c = convert(&fairseq(checkpoint), dict, &out).unwrap();
    (tmp, out, c.kind)
}

/// Pretrained models encode as fairseq encodes: wav2vec 2.0 base (group norm, post-LN, raw
/// audio; saved by fairseq's trainer, a quantizer to drop) and large (layer norm in every conv,
/// pre-LN, conv bias, normalised audio; an old `args` Namespace in PyTorch's format before 1.6),
/// HuBERT, and data2vec-audio (a stack of positional convs; its EMA teacher dropped), each
/// stored under its family's names.
#[test]
fn pretrained_checkpoints_encode_as_fairseq() {
    let be = CpuBackend;
    let cases = [
        ("pretrained-base", false, Family::Wav2Vec2),
        ("pretrained-large-legacy", true, Family::Wav2Vec2),
        ("pretrained-hubert", false, Family::Hubert),
        ("pretrained-data2vec", true, Family::Data2VecAudio),
    ];
    for (name, normalize, family) in cases {
        let (_tmp, out, kind) = converted(&format!("{name}.pt"), None);
        assert_eq!(kind, Kind::Pretrained);
        assert_eq!(Preprocessor::load(&out).unwrap().do_normalize, normalize, "{name}");
        let model = Wav2Vec2::load(&out, &be).unwrap();
        assert_eq!(model.config.family, family, "{name}");
        let stored = format!("{}.encoder.layer_norm.weight", family.prefix());
        let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
        assert!(safetensors::SafeTensors::deserialize(&bytes).unwrap().names().contains(&stored.as_str()), "{name}: no {stored}");
        assert!(model.lm_head.is_none());
        matches_fairseq(&model, &out, name, "encoder_out");
    }
}

/// A finetuned CTC model gives fairseq's logits, with the labels of its dictionary in fairseq's
/// order (the blank first, as `<pad>`); the dictionary is found where its run read it
/// (tests/fixtures/fairseq, its data folder) when --dict is not given.
#[test]
fn finetuned_checkpoint_gives_fairseq_logits_and_labels() {
    let be = CpuBackend;
    let (_tmp, out, kind) = converted("finetuned-ctc.pt", None);
    assert_eq!(kind, Kind::Finetuned { classes: 12 });
    let model = Wav2Vec2::load(&out, &be).unwrap();
    matches_fairseq(&model, &out, "finetuned-ctc", "logits");
    let vocab = Vocab::load(&out.join("vocab.json"), 12, 0).unwrap();
    let symbols: Vec<String> = std::fs::read_to_string(dict()).unwrap().lines().map(|l| l.split(' ').next().unwrap().to_string()).collect();
    assert_eq!(&vocab.tokens()[4..], &symbols[..]);
    assert_eq!((vocab.token(0), vocab.blank()), ("<pad>", 0));
}

/// S3-Router checkpoints: the masks are S3-Router's own top-k of |scores| at the run's
/// prune_rate (attention unmasked under fix_attn), and the masked model gives the logits fairseq
/// gives with those masks applied; over wav2vec 2.0 and over data2vec-audio (its recipe).
#[test]
fn s3router_checkpoints_give_their_masked_models_logits() {
    let be = CpuBackend;
    for (name, sparsity, masked) in [("s3router-ctc", 0.1, 4), ("s3router-p", 0.7, 12), ("s3router-data2vec", 0.1, 4)] {
        let (_tmp, out, kind) = converted(&format!("{name}.pt"), Some(&dict()));
        let Kind::S3Router { sparsity: got, masked: got_masked, masks } = kind else { panic!("{name}: {kind:?}") };
        assert!((got - sparsity).abs() < 1e-12 && got_masked == masked, "{name}: {got} {got_masked}");
        let set = MaskSet::load(&masks).unwrap();
        assert_eq!(set.masks.len(), masked);
        let ffn = ["fc1", "fc2"]
            .iter()
            .map(|m| (*m, format!("feed_forward.{}", if *m == "fc1" { "intermediate_dense" } else { "output_dense" })));
        let attn = "qkv".chars().map(|c| format!("{c}_proj")).chain(["out_proj".to_string()]);
        let mut pairs: Vec<(String, String)> = ffn.map(|(f, h)| (f.to_string(), h)).collect();
        if masked == 12 {
            pairs.extend(attn.map(|p| (format!("self_attn.{p}"), format!("attention.{p}"))));
        }
        for layer in 0..2 {
            for (fs, hf) in &pairs {
                let (shape, bits) = &set.masks[&format!("wav2vec2.encoder.layers.{layer}.{hf}.weight")];
                let keep = unpack(bits, shape.iter().product());
                let want = reference(&format!("{name}.keep.encoder.layers.{layer}.{fs}"));
                assert!(keep.iter().zip(&want).all(|(&k, &w)| k == (w == 1.0)), "{name} layer {layer} {fs}");
            }
        }
        let model = Wav2Vec2::load_masked(&out, Some(&set), &be).unwrap();
        matches_fairseq(&model, &out, name, "logits");
    }
}

/// The command as a user runs it: convert an S3-Router run, then transcribe with its masks; the
/// transcript is the greedy decoding of fairseq's masked logits in the dictionary's labels.
#[test]
fn convert_then_infer_transcribes_as_fairseq_decodes() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let d = dict();
    let run = engine(&["convert", s(&fairseq("s3router-ctc.pt")), "--dict", s(&d), "--out", s(&out)]);
    ok(&run);
    assert!(String::from_utf8_lossy(&run.stdout).contains("4 matrices masked"));
    let wav = &utterances()[2];
    let masks = out.join("masks");
    let infer = engine(&["infer", "--model", s(&out), "--masks", s(&masks), s(wav)]);
    ok(&infer);
    let stdout = String::from_utf8_lossy(&infer.stdout);
    let text = stdout.trim_end().split('\t').nth(1).unwrap_or("");
    let logits = reference("s3router-ctc.utt2.logits");
    let ids: Vec<u32> =
        logits.chunks(12).map(|row| row.iter().enumerate().fold(0, |best, (i, &v)| if v > row[best] { i } else { best }) as u32).collect();
    let vocab = Vocab::from_fairseq_dict(&d).unwrap();
    let mut collapsed = ids.clone();
    collapsed.dedup();
    collapsed.retain(|&i| i != 0);
    assert_eq!(text, vocab.text(&collapsed));
}

/// Wrong use and wrong files are refused by name, leaving no folder behind.
#[test]
fn bad_conversions_are_refused_and_leave_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let run = |pt: &Path, dict: Option<&Path>| {
        let mut args = vec!["convert", s(pt), "--out", s(&out)];
        if let Some(d) = dict {
            args.extend(["--dict", s(d)]);
        }
        engine(&args)
    };
    // S3-Router's data2vec run read its dictionary from /data, which is not here.
    fails_with(&run(&fairseq("s3router-data2vec.pt"), None), "it is not at /data/dict.ltr.txt");
    fails_with(&run(&fairseq("pretrained-base.pt"), Some(&dict())), "no CTC head");
    let short = tmp.path().join("dict.txt");
    std::fs::write(&short, "| 5\nE 3\n").unwrap();
    fails_with(&run(&fairseq("finetuned-ctc.pt"), Some(&short)), "the head has 12 outputs");
    // A Hugging Face state dict is not a fairseq checkpoint.
    let hf = fixtures().join("base-like-bin/pytorch_model.bin");
    fails_with(&run(&hf, None), "not a fairseq checkpoint");
    fails_with(&run(&fixtures().join("base-like/config.json"), None), "not a PyTorch file");
    // A checkpoint cut short, in both formats.
    for name in ["pretrained-large-legacy.pt", "pretrained-base.pt"] {
        let bytes = std::fs::read(fairseq(name)).unwrap();
        let cut = tmp.path().join(name);
        std::fs::write(&cut, &bytes[..bytes.len() - 1000]).unwrap();
        fails_with(&run(&cut, None), name);
    }
    assert!(!out.exists());
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().contains("converting")).count(),
        0
    );
    // A folder that holds something is not overwritten.
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    fails_with(&run(&fairseq("pretrained-base.pt"), None), "exists and is not empty");
    assert_eq!(std::fs::read_to_string(out.join("keep.txt")).unwrap(), "mine");
}

/// Damaged checkpoints, cut short or with bytes changed anywhere (pickles, zip directory,
/// storage headers), give an error or a folder, never a panic; in both PyTorch formats.
#[test]
fn damaged_checkpoints_never_panic() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["pretrained-large-legacy.pt", "finetuned-ctc.pt"] {
        let bytes = std::fs::read(fairseq(name)).unwrap();
        let damaged = tmp.path().join(name);
        let step = bytes.len() / 120;
        for (i, at) in (0..bytes.len()).step_by(step).enumerate() {
            for variant in [&bytes[..at], &[&bytes[..at], &[bytes[at] ^ 0x5a], &bytes[at + 1..]].concat()] {
                std::fs::write(&damaged, variant).unwrap();
                let out = tmp.path().join(format!("out{i}"));
                let _ = convert(&damaged, Some(&dict()), &out);
                let _ = std::fs::remove_dir_all(&out);
            }
        }
    }
}
