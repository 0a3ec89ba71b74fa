//! Training checkpoints: named f32 tensors (scores, head, optimiser moments) and string metadata
//! (step, schedule position, RNG state, data position, configuration) in one safetensors file,
//! written atomically: a temporary file in the same folder, flushed to disk, then renamed over
//! the old one. An interrupted or failed save (a full disk) leaves the previous checkpoint intact.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use anyhow::{ensure, Context, Result};
use safetensors::{Dtype, SafeTensors};

use super::adam::Adam;
use crate::fsio::{atomic_write, RawTensor};

/// Everything a run needs to continue exactly where it stopped.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TrainState {
    /// Name -> (shape, values).
    pub tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    pub meta: BTreeMap<String, String>,
}

const FORMAT: &str = "s3router-train-state-v1";

impl TrainState {
    pub fn put(&mut self, name: &str, shape: &[usize], values: Vec<f32>) {
        self.tensors.insert(name.to_string(), (shape.to_vec(), values));
    }

    /// The tensor `name`, which must have `len` values.
    pub fn take(&self, name: &str, len: usize) -> Result<&[f32]> {
        let (_, v) = self.tensors.get(name).with_context(|| format!("checkpoint has no tensor \"{name}\""))?;
        ensure!(v.len() == len, "checkpoint tensor \"{name}\" has {} values, the run expects {len}", v.len());
        Ok(v)
    }

    pub fn meta(&self, key: &str) -> Result<&str> {
        self.meta.get(key).map(String::as_str).with_context(|| format!("checkpoint has no \"{key}\" entry"))
    }

    /// Stores an optimiser's moments and step count under `prefix`.
    pub fn put_adam(&mut self, prefix: &str, adam: &Adam) {
        for (i, (m, v)) in adam.m.iter().zip(&adam.v).enumerate() {
            self.put(&format!("{prefix}.m.{i}"), &[m.len()], m.clone());
            self.put(&format!("{prefix}.v.{i}"), &[v.len()], v.clone());
        }
        let steps: Vec<String> = adam.steps.iter().map(u64::to_string).collect();
        self.meta.insert(format!("{prefix}.steps"), steps.join(","));
    }

    /// Restores moments and step count into `adam` (sized for the same parameters).
    pub fn restore_adam(&self, prefix: &str, adam: &mut Adam) -> Result<()> {
        for (i, (m, v)) in adam.m.iter_mut().zip(adam.v.iter_mut()).enumerate() {
            let (mn, vn) = (m.len(), v.len());
            m.copy_from_slice(self.take(&format!("{prefix}.m.{i}"), mn)?);
            v.copy_from_slice(self.take(&format!("{prefix}.v.{i}"), vn)?);
        }
        let key = format!("{prefix}.steps");
        let steps = self.meta(&key)?;
        let parsed: Vec<u64> = steps
            .split(',')
            .filter(|s| !s.is_empty()) // no tensors: an empty list
            .map(str::parse)
            .collect::<Result<_, _>>()
            .with_context(|| format!("checkpoint \"{key}\" = {steps:?} is not a list of counts"))?;
        ensure!(
            parsed.len() == adam.steps.len(),
            "checkpoint \"{key}\" has {} counts, the run has {} tensors",
            parsed.len(),
            adam.steps.len()
        );
        adam.steps = parsed;
        Ok(())
    }

    fn bytes(&self) -> Result<Vec<u8>> {
        let mut meta = self.meta.clone();
        meta.insert("format".into(), FORMAT.into());
        let raw: Vec<RawTensor> =
            self.tensors.iter().map(|(name, (shape, v))| RawTensor { name, dtype: "F32", shape, bytes: bytemuck::cast_slice(v) }).collect();
        crate::fsio::safetensors_bytes(&raw, &meta)
    }

    /// Writes the state to `path` atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.save_with(path, |file, bytes| file.write_all(bytes))
    }

    /// [`TrainState::save`] with the byte writer injectable (tests simulate a full disk).
    fn save_with(&self, path: &Path, write: impl FnOnce(&mut std::fs::File, &[u8]) -> std::io::Result<()>) -> Result<()> {
        let bytes = self.bytes()?;
        atomic_write(path, |f| write(f, &bytes))
    }

    pub fn load(path: &Path) -> Result<TrainState> {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read checkpoint {}", path.display()))?;
        let bad = |e: safetensors::SafeTensorError| anyhow::anyhow!("{}: not a valid checkpoint ({e})", path.display());
        let (_, header) = SafeTensors::read_metadata(&bytes).map_err(bad)?;
        let mut meta: BTreeMap<String, String> = header.metadata().clone().unwrap_or_default().into_iter().collect();
        let format = meta.remove("format").unwrap_or_default();
        ensure!(format == FORMAT, "{}: format {format:?} is not {FORMAT:?}", path.display());
        let st = SafeTensors::deserialize(&bytes).map_err(bad)?;
        let mut tensors = BTreeMap::new();
        for (name, view) in st.tensors() {
            ensure!(view.dtype() == Dtype::F32, "{}: tensor \"{name}\" is {:?}, expected F32", path.display(), view.dtype());
            tensors.insert(name, (view.shape().to_vec(), bytemuck::pod_collect_to_vec(view.data())));
        }
        Ok(TrainState { tensors, meta })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> TrainState {
        let mut s = TrainState::default();
        s.put("scores.layer0", &[2, 3], vec![0.1, -0.0, f32::MIN_POSITIVE, 1e-45, -7.5, f32::MAX]);
        s.put("head.bias", &[2], vec![1.0, 2.0]);
        s.meta.insert("step".into(), "1234".into());
        s.meta.insert("rng".into(), u64::MAX.to_string());
        let mut adam = Adam::new(&[3]);
        let mut p = vec![1.0f32, 2.0, 3.0];
        adam.update(&mut [&mut p], &[Some(&[0.5, -0.25, 1e-3])], 1e-3);
        s.put_adam("adam", &adam);
        s
    }

    #[test]
    fn round_trip_is_bit_identical() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoint.safetensors");
        let s = sample();
        s.save(&path).unwrap();
        let back = TrainState::load(&path).unwrap();
        assert_eq!(back.meta, s.meta);
        for (name, (shape, v)) in &s.tensors {
            let (bshape, bv) = &back.tensors[name];
            assert_eq!(bshape, shape);
            assert_eq!(bv.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), v.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), "{name}");
        }
        let mut adam = Adam::new(&[3]);
        back.restore_adam("adam", &mut adam).unwrap();
        assert_eq!(adam.steps, vec![1]);
        assert_eq!(&adam.m[0], &s.tensors["adam.m.0"].1);
    }

    #[test]
    fn a_failed_save_leaves_the_previous_checkpoint_intact() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoint.safetensors");
        let first = sample();
        first.save(&path).unwrap();
        let mut second = sample();
        second.meta.insert("step".into(), "9999".into());
        let full_disk = |f: &mut std::fs::File, bytes: &[u8]| {
            f.write_all(&bytes[..bytes.len() / 2])?;
            Err(std::io::Error::other("No space left on device"))
        };
        let e = second.save_with(&path, full_disk).unwrap_err();
        assert!(format!("{e:#}").contains("the previous file is intact"), "{e:#}");
        assert_eq!(TrainState::load(&path).unwrap().meta["step"], "1234");
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn missing_pieces_are_named() {
        let s = sample();
        assert!(s.take("scores.layer1", 6).unwrap_err().to_string().contains("no tensor \"scores.layer1\""));
        assert!(s.take("head.bias", 3).unwrap_err().to_string().contains("has 2 values, the run expects 3"));
        assert!(s.meta("data.position").is_err());
    }
}
