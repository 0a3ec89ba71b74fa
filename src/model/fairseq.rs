//! fairseq wav2vec 2.0, HuBERT and data2vec-audio checkpoints (`.pt`), converted into Hugging
//! Face folders.
//!
//! S3-Router is a fairseq fork: the models the paper masks (`wav2vec_small.pt`,
//! `xlsr2_300m.pt`; its recipes also take `hubert_base_ls960.pt` and data2vec's
//! `audio_base_ls.pt`), finetuned baselines, and the runs its training writes are all fairseq
//! checkpoints. [`convert`] reads one (`torch.save` of fairseq's training state, either PyTorch
//! format, its configuration as a dict or an old `argparse.Namespace`) without running any of its
//! pickled code, and writes a folder the engine and transformers load:
//!
//! - a pretrained model (`wav2vec2`, `hubert`, `data2vec_audio`): the encoder, pretraining-only
//!   modules (quantizer, target projections, label embeddings, the EMA teacher) dropped;
//! - a finetuned one (`wav2vec_ctc`): the encoder and the CTC head, with the vocabulary of the
//!   `dict.ltr.txt` it was trained with;
//! - an S3-Router one (`wav2vec_ctc_st`, `scores` beside the masked weights): the frozen encoder,
//!   and in `masks/` a mask set ([`MaskSet`]: each matrix's top-k of |scores| at the run's
//!   `prune_rate`, as S3-Router's `GetSubnet` takes it, the scores, the head and the vocabulary).
//!
//! Names follow the tables of transformers' `convert_wav2vec2_original_pytorch_checkpoint_to_pytorch.py`
//! and its HuBERT and data2vec-audio counterparts; the folder stores them under the family's
//! prefix (`wav2vec2.`, `hubert.`, `data2vec_audio.`), the mask set under the engine's wav2vec2
//! names, as `engine train` writes them.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use memmap2::Mmap;

use super::config::Family;
use super::masks::{base_fingerprint, KeepFlags, MaskSet, Origin, BLANK_KEY};
use super::pickle::{Calls, Value};
use super::preprocess::Preprocessor;
use super::torch_bin::TorchFile;
use super::vocab::Vocab;
use crate::backend::cpu::CpuBackend;
use crate::fsio::{atomic_write, ensure_new_folder, staged_folder, write_f32_safetensors};
use crate::model::checkpoint::Checkpoint;
use crate::model::Wav2Vec2;
use crate::router::top_k_mask;
use crate::tensor::{HostBytes, Tensor};

/// What kind of checkpoint was converted, and what came out.
#[derive(Debug)]
pub struct Converted {
    pub kind: Kind,
    /// Tensors written into the model folder.
    pub tensors: usize,
    /// The fairseq tensors left out (pretraining-only modules).
    pub dropped: Vec<String>,
    /// The dictionary the labels came from (--dict, or the run's own).
    pub dict: Option<PathBuf>,
}

#[derive(Debug, PartialEq)]
pub enum Kind {
    Pretrained,
    /// A CTC model with a head of `classes` outputs.
    Finetuned {
        classes: usize,
    },
    /// S3-Router: masks at `sparsity` over `masked` matrices, written to `masks`.
    S3Router {
        sparsity: f64,
        masked: usize,
        masks: PathBuf,
    },
}

/// Where a fairseq tensor goes.
enum Target {
    /// The Hugging Face encoder tensor of this name.
    Tensor(String),
    /// The CTC head's tensor of this name.
    Head(String),
    /// The S3-Router scores of this Hugging Face weight.
    Scores(String),
    /// A pretraining-only module.
    Drop,
}

/// The Hugging Face name of an encoder tensor under fairseq's `name` (finetuned prefix removed).
fn target(name: &str) -> Option<Target> {
    const PRETRAINING_ONLY: [&str; 7] =
        ["quantizer.", "project_q.", "final_proj.", "target_glu.", "input_quantizer.", "label_embs_concat", "_ema"];
    /// Parameters of a linear, conv or norm, and of the weight-normed positional conv.
    const PARAMS: [&str; 6] =
        ["weight", "bias", "weight_g", "weight_v", "parametrizations.weight.original0", "parametrizations.weight.original1"];
    if PRETRAINING_ONLY.iter().any(|p| name.starts_with(p)) {
        return Some(Target::Drop);
    }
    if name == "mask_emb" {
        return Some(Target::Tensor("wav2vec2.masked_spec_embed".to_string()));
    }
    if let Some(module) = name.strip_suffix(".scores") {
        return Some(Target::Scores(format!("wav2vec2.{}.weight", module_target(module)?)));
    }
    let (module, param) = PARAMS.iter().find_map(|p| Some((name.strip_suffix(p)?.strip_suffix('.')?, p)))?;
    Some(Target::Tensor(format!("wav2vec2.{}.{param}", module_target(module)?)))
}

/// The Hugging Face module (under `wav2vec2.`) of the fairseq encoder module `module`.
fn module_target(module: &str) -> Option<String> {
    Some(if let Some(rest) = module.strip_prefix("feature_extractor.conv_layers.") {
        // Sequential(conv, dropout, norm, GELU); in layer-norm mode the norm is
        // Sequential(transpose, LayerNorm, transpose).
        match rest.split_once('.')? {
            (layer, "0") => format!("feature_extractor.conv_layers.{layer}.conv"),
            (layer, "2" | "2.1") => format!("feature_extractor.conv_layers.{layer}.layer_norm"),
            _ => return None,
        }
    } else if let Some(rest) = module.strip_prefix("encoder.pos_conv.") {
        // One weight-normed conv: Sequential(conv, SamePad, GELU). A stack (data2vec-audio):
        // Sequential(Sequential(conv, SamePad, transpose, LayerNorm, transpose, GELU), ...).
        match rest.split_once('.') {
            None if rest == "0" => "encoder.pos_conv_embed.conv".to_string(),
            Some((layer, "0")) if layer.parse::<usize>().is_ok() => format!("encoder.pos_conv_embed.layers.{layer}.conv"),
            _ => return None,
        }
    } else if let Some(rest) = module.strip_prefix("encoder.layers.") {
        let (layer, sub) = rest.split_once('.')?;
        let sub = match sub {
            "self_attn_layer_norm" => "layer_norm",
            "self_attn.q_proj" => "attention.q_proj",
            "self_attn.k_proj" => "attention.k_proj",
            "self_attn.v_proj" => "attention.v_proj",
            "self_attn.out_proj" => "attention.out_proj",
            "fc1" => "feed_forward.intermediate_dense",
            "fc2" => "feed_forward.output_dense",
            "final_layer_norm" => "final_layer_norm",
            _ => return None,
        };
        format!("encoder.layers.{layer}.{sub}")
    } else {
        match module {
            "post_extract_proj" => "feature_projection.projection",
            "layer_norm" => "feature_projection.layer_norm",
            "encoder.layer_norm" => "encoder.layer_norm",
            _ => return None,
        }
        .to_string()
    })
}

/// The settings of the run that wrote the checkpoint.
struct Run<'a> {
    /// The model's settings (`cfg.model`, or the old flat `args`).
    model: &'a Value,
    /// The wav2vec 2.0 architecture's settings: the model's own, or for a finetuned model those
    /// of the pretrained one it wraps (`w2v_args`).
    arch: &'a Value,
    /// The model's registered name (`_name`, or the old `arch`).
    name: String,
    /// The pretrained model's family (the registered name of `arch`).
    family: Family,
    /// Whether the task normalised the audio.
    normalize: bool,
    /// Where fairseq read the labels' dictionary: `dict.<labels>.txt` in the task's data folder.
    dict: Option<PathBuf>,
}

fn present<'a>(v: &'a Value, name: &str) -> Option<&'a Value> {
    v.field(name).filter(|v| **v != Value::None)
}

impl<'a> Run<'a> {
    fn of(root: &'a Value, p: &str) -> Result<Run<'a>> {
        let (model, task) = if let Some(cfg) = present(root, "cfg") {
            (present(cfg, "model").with_context(|| format!("{p}: \"cfg\" has no \"model\" settings"))?, present(cfg, "task"))
        } else if let Some(args) = present(root, "args") {
            (args, Some(args))
        } else {
            bail!("{p}: neither \"cfg\" nor \"args\" in the checkpoint (not a fairseq checkpoint)")
        };
        let name = ["_name", "arch"]
            .iter()
            .find_map(|k| present(model, k).and_then(text))
            .with_context(|| format!("{p}: the model settings do not name the model"))?
            .to_string();
        let arch = match present(model, "w2v_args") {
            // A whole run's settings (a dict with "model"), or an old flat Namespace.
            Some(w2v) => present(w2v, "model").unwrap_or(w2v),
            None => model,
        };
        let arch_name = ["_name", "arch"].iter().find_map(|k| present(arch, k).and_then(text)).unwrap_or(&name);
        let family = match arch_name {
            n if n.starts_with("wav2vec2") => Family::Wav2Vec2,
            "hubert" => Family::Hubert,
            "data2vec_audio" => Family::Data2VecAudio,
            other => bail!("{p}: model {other:?} is not a wav2vec 2.0, HuBERT or data2vec-audio model"),
        };
        let normalize = task.and_then(|t| present(t, "normalize")).or_else(|| present(model, "normalize"));
        let normalize = match normalize {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => bail!("{p}: \"normalize\" is {other:?}, not true or false"),
        };
        let dict = task.and_then(|t| present(t, "data")).and_then(text).map(|data| {
            let labels = task.and_then(|t| present(t, "labels")).and_then(text).unwrap_or("ltr");
            Path::new(data).join(format!("dict.{labels}.txt"))
        });
        Ok(Run { model, arch, name, family, normalize, dict })
    }
}

/// A string setting; an enum member pickled by value (`ChoiceEnum("layer_norm")`) too.
fn text(v: &Value) -> Option<&str> {
    match v {
        Value::Str(s) => Some(s),
        Value::Object { args, .. } => match args.as_slice() {
            [Value::Str(s)] => Some(s),
            _ => None,
        },
        _ => None,
    }
}

/// Typed reads of fairseq settings, with `Wav2Vec2Config`'s defaults for those an older
/// checkpoint lacks.
struct Settings<'a> {
    v: &'a Value,
    p: &'a str,
}

impl Settings<'_> {
    fn int(&self, name: &str, default: usize) -> Result<usize> {
        match present(self.v, name) {
            None => Ok(default),
            Some(Value::Int(i)) if *i > 0 => Ok(*i as usize),
            Some(other) => bail!("{}: setting \"{name}\" is {other:?}, not a positive integer", self.p),
        }
    }

    fn flag(&self, name: &str, default: bool) -> Result<bool> {
        match present(self.v, name) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => bail!("{}: setting \"{name}\" is {other:?}, not true or false", self.p),
        }
    }

    fn float(&self, name: &str) -> Result<Option<f64>> {
        match present(self.v, name) {
            None => Ok(None),
            Some(Value::Float(x)) => Ok(Some(*x)),
            Some(Value::Int(i)) => Ok(Some(*i as f64)),
            Some(other) => bail!("{}: setting \"{name}\" is {other:?}, not a number", self.p),
        }
    }

    fn text(&self, name: &str, default: &str) -> Result<String> {
        match present(self.v, name) {
            None => Ok(default.to_string()),
            Some(v) => Ok(text(v).with_context(|| format!("{}: setting \"{name}\" is {v:?}, not a string", self.p))?.to_string()),
        }
    }
}

/// fairseq's `conv_feature_layers`, a Python expression of (dim, kernel, stride) tuples such as
/// `[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] * 2`: sums of lists, each optionally
/// repeated.
pub fn conv_layers(expr: &str) -> Result<Vec<(usize, usize, usize)>> {
    let bad = || format!("conv_feature_layers {expr:?} is not a sum of lists of (dim, kernel, stride) tuples");
    let mut out = Vec::new();
    for term in expr.split('+') {
        let (list, times) = match term.rsplit_once('*') {
            Some((list, n)) => (list, n.trim().parse::<usize>().with_context(bad)?),
            None => (term, 1),
        };
        let inner = list.trim().strip_prefix('[').and_then(|l| l.strip_suffix(']')).with_context(bad)?;
        let mut tuples = Vec::new();
        for tuple in inner.split(')').map(str::trim).filter(|t| !t.is_empty()) {
            let nums = tuple.trim_start_matches(',').trim().strip_prefix('(').with_context(bad)?;
            let nums: Vec<usize> = nums.split(',').map(|n| n.trim().parse::<usize>()).collect::<Result<_, _>>().ok().with_context(bad)?;
            let [dim, kernel, stride] = nums[..] else { bail!(bad()) };
            ensure!(dim > 0 && kernel > 0 && stride > 0, bad());
            tuples.push((dim, kernel, stride));
        }
        for _ in 0..times {
            out.extend_from_slice(&tuples);
        }
    }
    ensure!(!out.is_empty(), bad());
    Ok(out)
}

/// The Hugging Face `config.json` of the `family` model `arch` describes, with a head of
/// `classes` outputs whose blank is `blank` (the encoder alone: `None`).
fn hf_config(family: Family, arch: &Settings, head: Option<(usize, usize)>) -> Result<serde_json::Value> {
    let p = arch.p;
    let layer_type = arch.text("layer_type", "transformer")?;
    ensure!(layer_type == "transformer", "{p}: layer_type {layer_type:?} (conformer layers) is not supported");
    let act = arch.text("activation_fn", "gelu")?;
    ensure!(act == "gelu", "{p}: activation_fn {act:?} is not supported (only gelu)");
    let extractor = arch.text("extractor_mode", "default")?;
    let norm = match extractor.as_str() {
        "default" => "group",
        "layer_norm" => "layer",
        other => bail!("{p}: extractor_mode {other:?} (expected \"default\" or \"layer_norm\")"),
    };
    let layer_norm_first = arch.flag("layer_norm_first", false)?;
    let (depth, conv_pos) = (arch.int("pos_conv_depth", 1)?, arch.int("conv_pos", 128)?);
    // data2vec-audio is one architecture: layer norm in every conv, post-LN, a stack of
    // positional convs of kernel max(3, conv_pos / depth) (fairseq's TransformerEncoder).
    if family == Family::Data2VecAudio {
        ensure!(
            norm == "layer" && !layer_norm_first && depth > 1,
            "{p}: a data2vec_audio model with extractor_mode {extractor:?}, layer_norm_first {layer_norm_first} and \
             pos_conv_depth {depth} is not the architecture transformers' Data2VecAudio implements (layer_norm, false, > 1)"
        );
    } else {
        ensure!(depth == 1, "{p}: pos_conv_depth {depth} (a stack of positional convs) is only supported in data2vec_audio models");
    }
    let conv = conv_layers(&arch.text("conv_feature_layers", "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] + [(512,2,2)]")?)
        .with_context(|| p.to_string())?;
    let (classes, blank) = head.unwrap_or((32, 0));
    let (model_type, bare) = match family {
        Family::Wav2Vec2 => ("wav2vec2", "Wav2Vec2Model"),
        Family::Hubert => ("hubert", "HubertModel"),
        Family::Data2VecAudio => ("data2vec-audio", "Data2VecAudioModel"),
        other => bail!("{p}: {other:?} checkpoints do not come from fairseq"),
    };
    let mut config = serde_json::json!({
        "model_type": model_type,
        "architectures": [if head.is_some() { family.ctc_class() } else { bare }],
        "conv_dim": conv.iter().map(|c| c.0).collect::<Vec<_>>(),
        "conv_kernel": conv.iter().map(|c| c.1).collect::<Vec<_>>(),
        "conv_stride": conv.iter().map(|c| c.2).collect::<Vec<_>>(),
        "conv_bias": arch.flag("conv_bias", false)?,
        "feat_extract_norm": norm,
        "feat_extract_activation": "gelu",
        "do_stable_layer_norm": layer_norm_first,
        "hidden_size": arch.int("encoder_embed_dim", 768)?,
        "num_hidden_layers": arch.int("encoder_layers", 12)?,
        "num_attention_heads": arch.int("encoder_attention_heads", 12)?,
        "intermediate_size": arch.int("encoder_ffn_embed_dim", 3072)?,
        "hidden_act": "gelu",
        "num_conv_pos_embeddings": conv_pos,
        "num_conv_pos_embedding_groups": arch.int("conv_pos_groups", 16)?,
        "layer_norm_eps": 1e-5,
        "vocab_size": classes,
        "pad_token_id": blank,
        "bos_token_id": 1,
        "eos_token_id": 2,
    });
    match family {
        Family::Hubert => config["feat_proj_layer_norm"] = true.into(),
        Family::Data2VecAudio => {
            config["num_conv_pos_embeddings"] = depth.into();
            config["conv_pos_kernel_size"] = (conv_pos / depth).max(3).into();
        }
        _ => {}
    }
    Ok(config)
}

/// S3-Router's masking settings: the fraction of weights kept (`prune_rate`) and whether
/// attention stays unmasked (`fix_attn`).
fn s3router_keep(model: &Settings) -> Result<(f64, bool)> {
    let p = model.p;
    for per_layer in ["layerwise_prune_rate", "fc_attn_prune_rate"] {
        if let Some(v) = present(model.v, per_layer).filter(|v| !matches!(v, Value::List(l) | Value::Tuple(l) if l.is_empty())) {
            bail!("{p}: {per_layer} = {v:?}: masks of several keep ratios in one set are not supported");
        }
    }
    let keep = model.float("prune_rate")?.with_context(|| format!("{p}: an S3-Router checkpoint without \"prune_rate\""))?;
    ensure!(keep > 0.0 && keep <= 1.0, "{p}: prune_rate {keep} (the fraction of weights kept) is outside (0, 1]");
    Ok((keep, model.flag("fix_attn", false)?))
}

/// Converts the fairseq checkpoint `pt` into the new folder `out` (see the module docs). A
/// finetuned or S3-Router checkpoint's labels come from the fairseq dictionary `dict`, or from
/// the one its run read.
pub fn convert(pt: &Path, dict: Option<&Path>, out: &Path) -> Result<Converted> {
    let p = pt.display().to_string();
    ensure_new_folder(out)?;
    let file = std::fs::File::open(pt).with_context(|| format!("cannot open {p}"))?;
    // SAFETY: read-only mapping of a file we do not modify (as in Checkpoint::open).
    let map = std::sync::Arc::new(unsafe { Mmap::map(&file) }.with_context(|| format!("cannot map {p}"))?);
    let torch = TorchFile::parse(&map, pt, Calls::Record)?;
    let run = Run::of(&torch.root, &p)?;
    let parts = Parts::of(&torch, &map, &run, &p)?;
    let labels = labels(&p, &run, &parts, dict)?;
    let s3router = !parts.scores.is_empty();
    // S3-Router's folder is the frozen encoder; its head goes with the masks.
    let folder_head = labels.as_ref().filter(|_| !s3router).map(|(_, v)| (v.len(), v.blank()));
    let config = hf_config(run.family, &Settings { v: run.arch, p: &p }, folder_head)?;
    staged_folder(out, |staging| {
        let head: &[(String, Tensor)] = if s3router { &[] } else { &parts.head };
        write_folder(staging, &run, &config, &parts.encoder, head, labels.as_ref().filter(|_| !s3router).map(|(_, v)| v))?;
        // The folder must load: every tensor the config implies, with its shape.
        Wav2Vec2::load(staging, &CpuBackend).with_context(|| format!("{p}: the converted model does not load"))?;
        let kind = match (s3router, &labels) {
            (true, Some((_, vocab))) => {
                let (keep, fix_attn) = s3router_keep(&Settings { v: run.model, p: &p })?;
                let masked = write_mask_set(staging, &staging.join("masks"), &parts.scores, 1.0 - keep, fix_attn, &parts.head, vocab)?;
                Kind::S3Router { sparsity: 1.0 - keep, masked, masks: out.join("masks") }
            }
            (true, None) => bail!("{p}: scores without a CTC head: not an S3-Router CTC checkpoint (wav2vec_ctc_st)"),
            (false, Some((_, vocab))) => Kind::Finetuned { classes: vocab.len() },
            (false, None) => Kind::Pretrained,
        };
        let tensors = parts.encoder.len() + head.len();
        Ok(Converted { kind, tensors, dropped: parts.dropped.clone(), dict: labels.as_ref().map(|(d, _)| d.clone()) })
    })
}

/// A fairseq checkpoint's tensors, sorted by where they go.
struct Parts {
    /// Encoder tensors under their (engine) Hugging Face names.
    encoder: Vec<(String, Tensor)>,
    /// S3-Router scores under their weight's name.
    scores: Vec<(String, Tensor)>,
    /// `lm_head.weight` and `lm_head.bias`, if the model has a CTC head.
    head: Vec<(String, Tensor)>,
    /// The fairseq names of pretraining-only tensors left out.
    dropped: Vec<String>,
}

impl Parts {
    fn of(torch: &TorchFile, map: &std::sync::Arc<Mmap>, run: &Run, p: &str) -> Result<Parts> {
        let weights = present(&torch.root, "model").with_context(|| format!("{p}: no \"model\" weights in the checkpoint"))?;
        let Value::Dict(entries) = weights else { bail!("{p}: \"model\" is not a dict of tensors") };
        let mut parts = Parts { encoder: Vec::new(), scores: Vec::new(), head: Vec::new(), dropped: Vec::new() };
        for (key, value) in entries {
            let Value::Str(name) = key else { bail!("{p}: a weight name that is not a string") };
            let inner = name.strip_prefix("w2v_encoder.w2v_model.").unwrap_or(name);
            let what = || format!("{p}: tensor \"{name}\" is not part of a {:?} encoder (model {:?})", run.family, run.name);
            let to = match name.strip_prefix("w2v_encoder.proj.") {
                Some(part) => Target::Head(format!("lm_head.{part}")),
                None => target(inner).with_context(what)?,
            };
            let (into, hf) = match to {
                Target::Head(hf) => (&mut parts.head, hf),
                Target::Tensor(hf) => (&mut parts.encoder, hf),
                Target::Scores(hf) => (&mut parts.scores, hf),
                // Not read at all: data2vec's EMA teacher (`_ema`) is a dict, not a tensor.
                Target::Drop => {
                    parts.dropped.push(name.clone());
                    continue;
                }
            };
            let t = torch.tensor(name, value)?.with_context(|| format!("{p}: \"{name}\" is not a tensor"))?;
            let bytes = HostBytes::Mapped { map: map.clone(), offset: t.offset, len: t.len };
            let tensor = Tensor::from_host_bytes(bytes, t.dtype, &t.shape).with_context(|| format!("{p}: tensor \"{name}\""))?;
            into.push((hf, tensor));
        }
        Ok(parts)
    }
}

/// A finetuned model's labels, and the dictionary they came from: `dict` (--dict), or the
/// dictionary where its run read it; `None` for a model without a head.
fn labels(p: &str, run: &Run, parts: &Parts, dict: Option<&Path>) -> Result<Option<(PathBuf, Vocab)>> {
    let Some((_, bias)) = parts.head.iter().find(|(n, _)| n == "lm_head.bias") else {
        ensure!(
            dict.is_none(),
            "{p}: a pretrained model has no CTC head for the labels of --dict {}",
            dict.unwrap_or(Path::new("")).display()
        );
        return Ok(None);
    };
    let path = match (dict, &run.dict) {
        (Some(d), _) => d.to_path_buf(),
        (None, Some(found)) if found.is_file() => found.clone(),
        (None, found) => bail!(
            "{p}: a finetuned model: give --dict, the fairseq dict.*.txt its labels were trained with{}",
            found.as_ref().map(|d| format!(" (it is not at {}, where its run read it)", d.display())).unwrap_or_default()
        ),
    };
    let vocab = Vocab::from_fairseq_dict(&path)?;
    let classes = bias.shape()[0];
    ensure!(
        vocab.len() == classes,
        "{p}: the head has {classes} outputs, but {} gives {} labels (4 specials and its symbols)",
        path.display(),
        vocab.len()
    );
    Ok(Some((path, vocab)))
}

/// The Hugging Face folder in `dir`: `config.json`, `model.safetensors` (the encoder under the
/// family's own names, and `head`), `preprocessor_config.json`, and `vocab.json` if given.
fn write_folder(
    dir: &Path,
    run: &Run,
    config: &serde_json::Value,
    encoder: &[(String, Tensor)],
    head: &[(String, Tensor)],
    vocab: Option<&Vocab>,
) -> Result<()> {
    // The family's own names (the engine's are wav2vec2's; see crate::model::checkpoint).
    let prefix = format!("{}.", run.family.prefix());
    let stored: Vec<(String, Tensor)> =
        encoder.iter().map(|(n, t)| (n.strip_prefix("wav2vec2.").map_or(n.clone(), |rest| format!("{prefix}{rest}")), t.clone())).collect();
    let tensors: Vec<&(String, Tensor)> = stored.iter().chain(head).collect();
    write_tensors(&dir.join("model.safetensors"), &tensors, &[("format", "pt")])?;
    write_json(&dir.join("config.json"), config)?;
    let layer_norm = config["feat_extract_norm"] == "layer";
    write_json(&dir.join("preprocessor_config.json"), &Preprocessor { do_normalize: run.normalize }.config_json(layer_norm))?;
    vocab.map_or(Ok(()), |v| v.save(&dir.join("vocab.json")))
}

/// The mask set of an S3-Router checkpoint in `dir`: per matrix, the top `1 - sparsity` of
/// |scores| (FFN matrices, and attention's unless `fix_attn`), over the encoder in `model_dir`;
/// the scores, the head and the vocabulary. Returns the number of masked matrices.
fn write_mask_set(
    model_dir: &Path,
    dir: &Path,
    scores: &[(String, Tensor)],
    sparsity: f64,
    fix_attn: bool,
    head: &[(String, Tensor)],
    vocab: &Vocab,
) -> Result<usize> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let masked: Vec<&(String, Tensor)> = scores.iter().filter(|(n, _)| !(fix_attn && n.contains(".attention."))).collect();
    let keep: Vec<KeepFlags> =
        masked.iter().map(|(name, s)| Ok((name.clone(), s.shape().to_vec(), top_k_mask(&s.to_vec()?, sparsity)))).collect::<Result<_>>()?;
    let written = Checkpoint::open_dir(model_dir)?;
    let base = base_fingerprint(&written, keep.iter().map(|(n, shape, _)| (n.as_str(), shape.as_slice())))?;
    MaskSet::save(dir, &keep, sparsity, &Origin { base: Some(base), target_lang: None })?;
    let all: Vec<&(String, Tensor)> = scores.iter().collect();
    write_tensors(&dir.join("scores.safetensors"), &all, &[("sparsity", &sparsity.to_string())])?;
    let blank = vocab.blank().to_string();
    write_tensors(&dir.join("head.safetensors"), &head.iter().collect::<Vec<_>>(), &[(BLANK_KEY, &blank)])?;
    vocab.save(&dir.join("vocab.json"))?;
    Ok(masked.len())
}

fn write_tensors(path: &Path, tensors: &[&(String, Tensor)], meta: &[(&str, &str)]) -> Result<()> {
    // f32 weights are written from the checkpoint's mapping; others converted first.
    let values: Vec<Tensor> = tensors.iter().map(|(n, t)| t.to_f32().with_context(|| n.clone())).collect::<Result<_>>()?;
    let slices: Vec<&[f32]> = values.iter().map(Tensor::f32s).collect::<Result<_>>()?;
    let meta = meta.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    write_f32_safetensors(path, tensors.iter().zip(slices).map(|((n, t), v)| (n.as_str(), t.shape(), v)), &meta)
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    atomic_write(path, |f| std::io::Write::write_all(f, text.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conv_layer_expressions_read_as_fairseq_evaluates_them() {
        let base = conv_layers("[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] + [(512,2,2)]").unwrap();
        let want: Vec<_> = [(512, 10, 5)].into_iter().chain([(512, 3, 2); 4]).chain([(512, 2, 2); 2]).collect();
        assert_eq!(base, want);
        assert_eq!(conv_layers("[(8,3,1),(4,2,2)]*2").unwrap(), [(8, 3, 1), (4, 2, 2), (8, 3, 1), (4, 2, 2)]);
        for bad in ["", "[]", "[(1, 2)]", "[(1, 2, 3)] * x", "(1,2,3)", "[(0, 2, 2)]"] {
            assert!(conv_layers(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn fairseq_names_map_to_transformers_names() {
        let hf = |n: &str| match target(n) {
            Some(Target::Tensor(t) | Target::Head(t)) => t,
            Some(Target::Scores(t)) => format!("scores of {t}"),
            Some(Target::Drop) => "dropped".into(),
            None => "unknown".into(),
        };
        let cases = [
            ("feature_extractor.conv_layers.0.0.weight", "wav2vec2.feature_extractor.conv_layers.0.conv.weight"),
            ("feature_extractor.conv_layers.0.2.bias", "wav2vec2.feature_extractor.conv_layers.0.layer_norm.bias"),
            ("feature_extractor.conv_layers.3.2.1.weight", "wav2vec2.feature_extractor.conv_layers.3.layer_norm.weight"),
            ("encoder.pos_conv.0.weight_g", "wav2vec2.encoder.pos_conv_embed.conv.weight_g"),
            ("encoder.pos_conv.2.0.bias", "wav2vec2.encoder.pos_conv_embed.layers.2.conv.bias"),
            ("encoder.pos_conv.1.3.weight", "unknown"),
            ("label_embs_concat", "dropped"),
            ("encoder.layers.11.self_attn.out_proj.bias", "wav2vec2.encoder.layers.11.attention.out_proj.bias"),
            ("encoder.layers.0.self_attn_layer_norm.weight", "wav2vec2.encoder.layers.0.layer_norm.weight"),
            ("encoder.layers.2.fc2.scores", "scores of wav2vec2.encoder.layers.2.feed_forward.output_dense.weight"),
            ("encoder.layers.2.final_layer_norm.bias", "wav2vec2.encoder.layers.2.final_layer_norm.bias"),
            ("layer_norm.weight", "wav2vec2.feature_projection.layer_norm.weight"),
            ("encoder.layer_norm.weight", "wav2vec2.encoder.layer_norm.weight"),
            ("mask_emb", "wav2vec2.masked_spec_embed"),
            ("quantizer.vars", "dropped"),
            ("encoder.layers.0.fc1.thres", "unknown"),
            ("encoder.layers.0.conv_module.weight", "unknown"),
            ("encoder.layers.0.fc1.weight.extra", "unknown"),
            ("feature_extractor.conv_layers.1.1.weight", "unknown"),
        ];
        for (fairseq, want) in cases {
            assert_eq!(hf(fairseq), want, "{fairseq}");
        }
    }
}
