//! Writing outputs so that no reader ever sees half a file.

use std::fs::File;
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

/// Serialises named f32 tensors (name, shape, values) with string metadata as safetensors.
pub fn f32_safetensors<'a>(
    tensors: impl IntoIterator<Item = (&'a str, &'a [usize], &'a [f32])>,
    meta: std::collections::HashMap<String, String>,
) -> Result<Vec<u8>> {
    let views = tensors
        .into_iter()
        .map(|(name, shape, values)| {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.to_vec(), bytemuck::cast_slice(values))
                .with_context(|| format!("tensor \"{name}\": {} values for shape {shape:?}", values.len()))?;
            Ok((name.to_string(), view))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(safetensors::serialize(views, Some(meta).filter(|m| !m.is_empty()))?)
}

/// [`f32_safetensors`] written to `path` atomically.
pub fn write_f32_safetensors<'a>(
    path: &Path,
    tensors: impl IntoIterator<Item = (&'a str, &'a [usize], &'a [f32])>,
    meta: std::collections::HashMap<String, String>,
) -> Result<()> {
    let bytes = f32_safetensors(tensors, meta)?;
    atomic_write(path, |f| std::io::Write::write_all(f, &bytes))
}
