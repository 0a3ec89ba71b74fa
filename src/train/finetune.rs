//! Weight finetuning's side of a training run: which checkpoint tensors train, a weight source
//! that lays the trained values over the checkpoint, the weight-norm chain rule for the
//! positional conv (the Hugging Face folder a finetuning run writes is
//! [`crate::model::folder::write_model_folder`]).
//!
//! Everything of the transformer encoder and the feature projection trains (as in fairseq's
//! `wav2vec_ctc` with `feature_grad_mult 0`); the convolutional feature encoder stays frozen
//! unless asked to train; the head and the time-mask embedding are kept beside, as in mask
//! learning.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use anyhow::{ensure, Context, Result};

use super::masked::POS_CONV_WEIGHT;
use crate::backend::backward::TrainBackend;
use crate::backend::Backend;
pub use crate::model::checkpoint::Overlay;
use crate::model::checkpoint::{Checkpoint, WeightSource};
use crate::model::wav2vec2::pos_conv_norm_names;
use crate::tensor::Tensor;

/// One trained tensor, by checkpoint name, in PyTorch's layout, on the training backend (with
/// its optimiser state there: on the GPU a finetuning update never crosses the bus).
#[derive(Clone, Debug)]
pub struct NamedWeight {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Tensor,
}

/// The head and time-mask embedding names (trained beside the weights).
pub const HEAD_WEIGHT: &str = "lm_head.weight";
pub const HEAD_BIAS: &str = "lm_head.bias";
pub const EMBEDDING: &str = "wav2vec2.masked_spec_embed";

/// Whether checkpoint tensor `name` trains under weight finetuning (`encoder`: the conv feature
/// encoder too).
pub fn trains(name: &str, encoder: bool) -> bool {
    let above = name.starts_with("wav2vec2.encoder.") || name.starts_with("wav2vec2.feature_projection.");
    (above || (encoder && name.starts_with("wav2vec2.feature_extractor."))) && name != EMBEDDING
}

/// The checkpoint's trainable tensors as f32 on `be`, in name order.
pub fn trainable(ck: &Checkpoint, encoder: bool, be: &dyn Backend) -> Result<Vec<NamedWeight>> {
    let mut names: Vec<&str> = ck.names().filter(|n| trains(n, encoder)).collect();
    names.sort_unstable();
    ensure!(!names.is_empty(), "the checkpoint has no wav2vec2.encoder.* tensors to finetune");
    names
        .into_iter()
        .map(|name| {
            let t = ck.tensor(name)?;
            Ok(NamedWeight { name: name.to_string(), shape: t.shape().to_vec(), data: be.upload(&t.to_f32()?)? })
        })
        .collect()
}

/// A source whose tensors are uploaded to a backend on first use and served from there after:
/// the frozen part of a model that finetuning rebuilds every update (on the GPU, the frozen
/// feature encoder crosses the bus once, not once per update).
pub struct Resident<'a> {
    pub inner: &'a dyn WeightSource,
    pub be: &'a dyn Backend,
    pub cache: &'a Mutex<HashMap<String, Tensor>>,
}

impl WeightSource for Resident<'_> {
    fn contains(&self, name: &str) -> bool {
        self.inner.contains(name)
    }

    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let mut cache = self.cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(t) = cache.get(name).filter(|t| t.shape() == shape) {
            return Ok(t.clone());
        }
        let t = self.be.upload(&self.inner.get(name, shape)?)?;
        cache.insert(name.to_string(), t.clone());
        Ok(t)
    }
}

/// The names of the positional conv's weight-norm magnitude and direction among `weights`
/// (`weight_g`/`weight_v`, or transformers' newer `parametrizations.weight.original0/1`).
fn pos_conv_parts(weights: &[NamedWeight]) -> Result<(usize, usize)> {
    let at = |name: &str| weights.iter().position(|w| w.name == name);
    let [g, v] = pos_conv_norm_names(|name| at(name).is_some())
        .context("the checkpoint has no weight-normed positional conv (weight_g/weight_v)")?;
    Ok((at(g).expect("pos_conv_norm_names found it"), at(v).with_context(|| format!("the checkpoint has {g} but no {v}"))?))
}

/// Replaces the folded positional-conv gradient in `grads` by the gradients of its weight-norm
/// magnitude `g` and direction `v` (the tensors that train), on the training backend.
pub fn unfold_pos_conv_grad(be: &dyn TrainBackend, grads: &mut BTreeMap<String, Tensor>, weights: &[NamedWeight]) -> Result<()> {
    let Some(dw) = grads.remove(POS_CONV_WEIGHT) else { return Ok(()) };
    let (gi, vi) = pos_conv_parts(weights)?;
    let (dg, dv) = be.weight_norm_grads(&dw, &weights[gi].data, &weights[vi].data)?;
    grads.insert(weights[gi].name.clone(), dg);
    grads.insert(weights[vi].name.clone(), dv);
    Ok(())
}
