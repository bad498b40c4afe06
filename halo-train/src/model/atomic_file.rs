//! Atomic file replacement: write a unique temporary file in the target's directory, fsync it,
//! rename it over the target, fsync the directory.
//!
//! A reader (or a process started after a kill, a power loss, or a concurrent writer) therefore
//! sees either the old complete file or the new complete file under the final name, never a
//! truncated one and never a mix of two writers: each writer has its own temporary file, and
//! `rename` replaces the whole name at once. A kill leaves at most a temporary file, whose name
//! starts with [`TEMP_PREFIX`]; [`is_temporary`] recognises it and [`remove_temporaries`]
//! cleans a directory of them.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use halo_kernels::error::{HaloError, Result};

/// Prefix of every temporary file; the original file name ends the temporary one, so tools that
/// pick a format from the extension (`.png`) still see it.
pub const TEMP_PREFIX: &str = ".halo-tmp-";

fn io_error(path: &Path, e: std::io::Error) -> HaloError {
    HaloError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// A name no other writer (thread or process) uses at the same time: pid, a per-process counter
/// and the clock.
fn temporary_path(path: &Path) -> Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().ok_or_else(|| HaloError::Io {
        path: path.display().to_string(),
        reason: "not a file name".into(),
    })?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let unique = format!(
        "{TEMP_PREFIX}{}-{}-{nanos}-",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let mut temp = std::ffi::OsString::from(unique);
    temp.push(name);
    Ok(path.with_file_name(temp))
}

/// Whether `name` is a temporary file of [`write_atomically`] (left behind by a killed writer).
pub fn is_temporary(name: &std::ffi::OsStr) -> bool {
    name.to_string_lossy().starts_with(TEMP_PREFIX)
}

/// Writes `path` atomically: `write` fills a fresh temporary file in the same directory (it gets
/// that file's path and must create it), which is then fsynced and renamed over `path`, and the
/// directory is fsynced. On any error the temporary file is removed and `path` is untouched.
pub fn write_atomically(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let temp = temporary_path(path)?;
    let result = write(&temp).and_then(|()| {
        File::open(&temp)
            .and_then(|f| f.sync_all())
            .map_err(|e| io_error(&temp, e))?;
        std::fs::rename(&temp, path).map_err(|e| io_error(path, e))?;
        sync_directory(path)
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

/// [`write_atomically`] with the whole content in memory.
pub fn write_bytes_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomically(path, |temp| {
        let mut file = File::options()
            .write(true)
            .create_new(true)
            .open(temp)
            .map_err(|e| io_error(temp, e))?;
        file.write_all(bytes).map_err(|e| io_error(temp, e))
    })
}

/// Fsyncs the directory holding `path`, so that a rename into it survives a power loss.
fn sync_directory(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    // Directories cannot be opened for syncing on every platform; there it is a no-op.
    if cfg!(unix) {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_error(dir, e))?;
    }
    Ok(())
}

/// Removes the temporary files a killed writer left in `dir` (not recursive); returns how many.
/// Only call it when no other writer is using `dir`.
pub fn remove_temporaries(dir: &Path) -> Result<usize> {
    let mut removed = 0;
    for entry in std::fs::read_dir(dir).map_err(|e| io_error(dir, e))? {
        let entry = entry.map_err(|e| io_error(dir, e))?;
        if is_temporary(&entry.file_name()) {
            std::fs::remove_file(entry.path()).map_err(|e| io_error(&entry.path(), e))?;
            removed += 1;
        }
    }
    Ok(removed)
}
