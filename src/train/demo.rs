//! `engine train` with no arguments: S3-Router on the embedded default. The demo backbone in
//! `weights/` (a small wav2vec2 trained on English espeak-ng phonemes, standing in for a
//! pretrained model) is adapted to Spanish phonemes twice, head only and with learned masks at
//! 10% sparsity, and the phoneme error rates and where the masks went are printed.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::parser::ValueSource;
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
/// alone reaches a PER near 8.5%, S3-Router near 5.8%). Recipe flags given on the command line
/// replace these (`engine train --steps 50` runs a shorter demo).
const DEMO_ARGS: &[(&str, Option<&str>)] = &[
    ("--labels", Some("phn")),
    ("--skip-unknown", None),
    ("--lr", Some("5e-3")),
    ("--steps", Some("300")),
    ("--max-tokens", Some("400000")),
    ("--valid-every", Some("100")),
    ("--mask-time-prob", Some("0.3")),
    ("--mask-channel-prob", Some("0")),
    ("--layerdrop", Some("0")),
    ("--sparsity", Some("0.1")),
    ("--best-metric", Some("uer")),
];

/// A recipe flag and its value (none for a switch), as given on a command line.
pub type Word = (String, Option<String>);

/// The recipe flags of `engine train` set on its command line (`m`: the subcommand's matches).
pub fn explicit_recipe_words(m: &clap::ArgMatches) -> Vec<Word> {
    let cmd = Recipe::augment_args(clap::Command::new("recipe"));
    cmd.get_arguments()
        .filter(|a| m.value_source(a.get_id().as_str()) == Some(ValueSource::CommandLine))
        .filter_map(|a| {
            let value = match a.get_action().takes_values() {
                true => Some(m.get_raw(a.get_id().as_str())?.next()?.to_string_lossy().into_owned()),
                false => None,
            };
            Some((format!("--{}", a.get_long()?), value))
        })
        .collect()
}

/// The command-line words of one demo run: `base`, then [`DEMO_ARGS`], each flag replaced by
/// `explicit`'s where it has one; the head-only run keeps sparsity 0 whatever was asked.
fn run_words(base: &[Word], explicit: &[Word], head_only: bool) -> Vec<String> {
    let mut words: Vec<Word> = base.to_vec();
    words.extend(DEMO_ARGS.iter().map(|(f, v)| (f.to_string(), v.map(str::to_string))));
    for (flag, value) in explicit {
        words.retain(|(f, _)| f != flag);
        words.push((flag.clone(), value.clone()));
    }
    if head_only {
        words.retain(|(f, _)| f != "--sparsity");
        words.push(("--sparsity".into(), Some("0".into())));
    }
    words.into_iter().flat_map(|(f, v)| std::iter::once(f).chain(v)).collect()
}

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
fn recipe(words: &[String]) -> Result<Recipe> {
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

/// Runs both trainings into `out/head-only` and `out/s3router` (replacing earlier demo runs),
/// with the recipe flags in `explicit` replacing the demo's.
pub fn run(out: &Path, opts: &RunOptions, explicit: &[Word]) -> Result<DemoReport> {
    opts.device.check()?;
    let (model, corpus) = (locate(BACKBONE), locate(CORPUS));
    anyhow::ensure!(
        model.join("model.safetensors").is_file() && corpus.join("train.tsv").is_file(),
        "the demo needs {BACKBONE}/ and {CORPUS}/ from the repository (run from its root)"
    );
    let path = |p: PathBuf| -> Result<Option<String>> { Ok(Some(p.to_str().context("non-UTF-8 path")?.to_string())) };
    let base: Vec<Word> = vec![
        ("--model".into(), path(model.clone())?),
        ("--train".into(), path(corpus.join("train.tsv"))?),
        ("--valid".into(), path(corpus.join("dev.tsv"))?),
    ];
    let mut per = Vec::new();
    for (i, name) in ["head-only", "s3router"].into_iter().enumerate() {
        let r = recipe(&run_words(&base, explicit, i == 0))?;
        let what = match r.sparsity() {
            0.0 => "the head only (sparsity 0)".to_string(),
            s => format!("S3-Router masks at sparsity {s}"),
        };
        if opts.progress {
            eprintln!("[{}/2] training {what} on Spanish phonemes ...", i + 1);
        }
        let dir = out.join(name);
        let run_opts = RunOptions { out: dir.clone(), resume: false, overwrite: true, ..*opts };
        let summary = train(&r, &run_opts)?;
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
        let base: Vec<Word> = vec![("--model".into(), Some("m".into())), ("--train".into(), Some("t".into()))];
        let r = recipe(&run_words(&base, &[], false)).unwrap();
        assert_eq!((r.sparsity(), r.init_lr_scale, r.labels, r.steps), (0.1, 0.01, crate::data::dataset::LabelKind::Phn, 300));
        assert_eq!(recipe(&run_words(&base, &[], true)).unwrap().sparsity(), 0.0);
        assert!(recipe(&["--no-such-flag".to_string()]).is_err());
    }

    /// Flags typed after `engine train` reach both demo runs in place of the demo's own, except
    /// that the head-only run stays at sparsity 0.
    #[test]
    fn command_line_recipe_flags_replace_the_demos() {
        let cli = Recipe::augment_args(clap::Command::new("train").no_binary_name(true));
        let m = cli.try_get_matches_from(["--steps", "7", "--sparsity", "0.3", "--keep-head", "--seed", "4"]).unwrap();
        let explicit = explicit_recipe_words(&m);
        assert_eq!(explicit.len(), 4, "{explicit:?}");
        let base: Vec<Word> = vec![("--model".into(), Some("m".into())), ("--train".into(), Some("t".into()))];
        let (head, masks) = (recipe(&run_words(&base, &explicit, true)).unwrap(), recipe(&run_words(&base, &explicit, false)).unwrap());
        assert_eq!((head.steps, head.seed, head.keep_head, head.sparsity()), (7, 4, true, 0.0));
        assert_eq!((masks.steps, masks.seed, masks.keep_head, masks.sparsity()), (7, 4, true, 0.3));
        assert_eq!(masks.lr, 5e-3, "flags not given keep the demo's values");
        assert!(explicit_recipe_words(&Recipe::augment_args(clap::Command::new("t")).get_matches_from(["t"])).is_empty());
    }
}
