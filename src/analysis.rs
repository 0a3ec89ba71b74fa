//! Mask analysis: how a learned mask set relates to the weights it covers.

use std::path::Path;

use anyhow::{Context, Result};
use rayon::prelude::*;

use crate::mask;
use crate::model::checkpoint::Checkpoint;
use crate::model::masks::MaskSet;
use crate::router::keep_largest;

/// One masked matrix against its weights.
#[derive(Clone, Debug)]
pub struct MatrixStats {
    pub name: String,
    /// Encoder layer index, read from the name.
    pub layer: Option<usize>,
    pub numel: usize,
    pub kept: usize,
    /// Weights whose keep bit differs from the magnitude mask with the same kept count (the
    /// mask S3-Router's default `weight-rank` initialisation starts from).
    pub flipped: usize,
}

impl MatrixStats {
    pub fn sparsity(&self) -> f64 {
        1.0 - self.kept as f64 / self.numel as f64
    }

    /// Fraction of the matrix's weights flipped from the magnitude mask.
    pub fn flipped_fraction(&self) -> f64 {
        self.flipped as f64 / self.numel as f64
    }
}

/// Statistics of every mask of `set` against the weights in model folder `model`.
pub fn mask_stats(model: &Path, set: &MaskSet) -> Result<Vec<MatrixStats>> {
    let ck = Checkpoint::open_dir(model)?;
    set.masks
        .par_iter()
        .map(|(name, (shape, bits))| {
            let w = ck
                .tensor(name)
                .with_context(|| format!("{}: mask \"{name}\" names no weight of {}", set.dir.display(), model.display()))?;
            anyhow::ensure!(
                w.shape() == shape.as_slice(),
                "{}: mask \"{name}\" is for {shape:?}, the weight is {:?}",
                set.dir.display(),
                w.shape()
            );
            let numel = w.numel();
            let keep = mask::unpack(bits, numel);
            let kept = keep.iter().filter(|&&k| k).count();
            let magnitude = keep_largest(&w.to_vec()?, kept);
            let flipped = keep.iter().zip(&magnitude).filter(|(a, b)| a != b).count();
            let layer = name.strip_prefix("wav2vec2.encoder.layers.").and_then(|r| r.split('.').next()).and_then(|l| l.parse().ok());
            Ok(MatrixStats { name: name.clone(), layer, numel, kept, flipped })
        })
        .collect()
}
