//! `preprocessor_config.json`: what `Wav2Vec2FeatureExtractor` does to raw audio.

use std::path::Path;

use anyhow::{ensure, Context, Result};

#[derive(Clone, Copy, Debug)]
pub struct Preprocessor {
    /// Per-utterance zero mean / unit variance.
    pub do_normalize: bool,
}

impl Preprocessor {
    /// Reads the folder's `preprocessor_config.json`; without one, transformers' defaults apply
    /// (normalise, 16 kHz) and a warning says so.
    pub fn load(dir: &Path) -> Result<Preprocessor> {
        let path = dir.join("preprocessor_config.json");
        if !path.exists() {
            eprintln!("warning: {} not found; using transformers' defaults (do_normalize = true, 16 kHz)", path.display());
            return Ok(Preprocessor { do_normalize: true });
        }
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let json: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))?;
        if let Some(rate) = json.get("sampling_rate") {
            ensure!(rate.as_u64() == Some(16000), "{}: sampling_rate {rate} is not supported (models here take 16000 Hz)", path.display());
        }
        let do_normalize = match json.get("do_normalize") {
            None => true,
            Some(v) => v.as_bool().with_context(|| format!("{}: \"do_normalize\" must be true or false, found {v}", path.display()))?,
        };
        Ok(Preprocessor { do_normalize })
    }

    /// transformers' `Wav2Vec2FeatureExtractor` settings (`preprocessor_config.json`) for these,
    /// saying whether the model takes an attention mask (transformers' convention: models with
    /// layer norm in their convs do, group-norm ones do not).
    pub fn config_json(&self, return_attention_mask: bool) -> serde_json::Value {
        serde_json::json!({
            "feature_extractor_type": "Wav2Vec2FeatureExtractor",
            "feature_size": 1,
            "sampling_rate": 16000,
            "padding_value": 0.0,
            "padding_side": "right",
            "do_normalize": self.do_normalize,
            "return_attention_mask": return_attention_mask,
        })
    }

    /// Applies the feature extractor to one utterance: `(x - mean) / sqrt(var + 1e-7)` over its
    /// own samples when `do_normalize` is set, as transformers does.
    pub fn apply(&self, mut audio: Vec<f32>) -> Vec<f32> {
        if self.do_normalize && !audio.is_empty() {
            let n = audio.len() as f64;
            let mean = audio.iter().map(|&x| x as f64).sum::<f64>() / n;
            let var = audio.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
            let inv = 1.0 / (var + 1e-7).sqrt();
            audio.iter_mut().for_each(|x| *x = ((*x as f64 - mean) * inv) as f32);
        }
        audio
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalised_audio_has_zero_mean_unit_variance() {
        let x: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.1).sin() * 0.3 + 0.05).collect();
        let y = Preprocessor { do_normalize: true }.apply(x);
        let mean = y.iter().sum::<f32>() / y.len() as f32;
        let var = y.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / y.len() as f32;
        assert!(mean.abs() < 1e-5 && (var - 1.0).abs() < 1e-4, "mean {mean} var {var}");
    }
}
