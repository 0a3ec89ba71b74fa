//! Memory-mapped checkpoints: safetensors, or PyTorch's `pytorch_model.bin`
//! ([`crate::model::torch_bin`]), single files or sharded with an index.
//!
//! Tensors come back as views into the mapping, so a frozen f32 model is never copied on the
//! CPU. Every lookup checks the stored shape against what the model expects and names the tensor.
//!
//! Tensors are looked up by their wav2vec2 names: the other families' `hubert.X`,
//! `unispeech.X`, `unispeech_sat.X` and `data2vec_audio.X` and a bare encoder's `X`
//! (`Wav2Vec2Model`, `HubertModel`, ..., saved without a task head) are `wav2vec2.X` here, so one
//! model definition serves all of them; messages give the stored name.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use memmap2::{Mmap, UncheckedAdvice};
use safetensors::{Dtype, SafeTensors};

use super::torch_bin;
use crate::rng::SplitMix;
use crate::tensor::{DType, HostBytes, Tensor};

struct Entry {
    /// The name in the file.
    stored: String,
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    offset: usize,
    len: usize,
}

pub struct Checkpoint {
    files: Vec<(PathBuf, Arc<Mmap>)>,
    entries: HashMap<String, Entry>,
    /// What this checkpoint stores in place of `wav2vec2.` (another family's prefix, or nothing),
    /// if anything.
    stored_prefix: Option<&'static str>,
}

fn dtype_of(d: Dtype, name: &str, file: &Path) -> Result<DType> {
    Ok(match d {
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        other => bail!("{}: tensor \"{name}\" has unsupported dtype {other:?} (expected F32, F16 or BF16)", file.display()),
    })
}

/// The weights of a model folder, as transformers looks for them: `model.safetensors`, the
/// shards `model.safetensors.index.json` lists, `pytorch_model.bin`, or the shards
/// `pytorch_model.bin.index.json` lists. Returns the weight files and the index, if any.
pub fn weight_files(dir: &Path) -> Result<(Vec<PathBuf>, Option<PathBuf>)> {
    for name in ["model.safetensors", "pytorch_model.bin"] {
        let (single, index) = (dir.join(name), dir.join(format!("{name}.index.json")));
        if single.is_file() {
            return Ok((vec![single], None));
        }
        if index.is_file() {
            let text = std::fs::read_to_string(&index).with_context(|| format!("cannot read {}", index.display()))?;
            let json: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", index.display()))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .with_context(|| format!("{}: missing \"weight_map\"", index.display()))?;
            let mut shards: Vec<PathBuf> = map.values().filter_map(|v| v.as_str()).map(|s| dir.join(s)).collect();
            shards.sort();
            shards.dedup();
            return Ok((shards, Some(index)));
        }
    }
    bail!("{}: no model.safetensors or pytorch_model.bin (nor a sharded index of either) in this folder", dir.display())
}

impl Checkpoint {
    /// Opens the weights of a model folder ([`weight_files`]).
    pub fn open_dir(dir: &Path) -> Result<Checkpoint> {
        Checkpoint::open(&weight_files(dir)?.0)
    }

    /// Opens weight files together: `*.safetensors`, or PyTorch archives (any other name).
    pub fn open(paths: &[PathBuf]) -> Result<Checkpoint> {
        let mut files = Vec::new();
        let mut entries = HashMap::new();
        let mut stored_prefix = None;
        for (i, path) in paths.iter().enumerate() {
            let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
            // SAFETY: the mapping is read-only; a checkpoint modified while loaded is outside our
            // contract, as for every mmap-based loader.
            let map = Arc::new(unsafe { Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?);
            let safetensors = path.extension().is_some_and(|e| e == "safetensors");
            let tensors = if safetensors { safetensors_entries(&map, path, i)? } else { torch_entries(&map, path, i)? };
            for entry in tensors {
                let (name, replaced) = wav2vec2_name(&entry.stored);
                stored_prefix = stored_prefix.or(replaced);
                if let Some(other) = entries.insert(name.clone(), entry) {
                    bail!("{}: tensors \"{}\" and \"{}\" are both {name}", path.display(), other.stored, entries[&name].stored);
                }
            }
            files.push((path.clone(), map));
        }
        Ok(Checkpoint { files, entries, stored_prefix })
    }

    /// The weights of a model folder with MMS language `lang`'s adapters and head
    /// (`adapter.<lang>.safetensors`, as transformers' `load_adapter` reads it) in place of the
    /// default ones; `None`: the folder's weights as they are.
    pub fn open_language(dir: &Path, lang: Option<&str>) -> Result<Checkpoint> {
        let mut ck = Checkpoint::open_dir(dir)?;
        let Some(l) = lang else { return Ok(ck) };
        let path = dir.join(format!("adapter.{l}.safetensors"));
        ensure!(path.is_file(), "--target-lang {l}: no {} in the model folder", path.display());
        let language = Checkpoint::open(std::slice::from_ref(&path))?;
        let file = ck.files.len();
        for (name, mut entry) in language.entries {
            ensure!(
                ck.entries.contains_key(&name),
                "--target-lang {l}: {} holds \"{}\", which the model does not have (not an MMS model's adapters?)",
                path.display(),
                entry.stored
            );
            entry.file = file;
            ck.entries.insert(name, entry);
        }
        ck.files.extend(language.files);
        Ok(ck)
    }

    /// Names of all stored tensors (wav2vec2 names for the encoder's).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    fn path_of(&self, e: &Entry) -> &Path {
        &self.files[e.file].0
    }

    /// The tensor `name` with its stored shape.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let e = self.entry(name)?;
        let bytes = HostBytes::Mapped { map: self.files[e.file].1.clone(), offset: e.offset, len: e.len };
        Tensor::from_host_bytes(bytes, e.dtype, &e.shape).with_context(|| format!("{}: tensor \"{}\"", self.path_of(e).display(), e.stored))
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.entries.get(name).with_context(|| {
            // Named as this checkpoint would store it.
            let stored = match (self.stored_prefix, name.strip_prefix("wav2vec2.")) {
                (Some(prefix), Some(rest)) => format!("{prefix}{rest}"),
                _ => name.to_string(),
            };
            format!("{}: tensor \"{stored}\" is missing", self.files[0].0.display())
        })
    }
}

/// The tensors of safetensors file number `file` (its bytes `map`).
fn safetensors_entries(map: &[u8], path: &Path, file: usize) -> Result<Vec<Entry>> {
    let st = SafeTensors::deserialize(map).map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file ({e})", path.display()))?;
    let base = map.as_ptr() as usize;
    st.tensors()
        .into_iter()
        .map(|(stored, view)| {
            let bytes = view.data();
            Ok(Entry {
                file,
                dtype: dtype_of(view.dtype(), &stored, path)?,
                shape: view.shape().to_vec(),
                offset: bytes.as_ptr() as usize - base,
                len: bytes.len(),
                stored,
            })
        })
        .collect()
}

/// The tensors of PyTorch archive number `file` (its bytes `map`).
fn torch_entries(map: &[u8], path: &Path, file: usize) -> Result<Vec<Entry>> {
    Ok(torch_bin::state_dict(map, path)?
        .into_iter()
        .map(|t| Entry { file, dtype: t.dtype, shape: t.shape, offset: t.offset, len: t.len, stored: t.name })
        .collect())
}

/// The wav2vec2 name of a stored tensor name, and the prefix it replaced: another family's
/// `<prefix>.X` and a bare encoder's `X` are `wav2vec2.X`; anything else is itself.
fn wav2vec2_name(stored: &str) -> (String, Option<&'static str>) {
    const BARE: [&str; 4] = ["feature_extractor.", "feature_projection.", "encoder.", "masked_spec_embed"];
    const OTHER_FAMILIES: [&str; 4] = ["hubert.", "unispeech.", "unispeech_sat.", "data2vec_audio."];
    if let Some((prefix, rest)) = OTHER_FAMILIES.iter().find_map(|&p| stored.strip_prefix(p).map(|rest| (p, rest))) {
        (format!("wav2vec2.{rest}"), Some(prefix))
    } else if BARE.iter().any(|b| stored.starts_with(b)) {
        (format!("wav2vec2.{stored}"), Some(""))
    } else {
        (stored.to_string(), None)
    }
}

impl WeightSource for Checkpoint {
    fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let e = self.entry(name)?;
        if e.shape != shape {
            bail!("{}: tensor \"{}\" has shape {:?}, but the config implies {shape:?}", self.path_of(e).display(), e.stored, e.shape);
        }
        self.tensor(name)
    }

    fn release(&self, name: &str) {
        if let Some(e) = self.entries.get(name) {
            // SAFETY: the mapping is private and read-only, so MADV_DONTNEED only drops clean
            // pages, which the kernel reloads from the file if anything reads them again: no
            // slice into the mapping can observe a change. The advice is best effort.
            let _ = unsafe { self.files[e.file].1.unchecked_advise_range(UncheckedAdvice::DontNeed, e.offset, e.len) };
        }
    }
}

/// Where model weights come from: a checkpoint, or generated ones (benchmarks, tests).
pub trait WeightSource {
    fn contains(&self, name: &str) -> bool;
    /// The tensor `name`, which must have exactly `shape`.
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor>;
    /// Says the host copy of `name` is no longer needed (it was converted into another layout),
    /// so a mapped file's pages can leave memory: peak memory stays one copy of the weights.
    fn release(&self, _name: &str) {}
}

/// Tensors by name laid over another source: the model as training has changed it, or an MMS
/// language's adapters and head over the model's. The
/// tensors may live on the training backend ([`crate::backend::Backend::prepare_linear_weight`]
/// and the other preparations take them there as they are).
pub struct Overlay<'a> {
    pub inner: &'a dyn WeightSource,
    pub tensors: BTreeMap<&'a str, Tensor>,
}

impl<'a> Overlay<'a> {
    pub fn new(inner: &'a dyn WeightSource, tensors: impl IntoIterator<Item = (&'a str, Tensor)>) -> Overlay<'a> {
        Overlay { inner, tensors: tensors.into_iter().collect() }
    }
}

impl WeightSource for Overlay<'_> {
    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name) || self.inner.contains(name)
    }

    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let Some(t) = self.tensors.get(name) else { return self.inner.get(name, shape) };
        ensure!(t.shape() == shape, "tensor \"{name}\" is {:?} where laid over the model, which expects {shape:?}", t.shape());
        Ok(t.clone())
    }

    fn release(&self, name: &str) {
        self.inner.release(name)
    }
}

/// Deterministic random weights for any config: uniform in ±1/√fan_in (fan_in = product of all
/// but the first dimension), norm gains near 1, weight-norm magnitudes positive. Reads like a
/// freshly initialised transformers model, for benchmarks at real sizes without a download.
pub struct RandomWeights {
    pub seed: u64,
}

impl WeightSource for RandomWeights {
    fn contains(&self, name: &str) -> bool {
        // The new weight-norm spelling, and a CTC head.
        !name.ends_with("weight_g")
    }

    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let mut rng =
            SplitMix(self.seed ^ name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3)));
        let mut next = || rng.symmetric();
        let n: usize = shape.iter().product();
        let fan_in: usize = shape.iter().skip(1).product::<usize>().max(1);
        let is_norm_gain = name.contains("norm") && name.ends_with(".weight");
        let data: Vec<f32> = if is_norm_gain || name.ends_with("original0") {
            (0..n).map(|_| 1.0 + 0.1 * next()).collect()
        } else {
            let a = 1.0 / (fan_in as f32).sqrt();
            (0..n).map(|_| a * next()).collect()
        };
        Ok(Tensor::from_vec(data, shape))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn released_tensors_read_back_unchanged() {
        let dir = std::path::Path::new("tests/fixtures/large-like");
        let ck = Checkpoint::open_dir(dir).unwrap();
        let name = "wav2vec2.encoder.layers.0.feed_forward.intermediate_dense.weight";
        let before = ck.get(name, &[72, 40]).unwrap().to_vec().unwrap();
        let view = ck.get(name, &[72, 40]).unwrap();
        assert!(view.is_mapped());
        ck.release(name);
        assert_eq!(view.to_vec().unwrap(), before);
    }
}
