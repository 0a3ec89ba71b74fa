//! `engine train` with no arguments: S3-Router on the embedded default. The demo backbone in
//! `weights/` (a small wav2vec2 trained on English espeak-ng phonemes, standing in for a
//! pretrained model) is adapted to Spanish phonemes twice, head only and with learned masks at
//! 10% sparsity, and the phoneme error rates and where the masks went are printed.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, FromArgMatches};

use super::run::{train, Recipe, RunOptions};
use crate::analysis::{mask_stats, MatrixStats};
use crate::model::masks::MaskSet;

/// The backbone and the corpus, relative to the repository root.
pub const BACKBONE: &str = "weights/s3r-demo-en";
pub const CORPUS: &str = "weights/demo-corpus/es";

/// The demo's recipe beyond the defaults: a small model on ten minutes of audio needs a higher
/// learning rate, fewer updates and lighter regularisation than the paper's wav2vec2-base recipe
/// (measured on 2 cores: 300 updates of each run take about 75 s; with these settings the head
/// alone reaches a PER near 8.5%, S3-Router near 5.8%).
const DEMO_ARGS: &[&str] = &[
    "--labels",
    "phn",
    "--skip-unknown",
    "--lr",
    "5e-3",
    "--steps",
    "300",
    "--max-tokens",
    "400000",
    "--valid-every",
    "100",
    "--mask-time-prob",
    "0.3",
    "--mask-channel-prob",
    "0",
    "--layerdrop",
    "0",
];

/// `rel` under the working directory, else under the source tree this binary was built from
/// (so `cargo run` and an installed binary both find the committed files).
pub fn locate(rel: &str) -> PathBuf {
    let here = PathBuf::from(rel);
    if here.exists() {
        return here;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// A recipe from command-line words, defaults filled in by clap exactly as for `engine train`.
fn recipe(words: &[&str]) -> Result<Recipe> {
    let cmd = Recipe::augment_args(clap::Command::new("demo").no_binary_name(true));
    let m = cmd.try_get_matches_from(words).context("the demo recipe does not parse")?;
    Ok(Recipe::from_arg_matches(&m)?)
}

/// What the demo measured.
pub struct DemoReport {
    pub head_only_per: f64,
    pub s3router_per: f64,
    pub stats: Vec<MatrixStats>,
}

/// Runs both trainings into `out/head-only` and `out/s3router` (replacing earlier demo runs).
pub fn run(out: &Path, opts: &RunOptions) -> Result<DemoReport> {
    opts.device.check()?;
    let (model, corpus) = (locate(BACKBONE), locate(CORPUS));
    anyhow::ensure!(
        model.join("model.safetensors").is_file() && corpus.join("train.tsv").is_file(),
        "the demo needs {BACKBONE}/ and {CORPUS}/ from the repository (run from its root)"
    );
    let (train_tsv, dev_tsv) = (corpus.join("train.tsv"), corpus.join("dev.tsv"));
    let base = [
        "--model",
        model.to_str().context("non-UTF-8 path")?,
        "--train",
        train_tsv.to_str().context("non-UTF-8 path")?,
        "--valid",
        dev_tsv.to_str().context("non-UTF-8 path")?,
    ];
    let mut per = Vec::new();
    for (i, (name, sparsity)) in [("head-only", "0"), ("s3router", "0.1")].into_iter().enumerate() {
        let words: Vec<&str> = base.iter().chain(DEMO_ARGS).copied().chain(["--sparsity", sparsity, "--best-metric", "uer"]).collect();
        let what =
            if sparsity == "0" { "the head only (sparsity 0)".to_string() } else { format!("S3-Router masks at sparsity {sparsity}") };
        if opts.progress {
            eprintln!("[{}/2] training {what} on Spanish phonemes ...", i + 1);
        }
        let dir = out.join(name);
        let run_opts = RunOptions { out: dir.clone(), resume: false, overwrite: true, ..*opts };
        let summary = train(&recipe(&words)?, &run_opts)?;
        per.push(summary.best.map(|(_, v)| v).context("the demo validates")?);
    }
    let set = MaskSet::load(&out.join("s3router").join("best"))?;
    Ok(DemoReport { head_only_per: per[0], s3router_per: per[1], stats: mask_stats(&model, &set, None)? })
}

impl DemoReport {
    /// The summary printed at the end: error rates, then per layer the share of FFN weights
    /// whose mask flipped from the magnitude mask it started at.
    pub fn text(&self) -> String {
        let mut t = format!(
            "Spanish phoneme error rate (dev, greedy): head only {:.1}% -> S3-Router {:.1}% ({:+.1} points)\n",
            100.0 * self.head_only_per,
            100.0 * self.s3router_per,
            100.0 * (self.s3router_per - self.head_only_per)
        );
        t += "where the masks went: share of each FFN matrix flipped from its starting magnitude mask\n";
        t += "layer  intermediate_dense  output_dense\n";
        let layers = self.stats.iter().filter_map(|s| s.layer).max().map_or(0, |l| l + 1);
        for l in 0..layers {
            let cell = |part: &str| {
                self.stats
                    .iter()
                    .find(|s| s.layer == Some(l) && s.name.contains(part))
                    .map_or("-".to_string(), |s| format!("{:.2}%", 100.0 * s.flipped_fraction()))
            };
            t += &format!("{l:>5}  {:>18}  {:>12}\n", cell("intermediate_dense"), cell("output_dense"));
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_recipe_parses_with_the_defaults_filled_in() {
        let words: Vec<&str> = ["--model", "m", "--train", "t"].iter().chain(DEMO_ARGS).copied().collect();
        let r = recipe(&words).unwrap();
        assert_eq!((r.sparsity(), r.init_lr_scale, r.labels), (0.1, 0.01, crate::data::dataset::LabelKind::Phn));
        assert!(recipe(&["--no-such-flag"]).is_err());
    }
}
