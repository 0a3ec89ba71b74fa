//! `engine infer --masks NAME=DIR ... FILE@NAME ...`: one frozen model serving several tasks,
//! each a mask set with its own head and vocabulary (see [`crate::model::tasks`]). Utterances of
//! different tasks share batches: within a batch they are grouped by task, the masked linears run
//! per group, and each group's frames go through its task's head.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};

use crate::backend::{Activation, Backend};
use crate::infer::{decoded_batches, transcribe, BatchLimits, Decoding, Stitcher, Utterance};
use crate::model::checkpoint::Checkpoint;
use crate::model::masks::MaskSet;
use crate::model::preprocess::Preprocessor;
use crate::model::tasks::{Routing, TaskMasks};
use crate::model::vocab::Vocab;
use crate::model::wav2vec2::Linear;
use crate::model::Wav2Vec2;
use crate::tensor::Tensor;

/// One task: its masks, head and vocabulary.
pub struct Task {
    pub name: String,
    pub masks: TaskMasks,
    pub head: Linear,
    pub vocab: Vocab,
    /// Bytes of the head's weights.
    pub head_bytes: usize,
}

/// What serving the tasks from one model costs next to one finetuned copy per task.
#[derive(Debug, Clone, Copy)]
pub struct Memory {
    /// The frozen model's checkpoint.
    pub model_bytes: u64,
    /// All tasks' packed masks and heads.
    pub task_bytes: u64,
    pub tasks: usize,
}

impl Memory {
    pub fn shared(&self) -> u64 {
        self.model_bytes + self.task_bytes
    }

    /// N finetuned copies of the model.
    pub fn copies(&self) -> u64 {
        self.model_bytes * self.tasks as u64
    }
}

pub struct MultiRecognizer<'a> {
    pub model: Wav2Vec2,
    pub pre: Preprocessor,
    pub tasks: Vec<Task>,
    pub backend: &'a dyn Backend,
    /// Greedy decoding of whole files without times unless set otherwise after
    /// [`MultiRecognizer::load`].
    pub decoding: Decoding,
    model_bytes: u64,
}

/// Splits `FILE@NAME` into the file and the index of task `NAME`; refuses a missing or unknown name.
pub fn parse_routed(arg: &Path, tasks: &[String]) -> Result<(PathBuf, usize)> {
    let text = arg.to_str().with_context(|| format!("{}: not UTF-8", arg.display()))?;
    let Some((file, name)) = text.rsplit_once('@') else {
        bail!("{text}: with several --masks NAME=DIR, name each file's task as FILE@NAME (tasks: {})", tasks.join(", "))
    };
    let task = tasks
        .iter()
        .position(|t| t == name)
        .with_context(|| format!("{text}: no --masks {name}=DIR was given (tasks: {})", tasks.join(", ")))?;
    Ok((PathBuf::from(file), task))
}

/// Splits `NAME=DIR`.
pub fn parse_task(arg: &str) -> Result<(String, PathBuf)> {
    let (name, dir) = arg.split_once('=').with_context(|| format!("--masks {arg}: expected NAME=DIR with several tasks"))?;
    ensure!(!name.is_empty() && !name.contains('@'), "--masks {arg}: a task name must be non-empty and without '@'");
    Ok((name.to_string(), PathBuf::from(dir)))
}

impl<'a> MultiRecognizer<'a> {
    /// Loads the model in `dir` once and every task `(name, mask folder)` over it.
    pub fn load(dir: &Path, tasks: &[(String, PathBuf)], backend: &'a dyn Backend) -> Result<MultiRecognizer<'a>> {
        let model = Wav2Vec2::load(dir, backend)?;
        // The frozen weights as stored, for each task's base fingerprint (mapped, read once each).
        let ck = Checkpoint::open_dir(dir)?;
        let model_bytes = weights_bytes(dir)?;
        let mut loaded = Vec::new();
        for (name, mask_dir) in tasks {
            ensure!(loaded.iter().all(|t: &Task| &t.name != name), "--masks {name}= is given twice");
            let set = MaskSet::load(mask_dir).with_context(|| format!("task {name}"))?;
            set.check_language(None).with_context(|| format!("task {name}: several tasks share the default adapters (run it alone)"))?;
            let masks = TaskMasks::prepare(&set, &model, backend).with_context(|| format!("task {name}"))?;
            set.check_base(&ck, dir).with_context(|| format!("task {name}"))?;
            let (head, vocab, head_bytes) = match &set.head {
                Some((w, b)) => {
                    // The blank as the single-mask path has it: the head's, else the model's pad token.
                    let blank = set.blank.unwrap_or(model.config.pad_token_id);
                    let vocab_path =
                        set.vocab_path().with_context(|| format!("task {name}: {} has a head but no vocab.json", mask_dir.display()))?;
                    ensure!(blank < b.numel(), "task {name}: the head has {} outputs but its blank is {blank}", b.numel());
                    let vocab = Vocab::load(&vocab_path, b.numel(), blank).with_context(|| format!("task {name}"))?;
                    let head = Linear::prepared(backend.prepare_linear_weight(w)?, backend.upload(b)?);
                    (head, vocab, (w.numel() + b.numel()) * 4)
                }
                None => bail!("task {name}: {} has no head.safetensors (a mask set from `engine train` carries one)", mask_dir.display()),
            };
            loaded.push(Task { name: name.clone(), masks, head, vocab, head_bytes });
        }
        Ok(MultiRecognizer { model, pre: Preprocessor::load(dir)?, tasks: loaded, backend, decoding: Decoding::default(), model_bytes })
    }

    pub fn memory(&self) -> Memory {
        let task_bytes = self.tasks.iter().map(|t| (t.masks.bytes + t.head_bytes) as u64).sum();
        Memory { model_bytes: self.model_bytes, task_bytes, tasks: self.tasks.len() }
    }

    /// Recognises `paths[i]` under task `task_of[i]`, in batches within `limits`; `each` gets
    /// the utterances of each batch in input order.
    pub fn run(
        &self,
        paths: &[PathBuf],
        task_of: &[usize],
        limits: BatchLimits,
        mut each: impl FnMut(Utterance) -> Result<()>,
    ) -> Result<()> {
        let mut stitcher = Stitcher::default();
        let config = &self.model.config;
        for batch in decoded_batches(paths.to_vec(), self.pre, config, self.decoding.chunking, limits) {
            let mut batch = batch?;
            // Pieces of a task side by side (a file's windows stay in order: the sort is stable):
            // one segment per task in every masked linear.
            batch.sort_by_key(|p| task_of[p.index]);
            let inputs: Vec<&[f32]> = batch.iter().map(|p| p.samples.as_slice()).collect();
            let routing = Routing { tasks: batch.iter().map(|p| &self.tasks[task_of[p.index]].masks).collect() };
            let (hidden, seqs) = self.model.encode_routed(self.backend, &inputs, None, Some(&routing))?;
            let hidden = self.backend.to_host(&hidden)?.to_vec()?;
            let h = self.model.config.hidden_size;
            let mut results = Vec::with_capacity(batch.len());
            // Each task's pieces are consecutive frames: one pass through its head.
            let mut first = 0;
            for group in batch.chunk_by(|a, b| task_of[a.index] == task_of[b.index]) {
                let task = &self.tasks[task_of[group[0].index]];
                let rows = seqs.range(first).start..seqs.range(first + group.len() - 1).end;
                let x = self.backend.upload(&Tensor::from_vec(hidden[rows.start * h..rows.end * h].to_vec(), &[rows.len(), h]))?;
                let logits = self.backend.linear(&x, &task.head.weight, Some(&task.head.bias), Activation::Identity)?;
                let logits = self.backend.to_host(&logits)?.to_vec()?;
                let v = task.vocab.len();
                let mut done = Vec::new();
                for (u, piece) in (first..).zip(group) {
                    let r = seqs.range(u);
                    let own = &logits[(r.start - rows.start) * v..(r.end - rows.start) * v];
                    if let Some(file) = stitcher.add(piece.index, &piece.window, own, v)? {
                        done.push((piece.index, file));
                    }
                }
                results.extend(transcribe(done, paths, &task.vocab, self.decoding, config));
                first += group.len();
            }
            results.sort_by_key(|u| u.index);
            results.into_iter().try_for_each(&mut each)?;
        }
        Ok(())
    }
}

/// Bytes of a model folder's weight files (what each finetuned copy would hold).
fn weights_bytes(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().ends_with(".safetensors") {
            total += entry.metadata()?.len();
        }
    }
    Ok(total)
}
