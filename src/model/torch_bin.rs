//! PyTorch weight files (`pytorch_model.bin`: `torch.save` of a state dict, the zip format of
//! PyTorch 1.6 and later): where each tensor's bytes lie in the file, so that
//! [`crate::model::checkpoint::Checkpoint`] maps them as it maps safetensors.
//!
//! The archive holds `<name>/data.pkl` (the dict, pickled; read by [`crate::model::pickle`],
//! which runs no code) and one uncompressed record `<name>/data/<key>` per storage.

use std::io::{Cursor, Read};
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use zip::{CompressionMethod, ZipArchive};

use super::pickle::{unpickle, Storage, Value};
use crate::tensor::DType;

/// One tensor of the state dict: its bytes are `len` bytes from `offset` in the file.
#[derive(Debug)]
pub struct TorchTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub offset: usize,
    pub len: usize,
}

/// The tensors of the state dict in `file` (its bytes), every one checked to lie inside its
/// storage record. `path` names the file in messages.
pub fn state_dict(file: &[u8], path: &Path) -> Result<Vec<TorchTensor>> {
    let p = path.display();
    if !file.starts_with(b"PK\x03\x04") {
        bail!(
            "{p}: not a zip archive; PyTorch's format before 1.6 is not read (load and save it again with a newer \
             PyTorch, or save it as safetensors)"
        );
    }
    let mut zip = ZipArchive::new(Cursor::new(file)).with_context(|| format!("{p}: not a readable zip archive"))?;
    let pkl = zip
        .file_names()
        .find(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
        .with_context(|| format!("{p}: no data.pkl in the archive (not a torch.save file)"))?
        .to_string();
    let prefix = &pkl[..pkl.len() - "data.pkl".len()];
    let mut pickle = Vec::new();
    zip.by_name(&pkl)?.read_to_end(&mut pickle).with_context(|| format!("{p}: cannot read {pkl}"))?;
    let root = unpickle(&pickle).with_context(|| format!("{p}: {pkl}"))?;
    let Value::Dict(items) = root else { bail!("{p}: the file holds no state dict (a dict of tensors)") };
    let mut out = Vec::new();
    for (key, value) in items {
        let (Value::Str(name), Value::Tensor { storage, offset, shape, stride }) = (key, value) else { continue };
        let Storage { class, key, numel } = storage;
        let dtype = match class.as_str() {
            "FloatStorage" => DType::F32,
            "HalfStorage" => DType::F16,
            "BFloat16Storage" => DType::BF16,
            other => bail!("{p}: tensor \"{name}\" is stored as {other} (expected FloatStorage, HalfStorage or BFloat16Storage)"),
        };
        // Sizes come from the file: products that overflow are refused, not wrapped.
        let product = |dims: &[usize]| dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let impossible = || format!("{p}: tensor \"{name}\" has an impossible shape {shape:?}");
        let elems = product(&shape).with_context(impossible)?;
        // Row-major strides; a dimension of size 1 may carry any stride.
        let contiguous: Vec<usize> = (0..shape.len()).map(|i| product(&shape[i + 1..])).collect::<Option<_>>().with_context(impossible)?;
        let dims_that_matter = |s: &[usize]| s.iter().zip(&shape).filter(|(_, &n)| n > 1).map(|(&s, _)| s).collect::<Vec<_>>();
        ensure!(
            dims_that_matter(&stride) == dims_that_matter(&contiguous),
            "{p}: tensor \"{name}\" is not contiguous (stride {stride:?} for shape {shape:?}); save it with .contiguous()"
        );
        ensure!(
            offset.checked_add(elems).is_some_and(|end| end <= numel),
            "{p}: tensor \"{name}\" reads past its storage ({offset} + {elems} of {numel} elements)"
        );
        let record = format!("{prefix}data/{key}");
        let index = zip.index_for_name(&record).with_context(|| format!("{p}: tensor \"{name}\": no record {record}"))?;
        let entry = zip.by_index_raw(index)?;
        ensure!(entry.compression() == CompressionMethod::Stored, "{p}: record {record} is compressed (torch.save stores them)");
        let start = entry.data_start().context("zip: record without a data offset")? as usize;
        let size = dtype.size_of();
        ensure!(
            numel.checked_mul(size).is_some_and(|bytes| bytes <= entry.size() as usize),
            "{p}: storage {record} holds {} bytes, not the {numel} elements its tensors say",
            entry.size()
        );
        // Within the record now (offset + elems <= numel, numel * size <= its size): no overflow.
        out.push(TorchTensor { name, dtype, shape, offset: start + offset * size, len: elems * size });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use zip::write::SimpleFileOptions;

    use super::*;

    /// A zip archive holding `data.pkl` = `pickle` under `archive/`.
    fn archive(pickle: &[u8]) -> Vec<u8> {
        let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
        zip.start_file("archive/data.pkl", SimpleFileOptions::default().compression_method(CompressionMethod::Stored)).unwrap();
        zip.write_all(pickle).unwrap();
        zip.finish().unwrap().into_inner()
    }

    #[test]
    fn files_that_are_not_state_dicts_are_refused_by_name() {
        let path = Path::new("m/pytorch_model.bin");
        let err = |bytes: &[u8]| format!("{:#}", state_dict(bytes, path).unwrap_err());
        // torch.save(..., _use_new_zipfile_serialization=False) starts with a pickled magic number.
        let e = err(b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.");
        assert!(e.contains("m/pytorch_model.bin") && e.contains("before 1.6"), "{e}");
        // A pickle that would run os.system when torch.load(weights_only=False) reads it.
        let e = err(&archive(b"\x80\x02cposix\nsystem\nq\x00X\x07\x00\x00\x00echo hiq\x01\x85q\x02Rq\x03."));
        assert!(e.contains("posix.system"), "{e}");
        // A list of numbers, not a dict of tensors.
        let e = err(&archive(b"\x80\x02]q\x00K\x01a."));
        assert!(e.contains("no state dict"), "{e}");
    }
}
