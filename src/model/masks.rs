//! Mask sets (the output of mask learning): `masks.safetensors` with one U8 tensor per masked
//! weight, named like the weight, bits packed 1 per weight LSB first over the row-major
//! `[out, in]` matrix (metadata `format = s3router-masks-v1`, `sparsity`, `<name>.shape`, and
//! optionally `base_fingerprint`, see [`base_fingerprint`]), plus `head.safetensors`
//! (`lm_head.weight`, `lm_head.bias`) and `vocab.json` for the task.
//!
//! [`Masked`] puts a mask set over a model's weights: masked weights come out as `W * M`, the head
//! from the mask set; everything else passes through.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use safetensors::{Dtype, SafeTensors};

use super::checkpoint::{Checkpoint, WeightSource};
use crate::fsio::RawTensor;
use crate::mask;
use crate::tensor::Tensor;

pub const FORMAT: &str = "s3router-masks-v1";

/// Metadata key of the fingerprint of the weights a mask set was learned over.
const BASE_KEY: &str = "base_fingerprint";
const LANG_KEY: &str = "target_lang";

/// Values of each masked weight the fingerprint reads.
const FINGERPRINT_SAMPLES: usize = 64;

/// A fingerprint of the weights `masks` (name, `[out, in]` shape) of `source`: FNV-1a (64-bit,
/// as 16 hex digits) over, for each weight in name order, its name's bytes and the bits (f32,
/// little-endian) of the values at the flat indices `⌊j · numel / 64⌋`, j = 0..64.
///
/// A mask is only meaningful over the weights it was learned on; another checkpoint of the same
/// architecture (wav2vec2-base against wav2vec2-base-960h, say) passes every shape check and
/// gives a silently wrong model. Sixty-four values a matrix tell two trained checkpoints apart
/// and cost 64 reads a matrix where the weights are stored in f32 (a conversion of the whole
/// matrix where they are not).
pub fn base_fingerprint<'a>(source: &dyn WeightSource, masks: impl IntoIterator<Item = (&'a str, &'a [usize])>) -> Result<String> {
    let mut masks: Vec<(&str, &[usize])> = masks.into_iter().collect();
    masks.sort();
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            hash = (hash ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    for (name, shape) in masks {
        // f32 as stored (a mapped checkpoint) is read in place: only the sampled pages load.
        let weight = source.get(name, shape)?.to_f32().with_context(|| name.to_string())?;
        let values = weight.f32s()?;
        eat(name.as_bytes());
        if !values.is_empty() {
            for j in 0..FINGERPRINT_SAMPLES {
                eat(&values[j * values.len() / FINGERPRINT_SAMPLES].to_le_bytes());
            }
        }
    }
    Ok(format!("{hash:016x}"))
}

/// The blank of the head in `head_path`: as its metadata records it, or for sets written before
/// it did, the id of `<pad>` in the set's `vocab` (what `engine train` made the blank); `None`
/// if neither says.
fn head_blank(head_path: &Path, vocab: &Path) -> Result<Option<usize>> {
    let bytes = std::fs::read(head_path).with_context(|| format!("cannot read {}", head_path.display()))?;
    let (_, meta) =
        SafeTensors::read_metadata(&bytes).map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file ({e})", head_path.display()))?;
    if let Some(text) = meta.metadata().as_ref().and_then(|m| m.get(BLANK_KEY)) {
        let blank = text.parse().with_context(|| format!("{}: blank {text:?} is not a token id", head_path.display()))?;
        return Ok(Some(blank));
    }
    let Ok(text) = std::fs::read_to_string(vocab) else { return Ok(None) };
    let json: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", vocab.display()))?;
    Ok(json.get("<pad>").and_then(serde_json::Value::as_u64).map(|id| id as usize))
}

/// Packed masks by weight name: (weight shape, bits LSB first over the row-major weight).
pub type PackedMasks = BTreeMap<String, (Vec<usize>, Vec<u8>)>;

/// One weight's keep-flags: (name, `[out, in]` shape, one flag per weight, row-major).
pub type KeepFlags = (String, Vec<usize>, Vec<bool>);

/// What a mask set records of the model its masks were learned over.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Origin {
    /// [`base_fingerprint`] of the masked weights, where known.
    pub base: Option<String>,
    /// MMS: the language whose adapters the model ran with (`--target-lang`); `None`: the
    /// default ones in its weights.
    pub target_lang: Option<String>,
}

pub struct MaskSet {
    pub dir: PathBuf,
    /// Weight name -> (weight shape, packed bits), in name order (deterministic messages).
    pub masks: PackedMasks,
    pub sparsity: Option<f64>,
    /// [`base_fingerprint`] of the weights the masks were learned over, where the set records it.
    pub base: Option<String>,
    /// MMS: the language whose adapters the masks were learned with ([`Origin::target_lang`]).
    pub target_lang: Option<String>,
    /// `lm_head.weight` `[vocab, hidden]` and `lm_head.bias`, if the set carries a head.
    pub head: Option<(Tensor, Tensor)>,
    /// The head's CTC blank (its vocabulary's; the model's `pad_token_id` may be another).
    pub blank: Option<usize>,
}

/// The metadata key of the head's blank in `head.safetensors`.
pub const BLANK_KEY: &str = "blank";

impl MaskSet {
    /// The packed masks (name -> (shape, bits)), the sparsity and the origin of one masks file.
    pub fn read_bits(path: &Path) -> Result<(PackedMasks, Option<f64>, Origin)> {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let (_, meta) =
            SafeTensors::read_metadata(&bytes).map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file ({e})", path.display()))?;
        let meta = meta.metadata().clone().unwrap_or_default();
        let format = meta.get("format").map(String::as_str).unwrap_or("(none)");
        ensure!(format == FORMAT, "{}: format {format:?} is not {FORMAT:?}", path.display());
        let st = SafeTensors::deserialize(&bytes).map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file ({e})", path.display()))?;
        let mut masks = BTreeMap::new();
        for (name, view) in st.tensors() {
            ensure!(view.dtype() == Dtype::U8, "{}: mask \"{name}\" is {:?}, expected U8 packed bits", path.display(), view.dtype());
            let shape_text =
                meta.get(&format!("{name}.shape")).with_context(|| format!("{}: no \"{name}.shape\" in the metadata", path.display()))?;
            let shape: Vec<usize> = shape_text
                .split(',')
                .map(|d| d.trim().parse())
                .collect::<Result<_, _>>()
                .with_context(|| format!("{}: \"{name}.shape\" = {shape_text:?} is not a list of sizes", path.display()))?;
            let numel: usize = shape.iter().product();
            ensure!(
                view.data().len() == numel.div_ceil(8),
                "{}: mask \"{name}\" has {} bytes for a {shape:?} weight",
                path.display(),
                view.data().len()
            );
            masks.insert(name, (shape, view.data().to_vec()));
        }
        let origin = Origin { base: meta.get(BASE_KEY).cloned(), target_lang: meta.get(LANG_KEY).cloned() };
        Ok((masks, meta.get("sparsity").and_then(|s| s.parse().ok()), origin))
    }

    pub fn load(dir: &Path) -> Result<MaskSet> {
        ensure!(dir.is_dir(), "mask folder {} does not exist", dir.display());
        let (masks, sparsity, Origin { base, target_lang }) = MaskSet::read_bits(&dir.join("masks.safetensors"))?;
        let head_path = dir.join("head.safetensors");
        let blank = if head_path.is_file() { head_blank(&head_path, &dir.join("vocab.json"))? } else { None };
        let head = if head_path.is_file() {
            let ck = Checkpoint::open(std::slice::from_ref(&head_path))?;
            let (w, b) = (ck.tensor("lm_head.weight")?, ck.tensor("lm_head.bias")?);
            let (w, b) = (Tensor::from_vec(w.to_vec()?, w.shape()), Tensor::from_vec(b.to_vec()?, b.shape()));
            ensure!(
                w.shape().len() == 2 && b.shape() == [w.shape()[0]],
                "{}: lm_head.weight {:?} and lm_head.bias {:?} do not form a head",
                head_path.display(),
                w.shape(),
                b.shape()
            );
            Some((w, b))
        } else {
            None
        };
        Ok(MaskSet { dir: dir.to_path_buf(), masks, sparsity, base, target_lang, head, blank })
    }

    /// Writes a mask set (tests, mask learning): masks from keep-flags, atomically, with what
    /// is known of the model they were learned over.
    pub fn save(dir: &Path, masks: &[KeepFlags], sparsity: f64, origin: &Origin) -> Result<()> {
        MaskSet::save_as(&dir.join("masks.safetensors"), masks, sparsity, origin)
    }

    /// [`MaskSet::save`] to a named file (e.g. a run's `initial_masks.safetensors`).
    pub fn save_as(path: &Path, masks: &[KeepFlags], sparsity: f64, origin: &Origin) -> Result<()> {
        let packed: Vec<(String, Vec<u8>)> = masks.iter().map(|(n, _, keep)| (n.clone(), mask::pack(keep))).collect();
        let mut meta = BTreeMap::from([("format".to_string(), FORMAT.to_string()), ("sparsity".to_string(), sparsity.to_string())]);
        for (key, value) in [(BASE_KEY, &origin.base), (LANG_KEY, &origin.target_lang)] {
            if let Some(v) = value {
                meta.insert(key.to_string(), v.clone());
            }
        }
        for (name, shape, _) in masks {
            meta.insert(format!("{name}.shape"), shape.iter().map(usize::to_string).collect::<Vec<_>>().join(","));
        }
        let lens: Vec<[usize; 1]> = packed.iter().map(|(_, bits)| [bits.len()]).collect();
        let raw: Vec<RawTensor> =
            packed.iter().zip(&lens).map(|((name, bits), len)| RawTensor { name, dtype: "U8", shape: len, bytes: bits }).collect();
        crate::fsio::write_safetensors(path, &raw, &meta)
    }

    /// The task vocabulary shipped with the masks, if any.
    pub fn vocab_path(&self) -> Option<PathBuf> {
        Some(self.dir.join("vocab.json")).filter(|p| p.is_file())
    }

    /// Rows of the shipped head (its vocabulary size), if any.
    pub fn head_vocab_size(&self) -> Option<usize> {
        self.head.as_ref().map(|(_, b)| b.numel())
    }

    /// Fails unless every mask names a weight of the model (`expected` gives a weight's shape,
    /// `None` for a name that takes no mask) with the mask's shape.
    pub fn check(&self, expected: impl Fn(&str) -> Option<Vec<usize>>) -> Result<()> {
        for (name, (shape, _)) in &self.masks {
            match expected(name) {
                Some(want) if &want == shape => {}
                Some(want) => bail!(
                    "{}: mask \"{name}\" is for a {shape:?} weight, but the model's is {want:?} (masks from a different model?)",
                    self.dir.display()
                ),
                None => bail!("{}: mask \"{name}\" names no masked weight of this model", self.dir.display()),
            }
        }
        Ok(())
    }

    /// Fails unless the model runs with the language adapters the masks were learned with:
    /// `lang` is its `--target-lang` (`None`: the default adapters).
    pub fn check_language(&self, lang: Option<&str>) -> Result<()> {
        let file = self.dir.join("masks.safetensors");
        match (self.target_lang.as_deref(), lang) {
            (want, got) if want == got => Ok(()),
            (Some(want), _) => bail!("{}: these masks were learned with --target-lang {want}; run them with it", file.display()),
            (None, got) => bail!(
                "{}: these masks were learned with the model's default adapters, not --target-lang {}",
                file.display(),
                got.unwrap_or_default()
            ),
        }
    }

    /// Fails if the set records a [`base_fingerprint`] and `source`'s masked weights (`source_name`
    /// in the message) give another: the masks were learned over other weights.
    pub fn check_base(&self, source: &dyn WeightSource, source_name: &Path) -> Result<()> {
        let Some(want) = &self.base else { return Ok(()) };
        let file = self.dir.join("masks.safetensors");
        let got = base_fingerprint(source, self.masks.iter().map(|(n, (shape, _))| (n.as_str(), shape.as_slice()))).with_context(|| {
            format!("{}: these masks do not fit {}'s weights (masks from another model?)", file.display(), source_name.display())
        })?;
        ensure!(
            &got == want,
            "{}: these masks were learned over other weights than {}'s (base_fingerprint {want}, this model's {got}); \
             a mask only means something over the weights it was learned on",
            file.display(),
            source_name.display()
        );
        Ok(())
    }

    /// The head tensor `name` (`lm_head.weight` or `lm_head.bias`), if the set carries a head.
    fn head_tensor(&self, name: &str) -> Option<&Tensor> {
        let (w, b) = self.head.as_ref()?;
        match name {
            "lm_head.weight" => Some(w),
            "lm_head.bias" => Some(b),
            _ => None,
        }
    }
}

/// A model's weights seen through a mask set.
pub struct Masked<'a> {
    pub inner: &'a dyn WeightSource,
    pub masks: &'a MaskSet,
}

impl WeightSource for Masked<'_> {
    fn contains(&self, name: &str) -> bool {
        self.masks.head_tensor(name).is_some() || self.inner.contains(name)
    }

    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        if let Some(t) = self.masks.head_tensor(name) {
            ensure!(
                t.shape() == shape,
                "{}: head tensor \"{name}\" is {:?}, the model expects {shape:?}",
                self.masks.dir.display(),
                t.shape()
            );
            return Ok(Tensor::from_vec(t.to_vec()?, shape));
        }
        let w = self.inner.get(name, shape)?;
        let Some((mshape, bits)) = self.masks.masks.get(name) else { return Ok(w) };
        ensure!(mshape == shape, "{}: mask \"{name}\" is for a {mshape:?} weight, the model's is {shape:?}", self.masks.dir.display());
        Ok(Tensor::from_vec(mask::apply(&w.to_vec()?, &mask::unpack(bits, w.numel())), shape))
    }

    fn release(&self, name: &str) {
        self.inner.release(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::checkpoint::RandomWeights;

    /// A head's blank: as head.safetensors records it; for sets from before it did, `<pad>`'s
    /// id in the set's vocab.json (what training made the blank); else unknown.
    #[test]
    fn head_blanks_come_from_the_metadata_or_the_pad_token() {
        let dir = tempfile::tempdir().unwrap();
        let (head, vocab) = (dir.path().join("head.safetensors"), dir.path().join("vocab.json"));
        let write = |meta: &[(&str, &str)]| {
            let meta = meta.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            crate::fsio::write_f32_safetensors(&head, [("lm_head.bias", &[2usize][..], &[0.0f32, 1.0][..])], &meta).unwrap();
        };
        write(&[]);
        assert_eq!(head_blank(&head, &vocab).unwrap(), None);
        std::fs::write(&vocab, r#"{"a": 0, "<pad>": 1}"#).unwrap();
        assert_eq!(head_blank(&head, &vocab).unwrap(), Some(1));
        write(&[(BLANK_KEY, "0")]);
        assert_eq!(head_blank(&head, &vocab).unwrap(), Some(0));
        write(&[(BLANK_KEY, "x")]);
        assert!(head_blank(&head, &vocab).unwrap_err().to_string().contains("blank"));
    }

    /// The fingerprint names the weights, not the order they are listed in: equal for the same
    /// values, different for another checkpoint of the same shapes.
    #[test]
    fn base_fingerprints_tell_checkpoints_apart() {
        let a = "wav2vec2.encoder.layers.0.feed_forward.intermediate_dense.weight";
        let b = "wav2vec2.encoder.layers.0.feed_forward.output_dense.weight";
        let (sa, sb) = ([24usize, 8], [8usize, 24]);
        let of = |seed, order: &[(&str, &[usize])]| base_fingerprint(&RandomWeights { seed }, order.iter().copied()).unwrap();
        let listed: [(&str, &[usize]); 2] = [(a, &sa), (b, &sb)];
        let reversed: [(&str, &[usize]); 2] = [(b, &sb), (a, &sa)];
        assert_eq!(of(0, &listed), of(0, &reversed));
        assert_ne!(of(0, &listed), of(1, &listed));
        assert_ne!(of(0, &listed), of(0, &listed[..1]));
        assert_eq!(of(0, &listed).len(), 16);
    }
}
