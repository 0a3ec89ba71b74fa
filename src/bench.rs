//! `engine bench`: forward-pass timing at real model sizes with generated weights.

use std::time::Instant;

use anyhow::Result;

use crate::backend::Backend;
use crate::model::checkpoint::RandomWeights;
use crate::model::config::Config;
use crate::model::{Trace, Wav2Vec2};

pub struct ForwardBench {
    pub preset: String,
    pub batch: usize,
    pub seconds: f64,
    /// Wall time of each timed repetition, seconds.
    pub times: Vec<f64>,
    /// Seconds per stage of one extra, profiled pass (each stage waited for), when asked.
    pub stages: Vec<(&'static str, f64)>,
}

impl ForwardBench {
    pub fn median(&self) -> f64 {
        let mut t = self.times.clone();
        t.sort_by(f64::total_cmp);
        t[t.len() / 2]
    }

    /// Seconds of audio processed per second of compute, at the median.
    pub fn realtime_factor(&self) -> f64 {
        self.batch as f64 * self.seconds / self.median()
    }
}

/// Times `reps` forward passes (after one warm-up) of `batch` clips of `seconds` each, through the
/// CTC head, on a model of the named preset with random weights.
pub fn forward(be: &dyn Backend, preset: &str, batch: usize, seconds: f64, reps: usize, profile: bool) -> Result<ForwardBench> {
    let model = Wav2Vec2::from_weights(Config::preset(preset)?, &RandomWeights { seed: 0 }, be)?;
    let n = (seconds * 16_000.0).round() as usize;
    let clips: Vec<Vec<f32>> = (0..batch)
        .map(|b| (0..n).map(|i| ((i as f32 * 0.031 * (b + 1) as f32).sin() + ((i * 7919 % 1000) as f32 / 1000.0 - 0.5)) * 0.3).collect())
        .collect();
    let inputs: Vec<&[f32]> = clips.iter().map(Vec::as_slice).collect();
    let run = |trace: Option<&mut Trace>| -> Result<f64> {
        let t = Instant::now();
        let (logits, _) = model.logits(be, &inputs, trace)?;
        be.to_host(&logits)?;
        Ok(t.elapsed().as_secs_f64())
    };
    run(None)?;
    let times = (0..reps.max(1)).map(|_| run(None)).collect::<Result<Vec<_>>>()?;
    let mut trace = Trace::profile();
    if profile {
        run(Some(&mut trace))?;
    }
    Ok(ForwardBench { preset: preset.into(), batch, seconds, times, stages: trace.stages })
}
