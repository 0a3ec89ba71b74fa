//! `config.json` of a Hugging Face wav2vec2 folder: every architecture key, read and checked.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

/// Which transformers model family a folder holds (`model_type`). HuBERT's, UniSpeech's and
/// UniSpeech-SAT's modules are wav2vec2's, stored under `hubert.`, `unispeech.` and
/// `unispeech_sat.`; data2vec-audio's are wav2vec2's post-LN encoder with
/// layer norm in every conv and a stack of positional convs ([`PosConv`]), stored under
/// `data2vec_audio.` (bare `*Model` checkpoints: no prefix). The engine names every tensor by its
/// wav2vec2 name ([`crate::model::checkpoint`]) and writes each family's own names back
/// ([`crate::model::folder`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Wav2Vec2,
    Hubert,
    UniSpeech,
    UniSpeechSat,
    Data2VecAudio,
}

impl Family {
    /// The prefix of the encoder's tensors in a `*ForCTC` checkpoint.
    pub fn prefix(self) -> &'static str {
        match self {
            Family::Wav2Vec2 => "wav2vec2",
            Family::Hubert => "hubert",
            Family::UniSpeech => "unispeech",
            Family::UniSpeechSat => "unispeech_sat",
            Family::Data2VecAudio => "data2vec_audio",
        }
    }

    /// transformers' CTC model class.
    pub fn ctc_class(self) -> &'static str {
        match self {
            Family::Wav2Vec2 => "Wav2Vec2ForCTC",
            Family::Hubert => "HubertForCTC",
            Family::UniSpeech => "UniSpeechForCTC",
            Family::UniSpeechSat => "UniSpeechSatForCTC",
            Family::Data2VecAudio => "Data2VecAudioForCTC",
        }
    }
}

/// Where conv-layer normalisation goes (`feat_extract_norm`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FeatNorm {
    /// GroupNorm with one group per channel after conv layer 0 only (wav2vec2-base).
    Group,
    /// LayerNorm over channels after every conv layer (large, XLS-R).
    Layer,
}

/// The convolutional positional embedding added to the encoder's input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PosConv {
    /// Time steps each conv sees ("same" padding; an even kernel's extra output frame dropped).
    pub kernel: usize,
    /// Channel groups of each conv (`num_conv_pos_embedding_groups`).
    pub groups: usize,
    /// data2vec-audio: this many convs in a row, each followed by a layer norm without
    /// parameters and GELU. `None`: wav2vec2 and HuBERT's one weight-normed conv and GELU.
    pub stacked: Option<usize>,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub family: Family,
    pub conv_dim: Vec<usize>,
    pub conv_kernel: Vec<usize>,
    pub conv_stride: Vec<usize>,
    pub conv_bias: bool,
    pub feat_extract_norm: FeatNorm,
    /// Pre-LN transformer blocks with the encoder layer norm after the last layer.
    pub do_stable_layer_norm: bool,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub pos_conv: PosConv,
    /// MMS: the bottleneck width of the adapter after every pre-LN layer (`adapter_attn_dim`;
    /// transformers ignores it post-LN).
    pub adapter_attn_dim: Option<usize>,
    pub layer_norm_eps: f32,
    pub vocab_size: usize,
    /// The CTC blank.
    pub pad_token_id: usize,
}

fn key<'a>(json: &'a Value, name: &str, file: &Path) -> Result<&'a Value> {
    json.get(name).with_context(|| format!("{}: missing key \"{name}\"", file.display()))
}

fn usize_key(json: &Value, name: &str, file: &Path) -> Result<usize> {
    let v = key(json, name, file)?;
    v.as_u64().map(|x| x as usize).with_context(|| format!("{}: \"{name}\" must be a non-negative integer, found {v}", file.display()))
}

fn list_key(json: &Value, name: &str, file: &Path) -> Result<Vec<usize>> {
    let v = key(json, name, file)?;
    let items = v.as_array().with_context(|| format!("{}: \"{name}\" must be a list, found {v}", file.display()))?;
    items
        .iter()
        .map(|x| x.as_u64().filter(|&x| x > 0).map(|x| x as usize))
        .collect::<Option<Vec<_>>>()
        .with_context(|| format!("{}: \"{name}\" must hold positive integers, found {v}", file.display()))
}

fn bool_key(json: &Value, name: &str, file: &Path) -> Result<bool> {
    let v = key(json, name, file)?;
    v.as_bool().with_context(|| format!("{}: \"{name}\" must be true or false, found {v}", file.display()))
}

impl Config {
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let json: Value = serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))?;
        Config::from_json(&json, path)
    }

    pub fn from_json(json: &Value, file: &Path) -> Result<Config> {
        let eps = key(json, "layer_norm_eps", file)?;
        let family = match json.get("model_type").and_then(Value::as_str) {
            None | Some("wav2vec2") => Family::Wav2Vec2,
            Some("hubert") => {
                // HuBERT options whose modules wav2vec2 lacks.
                let flag = |name: &str| json.get(name).and_then(Value::as_bool);
                ensure!(
                    flag("feat_proj_layer_norm") != Some(false),
                    "{}: \"feat_proj_layer_norm\": false is not supported",
                    file.display()
                );
                ensure!(flag("conv_pos_batch_norm") != Some(true), "{}: \"conv_pos_batch_norm\": true is not supported", file.display());
                Family::Hubert
            }
            Some("unispeech") => Family::UniSpeech,
            Some("unispeech-sat") => Family::UniSpeechSat,
            Some("data2vec-audio") => Family::Data2VecAudio,
            Some(other) => bail!(
                "{}: \"model_type\" {other:?} is not supported (wav2vec2, hubert, unispeech, unispeech-sat and data2vec-audio are)",
                file.display()
            ),
        };
        // data2vec-audio has one architecture (transformers' config has neither key): layer norm
        // after every conv, post-LN blocks, `num_conv_pos_embeddings` positional convs of
        // `conv_pos_kernel_size` steps.
        let (feat_extract_norm, do_stable_layer_norm, pos_kernel, pos_stack) = if family == Family::Data2VecAudio {
            let layers = usize_key(json, "num_conv_pos_embeddings", file)?;
            (FeatNorm::Layer, false, usize_key(json, "conv_pos_kernel_size", file)?, Some(layers))
        } else {
            let norm = key(json, "feat_extract_norm", file)?;
            let feat_extract_norm = match norm.as_str() {
                Some("group") => FeatNorm::Group,
                Some("layer") => FeatNorm::Layer,
                _ => bail!("{}: \"feat_extract_norm\" must be \"group\" or \"layer\", found {norm}", file.display()),
            };
            let stable = bool_key(json, "do_stable_layer_norm", file)?;
            (feat_extract_norm, stable, usize_key(json, "num_conv_pos_embeddings", file)?, None)
        };
        let cfg = Config {
            family,
            conv_dim: list_key(json, "conv_dim", file)?,
            conv_kernel: list_key(json, "conv_kernel", file)?,
            conv_stride: list_key(json, "conv_stride", file)?,
            conv_bias: bool_key(json, "conv_bias", file)?,
            feat_extract_norm,
            do_stable_layer_norm,
            hidden_size: usize_key(json, "hidden_size", file)?,
            num_hidden_layers: usize_key(json, "num_hidden_layers", file)?,
            num_attention_heads: usize_key(json, "num_attention_heads", file)?,
            intermediate_size: usize_key(json, "intermediate_size", file)?,
            pos_conv: PosConv { kernel: pos_kernel, groups: usize_key(json, "num_conv_pos_embedding_groups", file)?, stacked: pos_stack },
            adapter_attn_dim: match json.get("adapter_attn_dim") {
                Some(v) if do_stable_layer_norm && !v.is_null() => Some(usize_key(json, "adapter_attn_dim", file)?),
                _ => None,
            },
            layer_norm_eps: eps.as_f64().with_context(|| format!("{}: \"layer_norm_eps\" must be a number, found {eps}", file.display()))?
                as f32,
            vocab_size: usize_key(json, "vocab_size", file)?,
            pad_token_id: usize_key(json, "pad_token_id", file)?,
        };
        // Activation functions other than GELU and the adapters are not implemented: refuse them
        // rather than compute something else.
        for act in ["hidden_act", "feat_extract_activation"] {
            if let Some(v) = json.get(act) {
                ensure!(v == "gelu", "{}: \"{act}\" = {v} is not supported (only \"gelu\")", file.display());
            }
        }
        if json.get("add_adapter").and_then(Value::as_bool) == Some(true) {
            bail!("{}: \"add_adapter\": true is not supported", file.display());
        }
        cfg.validate(file)?;
        Ok(cfg)
    }

    fn validate(&self, file: &Path) -> Result<()> {
        let f = file.display();
        let n = self.conv_dim.len();
        ensure!(n > 0, "{f}: \"conv_dim\" is empty");
        ensure!(
            self.conv_kernel.len() == n && self.conv_stride.len() == n,
            "{f}: conv_dim, conv_kernel and conv_stride must have equal lengths ({n}, {}, {})",
            self.conv_kernel.len(),
            self.conv_stride.len()
        );
        ensure!(
            self.hidden_size > 0 && self.num_attention_heads > 0 && self.hidden_size.is_multiple_of(self.num_attention_heads),
            "{f}: hidden_size {} is not divisible by num_attention_heads {}",
            self.hidden_size,
            self.num_attention_heads
        );
        let pc = self.pos_conv;
        ensure!(
            pc.groups > 0 && self.hidden_size.is_multiple_of(pc.groups),
            "{f}: hidden_size {} is not divisible by num_conv_pos_embedding_groups {}",
            self.hidden_size,
            pc.groups
        );
        let kernel_key = if pc.stacked.is_some() { "conv_pos_kernel_size" } else { "num_conv_pos_embeddings" };
        ensure!(pc.kernel > 0, "{f}: {kernel_key} must be positive");
        ensure!(pc.stacked != Some(0), "{f}: num_conv_pos_embeddings (the number of positional convs) must be positive");
        ensure!(
            self.vocab_size > 0 && self.pad_token_id < self.vocab_size,
            "{f}: pad_token_id {} is outside vocab_size {}",
            self.pad_token_id,
            self.vocab_size
        );
        Ok(())
    }

    /// Frames the feature encoder makes from `samples` input samples (0 if too short).
    pub fn frames_for(&self, samples: usize) -> usize {
        self.conv_kernel.iter().zip(&self.conv_stride).fold(samples, |len, (&k, &s)| if len < k { 0 } else { (len - k) / s + 1 })
    }

    /// Input samples per output frame (320 for wav2vec2; transformers' `inputs_to_logits_ratio`).
    pub fn frame_stride(&self) -> usize {
        self.conv_stride.iter().product()
    }

    /// The fewest input samples that give one output frame (400 for wav2vec2-base).
    pub fn receptive_field(&self) -> usize {
        self.conv_kernel.iter().zip(&self.conv_stride).rev().fold(1, |rf, (&k, &s)| (rf - 1) * s + k)
    }

    /// The published architectures, for benchmarks with generated weights: `base`
    /// (wav2vec2-base) and `large` (wav2vec2-large-lv60 / XLS-R 300M).
    pub fn preset(name: &str) -> Result<Config> {
        let base = Config {
            family: Family::Wav2Vec2,
            conv_dim: vec![512; 7],
            conv_kernel: vec![10, 3, 3, 3, 3, 2, 2],
            conv_stride: vec![5, 2, 2, 2, 2, 2, 2],
            conv_bias: false,
            feat_extract_norm: FeatNorm::Group,
            do_stable_layer_norm: false,
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            pos_conv: PosConv { kernel: 128, groups: 16, stacked: None },
            adapter_attn_dim: None,
            layer_norm_eps: 1e-5,
            vocab_size: 32,
            pad_token_id: 0,
        };
        match name {
            "base" => Ok(base),
            "large" => Ok(Config {
                conv_bias: true,
                feat_extract_norm: FeatNorm::Layer,
                do_stable_layer_norm: true,
                hidden_size: 1024,
                num_hidden_layers: 24,
                num_attention_heads: 16,
                intermediate_size: 4096,
                ..base
            }),
            other => bail!("unknown preset {other:?} (expected \"base\" or \"large\")"),
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Value {
        serde_json::json!({
            "conv_dim": [512, 512, 512, 512, 512, 512, 512], "conv_kernel": [10, 3, 3, 3, 3, 2, 2], "conv_stride": [5, 2, 2, 2, 2, 2, 2],
            "conv_bias": false, "feat_extract_norm": "group", "do_stable_layer_norm": false, "hidden_size": 768,
            "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
            "num_conv_pos_embeddings": 128, "num_conv_pos_embedding_groups": 16, "layer_norm_eps": 1e-5,
            "vocab_size": 32, "pad_token_id": 0, "hidden_act": "gelu"
        })
    }

    #[test]
    fn base_geometry_matches_wav2vec2_paper() {
        let cfg = Config::from_json(&base(), Path::new("config.json")).unwrap();
        // 25 ms receptive field, 20 ms hop at 16 kHz; 1 s of audio gives 49 frames.
        assert_eq!(cfg.receptive_field(), 400);
        assert_eq!(cfg.frames_for(16000), 49);
        assert_eq!(cfg.frames_for(400), 1);
        assert_eq!(cfg.frames_for(399), 0);
    }

    #[test]
    fn base_preset_equals_the_base_config_file() {
        let file = Config::from_json(&base(), Path::new("config.json")).unwrap();
        assert_eq!(format!("{file:?}"), format!("{:?}", Config::preset("base").unwrap()));
    }

    /// data2vec-audio: the positional convs' kernel is `conv_pos_kernel_size` and their number
    /// `num_conv_pos_embeddings`; the architecture keys its config lacks are implied.
    #[test]
    fn data2vec_audio_reads_its_positional_stack_and_implied_architecture() {
        let mut j = base();
        let o = j.as_object_mut().unwrap();
        o.remove("feat_extract_norm");
        o.remove("do_stable_layer_norm");
        o.insert("model_type".into(), "data2vec-audio".into());
        o.insert("num_conv_pos_embeddings".into(), 5.into());
        o.insert("conv_pos_kernel_size".into(), 19.into());
        let cfg = Config::from_json(&j, Path::new("c")).unwrap();
        assert_eq!(cfg.pos_conv, PosConv { kernel: 19, groups: 16, stacked: Some(5) });
        assert_eq!((cfg.family, cfg.feat_extract_norm, cfg.do_stable_layer_norm), (Family::Data2VecAudio, FeatNorm::Layer, false));
        for (key, value) in [("conv_pos_kernel_size", None), ("num_conv_pos_embeddings", Some(0))] {
            let mut bad = j.clone();
            match value {
                None => drop(bad.as_object_mut().unwrap().remove(key)),
                Some(v) => bad[key] = v.into(),
            }
            let e = Config::from_json(&bad, Path::new("c")).unwrap_err().to_string();
            assert!(e.contains(key), "{e}");
        }
    }

    #[test]
    fn missing_or_bad_keys_are_named() {
        let mut j = base();
        j.as_object_mut().unwrap().remove("intermediate_size");
        let e = Config::from_json(&j, Path::new("m/config.json")).unwrap_err().to_string();
        assert!(e.contains("intermediate_size") && e.contains("m/config.json"), "{e}");
        let mut j = base();
        j["hidden_act"] = "relu".into();
        assert!(Config::from_json(&j, Path::new("c")).unwrap_err().to_string().contains("hidden_act"));
        let mut j = base();
        j["num_attention_heads"] = 7.into();
        assert!(Config::from_json(&j, Path::new("c")).is_err());
        // MMS adapters exist only in pre-LN layers (transformers ignores the key post-LN).
        let mut j = base();
        j["adapter_attn_dim"] = 16.into();
        assert_eq!(Config::from_json(&j, Path::new("c")).unwrap().adapter_attn_dim, None);
        j["do_stable_layer_norm"] = true.into();
        assert_eq!(Config::from_json(&j, Path::new("c")).unwrap().adapter_attn_dim, Some(16));
        j["adapter_attn_dim"] = "x".into();
        assert!(Config::from_json(&j, Path::new("c")).unwrap_err().to_string().contains("adapter_attn_dim"));
    }
}
