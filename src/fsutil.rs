//! Private, durable files: the one place that creates private directories (0700) and writes
//! private files (0600), atomically and fsync'd.
//!
//! An atomic write goes to a temporary file (created 0600), is written and fsync'd, renamed
//! over the destination, and then the destination's directory is fsync'd, so a crash leaves
//! either the old file or the new one, never a mix. Where the temporary file lives, what the
//! files contain and when to write them is the caller's business (token store, spool).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
#[cfg(unix)]
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A file system operation that failed, with the path it failed on.
#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", path.display())]
pub(crate) struct FsError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

impl FsError {
    fn at(path: &Path) -> impl FnOnce(io::Error) -> FsError + '_ {
        move |source| FsError {
            path: path.to_path_buf(),
            source,
        }
    }
}

impl From<FsError> for io::Error {
    /// Keeps the kind of the underlying error; the message names the path.
    fn from(e: FsError) -> io::Error {
        io::Error::new(e.source.kind(), e)
    }
}

/// Creates `dir` (and parents) with mode 0700 and tightens an existing one to 0700.
pub(crate) fn create_private_dir(dir: &Path) -> io::Result<()> {
    let mut b = fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    b.mode(0o700);
    b.create(dir)?;
    #[cfg(unix)]
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    Ok(())
}

/// Makes the entries of `dir` (creations, renames, removals) durable.
pub(crate) fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates (or truncates) `path` with mode 0600, open for writing.
pub(crate) fn create_private_file(path: &Path) -> io::Result<File> {
    let mut opts = OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    opts.mode(0o600);
    opts.open(path)
}

/// Creates (or truncates) `path` with mode 0600, writes `parts` in order and fsyncs it.
/// Not atomic: a reader may see it half-written; use [`write_atomic`] for that.
pub(crate) fn write_private(path: &Path, parts: &[&[u8]]) -> io::Result<()> {
    let mut f = create_private_file(path)?;
    for p in parts {
        f.write_all(p)?;
    }
    f.sync_all()
}

/// Replaces `dest` atomically and durably with `parts`: writes `tmp` (0600) and fsyncs it,
/// renames it over `dest`, then fsyncs `dest`'s directory. `tmp` must be on the same file
/// system as `dest`; it is removed if the write or the rename fails.
pub(crate) fn write_atomic(tmp: &Path, dest: &Path, parts: &[&[u8]]) -> Result<(), FsError> {
    let written = write_private(tmp, parts)
        .map_err(FsError::at(tmp))
        .and_then(|()| fs::rename(tmp, dest).map_err(FsError::at(dest)));
    if let Err(e) = written {
        let _ = fs::remove_file(tmp);
        return Err(e);
    }
    let dir = parent_dir(dest);
    fsync_dir(dir).map_err(FsError::at(dir))
}

/// The directory holding `path` (`.` for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[cfg(unix)]
    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    /// The names in `dir`, sorted (also used by the spool's tests).
    pub(crate) fn names(dir: &Path) -> Vec<String> {
        let mut n: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        n.sort();
        n
    }

    #[test]
    fn private_dir_is_created_0700_and_an_existing_one_tightened() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("a/b/c");
        create_private_dir(&d).unwrap();
        assert!(d.is_dir());
        #[cfg(unix)]
        {
            assert_eq!(mode(&d), 0o700);
            fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).unwrap();
            create_private_dir(&d).unwrap();
            assert_eq!(mode(&d), 0o700);
        }
    }

    #[test]
    fn atomic_write_content_mode_no_temp_left_and_overwrite() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("d");
        create_private_dir(&dir).unwrap();
        let dest = dir.join("f.json");
        let t = dir.join(".f.json.tmp");
        write_atomic(&t, &dest, &[b"first ", b"part\n"]).unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"first part\n");
        assert_eq!(names(&dir), ["f.json"]);
        #[cfg(unix)]
        assert_eq!(mode(&dest), 0o600);

        // An overwrite replaces the whole file (a shorter content leaves no tail).
        write_atomic(&t, &dest, &[b"2"]).unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"2");
        assert_eq!(names(&dir), ["f.json"]);

        // An existing file with loose permissions is replaced by a 0600 one.
        #[cfg(unix)]
        {
            fs::set_permissions(&dest, fs::Permissions::from_mode(0o644)).unwrap();
            write_atomic(&t, &dest, &[b"3"]).unwrap();
            assert_eq!(mode(&dest), 0o600);
        }
    }

    #[test]
    fn atomic_write_from_another_directory_and_failure_names_the_path() {
        let tmp = tempfile::tempdir().unwrap();
        let (dir, staging) = (tmp.path().join("d"), tmp.path().join("d/tmp"));
        create_private_dir(&staging).unwrap();
        let dest = dir.join("m.msg");
        write_atomic(&staging.join("m.msg"), &dest, &[b"x"]).unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"x");
        assert!(names(&staging).is_empty());

        // The destination's directory does not exist: the rename fails, the temp is removed.
        let missing = dir.join("nope/m.msg");
        let e = write_atomic(&staging.join("m.msg"), &missing, &[b"y"]).unwrap_err();
        assert_eq!(e.path, missing);
        assert_eq!(e.source.kind(), io::ErrorKind::NotFound);
        assert!(e.to_string().starts_with(&missing.display().to_string()));
        assert!(names(&staging).is_empty());
        assert_eq!(io::Error::from(e).kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn write_private_truncates_and_is_0600() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("r.reason");
        write_private(&p, &[b"a long first reason", b"\n"]).unwrap();
        write_private(&p, &[b"short", b"\n"]).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"short\n");
        #[cfg(unix)]
        assert_eq!(mode(&p), 0o600);
        fsync_dir(tmp.path()).unwrap();
        assert!(fsync_dir(&tmp.path().join("missing")).is_err());
    }
}
