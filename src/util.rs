//! Small shared helpers: atomic file creation (temporary file in the destination folder, synced,
//! renamed into place; removed if never committed).

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

/// A file being written atomically. Write through [`AtomicFile::writer`], then
/// [`AtomicFile::commit`]; dropping it uncommitted removes the temporary file, so an
/// interrupted or failed write never leaves a partial file at the destination.
pub struct AtomicFile {
    tmp: PathBuf,
    target: PathBuf,
    writer: Option<BufWriter<File>>,
}

impl AtomicFile {
    /// Creates the temporary file beside `path`.
    pub fn create(path: &Path) -> io::Result<AtomicFile> {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let name = path.file_name().ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "output path has no file name")
        })?;
        let tmp = dir.join(format!(
            ".{}.tmp-{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        let file = File::options().write(true).create_new(true).open(&tmp)?;
        Ok(AtomicFile {
            tmp,
            target: path.to_path_buf(),
            writer: Some(BufWriter::with_capacity(8 << 20, file)),
        })
    }

    /// Path of the temporary file (for error messages).
    pub fn temp_path(&self) -> &Path {
        &self.tmp
    }

    pub fn writer(&mut self) -> &mut BufWriter<File> {
        self.writer
            .as_mut()
            .expect("writer is present until commit")
    }

    /// Flushes, syncs and renames the file into place.
    pub fn commit(mut self) -> io::Result<()> {
        let w = self.writer.take().expect("commit is called once");
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&self.tmp, &self.target)?;
        // Make the rename durable; some filesystems cannot sync a directory, which is harmless.
        if let Some(dir) = self.target.parent().filter(|p| !p.as_os_str().is_empty()) {
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.writer.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Writes `bytes` to `path` atomically.
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = AtomicFile::create(path)?;
    f.writer().write_all(bytes)?;
    f.commit()
}
