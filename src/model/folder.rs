//! Hugging Face `Wav2Vec2ForCTC` folders the engine writes: a finetuned model, or a frozen model
//! with a mask set applied (`engine masks apply`), which transformers then loads like any other.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};

use crate::fsio::{atomic_write, ensure_new_folder, staged_folder, write_f32_safetensors};
use crate::mask::unpack;
use crate::model::checkpoint::{Checkpoint, WeightSource};
use crate::model::config::Config;
use crate::model::masks::{MaskSet, Masked};
use crate::model::preprocess::Preprocessor;
use crate::model::vocab::Vocab;
use crate::model::wav2vec2::open_language;
use crate::tensor::Tensor;

/// A Hugging Face `Wav2Vec2ForCTC` (`HubertForCTC`, `Data2VecAudioForCTC`) folder that transformers and `engine
/// infer` load: `config.json` (the source's, with the task vocabulary's size and blank),
/// `model.safetensors` (every encoder tensor of the source, the trained ones replaced, and the
/// head, under the family's names),
/// `vocab.json` and `preprocessor_config.json`. `trained` holds the weights, head and embedding
/// as (name, shape, values).
pub fn write_model_folder(dir: &Path, source: &Path, ck: &Checkpoint, trained: &[(&str, Vec<usize>, &[f32])], vocab: &Vocab) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let config_path = source.join("config.json");
    let text = std::fs::read_to_string(&config_path).with_context(|| format!("cannot read {}", config_path.display()))?;
    let mut config: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", config_path.display()))?;
    let family = Config::from_json(&config, &config_path)?.family;
    config["vocab_size"] = vocab.len().into();
    config["pad_token_id"] = vocab.blank().into();
    config["architectures"] = serde_json::json!([family.ctc_class()]);
    let frozen: Vec<(String, Tensor)> = ck
        .names()
        .filter(|n| n.starts_with("wav2vec2.") && !trained.iter().any(|(name, ..)| name == n))
        .map(|n| Ok((n.to_string(), ck.tensor(n)?)))
        .collect::<Result<_>>()?;
    // f32 weights are written from the checkpoint's mapping; others converted first.
    let frozen_values: Vec<Tensor> = frozen.iter().map(|(_, t)| t.to_f32()).collect::<Result<_>>()?;
    let mut all: Vec<(&str, &[usize], &[f32])> = Vec::new();
    for ((n, t), v) in frozen.iter().zip(&frozen_values) {
        all.push((n.as_str(), t.shape(), v.f32s()?));
    }
    all.extend(trained.iter().map(|(name, shape, data)| (*name, shape.as_slice(), *data)));
    // The family's own names (the engine's are wav2vec2's; see crate::model::checkpoint).
    let stored: Vec<String> =
        all.iter().map(|(n, ..)| n.strip_prefix("wav2vec2.").map_or(n.to_string(), |rest| format!("{}.{rest}", family.prefix()))).collect();
    let tensors = all.iter().zip(&stored).map(|((_, shape, data), name)| (name.as_str(), *shape, *data));
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    write_f32_safetensors(&dir.join("model.safetensors"), tensors, &meta)?;
    let text = serde_json::to_string_pretty(&config)?;
    atomic_write(&dir.join("config.json"), |f| std::io::Write::write_all(f, text.as_bytes()))?;
    let pre = source.join("preprocessor_config.json");
    let pre_text = match std::fs::read_to_string(&pre) {
        Ok(t) => t,
        Err(_) => serde_json::to_string_pretty(&Preprocessor::load(source)?.config_json(true))?,
    };
    atomic_write(&dir.join("preprocessor_config.json"), |f| std::io::Write::write_all(f, pre_text.as_bytes()))?;
    vocab.save(&dir.join("vocab.json"))
}

/// Writes the model in `source` with the mask set `set` applied into the new folder `dir`: every
/// masked weight multiplied by its mask (dropped weights stored as zeros), the set's head and
/// vocabulary in place of the model's (its own where the set carries none). Returns the number
/// of weights the masks drop.
pub fn write_masked_folder(dir: &Path, source: &Path, set: &MaskSet) -> Result<usize> {
    ensure_new_folder(dir)?;
    // An MMS model runs with the adapters the masks were learned with; written as the defaults.
    let (config, ck) = open_language(source, set.target_lang.as_deref())?;
    set.check_base(&ck, source)?;
    // The weights as `engine infer --masks` runs them: masked, the set's head where it has one.
    let masked = Masked { inner: &ck, masks: set };
    let classes = set.head_vocab_size().unwrap_or(config.vocab_size);
    let head = [("lm_head.weight", vec![classes, config.hidden_size]), ("lm_head.bias", vec![classes])];
    let mut written: Vec<(&str, Vec<usize>, Vec<f32>)> = Vec::new();
    for (name, shape) in set.masks.iter().map(|(n, (s, _))| (n.as_str(), s.clone())).chain(head) {
        let t =
            masked.get(name, &shape).with_context(|| format!("{}: does not fit the model in {}", set.dir.display(), source.display()))?;
        written.push((name, shape, t.to_vec()?));
    }
    let vocab = match set.head {
        Some(_) => {
            let path = set.vocab_path().with_context(|| format!("{}: the set has a head but no vocab.json", set.dir.display()))?;
            Vocab::load(&path, classes, set.blank.unwrap_or(config.pad_token_id))?
        }
        None => Vocab::load_language(&source.join("vocab.json"), set.target_lang.as_deref(), classes, config.pad_token_id)?,
    };
    let trained: Vec<(&str, Vec<usize>, &[f32])> = written.iter().map(|(n, s, v)| (*n, s.clone(), v.as_slice())).collect();
    staged_folder(dir, |staging| write_model_folder(staging, source, &ck, &trained, &vocab))?;
    Ok(set.masks.iter().map(|(_, (shape, bits))| unpack(bits, shape.iter().product()).iter().filter(|&&keep| !keep).count()).sum())
}
