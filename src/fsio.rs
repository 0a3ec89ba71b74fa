//! Writing outputs so that no reader ever sees half a file.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

/// Writes `path` atomically: `write` fills a temporary file in the same folder, which is flushed
/// to disk and then renamed over `path`. If anything fails, `path` keeps its old content (or stays
/// absent) and the temporary file is removed.
pub fn atomic_write(path: &Path, write: impl FnOnce(&mut File) -> std::io::Result<()>) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).with_context(|| format!("cannot create a file in {}", dir.display()))?;
    write(tmp.as_file_mut()).with_context(|| format!("writing {} failed; the previous file is intact", path.display()))?;
    tmp.as_file().sync_all().with_context(|| format!("flushing {} failed; the previous file is intact", path.display()))?;
    tmp.persist(path).with_context(|| format!("cannot move the new file to {}", path.display()))?;
    Ok(())
}

/// Fails unless `dir` is absent or an empty folder: a new output never mixes with old files.
pub fn ensure_new_folder(dir: &Path) -> Result<()> {
    anyhow::ensure!(!dir.exists() || dir.is_dir(), "{}: a file of that name exists; choose a new folder", dir.display());
    anyhow::ensure!(
        !dir.exists() || std::fs::read_dir(dir).map(|mut d| d.next().is_none()).unwrap_or(false),
        "{}: the folder exists and is not empty; choose a new one",
        dir.display()
    );
    Ok(())
}

/// Runs `write` on a new folder beside `out` and moves it into place only if it succeeds (an
/// empty `out` is replaced): no half-written folder is left either way.
pub fn staged_folder<T>(out: &Path, write: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    let staging = out.with_file_name(format!(".{}.partial", out.file_name().and_then(|n| n.to_str()).unwrap_or("out")));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).with_context(|| format!("cannot create {}", staging.display()))?;
    match write(&staging) {
        Ok(value) => {
            if out.exists() {
                std::fs::remove_dir(out).with_context(|| format!("cannot replace the empty folder {}", out.display()))?;
            }
            std::fs::rename(&staging, out).with_context(|| format!("cannot move {} to {}", staging.display(), out.display()))?;
            Ok(value)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            Err(e)
        }
    }
}

/// One tensor to serialise: name, safetensors dtype name (`"F32"`, `"U8"`), shape, raw
/// little-endian bytes.
pub struct RawTensor<'a> {
    pub name: &'a str,
    pub dtype: &'static str,
    pub shape: &'a [usize],
    pub bytes: &'a [u8],
}

/// Serialises tensors with string metadata in the safetensors format, deterministically: the
/// header lists tensors and metadata keys in name order, so the same content always gives the
/// same bytes (the safetensors crate keeps metadata in a HashMap, whose order varies per run;
/// resumed training must write files byte-identical to an uninterrupted run).
pub fn safetensors_bytes(tensors: &[RawTensor], meta: &BTreeMap<String, String>) -> Result<Vec<u8>> {
    let (header, order) = layout(tensors, meta)?;
    let mut out = Vec::with_capacity(header.len() + order.iter().map(|t| t.bytes.len()).sum::<usize>());
    out.extend(header);
    order.iter().for_each(|t| out.extend_from_slice(t.bytes));
    Ok(out)
}

/// [`safetensors_bytes`] written to `path` atomically, each tensor's bytes streamed to the file
/// from where they lie (no copy of the whole file in memory: a model's weights, say).
pub fn write_safetensors(path: &Path, tensors: &[RawTensor], meta: &BTreeMap<String, String>) -> Result<()> {
    let (header, order) = layout(tensors, meta)?;
    atomic_write(path, |f| {
        let mut w = std::io::BufWriter::new(f);
        w.write_all(&header)?;
        for t in order {
            w.write_all(t.bytes)?;
        }
        w.flush()
    })
}

/// The safetensors header of `tensors` (its length first) and the tensors in file order.
fn layout<'t, 'a>(tensors: &'t [RawTensor<'a>], meta: &BTreeMap<String, String>) -> Result<(Vec<u8>, Vec<&'t RawTensor<'a>>)> {
    let mut order: Vec<&RawTensor> = tensors.iter().collect();
    order.sort_by_key(|t| t.name);
    let mut header = serde_json::Map::new();
    if !meta.is_empty() {
        header.insert("__metadata__".into(), serde_json::to_value(meta)?);
    }
    let mut offset = 0;
    for t in &order {
        let width = match t.dtype {
            "F32" => 4,
            "U8" => 1,
            other => anyhow::bail!("tensor \"{}\": dtype {other} is not written here", t.name),
        };
        let numel: usize = t.shape.iter().product();
        anyhow::ensure!(numel * width == t.bytes.len(), "tensor \"{}\": {} bytes for shape {:?}", t.name, t.bytes.len(), t.shape);
        let entry = serde_json::json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, offset + t.bytes.len()]});
        header.insert(t.name.to_string(), entry);
        offset += t.bytes.len();
    }
    // serde_json's map keeps keys sorted; the header is padded with spaces to 8-byte alignment.
    let mut text = serde_json::to_string(&header)?.into_bytes();
    text.resize(text.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + text.len());
    out.extend((text.len() as u64).to_le_bytes());
    out.extend(text);
    Ok((out, order))
}

/// Named f32 tensors (name, shape, values) written to `path` atomically as safetensors.
pub fn write_f32_safetensors<'a>(
    path: &Path,
    tensors: impl IntoIterator<Item = (&'a str, &'a [usize], &'a [f32])>,
    meta: &BTreeMap<String, String>,
) -> Result<()> {
    let raw: Vec<RawTensor> =
        tensors.into_iter().map(|(name, shape, v)| RawTensor { name, dtype: "F32", shape, bytes: bytemuck::cast_slice(v) }).collect();
    write_safetensors(path, &raw, meta)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_safetensors_crate_reads_what_we_write() {
        let (a, b) = (vec![1.5f32, -2.0, 3.25], vec![7u8, 0, 255, 1, 2]);
        let meta = BTreeMap::from([("z".to_string(), "last".to_string()), ("a".to_string(), "first".to_string())]);
        let tensors = [
            RawTensor { name: "w", dtype: "F32", shape: &[3, 1], bytes: bytemuck::cast_slice(&a) },
            RawTensor { name: "bits", dtype: "U8", shape: &[5], bytes: &b },
        ];
        let bytes = safetensors_bytes(&tensors, &meta).unwrap();
        assert_eq!(bytes, safetensors_bytes(&tensors, &meta).unwrap());
        // Streamed to a file: the same bytes.
        let dir = tempfile::tempdir().unwrap();
        write_safetensors(&dir.path().join("t.safetensors"), &tensors, &meta).unwrap();
        assert_eq!(std::fs::read(dir.path().join("t.safetensors")).unwrap(), bytes);
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let w = st.tensor("w").unwrap();
        assert_eq!((w.dtype(), w.shape(), w.data()), (safetensors::Dtype::F32, &[3usize, 1][..], bytemuck::cast_slice::<f32, u8>(&a)));
        assert_eq!(st.tensor("bits").unwrap().data(), &b[..]);
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(header.metadata().as_ref().unwrap()["z"], "last");
        assert!(safetensors_bytes(&[RawTensor { name: "x", dtype: "F32", shape: &[2], bytes: &b }], &meta).is_err());
    }
}
