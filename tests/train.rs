//! Training pieces against PyTorch (tools/make_train_fixtures.py).

mod common;

use common::{assert_key_bias_negligible, fixtures, l2, rel_l2, utterances};
use s3router::backend::backward::Backward;
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
use s3router::train::masked::{step, Features, MaskScope, MaskedWeight, Regularisers, TimeMask, Weights, POS_CONV_WEIGHT};

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
    /// The model's checkpoint (masked weights are read from it).
    source: Checkpoint,
    audio: Vec<Vec<f32>>,
    targets: CtcTargets,
    /// Packed time-mask flags (empty without time masking).
    frames: Vec<bool>,
    meta: serde_json::Value,
    grads: Checkpoint,
    key: String,
}

fn json(path: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join(path)).unwrap()).unwrap()
}

impl Case {
    /// Case `key` of tools/make_train_fixtures.py (over base-like or large-like).
    fn load(key: &str) -> Case {
        let grads = Checkpoint::open(&[fixtures().join("train_grads.safetensors")]).unwrap();
        let name = key.split("-like").next().unwrap().to_string() + "-like";
        Case::of(&name, &json("train.json")["masked"], grads, key)
    }

    /// Case `key` (`masked` or `finetune`) of the gradients tools/make_train_fixtures.py's
    /// `family_gradients` wrote into fixture model `name`'s folder.
    fn family(name: &str, key: &str) -> Case {
        let grads = Checkpoint::open(&[fixtures().join(name).join("grads.safetensors")]).unwrap();
        Case::of(name, &json(&format!("{name}/grads.json")), grads, key)
    }

    /// Fixture model `name` and the case `cases[key]` whose reference values `grads` holds.
    fn of(name: &str, cases: &serde_json::Value, grads: Checkpoint, key: &str) -> Case {
        let dir = fixtures().join(name);
        let model = Wav2Vec2::load(&dir, &CpuBackend).unwrap();
        // MMS folders hold one vocabulary per language; the weights' adapters are "eng"'s.
        let lang = model.layers[0].adapter.as_ref().map(|_| "eng");
        let vocab = Vocab::load_language(&dir.join("vocab.json"), lang, model.config.vocab_size, model.config.pad_token_id).unwrap();
        let pre = Preprocessor::load(&dir).unwrap();
        let m = cases[key].clone();
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
        let source = Checkpoint::open_dir(&dir).unwrap();
        Case { model, source, audio, targets, frames, meta: m, grads, key: key.to_string() }
    }

    fn masks(&self, scope: MaskScope) -> Vec<MaskedWeight> {
        (0..self.model.layers.len())
            .flat_map(|i| scope.parts().iter().map(move |&p| (i, p)))
            .map(|(i, p)| {
                let scores = self.grads.tensor(&format!("{}/{}.scores", self.key, p.weight_name(i))).unwrap().to_vec().unwrap();
                MaskedWeight::load(&self.source, &self.model.config, i, p, |_, _| scores).unwrap()
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
        let out = step(
            &CpuBackend,
            &self.model,
            masks,
            sparsity,
            head,
            Features::Audio(&inputs),
            &self.targets,
            Reduction::Sum,
            reg,
            Weights::Frozen,
        )
        .unwrap();
        let key = &self.key;
        let want_loss = self.meta["loss"].as_f64().unwrap() as f32;
        assert!(((out.loss - want_loss) / want_loss).abs() <= 1e-4, "{key}: loss {} vs torch {want_loss}", out.loss);
        let mut worst = 0.0f64;
        for (mw, g) in masks.iter().zip(&out.scores) {
            match (g, self.grads.tensor(&format!("{key}/{}.scores_grad", mw.name()))) {
                (Some(g), Ok(want)) => {
                    let err = rel_l2(g.f32s().unwrap(), &want.to_vec().unwrap());
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
/// The fixture's regularisers (time and channel masks, a skipped layer, the three dropouts).
struct FixtureRegularisers {
    channels: Vec<bool>,
    skip: Vec<bool>,
    embedding: Vec<f32>,
    seed: u64,
}

impl FixtureRegularisers {
    fn of(case: &Case) -> FixtureRegularisers {
        let m = &case.meta;
        let h = case.model.config.hidden_size;
        FixtureRegularisers {
            channels: m["channel_masks"].as_array().unwrap().iter().flat_map(|spans| spans_to_flags(spans, h)).collect(),
            skip: m["skip_layers"].as_array().unwrap().iter().map(|b| b.as_bool().unwrap()).collect(),
            embedding: case.embedding().unwrap(),
            seed: m["seed"].as_u64().unwrap(),
        }
    }

    fn get<'a>(&'a self, case: &'a Case) -> Regularisers<'a> {
        let dropout = |k: &str| Some(Dropout { p: case.meta[k].as_f64().unwrap() as f32, seed: self.seed });
        Regularisers {
            time_mask: Some(TimeMask { frames: &case.frames, embedding: &self.embedding }),
            channel_mask: Some(&self.channels),
            dropout: dropout("dropout"),
            attention_dropout: dropout("attention_dropout"),
            activation_dropout: dropout("activation_dropout"),
            skip_layers: &self.skip,
        }
    }
}

/// Weight finetuning: the gradient of every parameter above the feature encoder (weights,
/// biases, norms, the feature projection, the weight-normed positional conv's `g` and `v`, the
/// head, the time-mask embedding), and with the feature encoder trained its conv weights, biases
/// and group / layer norms too, against transformers in float64, every regulariser on; a
/// skipped layer's parameters get no gradient on either side.
#[test]
fn finetune_step_gradients_match_pytorch() {
    let cases = [
        ("base-like-finetune", Weights::AboveEncoder),
        ("large-like-finetune", Weights::AboveEncoder),
        ("base-like-finetune-encoder", Weights::All),
        ("large-like-finetune-encoder", Weights::All),
    ];
    for (key, trained) in cases {
        check_finetune(&Case::load(key), trained);
    }
}

/// data2vec-audio (tools/make_data2vec_fixtures.py) and MMS (tools/make_mms_fixtures.py), time
/// and channel masking on, in float64: S3-Router's score, head and embedding gradients, and
/// every parameter's under weight finetuning: data2vec's stacked positional convs (no weight
/// norm), MMS's attention adapters among them.
#[test]
fn data2vec_and_mms_step_gradients_match_pytorch() {
    for name in ["data2vec-like", "mms-like"] {
        let case = Case::family(name, "masked");
        let fixture = FixtureRegularisers::of(&case);
        case.check(&case.masks(MaskScope::Ffn), &fixture.get(&case));
        check_finetune(&Case::family(name, "finetune"), Weights::All);
    }
}

/// One weight-finetuning step of `case` with `trained` weights against its reference gradients.
fn check_finetune(case: &Case, trained: Weights) {
    let key = &case.key;
    let fixture = FixtureRegularisers::of(case);
    let inputs: Vec<&[f32]> = case.audio.iter().map(Vec::as_slice).collect();
    let head = case.model.lm_head.as_ref().unwrap();
    let out = step(
        &CpuBackend,
        &case.model,
        &[],
        0.0,
        head,
        Features::Audio(&inputs),
        &case.targets,
        Reduction::Sum,
        &fixture.get(case),
        trained,
    )
    .unwrap();
    let want_loss = case.meta["loss"].as_f64().unwrap() as f32;
    assert!(((out.loss - want_loss) / want_loss).abs() <= 1e-4, "{key}: loss {} vs torch {want_loss}", out.loss);
    // The weight-normed positional conv (wav2vec2): the folded weight's gradient stands for g and v.
    let pc = "wav2vec2.encoder.pos_conv_embed.conv.parametrizations.weight";
    let (dg, dv) = match out.weights.get(POS_CONV_WEIGHT) {
        Some(dw) => {
            let (g, v) = (case.source.tensor(&format!("{pc}.original0")).unwrap(), case.source.tensor(&format!("{pc}.original1")).unwrap());
            let (dg, dv) = CpuBackend.weight_norm_grads(dw, &g, &v).unwrap();
            (dg.to_vec().unwrap(), dv.to_vec().unwrap())
        }
        None => (Vec::new(), Vec::new()),
    };
    let prefix = format!("{key}/grad/");
    let names: Vec<String> = case.grads.names().filter_map(|n| n.strip_prefix(&prefix).map(str::to_string)).collect();
    let mut worst = (0.0f64, String::new());
    for name in &names {
        let got: &[f32] = match name.as_str() {
            "lm_head.weight" => &out.head_weight,
            "lm_head.bias" => &out.head_bias,
            "wav2vec2.masked_spec_embed" => out.embedding.as_deref().unwrap(),
            n if n == format!("{pc}.original0") => &dg,
            n if n == format!("{pc}.original1") => &dv,
            n => out.weights.get(n).unwrap_or_else(|| panic!("{key}: no gradient for {n}")).f32s().unwrap(),
        };
        let want = case.grads.tensor(&format!("{prefix}{name}")).unwrap().to_vec().unwrap();
        if let Some(layer) = name.strip_suffix("k_proj.bias") {
            let q_bias = out.weights[&format!("{layer}q_proj.bias")].f32s().unwrap();
            assert_key_bias_negligible(&format!("{key} {name}"), got, &want, l2(q_bias), 1e-5);
            continue;
        }
        let err = rel_l2(got, &want);
        assert!(err <= 1e-4, "{key} {name}: gradient rel L2 {err:.2e}");
        if err > worst.0 {
            worst = (err, name.clone());
        }
    }
    // Every engine gradient is one PyTorch has (the folded conv weight stands for g and v).
    for name in out.weights.keys().filter(|n| n.as_str() != POS_CONV_WEIGHT) {
        assert!(names.contains(name), "{key}: the engine returned a gradient for {name}, PyTorch has none");
    }
    assert!(names.len() > 20, "{key}: only {} reference gradients", names.len());
    eprintln!("{key}: {} gradients, worst rel L2 {:.1e} ({})", names.len(), worst.0, worst.1);
}

#[test]
fn regularised_step_gradients_match_pytorch() {
    for key in ["base-like-regularised", "large-like-regularised"] {
        let case = Case::load(key);
        let fixture = FixtureRegularisers::of(&case);
        case.check(&case.masks(MaskScope::All), &fixture.get(&case));
    }
}
