//! One training forward/backward, written once for every device ([`TrainBackend`]): chosen
//! linears of the encoder layers (the FFN's two, attention's four, or all six) masked by the
//! per-matrix top-k of their scores, the training regularisers (time and channel masking,
//! dropout, LayerDrop), CTC loss, and the gradients of the scores (straight-through), the head
//! and the time-mask embedding; with `train_weights` (weight finetuning) also of every weight,
//! bias and norm above the frozen feature encoder (and of the feature encoder itself).
//!
//! Frozen stages run without a tape; masks live as bits (the top-k is taken on the device);
//! each encoder layer keeps only what its backward needs (attention probabilities, dropout
//! masks and the FFN's 4x-wide activation are recomputed), and the backward stops at the
//! lowest trainable tensor: layer 0's lowest masked linear, the time-mask embedding when time
//! masking is on, or the feature projection when weights train.

use std::collections::BTreeMap;

use anyhow::{bail, ensure, Context, Result};

use super::encoder;
use crate::backend::backward::{AttentionSaved, ScoredLinear, ScoredRows, TrainBackend};
use crate::backend::{Activation, LinearMask, Seqs};
use crate::ctc::{ctc_loss, CtcTargets, Reduction};
use crate::dropout::{Dropout, SiteDropout};
use crate::model::checkpoint::WeightSource;
use crate::model::config::Config;
use crate::model::wav2vec2::{pos_conv_layer_names, Adapter, EncoderLayer, Linear, Norm, DEFAULT_NORM_EPS};
use crate::model::Wav2Vec2;
use crate::tensor::Tensor;

/// The projections of an encoder layer that masks may cover.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Query,
    Key,
    Value,
    Out,
    Intermediate,
    Output,
}

/// Which projections `engine train --mask` covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MaskScope {
    /// The FFN's `intermediate_dense` and `output_dense` (S3-Router's default, `fix_attn`).
    Ffn,
    /// Attention's q/k/v/out projections only (`fix_fc`).
    Attention,
    /// All six (S3-Router-P).
    All,
}

impl MaskScope {
    pub fn parts(self) -> &'static [Part] {
        use Part::*;
        match self {
            MaskScope::Ffn => &[Intermediate, Output],
            MaskScope::Attention => &[Query, Key, Value, Out],
            MaskScope::All => &[Query, Key, Value, Out, Intermediate, Output],
        }
    }
}

impl Part {
    /// The checkpoint name of this projection's weight in encoder layer `layer`.
    pub fn weight_name(self, layer: usize) -> String {
        let suffix = match self {
            Part::Query => "attention.q_proj",
            Part::Key => "attention.k_proj",
            Part::Value => "attention.v_proj",
            Part::Out => "attention.out_proj",
            Part::Intermediate => "feed_forward.intermediate_dense",
            Part::Output => "feed_forward.output_dense",
        };
        format!("wav2vec2.encoder.layers.{layer}.{suffix}.weight")
    }

    /// `[out, in]` of this projection's weight.
    pub fn shape(self, c: &Config) -> [usize; 2] {
        let (h, inter) = (c.hidden_size, c.intermediate_size);
        match self {
            Part::Intermediate => [inter, h],
            Part::Output => [h, inter],
            _ => [h, h],
        }
    }

    /// The loaded linear holding this projection and the first output row it occupies there
    /// (q, k and v are stacked into one projection).
    pub fn linear(self, layer: &EncoderLayer) -> (&Linear, usize) {
        let h = layer.out_proj.bias.numel();
        match self {
            Part::Query => (&layer.qkv_proj, 0),
            Part::Key => (&layer.qkv_proj, h),
            Part::Value => (&layer.qkv_proj, 2 * h),
            Part::Out => (&layer.out_proj, 0),
            Part::Intermediate => (&layer.intermediate_dense, 0),
            Part::Output => (&layer.output_dense, 0),
        }
    }
}

/// A masked weight: where it sits and its scores (`[out, in]`, on the backend that trains them;
/// the frozen weight itself is the model's).
pub struct MaskedWeight {
    pub layer: usize,
    pub part: Part,
    pub d_out: usize,
    pub d_in: usize,
    pub scores: Tensor,
}

impl MaskedWeight {
    /// `part` of layer `layer` with host scores `init(weight, fan_in)` from its frozen `[out, in]`
    /// weight, read from `src` (a checkpoint, whatever device the model runs on) and dropped
    /// once the scores exist.
    pub fn load(
        src: &dyn WeightSource,
        config: &Config,
        layer: usize,
        part: Part,
        init: impl FnOnce(&[f32], usize) -> Vec<f32>,
    ) -> Result<MaskedWeight> {
        let name = part.weight_name(layer);
        ensure!(layer < config.num_hidden_layers, "{name}: the model has {} layers", config.num_hidden_layers);
        let [d_out, d_in] = part.shape(config);
        let weight = src.get(&name, &[d_out, d_in])?.to_vec().with_context(|| name.clone())?;
        let scores = init(&weight, d_in);
        ensure!(scores.len() == weight.len(), "{name}: {} scores for a {d_out} x {d_in} weight", scores.len());
        Ok(MaskedWeight { layer, part, d_out, d_in, scores: Tensor::from_vec(scores, &[d_out, d_in]) })
    }

    pub fn name(&self) -> String {
        self.part.weight_name(self.layer)
    }
}

/// SpecAugment time masking for a step: which packed frames of the projected features are
/// replaced by the learned embedding (`[hidden]`), whose gradient the step then returns.
pub struct TimeMask<'a> {
    pub frames: &'a [bool],
    pub embedding: &'a [f32],
}

/// The training-time regularisers of one step; the default turns every one off.
#[derive(Default)]
pub struct Regularisers<'a> {
    pub time_mask: Option<TimeMask<'a>>,
    /// `[utterances, hidden]`: channels zeroed over every frame of that utterance (after the
    /// time mask, as fairseq and transformers apply them).
    pub channel_mask: Option<&'a [bool]>,
    /// After the encoder's input norm, after attention and after the FFN (`--dropout`).
    pub dropout: Option<Dropout>,
    /// On the attention probabilities.
    pub attention_dropout: Option<Dropout>,
    /// After the FFN's activation.
    pub activation_dropout: Option<Dropout>,
    /// Layers skipped this step (LayerDrop); empty = none.
    pub skip_layers: &'a [bool],
}

/// What a step starts from: raw audio, the frozen feature encoder's output of the packed batch
/// (`[frames, conv_dim[-1]]`, what weight finetuning caches), or, when the projection is frozen
/// too, the projected features (`[frames, hidden]`, what mask learning caches); features on the
/// step's backend (host ones are uploaded).
pub enum Features<'a> {
    Audio(&'a [&'a [f32]]),
    Encoded(Tensor, Seqs),
    Projected(Tensor, Seqs),
}

/// Dropout sites: 0 is the encoder input; layer `i` owns `1 + 4i ..= 4 + 4i`.
fn site(layer: usize, k: u64) -> u64 {
    1 + 4 * layer as u64 + k
}
const SITE_ATTENTION_PROBS: u64 = 0;
const SITE_ATTENTION_OUT: u64 = 1;
const SITE_ACTIVATION: u64 = 2;
const SITE_FFN_OUT: u64 = 3;

/// Loss and gradients of one step.
pub struct StepGrads {
    pub loss: f32,
    pub losses: Vec<f32>,
    /// Per masked weight, in the order given, on the step's backend (they feed the optimiser
    /// there); `None` for a weight in a layer LayerDrop skipped.
    pub scores: Vec<Option<Tensor>>,
    /// Head gradients, `[vocab, hidden]` and `[vocab]`.
    pub head_weight: Vec<f32>,
    pub head_bias: Vec<f32>,
    /// Gradient of the time-mask embedding, when a [`TimeMask`] was given.
    pub embedding: Option<Vec<f32>>,
    /// With `train_weights`: the gradient of every weight, bias and norm the step used, by its
    /// checkpoint name in PyTorch's layout, on the step's backend (they feed the optimiser
    /// there); the positional conv's as the folded `...pos_conv_embed.conv.weight` `[out,
    /// in/groups, kernel]` (see [`crate::backend::backward::Backward::weight_norm_grads`]).
    /// Skipped layers have none.
    pub weights: BTreeMap<String, Tensor>,
}

/// The checkpoint name of the folded positional-conv weight in [`StepGrads::weights`]
/// (wav2vec2 and HuBERT; data2vec-audio's convs have no weight norm and train under their own
/// names, [`pos_conv_layer_names`]).
pub const POS_CONV_WEIGHT: &str = "wav2vec2.encoder.pos_conv_embed.conv.weight";
const POS_CONV_BIAS: &str = "wav2vec2.encoder.pos_conv_embed.conv.bias";

/// What one encoder layer keeps for its backward pass.
struct Tape {
    /// The layer's input: pre-LN, the first norm's input (always kept); post-LN, the q/k/v
    /// projection's input, kept only when their scores or weights train.
    input: Option<Tensor>,
    qkv: Tensor,
    /// Attention output before `out_proj`, with what the backend's attention gradient can use
    /// instead of recomputing it (kept only when `out_proj` trains).
    attended: Option<AttentionSaved>,
    /// Post-LN: `attention + input` before the first norm (always kept); pre-LN: the first
    /// norm's output, the q/k/v projection's input (kept only when it is needed, as `input`).
    first: Option<Tensor>,
    /// Pre-LN: `input + attention`, the second norm's input (unused post-LN).
    second: Option<Tensor>,
    /// The FFN's pre-activation; its post-activation (`output_dense`'s input, 4x hidden wide)
    /// is recomputed in backward, an elementwise pass, instead of being kept for every layer.
    /// So is the FFN's input, the norm of `first` (post-LN) or `second` (pre-LN): one layer
    /// norm per layer in backward instead of a `[frames, hidden]` tensor per layer held
    /// through the whole step.
    pre_gelu: Tensor,
    /// Post-LN: `ffn + second` before the final norm.
    residual2: Option<Tensor>,
    /// MMS's adapter after the layer, where it has one.
    adapter: Option<AdapterTape>,
}

/// What an adapter `x + linear_2(ReLU(linear_1(LayerNorm(x))))` keeps for backward: `x`, its
/// norm (linear_1's input) and the ReLU's output (linear_2's input; its sign is ReLU's mask).
struct AdapterTape {
    input: Tensor,
    normed: Tensor,
    relu: Tensor,
}

/// From `dy` at an adapter's output to its input (the residual and the adapter's path),
/// collecting its weight and norm gradients under `prefix` (`...adapter_layer`).
fn adapter_grad(
    be: &dyn TrainBackend,
    adapter: &Adapter,
    tape: &AdapterTape,
    dy: Tensor,
    wgrads: &mut Grads,
    prefix: &str,
) -> Result<Tensor> {
    if wgrads.on {
        wgrads.linear(&format!("{prefix}.linear_2"), Some(be.linear_weight_grad(&dy, &tape.relu)?), &dy)?;
    }
    let d_pre = be.relu_grad(&be.linear_input_grad(&dy, &adapter.linear_2.weight, None)?, &tape.relu)?;
    if wgrads.on {
        wgrads.linear(&format!("{prefix}.linear_1"), Some(be.linear_weight_grad(&d_pre, &tape.normed)?), &d_pre)?;
    }
    let d_normed = be.linear_input_grad(&d_pre, &adapter.linear_1.weight, None)?;
    let d_input = wgrads.norm_eps(&format!("{prefix}.norm"), &d_normed, &tape.input, &adapter.norm, DEFAULT_NORM_EPS)?;
    be.add(dy, &d_input)
}

/// Linear 0 = qkv, 1 = out, 2 = intermediate, 3 = output of `layer`.
fn linear_of(layer: &EncoderLayer, which: usize) -> &Linear {
    match which {
        0 => &layer.qkv_proj,
        1 => &layer.out_proj,
        2 => &layer.intermediate_dense,
        _ => &layer.output_dense,
    }
}

/// The four linears of a layer as this step computes with them: the frozen weight under the
/// keep-mask of its scored parts, if any.
struct LayerWeights<'a> {
    layer: &'a EncoderLayer,
    /// Index into the masked weights, per [`Part`] (in declaration order).
    masked: [Option<usize>; 6],
    /// Keep-masks of linear 0 = qkv, 1 = out, 2 = intermediate, 3 = output.
    masks: [Option<LinearMask>; 4],
}

impl LayerWeights<'_> {
    fn part(&self, p: Part) -> Option<usize> {
        self.masked[p as usize]
    }

    /// Linear 0 = qkv, 1 = out, 2 = intermediate, 3 = output, and its mask.
    fn linear(&self, which: usize) -> (&Linear, Option<&LinearMask>) {
        (linear_of(self.layer, which), self.masks[which].as_ref())
    }

    fn attention_masked(&self) -> bool {
        self.masked[..4].iter().any(Option::is_some)
    }

    fn qkv_masked(&self) -> bool {
        self.masked[..3].iter().any(Option::is_some)
    }

    /// The scored row blocks of linear `which` (numbered as in [`Self::linear`]), each with the
    /// index of its masked weight.
    fn scored<'s>(&self, which: usize, scores: &'s [Tensor]) -> (Vec<usize>, Vec<ScoredRows<'s>>) {
        LINEAR_PARTS[which]
            .iter()
            .filter_map(|&p| self.part(p).map(|k| (k, ScoredRows { row0: p.linear(self.layer).1, scores: &scores[k] })))
            .unzip()
    }
}

/// The projections each linear of a layer holds, numbered as in [`LayerWeights::linear`].
const LINEAR_PARTS: [&[Part]; 4] = [&[Part::Query, Part::Key, Part::Value], &[Part::Out], &[Part::Intermediate], &[Part::Output]];

/// Every layer's linears with their keep-masks (top-k of the scores), the masks of all masked
/// matrices made in one call.
fn layer_weights<'a>(
    be: &dyn TrainBackend,
    layers: &'a [EncoderLayer],
    masks: &[MaskedWeight],
    scores: &[Tensor],
    sparsity: f64,
) -> Result<Vec<LayerWeights<'a>>> {
    let mut weights: Vec<LayerWeights> = layers
        .iter()
        .enumerate()
        .map(|(index, layer)| {
            let mut lw = LayerWeights { layer, masked: [None; 6], masks: Default::default() };
            for (k, m) in masks.iter().enumerate().filter(|(_, m)| m.layer == index) {
                lw.masked[m.part as usize] = Some(k);
            }
            lw
        })
        .collect();
    // (layer, linear, its scored blocks) for every linear with masked parts.
    let scored: Vec<(usize, usize, Vec<ScoredRows>)> = weights
        .iter()
        .enumerate()
        .flat_map(|(i, lw)| (0..LINEAR_PARTS.len()).map(move |which| (i, which, lw.scored(which, scores).1)))
        .filter(|(_, _, blocks)| !blocks.is_empty())
        .collect();
    let linears: Vec<ScoredLinear> =
        scored.iter().map(|(i, which, blocks)| (&linear_of(&layers[*i], *which).weight, blocks.as_slice())).collect();
    let made = be.scored_masks(&linears, sparsity)?;
    for ((i, which, _), mask) in scored.iter().zip(made) {
        weights[*i].masks[*which] = Some(mask);
    }
    Ok(weights)
}

/// Which weights a step returns gradients for, besides scores, head and time-mask embedding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Weights {
    /// None (mask learning; finetuning's head-only phase).
    Frozen,
    /// Every weight above the conv feature encoder (weight finetuning).
    AboveEncoder,
    /// Every weight, the conv feature encoder's too (`--train-feature-encoder`).
    All,
}

/// One forward/backward of the masked model on `be` (where `model` and `head` live): `masks`
/// names (layer, part) and scores of every masked weight (none: only the head, and the
/// embedding under time masking, train); `head` is the trainable CTC head; `reg` the step's
/// regularisers; `trained` adds the gradients of the weights that train
/// ([`StepGrads::weights`]). Gradients come back to the host.
#[allow(clippy::too_many_arguments)]
pub fn step(
    be: &dyn TrainBackend,
    model: &Wav2Vec2,
    masks: &[MaskedWeight],
    sparsity: f64,
    head: &Linear,
    features: Features,
    targets: &CtcTargets,
    reduction: Reduction,
    reg: &Regularisers,
    trained: Weights,
) -> Result<StepGrads> {
    let train_weights = trained != Weights::Frozen;
    let c = &model.config;
    let n_layers = model.layers.len();
    ensure!(
        reg.skip_layers.is_empty() || reg.skip_layers.len() == n_layers,
        "LayerDrop flags for {} of {n_layers} layers",
        reg.skip_layers.len()
    );
    let skipped = |i: usize| reg.skip_layers.get(i).copied().unwrap_or(false);
    let (h, heads) = (c.hidden_size, c.num_attention_heads);
    let scale = 1.0 / (c.head_dim() as f32).sqrt();
    let eps = c.layer_norm_eps;
    let id = Activation::Identity;
    // Already on the backend in a training run (no copy then); uploaded otherwise.
    let scores: Vec<Tensor> = masks.iter().map(|m| be.upload(&m.scores)).collect::<Result<_>>()?;
    let weights = layer_weights(be, &model.layers, masks, &scores, sparsity)?;
    let rows = |x: &Tensor| x.numel() / x.shape().last().copied().unwrap_or(1).max(1);
    let linear = |(lin, mask): (&Linear, Option<&LinearMask>), x: &Tensor| -> Result<Tensor> {
        be.linear_segments(x, &lin.weight, Some(&lin.bias), id, &[(rows(x), mask)])
    };
    // A linear whose output only matrix products read (qkv: attention and its backward).
    let linear_as_operand = |(lin, mask): (&Linear, Option<&LinearMask>), x: &Tensor| -> Result<Tensor> {
        be.linear_as_operand(x, &lin.weight, Some(&lin.bias), id, &[(rows(x), mask)])
    };
    let norm = |n: &Norm, x: &Tensor| be.layer_norm(x.clone(), None, n.params(eps), id);
    let drop = |d: Option<Dropout>, site: u64, x: Tensor| match d.filter(Dropout::is_active) {
        Some(d) => be.dropout(x, d, site),
        None => Ok(x),
    };
    let probs_dropout = |i: usize| SiteDropout::at(reg.attention_dropout, site(i, SITE_ATTENTION_PROBS));
    let activation_dropout = |i: usize| SiteDropout::at(reg.activation_dropout, site(i, SITE_ACTIVATION));

    // Forward: projected features, time and channel masking, positional conv, then the layers.
    let (mut projection_tape, mut encoder_tape) = (None, None);
    let (projected, seqs) = match features {
        Features::Audio(audio) if !train_weights => model.projected(be, audio)?,
        Features::Audio(audio) if trained == Weights::All => {
            let (f, seqs, tape) = encoder::forward(be, model, audio)?;
            encoder_tape = Some(tape);
            project(be, model, f, seqs, &mut projection_tape)?
        }
        Features::Audio(audio) => {
            let (f, seqs) = model.feature_encoder(be, audio)?;
            project(be, model, f, seqs, &mut projection_tape)?
        }
        Features::Encoded(..) | Features::Projected(..) if trained == Weights::All => {
            bail!("training the feature encoder needs the raw audio, not cached features")
        }
        Features::Encoded(f, seqs) => {
            let width = *c.conv_dim.last().expect("a config has conv layers");
            ensure!(f.shape() == [seqs.total(), width], "features {:?} for {} frames x {width} channels", f.shape(), seqs.total());
            project(be, model, be.upload(&f)?, seqs, &mut projection_tape)?
        }
        Features::Projected(p, seqs) => {
            ensure!(!train_weights, "training the weights needs the feature encoder's output, not projected features");
            ensure!(p.shape() == [seqs.total(), h], "projected features {:?} for {} frames x {h} channels", p.shape(), seqs.total());
            (be.upload(&p)?, seqs)
        }
    };
    if let Some(tm) = &reg.time_mask {
        ensure!(
            tm.frames.len() == seqs.total() && tm.embedding.len() == h,
            "time mask: {} frames / {} values for {} frames / {h} channels",
            tm.frames.len(),
            tm.embedding.len(),
            seqs.total()
        );
    }
    if let Some(cm) = reg.channel_mask {
        ensure!(cm.len() == seqs.count() * h, "channel mask: {} flags for {} utterances x {h} channels", cm.len(), seqs.count());
    }
    let embedding = reg.time_mask.as_ref().map(|tm| be.upload(&Tensor::from_vec(tm.embedding.to_vec(), &[h]))).transpose()?;
    let time = reg.time_mask.as_ref().zip(embedding.as_ref()).map(|(tm, e)| (tm.frames, e));
    let projected =
        if time.is_some() || reg.channel_mask.is_some() { be.mask_features(projected, &seqs, time, reg.channel_mask)? } else { projected };
    let (pos, pos_tapes) = positional(be, model, &projected, &seqs)?;
    let summed = be.add(projected.clone(), &pos)?;
    let x = if c.do_stable_layer_norm { summed.clone() } else { norm(&model.encoder_layer_norm, &summed)? };
    let mut x = drop(reg.dropout, 0, x)?;
    let mut tapes: Vec<Option<Tape>> = Vec::with_capacity(n_layers);
    for (i, lw) in weights.iter().enumerate() {
        if skipped(i) {
            tapes.push(None);
            continue;
        }
        let keep_attended = lw.part(Part::Out).is_some() || train_weights;
        let keep_qkv_input = lw.qkv_masked() || train_weights;
        // Attention: (qkv, attention output before out_proj, out_proj output before its dropout).
        let attend = |a: &Tensor| -> Result<(Tensor, Option<AttentionSaved>, Tensor)> {
            let qkv = linear_as_operand(lw.linear(0), a)?;
            let saved = be.attention_dropout_saved(&qkv, &seqs, heads, scale, probs_dropout(i))?;
            let o = linear(lw.linear(1), &saved.out)?;
            Ok((qkv, keep_attended.then_some(saved), o))
        };
        // The FFN: (pre-GELU, output before its dropout); the dropped post-GELU is freed here.
        let feed_forward = |inp: &Tensor| -> Result<(Tensor, Tensor)> {
            let u = linear(lw.linear(2), inp)?;
            let g = be.gelu_as_operand(&u, activation_dropout(i))?;
            Ok((u, linear(lw.linear(3), &g)?))
        };
        let (attention_out, ffn_out) =
            (SiteDropout::at(reg.dropout, site(i, SITE_ATTENTION_OUT)), SiteDropout::at(reg.dropout, site(i, SITE_FFN_OUT)));
        let layer = lw.layer;
        let tape = if c.do_stable_layer_norm {
            let a = norm(&layer.layer_norm, &x)?;
            let (qkv, attended, o) = attend(&a)?;
            let (x1, b) = be.dropout_add_norm(o, attention_out, &x, layer.final_layer_norm.params(eps))?;
            let (u, f) = feed_forward(&b)?;
            let out = be.add(x1.clone(), &drop(reg.dropout, site(i, SITE_FFN_OUT), f)?)?;
            let (out, adapter) = match &layer.adapter {
                Some(ad) => {
                    let (with_adapter, normed, relu) = ad.forward(be, &out)?;
                    (with_adapter, Some(AdapterTape { input: out, normed, relu }))
                }
                None => (out, None),
            };
            let input = std::mem::replace(&mut x, out);
            Tape {
                input: Some(input),
                qkv,
                attended,
                first: keep_qkv_input.then_some(a),
                second: Some(x1),
                pre_gelu: u,
                residual2: None,
                adapter,
            }
        } else {
            let (qkv, attended, o) = attend(&x)?;
            let (r1, h1) = be.dropout_add_norm(o, attention_out, &x, layer.layer_norm.params(eps))?;
            let (u, f) = feed_forward(&h1)?;
            let (r2, out) = be.dropout_add_norm(f, ffn_out, &h1, layer.final_layer_norm.params(eps))?;
            let input = std::mem::replace(&mut x, out);
            Tape {
                input: keep_qkv_input.then_some(input),
                qkv,
                attended,
                first: Some(r1),
                second: None,
                pre_gelu: u,
                residual2: Some(r2),
                adapter: None,
            }
        };
        tapes.push(Some(tape));
    }
    let encoder_out_pre = x.clone();
    if c.do_stable_layer_norm {
        x = norm(&model.encoder_layer_norm, &x)?;
    }
    let logits = be.linear(&x, &head.weight, Some(&head.bias), id)?;

    // Backward. The lowest layer whose backward must run: every layer when weights train or
    // time masking is on (the embedding sits below them all), else the lowest masked weight.
    let out = ctc_loss(be, &logits, &seqs, targets, reduction)?;
    let dlogits = out.grad;
    let head_weight = be.linear_weight_grad(&dlogits, &x)?;
    let head_bias = be.column_sum(&dlogits)?;
    let mut dx = be.linear_input_grad(&dlogits, &head.weight, None)?;
    let mut wgrads = Grads { be, eps, on: train_weights, map: BTreeMap::new(), stacked: Vec::new() };
    if c.do_stable_layer_norm {
        dx = wgrads.norm("wav2vec2.encoder.layer_norm", &dx, &encoder_out_pre, &model.encoder_layer_norm)?;
    }
    let full = train_weights || reg.time_mask.is_some();
    // Without masks, time masking or weight training only the head trains: no layer's backward runs.
    let lowest = if full { 0 } else { masks.iter().map(|m| m.layer).min().unwrap_or(n_layers) };
    let mut score_grads: Vec<Option<Tensor>> = vec![None; masks.len()];
    // The straight-through score gradients of linear `which`'s scored parts, from the gradient
    // `dy` at its output and its input `x` (nothing to do for a linear without scores).
    let mut to_scores = |lw: &LayerWeights, which: usize, dy: &Tensor, x: &Tensor| -> Result<()> {
        let (ks, blocks) = lw.scored(which, &scores);
        if !blocks.is_empty() {
            for (k, g) in ks.into_iter().zip(be.score_grads(dy, x, &lw.linear(which).0.weight, &blocks)?) {
                score_grads[k] = Some(g);
            }
        }
        Ok(())
    };
    // The gradient of a linear's weight, when weights train.
    let weight_grad = |dy: &Tensor, x: &Tensor| train_weights.then(|| be.linear_weight_grad(dy, x)).transpose();
    for (i, (lw, tape)) in weights.iter().zip(&tapes).enumerate().rev() {
        if i < lowest {
            break;
        }
        let Some(tape) = tape else { continue }; // a skipped layer is the identity
        let layer = lw.layer;
        let name = |suffix: &str| format!("wav2vec2.encoder.layers.{i}.{suffix}");
        if let (Some(ad), Some(ad_tape)) = (&layer.adapter, &tape.adapter) {
            dx = adapter_grad(be, ad, ad_tape, dx, &mut wgrads, &name("adapter_layer"))?;
        }
        // The FFN: gradient at its (dropped) output, after the residual path is split off.
        let (d_ffn_out, d_skip) = if c.do_stable_layer_norm {
            (dx.clone(), dx.clone())
        } else {
            let residual2 = tape.residual2.as_ref().expect("post-LN tapes keep the second residual");
            let dr2 = wgrads.norm(&name("final_layer_norm"), &dx, residual2, &layer.final_layer_norm)?;
            (dr2.clone(), dr2)
        };
        let d_ffn_out = drop(reg.dropout, site(i, SITE_FFN_OUT), d_ffn_out)?;
        let (output_dense, out_mask) = lw.linear(3);
        if lw.part(Part::Output).is_some() || train_weights {
            let post_gelu = be.gelu_as_operand(&tape.pre_gelu, activation_dropout(i))?;
            to_scores(lw, 3, &d_ffn_out, &post_gelu)?;
            wgrads.linear(&name("feed_forward.output_dense"), weight_grad(&d_ffn_out, &post_gelu)?, &d_ffn_out)?;
        }
        let dg = be.linear_input_grad(&d_ffn_out, &output_dense.weight, out_mask)?;
        let du = be.gelu_grad_as_operand(&dg, &tape.pre_gelu, activation_dropout(i))?;
        let (intermediate, inter_mask) = lw.linear(2);
        if lw.part(Part::Intermediate).is_some() || train_weights {
            let ffn_in = if c.do_stable_layer_norm {
                norm(&layer.final_layer_norm, tape.second.as_ref().expect("pre-LN tapes keep the second norm's input"))?
            } else {
                norm(&layer.layer_norm, tape.first.as_ref().expect("post-LN tapes keep the first norm's input"))?
            };
            to_scores(lw, 2, &du, &ffn_in)?;
            wgrads.linear(&name("feed_forward.intermediate_dense"), weight_grad(&du, &ffn_in)?, &du)?;
        }
        if i == lowest && !lw.attention_masked() && !full {
            break; // nothing below this FFN's weights is trained
        }
        let d_ffn_in = be.linear_input_grad(&du, &intermediate.weight, inter_mask)?;
        let d_skip = if c.do_stable_layer_norm {
            let second = tape.second.as_ref().expect("pre-LN tapes keep the second norm's input");
            be.add(d_skip, &wgrads.norm(&name("final_layer_norm"), &d_ffn_in, second, &layer.final_layer_norm)?)?
        } else {
            be.add(d_skip, &d_ffn_in)?
        };
        // d_skip: gradient at `x1` (pre-LN) or at the first norm's output `h1` (post-LN).
        let d_attn_out = if c.do_stable_layer_norm {
            d_skip
        } else {
            let r1 = tape.first.as_ref().expect("post-LN tapes keep the first norm's input");
            wgrads.norm(&name("layer_norm"), &d_skip, r1, &layer.layer_norm)?
        };
        let d_input = d_attn_out.clone();
        let d_o = drop(reg.dropout, site(i, SITE_ATTENTION_OUT), d_attn_out)?;
        let (out_proj, out_proj_mask) = lw.linear(1);
        // `attended` is kept exactly when out_proj is scored or weights train.
        if let Some(saved) = &tape.attended {
            to_scores(lw, 1, &d_o, &saved.out)?;
            wgrads.linear(&name("attention.out_proj"), weight_grad(&d_o, &saved.out)?, &d_o)?;
        }
        let d_att = be.linear_input_grad(&d_o, &out_proj.weight, out_proj_mask)?;
        let d_qkv = match &tape.attended {
            Some(saved) => be.attention_grad_saved(&d_att, &tape.qkv, saved, &seqs, heads, scale, probs_dropout(i))?,
            None => be.attention_grad(&d_att, &tape.qkv, &seqs, heads, scale, probs_dropout(i))?,
        };
        // Kept exactly when q/k/v are scored or weights train.
        if let Some(attn_in) = if c.do_stable_layer_norm { &tape.first } else { &tape.input } {
            to_scores(lw, 0, &d_qkv, attn_in)?;
            if let Some(dw) = weight_grad(&d_qkv, attn_in)? {
                wgrads.stacked.push((name("attention"), dw, be.column_sum(&d_qkv)?));
            }
        }
        if i == lowest && !full {
            break;
        }
        let (qkv_proj, qkv_mask) = lw.linear(0);
        let d_attn_in = be.linear_input_grad(&d_qkv, &qkv_proj.weight, qkv_mask)?;
        dx = if c.do_stable_layer_norm {
            let input = tape.input.as_ref().expect("pre-LN tapes keep the layer input");
            be.add(d_input, &wgrads.norm(&name("layer_norm"), &d_attn_in, input, &layer.layer_norm)?)?
        } else {
            be.add(d_input, &d_attn_in)?
        };
    }
    let mut embedding = None;
    let mut d_features = None;
    if full {
        let below = Below { summed: &summed, pos: &pos_tapes, seqs: &seqs };
        let d_proj = encoder_input_grad(be, model, drop(reg.dropout, 0, dx)?, &below, &mut wgrads)?;
        let frames = reg.time_mask.as_ref().map(|tm| tm.frames);
        let d_proj = if frames.is_some() || reg.channel_mask.is_some() {
            let (d, e) = be.mask_features_grad(d_proj, &seqs, frames, reg.channel_mask)?;
            embedding = e;
            d
        } else {
            d_proj
        };
        if let Some((features, normed)) = &projection_tape {
            d_features = Some(projection_grads(be, model, d_proj, features, normed, &mut wgrads)?);
        }
    }
    let host = |t: &Tensor| be.to_host(t)?.into_f32_vec();
    let mut weight_grads = wgrads.into_named(h)?;
    if let (Some(tape), Some(d)) = (encoder_tape, d_features) {
        encoder::backward(be, model, &tape, d, &mut weight_grads)?;
    }
    Ok(StepGrads {
        loss: out.loss,
        losses: out.losses,
        scores: score_grads,
        head_weight: host(&head_weight)?,
        head_bias: host(&head_bias)?,
        embedding: embedding.as_ref().map(host).transpose()?,
        weights: weight_grads,
    })
}

/// The weight gradients a step collects (when `on`), by checkpoint name, left on the device
/// until the step ends.
struct Grads<'b> {
    be: &'b dyn TrainBackend,
    eps: f32,
    on: bool,
    map: BTreeMap<String, Tensor>,
    /// `(prefix, dW, db)` of each stacked q/k/v projection, split into `q_proj`, `k_proj` and
    /// `v_proj` when the step ends.
    stacked: Vec<(String, Tensor, Tensor)>,
}

impl Grads<'_> {
    /// Back through layer norm `norm` (input `x`, output gradient `dy`): returns the input's
    /// gradient and collects `{prefix}.weight` / `.bias`.
    fn norm(&mut self, prefix: &str, dy: &Tensor, x: &Tensor, norm: &Norm) -> Result<Tensor> {
        self.norm_eps(prefix, dy, x, norm, self.eps)
    }

    /// [`Grads::norm`] of a norm with its own epsilon.
    fn norm_eps(&mut self, prefix: &str, dy: &Tensor, x: &Tensor, norm: &Norm, eps: f32) -> Result<Tensor> {
        let (dx, params) = self.be.layer_norm_grads(dy, x, norm.params(eps), self.on)?;
        if let Some((dgamma, dbeta)) = params {
            self.map.insert(format!("{prefix}.weight"), dgamma);
            self.map.insert(format!("{prefix}.bias"), dbeta);
        }
        Ok(dx)
    }

    /// `{prefix}.weight` (its gradient `dw`, computed already) and `.bias` of a linear whose
    /// output gradient is `dy`.
    fn linear(&mut self, prefix: &str, dw: Option<Tensor>, dy: &Tensor) -> Result<()> {
        if let (true, Some(dw)) = (self.on, dw) {
            self.map.insert(format!("{prefix}.weight"), dw);
            self.map.insert(format!("{prefix}.bias"), self.be.column_sum(dy)?);
        }
        Ok(())
    }

    /// Every collected gradient by checkpoint name; the stacked q/k/v ones split (`h` rows each).
    fn into_named(self, h: usize) -> Result<BTreeMap<String, Tensor>> {
        let mut out = self.map;
        for (prefix, dw, db) in &self.stacked {
            for (p, proj) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                out.insert(format!("{prefix}.{proj}.weight"), self.be.rows(dw, p * h, h)?);
                out.insert(format!("{prefix}.{proj}.bias"), self.be.rows(db, p * h, h)?);
            }
        }
        Ok(out)
    }
}

/// The feature projection `Linear(LayerNorm(features))` of the feature encoder's output,
/// keeping `(features, normalised)` in `tape` for [`projection_grads`].
fn project(
    be: &dyn TrainBackend,
    model: &Wav2Vec2,
    features: Tensor,
    seqs: Seqs,
    tape: &mut Option<(Tensor, Tensor)>,
) -> Result<(Tensor, Seqs)> {
    let c = &model.config;
    let params = model.feature_projection_norm.params(c.layer_norm_eps);
    let normed = be.layer_norm(features.clone(), None, params, Activation::Identity)?;
    let lin = &model.feature_projection;
    let projected = be.linear(&normed, &lin.weight, Some(&lin.bias), Activation::Identity)?;
    *tape = Some((features, normed));
    Ok((projected, seqs))
}

/// What one positional conv keeps for its backward pass.
struct PosTape {
    input: Tensor,
    /// The conv's output.
    conv: Tensor,
    /// data2vec-audio: the norm of `conv`, GELU's input.
    normed: Option<Tensor>,
}

/// The positional embedding of the masked projected features `x` (see
/// [`Wav2Vec2::positional`]), and what each conv keeps for backward.
fn positional(be: &dyn TrainBackend, model: &Wav2Vec2, x: &Tensor, seqs: &Seqs) -> Result<(Tensor, Vec<PosTape>)> {
    let geom = model.pos_conv_geometry();
    let mut y = x.clone();
    let mut tapes = Vec::with_capacity(model.pos_conv.len());
    for layer in &model.pos_conv {
        let conv = be.conv1d(&y, seqs, seqs, &layer.weight, Some(&layer.bias), geom, Activation::Identity)?;
        let normed = match &model.pos_conv_norm {
            Some(n) => Some(be.layer_norm(conv.clone(), None, n.params(DEFAULT_NORM_EPS), Activation::Identity)?),
            None => None,
        };
        let out = be.gelu(normed.as_ref().unwrap_or(&conv), None)?;
        tapes.push(PosTape { input: std::mem::replace(&mut y, out), conv, normed });
    }
    Ok((y, tapes))
}

/// What the stages below layer 0 computed in the forward pass.
struct Below<'a> {
    /// `projected + pos(projected)`, before the encoder norm (post-LN).
    summed: &'a Tensor,
    pos: &'a [PosTape],
    seqs: &'a Seqs,
}

/// From `dx` below the encoder's input dropout down to the masked projected features: through
/// the encoder's input norm (post-LN), the residual and the positional convs (per utterance),
/// collecting the norm's and the positional convs' gradients on the way.
fn encoder_input_grad(be: &dyn TrainBackend, model: &Wav2Vec2, dx: Tensor, below: &Below, wgrads: &mut Grads) -> Result<Tensor> {
    let c = &model.config;
    let d_sum = if c.do_stable_layer_norm {
        dx
    } else {
        wgrads.norm("wav2vec2.encoder.layer_norm", &dx, below.summed, &model.encoder_layer_norm)?
    };
    let (geom, seqs) = (model.pos_conv_geometry(), below.seqs);
    let mut d = d_sum.clone();
    for (i, (layer, tape)) in model.pos_conv.iter().zip(below.pos).enumerate().rev() {
        let d_act = be.gelu_grad(&d, tape.normed.as_ref().unwrap_or(&tape.conv), None)?;
        let d_conv = match &model.pos_conv_norm {
            Some(n) => be.layer_norm_grads(&d_act, &tape.conv, n.params(DEFAULT_NORM_EPS), false)?.0,
            None => d_act,
        };
        if wgrads.on {
            let [w_name, b_name] = match c.pos_conv.stacked {
                Some(_) => pos_conv_layer_names(i),
                None => [POS_CONV_WEIGHT, POS_CONV_BIAS].map(str::to_string),
            };
            let dw = be.conv1d_weight_grad(&d_conv, &tape.input, seqs, seqs, geom)?;
            wgrads.map.insert(w_name, be.swap_last_two(&dw)?);
            wgrads.map.insert(b_name, be.column_sum(&d_conv)?);
        }
        d = be.conv1d_input_grad(&d_conv, &layer.weight, seqs, seqs, geom)?;
    }
    be.add(d_sum, &d)
}

/// The feature projection's gradients from the gradient at its output (zero already where
/// time or channel masking replaced it): the linear, then the norm. Returns the gradient at
/// the feature encoder's output.
fn projection_grads(
    be: &dyn TrainBackend,
    model: &Wav2Vec2,
    d_proj: Tensor,
    features: &Tensor,
    normed: &Tensor,
    wgrads: &mut Grads,
) -> Result<Tensor> {
    let dw = be.linear_weight_grad(&d_proj, normed)?;
    wgrads.linear("wav2vec2.feature_projection.projection", Some(dw), &d_proj)?;
    let d_normed = be.linear_input_grad(&d_proj, &model.feature_projection.weight, None)?;
    wgrads.norm("wav2vec2.feature_projection.layer_norm", &d_normed, features, &model.feature_projection_norm)
}
