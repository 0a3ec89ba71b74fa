//! The op set the model runs on, as a trait every device implements.
//!
//! Activations travel in a *packed* layout: the frames of every utterance in a batch are stacked
//! row after row (`[total_frames, channels]`, time-major), and a [`Seqs`] says where each
//! utterance starts. Per-frame ops (linear, layer norm, GELU) never see padding, and the ops that
//! mix frames (convolutions, group norm, attention) work inside one utterance at a time, so an
//! utterance's result cannot depend on what else shares its batch.

pub mod backward;
pub mod cpu;
pub mod cuda;

use anyhow::{bail, ensure, Result};

use crate::tensor::Tensor;

/// Frame counts of the utterances packed into one activation tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seqs {
    lens: Vec<usize>,
    offsets: Vec<usize>,
}

impl Seqs {
    pub fn new(lens: Vec<usize>) -> Seqs {
        let mut offsets = Vec::with_capacity(lens.len() + 1);
        let mut total = 0;
        offsets.push(0);
        for &l in &lens {
            total += l;
            offsets.push(total);
        }
        Seqs { lens, offsets }
    }

    pub fn lens(&self) -> &[usize] {
        &self.lens
    }

    /// Number of utterances.
    pub fn count(&self) -> usize {
        self.lens.len()
    }

    /// Total frames over all utterances (rows of a packed tensor).
    pub fn total(&self) -> usize {
        self.offsets[self.lens.len()]
    }

    /// Prefix sums of the lengths: utterance `i` holds rows `offsets[i]..offsets[i + 1]`.
    pub fn offsets(&self) -> &[usize] {
        &self.offsets
    }

    /// Row range of utterance `i`.
    pub fn range(&self, i: usize) -> std::ops::Range<usize> {
        self.offsets[i]..self.offsets[i + 1]
    }
}

/// Elementwise function applied after a linear layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Identity = 0,
    /// GELU with the exact erf form, as `torch.nn.functional.gelu` by default.
    Gelu = 1,
    /// max(x, 0) (MMS's attention adapters).
    Relu = 2,
}

/// Geometry of a 1-D convolution over each utterance of a packed batch.
///
/// Output frame `t` of an utterance reads input frames `stride * t - pad_left + k` for
/// `k in 0..kernel`; frames outside the utterance read as zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeometry {
    pub kernel: usize,
    pub stride: usize,
    pub pad_left: usize,
    pub groups: usize,
}

/// Affine parameters and epsilon of a layer or group norm.
#[derive(Clone, Copy)]
pub struct NormParams<'a> {
    pub gamma: &'a Tensor,
    pub beta: &'a Tensor,
    pub eps: f32,
}

/// A keep-mask over one linear weight, in the form the backend that prepared it applies
/// ([`Backend::prepare_mask`]).
pub enum LinearMask {
    /// Bits over the CPU's `[in, out]` weight layout, LSB first.
    Host(Vec<u8>),
    /// Bits over the `[out, in]` weight on the device.
    Cuda(cuda::CudaBuf),
    /// `W ⊙ M` already applied to the CPU's `[in, out]` weight: a training step's masks, built
    /// once per step and used by the forward and the backward products ([`backward::Backward::scored_masks`]).
    Applied(Tensor),
}

/// A linear weight with its zeros removed ([`Backend::prepare_sparse`]), in the layout of
/// [`cpu::sparse`] (CSR over `[out, in]`, panel by panel) on the backend that built it.
pub enum SparseWeight {
    Cpu(cpu::sparse::SparseLinear),
    Cuda(cuda::SparseCuda),
}

impl SparseWeight {
    /// The fraction of weights kept.
    pub fn density(&self) -> f64 {
        match self {
            SparseWeight::Cpu(s) => s.density(),
            SparseWeight::Cuda(s) => s.density(),
        }
    }

    /// `(d_in, d_out)`.
    fn dims(&self) -> (usize, usize) {
        match self {
            SparseWeight::Cpu(s) => (s.d_in, s.d_out),
            SparseWeight::Cuda(s) => s.dims(),
        }
    }

    /// The shape [`Backend::linear_sparse`] gives for input `x` and bias `b`, or an error
    /// saying which does not fit this weight.
    pub fn output_shape(&self, x: &Tensor, b: Option<&Tensor>) -> Result<Vec<usize>> {
        linear_output_shape("sparse linear", x, self.dims(), b, None)
    }
}

/// The shape a linear from `d_in` to `d_out` features gives for input `x` (its last dimension
/// replaced) with bias `b`, or an error saying which operand does not fit (`what` names the op;
/// `segment_rows`, where given, is how many rows its segments cover, which must be all of `x`'s).
pub fn linear_output_shape(
    what: &str,
    x: &Tensor,
    (d_in, d_out): (usize, usize),
    b: Option<&Tensor>,
    segment_rows: Option<usize>,
) -> Result<Vec<usize>> {
    let Some(&features) = x.shape().last() else { bail!("{what}: the input is a scalar") };
    ensure!(features == d_in, "{what}: input has {features} features, the weight expects {d_in}");
    if let Some(rows) = segment_rows {
        let n = x.numel() / features.max(1);
        ensure!(rows == n, "{what}: segments cover {rows} of the {n} rows");
    }
    if let Some(b) = b {
        ensure!(b.numel() == d_out, "{what} bias has {} values for {d_out} outputs", b.numel());
    }
    let mut shape = x.shape().to_vec();
    *shape.last_mut().expect("checked above: the input has dimensions") = d_out;
    Ok(shape)
}

/// The width `c` of each of q, k and v in `qkv [seqs.total(), 3c]`, for `heads` heads, or an
/// error saying what does not fit.
pub fn attention_width(qkv: &Tensor, seqs: &Seqs, heads: usize) -> Result<usize> {
    let c3 = *qkv.shape().last().unwrap_or(&0);
    ensure!(qkv.numel() / c3.max(1) == seqs.total(), "attention: {:?} does not hold {} frames", qkv.shape(), seqs.total());
    ensure!(
        c3.is_multiple_of(3) && heads > 0 && (c3 / 3).is_multiple_of(heads),
        "attention: {c3} columns do not split into q, k, v of {heads} heads"
    );
    Ok(c3 / 3)
}

/// Operations a compute device provides. Every tensor argument must live on this backend
/// (see [`Backend::upload`]); weights use the layouts named in each method.
pub trait Backend: Send + Sync {
    /// A short name for messages (`cpu`, `cuda:0`).
    fn name(&self) -> String;

    /// Waits until all queued work is done (devices that queue work asynchronously).
    fn synchronize(&self) -> Result<()>;

    /// The most memory in use (bytes) since the previous call, which starts a new measurement:
    /// device memory on a GPU, the process's resident set on the CPU; `None` where the backend
    /// cannot tell.
    fn take_peak_memory(&self) -> Result<Option<u64>> {
        Ok(None)
    }

    /// Makes a host tensor usable by this backend (no copy on the CPU for f32).
    fn upload(&self, t: &Tensor) -> Result<Tensor>;

    /// `parts` (each `[len, cols]`, row-major) packed one after another into a `[Σ len, cols]`
    /// tensor on this backend: a batch's raw audio. By default, joined on the host and uploaded.
    fn upload_rows(&self, parts: &[&[f32]], cols: usize) -> Result<Tensor> {
        let rows = packed_rows(parts, cols)?;
        self.upload(&Tensor::from_vec(parts.concat(), &[rows, cols]))
    }

    /// Brings a tensor back to host memory as f32.
    fn to_host(&self, t: &Tensor) -> Result<Tensor>;

    /// Makes a time-major conv weight `[c_out, kernel, c_in / groups]` ready for [`Backend::conv1d`]
    /// (the CUDA backend's bf16 mode stores it in bf16).
    fn prepare_conv_weight(&self, w: &Tensor) -> Result<Tensor>;

    /// `[a, b, c]` to `[a, c, b]`: a PyTorch conv weight `[out, in / groups, kernel]` to the
    /// time-major layout [`Backend::prepare_conv_weight`] takes, and a time-major conv gradient
    /// back. Host or device input; the result lives on this backend.
    fn swap_last_two(&self, t: &Tensor) -> Result<Tensor>;

    /// `weight_norm(dim=2)` folded, as the positional conv applies it: `W[:, :, k] = g[k] ·
    /// v[:, :, k] / ‖v[:, :, k]‖₂` (norms and products in f64) for `g [1, 1, kernel]` and `v
    /// [out, in / groups, kernel]`, in v's layout, on this backend.
    fn weight_norm(&self, g: &Tensor, v: &Tensor) -> Result<Tensor>;

    /// Tensors stacked along their first dimension (the others must agree), on this backend:
    /// the q, k and v projections into one.
    fn concat_rows(&self, parts: &[&Tensor]) -> Result<Tensor>;

    /// Converts a PyTorch `nn.Linear` weight `[out, in]` into the layout [`Backend::linear`]
    /// takes (done once at load; the CPU stores `[in, out]`, which its GEMM streams fastest). The weight
    /// may already live on this backend (weight finetuning rebuilds the model from the trained
    /// tensors every update, without a round trip through the host).
    fn prepare_linear_weight(&self, w: &Tensor) -> Result<Tensor>;

    /// `act(x · wᵀ + b)` for `x [n, in]`, `w` from [`Backend::prepare_linear_weight`], `b [out]`.
    fn linear(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>, act: Activation) -> Result<Tensor>;

    /// Makes a keep-mask (bits LSB first over the PyTorch `[out, in]` weight, as
    /// [`crate::mask::pack`] writes them) ready for [`Backend::linear_segments`].
    fn prepare_mask(&self, bits: &[u8], d_out: usize, d_in: usize) -> Result<LinearMask>;

    /// [`Backend::linear`] over consecutive row segments of `x`, each `(rows, mask)` with its own
    /// keep-mask over `w` (or none): one batch served for several tasks that share the weights.
    /// `W * M` is never kept for bits (the CUDA GEMM applies them while loading weight tiles;
    /// the CPU masks into scratch per segment); a training step's CPU masks arrive applied.
    fn linear_segments(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        act: Activation,
        segments: &[(usize, Option<&LinearMask>)],
    ) -> Result<Tensor>;

    /// [`Backend::linear_segments`] for an output that only matrix products read: other linears
    /// (the FFN's intermediate activation) and attention (qkv). A backend may return it in its
    /// operand format instead of f32 (the CUDA backend at bf16: bf16 from the GEMM's epilogue,
    /// sparing the next kernel a conversion pass, or half its reads); its `linear`,
    /// `linear_segments`, `linear_sparse` and `attention` read either. By default, the f32 op.
    fn linear_as_operand(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        act: Activation,
        segments: &[(usize, Option<&LinearMask>)],
    ) -> Result<Tensor> {
        self.linear_segments(x, w, b, act, segments)
    }

    /// A prepared linear weight ([`Backend::prepare_linear_weight`]) without its zeros, when
    /// enough are dropped for [`Backend::linear_sparse`] to beat the dense GEMM at some batch
    /// size on this backend; `None` otherwise. Built once, at load.
    fn prepare_sparse(&self, w: &Tensor) -> Result<Option<SparseWeight>>;

    /// Whether [`Backend::linear_sparse`] beats [`Backend::linear`] for `sp` over `rows` input
    /// rows (this backend's measured crossovers, docs/PERF.md).
    fn sparse_pays(&self, sp: &SparseWeight, rows: usize) -> bool;

    /// [`Backend::linear`] through a [`SparseWeight`]: only the kept weights are read.
    fn linear_sparse(&self, x: &Tensor, sp: &SparseWeight, b: Option<&Tensor>, act: Activation) -> Result<Tensor>;

    /// `act(layer_norm(x + residual))` over the last dimension (residual optional). Takes `x` by
    /// value so its buffer can be reused.
    fn layer_norm(&self, x: Tensor, residual: Option<&Tensor>, norm: NormParams, act: Activation) -> Result<Tensor>;

    /// `act(group_norm(x))` with one group per channel: each channel of each utterance is
    /// normalised over that utterance's frames only.
    fn group_norm_time(&self, x: Tensor, seqs: &Seqs, norm: NormParams, act: Activation) -> Result<Tensor>;

    /// `a + b`, reusing `a`'s buffer.
    fn add(&self, a: Tensor, b: &Tensor) -> Result<Tensor>;

    /// `act(conv(x) + b)` of each utterance of `x [seqs_in.total(), c_in]` into
    /// `[seqs_out.total(), c_out]`. `w` is in the time-major layout `[c_out, kernel, c_in / groups]`.
    #[allow(clippy::too_many_arguments)]
    fn conv1d(
        &self,
        x: &Tensor,
        seqs_in: &Seqs,
        seqs_out: &Seqs,
        w: &Tensor,
        b: Option<&Tensor>,
        geom: ConvGeometry,
        act: Activation,
    ) -> Result<Tensor>;

    /// `act(group_norm_time(conv1d(x)))`, the first layer of a group-norm feature encoder, as
    /// one op: a backend may compute the conv where the norm reads it instead of storing its
    /// output (the model's largest activation). By default, the two ops in turn.
    #[allow(clippy::too_many_arguments)]
    fn conv1d_group_norm(
        &self,
        x: &Tensor,
        seqs_in: &Seqs,
        seqs_out: &Seqs,
        w: &Tensor,
        b: Option<&Tensor>,
        geom: ConvGeometry,
        norm: NormParams,
        act: Activation,
    ) -> Result<Tensor> {
        let y = self.conv1d(x, seqs_in, seqs_out, w, b, geom, Activation::Identity)?;
        self.group_norm_time(y, seqs_out, norm, act)
    }

    /// A feature-encoder layer whose output only the next layer's conv reads: `conv1d`, or with
    /// `norm` `conv1d_group_norm`. A backend may return it in its conv operand format instead
    /// of f32 (the CUDA backend at bf16: bf16, sparing the next conv a conversion pass over the
    /// largest activations of the model); its `conv1d` and `conv1d_group_norm` read either. By
    /// default, the f32 op.
    #[allow(clippy::too_many_arguments)]
    fn conv_layer_into_conv(
        &self,
        x: &Tensor,
        seqs_in: &Seqs,
        seqs_out: &Seqs,
        w: &Tensor,
        b: Option<&Tensor>,
        geom: ConvGeometry,
        norm: Option<NormParams>,
        act: Activation,
    ) -> Result<Tensor> {
        match norm {
            None => self.conv1d(x, seqs_in, seqs_out, w, b, geom, act),
            Some(norm) => self.conv1d_group_norm(x, seqs_in, seqs_out, w, b, geom, norm, act),
        }
    }

    /// Multi-head self-attention within each utterance: `softmax(q kᵀ · scale) v` per head, for
    /// `qkv [seqs.total(), 3 * heads * head_dim]` holding q, k and v side by side (one fused
    /// projection); returns `[seqs.total(), heads * head_dim]`.
    fn attention(&self, qkv: &Tensor, seqs: &Seqs, heads: usize, scale: f32) -> Result<Tensor>;

    /// Log-softmax over the last dimension.
    fn log_softmax(&self, x: &Tensor) -> Result<Tensor>;

    /// CTC over packed `logits [seqs.total(), vocab]` (log-softmax applied inside): each
    /// utterance's loss, and the gradient of their sum with respect to the logits times
    /// `grad_scale`. Targets are already validated ([`crate::ctc::loss::validate`]); utterances
    /// with no alignment give loss 0 and gradient 0 under `zero_infinity`, else an error.
    fn ctc_loss(&self, logits: &Tensor, seqs: &Seqs, targets: &crate::ctc::CtcTargets, grad_scale: f32) -> Result<(Vec<f32>, Tensor)>;
}

/// Rows of [`Backend::upload_rows`]'s packed tensor: every part a whole number of `cols`-wide rows.
pub fn packed_rows(parts: &[&[f32]], cols: usize) -> Result<usize> {
    ensure!(cols > 0, "packing rows of 0 columns");
    if let Some(p) = parts.iter().find(|p| p.len() % cols != 0) {
        bail!("a part of {} values is not a whole number of {cols}-value rows", p.len());
    }
    Ok(parts.iter().map(|p| p.len()).sum::<usize>() / cols)
}

/// Checks that `t` has exactly `shape`, naming it in the error.
pub fn expect_shape(what: &str, t: &Tensor, shape: &[usize]) -> Result<()> {
    if t.shape() != shape {
        bail!("{what}: expected shape {shape:?}, found {:?}", t.shape());
    }
    Ok(())
}
