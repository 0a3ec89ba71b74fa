//! The convolutional feature encoder with a tape, for finetuning runs that train it too
//! (`engine finetune --train-feature-encoder`), on any [`TrainBackend`]: each conv layer keeps
//! its input and the values before its norm and before its GELU, and the backward returns the
//! gradient of every conv weight, bias and norm (checkpoint names, PyTorch layouts).

use std::collections::BTreeMap;

use anyhow::Result;

use crate::backend::backward::TrainBackend;
use crate::backend::{Activation, ConvGeometry, Seqs};
use crate::model::config::FeatNorm;
use crate::model::wav2vec2::DEFAULT_NORM_EPS;
use crate::model::Wav2Vec2;
use crate::tensor::Tensor;

/// What one conv layer's backward needs.
struct Step {
    input: Tensor,
    seqs_in: Seqs,
    seqs_out: Seqs,
    /// The conv output (the norm's input).
    conv: Tensor,
    /// The GELU's input (= `conv` without a norm).
    pre_gelu: Tensor,
}

pub struct Tape {
    steps: Vec<Step>,
}

fn geometry(model: &Wav2Vec2, i: usize) -> ConvGeometry {
    let l = &model.conv_layers[i];
    ConvGeometry { kernel: l.kernel, stride: l.stride, pad_left: 0, groups: 1 }
}

/// The feature encoder over `audio`, as [`Wav2Vec2::feature_encoder`] computes it, with a tape.
pub fn forward(be: &dyn TrainBackend, model: &Wav2Vec2, audio: &[&[f32]]) -> Result<(Tensor, Seqs, Tape)> {
    model.frame_counts(&audio.iter().map(|a| a.len()).collect::<Vec<_>>())?;
    let mut seqs = Seqs::new(audio.iter().map(|a| a.len()).collect());
    let mut x = be.upload_rows(audio, 1)?;
    let mut steps = Vec::with_capacity(model.conv_layers.len());
    for (i, layer) in model.conv_layers.iter().enumerate() {
        let out = layer.out_seqs(&seqs);
        let conv = be.conv1d(&x, &seqs, &out, &layer.weight, layer.bias.as_ref(), geometry(model, i), Activation::Identity)?;
        let pre_gelu = match (&layer.norm, model.config.feat_extract_norm) {
            (None, _) => conv.clone(),
            (Some(n), FeatNorm::Group) => be.group_norm_time(conv.clone(), &out, n.params(DEFAULT_NORM_EPS), Activation::Identity)?,
            (Some(n), FeatNorm::Layer) => be.layer_norm(conv.clone(), None, n.params(DEFAULT_NORM_EPS), Activation::Identity)?,
        };
        let input = std::mem::replace(&mut x, be.gelu(&pre_gelu, None)?);
        steps.push(Step { input, seqs_in: seqs, seqs_out: out.clone(), conv, pre_gelu });
        seqs = out;
    }
    Ok((x, seqs, Tape { steps }))
}

/// From the gradient at the encoder's output down to its first conv, collecting every conv
/// weight, bias and norm gradient into `grads` (PyTorch layouts, on the backend).
pub fn backward(be: &dyn TrainBackend, model: &Wav2Vec2, tape: &Tape, mut d: Tensor, grads: &mut BTreeMap<String, Tensor>) -> Result<()> {
    for (i, (step, layer)) in tape.steps.iter().zip(&model.conv_layers).enumerate().rev() {
        let prefix = format!("wav2vec2.feature_extractor.conv_layers.{i}");
        d = be.gelu_grad(&d, &step.pre_gelu, None)?;
        if let Some(n) = &layer.norm {
            let params = n.params(DEFAULT_NORM_EPS);
            let (dx, dgamma, dbeta) = match model.config.feat_extract_norm {
                FeatNorm::Group => be.group_norm_time_grads(&d, &step.conv, &step.seqs_out, params)?,
                FeatNorm::Layer => {
                    let (dx, p) = be.layer_norm_grads(&d, &step.conv, params, true)?;
                    let (dg, db) = p.expect("asked for");
                    (dx, dg, db)
                }
            };
            grads.insert(format!("{prefix}.layer_norm.weight"), dgamma);
            grads.insert(format!("{prefix}.layer_norm.bias"), dbeta);
            d = dx;
        }
        let geom = geometry(model, i);
        let dw = be.conv1d_weight_grad(&d, &step.input, &step.seqs_in, &step.seqs_out, geom)?;
        grads.insert(format!("{prefix}.conv.weight"), be.swap_last_two(&dw)?);
        if layer.bias.is_some() {
            grads.insert(format!("{prefix}.conv.bias"), be.column_sum(&d)?);
        }
        if i > 0 {
            d = be.conv1d_input_grad(&d, &layer.weight, &step.seqs_in, &step.seqs_out, geom)?;
        }
    }
    Ok(())
}
