//! The `engine` command line: parse, call the library, print.

use std::collections::{BTreeSet, HashMap};
use std::ffi::OsString;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, ensure, Context, Result};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use s3router::alignment::{align_dataset, TooShort};
use s3router::analysis::{self, mask_stats, StatsSummary};
use s3router::backend::cpu::bf16::CpuBf16Backend;
use s3router::backend::cuda::Precision as CudaPrecision;
use s3router::backend::Backend;
use s3router::bench;
use s3router::ctc::Decoder;
use s3router::data::audio::SAMPLE_RATE;
use s3router::data::dataset::{self, Dataset, DatasetOptions, Format, LabelKind, Subset};
use s3router::data::labels::{self, Case, Labeler, Labels};
use s3router::eval::evaluate;
use s3router::infer::{word_stamps, BatchLimits, Chunking, Decoding, Recognizer, Stamp, Utterance, WindowProgress};
use s3router::metrics::{self, word_and_char_counts, Counts, TextNorm};
use s3router::model::config::Config;
use s3router::model::fairseq;
use s3router::model::folder::write_masked_folder;
use s3router::model::masks::MaskSet;
use s3router::model::vocab::Vocab;
use s3router::multitask::{parse_routed, parse_task, MultiRecognizer};
use s3router::plot;
use s3router::train::demo;
use s3router::train::prune::{prune, Method as PruneMethod, PruneArgs};
use s3router::train::recipe_file::recipe_flags;
use s3router::train::run::{train, Device as TrainDevice, Learn, Recipe, RunOptions, Summary, INITIAL_MASKS};

#[derive(Parser)]
#[command(
    name = "engine",
    version,
    about = "S3-Router engine: inference and mask learning over wav2vec2 / XLS-R, HuBERT, UniSpeech(-SAT) and data2vec-audio"
)]
struct Cli {
    /// Worker threads for CPU compute (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Device {
    Cpu,
    /// The first GPU.
    Cuda,
}

#[derive(Clone, Copy, ValueEnum)]
enum Precision {
    /// fp32 everywhere (matches transformers to ~1e-5).
    F32,
    /// bf16 matrix products with fp32 accumulation: on GPU tensor cores, or on the CPU with
    /// AVX512-BF16 (Zen 4, Sapphire Rapids and later; inference only: linears, attention and
    /// the feature encoder's convolutions after the first, about 1.6x the f32 speed).
    Bf16,
}

/// Where and how to compute.
#[derive(clap::Args, Clone, Copy)]
struct DeviceArgs {
    /// Compute device.
    #[arg(long, value_enum, default_value = "cpu")]
    device: Device,
    /// Arithmetic of matrix products.
    #[arg(long, value_enum, default_value = "f32")]
    precision: Precision,
    /// Always use the dense product for masked or pruned linears (otherwise the dropped weights
    /// of a linear with 80% or more of them zero are skipped, on the CPU and the GPU, where the
    /// measured crossovers say that is faster).
    #[arg(long)]
    dense: bool,
}

/// A model, masked or not, as `engine eval` and `engine align` run it.
#[derive(clap::Args)]
struct ModelArgs {
    /// Model folder (config.json, model.safetensors, vocab.json, preprocessor_config.json).
    #[arg(long)]
    model: PathBuf,
    /// A mask set (masks.safetensors, head.safetensors, vocab.json) to run the model with.
    #[arg(long)]
    masks: Option<PathBuf>,
    /// MMS models: the language whose adapters and head (adapter.<LANG>.safetensors) and
    /// vocabulary (vocab.json holds one per language) to use, as transformers' target_lang.
    #[arg(long, value_name = "LANG")]
    target_lang: Option<String>,
}

impl ModelArgs {
    fn load<'a>(&self, be: &'a dyn Backend, device: DeviceArgs) -> Result<Recognizer<'a>> {
        Recognizer::load(&self.model, self.target_lang.as_deref(), self.masks.as_deref(), be, !device.dense)
    }
}

/// A dataset with transcripts, as `engine eval` and `engine align` read it.
#[derive(clap::Args)]
struct DataArgs {
    /// Dataset: a .tsv, a .jsonl, or a folder.
    #[arg(long)]
    data: PathBuf,
    /// Force the dataset layout instead of detecting it.
    #[arg(long, value_enum)]
    format: Option<Format>,
    /// fairseq label file to read beside the manifest.
    #[arg(long, value_enum, default_value = "ltr")]
    labels: LabelKind,
    /// Libri-light limited-supervision subset under librispeech_finetuning/.
    #[arg(long, value_enum)]
    subset: Option<Subset>,
    /// CommonVoice split (a <split>.tsv in the folder).
    #[arg(long, default_value = "test")]
    split: String,
    /// Skip utterances shorter than this (seconds).
    #[arg(long)]
    min_duration: Option<f64>,
    /// Skip utterances longer than this (seconds).
    #[arg(long)]
    max_duration: Option<f64>,
    /// Characters removed from transcripts before tokenising (e.g. punctuation: ",.?!;:").
    #[arg(long, default_value = "")]
    chars_to_ignore: String,
    /// Drop symbols the vocabulary lacks (counted) instead of stopping with a list of them.
    #[arg(long)]
    skip_unknown: bool,
}

impl DataArgs {
    fn open(&self) -> Result<Dataset> {
        let opts = DatasetOptions {
            format: self.format,
            labels: self.labels,
            subset: self.subset,
            split: self.split.clone(),
            min_duration: self.min_duration,
            max_duration: self.max_duration,
        };
        dataset::open(&self.data, &opts)
    }

    /// The dataset's transcripts as tokens of `vocab`.
    fn labels(&self, data: &Dataset, vocab: &Vocab) -> Result<Labels> {
        let labels = Labeler::new(vocab, data.labels, &self.chars_to_ignore, self.skip_unknown)
            .label_all(data.utterances.iter().map(|u| u.text.as_str()))?;
        if labels.skipped > 0 {
            eprintln!("skipped {} symbols missing from the vocabulary", labels.skipped);
        }
        Ok(labels)
    }
}

/// What `engine infer --timestamps` times.
#[derive(Clone, Copy, ValueEnum)]
enum Timestamps {
    /// Every token of the transcript (a word delimiter as a space).
    Char,
    /// Every word: the tokens between delimiters.
    Word,
}

impl Timestamps {
    /// A transcript's timed tokens, or its words, as transformers' ASR pipeline lists them:
    /// [{"text", "timestamp": [start, end]}].
    fn chunks(self, tokens: &[Stamp]) -> Vec<serde_json::Value> {
        let stamps = match self {
            Timestamps::Char => tokens.to_vec(),
            Timestamps::Word => word_stamps(tokens),
        };
        stamps.iter().map(|s| serde_json::json!({"text": s.text, "timestamp": [s.start, s.end]})).collect()
    }
}

/// How `engine infer`, `eval` and `align` cut long files.
#[derive(clap::Args, Clone)]
struct ChunkArgs {
    /// Recognise files longer than this many seconds in windows this long with some context on
    /// each side, and stitch their logits back together before decoding, as transformers' ASR
    /// pipeline does with `chunk_length_s` (the same cuts and the same kept frames). Without it,
    /// files longer than --batch-seconds run in 30 s windows; 0 runs every file whole, however
    /// long (time and memory then grow with the square of its length).
    #[arg(long, value_name = "SECONDS")]
    chunk_seconds: Option<f64>,
    /// Context on each side of a window, in seconds, whose frames are dropped: one number for
    /// both sides or LEFT,RIGHT (transformers' `stride_length_s`; default: a sixth of the window).
    #[arg(long, value_name = "SECONDS|LEFT,RIGHT")]
    chunk_context: Option<String>,
}

impl ChunkArgs {
    /// Windows chosen without --chunk-seconds.
    fn automatic(&self) -> bool {
        self.chunk_seconds.is_none()
    }

    /// The cuts for a model: --chunk-seconds windows, or 30 s ones for files over the batch limit.
    fn chunking(&self, config: &Config, limits: BatchLimits) -> Result<Option<Chunking>> {
        let context = match self.chunk_context.as_deref() {
            None => None,
            Some(text) => {
                let number = |t: &str| t.trim().parse::<f64>().with_context(|| format!("--chunk-context {text}: {t:?} is not a number"));
                Some(match text.split_once(',') {
                    Some((l, r)) => (number(l)?, number(r)?),
                    None => (number(text)?, number(text)?),
                })
            }
        };
        Ok(Some(match self.chunk_seconds {
            Some(0.0) => {
                ensure!(context.is_none(), "--chunk-context: --chunk-seconds 0 runs every file whole, without windows");
                return Ok(None);
            }
            Some(window) => {
                let (left, right) = context.unwrap_or((window / 6.0, window / 6.0));
                Chunking::from_seconds(window, left, right, config).with_context(|| format!("--chunk-seconds {window}"))?
            }
            None => Chunking::past_limit(limits.max_samples, context, config).context("windows for files over --batch-seconds")?,
        }))
    }
}

#[derive(Subcommand)]
enum MasksCommand {
    /// Write the model with a mask set applied as a new Hugging Face CTC folder of the model's
    /// family (Wav2Vec2ForCTC, HubertForCTC, Data2VecAudioForCTC, ...: config.json,
    /// model.safetensors, vocab.json, preprocessor_config.json): each masked weight multiplied
    /// by its mask, the set's head and vocabulary in place of the model's. transformers, its
    /// pipelines and `engine infer --model OUT` then run the masked model without the engine's
    /// mask format (the masks stay recoverable as the zeros).
    Apply {
        /// The model folder the masks were learned on.
        #[arg(long)]
        model: PathBuf,
        /// The mask set (masks.safetensors, head.safetensors, vocab.json).
        #[arg(long)]
        masks: PathBuf,
        /// The new folder (absent or empty).
        #[arg(long)]
        out: PathBuf,
    },
    /// Per masked matrix, per layer and overall: sparsity, the share of weights whose mask
    /// differs from the magnitude mask of the same weights (where S3-Router's default
    /// weight-rank initialisation starts), and the share flipped from the run's initial masks
    /// (initial_masks.safetensors in DIR or, for a run's best/, the run folder).
    Stats {
        /// The model folder the masks were learned on.
        #[arg(long)]
        model: PathBuf,
        /// Print one JSON object instead of the table.
        #[arg(long)]
        json: bool,
        /// Mask set folder (masks.safetensors).
        dir: PathBuf,
    },
    /// Cosine similarity of the binary masks of several mask sets (one per language or task):
    /// per masked matrix, per layer and overall for every pair, next to the chance level of
    /// independent masks. With three or more sets, also the phonetic similarity of their
    /// phoneme inventories (the content tokens of each set's vocab.json) and its Pearson and
    /// Spearman correlation with mask similarity over the pairs, overall and per layer, with a
    /// permutation (Mantel) p-value.
    Compare {
        /// Print one JSON object instead of the tables.
        #[arg(long)]
        json: bool,
        /// Also write one CSV row per (pair, scope): a,b,scope,cosine,chance,phonetic.
        #[arg(long)]
        csv: Option<PathBuf>,
        /// Relabellings for the permutation p-values.
        #[arg(long, default_value_t = 10_000)]
        permutations: usize,
        /// A phoneme inventory as NAME=FILE (whitespace-separated phones, e.g. an expert
        /// inventory or a .phn label file), replacing the named set's vocabulary.
        #[arg(long)]
        inventory: Vec<String>,
        /// Write figures (SVG and PNG) into this folder: layers (mask cosine per pair and layer),
        /// matrix (set x set, overall) and, with inventories, scatter (mask vs phonetic
        /// similarity with the least-squares line).
        #[arg(long)]
        plots: Option<PathBuf>,
        /// Mask sets as NAME=DIR (or DIR, named by its folder).
        #[arg(required = true, num_args = 2..)]
        sets: Vec<String>,
    },
}

/// `--config` of `engine train` and `engine finetune` (read before the flags are parsed; see
/// [`with_recipe_file`]).
#[derive(clap::Args)]
struct RecipeFile {
    /// Start from the recipe in FILE: a run's train_config.json, or any JSON object of flag names
    /// (with _ or -) and values (null and false set nothing). Flags on the command line override
    /// it, e.g. `--config runs/a/train_config.json --out runs/b --seed 2`.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

impl RecipeFile {
    /// Says where the recipe came from.
    fn note(&self) {
        if let Some(file) = &self.config {
            eprintln!("recipe from {} (flags on the command line override it)", file.display());
        }
    }
}

/// `engine train|finetune ... --config FILE ...`: the recipe's flags go in right after the
/// subcommand, so the flags typed on the command line come later and override them.
fn with_recipe_file(mut args: Vec<OsString>) -> Result<Vec<OsString>> {
    // The subcommand: the first word after the global --threads.
    let mut i = 1;
    while args.get(i).is_some_and(|a| a == "--threads") {
        i += 2;
    }
    while args.get(i).and_then(|a| a.to_str()).is_some_and(|a| a.starts_with("--threads=")) {
        i += 1;
    }
    let Some(sub) = args.get(i).and_then(|a| a.to_str()).filter(|s| *s == "train" || *s == "finetune").map(str::to_string) else {
        return Ok(args);
    };
    let Some(at) = args[i..].iter().position(|a| a == "--config" || a.to_str().is_some_and(|a| a.starts_with("--config="))) else {
        return Ok(args);
    };
    let path = match args[i + at].to_str().and_then(|a| a.strip_prefix("--config=")) {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(args.get(i + at + 1).context("--config needs a file")?),
    };
    let text = std::fs::read_to_string(&path).with_context(|| format!("--config: cannot read {}", path.display()))?;
    let recipe: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("--config {}: not valid JSON", path.display()))?;
    let command = Cli::command();
    let longs: Vec<String> = command
        .find_subcommand(&sub)
        .expect("train and finetune are subcommands")
        .get_arguments()
        .filter_map(|a| a.get_long())
        .filter(|l| *l != "config")
        .map(str::to_string)
        .collect();
    let learn = if sub == "train" { "masks" } else { "weights" };
    let flags = recipe_flags(&recipe, learn, |f| longs.iter().any(|l| l == f), &path)?;
    args.splice(i + 1..i + 1, flags.into_iter().map(OsString::from));
    Ok(args)
}

/// How `engine train` and `engine finetune` run (not part of the recipe).
#[derive(clap::Args)]
struct RunArgs {
    /// Output folder (the demo: runs/demo).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run in --out from its last checkpoint (same options required).
    #[arg(long)]
    resume: bool,
    /// Replace a run already in --out.
    #[arg(long)]
    overwrite: bool,
    /// Write a checkpoint every this many updates (0: only at the end).
    #[arg(long, default_value_t = 500)]
    save_every: usize,
    /// No progress display on stderr.
    #[arg(long)]
    quiet: bool,
    /// Memory (MB) for caching the frozen feature encoder's output per training utterance (on the
    /// training device: GPU memory with --device cuda).
    #[arg(long, default_value_t = 2048)]
    feature_cache_mb: usize,
    /// Compute device: the CPU, or the first GPU (kernels built with nvcc, see README).
    #[arg(long, value_enum, default_value = "cpu")]
    device: Device,
    /// Arithmetic of the matrix products on the GPU: f32 (the parity path) or bf16 (tensor
    /// cores, fp32 accumulation; gradients within ~1e-2 of f32).
    #[arg(long, value_enum, default_value = "f32")]
    precision: Precision,
}

impl RunArgs {
    /// The run options, with `default_out` when --out is absent (`None`: --out is required).
    fn options(self, default_out: Option<&str>) -> Result<RunOptions> {
        let out = match (self.out, default_out) {
            (Some(out), _) => out,
            (None, Some(d)) => PathBuf::from(d),
            (None, None) => bail!("--out is required"),
        };
        Ok(RunOptions {
            out,
            resume: self.resume,
            overwrite: self.overwrite,
            save_every: self.save_every,
            progress: !self.quiet,
            feature_cache_bytes: self.feature_cache_mb << 20,
            device: compute_device(self.device, self.precision)?,
        })
    }
}

#[derive(Subcommand)]
enum Command {
    /// Transcribe audio files with a Hugging Face CTC folder of wav2vec2, HuBERT, UniSpeech or
    /// data2vec-audio: greedy CTC decoding, or prefix beam search with --beam.
    ///
    /// Prints one line per file: the path, a tab, the transcript. WAV (8/16/24/32-bit integer,
    /// 32-bit float), FLAC and MP3 are read; stereo is averaged; any sample rate is resampled to 16 kHz.
    ///
    /// Long recordings run in overlapping windows whose logits are stitched back together before
    /// decoding (--chunk-seconds); by default only files longer than --batch-seconds are cut.
    ///
    /// Many masks, one model: give `--masks NAME=DIR` once per task and each file as FILE@NAME;
    /// the frozen weights load once, every task adds its packed masks and head, and files of
    /// different tasks share batches. The memory of that against one finetuned copy per task is
    /// printed on stderr.
    Infer {
        /// Model folder: config.json, model.safetensors, vocab.json, preprocessor_config.json.
        #[arg(long)]
        model: PathBuf,
        /// A mask set (masks.safetensors, head.safetensors, vocab.json) to run the model with, or
        /// NAME=DIR, repeated, for several tasks at once.
        #[arg(long)]
        masks: Vec<String>,
        /// MMS models: the language whose adapters and head (adapter.<LANG>.safetensors) and
        /// vocabulary (vocab.json holds one per language) to use, as transformers' target_lang.
        #[arg(long, value_name = "LANG")]
        target_lang: Option<String>,
        #[command(flatten)]
        device: DeviceArgs,
        /// Also write the logits to this .safetensors file: one f32 tensor `logits.<i>` of shape
        /// [frames_i, vocab] per input i, in argument order.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Decode with a CTC prefix beam search keeping this many prefixes (no language model)
        /// instead of greedy decoding: it scores each labelling by all of its alignments, not
        /// one path. Costs about frames x beam x vocabulary steps per utterance.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=4096))]
        beam: Option<u32>,
        /// Print one JSON object per file instead of the tab-separated line, as transformers' ASR
        /// pipeline returns it with `return_timestamps`: {"audio", "text", "chunks": [{"text",
        /// "timestamp": [start, end]}]}, times in seconds from the file's start. A token's time is
        /// the run of frames the decoding path spends on it (with --beam, the most probable path
        /// of the labelling found).
        #[arg(long, value_enum)]
        timestamps: Option<Timestamps>,
        /// Most seconds of audio in one forward pass (bounds memory; longer files are cut, see
        /// --chunk-seconds).
        #[arg(long, default_value_t = 120.0)]
        batch_seconds: f64,
        #[command(flatten)]
        chunks: ChunkArgs,
        /// Audio files (FILE@NAME with several tasks).
        #[arg(required_unless_present = "files_from")]
        audio: Vec<PathBuf>,
        /// Also read audio files from this list, one per line (blank lines skipped; - reads
        /// standard input): for more files than a command line holds.
        #[arg(long, value_name = "LIST")]
        files_from: Option<PathBuf>,
    },
    /// Evaluate a model on a dataset: greedy (or --beam) decoding, mean CTC loss, WER / CER / UER.
    ///
    /// The dataset layout is detected from the path: a fairseq manifest (NAME.tsv with
    /// NAME.ltr/.wrd/.phn beside it), a LibriSpeech-style folder (*.trans.txt + FLAC; Libri-light
    /// subsets with --subset), a CommonVoice language folder (clips/ + <split>.tsv) or NeMo JSON
    /// lines (.jsonl). Transcripts are normalised to the model's vocabulary.
    Eval {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        dataset: DataArgs,
        #[command(flatten)]
        device: DeviceArgs,
        /// Most seconds of audio in one forward pass (bounds memory; longer utterances are cut,
        /// see --chunk-seconds, and counted as "windowed" in the report).
        #[arg(long, default_value_t = 120.0)]
        batch_seconds: f64,
        #[command(flatten)]
        chunks: ChunkArgs,
        /// Print one JSON object on stdout instead of the table.
        #[arg(long)]
        json: bool,
        /// Also write each utterance's reference, hypothesis, CTC loss and error counts to this
        /// file, one JSON object per line in dataset order (for error analysis).
        #[arg(long, value_name = "FILE.jsonl")]
        predictions: Option<PathBuf>,
        /// Decode with a CTC prefix beam search keeping this many prefixes (no language model)
        /// instead of greedy decoding: it scores each labelling by all of its alignments, not
        /// one path. Costs about frames x beam x vocabulary steps per utterance.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=4096))]
        beam: Option<u32>,
    },
    /// Place a dataset's transcripts in time by CTC forced alignment: for each utterance, the
    /// most probable path of the model that spells its transcript exactly, and the run of frames
    /// it spends on each token.
    ///
    /// Prints one JSON object per utterance in the shape of `engine infer --timestamps`:
    /// {"audio", "text", "score", "chunks": [{"text", "timestamp": [start, end]}]}, times in
    /// seconds; "score" is the path's mean log-probability per frame (near 0 where the model
    /// agrees with the transcript; low values flag wrong or mismatched transcripts). An
    /// utterance whose transcript needs more frames than its audio gives is skipped, with a
    /// line on stderr.
    Align {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        dataset: DataArgs,
        /// Time words or every token.
        #[arg(long, value_enum, default_value = "word")]
        level: Timestamps,
        #[command(flatten)]
        device: DeviceArgs,
        /// Most seconds of audio in one forward pass (bounds memory; longer files are cut, see
        /// --chunk-seconds).
        #[arg(long, default_value_t = 120.0)]
        batch_seconds: f64,
        #[command(flatten)]
        chunks: ChunkArgs,
    },
    /// Learn S3-Router masks: per-matrix top-k of learned scores over the frozen model's weights
    /// (straight-through), plus a CTC head and the time-mask embedding, by CTC on a dataset.
    ///
    /// Writes into --out: scores.safetensors, masks.safetensors (packed bits, format
    /// s3router-masks-v1), head.safetensors, vocab.json, train_config.json, train_log.jsonl
    /// (loss, lr and validation lines), checkpoint.safetensors (every --save-every updates; continue
    /// a killed run with --resume), and best/ (the mask set with the best validation --best-metric).
    /// `engine infer|eval --masks OUT` (or OUT/best) runs the masked model.
    ///
    /// With neither --model nor --train, runs the demo: the small English-trained backbone in
    /// weights/s3r-demo-en adapted to Spanish phonemes (weights/demo-corpus/es), head only and
    /// with S3-Router masks at 10% sparsity, into runs/demo (or --out); prints both phoneme error
    /// rates and where the masks went. Recipe flags given replace the demo's own settings
    /// (e.g. --steps 50 for a shorter run; the head-only run keeps sparsity 0).
    #[command(args_override_self = true)]
    Train {
        #[command(flatten)]
        recipe: Box<Recipe>,
        #[command(flatten)]
        file: RecipeFile,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Weight finetuning, the baseline S3-Router is compared with: every weight, bias and norm of
    /// the transformer encoder and the feature projection trains, with the CTC head and the
    /// time-mask embedding; the convolutional feature encoder stays frozen. Same data, schedule,
    /// SpecAugment, dropout, logging and checkpoints as `engine train` (its mask options do not
    /// apply).
    ///
    /// Writes into --out a Hugging Face CTC folder of the model's family (Wav2Vec2ForCTC,
    /// HubertForCTC, Data2VecAudioForCTC, ...: config.json, model.safetensors, vocab.json,
    /// preprocessor_config.json) that transformers and `engine infer|eval --model` load, plus
    /// train_config.json, train_log.jsonl, checkpoint.safetensors and best/ (the model folder
    /// with the best validation --best-metric).
    #[command(args_override_self = true)]
    Finetune {
        #[command(flatten)]
        recipe: Box<Recipe>,
        #[command(flatten)]
        file: RecipeFile,
        /// Train only the head for this many updates first (fairseq's freeze_finetune_updates;
        /// its wav2vec2-base 1h/10h recipes use 10000 of 13000/20000).
        #[arg(long, default_value_t = 0)]
        freeze_updates: usize,
        /// Train the convolutional feature encoder too (fairseq's feature_grad_mult 1; its
        /// finetuning recipes keep it frozen). Slower: its output is then recomputed every step.
        #[arg(long)]
        train_feature_encoder: bool,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Prune with S3-Router-P, OMP or PARP, the comparison of the paper's pruning experiments.
    ///
    /// s3router-p: --model is a finetuned model (`engine finetune`); masks over all six linears of
    /// every layer are learned with scores initialised to the weights, the head retrained from
    /// the model's. omp: --model is the finetuned model whose global magnitude mask is taken,
    /// --pretrained the model it came from, whose weights are masked and finetuned (a new head).
    /// parp: --model is the pretrained model, globally magnitude-pruned and finetuned with the
    /// zeros trainable, re-pruned every --reprune-every updates and after the last.
    ///
    /// --out ends holding masks.safetensors (s3router-masks-v1), head.safetensors and vocab.json
    /// beside the model folder the masks apply to (config.json, model.safetensors, ...): `engine
    /// infer --model OUT --masks OUT`. Training options as for `engine train` / `engine finetune`
    /// (the method sets --mask, --init and --keep-head itself).
    Prune {
        #[command(flatten)]
        recipe: Box<Recipe>,
        #[arg(long, value_enum)]
        method: PruneMethod,
        /// OMP: the pretrained model the finetuned --model came from.
        #[arg(long)]
        pretrained: Option<PathBuf>,
        /// PARP: re-prune every this many updates (0: only after the last). The PARP scripts
        /// re-prune every few epochs; 100 updates is about 5 epochs of the 10 h set.
        #[arg(long, default_value_t = 100)]
        reprune_every: usize,
        /// OMP / PARP: train only the head for this many updates first.
        #[arg(long, default_value_t = 0)]
        freeze_updates: usize,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Build a CTC vocabulary (vocab.json) from a dataset's transcripts.
    ///
    /// Tokens: `<pad>` (the blank, id 0), `<s>`, `</s>`, `<unk>`, `|`, then every symbol by
    /// falling frequency. Letters for word transcripts, whitespace-separated units for .ltr/.phn
    /// labels. Or convert a fairseq dict.*.txt with --dict.
    Vocab {
        /// Dataset whose transcripts define the symbols.
        #[arg(long, required_unless_present = "dict")]
        data: Option<PathBuf>,
        /// A fairseq dictionary to convert instead.
        #[arg(long, conflicts_with = "data")]
        dict: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "ltr")]
        labels: LabelKind,
        #[arg(long, value_enum)]
        format: Option<Format>,
        #[arg(long, default_value = "train")]
        split: String,
        /// Characters removed from transcripts first.
        #[arg(long, default_value = "")]
        chars_to_ignore: String,
        /// Lower-case (or, with --uppercase, upper-case) transcripts first.
        #[arg(long, conflicts_with = "uppercase")]
        lowercase: bool,
        #[arg(long)]
        uppercase: bool,
        /// Where to write vocab.json.
        #[arg(long)]
        out: PathBuf,
    },
    /// Inspect mask sets.
    #[command(subcommand)]
    Masks(MasksCommand),
    /// Convert a fairseq wav2vec 2.0, HuBERT or data2vec-audio checkpoint (.pt) into a Hugging
    /// Face folder the engine and transformers load: what S3-Router's own code starts from and
    /// writes.
    ///
    /// - pretrained (wav2vec_small.pt, xlsr2_300m.pt, hubert_base_ls960.pt, data2vec's
    ///   audio_base_ls.pt): the encoder (quantizer, target projections, label embeddings and EMA
    ///   teacher dropped), ready for `engine train --model OUT`;
    /// - finetuned (wav2vec_ctc): encoder, CTC head and vocab.json from --dict;
    /// - S3-Router (wav2vec_ctc_st, with scores): the frozen encoder in OUT, and in OUT/masks the
    ///   mask set its scores make at the run's prune_rate (fix_attn respected), with head and
    ///   vocabulary: `engine infer --model OUT --masks OUT/masks`.
    ///
    /// Both PyTorch formats are read, and no code in the file is run. The folder is written
    /// beside OUT and moved into place only once it loads.
    Convert {
        /// The fairseq checkpoint.
        checkpoint: PathBuf,
        /// The fairseq dictionary (dict.ltr.txt, dict.phn.txt) a finetuned or S3-Router model's
        /// labels come from: <pad> (blank), <s>, </s>, <unk>, then its symbols. Default:
        /// dict.<labels>.txt in the data folder the run trained on (its cfg.task.data, relative
        /// paths from here), if it is there.
        #[arg(long)]
        dict: Option<PathBuf>,
        /// The new folder.
        #[arg(long)]
        out: PathBuf,
    },
    /// Score hypotheses against references: WER and CER, sclite style.
    ///
    /// Substitution / deletion / insertion counts per rate. Each file holds one transcript per
    /// line, in the same order.
    Score {
        /// Reference transcripts.
        #[arg(long = "ref")]
        reference: PathBuf,
        /// Hypothesis transcripts.
        #[arg(long)]
        hyp: PathBuf,
        /// Lower-case both sides first.
        #[arg(long)]
        lowercase: bool,
        /// Characters to ignore (e.g. punctuation: ",.?!;:").
        #[arg(long, default_value = "")]
        ignore: String,
        /// Also print each utterance's word alignment.
        #[arg(long)]
        alignments: bool,
    },
    /// Time the forward pass at full model size with generated weights (no checkpoint needed).
    Bench {
        /// Architecture: base (wav2vec2-base) or large (large-lv60 / XLS-R 300M).
        #[arg(long, default_value = "base")]
        preset: String,
        /// Utterances per forward pass.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Seconds of audio per utterance.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Timed repetitions (after one warm-up); the median is reported.
        #[arg(long, default_value_t = 5)]
        reps: usize,
        /// Also time each stage of one extra pass (each stage waits for the device).
        #[arg(long)]
        profile: bool,
        #[command(flatten)]
        device: DeviceArgs,
    },
}

/// The device `--device` and `--precision` name together.
fn compute_device(device: Device, precision: Precision) -> Result<TrainDevice> {
    Ok(match (device, precision) {
        (Device::Cpu, Precision::F32) => TrainDevice::Cpu,
        (Device::Cpu, Precision::Bf16) => bail!("training at --precision bf16 needs --device cuda (the CPU trains in f32)"),
        (Device::Cuda, Precision::F32) => TrainDevice::Cuda(CudaPrecision::F32),
        (Device::Cuda, Precision::Bf16) => TrainDevice::Cuda(CudaPrecision::Bf16),
    })
}

/// The backend inference runs on: the training device, or the CPU's bf16 linears.
fn backend(d: DeviceArgs) -> Result<Box<dyn Backend>> {
    match (d.device, d.precision) {
        (Device::Cpu, Precision::Bf16) => Ok(Box::new(CpuBf16Backend::new()?)),
        _ => Ok(compute_device(d.device, d.precision)?.backend()?),
    }
}

/// What `engine infer` prints and keeps: each transcript as it comes, and with `--out` the
/// logits, written at the end atomically so an interrupted run never leaves a half-written file.
struct InferOutput<'a> {
    out: Option<&'a Path>,
    logits: HashMap<String, (Vec<f32>, Vec<usize>)>,
    /// The window length in seconds, to say so the first time a file is cut into windows
    /// nobody asked for.
    note_cuts: Option<f64>,
    timestamps: Option<Timestamps>,
}

impl<'a> InferOutput<'a> {
    fn new(run: &InferRun<'a>, chunking: Option<Chunking>) -> InferOutput<'a> {
        let note_cuts = chunking.filter(|_| run.chunks.automatic()).map(|c| c.window as f64 / SAMPLE_RATE as f64);
        InferOutput { out: run.out, logits: HashMap::new(), note_cuts, timestamps: run.timestamps }
    }

    fn take(&mut self, u: Utterance) -> Result<()> {
        if u.windows > 1 && window_progress().is_some() {
            clear_progress_line();
        }
        if let Some(window) = self.note_cuts.filter(|_| u.windows > 1) {
            eprintln!(
                "note: {} is longer than --batch-seconds: recognised in {} windows of {window} s, stitched \
                 (--chunk-seconds chooses the windows; --chunk-seconds 0 runs files whole)",
                u.path.display(),
                u.windows
            );
            self.note_cuts = None;
        }
        match (self.timestamps, &u.tokens) {
            (Some(level), Some(tokens)) => {
                println!(
                    "{}",
                    serde_json::json!({"audio": u.path.display().to_string(), "text": u.transcript, "chunks": level.chunks(tokens)})
                );
            }
            _ => println!("{}\t{}", u.path.display(), u.transcript),
        }
        if self.out.is_some() {
            let vocab = u.logits.len() / u.frames.max(1);
            self.logits.insert(format!("logits.{}", u.index), (u.logits, vec![u.frames, vocab]));
        }
        Ok(())
    }

    fn finish(self) -> Result<()> {
        let Some(path) = self.out else { return Ok(()) };
        let views = self.logits.iter().map(|(name, (data, shape))| (name.as_str(), shape.as_slice(), data.as_slice()));
        s3router::fsio::write_f32_safetensors(path, views, &Default::default())
    }
}

/// On a terminal, a line on stderr saying how far a file cut into windows has got (rewritten in
/// place, cleared when the file is done).
fn window_progress() -> Option<&'static WindowProgress<'static>> {
    std::io::stderr()
        .is_terminal()
        .then_some(&|path: &Path, done: usize, total: usize| eprint!("\r{}: {done} of {total} windows", path.display()))
}

/// Clears the line [`window_progress`] writes, before a result goes out.
fn clear_progress_line() {
    eprint!("\r\x1b[2K");
}

/// The paths listed in `list`, one per line (`-`: standard input).
fn read_file_list(list: &Path) -> Result<Vec<PathBuf>> {
    let text = if list == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).context("cannot read the file list from standard input")?
    } else {
        std::fs::read_to_string(list).with_context(|| format!("--files-from {}: cannot read the list", list.display()))?
    };
    let files: Vec<PathBuf> = text.lines().map(str::trim).filter(|l| !l.is_empty()).map(PathBuf::from).collect();
    ensure!(!files.is_empty(), "--files-from {}: the list names no files", list.display());
    Ok(files)
}

/// How `engine infer` runs, whatever the model and masks.
struct InferRun<'a> {
    device: DeviceArgs,
    out: Option<&'a Path>,
    limits: BatchLimits,
    chunks: &'a ChunkArgs,
    decoder: Decoder,
    timestamps: Option<Timestamps>,
}

impl InferRun<'_> {
    /// The decoder, windows and times asked for, for a model of `config`.
    fn decoding(&self, config: &Config) -> Result<Decoding> {
        Ok(Decoding { decoder: self.decoder, chunking: self.chunks.chunking(config, self.limits)?, timestamps: self.timestamps.is_some() })
    }
}

/// `--beam N`: prefix beam search of width N; none: greedy.
fn decoder(beam: Option<u32>) -> Decoder {
    beam.map_or(Decoder::Greedy, |n| Decoder::Beam(n as usize))
}

fn infer(model: &Path, lang: Option<&str>, masks: Option<&Path>, run: InferRun, audio: &[PathBuf]) -> Result<()> {
    let be = backend(run.device)?;
    let mut rec = Recognizer::load(model, lang, masks, be.as_ref(), !run.device.dense)?;
    rec.decoding = run.decoding(&rec.model.config)?;
    rec.progress = window_progress();
    let mut output = InferOutput::new(&run, rec.decoding.chunking);
    rec.run(audio, run.limits, |u| output.take(u))?;
    output.finish()
}

fn masks_stats(model: &Path, dir: &Path, json: bool) -> Result<()> {
    let set = MaskSet::load(dir)?;
    let initial_path = [dir.join(INITIAL_MASKS), dir.join("..").join(INITIAL_MASKS)].into_iter().find(|p| p.is_file());
    let initial = initial_path.as_deref().map(MaskSet::read_bits).transpose()?.map(|(m, _, _)| m);
    let rows = StatsSummary::rows(&mask_stats(model, &set, initial.as_ref())?);
    if json {
        let v: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                serde_json::json!({"name": r.name, "weights": r.numel, "sparsity": r.sparsity,
                    "flipped_from_magnitude": r.from_magnitude, "flipped_from_initial": r.from_initial})
            })
            .collect();
        println!("{}", serde_json::Value::Array(v));
        return Ok(());
    }
    println!("{:<64} {:>10} {:>9} {:>15} {:>13}", "matrix", "weights", "sparsity", "from magnitude", "from initial");
    for r in rows {
        let initial = r.from_initial.map_or("-".to_string(), |f| format!("{:.3}%", 100.0 * f));
        println!("{:<64} {:>10} {:>8.2}% {:>14.3}% {initial:>13}", r.name, r.numel, 100.0 * r.sparsity, 100.0 * r.from_magnitude);
    }
    Ok(())
}

/// A mask set's phoneme inventory: the content tokens of its vocabulary (no specials, no `|`).
fn inventory(set: &MaskSet) -> Result<Option<BTreeSet<String>>> {
    let Some(path) = set.vocab_path() else { return Ok(None) };
    let vocab = Vocab::load_task(&path, 0)?;
    let content = (0..vocab.len() as u32).filter(|&id| vocab.is_content(id)).map(|id| vocab.token(id as usize));
    Ok(Some(content.filter(|t| *t != labels::DELIMITER).map(str::to_string).collect()))
}

fn masks_compare(
    specs: &[String],
    inventory_files: &[String],
    json: bool,
    csv: Option<&Path>,
    plots: Option<&Path>,
    permutations: usize,
) -> Result<()> {
    let sets: Vec<(String, MaskSet)> = specs
        .iter()
        .map(|spec| {
            let (name, dir) = match spec.split_once('=') {
                Some((n, d)) => (n.to_string(), PathBuf::from(d)),
                None => {
                    // Named by its folder; a run's `best/` by the run's folder.
                    let d = PathBuf::from(spec);
                    let named = if d.ends_with("best") { d.parent().unwrap_or(&d) } else { &d };
                    (named.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_else(|| spec.clone()), d)
                }
            };
            Ok((name, MaskSet::load(&dir)?))
        })
        .collect::<Result<_>>()?;
    let pairs = analysis::compare(&sets)?;
    let mut given: HashMap<String, BTreeSet<String>> = HashMap::new();
    for spec in inventory_files {
        let (name, file) = spec.split_once('=').with_context(|| format!("--inventory {spec:?}: expected NAME=FILE"))?;
        if !sets.iter().any(|(n, _)| n == name) {
            bail!("--inventory {name}: no mask set is named {name:?}");
        }
        let text = std::fs::read_to_string(file).with_context(|| format!("cannot read inventory {file}"))?;
        given.insert(name.to_string(), text.split_whitespace().filter(|t| *t != "|").map(str::to_string).collect());
    }
    let inventories: Option<Vec<BTreeSet<String>>> = sets
        .iter()
        .map(|(n, s)| match given.remove(n) {
            Some(inv) => Ok(Some(inv)),
            None => inventory(s),
        })
        .collect::<Result<Option<Vec<_>>>>()?;
    let names: Vec<&str> = sets.iter().map(|(n, _)| n.as_str()).collect();
    let index = |n: &str| names.iter().position(|x| *x == n).expect("a compared set");
    let phonetic =
        |p: &analysis::PairSimilarity| inventories.as_ref().map(|inv| analysis::inventory_cosine(&inv[index(&p.a)], &inv[index(&p.b)]));
    let layers: Vec<usize> = pairs[0].layers.iter().map(|l| l.0).collect();
    // Correlation of mask and phonetic similarity over the pairs, overall and per layer.
    let correlations: Vec<(String, f64, f64, f64)> = match (&inventories, sets.len() >= 3) {
        (Some(_), true) => {
            let ph: Vec<f64> = pairs.iter().map(|p| phonetic(p).expect("inventories")).collect();
            let n = sets.len();
            let square = |v: &[f64]| {
                let mut m = vec![vec![0.0; n]; n];
                for (p, &x) in pairs.iter().zip(v) {
                    let (i, j) = (index(&p.a), index(&p.b));
                    m[i][j] = x;
                    m[j][i] = x;
                }
                m
            };
            let mut scopes: Vec<(String, Vec<f64>)> = vec![("overall".into(), pairs.iter().map(|p| p.overall.0).collect())];
            for (k, l) in layers.iter().enumerate() {
                scopes.push((format!("layer {l}"), pairs.iter().map(|p| p.layers[k].1).collect()));
            }
            scopes
                .into_iter()
                .map(|(scope, m)| {
                    let p = analysis::mantel_p(&square(&m), &square(&ph), permutations, 0x5eed);
                    (scope, analysis::pearson(&m, &ph), analysis::spearman(&m, &ph), p)
                })
                .collect()
        }
        _ => Vec::new(),
    };
    if let Some(dir) = plots {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let write = |name: &str, svg: String| plot::write_figure(&svg, &dir.join(name));
        let pair_names: Vec<String> = pairs.iter().map(|p| format!("{}-{}", p.a, p.b)).collect();
        let layer_names: Vec<String> = layers.iter().map(usize::to_string).collect();
        let per_layer: Vec<Vec<f64>> = pairs.iter().map(|p| p.layers.iter().map(|l| l.1).collect()).collect();
        write("layers", plot::heatmap("mask cosine similarity per layer", &pair_names, &layer_names, &per_layer))?;
        // The diagonal (1 by definition) is left blank so the colours span the pairs.
        let mut square = vec![vec![f64::NAN; names.len()]; names.len()];
        for p in &pairs {
            let (i, j) = (index(&p.a), index(&p.b));
            (square[i][j], square[j][i]) = (p.overall.0, p.overall.0);
        }
        let labels: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        write("matrix", plot::heatmap("mask cosine similarity, all masked weights", &labels, &labels, &square))?;
        if inventories.is_some() {
            let points: Vec<(f64, f64, String)> =
                pairs.iter().zip(&pair_names).map(|(p, n)| (phonetic(p).unwrap_or(0.0), p.overall.0, n.clone())).collect();
            write("scatter", plot::scatter("mask vs phoneme-inventory similarity", "phoneme inventory cosine", "mask cosine", &points))?;
        }
    }
    if let Some(path) = csv {
        let mut text = String::from("a,b,scope,cosine,chance,phonetic\n");
        for p in &pairs {
            let ph = phonetic(p).map_or(String::new(), |x| x.to_string());
            let mut rows = vec![("overall".to_string(), p.overall.0, p.overall.1)];
            rows.extend(p.layers.iter().map(|(l, c, ch)| (format!("layer {l}"), *c, *ch)));
            rows.extend(p.matrices.iter().map(|(n, c, ch)| (n.clone(), *c, *ch)));
            for (scope, c, ch) in rows {
                text += &format!("{},{},{scope},{c},{ch},{ph}\n", p.a, p.b);
            }
        }
        s3router::fsio::atomic_write(path, |f| std::io::Write::write_all(f, text.as_bytes()))?;
    }
    if json {
        let v = serde_json::json!({
            "pairs": pairs.iter().map(|p| serde_json::json!({
                "a": p.a, "b": p.b, "cosine": p.overall.0, "chance": p.overall.1, "phonetic": phonetic(p),
                "layers": p.layers.iter().map(|(l, c, ch)| serde_json::json!({"layer": l, "cosine": c, "chance": ch})).collect::<Vec<_>>(),
                "matrices": p.matrices.iter().map(|(n, c, ch)| serde_json::json!({"name": n, "cosine": c, "chance": ch})).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "correlation": correlations.iter().map(|(s, r, rho, p)| serde_json::json!({"scope": s, "pearson": r, "spearman": rho, "p": p})).collect::<Vec<_>>(),
        });
        println!("{v}");
        return Ok(());
    }
    println!("mask cosine similarity (chance level of independent masks in brackets)");
    for p in &pairs {
        let ph = phonetic(p).map_or(String::new(), |x| format!("   phonetic {x:.3}"));
        println!("{:>10} {:<10} {:.4} [{:.4}]{ph}", p.a, p.b, p.overall.0, p.overall.1);
    }
    print!("\nper layer  ");
    layers.iter().for_each(|l| print!("{l:>8}"));
    println!();
    for p in &pairs {
        print!("{:<10} ", format!("{}-{}", p.a, p.b));
        p.layers.iter().for_each(|(_, c, _)| print!("{c:>8.4}"));
        println!();
    }
    if !correlations.is_empty() {
        println!("\nmask vs phonetic similarity over {} pairs ({permutations} permutations)", pairs.len());
        println!("{:<10} {:>8} {:>9} {:>8}", "scope", "pearson", "spearman", "p");
        for (scope, r, rho, p) in &correlations {
            println!("{scope:<10} {r:>8.3} {rho:>9.3} {p:>8.4}");
        }
    }
    Ok(())
}

fn score(reference: &Path, hyp: &Path, norm: &TextNorm, alignments: bool) -> Result<()> {
    let read = |p: &Path| std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()));
    let (refs, hyps) = (read(reference)?, read(hyp)?);
    let (refs, hyps): (Vec<&str>, Vec<&str>) = (refs.lines().collect(), hyps.lines().collect());
    if refs.len() != hyps.len() {
        bail!("{} has {} lines but {} has {}", reference.display(), refs.len(), hyp.display(), hyps.len());
    }
    let (mut words, mut chars) = (Counts::default(), Counts::default());
    for (i, (r, h)) in refs.iter().zip(&hyps).enumerate() {
        let (w, c) = word_and_char_counts(r, h, norm);
        words.add(&w);
        chars.add(&c);
        if alignments {
            let (r, h) = (norm.apply(r), norm.apply(h));
            let (r, h): (Vec<&str>, Vec<&str>) = (r.split_whitespace().collect(), h.split_whitespace().collect());
            let (_, edits) = metrics::align(&r, &h);
            let (top, bottom) = metrics::render_alignment(&r, &h, &edits);
            println!("utterance {}\n{top}\n{bottom}\n", i + 1);
        }
    }
    println!("{}", Counts::sclite_header());
    println!("{}", words.sclite_row("words"));
    println!("{}", chars.sclite_row("characters"));
    println!("WER {:.2}%  CER {:.2}%", 100.0 * words.rate(), 100.0 * chars.rate());
    Ok(())
}

struct EvalArgs {
    decoder: Decoder,
    model: ModelArgs,
    dataset: DataArgs,
    device: DeviceArgs,
    batch_seconds: f64,
    chunks: ChunkArgs,
    json: bool,
    predictions: Option<PathBuf>,
}

fn eval(a: EvalArgs) -> Result<()> {
    if let Some(p) = &a.predictions {
        let dir = p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        ensure!(dir.is_dir(), "--predictions {}: folder {} does not exist", p.display(), dir.display());
    }
    let data = a.dataset.open()?;
    let be = backend(a.device)?;
    let mut rec = a.model.load(be.as_ref(), a.device)?;
    rec.decoding.decoder = a.decoder;
    let labels = a.dataset.labels(&data, &rec.vocab)?;
    let limits = BatchLimits::from_seconds(a.batch_seconds);
    rec.decoding.chunking = a.chunks.chunking(&rec.model.config, limits)?;
    let report = evaluate(&rec, &data, &labels, limits, |done, total| eprint!("\revaluated {done}/{total} utterances"))?;
    eprintln!();
    if let Some(c) = rec.decoding.chunking.filter(|_| report.windowed > 0) {
        let how = if a.chunks.automatic() { "longer than --batch-seconds" } else { "longer than --chunk-seconds" };
        eprintln!(
            "note: {} utterances {how} were recognised in windows of {} s, their logits stitched \
             (--chunk-seconds 0 runs every utterance whole)",
            report.windowed,
            c.window as f64 / SAMPLE_RATE as f64
        );
    }
    if let Some(p) = &a.predictions {
        let lines = report.predictions(&data, &labels, &rec.vocab);
        s3router::fsio::atomic_write(p, |f| std::io::Write::write_all(f, lines.as_bytes()))?;
    }
    if a.json {
        println!("{}", report.json());
    } else {
        println!("{}", Counts::sclite_header());
        println!("{}", report.wer.sclite_row("words"));
        println!("{}", report.cer.sclite_row("tokens (CER)"));
        println!("{}", report.uer.sclite_row("units (UER)"));
        println!(
            "utterances {}  decoding {}  mean CTC loss {:.4}  WER {:.2}%  CER {:.2}%  UER {:.2}%",
            report.utterances,
            report.decoder.name(),
            report.loss,
            100.0 * report.wer.rate(),
            100.0 * report.cer.rate(),
            100.0 * report.uer.rate()
        );
    }
    Ok(())
}

/// `engine align`: JSON lines on stdout, skipped utterances and a count on stderr.
fn align(
    model: &ModelArgs,
    dataset: &DataArgs,
    level: Timestamps,
    device: DeviceArgs,
    limits: BatchLimits,
    chunks: &ChunkArgs,
) -> Result<()> {
    let data = dataset.open()?;
    let be = backend(device)?;
    let mut rec = model.load(be.as_ref(), device)?;
    rec.decoding.chunking = chunks.chunking(&rec.model.config, limits)?;
    rec.progress = window_progress();
    let labels = dataset.labels(&data, &rec.vocab)?;
    let (mut aligned, total) = (0, data.utterances.len());
    align_dataset(&rec, &data, &labels, limits, |result| {
        match result {
            Ok(a) => {
                let audio = data.utterances[a.index].audio.display().to_string();
                let text = rec.vocab.text(&labels.tokens[a.index]);
                if rec.progress.is_some() {
                    clear_progress_line();
                }
                println!("{}", serde_json::json!({"audio": audio, "text": text, "score": a.score, "chunks": level.chunks(&a.tokens)}));
                aligned += 1;
            }
            Err(TooShort { index, needed, frames }) => eprintln!(
                "{}: skipped: its transcript needs at least {needed} frames, the audio gives {frames}",
                data.utterances[index].audio.display()
            ),
        }
        Ok(())
    })?;
    eprintln!("aligned {aligned} of {total} utterances");
    Ok(())
}

fn run(cli: Cli, demo_flags: &[demo::Word]) -> Result<()> {
    if let Some(n) = cli.threads {
        rayon::ThreadPoolBuilder::new().num_threads(n).build_global().context("cannot start the thread pool")?;
    }
    match cli.command {
        Command::Infer { model, masks, target_lang, device, out, beam, timestamps, batch_seconds, chunks, mut audio, files_from } => {
            if let Some(list) = files_from {
                audio.extend(read_file_list(&list)?);
            }
            let limits = BatchLimits::from_seconds(batch_seconds);
            let run = InferRun { device, out: out.as_deref(), limits, chunks: &chunks, decoder: decoder(beam), timestamps };
            let lang = target_lang.as_deref();
            match masks.as_slice() {
                [] => infer(&model, lang, None, run, &audio),
                // A folder whose name holds '=' is still one mask set.
                [one] if !one.contains('=') || Path::new(one).is_dir() => infer(&model, lang, Some(Path::new(one)), run, &audio),
                _ if lang.is_some() => bail!("--target-lang picks one language: not with several --masks tasks"),
                many => infer_tasks(&model, many, run, &audio),
            }
        }
        Command::Align { model, dataset, level, device, batch_seconds, chunks } => {
            align(&model, &dataset, level, device, BatchLimits::from_seconds(batch_seconds), &chunks)
        }
        Command::Eval { model, dataset, device, batch_seconds, chunks, json, predictions, beam } => {
            eval(EvalArgs { model, dataset, device, batch_seconds, chunks, json, predictions, decoder: decoder(beam) })
        }
        Command::Vocab { data, dict, labels, format, split, chars_to_ignore, lowercase, uppercase, out } => {
            let vocab = match (data, dict) {
                (_, Some(dict)) => Vocab::from_fairseq_dict(&dict)?,
                (Some(data), None) => {
                    let ds = dataset::open(&data, &DatasetOptions { format, labels, split, ..DatasetOptions::default() })?;
                    let case = if lowercase {
                        Case::Lower
                    } else if uppercase {
                        Case::Upper
                    } else {
                        Case::Mixed
                    };
                    let symbols: Vec<String> =
                        ds.utterances.iter().flat_map(|u| labels::symbols(&u.text, ds.labels, &chars_to_ignore, case)).collect();
                    Vocab::build(symbols.iter().map(String::as_str))
                }
                (None, None) => bail!("give --data or --dict"),
            };
            vocab.save(&out)?;
            println!("{}: {} tokens, blank <pad> = 0", out.display(), vocab.len());
            Ok(())
        }
        Command::Convert { checkpoint, dict, out } => {
            let c = fairseq::convert(&checkpoint, dict.as_deref(), &out)?;
            let what = match &c.kind {
                fairseq::Kind::Pretrained => "pretrained encoder".to_string(),
                fairseq::Kind::Finetuned { classes } => format!("CTC model with {classes} labels"),
                fairseq::Kind::S3Router { sparsity, masked, .. } => {
                    format!("S3-Router encoder; {masked} matrices masked at sparsity {sparsity:.4}")
                }
            };
            println!("{}: {what}, {} tensors", out.display(), c.tensors);
            if let Some(d) = &c.dict {
                println!("labels from {}", d.display());
            }
            if !c.dropped.is_empty() {
                println!("left out {} pretraining-only tensors ({}, ...)", c.dropped.len(), c.dropped[0]);
            }
            if let fairseq::Kind::S3Router { masks, .. } = &c.kind {
                println!("masks: {}  (engine infer --model {} --masks {} AUDIO)", masks.display(), out.display(), masks.display());
            }
            Ok(())
        }
        Command::Train { recipe, file, run } => {
            file.note();
            let demo = recipe.model.is_none() && recipe.train.is_none();
            let opts = run.options(demo.then_some("runs/demo"))?;
            let out = opts.out.clone();
            if demo {
                let started = std::time::Instant::now();
                let report = demo::run(&out, &opts, demo_flags)?;
                print!("{}", report.text());
                println!(
                    "done in {:.0} s; mask sets in {1}/head-only/best and {1}/s3router/best",
                    started.elapsed().as_secs_f64(),
                    out.display()
                );
                return Ok(());
            }
            run_training(&recipe, &opts, "masks")
        }
        Command::Prune { mut recipe, method, pretrained, reprune_every, freeze_updates, run } => {
            let sparsity = recipe.sparsity.take().context("--sparsity is required: the fraction of the pruned weights to drop")?;
            let opts = run.options(None)?;
            let args = PruneArgs { method, sparsity, pretrained, reprune_every, freeze_updates };
            let s = prune(*recipe.clone(), &args, &opts)?;
            print_summary(&recipe, &opts, &s, "masks and the model they apply to");
            Ok(())
        }
        Command::Finetune { mut recipe, file, freeze_updates, train_feature_encoder, run } => {
            file.note();
            recipe.learn = Learn::Weights { freeze_updates, train_feature_encoder, prune: None };
            run_training(&recipe, &run.options(None)?, "model")
        }
        Command::Masks(MasksCommand::Stats { model, json, dir }) => masks_stats(&model, &dir, json),
        Command::Masks(MasksCommand::Apply { model, masks, out }) => {
            let set = MaskSet::load(&masks)?;
            let dropped = write_masked_folder(&out, &model, &set)?;
            eprintln!("wrote {} with {dropped} weights of {} masked matrices dropped", out.display(), set.masks.len());
            Ok(())
        }
        Command::Masks(MasksCommand::Compare { json, csv, permutations, plots, inventory, sets }) => {
            masks_compare(&sets, &inventory, json, csv.as_deref(), plots.as_deref(), permutations)
        }
        Command::Score { reference, hyp, lowercase, ignore, alignments } => {
            score(&reference, &hyp, &TextNorm { lowercase, ignore }, alignments)
        }
        Command::Bench { preset, batch, seconds, reps, profile, device } => {
            let be = backend(device)?;
            let r = bench::forward(be.as_ref(), &preset, batch, seconds, reps, profile)?;
            let peak = be.take_peak_memory()?;
            println!(
                "forward {} on {}: batch {} x {:.1} s, median {:.3} s over {} runs ({:.1}x real time, {} threads)",
                r.preset,
                be.name(),
                r.batch,
                r.seconds,
                r.median(),
                r.times.len(),
                r.realtime_factor(),
                rayon::current_num_threads()
            );
            if let Some(bytes) = peak {
                println!("  peak memory {:.2} GB (on a GPU its memory; on the CPU the whole process's resident set)", bytes as f64 / 1e9);
            }
            for (stage, secs) in &r.stages {
                println!("  {stage:<30} {:9.3} ms", secs * 1e3);
            }
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    s3router::keep_freed_memory();
    let args = match with_recipe_file(std::env::args_os().collect()) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let matches = Cli::command().get_matches_from(args);
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // The demo takes the recipe flags typed after `engine train` in place of its own.
    let demo_flags = matches.subcommand_matches("train").map(demo::explicit_recipe_words).unwrap_or_default();
    match run(cli, &demo_flags) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `recipe` and prints its summary (`what` the output folder holds).
fn run_training(recipe: &Recipe, opts: &RunOptions, what: &str) -> Result<()> {
    let s = train(recipe, opts)?;
    print_summary(recipe, opts, &s, what);
    Ok(())
}

fn print_summary(recipe: &Recipe, opts: &RunOptions, s: &Summary, what: &str) {
    let out = &opts.out;
    let best = s.best.map(|(step, v)| {
        format!(
            ", best validation {} {v:.4} at update {step} (in {}/best)",
            recipe.best_metric.to_possible_value().map(|p| p.get_name().to_string()).unwrap_or_default(),
            out.display()
        )
    });
    println!(
        "trained {} updates in {:.1} s ({:.1} s of audio per second), last loss {:.4}, {} skipped as non-finite{}; {what} in {}",
        s.steps,
        s.wall_seconds,
        s.audio_seconds / s.wall_seconds.max(1e-9),
        s.last_loss,
        s.nonfinite,
        best.unwrap_or_default(),
        out.display()
    );
}

/// `engine infer --masks NAME=DIR ... FILE@NAME ...`: several tasks over one loaded model.
fn infer_tasks(model: &Path, masks: &[String], run: InferRun, audio: &[PathBuf]) -> Result<()> {
    let tasks: Vec<(String, PathBuf)> = masks.iter().map(|m| parse_task(m)).collect::<Result<_>>()?;
    let names: Vec<String> = tasks.iter().map(|t| t.0.clone()).collect();
    let (paths, task_of): (Vec<PathBuf>, Vec<usize>) =
        audio.iter().map(|a| parse_routed(a, &names)).collect::<Result<Vec<_>>>()?.into_iter().unzip();
    let be = backend(run.device)?;
    let mut rec = MultiRecognizer::load(model, &tasks, be.as_ref())?;
    rec.decoding = run.decoding(&rec.model.config)?;
    let mut output = InferOutput::new(&run, rec.decoding.chunking);
    rec.run(&paths, &task_of, run.limits, |u| output.take(u))?;
    output.finish()?;
    let m = rec.memory();
    let mb = |b: u64| b as f64 / 1e6;
    eprintln!(
        "memory: one model {:.1} MB + {} tasks' masks and heads {:.1} MB = {:.1} MB; {} finetuned copies would take {:.1} MB ({:.2}x)",
        mb(m.model_bytes),
        m.tasks,
        mb(m.task_bytes),
        mb(m.shared()),
        m.tasks,
        mb(m.copies()),
        m.copies() as f64 / m.shared() as f64
    );
    Ok(())
}
