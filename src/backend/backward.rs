//! The ops training adds to the forward op set: dropout, the backward pass of every op between
//! the CTC loss and the trainable tensors, and the score-to-mask routing of S3-Router.
//!
//! A training step ([`crate::train::masked::step`]) is written once against
//! [`TrainBackend`] and runs unchanged on the CPU (the reference, `cpu/backward.rs`) and on the
//! GPU (`cuda/backward.rs`). Activations are packed `[frames, channels]` f32 as in the forward
//! pass; weight gradients come back in PyTorch's `[out, in]` layout whatever layout the backend
//! keeps its weights in.

use anyhow::Result;

use super::{Backend, ConvGeometry, LinearMask, NormParams, Seqs};
use crate::dropout::{Dropout, SiteDropout};
use crate::tensor::Tensor;
use crate::train::adam::AdamStep;

/// What [`Backward::attention_dropout_saved`] keeps of a training forward for
/// [`Backward::attention_grad_saved`]: the output, and the softmax's log-sum-exp per (row, head)
/// where a backend's kernels produce it along (`None`: the gradient recomputes what it needs).
pub struct AttentionSaved {
    pub out: Tensor,
    pub lse: Option<Tensor>,
}

/// The scores of one masked projection inside a (possibly stacked) linear weight: rows
/// `row0 .. row0 + scores.rows` of the `[out, in]` weight.
pub struct ScoredRows<'a> {
    pub row0: usize,
    /// `[rows, in]` on this backend.
    pub scores: &'a Tensor,
}

/// One masked linear of a step: its prepared weight (the stacked q/k/v one included) and its
/// scored row blocks.
pub type ScoredLinear<'a> = (&'a Tensor, &'a [ScoredRows<'a>]);

/// Layer-norm gradients: the input's, and `(dgamma, dbeta)` when asked for.
pub type NormGrads = (Tensor, Option<(Tensor, Tensor)>);

pub trait Backward {
    /// `x * factor(site, i)` for every element `i` ([`Dropout::factor`], bit-identical on every
    /// backend): the forward mask, and on a gradient the backward (the same diagonal).
    fn dropout(&self, x: Tensor, d: Dropout, site: u64) -> Result<Tensor>;

    /// `GELU(x)` elementwise (exact erf form), then `dropout`'s mask at its site when given: one
    /// pass, the same values as [`Backward::dropout`] of the GELU.
    fn gelu(&self, x: &Tensor, dropout: Option<SiteDropout>) -> Result<Tensor>;

    /// `(r, LN(r))` for `r = drop(y) + residual`: a transformer block's residual join and the
    /// layer norm after it, `dropout` at its site when given; the same values as
    /// [`Backward::dropout`], [`Backend::add`] and [`Backend::layer_norm`] in turn (`r` is what
    /// the norm's backward reads).
    fn dropout_add_norm(&self, y: Tensor, dropout: Option<SiteDropout>, residual: &Tensor, norm: NormParams) -> Result<(Tensor, Tensor)>;

    /// [`Backward::gelu`] for an activation that only linears read, forward and in their weight
    /// and score gradients (the FFN's dropped activation). A backend may return it in its GEMM
    /// operand format instead of f32 (the CUDA backend at bf16: bf16, sparing those GEMMs a
    /// conversion pass each over the largest activation of each layer). By default, `gelu`.
    fn gelu_as_operand(&self, x: &Tensor, dropout: Option<SiteDropout>) -> Result<Tensor> {
        self.gelu(x, dropout)
    }

    /// `(dy ⊙ mask) · GELU'(x)`, the mask `dropout`'s at its site when given (the backward of
    /// [`Backward::gelu`] with the same dropout).
    fn gelu_grad(&self, dy: &Tensor, x: &Tensor, dropout: Option<SiteDropout>) -> Result<Tensor>;

    /// [`Backward::gelu_grad`] for a gradient that only linears' backward reads (its input and
    /// weight or score gradients, and a bias's column sum): the gradient at the FFN's
    /// pre-activation. A backend may return it in its GEMM operand format (the CUDA backend at
    /// bf16: bf16). By default, `gelu_grad`.
    fn gelu_grad_as_operand(&self, dy: &Tensor, x: &Tensor, dropout: Option<SiteDropout>) -> Result<Tensor> {
        self.gelu_grad(dy, x, dropout)
    }

    /// `dy` where `y = ReLU(x) > 0`, else 0: ReLU's backward from its output `y` (MMS's adapters).
    fn relu_grad(&self, dy: &Tensor, y: &Tensor) -> Result<Tensor>;

    /// `dx = dy · (W ⊙ M)` for `y = x · (W ⊙ M)ᵀ`: `w` as [`Backend::prepare_linear_weight`]
    /// made it, `mask` as [`Backward::scored_masks`] or [`Backend::prepare_mask`] made it.
    fn linear_input_grad(&self, dy: &Tensor, w: &Tensor, mask: Option<&LinearMask>) -> Result<Tensor>;

    /// `dW = dyᵀ · x` in PyTorch's `[out, in]` layout.
    fn linear_weight_grad(&self, dy: &Tensor, x: &Tensor) -> Result<Tensor>;

    /// Column sums of a `[rows, c]` tensor (bias gradients).
    fn column_sum(&self, x: &Tensor) -> Result<Tensor>;

    /// Gradients of `layer_norm(x)` per row, given the output gradient `dy`.
    fn layer_norm_grads(&self, dy: &Tensor, x: &Tensor, norm: NormParams, params: bool) -> Result<NormGrads>;

    /// [`Backend::attention`] with dropout on the probabilities (keys of query row `r`, head `h`
    /// drop as [`SiteDropout::apply_to_probs`] says), the training forward pass.
    fn attention_dropout(&self, qkv: &Tensor, seqs: &Seqs, heads: usize, scale: f32, dropout: Option<SiteDropout>) -> Result<Tensor>;

    /// [`Backward::attention_dropout`], keeping what [`Backward::attention_grad_saved`] can use
    /// instead of running the forward again (for callers that keep the output anyway). By
    /// default, the output alone.
    fn attention_dropout_saved(
        &self,
        qkv: &Tensor,
        seqs: &Seqs,
        heads: usize,
        scale: f32,
        dropout: Option<SiteDropout>,
    ) -> Result<AttentionSaved> {
        Ok(AttentionSaved { out: self.attention_dropout(qkv, seqs, heads, scale, dropout)?, lse: None })
    }

    /// [`Backward::attention_grad`] given what its forward kept: the same gradient. By default,
    /// recomputed as `attention_grad` does.
    #[allow(clippy::too_many_arguments)]
    fn attention_grad_saved(
        &self,
        d_out: &Tensor,
        qkv: &Tensor,
        _saved: &AttentionSaved,
        seqs: &Seqs,
        heads: usize,
        scale: f32,
        dropout: Option<SiteDropout>,
    ) -> Result<Tensor> {
        self.attention_grad(d_out, qkv, seqs, heads, scale, dropout)
    }

    /// Gradient of [`Backward::attention_dropout`] with respect to the packed `qkv`, the
    /// probabilities recomputed.
    #[allow(clippy::too_many_arguments)]
    fn attention_grad(
        &self,
        d_out: &Tensor,
        qkv: &Tensor,
        seqs: &Seqs,
        heads: usize,
        scale: f32,
        dropout: Option<SiteDropout>,
    ) -> Result<Tensor>;

    /// Input gradient of [`Backend::conv1d`] (input frames `seqs_in`, output frames `seqs_out`),
    /// per utterance; `w` as [`Backend::prepare_conv_weight`] made it.
    fn conv1d_input_grad(&self, dy: &Tensor, w: &Tensor, seqs_in: &Seqs, seqs_out: &Seqs, geom: ConvGeometry) -> Result<Tensor>;

    /// Weight gradient of that conv, summed over utterances, in the time-major
    /// `[c_out, kernel, c_in / groups]` layout.
    fn conv1d_weight_grad(&self, dy: &Tensor, x: &Tensor, seqs_in: &Seqs, seqs_out: &Seqs, geom: ConvGeometry) -> Result<Tensor>;

    /// Gradients of [`Backend::group_norm_time`] (each channel of each utterance normalised over
    /// its frames): `(dx, dgamma, dbeta)`.
    fn group_norm_time_grads(&self, dy: &Tensor, x: &Tensor, seqs: &Seqs, norm: NormParams) -> Result<(Tensor, Tensor, Tensor)>;

    /// The keep-masks of `linears`, one per linear in order: in each scored row block the
    /// `numel - floor(sparsity * numel)` entries of largest |score|, ties broken as
    /// [`crate::router::top_k_mask`] does; rows no block covers are kept. The GPU writes bits,
    /// all of a step's matrices in one batch of launches; the CPU applies each mask to a copy
    /// of its weight once.
    fn scored_masks(&self, linears: &[ScoredLinear], sparsity: f64) -> Result<Vec<LinearMask>>;

    /// The straight-through score gradients `dW_eff[rows] ⊙ W[rows] ⊙ sign(score)` of the scored
    /// blocks of a linear with the prepared weight `w`, `dW_eff = dyᵀ · x` (`dy` the gradient at
    /// its output, `x` its input): the GEMM producing a block's rows of `dW_eff` multiplies them
    /// by `W ⊙ sign(score)` as they leave it, so `dW_eff` is never stored. One per block, in order.
    fn score_grads(&self, dy: &Tensor, x: &Tensor, w: &Tensor, blocks: &[ScoredRows]) -> Result<Vec<Tensor>>;

    /// SpecAugment on packed features: rows flagged in `time` become `embedding`, then channels
    /// flagged in `channels` (`[utterances, c]`) are zeroed over the utterance.
    fn mask_features(&self, x: Tensor, seqs: &Seqs, time: Option<(&[bool], &Tensor)>, channels: Option<&[bool]>) -> Result<Tensor>;

    /// Rows `start .. start + count` of `t`'s first dimension, copied (the q, k and v parts of a
    /// stacked gradient).
    fn rows(&self, t: &Tensor, start: usize, count: usize) -> Result<Tensor>;

    /// Gradients of [`Backend::weight_norm`]'s magnitude `g` and direction `v` from the folded
    /// weight's gradient `dw` (v's layout): `dg[k] = Σ dw·v / ‖v‖`, `dv = g/‖v‖ · (dw − dg[k] ·
    /// v/‖v‖)` per kernel position `k` (f64 sums).
    fn weight_norm_grads(&self, dw: &Tensor, g: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)>;

    /// `a ⊙ b` elementwise (a pruning mask on weights or gradients); `a`'s buffer is reused
    /// only where nothing else holds it.
    fn mul(&self, a: Tensor, b: &Tensor) -> Result<Tensor>;

    /// `x · s` elementwise (gradient averaging).
    fn scale(&self, x: Tensor, s: f32) -> Result<Tensor>;

    /// Whether every element of every tensor is finite (a non-finite gradient skips the
    /// update); one answer for them all, so the GPU waits once.
    fn all_finite(&self, xs: &[&Tensor]) -> Result<bool>;

    /// One Adam update of parameter `p` with gradient `g` and moments `m`, `v` (all on this
    /// backend, taken and returned so they are updated in place): optimiser state of trained
    /// tensors never leaves the device.
    fn adam_update(&self, p: Tensor, g: &Tensor, m: Tensor, v: Tensor, step: AdamStep) -> Result<(Tensor, Tensor, Tensor)>;

    /// Backward of [`Backward::mask_features`]: the input gradient (zero where masked) and, with
    /// a time mask, the embedding's gradient.
    fn mask_features_grad(
        &self,
        dy: Tensor,
        seqs: &Seqs,
        time: Option<&[bool]>,
        channels: Option<&[bool]>,
    ) -> Result<(Tensor, Option<Tensor>)>;
}

/// A device that can train: the forward op set and its backward.
pub trait TrainBackend: Backend + Backward {}

impl<T: Backend + Backward> TrainBackend for T {}
