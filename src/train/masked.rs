//! One S3-Router forward/backward on the CPU: the FFN linears of every encoder layer masked by
//! the per-matrix top-k of their scores, CTC loss, and the gradients of the scores (straight-
//! through) and of the head. The frozen feature encoder, projection and positional conv run
//! without a tape; each encoder layer keeps only what its backward needs (attention
//! probabilities are recomputed), and the backward stops at layer 0's FFN, the lowest trainable
//! tensor. This is the readable reference the GPU path is to mirror.

use anyhow::{ensure, Result};

use crate::backend::cpu::grad::{
    attention_grad, bias_grad, conv1d_input_grad, gelu_input_grad, layer_norm_input_grad, linear_input_grad, linear_weight_grad,
};
use crate::backend::cpu::math::add_assign;
use crate::backend::cpu::CpuBackend;
use crate::backend::{Activation, Backend, Seqs};
use crate::ctc::{ctc_loss, CtcTargets, Reduction};
use crate::model::wav2vec2::{Linear, Norm};
use crate::model::Wav2Vec2;
use crate::router::{score_grad, top_k_mask};
use crate::tensor::Tensor;

/// A masked weight: its frozen values in PyTorch's `[out, in]` layout and its scores.
pub struct MaskedWeight {
    pub name: String,
    pub d_out: usize,
    pub d_in: usize,
    pub weight: Vec<f32>,
    pub scores: Vec<f32>,
}

impl MaskedWeight {
    /// The frozen `[out, in]` weight of a CPU-prepared linear (stored `[in, out]`).
    pub fn from_linear(name: &str, lin: &Linear, scores: Vec<f32>) -> Result<MaskedWeight> {
        let &[d_in, d_out] = lin.weight.shape() else { anyhow::bail!("{name}: not a 2-D weight") };
        let w_t = lin.weight.f32s()?;
        let weight: Vec<f32> = (0..d_out * d_in).map(|j| w_t[(j % d_in) * d_out + j / d_in]).collect();
        ensure!(scores.len() == weight.len(), "{name}: {} scores for a {d_out} x {d_in} weight", scores.len());
        Ok(MaskedWeight { name: name.to_string(), d_out, d_in, weight, scores })
    }

    /// `W * M` in the CPU layout, for this step's mask.
    fn effective(&self, be: &CpuBackend, sparsity: f64) -> Result<Tensor> {
        let w = crate::mask::apply(&self.weight, &top_k_mask(&self.scores, sparsity));
        be.prepare_linear_weight(&Tensor::from_vec(w, &[self.d_out, self.d_in]))
    }
}

/// SpecAugment time masking for a step: which packed frames of the projected features are
/// replaced by the learned embedding (`[hidden]`), whose gradient the step then returns.
pub struct TimeMask<'a> {
    pub frames: &'a [bool],
    pub embedding: &'a [f32],
}

/// Loss and gradients of one step.
pub struct StepGrads {
    pub loss: f32,
    pub losses: Vec<f32>,
    /// Per masked weight, in the order given.
    pub scores: Vec<Vec<f32>>,
    /// Head gradients, `[vocab, hidden]` and `[vocab]`.
    pub head_weight: Vec<f32>,
    pub head_bias: Vec<f32>,
    /// Gradient of the time-mask embedding, when a [`TimeMask`] was given.
    pub embedding: Option<Vec<f32>>,
}

/// What one encoder layer keeps for its backward pass.
struct Tape {
    input: Vec<f32>,
    qkv: Vec<f32>,
    /// Post-LN: `attention + input` before the first norm; pre-LN: the first norm's output.
    first: Vec<f32>,
    /// Pre-LN: `input + attention`, the second norm's input (unused post-LN).
    second: Vec<f32>,
    /// The FFN's input (post-LN: = `second`; pre-LN: the second norm's output).
    ffn_in: Vec<f32>,
    pre_gelu: Vec<f32>,
    post_gelu: Vec<f32>,
    /// Post-LN: `ffn + second` before the final norm.
    residual2: Vec<f32>,
}

fn v(t: &Tensor) -> Result<Vec<f32>> {
    t.to_vec()
}

fn add(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(x, y)| x + y).collect()
}

/// One forward/backward of the masked model. `masks` holds two entries per encoder layer, the
/// intermediate then the output dense of layer 0, 1, ...; `head` is the trainable CTC head;
/// `time_mask`, if any, replaces frames with the learned embedding before the positional conv
/// (and the backward then runs down to it).
#[allow(clippy::too_many_arguments)]
pub fn step(
    model: &Wav2Vec2,
    masks: &[MaskedWeight],
    sparsity: f64,
    head: &Linear,
    audio: &[&[f32]],
    targets: &CtcTargets,
    reduction: Reduction,
    time_mask: Option<TimeMask<'_>>,
) -> Result<StepGrads> {
    let be = CpuBackend;
    let c = &model.config;
    ensure!(
        masks.len() == 2 * model.layers.len(),
        "{} masked weights for {} layers (two FFN weights each)",
        masks.len(),
        model.layers.len()
    );
    let (h, heads) = (c.hidden_size, c.num_attention_heads);
    let scale = 1.0 / (c.head_dim() as f32).sqrt();
    let eps = c.layer_norm_eps;
    let id = Activation::Identity;
    let effective: Vec<Tensor> = masks.iter().map(|m| m.effective(&be, sparsity)).collect::<Result<_>>()?;
    let ffn = |w: &Tensor, b: &Tensor, x: &[f32], d_in: usize, act| -> Result<Vec<f32>> {
        v(&be.linear(&Tensor::from_vec(x.to_vec(), &[x.len() / d_in, d_in]), w, Some(b), act)?)
    };
    let lin = |l: &Linear, x: &[f32], d_in: usize| ffn(&l.weight, &l.bias, x, d_in, id);
    let norm = |n: &Norm, x: &[f32]| -> Result<Vec<f32>> {
        v(&be.layer_norm(Tensor::from_vec(x.to_vec(), &[x.len() / h, h]), None, n.params(eps), id)?)
    };

    // Forward: projected features, time masking, positional conv, then the layers with a tape each.
    let (projected, seqs): (Tensor, Seqs) = model.projected(&be, audio)?;
    let mut projected = v(&projected)?;
    if let Some(tm) = &time_mask {
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
    let summed: Vec<f32> = projected.iter().zip(&pos_pre).map(|(x, &p)| x + crate::backend::cpu::math::gelu(p)).collect();
    let mut x = if c.do_stable_layer_norm { summed.clone() } else { norm(&model.encoder_layer_norm, &summed)? };
    let mut tapes = Vec::with_capacity(model.layers.len());
    for (i, layer) in model.layers.iter().enumerate() {
        let (w1, w2) = (&effective[2 * i], &effective[2 * i + 1]);
        let (b1, b2) = (&layer.intermediate_dense.bias, &layer.output_dense.bias);
        let inter = masks[2 * i].d_out;
        let attend = |a: &[f32]| -> Result<(Vec<f32>, Vec<f32>)> {
            let qkv = lin(&layer.qkv_proj, a, h)?;
            let att = v(&be.attention(&Tensor::from_vec(qkv.clone(), &[qkv.len() / (3 * h), 3 * h]), &seqs, heads, scale)?)?;
            Ok((qkv, lin(&layer.out_proj, &att, h)?))
        };
        // The masked FFN: (pre-GELU, post-GELU, output).
        let feed_forward = |inp: &[f32]| -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
            let u = ffn(w1, b1, inp, h, id)?;
            let g: Vec<f32> = u.iter().map(|&z| crate::backend::cpu::math::gelu(z)).collect();
            let f2 = ffn(w2, b2, &g, inter, id)?;
            Ok((u, g, f2))
        };
        let tape = if c.do_stable_layer_norm {
            let a = norm(&layer.layer_norm, &x)?;
            let (qkv, o) = attend(&a)?;
            let x1 = add(&x, &o);
            let b = norm(&layer.final_layer_norm, &x1)?;
            let (u, g, f2) = feed_forward(&b)?;
            let out = add(&x1, &f2);
            let tape = Tape { input: x, qkv, first: a, second: x1, ffn_in: b, pre_gelu: u, post_gelu: g, residual2: Vec::new() };
            x = out;
            tape
        } else {
            let (qkv, o) = attend(&x)?;
            let r1 = add(&o, &x);
            let h1 = norm(&layer.layer_norm, &r1)?;
            let (u, g, f2) = feed_forward(&h1)?;
            let r2 = add(&f2, &h1);
            let out = norm(&layer.final_layer_norm, &r2)?;
            let tape = Tape { input: x, qkv, first: r1, second: Vec::new(), ffn_in: h1, pre_gelu: u, post_gelu: g, residual2: r2 };
            x = out;
            tape
        };
        tapes.push(tape);
    }
    let encoder_out_pre = x.clone();
    if c.do_stable_layer_norm {
        x = norm(&model.encoder_layer_norm, &x)?;
    }
    let vocab = head.bias.numel();
    let logits = Tensor::from_vec(lin(head, &x, h)?, &[seqs.total(), vocab]);

    // Backward.
    let out = ctc_loss(&be, &logits, &seqs, targets, reduction)?;
    let dlogits = v(&out.grad)?;
    let head_weight = linear_weight_grad(&dlogits, &x, h, vocab);
    let head_bias = bias_grad(&dlogits, vocab);
    let mut dx = linear_input_grad(&dlogits, head.weight.f32s()?, h, vocab);
    if c.do_stable_layer_norm {
        dx = layer_norm_input_grad(&dx, &encoder_out_pre, model.encoder_layer_norm.gamma.f32s()?, eps);
    }
    let mut scores = vec![Vec::new(); masks.len()];
    for (i, (layer, tape)) in model.layers.iter().zip(&tapes).enumerate().rev() {
        let (m1, m2) = (&masks[2 * i], &masks[2 * i + 1]);
        let inter = m1.d_out;
        let gamma1 = layer.layer_norm.gamma.f32s()?;
        let gamma2 = layer.final_layer_norm.gamma.f32s()?;
        // The FFN: dx is the gradient at the FFN's output (after the residual path is split off).
        let (d_ffn_out, mut d_skip) = if c.do_stable_layer_norm {
            (dx.clone(), dx.clone())
        } else {
            let dr2 = layer_norm_input_grad(&dx, &tape.residual2, gamma2, eps);
            (dr2.clone(), dr2)
        };
        scores[2 * i + 1] = score_grad(&linear_weight_grad(&d_ffn_out, &tape.post_gelu, inter, h), &m2.weight, &m2.scores);
        let dg = linear_input_grad(&d_ffn_out, effective[2 * i + 1].f32s()?, inter, h);
        let du = gelu_input_grad(&dg, &tape.pre_gelu);
        scores[2 * i] = score_grad(&linear_weight_grad(&du, &tape.ffn_in, h, inter), &m1.weight, &m1.scores);
        let d_ffn_in = linear_input_grad(&du, effective[2 * i].f32s()?, h, inter);
        if c.do_stable_layer_norm {
            add_assign(&mut d_skip, &layer_norm_input_grad(&d_ffn_in, &tape.second, gamma2, eps));
        } else {
            add_assign(&mut d_skip, &d_ffn_in);
        }
        if i == 0 && time_mask.is_none() {
            break; // nothing below layer 0's FFN is trained
        }
        // d_skip: gradient at `x1` (pre-LN) or at the first norm's output `h1` (post-LN).
        let d_attn_out = if c.do_stable_layer_norm { d_skip.clone() } else { layer_norm_input_grad(&d_skip, &tape.first, gamma1, eps) };
        let mut d_input = d_attn_out.clone();
        let d_att = linear_input_grad(&d_attn_out, layer.out_proj.weight.f32s()?, h, h);
        let d_qkv = attention_grad(&d_att, &tape.qkv, h, &seqs, heads, scale);
        let d_attn_in = linear_input_grad(&d_qkv, layer.qkv_proj.weight.f32s()?, h, 3 * h);
        if c.do_stable_layer_norm {
            add_assign(&mut d_input, &layer_norm_input_grad(&d_attn_in, &tape.input, gamma1, eps));
        } else {
            add_assign(&mut d_input, &d_attn_in);
        }
        dx = d_input;
    }
    // Down to the time-mask embedding: through the encoder norm (post-LN), the residual and the
    // positional conv (per utterance), summed over the masked frames.
    let embedding = match &time_mask {
        None => None,
        Some(tm) => {
            let d_sum =
                if c.do_stable_layer_norm { dx } else { layer_norm_input_grad(&dx, &summed, model.encoder_layer_norm.gamma.f32s()?, eps) };
            let d_pre = gelu_input_grad(&d_sum, &pos_pre);
            let mut d_proj = d_sum;
            let w = model.pos_conv_weight.f32s()?;
            for u in 0..seqs.count() {
                let r = seqs.range(u);
                let d_conv = conv1d_input_grad(&d_pre[r.start * h..r.end * h], w, h, h, r.len(), geom);
                add_assign(&mut d_proj[r.start * h..r.end * h], &d_conv);
            }
            let mut g = vec![0.0f32; h];
            for (row, _) in d_proj.chunks_exact(h).zip(tm.frames).filter(|(_, &m)| m) {
                add_assign(&mut g, row);
            }
            Some(g)
        }
    };
    Ok(StepGrads { loss: out.loss, losses: out.losses, scores, head_weight, head_bias, embedding })
}
