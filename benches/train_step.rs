//! One S3-Router forward/backward at full wav2vec2-base size (random weights), on the CPU (batch
//! 2 x 5 s, 60 labels per utterance) and, where there is one, the GPU in fp32 and bf16 (batch
//! 8 x 15 s, 220 labels: the shape of ../shared/bench/torch_w2v2_anchor.py); masks on the 24 FFN matrices
//! at sparsity 0.1. Scores, finetuned weights and their Adam stay on the device; the head's
//! Adam runs on the host.
//! "step" is the forward/backward (masks from the scores included); "update" adds the Adam update
//! of the 56.6M scores and the head, which is what the PyTorch anchor
//! (../shared/bench/torch_w2v2_cpu_anchor.py) times. "finetune step" is weight finetuning's
//! forward/backward (no masks, every weight above the feature encoder trains).
//! `cargo bench --bench train_step` (`-- cuda` for the GPU ones only).

use std::sync::Mutex;

use criterion::{criterion_group, criterion_main, Criterion};
use s3router::backend::backward::TrainBackend;
use s3router::backend::cpu::CpuBackend;
use s3router::backend::cuda::{unavailable_reason, CudaBackend, Precision};
use s3router::ctc::{CtcTargets, Reduction};
use s3router::model::checkpoint::{RandomWeights, WeightSource};
use s3router::model::config::Config;
use s3router::model::Wav2Vec2;
use s3router::rng::SplitMix;
use s3router::router::{init_scores, Init};
use s3router::tensor::Tensor;
use s3router::train::adam::{Adam, TensorAdam};
use s3router::train::finetune::{unfold_pos_conv_grad, NamedWeight, Overlay, Resident};
use s3router::train::masked::{step, Features, MaskScope, MaskedWeight, Regularisers, Weights};

fn train_step_base(c: &mut Criterion) {
    s3router::keep_freed_memory();
    bench_device(c, &CpuBackend, "cpu", 2, 5, 60);
    match unavailable_reason() {
        None => {
            bench_device(c, &CudaBackend::new(0, Precision::F32).unwrap(), "cuda f32", 8, 15, 220);
            bench_device(c, &CudaBackend::new(0, Precision::Bf16).unwrap(), "cuda bf16", 8, 15, 220);
        }
        Some(why) => eprintln!("skipping the GPU benches: {why}"),
    }
}

/// The four benches on `be`: `batch` clips of `seconds` with `labels` targets each.
fn bench_device(c: &mut Criterion, be: &dyn TrainBackend, device: &str, batch: usize, seconds: usize, labels: usize) {
    let shape = format!("wav2vec2-base b{batch}x{seconds}s {device}");
    let model = Wav2Vec2::from_weights(Config::preset("base").unwrap(), &RandomWeights { seed: 0 }, be).unwrap();
    let mut rng = SplitMix(1);
    let mut masks: Vec<MaskedWeight> = (0..model.layers.len())
        .flat_map(|i| MaskScope::Ffn.parts().iter().map(move |&p| (i, p)))
        .map(|(i, p)| {
            let init = |w: &[f32], fan_in| init_scores(w, fan_in, Init::WeightRank, 0.1, &mut rng);
            let mut m = MaskedWeight::load(&RandomWeights { seed: 0 }, &model.config, i, p, init).unwrap();
            m.scores = be.upload(&m.scores).unwrap();
            m
        })
        .collect();
    let clips: Vec<Vec<f32>> = (0..batch)
        .map(|b| (0..seconds * 16_000).map(|i| ((i as f32 * 0.013 * (b + 1) as f32).sin() + rng.symmetric() * 0.2) * 0.3).collect())
        .collect();
    let inputs: Vec<&[f32]> = clips.iter().map(Vec::as_slice).collect();
    let labels = (0..batch).map(|_| (0..labels).map(|_| 1 + (rng.next_u64() % 31) as u32).collect()).collect();
    let targets = CtcTargets { labels, blank: 0, zero_infinity: true };
    let head = model.lm_head.as_ref().unwrap();
    let mut g = c.benchmark_group("train");
    g.sample_size(10);
    let reg = Regularisers::default();
    // Device memory at its highest during each bench (weights, scores, Adam state, activations).
    let peak = |what: &str| {
        if let Some(bytes) = be.take_peak_memory().unwrap() {
            eprintln!("{what} {shape}: peak memory {:.2} GB", bytes as f64 / 1e9);
        }
    };
    peak("model and scores loaded");
    g.bench_function(format!("s3router step {shape}"), |b| {
        b.iter(|| step(be, &model, &masks, 0.1, head, Features::Audio(&inputs), &targets, Reduction::Sum, &reg, Weights::Frozen).unwrap())
    });
    peak("s3router step");
    // As `engine train` updates: the scores' Adam on the backend, the head's on the host.
    let mut score_adam = TensorAdam::new(be, &masks.iter().map(|m| vec![m.d_out, m.d_in]).collect::<Vec<_>>()).unwrap();
    let mut adam = Adam::new(&[head.weight.numel(), head.bias.numel()]);
    let (mut head_w, mut head_b) = (vec![0.0f32; head.weight.numel()], vec![0.0f32; head.bias.numel()]);
    g.bench_function(format!("s3router update (step + Adam) {shape}"), |b| {
        b.iter(|| {
            let out =
                step(be, &model, &masks, 0.1, head, Features::Audio(&inputs), &targets, Reduction::Sum, &reg, Weights::Frozen).unwrap();
            let mut scores: Vec<&mut Tensor> = masks.iter_mut().map(|m| &mut m.scores).collect();
            score_adam.update(be, &mut scores, &out.scores, 5e-5).unwrap();
            let grads = [Some(out.head_weight.as_slice()), Some(out.head_bias.as_slice())];
            adam.update(&mut [head_w.as_mut_slice(), head_b.as_mut_slice()], &grads, 5e-5);
        })
    });
    peak("s3router update (scores' Adam moments added)");
    g.bench_function(format!("finetune step (every weight's gradient) {shape}"), |b| {
        b.iter(|| {
            step(be, &model, &[], 0.0, head, Features::Audio(&inputs), &targets, Reduction::Sum, &reg, Weights::AboveEncoder).unwrap()
        })
    });
    // The finetuning update as `engine finetune` runs it: the model rebuilt from the trained
    // tensors where they live (the frozen feature encoder uploaded once), the step, the
    // weight-norm gradients, and Adam over every trained tensor on the backend (what
    // tools/torch_finetune_cpu_anchor.py times).
    let source = RandomWeights { seed: 0 };
    let config = Config::preset("base").unwrap();
    let mut weights: Vec<NamedWeight> = trained_shapes(&config)
        .into_iter()
        .map(|(name, shape)| {
            let data = be.upload(&source.get(&name, &shape).unwrap()).unwrap();
            NamedWeight { name, shape, data }
        })
        .collect();
    let mut adam = TensorAdam::new(be, &weights.iter().map(|w| w.shape.clone()).collect::<Vec<_>>()).unwrap();
    let frozen = Mutex::default();
    g.bench_function(format!("finetune update (rebuild + step + Adam) {shape}"), |b| {
        b.iter(|| {
            // The model (and the overlay it was built from) share the trained tensors' buffers:
            // gone before Adam, so it updates them in place.
            let mut out = {
                let resident = Resident { inner: &source, be, cache: &frozen };
                let overlay = Overlay::new(&resident, weights.iter().map(|w| (w.name.as_str(), w.data.clone())));
                let model = Wav2Vec2::from_weights(config.clone(), &overlay, be).unwrap();
                let head = model.lm_head.as_ref().unwrap();
                step(be, &model, &[], 0.0, head, Features::Audio(&inputs), &targets, Reduction::Sum, &reg, Weights::AboveEncoder).unwrap()
            };
            unfold_pos_conv_grad(be, &mut out.weights, &weights).unwrap();
            let grads: Vec<Option<Tensor>> = weights.iter().map(|w| out.weights.remove(&w.name)).collect();
            adam.update(be, &mut weights.iter_mut().map(|w| &mut w.data).collect::<Vec<_>>(), &grads, 5e-5).unwrap();
            be.synchronize().unwrap();
        })
    });
    peak("finetune update (the mask-learning model and its scores still held)");
    g.finish();
}

/// Name and shape of every tensor weight finetuning trains in `config`'s model.
fn trained_shapes(config: &Config) -> Vec<(String, Vec<usize>)> {
    let (h, i, c) = (config.hidden_size, config.intermediate_size, *config.conv_dim.last().unwrap());
    let (k, g) = (config.pos_conv.kernel, config.pos_conv.groups);
    let mut v = vec![
        ("wav2vec2.feature_projection.layer_norm.weight".to_string(), vec![c]),
        ("wav2vec2.feature_projection.layer_norm.bias".to_string(), vec![c]),
        ("wav2vec2.feature_projection.projection.weight".to_string(), vec![h, c]),
        ("wav2vec2.feature_projection.projection.bias".to_string(), vec![h]),
        ("wav2vec2.encoder.layer_norm.weight".to_string(), vec![h]),
        ("wav2vec2.encoder.layer_norm.bias".to_string(), vec![h]),
        ("wav2vec2.encoder.pos_conv_embed.conv.bias".to_string(), vec![h]),
        (format!("{POS_CONV}.original0"), vec![1, 1, k]),
        (format!("{POS_CONV}.original1"), vec![h, h / g, k]),
    ];
    for l in 0..config.num_hidden_layers {
        let p = format!("wav2vec2.encoder.layers.{l}");
        for (name, shape) in [
            ("attention.q_proj", vec![h, h]),
            ("attention.k_proj", vec![h, h]),
            ("attention.v_proj", vec![h, h]),
            ("attention.out_proj", vec![h, h]),
            ("feed_forward.intermediate_dense", vec![i, h]),
            ("feed_forward.output_dense", vec![h, i]),
        ] {
            v.push((format!("{p}.{name}.bias"), vec![shape[0]]));
            v.push((format!("{p}.{name}.weight"), shape));
        }
        for norm in ["layer_norm", "final_layer_norm"] {
            v.push((format!("{p}.{norm}.weight"), vec![h]));
            v.push((format!("{p}.{norm}.bias"), vec![h]));
        }
    }
    v
}

/// The positional conv's weight-norm pair, in the spelling [`RandomWeights`] serves.
const POS_CONV: &str = "wav2vec2.encoder.pos_conv_embed.conv.parametrizations.weight";

criterion_group!(benches, train_step_base);
criterion_main!(benches);
