//! The convolutional feature encoder with a tape, for finetuning runs that train it too
//! (`engine finetune --train-feature-encoder`): each conv layer keeps its input and the values
//! before its norm and before its GELU, and the backward returns the gradient of every conv
//! weight, bias and norm (checkpoint names, PyTorch layouts).

use std::collections::BTreeMap;

use anyhow::Result;

use crate::backend::cpu::grad::layer_norm_grads;
use crate::backend::cpu::grad::{bias_grad, conv1d_input_grad, conv1d_weight_grad, gelu_input_grad, group_norm_time_grads};
use crate::backend::cpu::math::gelu;
use crate::backend::cpu::CpuBackend;
use crate::backend::{Activation, Backend, ConvGeometry, Seqs};
use crate::model::config::FeatNorm;
use crate::model::wav2vec2::torch_layout;
use crate::model::Wav2Vec2;
use crate::tensor::Tensor;

/// Both conv norms use PyTorch's default epsilon, as transformers builds them.
const NORM_EPS: f32 = 1e-5;

/// What one conv layer's backward needs.
struct Step {
    input: Vec<f32>,
    seqs_in: Seqs,
    seqs_out: Seqs,
    /// The conv output (the norm's input).
    conv: Vec<f32>,
    /// The GELU's input (= `conv` without a norm).
    pre_gelu: Vec<f32>,
}

pub struct Tape {
    steps: Vec<Step>,
}

fn geometry(model: &Wav2Vec2, i: usize) -> ConvGeometry {
    let l = &model.conv_layers[i];
    ConvGeometry { kernel: l.kernel, stride: l.stride, pad_left: 0, groups: 1 }
}

/// The feature encoder over `audio`, as [`Wav2Vec2::feature_encoder`] computes it, with a tape.
pub fn forward(model: &Wav2Vec2, audio: &[&[f32]]) -> Result<(Vec<f32>, Seqs, Tape)> {
    let be = CpuBackend;
    model.frame_counts(&audio.iter().map(|a| a.len()).collect::<Vec<_>>())?;
    let mut seqs = Seqs::new(audio.iter().map(|a| a.len()).collect());
    let mut x = audio.concat();
    let mut steps = Vec::with_capacity(model.conv_layers.len());
    for (i, layer) in model.conv_layers.iter().enumerate() {
        let out = Seqs::new(seqs.lens().iter().map(|&n| (n - layer.kernel) / layer.stride + 1).collect());
        let c_in = x.len() / seqs.total();
        let input = Tensor::from_vec(x, &[seqs.total(), c_in]);
        let conv = be.conv1d(&input, &seqs, &out, &layer.weight, layer.bias.as_ref(), geometry(model, i), Activation::Identity)?;
        let pre_gelu = match (&layer.norm, model.config.feat_extract_norm) {
            (None, _) => conv.clone(),
            (Some(n), FeatNorm::Group) => be.group_norm_time(conv.clone(), &out, n.params(NORM_EPS), Activation::Identity)?,
            (Some(n), FeatNorm::Layer) => be.layer_norm(conv.clone(), None, n.params(NORM_EPS), Activation::Identity)?,
        };
        let pre_gelu = pre_gelu.to_vec()?;
        x = pre_gelu.iter().map(|&v| gelu(v)).collect();
        steps.push(Step { input: input.to_vec()?, seqs_in: seqs, seqs_out: out.clone(), conv: conv.to_vec()?, pre_gelu });
        seqs = out;
    }
    Ok((x, seqs, Tape { steps }))
}

/// From the gradient at the encoder's output down to its first conv, collecting every conv
/// weight, bias and norm gradient into `grads`.
pub fn backward(model: &Wav2Vec2, tape: &Tape, mut d: Vec<f32>, grads: &mut BTreeMap<String, Vec<f32>>) -> Result<()> {
    for (i, (step, layer)) in tape.steps.iter().zip(&model.conv_layers).enumerate().rev() {
        let prefix = format!("wav2vec2.feature_extractor.conv_layers.{i}");
        let c_out = step.conv.len() / step.seqs_out.total();
        let c_in = step.input.len() / step.seqs_in.total();
        d = gelu_input_grad(&d, &step.pre_gelu);
        if let Some(n) = &layer.norm {
            let gamma = n.gamma.f32s()?;
            let (dx, dgamma, dbeta) = match model.config.feat_extract_norm {
                FeatNorm::Group => group_norm_time_grads(&d, &step.conv, &step.seqs_out, gamma, NORM_EPS),
                FeatNorm::Layer => {
                    let (dx, params) = layer_norm_grads(&d, &step.conv, gamma, NORM_EPS, true);
                    let (dg, db) = params.expect("asked for");
                    (dx, dg, db)
                }
            };
            grads.insert(format!("{prefix}.layer_norm.weight"), dgamma);
            grads.insert(format!("{prefix}.layer_norm.bias"), dbeta);
            d = dx;
        }
        let geom = geometry(model, i);
        let w = layer.weight.f32s()?;
        let mut dw = vec![0.0f32; w.len()];
        let mut dx = if i > 0 { vec![0.0f32; step.input.len()] } else { Vec::new() };
        for u in 0..step.seqs_in.count() {
            let (ri, ro) = (step.seqs_in.range(u), step.seqs_out.range(u));
            let dy = &d[ro.start * c_out..ro.end * c_out];
            crate::backend::cpu::math::add_assign(
                &mut dw,
                &conv1d_weight_grad(dy, &step.input[ri.start * c_in..ri.end * c_in], c_in, c_out, geom),
            );
            if i > 0 {
                let g = conv1d_input_grad(dy, w, c_in, c_out, ri.len(), geom);
                dx[ri.start * c_in..ri.end * c_in].copy_from_slice(&g);
            }
        }
        grads.insert(format!("{prefix}.conv.weight"), torch_layout(&dw, c_out, c_in, geom.kernel));
        if layer.bias.is_some() {
            grads.insert(format!("{prefix}.conv.bias"), bias_grad(&d, c_out));
        }
        d = dx;
    }
    Ok(())
}
