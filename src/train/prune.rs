//! Magnitude-pruning baselines run as weight finetuning with a mask (`engine prune`): OMP keeps
//! the global magnitude mask of a finetuned model fixed while the rewound pretrained weights
//! finetune; PARP zeroes the pretrained model's smallest weights, finetunes with the zeros
//! trainable, and re-prunes globally every few updates and once at the end.
//!
//! Both prune the q/k/v/out and FFN weights of every encoder layer, ranked together across
//! layers (`torch.nn.utils.prune.global_unstructured` with L1 in the PARP code). Biases are not
//! pruned here: the mask format covers weights, and biases are 0.1% of those parameters.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;

use super::finetune::NamedWeight;
use super::masked::MaskScope;
use super::run::{train, Learn, Recipe, RunOptions, Summary};
use crate::backend::backward::TrainBackend;
use crate::model::checkpoint::{weight_files, Checkpoint, WeightSource};
use crate::model::config::Config;
use crate::model::masks::KeepFlags;
use crate::model::wav2vec2::maskable_shape;
use crate::router::global_magnitude_keep;
use crate::router::Init;
use crate::tensor::Tensor;

/// `engine prune --method`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Method {
    /// S3-Router-P: masks learned over a finetuned model's frozen weights (scores = W, all six
    /// linears, per-matrix top-k), its head retrained.
    #[value(name = "s3router-p")]
    S3RouterP,
    /// One-shot magnitude pruning: the finetuned model's global magnitude mask, rewound to the
    /// pretrained weights (--pretrained), finetuned with the mask fixed.
    Omp,
    /// Prune, adjust, re-prune: global magnitude pruning of the pretrained model, finetuned with
    /// the zeros trainable, re-pruned every --reprune-every updates and at the end.
    Parp,
}

/// What `engine prune` needs beyond the training recipe.
pub struct PruneArgs {
    pub method: Method,
    pub sparsity: f64,
    pub pretrained: Option<PathBuf>,
    pub reprune_every: usize,
    pub freeze_updates: usize,
}

/// Runs `engine prune`: the method's training run into `opts.out`, which ends holding the
/// masks (`s3router-masks-v1`, with head and vocabulary) and the model folder they apply to.
pub fn prune(mut recipe: Recipe, a: &PruneArgs, opts: &RunOptions) -> Result<Summary> {
    let model = recipe.model()?.to_path_buf();
    ensure!(recipe.sparsity.is_none(), "give the sparsity once, as engine prune's --sparsity");
    ensure!(a.pretrained.is_none() || a.method == Method::Omp, "--pretrained is for --method omp (the weights OMP rewinds to)");
    let finetuned = Checkpoint::open_dir(&model)?.contains("lm_head.weight");
    let need_finetuned = |what: &str| -> Result<()> {
        ensure!(
            finetuned,
            "--method {what} prunes a finetuned model, and {} has no CTC head (lm_head): it is a pretrained checkpoint; finetune it first with `engine finetune`",
            model.display()
        );
        Ok(())
    };
    match a.method {
        Method::S3RouterP => {
            need_finetuned("s3router-p")?;
            ensure!(a.freeze_updates == 0, "--freeze-updates is for omp and parp (s3router-p trains no weights)");
            recipe.learn = Learn::Masks;
            recipe.mask = MaskScope::All;
            recipe.init = Init::MagnitudeScaled;
            recipe.keep_head = true;
            recipe.sparsity = Some(a.sparsity);
            let summary = train(&recipe, opts)?;
            link_model(&model, &opts.out)?;
            return Ok(summary);
        }
        Method::Omp => {
            need_finetuned("omp")?;
            let Some(pretrained) = &a.pretrained else {
                bail!("--method omp needs --pretrained: the pretrained model {} was finetuned from (OMP rewinds to it)", model.display())
            };
            let shape = |dir: &Path| -> Result<[usize; 3]> {
                let c = Config::load(&dir.join("config.json"))?;
                Ok([c.num_hidden_layers, c.hidden_size, c.intermediate_size])
            };
            let (a_shape, b_shape) = (shape(&model)?, shape(pretrained)?);
            ensure!(
                a_shape == b_shape,
                "{} and --pretrained {} are a different architecture (layers, hidden, FFN sizes {a_shape:?} vs {b_shape:?})",
                model.display(),
                pretrained.display()
            );
            recipe.vocab = recipe.vocab.or_else(|| Some(model.join("vocab.json")));
            recipe.model = Some(pretrained.clone());
            recipe.learn = Learn::Weights {
                freeze_updates: a.freeze_updates,
                train_feature_encoder: false,
                prune: Some(Prune::Omp { sparsity: a.sparsity, from: model }),
            };
        }
        Method::Parp => {
            recipe.learn = Learn::Weights {
                freeze_updates: a.freeze_updates,
                train_feature_encoder: false,
                prune: Some(Prune::Parp { sparsity: a.sparsity, every: a.reprune_every }),
            };
        }
    }
    train(&recipe, opts)
}

/// Puts the model folder S3-Router-P's masks apply to beside them (hard links where the file
/// system allows, else copies).
fn link_model(model: &Path, out: &Path) -> Result<()> {
    let (weights, index) = weight_files(model)?;
    let sidecars = ["config.json", "preprocessor_config.json"].map(|f| model.join(f));
    for from in weights.into_iter().chain(index).chain(sidecars) {
        let to = out.join(from.file_name().expect("a file in the model folder"));
        if !from.exists() {
            continue;
        }
        if to.exists() {
            std::fs::remove_file(&to).with_context(|| format!("cannot replace {}", to.display()))?;
        }
        if std::fs::hard_link(&from, &to).is_err() {
            std::fs::copy(&from, &to).with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
        }
    }
    Ok(())
}

/// How a finetuning run prunes (recorded in `train_config.json`).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "method", rename_all = "kebab-case")]
pub enum Prune {
    /// The global magnitude mask of the finetuned model `from`, fixed while the weights train.
    Omp { sparsity: f64, from: PathBuf },
    /// The global magnitude mask of the weights being trained, re-picked every `every` updates
    /// (0: only at the end) and after the last.
    Parp { sparsity: f64, every: usize },
}

impl Prune {
    pub fn sparsity(&self) -> f64 {
        match self {
            Prune::Omp { sparsity, .. } | Prune::Parp { sparsity, .. } => *sparsity,
        }
    }
}

/// Keep flags per pruned weight, in [`Pruner::names`] order.
pub type Keep = Vec<Vec<bool>>;

/// The pruned weights of a run and, for OMP, their fixed mask.
pub struct Pruner {
    pub prune: Prune,
    /// Index into the run's trained weights of each pruned one.
    indices: Vec<usize>,
    /// OMP: the keep flags, and the same as 0/1 tensors on the training backend (for gradients).
    fixed: Option<(Keep, Vec<Tensor>)>,
}

/// Keep flags as a 0/1 tensor of `shape` on `be`.
fn keep_tensor(be: &dyn TrainBackend, keep: &[bool], shape: &[usize]) -> Result<Tensor> {
    be.upload(&Tensor::from_vec(keep.iter().map(|&k| k as u8 as f32).collect(), shape))
}

impl Pruner {
    /// The pruned weights among `weights` (the maskable ones of `config`); OMP's mask from its
    /// finetuned model, which must have the same weights.
    pub fn new(prune: Prune, config: &Config, weights: &[NamedWeight], be: &dyn TrainBackend) -> Result<Pruner> {
        let indices: Vec<usize> = (0..weights.len()).filter(|&i| maskable_shape(config, &weights[i].name).is_some()).collect();
        ensure!(!indices.is_empty(), "the model has no q/k/v/out or FFN weights to prune");
        let fixed = match &prune {
            Prune::Parp { .. } => None,
            Prune::Omp { sparsity, from } => {
                let ck = Checkpoint::open_dir(from).with_context(|| format!("OMP's finetuned model {}", from.display()))?;
                let tuned: Vec<Vec<f32>> = indices
                    .iter()
                    .map(|&i| {
                        let w = &weights[i];
                        let t = ck.tensor(&w.name).with_context(|| format!("OMP's finetuned model {}", from.display()))?;
                        ensure!(
                            t.shape() == w.shape.as_slice(),
                            "{}: \"{}\" is {:?} there but {:?} in the model being pruned (a different architecture)",
                            from.display(),
                            w.name,
                            t.shape(),
                            w.shape
                        );
                        t.to_vec()
                    })
                    .collect::<Result<_>>()?;
                let keep = global_magnitude_keep(&tuned.iter().map(Vec::as_slice).collect::<Vec<_>>(), *sparsity);
                let masks = indices.iter().zip(&keep).map(|(&i, k)| keep_tensor(be, k, &weights[i].shape)).collect::<Result<_>>()?;
                Some((keep, masks))
            }
        };
        Ok(Pruner { prune, indices, fixed })
    }

    /// The mask now: OMP's fixed one, or PARP's global magnitude mask of the current weights
    /// (brought to the host for the global ranking).
    pub fn keep(&self, be: &dyn TrainBackend, weights: &[NamedWeight]) -> Result<Keep> {
        if let Some((keep, _)) = &self.fixed {
            return Ok(keep.clone());
        }
        Ok(self.magnitude_keep(&self.host_pruned(be, weights)?))
    }

    /// The pruned weights on the host, in [`Pruner::keep`] order.
    fn host_pruned(&self, be: &dyn TrainBackend, weights: &[NamedWeight]) -> Result<Vec<Vec<f32>>> {
        self.indices.iter().map(|&i| be.to_host(&weights[i].data)?.into_f32_vec()).collect()
    }

    /// The global magnitude mask of `pruned` (host copies of the pruned weights).
    fn magnitude_keep(&self, pruned: &[Vec<f32>]) -> Keep {
        global_magnitude_keep(&pruned.iter().map(Vec::as_slice).collect::<Vec<_>>(), self.prune.sparsity())
    }

    /// PARP's re-prune: the global magnitude mask of the current weights, applied. Returns the
    /// number of non-zero weights it zeroed (the pruned weights come to the host once).
    pub fn reprune(&self, be: &dyn TrainBackend, weights: &mut [NamedWeight]) -> Result<usize> {
        let host = self.host_pruned(be, weights)?;
        let keep = self.magnitude_keep(&host);
        let zeroed = host.iter().zip(&keep).map(|(w, k)| w.iter().zip(k).filter(|&(&v, &k)| !k && v != 0.0).count()).sum();
        self.apply(be, weights, &keep)?;
        Ok(zeroed)
    }

    /// Zeroes the dropped weights.
    pub fn apply(&self, be: &dyn TrainBackend, weights: &mut [NamedWeight], keep: &Keep) -> Result<()> {
        for (&i, k) in self.indices.iter().zip(keep) {
            let w = &mut weights[i];
            let data = std::mem::replace(&mut w.data, Tensor::zeros(&[0]));
            w.data = be.mul(data, &keep_tensor(be, k, &w.shape)?)?;
        }
        Ok(())
    }

    /// OMP: zeroes the gradients of dropped weights, so they stay zero under Adam. `grads` are
    /// per trained weight, in order, on the training backend. PARP's zeros train.
    pub fn mask_grads(&self, be: &dyn TrainBackend, grads: &mut [Option<Tensor>]) -> Result<()> {
        let Some((_, masks)) = &self.fixed else { return Ok(()) };
        for (&i, m) in self.indices.iter().zip(masks) {
            if let Some(g) = grads[i].take() {
                grads[i] = Some(be.mul(g, m)?);
            }
        }
        Ok(())
    }

    /// Whether PARP re-prunes after update `update` of `steps`.
    pub fn reprunes_after(&self, update: usize, steps: usize) -> bool {
        match self.prune {
            Prune::Omp { .. } => false,
            Prune::Parp { every, .. } => update == steps || (every > 0 && update.is_multiple_of(every)),
        }
    }

    /// The mask as a mask set's entries (name, `[out, in]` shape, keep flags).
    pub fn mask_entries(&self, weights: &[NamedWeight], keep: Keep) -> Vec<KeepFlags> {
        self.indices.iter().zip(keep).map(|(&i, k)| (weights[i].name.clone(), weights[i].shape.clone(), k)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;

    fn parp(every: usize) -> Pruner {
        Pruner { prune: Prune::Parp { sparsity: 0.5, every }, indices: vec![0], fixed: None }
    }

    #[test]
    fn parp_reprunes_on_its_interval_and_after_the_last_update() {
        let after = |p: &Pruner| (1..=10).filter(|&u| p.reprunes_after(u, 10)).collect::<Vec<_>>();
        assert_eq!(after(&parp(3)), vec![3, 6, 9, 10]);
        assert_eq!(after(&parp(5)), vec![5, 10]);
        assert_eq!(after(&parp(0)), vec![10]);
        let omp =
            Pruner { prune: Prune::Omp { sparsity: 0.5, from: PathBuf::new() }, indices: vec![0], fixed: Some((vec![vec![true]], vec![])) };
        assert!(after(&omp).is_empty());
    }

    #[test]
    fn omp_gradients_of_dropped_weights_are_zeroed_and_parp_ones_kept() {
        let be = CpuBackend;
        let keep = vec![vec![true, false, true]];
        let masks = vec![keep_tensor(&be, &keep[0], &[3]).unwrap()];
        let omp = Pruner { prune: Prune::Omp { sparsity: 0.3, from: PathBuf::new() }, indices: vec![1], fixed: Some((keep, masks)) };
        let grads = || vec![Some(Tensor::from_vec(vec![1.0; 2], &[2])), Some(Tensor::from_vec(vec![1.0, 2.0, 3.0], &[3]))];
        let values = |g: &[Option<Tensor>]| g.iter().map(|t| t.as_ref().unwrap().to_vec().unwrap()).collect::<Vec<_>>();
        let mut g = grads();
        omp.mask_grads(&be, &mut g).unwrap();
        assert_eq!(values(&g), vec![vec![1.0; 2], vec![1.0, 0.0, 3.0]]);
        let mut g = grads();
        parp(1).mask_grads(&be, &mut g).unwrap();
        assert_eq!(values(&g)[1], vec![1.0, 2.0, 3.0]);
    }

    #[test]
    fn parp_keeps_the_global_largest_magnitudes_and_zeroes_the_rest() {
        let be = CpuBackend;
        let weight = |name: &str, v: Vec<f32>| NamedWeight {
            name: name.into(),
            shape: vec![v.len()],
            data: Tensor::from_vec(v.clone(), &[v.len()]),
        };
        let mut weights = vec![weight("a", vec![0.1, -3.0, 0.2]), weight("b", vec![2.0, -0.05, 1.0])];
        let p = Pruner { prune: Prune::Parp { sparsity: 0.5, every: 1 }, indices: vec![0, 1], fixed: None };
        let keep = p.keep(&be, &weights).unwrap();
        assert_eq!(keep, vec![vec![false, true, false], vec![true, false, true]]);
        assert_eq!(p.reprune(&be, &mut weights).unwrap(), 3, "every dropped weight was non-zero");
        assert_eq!(weights[0].data.to_vec().unwrap(), vec![0.0, -3.0, 0.0]);
        assert_eq!(weights[1].data.to_vec().unwrap(), vec![2.0, 0.0, 1.0]);
        assert_eq!(p.reprune(&be, &mut weights).unwrap(), 0, "a second re-prune zeroes nothing new");
    }
}
