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
