//! PyTorch files (`torch.save`): `pytorch_model.bin` state dicts, and training checkpoints that
//! hold one (fairseq's `.pt`). Finds where each tensor's bytes lie in the file, so that
//! [`crate::model::checkpoint::Checkpoint`] maps them as it maps safetensors.
//!
//! Two layouts: the zip archive of PyTorch 1.6 and later (`<name>/data.pkl`, pickled, and one
//! uncompressed record `<name>/data/<key>` per storage), and the format before it (pickles in a
//! row, then each storage's element count and bytes). The pickles are read by
//! [`crate::model::pickle`], which runs no code.

use std::collections::HashMap;
use std::io::{Cursor, Read};
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use zip::{CompressionMethod, ZipArchive};

use super::pickle::{unpickle_prefix, Calls, Storage, Value};
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

/// A `torch.save` file: the value it holds, and where each storage's bytes lie.
pub struct TorchFile {
    pub root: Value,
    /// Storage key -> (offset, bytes) in the file.
    storages: HashMap<String, (usize, usize)>,
    /// Names the file in messages.
    path: String,
}

/// The first pickle of a file in PyTorch's format before 1.6: its magic number, 0x1950a86a20f9469cfc6c.
const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];

impl TorchFile {
    /// Reads the file's bytes `file`; `calls` says which Python calls its pickle may make.
    pub fn parse(file: &[u8], path: &Path, calls: Calls) -> Result<TorchFile> {
        let p = path.display().to_string();
        if file.starts_with(b"PK\x03\x04") {
            TorchFile::parse_zip(file, p, calls)
        } else if file.starts_with(b"\x80\x02\x8a\x0a") && file[4..].starts_with(&LEGACY_MAGIC) {
            TorchFile::parse_legacy(file, p, calls)
        } else {
            bail!("{p}: not a PyTorch file (neither a zip archive nor PyTorch's older format)")
        }
    }

    fn parse_zip(file: &[u8], p: String, calls: Calls) -> Result<TorchFile> {
        let mut zip = ZipArchive::new(Cursor::new(file)).with_context(|| format!("{p}: not a readable zip archive"))?;
        let pkl = zip
            .file_names()
            .find(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
            .with_context(|| format!("{p}: no data.pkl in the archive (not a torch.save file)"))?
            .to_string();
        let records = format!("{}data/", &pkl[..pkl.len() - "data.pkl".len()]);
        let mut pickle = Vec::new();
        zip.by_name(&pkl)?.read_to_end(&mut pickle).with_context(|| format!("{p}: cannot read {pkl}"))?;
        let (root, _) = unpickle_prefix(&pickle, calls).with_context(|| format!("{p}: {pkl}"))?;
        let mut storages = HashMap::new();
        for index in 0..zip.len() {
            let entry = zip.by_index_raw(index)?;
            let Some(key) = entry.name().strip_prefix(&records) else { continue };
            ensure!(
                entry.compression() == CompressionMethod::Stored,
                "{p}: record {} is compressed (torch.save stores them)",
                entry.name()
            );
            let start = entry.data_start().context("zip: record without a data offset")? as usize;
            storages.insert(key.to_string(), (start, entry.size() as usize));
        }
        Ok(TorchFile { root, storages, path: p })
    }

    /// PyTorch before 1.6: pickles of the magic number, the protocol version, the machine's
    /// type sizes, the value, and the sorted storage keys; then per key its element count
    /// (little-endian i64) and bytes.
    fn parse_legacy(file: &[u8], p: String, calls: Calls) -> Result<TorchFile> {
        let mut pos = 0;
        let mut next = |calls| -> Result<Value> {
            let (v, len) = unpickle_prefix(&file[pos..], calls).with_context(|| format!("{p}: the pickle at byte {pos}"))?;
            pos += len;
            Ok(v)
        };
        let (_magic, version, sys_info) = (next(Calls::StateDict)?, next(Calls::StateDict)?, next(Calls::StateDict)?);
        ensure!(version == Value::Int(1001), "{p}: PyTorch serialization protocol {version:?} (expected 1001)");
        let little = sys_info.field("little_endian");
        ensure!(little == Some(&Value::Bool(true)), "{p}: written on a big-endian machine, which is not read");
        let root = next(calls)?;
        let Value::List(keys) = next(Calls::StateDict)? else { bail!("{p}: no list of storage keys after the value") };
        let mut classes = HashMap::new();
        root.for_each_storage(&mut |s| drop(classes.insert(s.key.clone(), s.class.clone())));
        let mut storages = HashMap::new();
        for key in keys {
            let Value::Str(key) = key else { bail!("{p}: a storage key that is not a string") };
            let class = classes.get(&key).with_context(|| format!("{p}: storage {key} is listed but no tensor uses it"))?;
            let size = element_size(class).with_context(|| format!("{p}: storage {key} is a {class}, which is not known"))?;
            ensure!(file.len() - pos >= 8, "{p}: the file ends before storage {key}");
            let numel = u64::from_le_bytes(file[pos..pos + 8].try_into().expect("8 bytes"));
            let bytes = usize::try_from(numel).ok().and_then(|n| n.checked_mul(size)).filter(|&b| b <= file.len() - pos - 8);
            let bytes = bytes.with_context(|| format!("{p}: storage {key} claims {numel} elements, more than the file holds"))?;
            storages.insert(key, (pos + 8, bytes));
            pos += 8 + bytes;
        }
        Ok(TorchFile { root, storages, path: p })
    }

    /// Where the bytes of the tensor `value` (named `name`) lie, checked to lie inside its
    /// storage; `None` if `value` is not a tensor.
    pub fn tensor(&self, name: &str, value: &Value) -> Result<Option<TorchTensor>> {
        let p = &self.path;
        let Value::Tensor { storage, offset, shape, stride } = value else { return Ok(None) };
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
        let elems = product(shape).with_context(impossible)?;
        // Row-major strides; a dimension of size 1 may carry any stride.
        let contiguous: Vec<usize> = (0..shape.len()).map(|i| product(&shape[i + 1..])).collect::<Option<_>>().with_context(impossible)?;
        let dims_that_matter = |s: &[usize]| s.iter().zip(shape).filter(|(_, &n)| n > 1).map(|(&s, _)| s).collect::<Vec<_>>();
        ensure!(
            dims_that_matter(stride) == dims_that_matter(&contiguous),
            "{p}: tensor \"{name}\" is not contiguous (stride {stride:?} for shape {shape:?}); save it with .contiguous()"
        );
        ensure!(
            offset.checked_add(elems).is_some_and(|end| end <= *numel),
            "{p}: tensor \"{name}\" reads past its storage ({offset} + {elems} of {numel} elements)"
        );
        let &(start, bytes) = self.storages.get(key).with_context(|| format!("{p}: tensor \"{name}\": no storage {key} in the file"))?;
        let size = dtype.size_of();
        ensure!(
            numel.checked_mul(size).is_some_and(|need| need <= bytes),
            "{p}: storage {key} holds {bytes} bytes, not the {numel} elements its tensors say"
        );
        // Within the storage now (offset + elems <= numel, numel * size <= its bytes): no overflow.
        Ok(Some(TorchTensor { name: name.to_string(), dtype, shape: shape.clone(), offset: start + offset * size, len: elems * size }))
    }
}

/// Bytes per element of a `torch.<Class>` storage.
fn element_size(class: &str) -> Option<usize> {
    Some(match class {
        "DoubleStorage" | "LongStorage" | "ComplexFloatStorage" => 8,
        "FloatStorage" | "IntStorage" => 4,
        "HalfStorage" | "BFloat16Storage" | "ShortStorage" => 2,
        "CharStorage" | "ByteStorage" | "BoolStorage" => 1,
        "ComplexDoubleStorage" => 16,
        _ => return None,
    })
}

/// The tensors of the state dict in `file` (its bytes), every one checked to lie inside its
/// storage. `path` names the file in messages.
pub fn state_dict(file: &[u8], path: &Path) -> Result<Vec<TorchTensor>> {
    let torch = TorchFile::parse(file, path, Calls::StateDict)?;
    let Value::Dict(items) = &torch.root else { bail!("{}: the file holds no state dict (a dict of tensors)", path.display()) };
    let mut out = Vec::new();
    for (key, value) in items {
        let Value::Str(name) = key else { continue };
        out.extend(torch.tensor(name, value)?);
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
        // PyTorch's format before 1.6 (its magic number pickled first), cut short after it.
        let e = err(b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.");
        assert!(e.contains("m/pytorch_model.bin") && e.contains("byte 15"), "{e}");
        let e = err(b"not torch at all");
        assert!(e.contains("not a PyTorch file"), "{e}");
        // A pickle that would run os.system when torch.load(weights_only=False) reads it.
        let e = err(&archive(b"\x80\x02cposix\nsystem\nq\x00X\x07\x00\x00\x00echo hiq\x01\x85q\x02Rq\x03."));
        assert!(e.contains("posix.system"), "{e}");
        // A list of numbers, not a dict of tensors.
        let e = err(&archive(b"\x80\x02]q\x00K\x01a."));
        assert!(e.contains("no state dict"), "{e}");
    }
}
