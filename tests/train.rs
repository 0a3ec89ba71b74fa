//! Training pieces against PyTorch (tools/make_train_fixtures.py).

mod common;

use common::fixtures;
use s3router::train::adam::Adam;

#[test]
fn adam_follows_torch_optim_adam() {
    let f: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixtures().join("train.json")).unwrap()).unwrap();
    let a = &f["adam"];
    let floats = |v: &serde_json::Value| v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect::<Vec<_>>();
    let mut p = floats(&a["start"]);
    let mut adam = Adam::new(&[p.len()]);
    for (g, lr) in a["grads"].as_array().unwrap().iter().zip(a["lrs"].as_array().unwrap()) {
        adam.update(&mut [&mut p], &[Some(&floats(g))], lr.as_f64().unwrap());
    }
    for (got, want) in p.iter().zip(floats(&a["end"])) {
        assert!((got - want).abs() <= 1e-6 * want.abs().max(1.0), "{got} vs torch {want}");
    }
}

/// S3-Router gradients against PyTorch running the official masking rule in float64
/// (tools/make_train_fixtures.py): measured agreement ~3e-7.
#[test]
fn masked_step_gradients_match_pytorch() {
    use common::{rel_l2, utterances};
    use s3router::backend::cpu::CpuBackend;
    use s3router::ctc::{CtcTargets, Reduction};
    use s3router::data::audio;
    use s3router::data::dataset::LabelKind;
    use s3router::data::labels::Labeler;
    use s3router::model::checkpoint::Checkpoint;
    use s3router::model::preprocess::Preprocessor;
    use s3router::model::vocab::Vocab;
    use s3router::model::Wav2Vec2;
    use s3router::train::masked::{step, MaskScope, MaskedWeight, Regularisers, TimeMask};

    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixtures().join("train.json")).unwrap()).unwrap();
    let grads = Checkpoint::open(&[fixtures().join("train_grads.safetensors")]).unwrap();
    let be = CpuBackend;
    for key in ["base-like", "large-like", "base-like-specaug", "large-like-specaug"] {
        let name = key.trim_end_matches("-specaug");
        let dir = fixtures().join(name);
        let model = Wav2Vec2::load(&dir, &be).unwrap();
        let vocab = Vocab::load(&dir.join("vocab.json"), model.config.vocab_size, model.config.pad_token_id).unwrap();
        let pre = Preprocessor::load(&dir).unwrap();
        let m = &meta["masked"][key];
        let texts: Vec<&str> = m["transcripts"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
        let labels = Labeler::new(&vocab, LabelKind::Wrd, "", false).label_all(texts.into_iter()).unwrap();
        let masks: Vec<MaskedWeight> = (0..model.layers.len())
            .flat_map(|i| MaskScope::Ffn.parts().iter().map(move |&p| (i, p)))
            .map(|(i, p)| {
                let scores = grads.tensor(&format!("{name}/{}.scores", p.weight_name(i))).unwrap().to_vec().unwrap();
                MaskedWeight::new(&model, i, p, scores).unwrap()
            })
            .collect();
        let audio: Vec<Vec<f32>> = utterances().iter().map(|p| pre.apply(audio::load(p).unwrap())).collect();
        let inputs: Vec<&[f32]> = audio.iter().map(Vec::as_slice).collect();
        let targets = CtcTargets { labels: labels.tokens, blank: model.config.pad_token_id, zero_infinity: true };
        let head = model.lm_head.as_ref().unwrap();
        // Time masks (specaug cases): frame spans per utterance, over the packed frames.
        let lens = model.frame_counts(&audio.iter().map(Vec::len).collect::<Vec<_>>()).unwrap();
        let mut frames = Vec::new();
        if let Some(spans) = m["time_masks"].as_array() {
            for (u, spans) in spans.iter().enumerate() {
                let mut f = vec![false; lens[u]];
                for span in spans.as_array().unwrap() {
                    let (a, b) = (span[0].as_u64().unwrap() as usize, span[1].as_u64().unwrap() as usize);
                    f[a..b].iter_mut().for_each(|x| *x = true);
                }
                frames.extend(f);
            }
        }
        let embedding = grads.tensor(&format!("{key}/masked_spec_embed")).ok().map(|t| t.to_vec().unwrap());
        let time_mask = embedding.as_deref().map(|e| TimeMask { frames: &frames, embedding: e });
        let reg = Regularisers { time_mask, ..Default::default() };
        let out = step(&model, &masks, m["sparsity"].as_f64().unwrap(), head, &inputs, &targets, Reduction::Sum, &reg).unwrap();
        let want_loss = m["loss"].as_f64().unwrap() as f32;
        assert!(((out.loss - want_loss) / want_loss).abs() <= 1e-4, "{key}: loss {} vs torch {want_loss}", out.loss);
        for (mw, g) in masks.iter().zip(&out.scores) {
            let want = grads.tensor(&format!("{key}/{}.scores_grad", mw.name())).unwrap().to_vec().unwrap();
            let err = rel_l2(g.as_ref().unwrap(), &want);
            assert!(err <= 1e-4, "{key} {}: score gradient rel L2 {err:.2e}", mw.name());
        }
        for (got, k) in [(&out.head_weight, "lm_head.weight_grad"), (&out.head_bias, "lm_head.bias_grad")] {
            let want = grads.tensor(&format!("{key}/{k}")).unwrap().to_vec().unwrap();
            assert!(rel_l2(got, &want) <= 1e-4, "{key} {k}: rel L2 {:.2e}", rel_l2(got, &want));
        }
        match (&out.embedding, grads.tensor(&format!("{key}/masked_spec_embed_grad"))) {
            (Some(g), Ok(want)) => {
                let err = rel_l2(g, &want.to_vec().unwrap());
                assert!(err <= 1e-4, "{key}: time-mask embedding gradient rel L2 {err:.2e}");
            }
            (None, Err(_)) => {}
            _ => panic!("{key}: embedding gradient expected exactly when time masking is on"),
        }
    }
}
