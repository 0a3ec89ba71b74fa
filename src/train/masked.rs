//! One training forward/backward on the CPU: chosen linears of the encoder layers (the FFN's two,
//! attention's four, or all six) masked by the per-matrix top-k of their scores, the training
//! regularisers (time and channel masking, dropout, LayerDrop), CTC loss, and the gradients of
//! the scores (straight-through), the head and the time-mask embedding; with `train_weights`
//! (weight finetuning) also of every weight, bias and norm above the frozen feature encoder.
//!
//! Frozen stages run without a tape; each encoder layer keeps only what its backward needs
//! (attention probabilities and dropout masks are recomputed), and the backward stops at the
//! lowest trainable tensor: layer 0's lowest masked linear, the time-mask embedding when time
//! masking is on, or the feature projection when weights train. This is the readable reference
//! the GPU path is to mirror.

use std::collections::BTreeMap;

use anyhow::{ensure, Context, Result};
use rayon::prelude::*;

use super::encoder;
use crate::backend::cpu::attention::{attention, ProbDropout};
use crate::backend::cpu::grad::{
    attention_grad, bias_grad, conv1d_input_grad, conv1d_weight_grad, gelu_input_grad, layer_norm_grads, linear_input_grad,
    linear_weight_grad,
};
use crate::backend::cpu::math::{add_assign, gelu};
use crate::backend::cpu::CpuBackend;
use crate::backend::{Activation, Backend, Seqs};
use crate::ctc::{ctc_loss, CtcTargets, Reduction};
use crate::dropout::Dropout;
use crate::model::wav2vec2::{torch_layout, EncoderLayer, Linear, Norm};
use crate::model::Wav2Vec2;
use crate::router::{score_grad, top_k_mask};
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

/// A masked weight: its frozen values in PyTorch's `[out, in]` layout and its scores.
pub struct MaskedWeight {
    pub layer: usize,
    pub part: Part,
    pub d_out: usize,
    pub d_in: usize,
    pub weight: Vec<f32>,
    pub scores: Vec<f32>,
}

impl MaskedWeight {
    /// The frozen `[out, in]` weight of `part` of `model`'s layer `layer` (CPU-prepared linears
    /// are stored `[in, out]`), with `scores` (empty: zeros, to be initialised by the caller).
    pub fn new(model: &Wav2Vec2, layer: usize, part: Part, scores: Vec<f32>) -> Result<MaskedWeight> {
        let name = part.weight_name(layer);
        let l = model.layers.get(layer).ok_or_else(|| anyhow::anyhow!("{name}: the model has {} layers", model.layers.len()))?;
        let (lin, row0) = part.linear(l);
        let &[d_in, stacked] = lin.weight.shape() else { anyhow::bail!("{name}: not a 2-D weight") };
        let d_out = if matches!(part, Part::Query | Part::Key | Part::Value) { stacked / 3 } else { stacked };
        let weight = lin.rows_out_in(row0, d_out).with_context(|| name.clone())?;
        let scores = if scores.is_empty() { vec![0.0; weight.len()] } else { scores };
        ensure!(scores.len() == weight.len(), "{name}: {} scores for a {d_out} x {d_in} weight", scores.len());
        Ok(MaskedWeight { layer, part, d_out, d_in, weight, scores })
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
/// too, the projected features (`[frames, hidden]`, what mask learning caches).
pub enum Features<'a> {
    Audio(&'a [&'a [f32]]),
    Encoded(Vec<f32>, Seqs),
    Projected(Vec<f32>, Seqs),
}

/// Dropout sites: 0 is the encoder input; layer `i` owns `1 + 4i ..= 4 + 4i`.
fn site(layer: usize, k: u64) -> u64 {
    1 + 4 * layer as u64 + k
}
const SITE_ATTENTION_PROBS: u64 = 0;
const SITE_ATTENTION_OUT: u64 = 1;
const SITE_ACTIVATION: u64 = 2;
const SITE_FFN_OUT: u64 = 3;

fn drop_in_place(d: Option<Dropout>, site: u64, x: &mut [f32]) {
    if let Some(d) = d {
        d.apply(site, x);
    }
}

/// Loss and gradients of one step.
pub struct StepGrads {
    pub loss: f32,
    pub losses: Vec<f32>,
    /// Per masked weight, in the order given; `None` for a weight in a layer LayerDrop skipped.
    pub scores: Vec<Option<Vec<f32>>>,
    /// Head gradients, `[vocab, hidden]` and `[vocab]`.
    pub head_weight: Vec<f32>,
    pub head_bias: Vec<f32>,
    /// Gradient of the time-mask embedding, when a [`TimeMask`] was given.
    pub embedding: Option<Vec<f32>>,
    /// With `train_weights`: the gradient of every weight, bias and norm the step used, by its
    /// checkpoint name in PyTorch's layout; the positional conv's as the folded
    /// `...pos_conv_embed.conv.weight` `[out, in/groups, kernel]` (see
    /// [`crate::backend::cpu::grad::weight_norm_grads`]). Skipped layers have none.
    pub weights: BTreeMap<String, Vec<f32>>,
}

/// The checkpoint name of the folded positional-conv weight in [`StepGrads::weights`].
pub const POS_CONV_WEIGHT: &str = "wav2vec2.encoder.pos_conv_embed.conv.weight";

/// What one encoder layer keeps for its backward pass.
struct Tape {
    input: Vec<f32>,
    qkv: Vec<f32>,
    /// Attention output before `out_proj` (kept only when `out_proj` is masked).
    attended: Vec<f32>,
    /// Post-LN: `attention + input` before the first norm; pre-LN: the first norm's output.
    first: Vec<f32>,
    /// Pre-LN: `input + attention`, the second norm's input (unused post-LN).
    second: Vec<f32>,
    /// The FFN's input (post-LN: = `second`; pre-LN: the second norm's output).
    ffn_in: Vec<f32>,
    pre_gelu: Vec<f32>,
    /// After activation dropout: the input of `output_dense`.
    post_gelu: Vec<f32>,
    /// Post-LN: `ffn + second` before the final norm.
    residual2: Vec<f32>,
}

/// The four linears of a layer as this step computes with them: `W * M` where masked, the
/// frozen weight otherwise.
struct LayerWeights<'a> {
    layer: &'a EncoderLayer,
    /// Index into the masked weights, per [`Part`] (in declaration order).
    masked: [Option<usize>; 6],
    effective: [Option<Tensor>; 4],
}

impl LayerWeights<'_> {
    fn part(&self, p: Part) -> Option<usize> {
        self.masked[p as usize]
    }

    /// The weight (CPU layout) of linear 0 = qkv, 1 = out, 2 = intermediate, 3 = output.
    fn weight(&self, which: usize) -> &Tensor {
        let l = self.layer;
        let frozen = match which {
            0 => &l.qkv_proj,
            1 => &l.out_proj,
            2 => &l.intermediate_dense,
            _ => &l.output_dense,
        };
        self.effective[which].as_ref().unwrap_or(&frozen.weight)
    }

    fn attention_masked(&self) -> bool {
        self.masked[..4].iter().any(Option::is_some)
    }
}

/// `W * M` in the CPU `[in, out]` layout for every linear of `layer` with masked parts.
fn layer_weights<'a>(layer: &'a EncoderLayer, index: usize, masks: &[MaskedWeight], sparsity: f64) -> Result<LayerWeights<'a>> {
    let mut masked = [None; 6];
    for (k, m) in masks.iter().enumerate().filter(|(_, m)| m.layer == index) {
        masked[m.part as usize] = Some(k);
    }
    let groups: [&[Part]; 4] = [&[Part::Query, Part::Key, Part::Value], &[Part::Out], &[Part::Intermediate], &[Part::Output]];
    let mut effective: [Option<Tensor>; 4] = Default::default();
    for (slot, parts) in effective.iter_mut().zip(groups) {
        let present: Vec<(Part, &MaskedWeight)> = parts.iter().filter_map(|&p| masked[p as usize].map(|k| (p, &masks[k]))).collect();
        let Some(&(first, _)) = present.first() else { continue };
        let lin = first.linear(layer).0;
        let shape = lin.weight.shape().to_vec();
        let mut w_t = lin.weight.f32s()?.to_vec();
        for (p, m) in present {
            let row0 = p.linear(layer).1;
            for (j, keep) in top_k_mask(&m.scores, sparsity).into_iter().enumerate() {
                if !keep {
                    w_t[(j % m.d_in) * shape[1] + row0 + j / m.d_in] = 0.0;
                }
            }
        }
        *slot = Some(Tensor::from_vec(w_t, &shape));
    }
    Ok(LayerWeights { layer, masked, effective })
}

fn v(t: &Tensor) -> Result<Vec<f32>> {
    t.to_vec()
}

fn add(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(x, y)| x + y).collect()
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

/// One forward/backward of the masked model: `masks` names (layer, part) and scores of every
/// masked weight (none: only the head, and the embedding under time masking, train); `head` is
/// the trainable CTC head; `reg` the step's regularisers; `trained` adds the gradients of the
/// weights that train ([`StepGrads::weights`]).
#[allow(clippy::too_many_arguments)]
pub fn step(
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
    let be = CpuBackend;
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
    // The per-matrix top-k selections are independent: one task per layer.
    let weights: Vec<LayerWeights> =
        model.layers.par_iter().enumerate().map(|(i, l)| layer_weights(l, i, masks, sparsity)).collect::<Result<_>>()?;
    let linear = |w: &Tensor, b: &Tensor, x: &[f32], d_in: usize| -> Result<Vec<f32>> {
        v(&be.linear(&Tensor::from_vec(x.to_vec(), &[x.len() / d_in, d_in]), w, Some(b), id)?)
    };
    let norm = |n: &Norm, x: &[f32]| -> Result<Vec<f32>> {
        v(&be.layer_norm(Tensor::from_vec(x.to_vec(), &[x.len() / h, h]), None, n.params(eps), id)?)
    };
    let probs_dropout = |i: usize| reg.attention_dropout.map(|dropout| ProbDropout { dropout, site: site(i, SITE_ATTENTION_PROBS) });

    // Forward: projected features, time and channel masking, positional conv, then the layers.
    let (mut projection_tape, mut encoder_tape) = (None, None);
    let (mut projected, seqs) = match features {
        Features::Audio(audio) if !train_weights => {
            let (p, seqs) = model.projected(&be, audio)?;
            (v(&p)?, seqs)
        }
        Features::Audio(audio) if trained == Weights::All => {
            let (f, seqs, tape) = encoder::forward(model, audio)?;
            encoder_tape = Some(tape);
            project(model, f, seqs, &mut projection_tape)?
        }
        Features::Audio(audio) => {
            let (f, seqs) = model.feature_encoder(&be, audio)?;
            project(model, v(&f)?, seqs, &mut projection_tape)?
        }
        Features::Encoded(..) | Features::Projected(..) if trained == Weights::All => {
            anyhow::bail!("training the feature encoder needs the raw audio, not cached features")
        }
        Features::Encoded(f, seqs) => project(model, f, seqs, &mut projection_tape)?,
        Features::Projected(p, seqs) => {
            ensure!(!train_weights, "training the weights needs the feature encoder's output, not projected features");
            ensure!(p.len() == seqs.total() * h, "{} projected values for {} frames x {h} channels", p.len(), seqs.total());
            (p, seqs)
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
        for (row, _) in projected.chunks_exact_mut(h).zip(tm.frames).filter(|(_, &m)| m) {
            row.copy_from_slice(tm.embedding);
        }
    }
    if let Some(cm) = reg.channel_mask {
        ensure!(cm.len() == seqs.count() * h, "channel mask: {} flags for {} utterances x {h} channels", cm.len(), seqs.count());
        for u in 0..seqs.count() {
            for row in projected[seqs.range(u).start * h..seqs.range(u).end * h].chunks_exact_mut(h) {
                row.iter_mut().zip(&cm[u * h..(u + 1) * h]).filter(|(_, &m)| m).for_each(|(x, _)| *x = 0.0);
            }
        }
    }
    let geom = model.pos_conv_geometry();
    let pos_pre = v(&be.conv1d(
        &Tensor::from_vec(projected.clone(), &[seqs.total(), h]),
        &seqs,
        &seqs,
        &model.pos_conv_weight,
        Some(&model.pos_conv_bias),
        geom,
        id,
    )?)?;
    let summed: Vec<f32> = projected.iter().zip(&pos_pre).map(|(x, &p)| x + gelu(p)).collect();
    let mut x = if c.do_stable_layer_norm { summed.clone() } else { norm(&model.encoder_layer_norm, &summed)? };
    drop_in_place(reg.dropout, 0, &mut x);
    let mut tapes: Vec<Option<Tape>> = Vec::with_capacity(n_layers);
    for (i, lw) in weights.iter().enumerate() {
        if skipped(i) {
            tapes.push(None);
            continue;
        }
        let layer = lw.layer;
        let (d_qkv_out, inter) = (3 * h, layer.intermediate_dense.bias.numel());
        let keep_attended = lw.part(Part::Out).is_some() || train_weights;
        // Attention: (qkv, attention output before out_proj, dropped out_proj output).
        let attend = |a: &[f32]| -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
            let qkv = linear(lw.weight(0), &layer.qkv_proj.bias, a, h)?;
            debug_assert_eq!(qkv.len() % d_qkv_out, 0);
            let att = attention(&qkv, h, &seqs, heads, scale, probs_dropout(i));
            let mut o = linear(lw.weight(1), &layer.out_proj.bias, &att, h)?;
            drop_in_place(reg.dropout, site(i, SITE_ATTENTION_OUT), &mut o);
            Ok((qkv, if keep_attended { att } else { Vec::new() }, o))
        };
        // The FFN: (pre-GELU, dropped post-GELU, dropped output).
        let feed_forward = |inp: &[f32]| -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
            let u = linear(lw.weight(2), &layer.intermediate_dense.bias, inp, h)?;
            let mut g: Vec<f32> = u.iter().map(|&z| gelu(z)).collect();
            drop_in_place(reg.activation_dropout, site(i, SITE_ACTIVATION), &mut g);
            let mut f2 = linear(lw.weight(3), &layer.output_dense.bias, &g, inter)?;
            drop_in_place(reg.dropout, site(i, SITE_FFN_OUT), &mut f2);
            Ok((u, g, f2))
        };
        let tape = if c.do_stable_layer_norm {
            let a = norm(&layer.layer_norm, &x)?;
            let (qkv, attended, o) = attend(&a)?;
            let x1 = add(&x, &o);
            let b = norm(&layer.final_layer_norm, &x1)?;
            let (u, g, f2) = feed_forward(&b)?;
            let out = add(&x1, &f2);
            let tape = Tape { input: x, qkv, attended, first: a, second: x1, ffn_in: b, pre_gelu: u, post_gelu: g, residual2: Vec::new() };
            x = out;
            tape
        } else {
            let (qkv, attended, o) = attend(&x)?;
            let r1 = add(&o, &x);
            let h1 = norm(&layer.layer_norm, &r1)?;
            let (u, g, f2) = feed_forward(&h1)?;
            let r2 = add(&f2, &h1);
            let out = norm(&layer.final_layer_norm, &r2)?;
            let tape =
                Tape { input: x, qkv, attended, first: r1, second: Vec::new(), ffn_in: h1, pre_gelu: u, post_gelu: g, residual2: r2 };
            x = out;
            tape
        };
        tapes.push(Some(tape));
    }
    let encoder_out_pre = x.clone();
    if c.do_stable_layer_norm {
        x = norm(&model.encoder_layer_norm, &x)?;
    }
    let vocab = head.bias.numel();
    let logits = Tensor::from_vec(linear(&head.weight, &head.bias, &x, h)?, &[seqs.total(), vocab]);

    // Backward. The lowest layer whose backward must run: every layer when weights train or
    // time masking is on (the embedding sits below them all), else the lowest masked weight.
    let out = ctc_loss(&be, &logits, &seqs, targets, reduction)?;
    let dlogits = v(&out.grad)?;
    let head_weight = linear_weight_grad(&dlogits, &x, h, vocab);
    let head_bias = bias_grad(&dlogits, vocab);
    let mut dx = linear_input_grad(&dlogits, head.weight.f32s()?, h, vocab);
    let mut wgrads = Grads { on: train_weights, map: BTreeMap::new() };
    if c.do_stable_layer_norm {
        dx = wgrads.norm("wav2vec2.encoder.layer_norm", &dx, &encoder_out_pre, &model.encoder_layer_norm, eps)?;
    }
    let full = train_weights || reg.time_mask.is_some();
    // Without masks, time masking or weight training only the head trains: no layer's backward runs.
    let lowest = if full { 0 } else { masks.iter().map(|m| m.layer).min().unwrap_or(n_layers) };
    let mut scores: Vec<Option<Vec<f32>>> = vec![None; masks.len()];
    // The straight-through score gradient of masked weight `k` from `dW_eff` of its linear
    // (`stacked` output rows; the part's rows start at its offset).
    let to_scores = |k: usize, dw: &[f32], row0: usize| -> Vec<f32> {
        let m = &masks[k];
        score_grad(&dw[row0 * m.d_in..(row0 + m.d_out) * m.d_in], &m.weight, &m.scores)
    };
    for (i, (lw, tape)) in weights.iter().zip(&tapes).enumerate().rev() {
        if i < lowest {
            break;
        }
        let Some(tape) = tape else { continue }; // a skipped layer is the identity
        let layer = lw.layer;
        let name = |suffix: &str| format!("wav2vec2.encoder.layers.{i}.{suffix}");
        let inter = layer.intermediate_dense.bias.numel();
        // The FFN: gradient at its (dropped) output, after the residual path is split off.
        let (mut d_ffn_out, mut d_skip) = if c.do_stable_layer_norm {
            (dx.clone(), std::mem::take(&mut dx))
        } else {
            let dr2 = wgrads.norm(&name("final_layer_norm"), &dx, &tape.residual2, &layer.final_layer_norm, eps)?;
            (dr2.clone(), dr2)
        };
        drop_in_place(reg.dropout, site(i, SITE_FFN_OUT), &mut d_ffn_out);
        let output_dense = lw.part(Part::Output).is_some() || train_weights;
        let dw = output_dense.then(|| linear_weight_grad(&d_ffn_out, &tape.post_gelu, inter, h));
        if let Some(k) = lw.part(Part::Output) {
            scores[k] = Some(to_scores(k, dw.as_ref().expect("computed for a masked weight"), 0));
        }
        wgrads.linear(&name("feed_forward.output_dense"), dw, &d_ffn_out, h);
        let mut dg = linear_input_grad(&d_ffn_out, lw.weight(3).f32s()?, inter, h);
        drop_in_place(reg.activation_dropout, site(i, SITE_ACTIVATION), &mut dg);
        let du = gelu_input_grad(&dg, &tape.pre_gelu);
        let dw = (lw.part(Part::Intermediate).is_some() || train_weights).then(|| linear_weight_grad(&du, &tape.ffn_in, h, inter));
        if let Some(k) = lw.part(Part::Intermediate) {
            scores[k] = Some(to_scores(k, dw.as_ref().expect("computed for a masked weight"), 0));
        }
        wgrads.linear(&name("feed_forward.intermediate_dense"), dw, &du, inter);
        if i == lowest && !lw.attention_masked() && !full {
            break; // nothing below this FFN's weights is trained
        }
        let d_ffn_in = linear_input_grad(&du, lw.weight(2).f32s()?, h, inter);
        if c.do_stable_layer_norm {
            add_assign(&mut d_skip, &wgrads.norm(&name("final_layer_norm"), &d_ffn_in, &tape.second, &layer.final_layer_norm, eps)?);
        } else {
            add_assign(&mut d_skip, &d_ffn_in);
        }
        // d_skip: gradient at `x1` (pre-LN) or at the first norm's output `h1` (post-LN).
        let d_attn_out =
            if c.do_stable_layer_norm { d_skip } else { wgrads.norm(&name("layer_norm"), &d_skip, &tape.first, &layer.layer_norm, eps)? };
        let mut d_input = d_attn_out.clone();
        let mut d_o = d_attn_out;
        drop_in_place(reg.dropout, site(i, SITE_ATTENTION_OUT), &mut d_o);
        let dw = (lw.part(Part::Out).is_some() || train_weights).then(|| linear_weight_grad(&d_o, &tape.attended, h, h));
        if let Some(k) = lw.part(Part::Out) {
            scores[k] = Some(to_scores(k, dw.as_ref().expect("computed for a masked weight"), 0));
        }
        wgrads.linear(&name("attention.out_proj"), dw, &d_o, h);
        let d_att = linear_input_grad(&d_o, lw.weight(1).f32s()?, h, h);
        let d_qkv = attention_grad(&d_att, &tape.qkv, h, &seqs, heads, scale, probs_dropout(i));
        let attn_in = if c.do_stable_layer_norm { &tape.first } else { &tape.input };
        let qkv_parts = [(Part::Query, 0, "q_proj"), (Part::Key, h, "k_proj"), (Part::Value, 2 * h, "v_proj")];
        if qkv_parts.iter().any(|&(p, ..)| lw.part(p).is_some()) || train_weights {
            let dw = linear_weight_grad(&d_qkv, attn_in, h, 3 * h);
            let db = wgrads.on.then(|| bias_grad(&d_qkv, 3 * h));
            for (p, row0, proj) in qkv_parts {
                if let Some(k) = lw.part(p) {
                    scores[k] = Some(to_scores(k, &dw, row0));
                }
                if let Some(db) = &db {
                    let proj = name(&format!("attention.{proj}"));
                    wgrads.map.insert(format!("{proj}.weight"), dw[row0 * h..(row0 + h) * h].to_vec());
                    wgrads.map.insert(format!("{proj}.bias"), db[row0..row0 + h].to_vec());
                }
            }
        }
        if i == lowest && !full {
            break;
        }
        let d_attn_in = linear_input_grad(&d_qkv, lw.weight(0).f32s()?, h, 3 * h);
        if c.do_stable_layer_norm {
            add_assign(&mut d_input, &wgrads.norm(&name("layer_norm"), &d_attn_in, &tape.input, &layer.layer_norm, eps)?);
        } else {
            add_assign(&mut d_input, &d_attn_in);
        }
        dx = d_input;
    }
    let embedding = if full {
        let below = Below { summed: &summed, pos_pre: &pos_pre, projected: &projected, seqs: &seqs };
        let d_proj = encoder_input_grad(model, dx, &below, reg, &mut wgrads)?;
        let embedding = reg.time_mask.as_ref().map(|tm| embedding_grad(&d_proj, &seqs, tm, reg.channel_mask));
        if let Some((features, normed)) = &projection_tape {
            let d_features = projection_grads(model, d_proj, features, normed, &seqs, reg, &mut wgrads)?;
            if let Some(tape) = &encoder_tape {
                encoder::backward(model, tape, d_features, &mut wgrads.map)?;
            }
        }
        embedding
    } else {
        None
    };
    Ok(StepGrads { loss: out.loss, losses: out.losses, scores, head_weight, head_bias, embedding, weights: wgrads.map })
}

/// The weight gradients a step collects (when `on`), by checkpoint name.
struct Grads {
    on: bool,
    map: BTreeMap<String, Vec<f32>>,
}

impl Grads {
    /// Back through layer norm `norm` (input `x`, output gradient `dy`): returns the input's
    /// gradient and collects `{prefix}.weight` / `.bias`.
    fn norm(&mut self, prefix: &str, dy: &[f32], x: &[f32], norm: &Norm, eps: f32) -> Result<Vec<f32>> {
        let (dx, params) = layer_norm_grads(dy, x, norm.gamma.f32s()?, eps, self.on);
        if let Some((dgamma, dbeta)) = params {
            self.map.insert(format!("{prefix}.weight"), dgamma);
            self.map.insert(format!("{prefix}.bias"), dbeta);
        }
        Ok(dx)
    }

    /// `{prefix}.weight` (its gradient `dw`, computed already) and `.bias` of a linear whose
    /// output gradient is `dy`.
    fn linear(&mut self, prefix: &str, dw: Option<Vec<f32>>, dy: &[f32], d_out: usize) {
        if let (true, Some(dw)) = (self.on, dw) {
            self.map.insert(format!("{prefix}.weight"), dw);
            self.map.insert(format!("{prefix}.bias"), bias_grad(dy, d_out));
        }
    }
}

/// The feature projection `Linear(LayerNorm(features))` of the feature encoder's output,
/// keeping `(features, normalised)` in `tape` for [`projection_grads`].
fn project(model: &Wav2Vec2, features: Vec<f32>, seqs: Seqs, tape: &mut Option<(Vec<f32>, Vec<f32>)>) -> Result<(Vec<f32>, Seqs)> {
    let be = CpuBackend;
    let c = &model.config;
    let width = *c.conv_dim.last().expect("a config has conv layers");
    ensure!(features.len() == seqs.total() * width, "{} feature values for {} frames x {width} channels", features.len(), seqs.total());
    let params = model.feature_projection_norm.params(c.layer_norm_eps);
    let normed = v(&be.layer_norm(Tensor::from_vec(features.clone(), &[seqs.total(), width]), None, params, Activation::Identity)?)?;
    let lin = &model.feature_projection;
    let projected =
        v(&be.linear(&Tensor::from_vec(normed.clone(), &[seqs.total(), width]), &lin.weight, Some(&lin.bias), Activation::Identity)?)?;
    *tape = Some((features, normed));
    Ok((projected, seqs))
}

/// What the stages below layer 0 computed in the forward pass.
struct Below<'a> {
    /// `projected + GELU(pos_conv(projected))`, before the encoder norm (post-LN).
    summed: &'a [f32],
    pos_pre: &'a [f32],
    /// The positional conv's input: projected features after time and channel masking.
    projected: &'a [f32],
    seqs: &'a Seqs,
}

/// From `dx` at layer 0's input down to the masked projected features: through the encoder's
/// input dropout and norm (post-LN), the residual and the positional conv (per utterance),
/// collecting the norm's and the positional conv's gradients on the way.
fn encoder_input_grad(model: &Wav2Vec2, mut dx: Vec<f32>, below: &Below, reg: &Regularisers, wgrads: &mut Grads) -> Result<Vec<f32>> {
    let c = &model.config;
    let h = c.hidden_size;
    let seqs = below.seqs;
    drop_in_place(reg.dropout, 0, &mut dx);
    let d_sum = if c.do_stable_layer_norm {
        dx
    } else {
        wgrads.norm("wav2vec2.encoder.layer_norm", &dx, below.summed, &model.encoder_layer_norm, c.layer_norm_eps)?
    };
    let d_pre = gelu_input_grad(&d_sum, below.pos_pre);
    let mut d_proj = d_sum;
    let w = model.pos_conv_weight.f32s()?;
    let geom = model.pos_conv_geometry();
    let mut dw = wgrads.on.then(|| vec![0.0f32; w.len()]);
    for u in 0..seqs.count() {
        let r = seqs.range(u);
        let (dy, x) = (&d_pre[r.start * h..r.end * h], &below.projected[r.start * h..r.end * h]);
        add_assign(&mut d_proj[r.start * h..r.end * h], &conv1d_input_grad(dy, w, h, h, r.len(), geom));
        if let Some(dw) = &mut dw {
            add_assign(dw, &conv1d_weight_grad(dy, x, h, h, geom));
        }
    }
    if let Some(dw) = dw {
        wgrads.map.insert(POS_CONV_WEIGHT.to_string(), torch_layout(&dw, h, h / geom.groups, geom.kernel));
        wgrads.map.insert("wav2vec2.encoder.pos_conv_embed.conv.bias".to_string(), bias_grad(&d_pre, h));
    }
    Ok(d_proj)
}

/// Flags `cm` (`[utterances, hidden]`) as a per-frame row lookup.
fn channel_row(cm: Option<&[bool]>, u: usize, h: usize) -> Option<&[bool]> {
    cm.map(|cm| &cm[u * h..(u + 1) * h])
}

/// The time-mask embedding's gradient: `d_proj` summed over the masked frames, except channels
/// the channel mask zeroed after the embedding went in.
fn embedding_grad(d_proj: &[f32], seqs: &Seqs, tm: &TimeMask, channel_mask: Option<&[bool]>) -> Vec<f32> {
    let h = tm.embedding.len();
    let mut g = vec![0.0f32; h];
    for u in 0..seqs.count() {
        let r = seqs.range(u);
        let rows = d_proj[r.start * h..r.end * h].chunks_exact(h).zip(&tm.frames[r.clone()]).filter(|(_, &m)| m);
        for (row, _) in rows {
            match channel_row(channel_mask, u, h) {
                None => add_assign(&mut g, row),
                Some(cm) => g.iter_mut().zip(row).zip(cm).filter(|(_, &m)| !m).for_each(|((g, r), _)| *g += r),
            }
        }
    }
    g
}

/// The feature projection's gradients: `d_proj` reaches its output except where time masking
/// replaced a frame or channel masking zeroed a channel; then the linear and the norm. Returns
/// the gradient at the feature encoder's output.
fn projection_grads(
    model: &Wav2Vec2,
    mut d_proj: Vec<f32>,
    features: &[f32],
    normed: &[f32],
    seqs: &Seqs,
    reg: &Regularisers,
    wgrads: &mut Grads,
) -> Result<Vec<f32>> {
    let c = &model.config;
    let (h, width) = (c.hidden_size, features.len() / seqs.total());
    for u in 0..seqs.count() {
        let r = seqs.range(u);
        for (t, row) in r.clone().zip(d_proj[r.start * h..r.end * h].chunks_exact_mut(h)) {
            if reg.time_mask.as_ref().is_some_and(|tm| tm.frames[t]) {
                row.fill(0.0);
            } else if let Some(cm) = channel_row(reg.channel_mask, u, h) {
                row.iter_mut().zip(cm).filter(|(_, &m)| m).for_each(|(x, _)| *x = 0.0);
            }
        }
    }
    let dw = linear_weight_grad(&d_proj, normed, width, h);
    wgrads.linear("wav2vec2.feature_projection.projection", Some(dw), &d_proj, h);
    let d_normed = linear_input_grad(&d_proj, model.feature_projection.weight.f32s()?, width, h);
    wgrads.norm("wav2vec2.feature_projection.layer_norm", &d_normed, features, &model.feature_projection_norm, c.layer_norm_eps)
}
