//! Training pieces against PyTorch (tools/make_train_fixtures.py).

mod common;

use common::{fixtures, rel_l2, utterances};
use s3router::backend::cpu::CpuBackend;
use s3router::ctc::{CtcTargets, Reduction};
use s3router::data::audio;
use s3router::data::dataset::LabelKind;
use s3router::data::labels::Labeler;
use s3router::dropout::Dropout;
use s3router::model::checkpoint::Checkpoint;
use s3router::model::preprocess::Preprocessor;
use s3router::model::vocab::Vocab;
use s3router::model::Wav2Vec2;
use s3router::train::adam::Adam;
use s3router::train::masked::{step, Features, MaskScope, MaskedWeight, Regularisers, TimeMask};

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

/// One fixture case: the model, its inputs and the PyTorch reference gradients.
struct Case {
    model: Wav2Vec2,
    audio: Vec<Vec<f32>>,
    targets: CtcTargets,
    /// Packed time-mask flags (empty without time masking).
    frames: Vec<bool>,
    meta: serde_json::Value,
    grads: Checkpoint,
    key: String,
}

impl Case {
    fn load(key: &str) -> Case {
        let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixtures().join("train.json")).unwrap()).unwrap();
        let grads = Checkpoint::open(&[fixtures().join("train_grads.safetensors")]).unwrap();
        let name = key.trim_end_matches("-specaug").trim_end_matches("-regularised");
        let dir = fixtures().join(name);
        let model = Wav2Vec2::load(&dir, &CpuBackend).unwrap();
        let vocab = Vocab::load(&dir.join("vocab.json"), model.config.vocab_size, model.config.pad_token_id).unwrap();
        let pre = Preprocessor::load(&dir).unwrap();
        let m = meta["masked"][key].clone();
        let texts: Vec<&str> = m["transcripts"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
        let labels = Labeler::new(&vocab, LabelKind::Wrd, "", false).label_all(texts.into_iter()).unwrap();
        let audio: Vec<Vec<f32>> = utterances().iter().map(|p| pre.apply(audio::load(p).unwrap())).collect();
        let targets = CtcTargets { labels: labels.tokens, blank: model.config.pad_token_id, zero_infinity: true };
        // Time masks: frame spans per utterance, over the packed frames.
        let lens = model.frame_counts(&audio.iter().map(Vec::len).collect::<Vec<_>>()).unwrap();
        let mut frames = Vec::new();
        if let Some(spans) = m["time_masks"].as_array() {
            for (u, spans) in spans.iter().enumerate() {
                frames.extend(spans_to_flags(spans, lens[u]));
            }
        }
        Case { model, audio, targets, frames, meta: m, grads, key: key.to_string() }
    }

    fn masks(&self, scope: MaskScope) -> Vec<MaskedWeight> {
        (0..self.model.layers.len())
            .flat_map(|i| scope.parts().iter().map(move |&p| (i, p)))
            .map(|(i, p)| {
                let scores = self.grads.tensor(&format!("{}/{}.scores", self.key, p.weight_name(i))).unwrap().to_vec().unwrap();
                MaskedWeight::new(&self.model, i, p, scores).unwrap()
            })
            .collect()
    }

    fn embedding(&self) -> Option<Vec<f32>> {
        self.grads.tensor(&format!("{}/masked_spec_embed", self.key)).ok().map(|t| t.to_vec().unwrap())
    }

    /// Runs the step and compares loss and every gradient PyTorch recorded (rel L2 <= 1e-4); a
    /// masked weight without a recorded gradient (its layer skipped) must get none.
    fn check(&self, masks: &[MaskedWeight], reg: &Regularisers) {
        let inputs: Vec<&[f32]> = self.audio.iter().map(Vec::as_slice).collect();
        let head = self.model.lm_head.as_ref().unwrap();
        let sparsity = self.meta["sparsity"].as_f64().unwrap();
        let out = step(&self.model, masks, sparsity, head, Features::Audio(&inputs), &self.targets, Reduction::Sum, reg).unwrap();
        let key = &self.key;
        let want_loss = self.meta["loss"].as_f64().unwrap() as f32;
        assert!(((out.loss - want_loss) / want_loss).abs() <= 1e-4, "{key}: loss {} vs torch {want_loss}", out.loss);
        let mut worst = 0.0f64;
        for (mw, g) in masks.iter().zip(&out.scores) {
            match (g, self.grads.tensor(&format!("{key}/{}.scores_grad", mw.name()))) {
                (Some(g), Ok(want)) => {
                    let err = rel_l2(g, &want.to_vec().unwrap());
                    assert!(err <= 1e-4, "{key} {}: score gradient rel L2 {err:.2e}", mw.name());
                    worst = worst.max(err);
                }
                (None, Err(_)) => {}
                (g, _) => panic!("{key} {}: gradient present here: {}, in PyTorch: the opposite", mw.name(), g.is_some()),
            }
        }
        for (got, k) in [(&out.head_weight, "lm_head.weight_grad"), (&out.head_bias, "lm_head.bias_grad")] {
            let want = self.grads.tensor(&format!("{key}/{k}")).unwrap().to_vec().unwrap();
            assert!(rel_l2(got, &want) <= 1e-4, "{key} {k}: rel L2 {:.2e}", rel_l2(got, &want));
        }
        match (&out.embedding, self.grads.tensor(&format!("{key}/masked_spec_embed_grad"))) {
            (Some(g), Ok(want)) => {
                let err = rel_l2(g, &want.to_vec().unwrap());
                assert!(err <= 1e-4, "{key}: time-mask embedding gradient rel L2 {err:.2e}");
            }
            (None, Err(_)) => {}
            _ => panic!("{key}: embedding gradient expected exactly when time masking is on"),
        }
        eprintln!("{key}: worst score-gradient rel L2 {worst:.1e}");
    }
}

/// `[a, b)` spans (JSON pairs) as `n` flags.
fn spans_to_flags(spans: &serde_json::Value, n: usize) -> Vec<bool> {
    let mut f = vec![false; n];
    for span in spans.as_array().unwrap() {
        let (a, b) = (span[0].as_u64().unwrap() as usize, span[1].as_u64().unwrap() as usize);
        f[a..b].iter_mut().for_each(|x| *x = true);
    }
    f
}

/// S3-Router gradients against PyTorch running the official masking rule in float64
/// (tools/make_train_fixtures.py), FFN masks, with and without time masking: measured ~3e-7.
#[test]
fn masked_step_gradients_match_pytorch() {
    for key in ["base-like", "large-like", "base-like-specaug", "large-like-specaug"] {
        let case = Case::load(key);
        let embedding = case.embedding();
        let time_mask = embedding.as_deref().map(|e| TimeMask { frames: &case.frames, embedding: e });
        case.check(&case.masks(MaskScope::Ffn), &Regularisers { time_mask, ..Default::default() });
    }
}

/// Every regulariser at once against transformers' modules fed the engine's dropout masks: all
/// six linears masked, time and channel masking, one layer skipped, hidden / attention /
/// activation dropout (post-LN and pre-LN models).
#[test]
fn regularised_step_gradients_match_pytorch() {
    for key in ["base-like-regularised", "large-like-regularised"] {
        let case = Case::load(key);
        let m = &case.meta;
        let h = case.model.config.hidden_size;
        let channels: Vec<bool> = m["channel_masks"].as_array().unwrap().iter().flat_map(|spans| spans_to_flags(spans, h)).collect();
        let skip: Vec<bool> = m["skip_layers"].as_array().unwrap().iter().map(|b| b.as_bool().unwrap()).collect();
        let seed = m["seed"].as_u64().unwrap();
        let dropout = |k: &str| Some(Dropout { p: m[k].as_f64().unwrap() as f32, seed });
        let embedding = case.embedding().unwrap();
        let reg = Regularisers {
            time_mask: Some(TimeMask { frames: &case.frames, embedding: &embedding }),
            channel_mask: Some(&channels),
            dropout: dropout("dropout"),
            attention_dropout: dropout("attention_dropout"),
            activation_dropout: dropout("activation_dropout"),
            skip_layers: &skip,
        };
        case.check(&case.masks(MaskScope::All), &reg);
    }
}
