//! `engine train` and `engine finetune`: S3-Router mask learning and the weight-finetuning
//! baseline end to end. Mask learning trains scores (one per masked weight), the CTC head and the
//! time-mask embedding; finetuning trains every tensor above the feature encoder instead of
//! scores. Both use Adam under the tri-stage schedule; the checkpoint itself stays
//! memory-mapped and is never written.
//!
//! Everything random in a step (SpecAugment spans, dropout masks, LayerDrop) is derived from
//! (seed, update, sub-batch), and the data order from (seed, epoch), so a checkpoint needs only
//! the parameters, the optimiser moments and the data position for a resumed run to end
//! bit-identical to an uninterrupted one.

use std::collections::{BTreeMap, HashMap};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use rayon::prelude::*;
use serde::Serialize;

use super::adam::{Adam, TensorAdam};
use super::checkpoint::TrainState;
use super::feed::{Feed, Position};
use super::finetune::{self, NamedWeight, Overlay, Resident, EMBEDDING, HEAD_BIAS, HEAD_WEIGHT};
use super::masked::{step, Features, MaskScope, MaskedWeight, Regularisers, StepGrads, TimeMask, Weights};
use super::prune::{Keep, Prune, Pruner};
use super::schedule::TriStage;
use super::specaugment::span_mask;
use crate::backend::backward::TrainBackend;
use crate::backend::cpu::math::add_assign;
use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::{CudaBackend, Precision};
use crate::backend::{Backend, Seqs};
use crate::ctc::{CtcTargets, Reduction};
use crate::data::dataset::{self, Dataset, DatasetOptions, Format, LabelKind, Subset};
use crate::data::labels::{symbols, Case, Labeler};
use crate::dropout::Dropout;
use crate::eval::{evaluate, EvalReport};
use crate::infer::{BatchLimits, Chunking, Recognizer};
use crate::mask;
use crate::model::checkpoint::{Checkpoint, WeightSource};
use crate::model::masks::{base_fingerprint, KeepFlags, MaskSet, Masked, Origin, BLANK_KEY};
use crate::model::preprocess::Preprocessor;
use crate::model::vocab::Vocab;
use crate::model::wav2vec2::open_language;
use crate::model::wav2vec2::Linear;
use crate::model::Wav2Vec2;
use crate::rng::{mix, SplitMix};
use crate::router::{check_sparsity, init_scores, top_k_mask, Init};
use crate::tensor::Tensor;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Schedule {
    /// Linear warm-up from `init-lr-scale`, hold, exponential decay to `final-lr-scale` (fairseq).
    TriStage,
    /// The peak learning rate throughout.
    Constant,
}

/// The validation number that picks the best checkpoint (lower is better).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    Wer,
    Cer,
    /// Unit (phoneme) error rate.
    Uer,
    Loss,
}

impl Metric {
    fn of(self, r: &EvalReport) -> f64 {
        match self {
            Metric::Wer => r.wer.rate(),
            Metric::Cer => r.cer.rate(),
            Metric::Uer => r.uer.rate(),
            Metric::Loss => r.loss,
        }
    }
}

/// What a run learns (set by the subcommand, recorded in `train_config.json`).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(tag = "learn", rename_all = "kebab-case")]
pub enum Learn {
    /// S3-Router: scores over frozen weights (`engine train`).
    #[default]
    Masks,
    /// Weight finetuning (`engine finetune`): the first `freeze_updates` updates train only the
    /// head (fairseq's `freeze_finetune_updates`); `train_feature_encoder` trains the conv
    /// feature encoder too; `prune` makes it OMP or PARP (`engine prune`).
    Weights { freeze_updates: usize, train_feature_encoder: bool, prune: Option<Prune> },
}

/// `--sparsity` when `engine train` is not given one.
pub const DEFAULT_SPARSITY: f64 = 0.1;

/// Everything that decides what a run computes (saved as `train_config.json`; a resumed run must
/// match it). Defaults follow the S3-Router wav2vec2-base recipes.
#[derive(clap::Args, Clone, Debug, Serialize)]
pub struct Recipe {
    /// Model folder (Hugging Face: config.json + safetensors; ForCTC or ForPreTraining): frozen
    /// under `engine train`, the starting point of `engine finetune` (for `engine prune`, see its
    /// --help). Without --model and --train, `engine train` runs the demo.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Training set: a fairseq .tsv, a .jsonl, a LibriSpeech / Libri-light or CommonVoice folder.
    #[arg(long)]
    pub train: Option<PathBuf>,
    /// Validation set (same layouts); validated every --valid-every updates and at the end.
    #[arg(long)]
    pub valid: Option<PathBuf>,
    /// Force the dataset layout instead of detecting it.
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    /// fairseq label file beside a manifest: letters (ltr), words (wrd) or units such as phonemes (phn).
    #[arg(long, value_enum, default_value = "ltr")]
    pub labels: LabelKind,
    /// Libri-light limited-supervision subset of a librispeech_finetuning/ training folder (the
    /// training set only).
    #[arg(long, value_enum)]
    pub subset: Option<Subset>,
    /// CommonVoice split used for training.
    #[arg(long, default_value = "train")]
    pub train_split: String,
    /// CommonVoice split used for validation.
    #[arg(long, default_value = "dev")]
    pub valid_split: String,
    /// Skip training utterances shorter than this (seconds).
    #[arg(long)]
    pub min_duration: Option<f64>,
    /// Skip training utterances longer than this (seconds).
    #[arg(long)]
    pub max_duration: Option<f64>,
    /// Characters removed from transcripts before tokenising (e.g. ",.?!;:").
    #[arg(long, default_value = "")]
    pub chars_to_ignore: String,
    /// Drop symbols the vocabulary lacks (counted) instead of stopping with a list of them.
    #[arg(long)]
    pub skip_unknown: bool,
    /// Task vocabulary: a vocab.json, or a fairseq dict.*.txt (<pad> = blank = 0, <s>, </s>,
    /// <unk>, then its symbols in order, as the official recipes label). With --keep-head it
    /// names the head's outputs (as many as the head has). Default: the model's vocab.json with
    /// --keep-head, else built from the training transcripts (blank <pad> = 0, <s>, </s>,
    /// <unk>, |, symbols by frequency).
    #[arg(long)]
    pub vocab: Option<PathBuf>,
    /// Start from the checkpoint's CTC head (vocabularies must match) instead of a new
    /// xavier-uniform head with zero bias.
    #[arg(long)]
    pub keep_head: bool,
    /// MMS models: run the frozen model with this language's adapters (and, with --keep-head,
    /// its head and vocabulary: adapter.<LANG>.safetensors) instead of the default ones. Mask
    /// sets record it, so `engine infer|eval --masks` use the same adapters.
    #[arg(long, value_name = "LANG")]
    pub target_lang: Option<String>,
    /// Fraction of each masked matrix's weights dropped (per matrix, in [0, 1); default 0.1). 0
    /// trains only the head (and the time-mask embedding) on the frozen model: the head-only
    /// baseline. Mask learning only.
    #[arg(long)]
    pub sparsity: Option<f64>,
    /// What trains: set by the subcommand.
    #[arg(skip)]
    #[serde(flatten)]
    pub learn: Learn,
    /// Score initialisation (mask learning only).
    #[arg(long, value_enum, default_value = "weight-rank")]
    pub init: Init,
    /// Start the scores from another mask learning run over the same model (its folder or
    /// best/: scores.safetensors beside masks.safetensors) instead of --init: masks carried
    /// over from another language or task and adapted (the official code's load_mask_only).
    /// Matrices that run did not mask start from --init. Mask learning only.
    #[arg(long, value_name = "DIR")]
    pub init_scores: Option<PathBuf>,
    /// Which linears of every encoder layer get masks (mask learning only).
    #[arg(long, value_enum, default_value = "ffn")]
    pub mask: MaskScope,
    /// Peak learning rate (scores, head and time-mask embedding alike).
    #[arg(long, default_value_t = 5e-5)]
    pub lr: f64,
    /// Optimiser updates.
    #[arg(long, default_value_t = 15_000)]
    pub steps: usize,
    #[arg(long, value_enum, default_value = "tri-stage")]
    pub schedule: Schedule,
    /// Tri-stage phases as fractions of --steps.
    #[arg(long, default_value_t = 0.1)]
    pub warmup_ratio: f64,
    #[arg(long, default_value_t = 0.4)]
    pub hold_ratio: f64,
    #[arg(long, default_value_t = 0.5)]
    pub decay_ratio: f64,
    /// Learning rate at step 0 as a fraction of --lr.
    #[arg(long, default_value_t = 0.01)]
    pub init_lr_scale: f64,
    /// Learning rate after the decay as a fraction of --lr.
    #[arg(long, default_value_t = 1e-4)]
    pub final_lr_scale: f64,
    /// SpecAugment: fraction of frames covered by time-mask spans (replaced by the learned embedding).
    #[arg(long, default_value_t = 0.65)]
    pub mask_time_prob: f64,
    /// Frames per time-mask span.
    #[arg(long, default_value_t = 10)]
    pub mask_time_length: usize,
    /// SpecAugment: fraction of channels zeroed in channel-mask spans.
    #[arg(long, default_value_t = 0.25)]
    pub mask_channel_prob: f64,
    /// Channels per channel-mask span.
    #[arg(long, default_value_t = 64)]
    pub mask_channel_length: usize,
    /// Dropout after the encoder input and inside every layer (after attention and the FFN).
    #[arg(long, default_value_t = 0.1)]
    pub dropout: f64,
    /// Dropout on the attention probabilities.
    #[arg(long, default_value_t = 0.1)]
    pub attention_dropout: f64,
    /// Dropout after the FFN's activation.
    #[arg(long, default_value_t = 0.1)]
    pub activation_dropout: f64,
    /// Probability of skipping each encoder layer in a step (LayerDrop).
    #[arg(long, default_value_t = 0.1)]
    pub layerdrop: f64,
    /// Most 16 kHz samples per batch (an utterance longer than that is a batch of its own).
    #[arg(long, default_value_t = 1_200_000)]
    pub max_tokens: usize,
    /// Batches accumulated per update.
    #[arg(long, default_value_t = 1)]
    pub update_freq: usize,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Validate every this many updates (0: only at the end).
    #[arg(long, default_value_t = 1000)]
    pub valid_every: usize,
    /// Validation number that selects the best checkpoint (written to OUT/best).
    #[arg(long, value_enum, default_value = "wer")]
    pub best_metric: Metric,
    /// Stop after this many updates in a row with a non-finite loss or gradient (each is skipped).
    #[arg(long, default_value_t = 5)]
    pub max_nonfinite: usize,
    /// Most seconds of audio per validation forward pass (longer utterances are validated in
    /// windows, as `engine eval` does).
    #[arg(long, default_value_t = 120.0)]
    pub valid_batch_seconds: f64,
}

/// How a run is driven (not part of the recipe).
pub struct RunOptions {
    pub out: PathBuf,
    pub resume: bool,
    pub overwrite: bool,
    /// Checkpoint every this many updates (0: only at the end).
    pub save_every: usize,
    /// Print progress on stderr.
    pub progress: bool,
    /// Memory for caching the frozen feature encoder's output per training utterance (bytes).
    pub feature_cache_bytes: usize,
    pub device: Device,
}

/// Where a run computes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Device {
    #[default]
    Cpu,
    /// The first GPU: fp32 throughout, or bf16 matrix products (fp32 accumulation, everything
    /// else fp32) for the forward and the gradient GEMMs.
    Cuda(Precision),
}

impl Device {
    /// The backend this device names (errors when it has no GPU or kernels, saying why).
    pub fn backend(self) -> Result<Box<dyn TrainBackend>> {
        Ok(match self {
            Device::Cpu => Box::new(CpuBackend),
            Device::Cuda(p) => Box::new(CudaBackend::new(0, p)?),
        })
    }

    /// Fails, saying why, when this device cannot run here (before any work starts).
    pub fn check(self) -> Result<()> {
        if let (Device::Cuda(_), Some(why)) = (self, crate::backend::cuda::unavailable_reason()) {
            bail!("--device cuda: {why}");
        }
        Ok(())
    }
}

impl Recipe {
    pub fn model(&self) -> Result<&Path> {
        self.model.as_deref().with_context(|| format!("--model is required{}", self.demo_hint()))
    }

    pub fn train(&self) -> Result<&Path> {
        self.train.as_deref().with_context(|| format!("--train is required{}", self.demo_hint()))
    }

    fn demo_hint(&self) -> &'static str {
        match self.learn {
            Learn::Masks => " (give neither --model nor --train to run the demo)",
            Learn::Weights { .. } => "",
        }
    }

    /// The fraction of each masked matrix dropped (0 when weights train).
    pub fn sparsity(&self) -> f64 {
        match self.learn {
            Learn::Masks => self.sparsity.unwrap_or(DEFAULT_SPARSITY),
            Learn::Weights { .. } => 0.0,
        }
    }

    /// The recipe as it is recorded: the sparsity filled in for mask learning; refused for
    /// weight finetuning, which has no masks.
    fn settled(&self) -> Result<Recipe> {
        let mut r = self.clone();
        match r.learn {
            Learn::Masks => r.sparsity = Some(self.sparsity()),
            Learn::Weights { prune: None, .. } => ensure!(
                r.sparsity.is_none(),
                "--sparsity: weight finetuning has no masks (prune a finetuned model with `engine prune --sparsity` instead)"
            ),
            Learn::Weights { prune: Some(_), .. } => ensure!(r.sparsity.is_none(), "a pruning run carries its sparsity in the method"),
        }
        Ok(r)
    }

    fn check(&self) -> Result<()> {
        self.model()?;
        self.train()?;
        check_sparsity(self.sparsity())?;
        if let Some(dir) = &self.init_scores {
            ensure!(self.learn == Learn::Masks, "--init-scores {}: scores start mask learning; this run trains weights", dir.display());
            ensure!(self.sparsity() > 0.0, "--init-scores {}: at --sparsity 0 nothing is masked", dir.display());
        }
        if let Learn::Weights { prune: Some(p), .. } = &self.learn {
            check_sparsity(p.sparsity())?;
        }
        ensure!(self.steps > 0, "--steps must be at least 1");
        ensure!(self.lr > 0.0 && self.lr.is_finite(), "--lr {} must be a positive number", self.lr);
        ensure!(self.update_freq > 0, "--update-freq must be at least 1");
        ensure!(self.max_tokens > 0, "--max-tokens must be at least 1");
        for (name, p) in
            [("--mask-time-prob", self.mask_time_prob), ("--mask-channel-prob", self.mask_channel_prob), ("--layerdrop", self.layerdrop)]
        {
            ensure!((0.0..=1.0).contains(&p), "{name} {p} is outside [0, 1]");
        }
        for (name, p) in [
            ("--dropout", self.dropout),
            ("--attention-dropout", self.attention_dropout),
            ("--activation-dropout", self.activation_dropout),
        ] {
            ensure!((0.0..1.0).contains(&p), "{name} {p} is outside [0, 1)");
        }
        let ratios = self.warmup_ratio + self.hold_ratio + self.decay_ratio;
        ensure!(
            [self.warmup_ratio, self.hold_ratio, self.decay_ratio].iter().all(|r| *r >= 0.0) && (ratios - 1.0).abs() < 1e-6,
            "--warmup-ratio, --hold-ratio and --decay-ratio must be non-negative and sum to 1 (they sum to {ratios})"
        );
        ensure!(self.final_lr_scale > 0.0 && self.init_lr_scale > 0.0, "--init-lr-scale and --final-lr-scale must be positive");
        Ok(())
    }

    fn lr(&self, update: usize) -> f64 {
        match self.schedule {
            Schedule::Constant => self.lr,
            Schedule::TriStage => TriStage::from_ratios(
                self.lr,
                self.steps,
                [self.warmup_ratio, self.hold_ratio, self.decay_ratio],
                self.init_lr_scale,
                self.final_lr_scale,
            )
            .lr(update),
        }
    }

    fn json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("the recipe serialises")
    }

    /// The training set (`training`: with --subset and the duration limits) or the validation set
    /// (every utterance of the folder or manifest, as `engine eval` reads it).
    fn dataset(&self, path: &Path, split: &str, training: bool) -> Result<Dataset> {
        let opts = DatasetOptions {
            format: self.format,
            labels: self.labels,
            subset: self.subset.filter(|_| training),
            split: split.to_string(),
            min_duration: self.min_duration.filter(|_| training),
            max_duration: self.max_duration.filter(|_| training),
        };
        dataset::open(path, &opts)
    }
}

/// Each masked weight's name and `[out, in]` shape.
fn named_shapes(masks: &[MaskedWeight]) -> Vec<(String, [usize; 2])> {
    masks.iter().map(|m| (m.name(), [m.d_out, m.d_in])).collect()
}

/// The tensors being learned.
struct Params {
    masks: Vec<MaskedWeight>,
    /// The [`base_fingerprint`] of the frozen weights under `masks` (none without masks) and
    /// the language adapters they ran with.
    origin: Origin,
    /// `[vocab, hidden]` (PyTorch layout) and `[vocab]`.
    head_weight: Vec<f32>,
    head_bias: Vec<f32>,
    embedding: Vec<f32>,
    /// Weight finetuning: every trained checkpoint tensor, on the training backend (empty for
    /// mask learning).
    weights: Vec<NamedWeight>,
}

impl Params {
    /// The host-side Adam's parameter order: head weight, head bias, embedding (scores and
    /// weights have their optimiser on the training backend, [`Params::tensors_mut`]).
    fn sizes(&self) -> Vec<usize> {
        vec![self.head_weight.len(), self.head_bias.len(), self.embedding.len()]
    }

    fn slices_mut(&mut self) -> Vec<&mut [f32]> {
        vec![self.head_weight.as_mut_slice(), self.head_bias.as_mut_slice(), self.embedding.as_mut_slice()]
    }

    /// Shapes of the tensors trained on the backend: the scores, then the weights.
    fn tensor_shapes(&self) -> Vec<Vec<usize>> {
        self.masks.iter().map(|m| vec![m.d_out, m.d_in]).chain(self.weights.iter().map(|w| w.shape.clone())).collect()
    }

    fn tensors_mut(&mut self) -> Vec<&mut Tensor> {
        self.masks.iter_mut().map(|m| &mut m.scores).chain(self.weights.iter_mut().map(|w| &mut w.data)).collect()
    }

    /// A step's gradients: the scores' and weights' (on the backend, [`Params::tensor_shapes`]
    /// order) and the rest in [`Params::sizes`] order (`None`: no gradient this step).
    fn grad_parts(&self, be: &dyn TrainBackend, g: StepGrads) -> Result<Grads> {
        let mut weights = g.weights;
        finetune::unfold_pos_conv_grad(be, &mut weights, &self.weights)?;
        let mut tensors = g.scores;
        tensors.extend(self.weights.iter().map(|w| weights.remove(&w.name)));
        Ok(Grads { tensors, host: vec![Some(g.head_weight), Some(g.head_bias), g.embedding] })
    }

    /// Every trained weight on the host, in order.
    fn host_weights(&self, be: &dyn Backend) -> Result<Vec<Vec<f32>>> {
        self.weights.iter().map(|w| be.to_host(&w.data)?.into_f32_vec()).collect()
    }

    /// Every score tensor on the host.
    fn host_scores(&self, be: &dyn Backend) -> Result<Vec<Vec<f32>>> {
        self.masks.iter().map(|m| be.to_host(&m.scores)?.into_f32_vec()).collect()
    }

    /// The trained head, embedding and weights (`weights`: [`Params::host_weights`]) as
    /// checkpoint tensors (name, shape, values).
    fn named<'a>(&'a self, weights: &'a [Vec<f32>]) -> Vec<(&'a str, Vec<usize>, &'a [f32])> {
        let (v, h) = (self.head_bias.len(), self.embedding.len());
        let mut t = vec![
            (HEAD_WEIGHT, vec![v, h], self.head_weight.as_slice()),
            (HEAD_BIAS, vec![v], self.head_bias.as_slice()),
            (EMBEDDING, vec![h], self.embedding.as_slice()),
        ];
        t.extend(self.weights.iter().zip(weights).map(|(w, data)| (w.name.as_str(), w.shape.clone(), data.as_slice())));
        t
    }

    fn head(&self, be: &dyn Backend) -> Result<Linear> {
        let vocab = self.head_bias.len();
        let w = Tensor::from_vec(self.head_weight.clone(), &[vocab, self.head_weight.len() / vocab]);
        Ok(Linear::prepared(be.prepare_linear_weight(&w)?, be.upload(&Tensor::from_vec(self.head_bias.clone(), &[vocab]))?))
    }

    /// Each masked weight's name, `[out, in]` shape and keep flags (the top-k of its scores,
    /// `host_scores` in mask order).
    fn keep(&self, host_scores: &[Vec<f32>], sparsity: f64) -> Vec<KeepFlags> {
        self.masks.iter().zip(host_scores).map(|(m, s)| (m.name(), vec![m.d_out, m.d_in], top_k_mask(s, sparsity))).collect()
    }

    /// This state as a mask set over the model (for validation and the outputs).
    fn mask_set(&self, be: &dyn Backend, dir: &Path, sparsity: f64, task: &Vocab) -> Result<MaskSet> {
        let masks =
            self.keep(&self.host_scores(be)?, sparsity).into_iter().map(|(name, shape, keep)| (name, (shape, mask::pack(&keep)))).collect();
        let vocab = self.head_bias.len();
        let head = (
            Tensor::from_vec(self.head_weight.clone(), &[vocab, self.head_weight.len() / vocab]),
            Tensor::from_vec(self.head_bias.clone(), &[vocab]),
        );
        let Origin { base, target_lang } = self.origin.clone();
        let blank = Some(task.blank());
        Ok(MaskSet { dir: dir.to_path_buf(), masks, sparsity: Some(sparsity), base, target_lang, head: Some(head), blank })
    }

    /// Mask learning's outputs: `scores.safetensors`, `masks.safetensors`, `head.safetensors` and
    /// `vocab.json` in `dir`.
    fn write_masks(&self, be: &dyn Backend, dir: &Path, sparsity: f64, vocab: &Vocab) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let names = named_shapes(&self.masks);
        let host = self.host_scores(be)?;
        let scores = names.iter().zip(&host).map(|((n, shape), s)| (n.as_str(), shape.as_slice(), s.as_slice()));
        let meta = BTreeMap::from([("sparsity".to_string(), sparsity.to_string())]);
        crate::fsio::write_f32_safetensors(&dir.join("scores.safetensors"), scores, &meta)?;
        MaskSet::save(dir, &self.keep(&host, sparsity), sparsity, &self.origin)?;
        self.write_head(dir, vocab)?;
        vocab.save(&dir.join("vocab.json"))
    }

    /// `head.safetensors` in `dir` (the head of a mask set), recording `vocab`'s blank.
    fn write_head(&self, dir: &Path, vocab: &Vocab) -> Result<()> {
        let (v, h) = (self.head_bias.len(), self.head_weight.len() / self.head_bias.len());
        let head = [(HEAD_WEIGHT, &[v, h][..], self.head_weight.as_slice()), (HEAD_BIAS, &[v][..], self.head_bias.as_slice())];
        let meta = BTreeMap::from([(BLANK_KEY.to_string(), vocab.blank().to_string())]);
        crate::fsio::write_f32_safetensors(&dir.join("head.safetensors"), head, &meta)
    }
}

/// One step's gradients: the scores' and weights' on the training backend, the rest on the
/// host in [`Params::sizes`] order (`None`: no gradient).
struct Grads {
    tensors: Vec<Option<Tensor>>,
    host: Vec<Option<Vec<f32>>>,
}

/// The sum of a sub-batch's gradients over an update (fairseq's `sentence_avg`: divided by the
/// update's utterance count before the optimiser sees them).
struct Accumulated {
    loss: f64,
    utterances: usize,
    samples: usize,
    grads: Grads,
}

impl Accumulated {
    fn new(tensors: usize, host: usize) -> Accumulated {
        Accumulated { loss: 0.0, utterances: 0, samples: 0, grads: Grads { tensors: vec![None; tensors], host: vec![None; host] } }
    }

    /// Adds a step's loss and gradients (absent gradients are skipped).
    fn add(&mut self, be: &dyn TrainBackend, loss: f32, parts: Grads) -> Result<()> {
        self.loss += loss as f64;
        for (acc, part) in self.grads.tensors.iter_mut().zip(parts.tensors) {
            *acc = match (acc.take(), part) {
                (Some(a), Some(p)) => Some(be.add(a, &p)?),
                (a, p) => a.or(p),
            };
        }
        for (acc, part) in self.grads.host.iter_mut().zip(parts.host) {
            match (acc.as_mut(), part) {
                (Some(a), Some(p)) => add_assign(a, &p),
                (None, Some(p)) => *acc = Some(p),
                (_, None) => {}
            }
        }
        Ok(())
    }

    fn is_finite(&self, be: &dyn TrainBackend) -> Result<bool> {
        let host = self.loss.is_finite() && self.grads.host.iter().flatten().all(|t| t.iter().all(|v| v.is_finite()));
        Ok(host && be.all_finite(&self.grads.tensors.iter().flatten().collect::<Vec<_>>())?)
    }

    fn scale_to_mean(&mut self, be: &dyn TrainBackend) -> Result<()> {
        let s = 1.0 / self.utterances.max(1) as f32;
        self.grads.host.iter_mut().flatten().for_each(|t| t.iter_mut().for_each(|v| *v *= s));
        for g in self.grads.tensors.iter_mut() {
            if let Some(t) = g.take() {
                *g = Some(be.scale(t, s)?);
            }
        }
        Ok(())
    }
}

/// Names of the files a run writes into its output folder.
const CHECKPOINT: &str = "checkpoint.safetensors";
const CONFIG: &str = "train_config.json";
const LOG: &str = "train_log.jsonl";
/// The masks the scores started from (`engine masks stats` counts the bits learning flipped).
pub const INITIAL_MASKS: &str = "initial_masks.safetensors";

/// What a finished run reports.
pub struct Summary {
    pub steps: usize,
    pub last_loss: f64,
    pub nonfinite: usize,
    pub best: Option<(usize, f64)>,
    pub audio_seconds: f64,
    pub wall_seconds: f64,
}

struct Trainer<'a> {
    recipe: &'a Recipe,
    opts: &'a RunOptions,
    be: Box<dyn TrainBackend>,
    ck: Checkpoint,
    model: Wav2Vec2,
    pre: Preprocessor,
    vocab: Vocab,
    feed: Feed,
    valid: Option<(Dataset, Vec<Vec<u32>>)>,
    /// The model folder (finetuning copies its config and preprocessor settings).
    source: PathBuf,
    /// Finetuning: the checkpoint tensors that do not train, once uploaded ([`Resident`]).
    frozen: Mutex<HashMap<String, Tensor>>,
}

/// Runs (or resumes) mask learning as `recipe` says, writing into `opts.out`.
pub fn train(recipe: &Recipe, opts: &RunOptions) -> Result<Summary> {
    let recipe = &recipe.settled()?;
    recipe.check()?;
    let be = opts.device.backend()?;
    check_out(&opts.out, opts, &recipe.json())?;
    let dir = recipe.model()?;
    let (config, ck) = open_language(dir, recipe.target_lang.as_deref())?;
    let model = Wav2Vec2::from_weights(config, &ck, &*be)?;
    let pre = Preprocessor::load(dir)?;
    let train_path = recipe.train()?;
    let train_data = recipe.dataset(train_path, &recipe.train_split, true)?;
    let vocab = task_vocab(recipe, dir, &model, &train_data)?;
    let label = |data: &Dataset| -> Result<Vec<Vec<u32>>> {
        let labeler = Labeler::new(&vocab, data.labels, &recipe.chars_to_ignore, recipe.skip_unknown);
        Ok(labeler.label_all(data.utterances.iter().map(|u| u.text.as_str()))?.tokens)
    };
    let train_labels = label(&train_data).with_context(|| format!("training transcripts of {}", train_path.display()))?;
    let feed = Feed::new(&train_data, train_labels, model.config.receptive_field(), recipe.max_tokens, recipe.seed)?;
    let valid = match &recipe.valid {
        Some(path) => {
            let data = recipe.dataset(path, &recipe.valid_split, false)?;
            let labels = label(&data).with_context(|| format!("validation transcripts of {}", path.display()))?;
            Some((data, labels))
        }
        None => None,
    };
    if !opts.resume {
        start_out(&opts.out, &recipe.json())?;
    }
    let t = Trainer { recipe, opts, be, ck, model, pre, vocab, feed, valid, source: dir.to_path_buf(), frozen: Mutex::default() };
    t.run()
}

/// Refuses an output folder that holds another run unless resuming or overwriting; resuming,
/// checks the recipe is the one the run started with.
fn check_out(out: &Path, opts: &RunOptions, recipe: &serde_json::Value) -> Result<()> {
    ensure!(!(opts.resume && opts.overwrite), "--resume and --overwrite exclude each other");
    let config_path = out.join(CONFIG);
    if opts.resume {
        let text = std::fs::read_to_string(&config_path)
            .with_context(|| format!("--resume: {} holds no run to resume (no {CONFIG})", out.display()))?;
        let saved: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", config_path.display()))?;
        let differing: Vec<String> = recipe
            .as_object()
            .expect("the recipe is an object")
            .iter()
            // A setting the run's file predates is its default, null.
            .filter(|(k, v)| saved.get(k.as_str()).unwrap_or(&serde_json::Value::Null) != *v)
            .map(|(k, v)| format!("{} (run: {}, now: {v})", k.replace('_', "-"), saved.get(k.as_str()).unwrap_or(&serde_json::Value::Null)))
            .collect();
        ensure!(differing.is_empty(), "--resume: the options differ from the run in {}: {}", out.display(), differing.join("; "));
        return Ok(());
    }
    let occupied = out.is_dir() && std::fs::read_dir(out)?.next().is_some();
    ensure!(
        !occupied || opts.overwrite,
        "output folder {} is not empty (it may hold another run): pass --resume to continue it or --overwrite to replace it",
        out.display()
    );
    Ok(())
}

/// Clears a previous run's files (under `--overwrite`) and writes the recipe: called once the
/// model and data have loaded, so a run that fails to start leaves the folder as it was.
fn start_out(out: &Path, recipe: &serde_json::Value) -> Result<()> {
    if out.is_dir() {
        for name in [
            CHECKPOINT,
            CONFIG,
            LOG,
            INITIAL_MASKS,
            "scores.safetensors",
            "masks.safetensors",
            "head.safetensors",
            "vocab.json",
            "config.json",
            "model.safetensors",
            "preprocessor_config.json",
        ] {
            let p = out.join(name);
            if p.exists() {
                std::fs::remove_file(&p).with_context(|| format!("--overwrite: cannot remove {}", p.display()))?;
            }
        }
        for dir in ["best", "best.new", "best.old"].map(|d| out.join(d)) {
            if dir.is_dir() {
                std::fs::remove_dir_all(&dir).with_context(|| format!("--overwrite: cannot remove {}", dir.display()))?;
            }
        }
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let text = serde_json::to_string_pretty(recipe)?;
    crate::fsio::atomic_write(&out.join(CONFIG), |f| f.write_all(text.as_bytes()))
}

/// Whether `--vocab` names a fairseq dictionary (dict.ltr.txt: the official recipes' labels, one
/// symbol and its count per line) rather than a vocab.json.
fn is_fairseq_dict(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "txt")
}

/// The task vocabulary: `--vocab`, the model's with `--keep-head`, or built from the training
/// transcripts.
fn task_vocab(recipe: &Recipe, dir: &Path, model: &Wav2Vec2, data: &Dataset) -> Result<Vocab> {
    let c = &model.config;
    if recipe.keep_head {
        ensure!(model.lm_head.is_some(), "--keep-head: {} has no CTC head (lm_head); drop --keep-head", dir.display());
        let vocab = match &recipe.vocab {
            Some(path) if is_fairseq_dict(path) => Vocab::from_fairseq_dict(path).and_then(|v| {
                ensure!(
                    v.len() == c.vocab_size && v.blank() == c.pad_token_id,
                    "{}: {} symbols with the blank at {}, but the head of {} has {} outputs and its blank (pad_token_id) at {}",
                    path.display(),
                    v.len(),
                    v.blank(),
                    dir.display(),
                    c.vocab_size,
                    c.pad_token_id
                );
                Ok(v)
            }),
            Some(path) => Vocab::load(path, c.vocab_size, c.pad_token_id),
            None => Vocab::load_language(&dir.join("vocab.json"), recipe.target_lang.as_deref(), c.vocab_size, c.pad_token_id),
        };
        return vocab.with_context(|| "--keep-head needs the head's vocabulary");
    }
    if let Some(path) = &recipe.vocab {
        return if is_fairseq_dict(path) { Vocab::from_fairseq_dict(path) } else { Vocab::load_task(path, 0) };
    }
    let symbols: Vec<String> =
        data.utterances.iter().flat_map(|u| symbols(&u.text, data.labels, &recipe.chars_to_ignore, Case::Mixed)).collect();
    Ok(Vocab::build(symbols.iter().map(String::as_str)))
}

impl Trainer<'_> {
    /// Fresh parameters: scores by `--init` (each matrix from its own seed, in parallel), the
    /// head, and the time-mask embedding (the checkpoint's `masked_spec_embed` if it has one).
    fn init_params(&self) -> Result<Params> {
        let r = self.recipe;
        let h = self.model.config.hidden_size;
        // At sparsity 0 every mask keeps everything: no scores, only the head (and embedding) train.
        let slots: Vec<(usize, _)> = if r.sparsity() == 0.0 {
            Vec::new()
        } else {
            (0..self.model.layers.len()).flat_map(|i| r.mask.parts().iter().map(move |&p| (i, p))).collect()
        };
        // --init-scores: (the run folder, its scores).
        let carried = r.init_scores.as_deref().map(|dir| Ok::<_, anyhow::Error>((dir, self.carried_scores(dir)?))).transpose()?;
        let carries = |name: &str| carried.as_ref().is_some_and(|(_, c)| c.contains(name));
        let masks = slots
            .into_par_iter()
            .enumerate()
            .map(|(k, (i, p))| {
                let mut rng = SplitMix(mix(r.seed ^ mix(0x5c0e_0000 + k as u64)));
                let mut m = match &carried {
                    Some((dir, c)) if carries(&p.weight_name(i)) => {
                        let scores = c.tensor(&p.weight_name(i))?.to_vec()?;
                        // MaskedWeight::load checks they fit the weight.
                        MaskedWeight::load(&self.ck, &self.model.config, i, p, |_, _| scores)
                            .with_context(|| format!("--init-scores {}", dir.display()))?
                    }
                    _ => {
                        let init = |w: &[f32], fan_in| init_scores(w, fan_in, r.init, r.sparsity(), &mut rng);
                        MaskedWeight::load(&self.ck, &self.model.config, i, p, init)?
                    }
                };
                m.scores = self.be.upload(&m.scores)?;
                Ok(m)
            })
            .collect::<Result<Vec<_>>>()?;
        if let Some((dir, _)) = &carried {
            let from = masks.iter().filter(|m| carries(&m.name())).count();
            eprintln!("scores of {from} of {} masked matrices from {} (the rest by --init)", masks.len(), dir.display());
        }
        let v = self.vocab.len();
        let (head_weight, head_bias) = match (&self.model.lm_head, r.keep_head) {
            (Some(_), true) => (self.ck.tensor(HEAD_WEIGHT)?.to_vec()?, self.ck.tensor(HEAD_BIAS)?.to_vec()?),
            _ => {
                let bound = (6.0 / (h + v) as f32).sqrt();
                let mut rng = SplitMix(mix(r.seed ^ 0x4ead));
                ((0..v * h).map(|_| rng.symmetric() * bound).collect(), vec![0.0; v])
            }
        };
        let embedding = match self.ck.tensor("wav2vec2.masked_spec_embed") {
            Ok(t) if t.numel() == h => t.to_vec()?,
            _ => {
                let mut rng = SplitMix(mix(r.seed ^ 0xe3b));
                (0..h).map(|_| (rng.symmetric() + 1.0) / 2.0).collect()
            }
        };
        let weights = match r.learn {
            Learn::Masks => Vec::new(),
            Learn::Weights { train_feature_encoder, .. } => finetune::trainable(&self.ck, train_feature_encoder, &*self.be)?,
        };
        let names = named_shapes(&masks);
        let base = if masks.is_empty() { None } else { Some(base_fingerprint(&self.ck, names.iter().map(|(n, s)| (n.as_str(), &s[..])))?) };
        let origin = Origin { base, target_lang: r.target_lang.clone() };
        Ok(Params { masks, origin, head_weight, head_bias, embedding, weights })
    }

    /// The scores of the mask learning run in `dir` (`--init-scores`), once its masks are known to
    /// cover this model's weights.
    fn carried_scores(&self, dir: &Path) -> Result<Checkpoint> {
        let set = MaskSet::load(dir).with_context(|| format!("--init-scores {}", dir.display()))?;
        set.check_base(&self.ck, self.recipe.model()?)?;
        let path = dir.join("scores.safetensors");
        ensure!(path.is_file(), "--init-scores {}: no scores.safetensors (a mask set alone has no scores to carry over)", dir.display());
        Checkpoint::open(&[path])
    }

    /// The regularisers of sub-batch `sub` of update `update` for utterances of `frames` frames.
    fn regularisers<'p>(
        &self,
        update: usize,
        sub: usize,
        frames: &[usize],
        embedding: &'p [f32],
        storage: &'p mut RegStorage,
    ) -> Regularisers<'p> {
        let r = self.recipe;
        let h = self.model.config.hidden_size;
        let mut rng = SplitMix(mix(r.seed ^ mix(0xba7c_0000_0000 ^ (update * r.update_freq + sub) as u64)));
        storage.frames = frames.iter().flat_map(|&n| span_mask(n, r.mask_time_prob, r.mask_time_length, 2, &mut rng)).collect();
        storage.channels = frames.iter().flat_map(|_| span_mask(h, r.mask_channel_prob, r.mask_channel_length, 0, &mut rng)).collect();
        storage.skip = (0..self.model.layers.len()).map(|_| r.layerdrop > 0.0 && rng.unit() < r.layerdrop).collect();
        let seed = rng.next_u64();
        let dropout = |p: f64| (p > 0.0).then_some(Dropout { p: p as f32, seed });
        Regularisers {
            time_mask: storage.frames.iter().any(|&m| m).then_some(TimeMask { frames: &storage.frames, embedding }),
            channel_mask: storage.channels.iter().any(|&m| m).then_some(storage.channels.as_slice()),
            dropout: dropout(r.dropout),
            attention_dropout: dropout(r.attention_dropout),
            activation_dropout: dropout(r.activation_dropout),
            skip_layers: &storage.skip,
        }
    }

    /// The model as `params` make it, with their head: finetuned weights laid over the checkpoint,
    /// built where they live (on the GPU: device copies and conversions only).
    fn finetuned_model(&self, params: &Params) -> Result<Wav2Vec2> {
        let mut config = self.model.config.clone();
        config.vocab_size = self.vocab.len();
        let (v, h) = (params.head_bias.len(), params.embedding.len());
        let head = [
            (HEAD_WEIGHT, Tensor::from_vec(params.head_weight.clone(), &[v, h])),
            (HEAD_BIAS, Tensor::from_vec(params.head_bias.clone(), &[v])),
        ];
        let weights = params.weights.iter().map(|w| (w.name.as_str(), w.data.clone()));
        let frozen = Resident { inner: &self.ck, be: &*self.be, cache: &self.frozen };
        Wav2Vec2::from_weights(config, &Overlay::new(&frozen, head.into_iter().chain(weights)), &*self.be)
    }

    /// What a pruning run would output now: the weights with the current mask applied (PARP's
    /// zeros regrow between re-prunes), and that mask.
    fn pruned(&self, params: &Params, pruner: &Pruner) -> Result<(Params, Keep)> {
        let keep = pruner.keep(&*self.be, &params.weights)?;
        let mut weights = params.weights.clone();
        pruner.apply(&*self.be, &mut weights, &keep)?;
        let p = Params {
            masks: Vec::new(),
            origin: Origin::default(),
            head_weight: params.head_weight.clone(),
            head_bias: params.head_bias.clone(),
            embedding: params.embedding.clone(),
            weights,
        };
        Ok((p, keep))
    }

    fn validate(&self, params: &Params) -> Result<Option<EvalReport>> {
        let Some((data, labels)) = &self.valid else { return Ok(None) };
        let model = match self.recipe.learn {
            Learn::Weights { .. } => self.finetuned_model(params)?,
            Learn::Masks => {
                let set = params.mask_set(&*self.be, &self.opts.out, self.recipe.sparsity(), &self.vocab)?;
                let mut config = self.model.config.clone();
                config.vocab_size = self.vocab.len();
                Wav2Vec2::from_weights(config, &Masked { inner: &self.ck, masks: &set }, &*self.be)?
            }
        };
        let mut rec = Recognizer::new(model, self.pre, self.vocab.clone(), &*self.be);
        // As `engine eval`: utterances over the batch limit in windows, so it bounds memory.
        let limits = BatchLimits::from_seconds(self.recipe.valid_batch_seconds);
        rec.decoding.chunking = Some(Chunking::past_limit(limits.max_samples, None, &rec.model.config)?);
        let labels = crate::data::labels::Labels { tokens: labels.clone(), skipped: 0 };
        Ok(Some(evaluate(&rec, data, &labels, limits, |_, _| {})?))
    }

    /// The run's outputs in `dir`: a mask set, or a Hugging Face model folder when weights train
    /// (pruning runs: plus the mask set of their `mask`, over the pruned weights).
    fn write_outputs(&self, params: &Params, dir: &Path, mask: Option<(&Pruner, Keep)>) -> Result<()> {
        match &self.recipe.learn {
            Learn::Masks => params.write_masks(&*self.be, dir, self.recipe.sparsity(), &self.vocab),
            Learn::Weights { .. } => {
                let weights = params.host_weights(&*self.be)?;
                crate::model::folder::write_model_folder(dir, &self.source, &self.ck, &params.named(&weights), &self.vocab)?;
                if let Some((pruner, keep)) = mask {
                    let entries = pruner.mask_entries(&params.weights, keep);
                    // Over the weights just written beside them.
                    let written = Checkpoint::open_dir(dir)?;
                    let base = base_fingerprint(&written, entries.iter().map(|(n, shape, _)| (n.as_str(), shape.as_slice())))?;
                    // Over the folder just written, whose default adapters are the run's language's.
                    MaskSet::save(dir, &entries, pruner.prune.sparsity(), &Origin { base: Some(base), target_lang: None })?;
                    params.write_head(dir, &self.vocab)?;
                }
                Ok(())
            }
        }
    }

    fn save(&self, params: &Params, adam: &Adam, tensor_adam: &TensorAdam, s: &RunState) -> Result<()> {
        let mut st = TrainState::default();
        for (m, scores) in params.masks.iter().zip(params.host_scores(&*self.be)?) {
            st.put(&format!("scores/{}", m.name()), &[m.d_out, m.d_in], scores);
        }
        let (v, h) = (params.head_bias.len(), self.model.config.hidden_size);
        st.put("head/weight", &[v, h], params.head_weight.clone());
        st.put("head/bias", &[v], params.head_bias.clone());
        st.put("embedding", &[h], params.embedding.clone());
        for (w, data) in params.weights.iter().zip(params.host_weights(&*self.be)?) {
            st.put(&format!("weights/{}", w.name), &w.shape, data);
        }
        st.put_adam("adam", adam);
        st.put_adam("tensor_adam", &tensor_adam.to_host(&*self.be)?);
        s.store(&mut st);
        st.save(&self.opts.out.join(CHECKPOINT))
    }

    fn restore(&self, params: &mut Params, adam: &mut Adam, tensor_adam: &mut TensorAdam) -> Result<RunState> {
        let path = self.opts.out.join(CHECKPOINT);
        let st = TrainState::load(&path).with_context(|| format!("--resume: {} has no usable checkpoint", self.opts.out.display()))?;
        let take = |name: &str, shape: &[usize]| -> Result<Tensor> {
            self.be.upload(&Tensor::from_vec(st.take(name, shape.iter().product())?.to_vec(), shape))
        };
        for m in &mut params.masks {
            m.scores = take(&format!("scores/{}", m.name()), &[m.d_out, m.d_in])?;
        }
        for w in &mut params.weights {
            w.data = take(&format!("weights/{}", w.name), &w.shape)?;
        }
        let (w, b, e) = (params.head_weight.len(), params.head_bias.len(), params.embedding.len());
        params.head_weight.copy_from_slice(st.take("head/weight", w)?);
        params.head_bias.copy_from_slice(st.take("head/bias", b)?);
        params.embedding.copy_from_slice(st.take("embedding", e)?);
        st.restore_adam("adam", adam)?;
        let mut host = Adam::new(&params.tensor_shapes().iter().map(|s| s.iter().product()).collect::<Vec<_>>());
        st.restore_adam("tensor_adam", &mut host)?;
        tensor_adam.load(&*self.be, &host)?;
        RunState::load(&st)
    }

    fn run(&self) -> Result<Summary> {
        let r = self.recipe;
        let out = &self.opts.out;
        let mut params = self.init_params()?;
        let mut adam = Adam::new(&params.sizes());
        let mut tensor_adam = TensorAdam::new(&*self.be, &params.tensor_shapes())?;
        let mut state = if self.opts.resume { self.restore(&mut params, &mut adam, &mut tensor_adam)? } else { RunState::default() };
        let pruner = match &r.learn {
            Learn::Weights { prune: Some(p), .. } => Some(Pruner::new(p.clone(), &self.model.config, &params.weights, &*self.be)?),
            _ => None,
        };
        if let (Some(p), false) = (&pruner, self.opts.resume) {
            // OMP: the finetuned model's mask on the (rewound) weights; PARP: the first prune.
            let keep = p.keep(&*self.be, &params.weights)?;
            p.apply(&*self.be, &mut params.weights, &keep)?;
        }
        let mut log = Log::open(&out.join(LOG), state.update)?;
        if !self.opts.resume {
            if r.learn == Learn::Masks {
                // The starting masks, for `engine masks stats` (bits flipped by learning).
                let keep = params.keep(&params.host_scores(&*self.be)?, r.sparsity());
                MaskSet::save_as(&out.join(INITIAL_MASKS), &keep, r.sparsity(), &params.origin)?;
            }
            log.write(&serde_json::json!({
                "event": "start",
                "utterances": self.feed.len(),
                "too_short": self.feed.too_short,
                "hours": self.feed.total_samples() as f64 / 16_000.0 / 3600.0,
                "masked_weights": params.masks.len(),
                "trained_weights": params.weights.iter().map(|w| w.data.numel()).sum::<usize>(),
                "vocab": self.vocab.len(),
            }))?;
        }
        let started = Instant::now();
        let mut progress = Progress::new(self.opts.progress, r.steps, state.update);
        let batches = self.feed.stream(state.position, self.pre);
        let mut last_loss = f64::NAN;
        let mut audio_seconds = 0.0;
        let (n_tensors, n_host) = (params.tensor_shapes().len(), params.sizes().len());
        let finetuning = matches!(r.learn, Learn::Weights { .. });
        // A trained feature encoder changes its output: nothing below the layers is cached then.
        let encoder_trains = matches!(r.learn, Learn::Weights { train_feature_encoder: true, .. });
        let mut cache = FeatureCache::new(if encoder_trains { 0 } else { self.opts.feature_cache_bytes }, finetuning);
        while state.update < r.steps {
            let update = state.update;
            let lr = r.lr(update);
            let mut acc = Accumulated::new(n_tensors, n_host);
            // Finetuning steps run the model as trained so far; its weights train once the
            // head-only phase is over (the time-mask embedding with them, as in fairseq).
            let (finetuned, trained) = match &r.learn {
                Learn::Masks => (None, Weights::Frozen),
                Learn::Weights { freeze_updates, .. } if update < *freeze_updates => {
                    (Some(self.finetuned_model(&params)?), Weights::Frozen)
                }
                Learn::Weights { train_feature_encoder, .. } => {
                    (Some(self.finetuned_model(&params)?), if *train_feature_encoder { Weights::All } else { Weights::AboveEncoder })
                }
            };
            let model = finetuned.as_ref().unwrap_or(&self.model);
            let masks_head;
            let head = match &finetuned {
                Some(m) => m.lm_head.as_ref().expect("the finetuned model carries the trained head"),
                None => {
                    masks_head = params.head(&*self.be)?;
                    &masks_head
                }
            };
            for sub in 0..r.update_freq {
                let ((idx, audio), next) = batches.recv().context("the data loader stopped")??;
                state.position = next;
                let frames = self.model.frame_counts(&audio.iter().map(Vec::len).collect::<Vec<_>>())?;
                let inputs: Vec<&[f32]> = audio.iter().map(Vec::as_slice).collect();
                let features = if encoder_trains { Features::Audio(&inputs) } else { cache.features(model, &*self.be, &idx, &audio)? };
                let mut storage = RegStorage::default();
                let reg = self.regularisers(update, sub, &frames, &params.embedding, &mut storage);
                let targets = CtcTargets {
                    labels: idx.iter().map(|&i| self.feed.labels[i].clone()).collect(),
                    blank: self.vocab.blank(),
                    zero_infinity: true,
                };
                let mut grads =
                    step(&*self.be, model, &params.masks, r.sparsity(), head, features, &targets, Reduction::Sum, &reg, trained)?;
                if finetuning && trained == Weights::Frozen {
                    grads.embedding = None;
                }
                acc.utterances += idx.len();
                acc.samples += audio.iter().map(Vec::len).sum::<usize>();
                acc.add(&*self.be, grads.loss, params.grad_parts(&*self.be, grads)?)?;
            }
            audio_seconds += acc.samples as f64 / 16_000.0;
            state.update += 1;
            let loss = acc.loss / acc.utterances as f64;
            if acc.is_finite(&*self.be)? {
                acc.scale_to_mean(&*self.be)?;
                if let Some(p) = &pruner {
                    // The weights follow the scores (none when weights train).
                    p.mask_grads(&*self.be, &mut acc.grads.tensors[params.masks.len()..])?;
                }
                let grads: Vec<Option<&[f32]>> = acc.grads.host.iter().map(|t| t.as_deref()).collect();
                adam.update(&mut params.slices_mut(), &grads, lr);
                // The step's model shares the trained tensors' buffers: let Adam update them in place.
                drop(finetuned);
                tensor_adam.update(&*self.be, &mut params.tensors_mut(), &acc.grads.tensors, lr)?;
                state.consecutive_nonfinite = 0;
                last_loss = loss;
                log.write(&serde_json::json!({"step": state.update, "loss": loss, "lr": lr, "utterances": acc.utterances, "audio_seconds": acc.samples as f64 / 16_000.0, "epoch": state.position.epoch}))?;
            } else {
                state.nonfinite += 1;
                state.consecutive_nonfinite += 1;
                log.write(&serde_json::json!({"step": state.update, "skipped": "non-finite loss or gradient", "lr": lr}))?;
                if state.consecutive_nonfinite >= r.max_nonfinite {
                    bail!(
                        "stopping at update {}: {} updates in a row had a non-finite loss or gradient (the last checkpoint in {} is intact; check the data, or lower --lr)",
                        state.update,
                        state.consecutive_nonfinite,
                        out.display()
                    );
                }
            }
            if let Some(p) = pruner.as_ref().filter(|p| p.reprunes_after(state.update, r.steps)) {
                let zeroed = p.reprune(&*self.be, &mut params.weights)?;
                log.write(&serde_json::json!({"step": state.update, "event": "reprune", "zeroed": zeroed}))?;
            }
            progress.show(state.update, loss, lr, audio_seconds / started.elapsed().as_secs_f64());
            let last = state.update == r.steps;
            if self.valid.is_some() && (last || (r.valid_every > 0 && state.update.is_multiple_of(r.valid_every))) {
                let view = pruner.as_ref().map(|p| self.pruned(&params, p)).transpose()?;
                let shown = view.as_ref().map_or(&params, |(v, _)| v);
                let report = self.validate(shown)?.expect("validation data is loaded");
                let value = r.best_metric.of(&report);
                let mut line = report.json();
                line["step"] = state.update.into();
                line["event"] = "valid".into();
                log.write(&line)?;
                progress.note(&format!(
                    "step {}: valid loss {:.4}, WER {:.4}, CER {:.4}, UER {:.4}",
                    state.update,
                    report.loss,
                    report.wer.rate(),
                    report.cer.rate(),
                    report.uer.rate()
                ));
                if state.best.is_none_or(|(_, b)| value < b) {
                    state.best = Some((state.update, value));
                    // Written beside, then swapped in: `best/` never mixes two validations.
                    let (best, fresh, old) = (out.join("best"), out.join("best.new"), out.join("best.old"));
                    self.write_outputs(shown, &fresh, pruner.as_ref().zip(view.as_ref().map(|(_, k)| k.clone())))?;
                    let text = serde_json::to_string_pretty(&line)?;
                    crate::fsio::atomic_write(&fresh.join("valid.json"), |f| f.write_all(text.as_bytes()))?;
                    if best.exists() {
                        std::fs::rename(&best, &old).with_context(|| format!("cannot move {} aside", best.display()))?;
                    }
                    std::fs::rename(&fresh, &best).with_context(|| format!("cannot move {} into place", fresh.display()))?;
                    if old.exists() {
                        std::fs::remove_dir_all(&old).with_context(|| format!("cannot remove {}", old.display()))?;
                    }
                }
            }
            if last || (self.opts.save_every > 0 && state.update.is_multiple_of(self.opts.save_every)) {
                self.save(&params, &adam, &tensor_adam, &state)?;
            }
        }
        let mask = pruner.as_ref().map(|p| Ok::<_, anyhow::Error>((p, p.keep(&*self.be, &params.weights)?))).transpose()?;
        self.write_outputs(&params, out, mask)?;
        progress.finish();
        Ok(Summary {
            steps: state.update,
            last_loss,
            nonfinite: state.nonfinite,
            best: state.best,
            audio_seconds,
            wall_seconds: started.elapsed().as_secs_f64(),
        })
    }
}

/// The frozen stages' output per training utterance, computed once while the memory budget
/// lasts: the projected features for mask learning (nothing below the projection trains), the
/// feature encoder's for finetuning (the projection trains). A batch's features are exactly the
/// concatenation of its utterances' (batching is exact), so cached and recomputed batches are
/// bit-identical.
struct FeatureCache {
    /// Per utterance, `[frames, width]` on the training backend (device memory on the GPU: a
    /// cached batch never crosses the bus).
    features: HashMap<usize, Tensor>,
    bytes_left: usize,
    /// Cache the feature encoder's output rather than the projection's.
    encoded: bool,
}

impl FeatureCache {
    fn new(bytes: usize, encoded: bool) -> FeatureCache {
        FeatureCache { features: HashMap::new(), bytes_left: bytes, encoded }
    }

    /// The packed features of utterances `idx` (with their decoded `audio`), on `be`.
    fn features(&mut self, model: &Wav2Vec2, be: &dyn TrainBackend, idx: &[usize], audio: &[Vec<f32>]) -> Result<Features<'static>> {
        let wrap = |f: Tensor, seqs: Seqs| if self.encoded { Features::Encoded(f, seqs) } else { Features::Projected(f, seqs) };
        let missing: Vec<usize> = (0..idx.len()).filter(|&k| !self.features.contains_key(&idx[k])).collect();
        let mut fresh: HashMap<usize, Tensor> = HashMap::new();
        if !missing.is_empty() {
            let inputs: Vec<&[f32]> = missing.iter().map(|&k| audio[k].as_slice()).collect();
            let (p, seqs) = if self.encoded { model.feature_encoder(be, &inputs)? } else { model.projected(be, &inputs)? };
            let width = p.shape()[1];
            // Computed whole, in order: the batch is `p` itself; only what the cache keeps is cut out.
            let whole = missing.len() == idx.len();
            for (j, &k) in missing.iter().enumerate() {
                let r = seqs.range(j);
                let bytes = r.len() * width * 4;
                let keep = bytes <= self.bytes_left && !self.features.contains_key(&idx[k]);
                if keep || !whole {
                    let part = be.rows(&p, r.start, r.len())?;
                    if keep {
                        self.bytes_left -= bytes;
                        self.features.insert(idx[k], part.clone());
                    }
                    fresh.insert(idx[k], part);
                }
            }
            if whole {
                return Ok(wrap(p, seqs));
            }
        }
        let parts: Vec<&Tensor> = idx.iter().map(|i| self.features.get(i).or_else(|| fresh.get(i)).expect("computed above")).collect();
        let seqs = Seqs::new(parts.iter().map(|t| t.shape()[0]).collect());
        Ok(wrap(be.concat_rows(&parts)?, seqs))
    }
}

/// The flags and spans of one sub-batch's regularisers.
#[derive(Default)]
struct RegStorage {
    frames: Vec<bool>,
    channels: Vec<bool>,
    skip: Vec<bool>,
}

/// Loop counters a checkpoint carries besides the tensors.
#[derive(Default)]
struct RunState {
    update: usize,
    position: Position,
    nonfinite: usize,
    consecutive_nonfinite: usize,
    best: Option<(usize, f64)>,
}

impl RunState {
    fn store(&self, st: &mut TrainState) {
        let m = &mut st.meta;
        m.insert("update".into(), self.update.to_string());
        m.insert("epoch".into(), self.position.epoch.to_string());
        m.insert("batch".into(), self.position.batch.to_string());
        m.insert("nonfinite".into(), self.nonfinite.to_string());
        m.insert("consecutive_nonfinite".into(), self.consecutive_nonfinite.to_string());
        if let Some((step, value)) = self.best {
            m.insert("best_step".into(), step.to_string());
            // Bit-exact: the comparison after a resume must see the same number.
            m.insert("best_value_bits".into(), value.to_bits().to_string());
        }
    }

    fn load(st: &TrainState) -> Result<RunState> {
        fn num<T: std::str::FromStr>(st: &TrainState, key: &str) -> Result<T> {
            let s = st.meta(key)?;
            s.parse().map_err(|_| anyhow::anyhow!("checkpoint entry \"{key}\" = {s:?} is not a number"))
        }
        let best = match st.meta.contains_key("best_step") {
            true => Some((num(st, "best_step")?, f64::from_bits(num(st, "best_value_bits")?))),
            false => None,
        };
        Ok(RunState {
            update: num(st, "update")?,
            position: Position { epoch: num(st, "epoch")?, batch: num(st, "batch")? },
            nonfinite: num(st, "nonfinite")?,
            consecutive_nonfinite: num(st, "consecutive_nonfinite")?,
            best,
        })
    }
}

/// `train_log.jsonl`: one JSON object per line. Resuming keeps the lines up to the checkpoint's
/// update and drops the rest (they are about to be recomputed).
struct Log {
    file: std::fs::File,
}

impl Log {
    fn open(path: &Path, resumed_at: usize) -> Result<Log> {
        let kept: String = match std::fs::read_to_string(path) {
            Ok(text) => text
                .lines()
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v["step"].as_u64())
                        .is_none_or(|s| s as usize <= resumed_at)
                })
                .map(|l| format!("{l}\n"))
                .collect(),
            Err(_) => String::new(),
        };
        crate::fsio::atomic_write(path, |f| f.write_all(kept.as_bytes()))?;
        let file = std::fs::OpenOptions::new().append(true).open(path).with_context(|| format!("cannot open {}", path.display()))?;
        Ok(Log { file })
    }

    fn write(&mut self, v: &serde_json::Value) -> Result<()> {
        writeln!(self.file, "{v}").context("cannot append to the training log")
    }
}

/// A one-line progress display on stderr (redrawn in place on a terminal, every 5% otherwise).
struct Progress {
    on: bool,
    tty: bool,
    total: usize,
    first: usize,
    started: Instant,
}

impl Progress {
    fn new(on: bool, total: usize, first: usize) -> Progress {
        Progress { on, tty: std::io::stderr().is_terminal(), total, first, started: Instant::now() }
    }

    fn show(&mut self, done: usize, loss: f64, lr: f64, audio_per_s: f64) {
        if !self.on || (!self.tty && !done.is_multiple_of((self.total / 20).max(1)) && done != self.total) {
            return;
        }
        let rate = (done - self.first) as f64 / self.started.elapsed().as_secs_f64();
        let eta = (self.total - done) as f64 / rate.max(1e-9);
        let width = 30;
        let filled = width * done / self.total;
        let bar: String = "#".repeat(filled) + &"-".repeat(width - filled);
        let line = format!("[{bar}] {done}/{} loss {loss:.4} lr {lr:.2e} {audio_per_s:.1} audio-s/s eta {}", self.total, clock(eta));
        if self.tty {
            eprint!("\r{line}\x1b[K");
        } else {
            eprintln!("{line}");
        }
    }

    fn note(&self, text: &str) {
        if self.on {
            eprintln!("{}{text}", if self.tty { "\r\x1b[K" } else { "" });
        }
    }

    fn finish(&self) {
        if self.on && self.tty {
            eprintln!();
        }
    }
}

fn clock(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accumulation_sums_present_gradients_and_skips_absent_ones() {
        let be = CpuBackend;
        let mut acc = Accumulated::new(2, 3);
        let score = |v: f32| Some(Tensor::from_vec(vec![v, 2.0 * v], &[2]));
        let g = |e: Option<Vec<f32>>, s: Option<Tensor>| Grads {
            tensors: vec![score(1.0), s],
            host: vec![Some(vec![1.0]), Some(vec![2.0]), e],
        };
        acc.add(&be, 1.5, g(Some(vec![4.0]), score(3.0))).unwrap();
        acc.add(&be, 1.5, g(None, None)).unwrap();
        acc.utterances = 2;
        assert!(acc.is_finite(&be).unwrap());
        acc.scale_to_mean(&be).unwrap();
        assert_eq!(acc.grads.host, vec![Some(vec![1.0]), Some(vec![2.0]), Some(vec![2.0])]);
        let scores: Vec<Vec<f32>> = acc.grads.tensors.iter().map(|t| t.as_ref().unwrap().to_vec().unwrap()).collect();
        assert_eq!(scores, vec![vec![1.0, 2.0], vec![1.5, 3.0]]);
        acc.add(&be, 1.5, g(None, score(f32::NAN))).unwrap();
        assert!(!acc.is_finite(&be).unwrap());
    }

    #[test]
    fn clock_reads_hours_minutes_seconds() {
        assert_eq!(clock(3725.4), "1:02:05");
    }
}
