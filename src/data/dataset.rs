//! Speech datasets in the layouts users have: fairseq manifests, LibriSpeech / Libri-light
//! folders, CommonVoice language folders and NeMo-style JSON lines. Every reader yields the same
//! list of utterances (audio path, optional length, transcript) and checks, before any long work
//! starts, that every referenced audio file exists.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};

/// One utterance of a dataset.
#[derive(Clone, Debug, PartialEq)]
pub struct Utterance {
    pub id: String,
    pub audio: PathBuf,
    /// Length in 16 kHz samples when the layout records it (fairseq, JSON lines).
    pub samples: Option<usize>,
    /// The transcript as the label source writes it (see [`LabelKind`]).
    pub text: String,
}

/// What a transcript is made of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LabelKind {
    /// fairseq `.ltr`: space-separated letters with `|` between words.
    Ltr,
    /// Words (fairseq `.wrd`, LibriSpeech, CommonVoice, JSON lines).
    Wrd,
    /// Space-separated units such as phonemes (fairseq `.phn`), `|` between words if present.
    Phn,
}

/// Dataset layouts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Fairseq,
    Librispeech,
    Commonvoice,
    Jsonl,
}

/// Libri-light limited-supervision subsets (`librispeech_finetuning/`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum Subset {
    /// `1h/0`
    #[value(name = "10min")]
    #[serde(rename = "10min")]
    TenMin,
    /// `1h/*`
    #[value(name = "1h")]
    #[serde(rename = "1h")]
    OneHour,
    /// `1h/*` and `9h`
    #[value(name = "10h")]
    #[serde(rename = "10h")]
    TenHours,
}

#[derive(Clone, Debug)]
pub struct DatasetOptions {
    /// Force a layout instead of detecting it from the path.
    pub format: Option<Format>,
    /// fairseq label file to read next to the manifest.
    pub labels: LabelKind,
    pub subset: Option<Subset>,
    /// CommonVoice split (`train`, `dev`, `test`, ...).
    pub split: String,
    /// Keep only utterances at least this long (seconds).
    pub min_duration: Option<f64>,
    /// Keep only utterances at most this long (seconds).
    pub max_duration: Option<f64>,
}

impl Default for DatasetOptions {
    fn default() -> Self {
        DatasetOptions { format: None, labels: LabelKind::Ltr, subset: None, split: "test".into(), min_duration: None, max_duration: None }
    }
}

pub struct Dataset {
    pub utterances: Vec<Utterance>,
    /// How the transcripts are written.
    pub labels: LabelKind,
}

/// Reads the dataset at `path`, detecting its layout unless `opts.format` says.
pub fn open(path: &Path, opts: &DatasetOptions) -> Result<Dataset> {
    ensure!(path.exists(), "dataset {} does not exist", path.display());
    let format = match opts.format {
        Some(f) => f,
        None => detect(path)?,
    };
    let (utterances, labels) = match format {
        Format::Fairseq => (fairseq(path, opts.labels)?, opts.labels),
        Format::Librispeech => (librispeech(path, opts.subset)?, LabelKind::Wrd),
        Format::Commonvoice => (commonvoice(path, &opts.split)?, LabelKind::Wrd),
        Format::Jsonl => (jsonl(path)?, LabelKind::Wrd),
    };
    check_audio_exists(&utterances)?;
    check_audio_readable(&utterances)?;
    ensure!(!utterances.is_empty(), "dataset {} holds no utterances", path.display());
    let before = utterances.len();
    let utterances = filter_durations(utterances, opts)?;
    ensure!(
        !utterances.is_empty(),
        "dataset {}: none of its {before} utterances is within the duration limits ({:?} s .. {:?} s)",
        path.display(),
        opts.min_duration,
        opts.max_duration
    );
    Ok(Dataset { utterances, labels })
}

fn detect(path: &Path) -> Result<Format> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    if path.is_file() {
        return match ext {
            "tsv" => Ok(Format::Fairseq),
            "jsonl" | "json" => Ok(Format::Jsonl),
            _ => bail!("{}: cannot tell the dataset layout from the extension (use --format)", path.display()),
        };
    }
    if path.join("clips").is_dir() {
        return Ok(Format::Commonvoice);
    }
    if walk(path)?.iter().any(|p| p.to_string_lossy().ends_with(".trans.txt")) {
        return Ok(Format::Librispeech);
    }
    bail!("{}: not a fairseq .tsv, a .jsonl, a LibriSpeech-style folder (*.trans.txt) or a CommonVoice folder (clips/)", path.display())
}

/// Every file below `dir`, sorted (deterministic order across machines).
fn walk(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("cannot list {}", d.display()))? {
            let p = entry?.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

/// fairseq: `NAME.tsv` (root dir, then `relpath<TAB>num_samples`) with `NAME.<labels>` beside it.
/// A manifest's root line. Relative roots are relative to the working directory (fairseq's
/// rule); when that folder does not exist but the manifest's own folder ends with the root (a
/// corpus committed with a repository-relative root, read from elsewhere), the manifest's
/// folder is the root.
fn manifest_root(tsv: &Path, line: &str) -> PathBuf {
    let root = PathBuf::from(line);
    if root.is_absolute() || root.is_dir() {
        return root;
    }
    match std::path::absolute(tsv).ok().and_then(|t| t.parent().map(Path::to_path_buf)) {
        Some(dir) if dir.ends_with(&root) => dir,
        _ => root,
    }
}

fn fairseq(tsv: &Path, labels: LabelKind) -> Result<Vec<Utterance>> {
    let text = read(tsv)?;
    let mut lines = text.lines();
    let root = manifest_root(tsv, lines.next().with_context(|| format!("{}: empty manifest", tsv.display()))?.trim());
    let ext = match labels {
        LabelKind::Ltr => "ltr",
        LabelKind::Wrd => "wrd",
        LabelKind::Phn => "phn",
    };
    let label_path = tsv.with_extension(ext);
    let label_text = read(&label_path)?;
    let label_lines: Vec<&str> = label_text.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.filter(|l| !l.trim().is_empty()).enumerate() {
        let (rel, n) =
            line.split_once('\t').with_context(|| format!("{} line {}: expected `path<TAB>num_samples`", tsv.display(), i + 2))?;
        let samples = n.trim().parse().with_context(|| format!("{} line {}: num_samples {n:?} is not a number", tsv.display(), i + 2))?;
        out.push(Utterance { id: rel.to_string(), audio: root.join(rel), samples: Some(samples), text: String::new() });
    }
    ensure!(
        label_lines.len() == out.len(),
        "{} has {} lines but {} lists {} utterances",
        label_path.display(),
        label_lines.len(),
        tsv.display(),
        out.len()
    );
    for (u, l) in out.iter_mut().zip(label_lines) {
        u.text = l.trim().to_string();
    }
    Ok(out)
}

/// LibriSpeech: `<spk>-<chap>.trans.txt` files of `ID TRANSCRIPT` lines beside `ID.flac`.
/// Under Libri-light's `librispeech_finetuning/`, `subset` picks 10min (1h/0), 1h (1h/*) or 10h
/// (1h/* and 9h).
fn librispeech(root: &Path, subset: Option<Subset>) -> Result<Vec<Utterance>> {
    let dirs: Vec<PathBuf> = match subset {
        None => vec![root.to_path_buf()],
        Some(Subset::TenMin) => vec![root.join("1h/0")],
        Some(Subset::OneHour) => vec![root.join("1h")],
        Some(Subset::TenHours) => vec![root.join("1h"), root.join("9h")],
    };
    let mut out = Vec::new();
    for dir in dirs {
        ensure!(dir.is_dir(), "{}: expected the Libri-light folder {}", root.display(), dir.display());
        for trans in walk(&dir)?.into_iter().filter(|p| p.to_string_lossy().ends_with(".trans.txt")) {
            for (i, line) in read(&trans)?.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                let (id, text) =
                    line.split_once(' ').with_context(|| format!("{} line {}: expected `ID TRANSCRIPT`", trans.display(), i + 1))?;
                let audio = trans.with_file_name(format!("{id}.flac"));
                out.push(Utterance { id: id.to_string(), audio, samples: None, text: text.trim().to_string() });
            }
        }
    }
    Ok(out)
}

/// CommonVoice: `<split>.tsv` with a header naming the `path` and `sentence` columns (in any
/// order), audio in `clips/`.
fn commonvoice(root: &Path, split: &str) -> Result<Vec<Utterance>> {
    let tsv = root.join(format!("{split}.tsv"));
    let text = read(&tsv)?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().with_context(|| format!("{}: empty", tsv.display()))?.split('\t').collect();
    let col =
        |name: &str| header.iter().position(|h| *h == name).with_context(|| format!("{}: no {name:?} column in the header", tsv.display()));
    let (path_col, sentence_col) = (col("path")?, col("sentence")?);
    let mut out = Vec::new();
    for (i, line) in lines.enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let fields: Vec<&str> = line.split('\t').collect();
        ensure!(fields.len() > path_col.max(sentence_col), "{} line {}: too few columns", tsv.display(), i + 2);
        let rel = fields[path_col];
        out.push(Utterance {
            id: rel.to_string(),
            audio: root.join("clips").join(rel),
            samples: None,
            text: fields[sentence_col].trim().to_string(),
        });
    }
    Ok(out)
}

/// JSON lines as NeMo writes them: `{"audio_filepath", "text", "duration"}`; relative audio
/// paths are relative to the manifest's folder.
fn jsonl(path: &Path) -> Result<Vec<Utterance>> {
    let base = path.parent().unwrap_or(Path::new("."));
    let mut out = Vec::new();
    for (i, line) in read(path)?.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let at = || format!("{} line {}", path.display(), i + 1);
        let v: serde_json::Value = serde_json::from_str(line).with_context(|| format!("{}: not valid JSON", at()))?;
        let audio = v["audio_filepath"].as_str().with_context(|| format!("{}: missing \"audio_filepath\"", at()))?;
        let text = v["text"].as_str().with_context(|| format!("{}: missing \"text\"", at()))?;
        let samples = v["duration"].as_f64().map(|d| (d * 16_000.0).round() as usize);
        out.push(Utterance { id: audio.to_string(), audio: base.join(audio), samples, text: text.trim().to_string() });
    }
    Ok(out)
}

/// Drops utterances outside `[min_duration, max_duration]`, reading lengths from audio headers
/// where the layout does not record them.
fn filter_durations(utts: Vec<Utterance>, opts: &DatasetOptions) -> Result<Vec<Utterance>> {
    if opts.min_duration.is_none() && opts.max_duration.is_none() {
        return Ok(utts);
    }
    let (lo, hi) = (opts.min_duration.unwrap_or(0.0), opts.max_duration.unwrap_or(f64::INFINITY));
    let mut kept = Vec::with_capacity(utts.len());
    for mut u in utts {
        let samples = match u.samples {
            Some(n) => n,
            None => crate::data::audio::duration_samples(&u.audio)?,
        };
        u.samples = Some(samples);
        let secs = samples as f64 / 16_000.0;
        if secs >= lo && secs <= hi {
            kept.push(u);
        }
    }
    Ok(kept)
}

/// Fails naming the problem files: all of them in the message when there are at most ten,
/// otherwise the first ten and a file listing every one.
fn report(problems: Vec<String>, total: usize, what: &str) -> Result<()> {
    if problems.is_empty() {
        return Ok(());
    }
    let mut more = String::new();
    if problems.len() > 10 {
        let list = std::env::temp_dir().join(format!("s3router-{}-{}.txt", what.replace(' ', "-"), std::process::id()));
        let written = crate::fsio::atomic_write(&list, |f| std::io::Write::write_all(f, (problems.join("\n") + "\n").as_bytes()));
        more = match written {
            Ok(()) => format!(" and {} more (all listed in {})", problems.len() - 10, list.display()),
            Err(_) => format!(" and {} more", problems.len() - 10),
        };
    }
    bail!("{} of {total} audio files {what}: {}{more}", problems.len(), problems[..problems.len().min(10)].join("; "))
}

/// Fails listing every missing audio file.
fn check_audio_exists(utts: &[Utterance]) -> Result<()> {
    report(utts.iter().filter(|u| !u.audio.is_file()).map(|u| u.audio.display().to_string()).collect(), utts.len(), "are missing")
}

/// Fails listing every file whose header is not readable audio (checked in parallel, no decoding).
fn check_audio_readable(utts: &[Utterance]) -> Result<()> {
    use rayon::prelude::*;
    let bad: Vec<String> = utts.par_iter().filter_map(|u| crate::data::audio::probe(&u.audio).err().map(|e| e.to_string())).collect();
    report(bad, utts.len(), "are not readable audio")
}
