//! wav2vec2 / XLS-R with a CTC head, forward pass over a packed batch of utterances.
//!
//! Field and tensor names follow transformers' `modeling_wav2vec2.py` so the two can be read
//! side by side. Both block orders are supported: post-LN (wav2vec2-base: group norm in conv 0,
//! encoder layer norm *before* layer 0) and pre-LN "stable layer norm" (large / XLS-R: layer norm
//! after every conv, encoder layer norm *after* the last layer). HuBERT is the same model;
//! data2vec-audio is too, but for its positional embedding ([`PosConvLayer`]).

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};

use super::checkpoint::{Checkpoint, WeightSource};
use super::config::{Config, FeatNorm, PosConv};
use super::masks::{MaskSet, Masked};
use super::tasks::Routing;
use crate::backend::{Activation, Backend, ConvGeometry, NormParams, Seqs, SparseWeight};
use crate::tensor::Tensor;

/// `y = x · wᵀ + b` for a PyTorch `[out, in]` weight.
pub struct Linear {
    /// In the backend's layout (see [`Backend::prepare_linear_weight`]).
    pub weight: Tensor,
    pub bias: Tensor,
    /// The same weight without its zeros, when the model is masked or pruned and enough of them
    /// are dropped for skipping them to pay ([`Wav2Vec2::prepare_sparse`]).
    pub sparse: Option<SparseWeight>,
}

impl Linear {
    /// Several `[d_out, d_in]` projections of the same input stacked into one (outputs side by
    /// side, in the order given), so one GEMM computes them all.
    fn load_stacked(ck: &dyn WeightSource, be: &dyn Backend, prefixes: &[String], d_in: usize, d_out: usize) -> Result<Linear> {
        let (mut w, mut b) = (Vec::new(), Vec::new());
        for p in prefixes {
            w.push(ck.get(&format!("{p}.weight"), &[d_out, d_in])?);
            b.push(ck.get(&format!("{p}.bias"), &[d_out])?);
        }
        let weight = be.prepare_linear_weight(&be.concat_rows(&w.iter().collect::<Vec<_>>())?)?;
        for p in prefixes {
            ck.release(&format!("{p}.weight"));
        }
        Ok(Linear { weight, bias: be.concat_rows(&b.iter().collect::<Vec<_>>())?, sparse: None })
    }

    fn load(ck: &dyn WeightSource, be: &dyn Backend, prefix: &str, d_in: usize, d_out: usize) -> Result<Linear> {
        let name = format!("{prefix}.weight");
        let weight = be.prepare_linear_weight(&ck.get(&name, &[d_out, d_in])?)?;
        ck.release(&name);
        Ok(Linear { weight, bias: be.upload(&ck.get(&format!("{prefix}.bias"), &[d_out])?)?, sparse: None })
    }

    /// A linear over a weight and bias already in the backend's layout (a trainer's or a task's
    /// head, built from its own tensors).
    pub fn prepared(weight: Tensor, bias: Tensor) -> Linear {
        Linear { weight, bias, sparse: None }
    }

    fn forward(&self, be: &dyn Backend, x: &Tensor, act: Activation) -> Result<Tensor> {
        self.forward_as(be, x, act, false)
    }

    /// The forward, sparse where that pays; `as_operand`: only matrix products (another linear,
    /// attention) read the output (see [`Backend::linear_as_operand`]).
    fn forward_as(&self, be: &dyn Backend, x: &Tensor, act: Activation, as_operand: bool) -> Result<Tensor> {
        let rows = x.numel() / x.shape().last().copied().unwrap_or(1).max(1);
        if let Some(sp) = self.sparse.as_ref().filter(|sp| be.sparse_pays(sp, rows)) {
            return be.linear_sparse(x, sp, Some(&self.bias), act);
        }
        if as_operand {
            be.linear_as_operand(x, &self.weight, Some(&self.bias), act, &[(rows, None)])
        } else {
            be.linear(x, &self.weight, Some(&self.bias), act)
        }
    }
}

/// PyTorch's default layer- and group-norm epsilon, which transformers keeps (instead of the
/// config's `layer_norm_eps`) where it builds a norm as `nn.LayerNorm(dim)`: the conv
/// feature encoder's norms and data2vec-audio's positional-conv norms.
pub const DEFAULT_NORM_EPS: f32 = 1e-5;

pub struct Norm {
    pub gamma: Tensor,
    pub beta: Tensor,
}

impl Norm {
    pub fn params(&self, eps: f32) -> NormParams<'_> {
        NormParams { gamma: &self.gamma, beta: &self.beta, eps }
    }

    fn load(ck: &dyn WeightSource, be: &dyn Backend, prefix: &str, dim: usize) -> Result<Norm> {
        Ok(Norm {
            gamma: be.upload(&ck.get(&format!("{prefix}.weight"), &[dim])?)?,
            beta: be.upload(&ck.get(&format!("{prefix}.bias"), &[dim])?)?,
        })
    }
}

pub struct ConvLayer {
    /// Time-major `[out, kernel, in]` (see [`Backend::conv1d`]).
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub norm: Option<Norm>,
    pub kernel: usize,
    pub stride: usize,
}

impl ConvLayer {
    /// Output frames for `samples` input frames (no padding).
    pub fn out_len(&self, samples: usize) -> usize {
        (samples - self.kernel) / self.stride + 1
    }

    /// Output frames of each utterance of `seqs`.
    pub fn out_seqs(&self, seqs: &Seqs) -> Seqs {
        Seqs::new(seqs.lens().iter().map(|&n| self.out_len(n)).collect())
    }
}

/// One conv of the positional embedding: wav2vec2's single conv (weight norm folded), or one
/// of data2vec-audio's stack (`pos_conv_embed.layers.{i}.conv`, each followed by a layer norm
/// without parameters; see [`crate::model::config::PosConv`]).
pub struct PosConvLayer {
    /// Time-major `[hidden, kernel, hidden / groups]`.
    pub weight: Tensor,
    pub bias: Tensor,
}

/// MMS's attention adapter after a pre-LN layer: `x + linear_2(ReLU(linear_1(LayerNorm(x))))`
/// (`adapter_layer.*`; its norm has PyTorch's default epsilon).
pub struct Adapter {
    pub norm: Norm,
    pub linear_1: Linear,
    pub linear_2: Linear,
}

impl Adapter {
    /// `x` with the adapter's output added, and what training's backward reads: the norm of
    /// `x` (linear_1's input) and the ReLU's output (linear_2's input; its sign is ReLU's mask).
    pub fn forward(&self, be: &dyn Backend, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let normed = be.layer_norm(x.clone(), None, self.norm.params(DEFAULT_NORM_EPS), Activation::Identity)?;
        let relu = self.linear_1.forward(be, &normed, Activation::Relu)?;
        let out = be.add(x.clone(), &self.linear_2.forward(be, &relu, Activation::Identity)?)?;
        Ok((out, normed, relu))
    }
}

pub struct EncoderLayer {
    /// `attention.{q,k,v}_proj` stacked into one projection (q, k, v side by side in the output).
    pub qkv_proj: Linear,
    pub out_proj: Linear,
    pub layer_norm: Norm,
    pub intermediate_dense: Linear,
    pub output_dense: Linear,
    pub final_layer_norm: Norm,
    /// MMS checkpoints (`adapter_attn_dim`).
    pub adapter: Option<Adapter>,
}

pub struct Wav2Vec2 {
    pub config: Config,
    pub conv_layers: Vec<ConvLayer>,
    pub feature_projection_norm: Norm,
    pub feature_projection: Linear,
    pub pos_conv: Vec<PosConvLayer>,
    /// data2vec-audio's parameter-free layer norm after each positional conv (unit gain, zero
    /// bias; PyTorch's default epsilon).
    pub pos_conv_norm: Option<Norm>,
    pub encoder_layer_norm: Norm,
    pub layers: Vec<EncoderLayer>,
    /// Absent in `Wav2Vec2ForPreTraining` checkpoints.
    pub lm_head: Option<Linear>,
}

/// What a forward pass records on request: intermediate activations (parity tests, analysis)
/// and/or the wall time of each stage (profiling; every stage then waits for the device).
#[derive(Default)]
pub struct Trace {
    pub record_tensors: bool,
    pub profile: bool,
    /// Seconds per stage, summed over layers, in the order stages first ran.
    pub stages: Vec<(&'static str, f64)>,
    /// Feature-encoder output, `[frames, conv_dim[-1]]`.
    pub conv_features: Option<Tensor>,
    /// Output of each encoder layer.
    pub layers: Vec<Tensor>,
    /// Encoder output (after the final layer norm in the stable variant).
    pub encoder_out: Option<Tensor>,
}

impl Trace {
    /// Records intermediate activations.
    pub fn tensors() -> Trace {
        Trace { record_tensors: true, ..Trace::default() }
    }

    /// Records stage timings only.
    pub fn profile() -> Trace {
        Trace { profile: true, ..Trace::default() }
    }

    fn keep(&mut self, be: &dyn Backend, t: &Tensor) -> Result<Option<Tensor>> {
        Ok(if self.record_tensors { Some(be.to_host(t)?) } else { None })
    }
}

/// Most bytes a group of utterances' first-layer output may take in the feature encoder
/// ([`Wav2Vec2::convolve`]): groups of about 40 s of audio at wav2vec2's 512 channels.
const CONV_GROUP_BYTES: usize = 256 << 20;

/// Profile stage names of the feature-encoder convolutions (deeper ones share the last).
const CONV_STAGES: [&str; 8] = ["conv 0", "conv 1", "conv 2", "conv 3", "conv 4", "conv 5", "conv 6", "conv 7+"];

/// Marks stage boundaries while profiling: waits for the device, adds the time since the last mark.
struct StageClock {
    last: Option<std::time::Instant>,
    stages: Vec<(&'static str, f64)>,
}

impl StageClock {
    fn new(be: &dyn Backend, on: bool) -> Result<StageClock> {
        if on {
            be.synchronize()?;
        }
        Ok(StageClock { last: on.then(std::time::Instant::now), stages: Vec::new() })
    }

    fn mark(&mut self, be: &dyn Backend, stage: &'static str) -> Result<()> {
        let Some(last) = self.last else { return Ok(()) };
        be.synchronize()?;
        let now = std::time::Instant::now();
        let secs = (now - last).as_secs_f64();
        match self.stages.iter_mut().find(|(s, _)| *s == stage) {
            Some(entry) => entry.1 += secs,
            None => self.stages.push((stage, secs)),
        }
        self.last = Some(now);
        Ok(())
    }
}

/// Shape of a weight that masks may cover (the FFN and attention projections of an encoder
/// layer), or `None` for any other name.
pub fn maskable_shape(c: &Config, name: &str) -> Option<Vec<usize>> {
    let rest = name.strip_prefix("wav2vec2.encoder.layers.")?;
    let (layer, suffix) = rest.split_once('.')?;
    if layer.parse::<usize>().ok()? >= c.num_hidden_layers {
        return None;
    }
    let (h, i) = (c.hidden_size, c.intermediate_size);
    match suffix {
        "feed_forward.intermediate_dense.weight" => Some(vec![i, h]),
        "feed_forward.output_dense.weight" => Some(vec![h, i]),
        "attention.q_proj.weight" | "attention.k_proj.weight" | "attention.v_proj.weight" | "attention.out_proj.weight" => Some(vec![h, h]),
        _ => None,
    }
}

/// The positional conv's weight-norm magnitude and direction, in both spellings transformers
/// writes: `weight_g`/`weight_v`, and the newer parametrizations.
pub const POS_CONV_NORM_NAMES: [[&str; 2]; 2] = [
    ["wav2vec2.encoder.pos_conv_embed.conv.weight_g", "wav2vec2.encoder.pos_conv_embed.conv.weight_v"],
    [
        "wav2vec2.encoder.pos_conv_embed.conv.parametrizations.weight.original0",
        "wav2vec2.encoder.pos_conv_embed.conv.parametrizations.weight.original1",
    ],
];

/// data2vec-audio's positional conv `i`: weight and bias names.
pub fn pos_conv_layer_names(i: usize) -> [String; 2] {
    ["weight", "bias"].map(|t| format!("wav2vec2.encoder.pos_conv_embed.layers.{i}.conv.{t}"))
}

/// The spelling of [`POS_CONV_NORM_NAMES`] whose magnitude tensor `present` finds.
pub fn pos_conv_norm_names(present: impl Fn(&str) -> bool) -> Option<[&'static str; 2]> {
    POS_CONV_NORM_NAMES.into_iter().find(|[g, _]| present(g))
}

/// The config and weights of a model folder, with MMS language `lang`'s adapters and head in
/// place of the default ones ([`Checkpoint::open_language`]; the config's vocabulary is then the
/// language's head's).
pub fn open_language(dir: &Path, lang: Option<&str>) -> Result<(Config, Checkpoint)> {
    ensure!(dir.is_dir(), "model folder {} does not exist", dir.display());
    let mut config = Config::load(&dir.join("config.json"))?;
    if let Some(l) = lang {
        ensure!(config.adapter_attn_dim.is_some(), "--target-lang {l}: {} has no language adapters (adapter_attn_dim)", dir.display());
    }
    let ck = Checkpoint::open_language(dir, lang)?;
    if lang.is_some() && ck.contains("lm_head.weight") {
        config.vocab_size = ck.tensor("lm_head.weight")?.shape()[0];
    }
    Ok((config, ck))
}

impl Wav2Vec2 {
    /// Loads a Hugging Face folder (`config.json` + safetensors) onto `be`.
    pub fn load(dir: &Path, be: &dyn Backend) -> Result<Wav2Vec2> {
        Wav2Vec2::load_masked(dir, None, be)
    }

    /// Loads a model folder with a mask set over it: masked weights become `W * M`, and the mask
    /// set's head (and its vocabulary size) replaces the checkpoint's.
    pub fn load_masked(dir: &Path, masks: Option<&MaskSet>, be: &dyn Backend) -> Result<Wav2Vec2> {
        Wav2Vec2::load_language(dir, None, masks, be)
    }

    /// [`Wav2Vec2::load_masked`] of an MMS folder with language `lang`'s adapters and head
    /// (`adapter.<lang>.safetensors`, as transformers' `load_adapter`) in place of the default ones.
    pub fn load_language(dir: &Path, lang: Option<&str>, masks: Option<&MaskSet>, be: &dyn Backend) -> Result<Wav2Vec2> {
        let (mut config, ck) = open_language(dir, lang)?;
        let Some(masks) = masks else { return Wav2Vec2::from_weights(config, &ck, be) };
        masks.check_language(lang)?;
        masks.check(|name| maskable_shape(&config, name))?;
        masks.check_base(&ck, dir)?;
        let masked = Masked { inner: &ck, masks };
        if let Some(v) = masks.head_vocab_size() {
            config.vocab_size = v;
            config.pad_token_id = masks.blank.unwrap_or(config.pad_token_id);
            if config.pad_token_id >= v {
                bail!("{}: the head has {v} outputs but its blank is {}", masks.dir.display(), config.pad_token_id);
            }
        }
        Wav2Vec2::from_weights(config, &masked, be)
    }

    pub fn from_weights(config: Config, ck: &dyn WeightSource, be: &dyn Backend) -> Result<Wav2Vec2> {
        let c = &config;
        let p = "wav2vec2";
        let mut conv_layers = Vec::new();
        let mut cin = 1;
        for (i, ((&dim, &kernel), &stride)) in c.conv_dim.iter().zip(&c.conv_kernel).zip(&c.conv_stride).enumerate() {
            let prefix = format!("{p}.feature_extractor.conv_layers.{i}");
            let w_name = format!("{prefix}.conv.weight");
            let w = ck.get(&w_name, &[dim, cin, kernel])?;
            let bias = if c.conv_bias { Some(be.upload(&ck.get(&format!("{prefix}.conv.bias"), &[dim])?)?) } else { None };
            let has_norm = c.feat_extract_norm == FeatNorm::Layer || i == 0;
            let norm = if has_norm { Some(Norm::load(ck, be, &format!("{prefix}.layer_norm"), dim)?) } else { None };
            let weight = be.prepare_conv_weight(&be.swap_last_two(&w)?)?;
            ck.release(&w_name);
            conv_layers.push(ConvLayer { weight, bias, norm, kernel, stride });
            cin = dim;
        }
        let h = c.hidden_size;
        let (pos_conv, pos_conv_norm) = Wav2Vec2::load_pos_conv(c, ck, be)?;
        let mut layers = Vec::new();
        for i in 0..c.num_hidden_layers {
            let l = format!("{p}.encoder.layers.{i}");
            layers.push(EncoderLayer {
                qkv_proj: Linear::load_stacked(ck, be, &["q", "k", "v"].map(|p| format!("{l}.attention.{p}_proj")), h, h)?,
                out_proj: Linear::load(ck, be, &format!("{l}.attention.out_proj"), h, h)?,
                layer_norm: Norm::load(ck, be, &format!("{l}.layer_norm"), h)?,
                intermediate_dense: Linear::load(ck, be, &format!("{l}.feed_forward.intermediate_dense"), h, c.intermediate_size)?,
                output_dense: Linear::load(ck, be, &format!("{l}.feed_forward.output_dense"), c.intermediate_size, h)?,
                final_layer_norm: Norm::load(ck, be, &format!("{l}.final_layer_norm"), h)?,
                adapter: match c.adapter_attn_dim {
                    Some(d) => Some(Adapter {
                        norm: Norm::load(ck, be, &format!("{l}.adapter_layer.norm"), h)?,
                        linear_1: Linear::load(ck, be, &format!("{l}.adapter_layer.linear_1"), h, d)?,
                        linear_2: Linear::load(ck, be, &format!("{l}.adapter_layer.linear_2"), d, h)?,
                    }),
                    None => None,
                },
            });
        }
        let lm_head = if ck.contains("lm_head.weight") { Some(Linear::load(ck, be, "lm_head", h, c.vocab_size)?) } else { None };
        let last = *c.conv_dim.last().unwrap();
        Ok(Wav2Vec2 {
            feature_projection_norm: Norm::load(ck, be, &format!("{p}.feature_projection.layer_norm"), last)?,
            feature_projection: Linear::load(ck, be, &format!("{p}.feature_projection.projection"), last, h)?,
            encoder_layer_norm: Norm::load(ck, be, &format!("{p}.encoder.layer_norm"), h)?,
            pos_conv,
            pos_conv_norm,
            conv_layers,
            layers,
            lm_head,
            config,
        })
    }

    /// The positional convs, and data2vec-audio's norm between them.
    fn load_pos_conv(c: &Config, ck: &dyn WeightSource, be: &dyn Backend) -> Result<(Vec<PosConvLayer>, Option<Norm>)> {
        let (h, PosConv { kernel: k, groups, stacked }) = (c.hidden_size, c.pos_conv);
        let shape = [h, h / groups, k];
        let Some(n) = stacked else {
            let [g_name, v_name] = pos_conv_norm_names(|name| ck.contains(name)).unwrap_or(POS_CONV_NORM_NAMES[1]);
            let folded = be.weight_norm(&ck.get(g_name, &[1, 1, k])?, &ck.get(v_name, &shape)?)?;
            ck.release(v_name);
            let weight = be.prepare_conv_weight(&be.swap_last_two(&folded)?)?;
            let bias = be.upload(&ck.get("wav2vec2.encoder.pos_conv_embed.conv.bias", &[h])?)?;
            return Ok((vec![PosConvLayer { weight, bias }], None));
        };
        let layers = (0..n)
            .map(|i| {
                let [w_name, b_name] = pos_conv_layer_names(i);
                let weight = be.prepare_conv_weight(&be.swap_last_two(&ck.get(&w_name, &shape)?)?)?;
                ck.release(&w_name);
                Ok(PosConvLayer { weight, bias: be.upload(&ck.get(&b_name, &[h])?)? })
            })
            .collect::<Result<Vec<_>>>()?;
        let unit =
            Norm { gamma: be.upload(&Tensor::from_vec(vec![1.0; h], &[h]))?, beta: be.upload(&Tensor::from_vec(vec![0.0; h], &[h]))? };
        Ok((layers, Some(unit)))
    }

    /// Gives every encoder linear whose weight is mostly zeros (a masked or pruned model) a
    /// sparse copy on `be` ([`Backend::prepare_sparse`]), which [`Linear`] uses where it beats the
    /// dense GEMM; returns how many linears got one.
    pub fn prepare_sparse(&mut self, be: &dyn Backend) -> Result<usize> {
        let mut count = 0;
        for layer in &mut self.layers {
            for lin in [&mut layer.qkv_proj, &mut layer.out_proj, &mut layer.intermediate_dense, &mut layer.output_dense] {
                lin.sparse = be.prepare_sparse(&lin.weight)?;
                count += lin.sparse.is_some() as usize;
            }
        }
        Ok(count)
    }

    /// Checks every utterance is long enough and returns the encoder frame count of each.
    pub fn frame_counts(&self, lens: &[usize]) -> Result<Vec<usize>> {
        lens.iter()
            .enumerate()
            .map(|(i, &n)| {
                let rf = self.config.receptive_field();
                ensure!(
                    n >= rf,
                    "utterance {i} has {n} samples, fewer than the feature encoder's receptive field of {rf} samples ({} ms at 16 kHz)",
                    rf / 16
                );
                Ok(self.config.frames_for(n))
            })
            .collect()
    }

    /// The feature encoder, projection and positional conv (and, post-LN, the encoder layer norm):
    /// the input of encoder layer 0, `[frames, hidden]` per utterance, packed. Nothing here is
    /// trained by mask learning, so training starts its cached forward pass from this.
    pub fn encoder_input(&self, be: &dyn Backend, audio: &[&[f32]]) -> Result<(Tensor, Seqs)> {
        self.embed(be, audio, None, &mut StageClock::new(be, false)?)
    }

    /// The feature encoder and projection only: where SpecAugment's time masking replaces frames
    /// with the learned embedding, before [`Wav2Vec2::positional`].
    pub fn projected(&self, be: &dyn Backend, audio: &[&[f32]]) -> Result<(Tensor, Seqs)> {
        self.project(be, audio, None, &mut StageClock::new(be, false)?)
    }

    /// `x + pos(x)`, then (post-LN) the encoder layer norm: projected features to the input of
    /// encoder layer 0. `pos` is `GELU(conv(x))` (wav2vec2), or data2vec-audio's stack of
    /// `GELU(LayerNorm(conv(.)))`.
    pub fn positional(&self, be: &dyn Backend, x: Tensor, seqs: &Seqs) -> Result<Tensor> {
        let c = &self.config;
        // Each conv: "same" padding, the extra frame of an even kernel dropped.
        let geom = self.pos_conv_geometry();
        let mut pos = x.clone();
        for layer in &self.pos_conv {
            pos = match &self.pos_conv_norm {
                None => be.conv1d(&pos, seqs, seqs, &layer.weight, Some(&layer.bias), geom, Activation::Gelu)?,
                Some(n) => {
                    let y = be.conv1d(&pos, seqs, seqs, &layer.weight, Some(&layer.bias), geom, Activation::Identity)?;
                    be.layer_norm(y, None, n.params(DEFAULT_NORM_EPS), Activation::Gelu)?
                }
            };
        }
        let x = be.add(x, &pos)?;
        if c.do_stable_layer_norm {
            return Ok(x);
        }
        be.layer_norm(x, None, self.encoder_layer_norm.params(c.layer_norm_eps), Activation::Identity)
    }

    pub fn pos_conv_geometry(&self) -> ConvGeometry {
        let PosConv { kernel, groups, .. } = self.config.pos_conv;
        ConvGeometry { kernel, stride: 1, pad_left: kernel / 2, groups }
    }

    fn embed(&self, be: &dyn Backend, audio: &[&[f32]], trace: Option<&mut Trace>, clock: &mut StageClock) -> Result<(Tensor, Seqs)> {
        let (x, seqs) = self.project(be, audio, trace, clock)?;
        let x = self.positional(be, x, &seqs)?;
        clock.mark(be, "projection + positional conv")?;
        Ok((x, seqs))
    }

    /// The convolutional feature encoder alone, `[frames, conv_dim[-1]]` per utterance, packed:
    /// what weight finetuning starts from (the feature encoder stays frozen there).
    pub fn feature_encoder(&self, be: &dyn Backend, audio: &[&[f32]]) -> Result<(Tensor, Seqs)> {
        self.convolve(be, audio, CONV_GROUP_BYTES, &mut StageClock::new(be, false)?)
    }

    fn project(&self, be: &dyn Backend, audio: &[&[f32]], trace: Option<&mut Trace>, clock: &mut StageClock) -> Result<(Tensor, Seqs)> {
        let (mut x, seqs) = self.convolve(be, audio, CONV_GROUP_BYTES, clock)?;
        if let Some(t) = trace {
            t.conv_features = t.keep(be, &x)?;
        }
        let eps = self.config.layer_norm_eps;
        x = be.layer_norm(x, None, self.feature_projection_norm.params(eps), Activation::Identity)?;
        x = self.feature_projection.forward(be, &x, Activation::Identity)?;
        Ok((x, seqs))
    }

    /// The convolutions over `audio`, a group of utterances at a time: each group's first-layer
    /// output (the model's largest activation: 512 channels at a fifth of the audio rate, 786 MB
    /// for 8 x 15 s) stays under `group_bytes` unless one utterance alone exceeds it, so the
    /// encoder's peak memory does not grow with the batch. The groups' outputs are joined.
    fn convolve(&self, be: &dyn Backend, audio: &[&[f32]], group_bytes: usize, clock: &mut StageClock) -> Result<(Tensor, Seqs)> {
        self.frame_counts(&audio.iter().map(|a| a.len()).collect::<Vec<_>>())?;
        let first_bytes = |a: &[f32]| match self.conv_layers.first() {
            Some(l) => l.out_len(a.len()) * l.weight.shape()[0] * 4,
            None => a.len() * 4,
        };
        let mut groups: Vec<&[&[f32]]> = Vec::new();
        let (mut start, mut bytes) = (0, 0);
        for (i, a) in audio.iter().enumerate() {
            let a_bytes = first_bytes(a);
            if i > start && bytes + a_bytes > group_bytes {
                groups.push(&audio[start..i]);
                (start, bytes) = (i, 0);
            }
            bytes += a_bytes;
        }
        groups.push(&audio[start..]);
        let mut outputs = Vec::with_capacity(groups.len());
        let mut lens = Vec::with_capacity(audio.len());
        for group in groups {
            let (x, seqs) = self.convolve_group(be, group, clock)?;
            outputs.push(x);
            lens.extend_from_slice(seqs.lens());
        }
        let x = match outputs.len() {
            1 => outputs.pop().expect("one group"),
            _ => be.concat_rows(&outputs.iter().collect::<Vec<_>>())?,
        };
        Ok((x, Seqs::new(lens)))
    }

    /// The convolutions over one group of utterances, all at once.
    fn convolve_group(&self, be: &dyn Backend, audio: &[&[f32]], clock: &mut StageClock) -> Result<(Tensor, Seqs)> {
        let c = &self.config;
        let mut seqs = Seqs::new(audio.iter().map(|a| a.len()).collect());
        let mut x = be.upload_rows(audio, 1)?;
        clock.mark(be, "upload audio")?;
        let last = self.conv_layers.len().saturating_sub(1);
        for (i, layer) in self.conv_layers.iter().enumerate() {
            let out = layer.out_seqs(&seqs);
            let geom = ConvGeometry { kernel: layer.kernel, stride: layer.stride, pad_left: 0, groups: 1 };
            let (w, b) = (&layer.weight, layer.bias.as_ref());
            // conv -> [norm] -> GELU, with the GELU fused into whichever op comes last. Both conv
            // norms use DEFAULT_NORM_EPS. Below the last layer, the output only feeds the next
            // conv (in the backend's operand format).
            x = match (&layer.norm, c.feat_extract_norm) {
                (None, _) if i < last => be.conv_layer_into_conv(&x, &seqs, &out, w, b, geom, None, Activation::Gelu)?,
                (Some(n), FeatNorm::Group) if i < last => {
                    be.conv_layer_into_conv(&x, &seqs, &out, w, b, geom, Some(n.params(DEFAULT_NORM_EPS)), Activation::Gelu)?
                }
                (None, _) => be.conv1d(&x, &seqs, &out, w, b, geom, Activation::Gelu)?,
                (Some(n), FeatNorm::Group) => {
                    be.conv1d_group_norm(&x, &seqs, &out, w, b, geom, n.params(DEFAULT_NORM_EPS), Activation::Gelu)?
                }
                (Some(n), FeatNorm::Layer) => {
                    let y = be.conv1d(&x, &seqs, &out, w, b, geom, Activation::Identity)?;
                    be.layer_norm(y, None, n.params(DEFAULT_NORM_EPS), Activation::Gelu)?
                }
            };
            seqs = out;
            clock.mark(be, CONV_STAGES[i.min(CONV_STAGES.len() - 1)])?;
        }
        Ok((x, seqs))
    }

    /// The feature encoder and projection, then the transformer encoder: `[frames, hidden]` per
    /// utterance, packed. `audio` is already normalised (see [`super::preprocess`]).
    pub fn encode(&self, be: &dyn Backend, audio: &[&[f32]], trace: Option<&mut Trace>) -> Result<(Tensor, Seqs)> {
        self.encode_routed(be, audio, trace, None)
    }

    /// [`Wav2Vec2::encode`] with each utterance's masked linears under its own task's masks
    /// (`routing`): one batch serves several tasks over the same frozen weights.
    pub fn encode_routed(
        &self,
        be: &dyn Backend,
        audio: &[&[f32]],
        mut trace: Option<&mut Trace>,
        routing: Option<&Routing>,
    ) -> Result<(Tensor, Seqs)> {
        let c = &self.config;
        let mut clock = StageClock::new(be, trace.as_ref().is_some_and(|t| t.profile))?;
        let (mut x, seqs) = self.embed(be, audio, trace.as_deref_mut(), &mut clock)?;
        let eps = c.layer_norm_eps;
        let enc_norm = self.encoder_layer_norm.params(eps);
        let scale = 1.0 / (c.head_dim() as f32).sqrt();
        if let Some(r) = routing {
            ensure!(r.tasks.len() == seqs.count(), "routing names tasks for {} of {} utterances", r.tasks.len(), seqs.count());
        }
        for (i, layer) in self.layers.iter().enumerate() {
            // Linear `slot` of this layer (qkv, out, intermediate, output), routed when any task
            // masks it; `as_operand`: only matrix products read its output (attention, the next linear).
            let linear = |slot: usize, lin: &Linear, h: &Tensor, act: Activation, as_operand: bool| -> Result<Tensor> {
                match routing.and_then(|r| r.segments(&seqs, i, slot)) {
                    Some(segments) if as_operand => be.linear_as_operand(h, &lin.weight, Some(&lin.bias), act, &segments),
                    Some(segments) => be.linear_segments(h, &lin.weight, Some(&lin.bias), act, &segments),
                    None => lin.forward_as(be, h, act, as_operand),
                }
            };
            let attention = |h: &Tensor| -> Result<Tensor> {
                let qkv = linear(0, &layer.qkv_proj, h, Activation::Identity, true)?;
                let a = be.attention(&qkv, &seqs, c.num_attention_heads, scale)?;
                linear(1, &layer.out_proj, &a, Activation::Identity, false)
            };
            let feed_forward = |h: &Tensor| -> Result<Tensor> {
                let mid = linear(2, &layer.intermediate_dense, h, Activation::Gelu, true)?;
                linear(3, &layer.output_dense, &mid, Activation::Identity, false)
            };
            let (ln, fln) = (layer.layer_norm.params(eps), layer.final_layer_norm.params(eps));
            let id = Activation::Identity;
            if c.do_stable_layer_norm {
                let a = attention(&be.layer_norm(x.clone(), None, ln, id)?)?;
                x = be.add(x, &a)?;
                clock.mark(be, "attention blocks")?;
                let f = feed_forward(&be.layer_norm(x.clone(), None, fln, id)?)?;
                x = be.add(x, &f)?;
                if let Some(adapter) = &layer.adapter {
                    x = adapter.forward(be, &x)?.0;
                }
            } else {
                x = be.layer_norm(attention(&x)?, Some(&x), ln, id)?;
                clock.mark(be, "attention blocks")?;
                x = be.layer_norm(feed_forward(&x)?, Some(&x), fln, id)?;
            }
            clock.mark(be, "feed-forward blocks")?;
            if let Some(t) = trace.as_deref_mut() {
                if let Some(kept) = t.keep(be, &x)? {
                    t.layers.push(kept);
                }
            }
        }
        if c.do_stable_layer_norm {
            x = be.layer_norm(x, None, enc_norm, Activation::Identity)?;
        }
        clock.mark(be, "feed-forward blocks")?;
        if let Some(t) = trace {
            t.encoder_out = t.keep(be, &x)?;
            t.stages = clock.stages;
        }
        Ok((x, seqs))
    }

    /// CTC logits `[frames, vocab]` per utterance, packed.
    pub fn logits(&self, be: &dyn Backend, audio: &[&[f32]], trace: Option<&mut Trace>) -> Result<(Tensor, Seqs)> {
        let Some(head) = &self.lm_head else {
            bail!("this checkpoint has no CTC head (lm_head): it is a pretraining checkpoint; learn masks and a head with `engine train` first")
        };
        let (x, seqs) = self.encode(be, audio, trace)?;
        Ok((head.forward(be, &x, Activation::Identity).context("CTC head")?, seqs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::backend::cpu::CpuBackend;

    #[test]
    fn weight_norm_fold_gives_unit_direction_times_g() {
        // Two output/input rows, kernel 2: column norms are 5 and 1.
        let v = Tensor::from_vec(vec![3.0, 1.0, 4.0, 0.0], &[2, 1, 2]);
        let w = CpuBackend.weight_norm(&Tensor::from_vec(vec![2.0, 3.0], &[1, 1, 2]), &v).unwrap();
        assert_eq!(w.to_vec().unwrap(), vec![1.2, 3.0, 1.6, 0.0]);
    }

    #[test]
    fn swapping_the_last_two_dimensions_moves_kernel_before_input_channels() {
        // out=1, in=2, kernel=3: w[0, c, k] = 10c + k.
        let be = CpuBackend;
        let w = Tensor::from_vec(vec![0.0, 1.0, 2.0, 10.0, 11.0, 12.0], &[1, 2, 3]);
        let t = be.swap_last_two(&w).unwrap();
        assert_eq!((t.shape(), t.to_vec().unwrap()), (&[1, 3, 2][..], vec![0.0, 10.0, 1.0, 11.0, 2.0, 12.0]));
        let w = Tensor::from_vec((0..2 * 3 * 4).map(|i| i as f32).collect(), &[2, 3, 4]);
        assert_eq!(be.swap_last_two(&be.swap_last_two(&w).unwrap()).unwrap().to_vec().unwrap(), w.to_vec().unwrap());
    }

    #[test]
    fn the_feature_encoder_gives_the_same_frames_in_groups_as_all_at_once() {
        let be = CpuBackend;
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/base-like");
        let model = Wav2Vec2::load(&dir, &be).unwrap();
        let mut rng = crate::rng::SplitMix(7);
        let audio: Vec<Vec<f32>> = [4000, 1000, 2500, 1733, 3000].iter().map(|&n| (0..n).map(|_| rng.symmetric()).collect()).collect();
        let audio: Vec<&[f32]> = audio.iter().map(Vec::as_slice).collect();
        let clock = || StageClock::new(&be, false).unwrap();
        let (whole, seqs) = model.convolve(&be, &audio, usize::MAX, &mut clock()).unwrap();
        // One byte per group: every utterance alone; a middling size: groups of one to three.
        for group_bytes in [1, model.conv_layers[0].weight.shape()[0] * 4 * 1200] {
            let (grouped, grouped_seqs) = model.convolve(&be, &audio, group_bytes, &mut clock()).unwrap();
            assert_eq!(grouped_seqs.lens(), seqs.lens());
            let (a, b) = (grouped.to_vec().unwrap(), whole.to_vec().unwrap());
            assert_eq!(a.len(), b.len());
            for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "groups of {group_bytes} bytes, element {i}: {x} vs {y}");
            }
        }
    }
}
