//! The CPU model against transformers' outputs (tools/make_fixtures.py), for both architectures,
//! both weight-norm spellings, f16-stored weights, HuBERT (tools/make_hubert_fixtures.py),
//! UniSpeech and UniSpeech-SAT (tools/make_unispeech_fixtures.py), data2vec-audio
//! (tools/make_data2vec_fixtures.py), `pytorch_model.bin` files
//! (tools/make_torch_bin_fixtures.py), and batched against alone.

mod common;

use common::{fixtures, inputs, reference, rel_l2};
use s3router::backend::cpu::CpuBackend;
use s3router::model::masks::MaskSet;
use s3router::model::{Trace, Wav2Vec2};

const TOL: f64 = 1e-4;

/// Runs each utterance alone and compares logits and every recorded intermediate.
fn check_alone(model_dir: &str, reference_dir: &str) {
    let be = CpuBackend;
    let model = Wav2Vec2::load(&fixtures().join(model_dir), &be).unwrap();
    for (u, x) in inputs(model_dir).iter().enumerate() {
        let mut trace = Trace::tensors();
        let (logits, _) = model.logits(&be, &[x], Some(&mut trace)).unwrap();
        let mut got =
            vec![("logits", logits), ("conv_features", trace.conv_features.unwrap()), ("encoder_out", trace.encoder_out.unwrap())];
        let layers: Vec<String> = (0..trace.layers.len()).map(|j| format!("layer{j}")).collect();
        for (j, t) in trace.layers.into_iter().enumerate() {
            got.push((layers[j].as_str(), t));
        }
        for (name, t) in got {
            let (want, shape) = reference(reference_dir, &format!("utt{u}.{name}"));
            assert_eq!(t.shape(), &shape[..], "{model_dir} utt{u} {name} shape");
            let err = rel_l2(&t.to_vec().unwrap(), &want);
            assert!(err <= TOL, "{model_dir} utt{u} {name}: rel L2 {err:.2e} > {TOL:.0e}");
        }
    }
}

#[test]
fn base_like_matches_transformers() {
    check_alone("base-like", "base-like");
}

#[test]
fn large_like_matches_transformers() {
    check_alone("large-like", "large-like");
}

#[test]
fn old_weight_norm_spelling_matches_transformers() {
    check_alone("base-like-other-wn", "base-like");
}

#[test]
fn f16_stored_weights_match_transformers() {
    check_alone("base-like-f16", "base-like-f16");
}

#[test]
fn bf16_stored_weights_match_transformers() {
    check_alone("base-like-bf16", "base-like-bf16");
}

/// `pytorch_model.bin` (`torch.save` of a state dict) instead of safetensors: f32 in one file;
/// bf16 in two shards with an index, q/k/v weights at offsets into one storage.
#[test]
fn pytorch_weight_files_match_transformers() {
    check_alone("base-like-bin", "base-like");
    check_alone("base-like-bf16-bin-sharded", "base-like-bf16");
}

/// A checkpoint without a CTC head loads, encodes utterance 0 as `reference_dir`'s model does,
/// and refuses to give logits.
fn encodes_without_a_head(model_dir: &str, reference_dir: &str) {
    let be = CpuBackend;
    let model = Wav2Vec2::load(&fixtures().join(model_dir), &be).unwrap();
    assert!(model.lm_head.is_none());
    let x = &inputs(model_dir)[0];
    let (enc, _) = model.encode(&be, &[x], None).unwrap();
    let (want, _) = reference(reference_dir, "utt0.encoder_out");
    assert!(rel_l2(&enc.to_vec().unwrap(), &want) <= TOL, "{model_dir}");
    let err = model.logits(&be, &[x], None).unwrap_err().to_string();
    assert!(err.contains("lm_head"), "{err}");
}

#[test]
fn pretraining_checkpoint_loads_and_encodes_without_a_head() {
    encodes_without_a_head("base-like-pretraining", "base-like");
}

#[test]
fn hubert_matches_transformers() {
    check_alone("hubert-like", "hubert-like");
}

/// A bare `HubertModel` checkpoint (no `hubert.` prefix, no head), as facebook/hubert-base-ls960
/// is stored, holds hubert-like's encoder; a tensor it lacks is named as it would store it.
#[test]
fn bare_hubert_checkpoint_loads_and_encodes_without_a_head() {
    encodes_without_a_head("hubert-bare", "hubert-like");
    let be = CpuBackend;
    for (name, drop) in [("hubert-bare", "encoder.layers.1.final_layer_norm.weight"), ("hubert-like", "hubert.encoder.layer_norm.bias")] {
        let (_dir, copy) = common::copy_model(name);
        let path = copy.join("model.safetensors");
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let kept: Vec<_> = st.tensors().into_iter().filter(|(n, _)| n != drop).collect();
        safetensors::serialize_to_file(kept, None, &path).unwrap();
        let err = format!("{:#}", Wav2Vec2::load(&copy, &be).err().unwrap());
        assert!(err.contains(&format!("tensor \"{drop}\" is missing")), "{err}");
    }
}

/// UniSpeech (post-LN) and UniSpeech-SAT (pre-LN): wav2vec2's modules under their own names.
#[test]
fn unispeech_families_match_transformers() {
    check_alone("unispeech-like", "unispeech-like");
    check_alone("unispeech-sat-like", "unispeech-sat-like");
}

/// MMS: the attention adapter after every pre-LN layer (the default language's, in the
/// weights), and another language's adapters and head from adapter.xyz.safetensors, as
/// transformers' load_adapter swaps them in (tools/make_mms_fixtures.py).
#[test]
fn mms_adapters_match_transformers() {
    check_alone("mms-like", "mms-like");
    let be = CpuBackend;
    let dir = fixtures().join("mms-like");
    let model = Wav2Vec2::load_language(&dir, Some("xyz"), None, &be).unwrap();
    let xyz = s3router::model::checkpoint::Checkpoint::open(&[dir.join("reference-xyz.safetensors")]).unwrap();
    for (u, x) in inputs("mms-like").iter().enumerate() {
        let (logits, _) = model.logits(&be, &[x], None).unwrap();
        let want = xyz.tensor(&format!("utt{u}.logits")).unwrap();
        assert_eq!(logits.shape(), want.shape());
        let err = rel_l2(&logits.to_vec().unwrap(), &want.to_vec().unwrap());
        assert!(err <= TOL, "xyz utt{u}: rel L2 {err:.2e}");
    }
}

/// data2vec-audio: layer norm in every conv, a stack of positional convs with parameter-free
/// norms (even kernel), conv bias, `data2vec_audio.` names.
#[test]
fn data2vec_audio_matches_transformers() {
    check_alone("data2vec-like", "data2vec-like");
}

/// A bare `Data2VecAudioModel` checkpoint (no prefix, no head), as facebook/data2vec-audio-base
/// is stored, holds data2vec-like's encoder.
#[test]
fn bare_data2vec_audio_checkpoint_loads_and_encodes_without_a_head() {
    encodes_without_a_head("data2vec-bare", "data2vec-like");
}

/// An utterance's logits do not depend on the batch it shares (padding never leaks).
#[test]
fn batched_equals_alone() {
    let be = CpuBackend;
    for name in ["base-like", "large-like", "data2vec-like"] {
        let model = Wav2Vec2::load(&fixtures().join(name), &be).unwrap();
        let xs = inputs(name);
        let refs: Vec<&[f32]> = xs.iter().map(|x| x.as_slice()).collect();
        let (batched, seqs) = model.logits(&be, &refs, None).unwrap();
        let batched = batched.to_vec().unwrap();
        let vocab = model.config.vocab_size;
        for (u, x) in xs.iter().enumerate() {
            let (alone, _) = model.logits(&be, &[x], None).unwrap();
            let r = seqs.range(u);
            let err = rel_l2(&batched[r.start * vocab..r.end * vocab], &alone.to_vec().unwrap());
            assert!(err <= 1e-6, "{name} utt{u}: batched vs alone rel L2 {err:.2e}");
        }
    }
}

/// A mask set (s3router-masks-v1) over base-like: masked FFN weights and a new head, against
/// transformers running the same masked model; also over the same weights stored with the old
/// weight-norm spelling (`weight_g`/`weight_v`, as facebook/wav2vec2-base stores them), which the
/// set's head must not hide.
#[test]
fn masked_model_matches_transformers() {
    let be = CpuBackend;
    let masks = MaskSet::load(&fixtures().join("base-like-masks")).unwrap();
    assert_eq!(masks.masks.len(), 4);
    assert_eq!(masks.sparsity, Some(0.1));
    for model_dir in ["base-like", "base-like-other-wn"] {
        let model = Wav2Vec2::load_masked(&fixtures().join(model_dir), Some(&masks), &be).unwrap();
        assert_eq!(model.config.vocab_size, 9);
        for (u, x) in inputs("base-like").iter().enumerate() {
            let (logits, _) = model.logits(&be, &[x], None).unwrap();
            let (want, shape) = reference("base-like-masks", &format!("utt{u}.logits"));
            assert_eq!(logits.shape(), &shape[..]);
            let err = rel_l2(&logits.to_vec().unwrap(), &want);
            assert!(err <= TOL, "{model_dir} masked utt{u}: rel L2 {err:.2e}");
        }
    }
}

#[test]
fn masks_for_another_model_are_refused() {
    let be = CpuBackend;
    let masks = MaskSet::load(&fixtures().join("base-like-masks")).unwrap();
    let e = Wav2Vec2::load_masked(&fixtures().join("large-like"), Some(&masks), &be).err().unwrap().to_string();
    assert!(e.contains("is for a [50, 36] weight, but the model's is [72, 40]"), "{e}");
}

#[test]
fn saved_mask_sets_load_back() {
    let dir = tempfile::tempdir().unwrap();
    let keep: Vec<bool> = (0..50 * 36).map(|i| i % 7 != 0).collect();
    let name = "wav2vec2.encoder.layers.1.feed_forward.intermediate_dense.weight".to_string();
    MaskSet::save(dir.path(), &[(name.clone(), vec![50, 36], keep.clone())], 0.143, &Default::default()).unwrap();
    let back = MaskSet::load(dir.path()).unwrap();
    let (shape, bits) = &back.masks[&name];
    assert_eq!(shape, &vec![50, 36]);
    assert_eq!(s3router::mask::unpack(bits, keep.len()), keep);
    assert_eq!(back.sparsity, Some(0.143));
}
