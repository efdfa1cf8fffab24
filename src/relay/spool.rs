//! The durable queue on disk: `<state.dir>/spool/<id>.msg` (one JSON envelope line, then
//! the message bytes), `<id>.state` (delivery progress), and `<state.dir>/dead/` for messages
//! that will not be delivered (`<id>.msg` plus `<id>.reason`).
//!
//! A message is written to `spool/tmp/`, fsync'd, renamed into `spool/` and the directory
//! fsync'd before the client hears 250, so it survives a crash from then on. Half-written
//! temporary files are discarded at start. A message whose `.state` cannot be read goes to
//! `dead/` rather than being sent again to recipients who may already have it. The file
//! primitives (0700 directories, 0600 files, atomic write + fsync) are `fsutil`'s; when and
//! how messages are delivered is `deliver`'s business.

use crate::fsutil::{create_private_dir, fsync_dir, write_atomic, write_private};
use serde::{Deserialize, Serialize};
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

/// The spool file format version this build writes and reads.
pub const SPOOL_VERSION: u32 = 1;
/// Longest envelope line accepted when reading a spool file back.
const MAX_ENVELOPE_LINE: u64 = 1024 * 1024;

/// Who the message is from and for, as the client gave it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Envelope {
    pub version: u32,
    pub id: String,
    pub account: String,
    pub from: String,
    /// MAIL parameters to forward (e.g. `BODY=8BITMIME SMTPUTF8`), without SIZE.
    pub params: String,
    pub rcpts: Vec<String>,
    /// Unix seconds when the message was accepted.
    pub received_at: u64,
    pub bytes: usize,
}

/// Delivery progress, so a restart never sends to a recipient twice.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Progress {
    pub attempts: u32,
    pub delivered: Vec<String>,
    /// Recipients refused permanently, with the upstream's reply.
    pub failed: Vec<(String, String)>,
    pub last_error: Option<String>,
}

impl Progress {
    /// Recipients still to be tried.
    pub fn pending<'a>(&'a self, env: &'a Envelope) -> impl Iterator<Item = &'a String> + 'a {
        env.rcpts
            .iter()
            .filter(|r| !self.delivered.contains(r) && !self.failed.iter().any(|(f, _)| f == *r))
    }
}

#[derive(Debug, Clone)]
pub struct Spool {
    dir: PathBuf,
    tmp: PathBuf,
    dead: PathBuf,
}

impl Spool {
    /// Creates the directories (0700) and discards half-written temporary files.
    pub fn open(state_dir: &Path) -> io::Result<Spool> {
        let dir = state_dir.join("spool");
        let spool = Spool {
            tmp: dir.join("tmp"),
            dead: state_dir.join("dead"),
            dir,
        };
        for d in [&spool.dir, &spool.tmp, &spool.dead] {
            create_private_dir(d)?;
        }
        for e in fs::read_dir(&spool.tmp)? {
            let p = e?.path();
            tracing::warn!(file = %p.display(), "discarding a half-written spool file");
            fs::remove_file(&p)?;
        }
        Ok(spool)
    }

    fn msg(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.msg"))
    }

    fn state(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.state"))
    }

    /// Stores a message durably. Only after this returns Ok may the client hear 250.
    pub fn store(&self, env: &Envelope, body: &[u8]) -> io::Result<()> {
        let mut line = serde_json::to_vec(env).map_err(io::Error::other)?;
        line.push(b'\n');
        let tmp = self.tmp.join(format!("{}.msg", env.id));
        Ok(write_atomic(&tmp, &self.msg(&env.id), &[&line, body])?)
    }

    /// Every message in the spool with its progress, for resuming after a start.
    pub fn scan(&self) -> io::Result<Vec<(Envelope, Progress)>> {
        let mut out = Vec::new();
        for e in fs::read_dir(&self.dir)? {
            let p = e?.path();
            if p.extension().and_then(|x| x.to_str()) != Some("msg") {
                continue;
            }
            match read_envelope(&p) {
                Ok(env) => match self.read_progress(&env.id) {
                    Ok(progress) => out.push((env, progress)),
                    // Without its progress we cannot tell who already has the message:
                    // sending again could deliver it twice, so it goes to dead/ instead.
                    Err(e) => {
                        let state = self.state(&env.id);
                        tracing::error!(id = %env.id, file = %state.display(), error = %e, "delivery progress unreadable; moving the message to dead");
                        let reason = format!(
                            "delivery progress {} {e}; not retried, so that recipients who already have the message do not get it twice (the file is kept beside it in dead/)",
                            state.display()
                        );
                        if let Err(e) = self.entomb(&env.id, &reason, true) {
                            tracing::error!(id = %env.id, error = %e, "cannot move the message to dead; it stays in the spool and is not delivered");
                        }
                    }
                },
                Err(e) => {
                    tracing::error!(file = %p.display(), error = %e, "unreadable spool file; moving it to dead");
                    let name = p.file_name().map(|n| n.to_os_string()).unwrap_or_default();
                    let _ = fs::rename(&p, self.dead.join(&name));
                    let _ = fs::write(
                        self.dead.join(Path::new(&name).with_extension("reason")),
                        format!("unreadable spool file: {e}\n"),
                    );
                }
            }
        }
        out.sort_by(|a, b| (a.0.received_at, &a.0.id).cmp(&(b.0.received_at, &b.0.id)));
        Ok(out)
    }

    /// The message bytes (after the envelope line).
    pub fn body(&self, id: &str) -> io::Result<Vec<u8>> {
        let mut r = BufReader::new(File::open(self.msg(id))?);
        let mut line = Vec::new();
        (&mut r)
            .take(MAX_ENVELOPE_LINE)
            .read_until(b'\n', &mut line)?;
        let mut body = Vec::new();
        r.read_to_end(&mut body)?;
        Ok(body)
    }

    pub fn save_progress(&self, id: &str, p: &Progress) -> io::Result<()> {
        let tmp = self.tmp.join(format!("{id}.state"));
        let bytes = serde_json::to_vec(p).map_err(io::Error::other)?;
        Ok(write_atomic(&tmp, &self.state(id), &[&bytes])?)
    }

    /// Delivered: the message leaves the spool.
    pub fn remove(&self, id: &str) -> io::Result<()> {
        fs::remove_file(self.msg(id))?;
        let _ = fs::remove_file(self.state(id));
        fsync_dir(&self.dir)
    }

    /// Will not be delivered: moved to `dead/` with the reason beside it.
    pub fn bury(&self, id: &str, reason: &str) -> io::Result<()> {
        self.entomb(id, reason, false)
    }

    /// Moves a message to `dead/` with its reason; its progress file is removed, or moved
    /// beside it when `keep_state` (for the operator to read). The message leaves the spool
    /// before its progress does, so a crash in between never leaves a message without one.
    fn entomb(&self, id: &str, reason: &str, keep_state: bool) -> io::Result<()> {
        write_private(
            &self.dead.join(format!("{id}.reason")),
            &[reason.as_bytes(), b"\n"],
        )?;
        fs::rename(self.msg(id), self.dead.join(format!("{id}.msg")))?;
        if keep_state {
            let _ = fs::rename(self.state(id), self.dead.join(format!("{id}.state")));
        } else {
            let _ = fs::remove_file(self.state(id));
        }
        fsync_dir(&self.dead)?;
        fsync_dir(&self.dir)
    }

    /// A message's delivery progress: none yet if it has no `.state` file.
    fn read_progress(&self, id: &str) -> Result<Progress, StateError> {
        let bytes = match fs::read(self.state(id)) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Progress::default()),
            Err(e) => return Err(StateError::Unreadable(e)),
        };
        serde_json::from_slice(&bytes).map_err(|e| StateError::Corrupt {
            line: e.line(),
            column: e.column(),
        })
    }
}

/// Why a message's `.state` file cannot be used.
#[derive(Debug, thiserror::Error)]
enum StateError {
    #[error("cannot be read: {0}")]
    Unreadable(io::Error),
    #[error("is corrupt (not valid progress JSON at line {line} column {column})")]
    Corrupt { line: usize, column: usize },
}

fn read_envelope(p: &Path) -> io::Result<Envelope> {
    let mut line = Vec::new();
    BufReader::new(File::open(p)?)
        .take(MAX_ENVELOPE_LINE)
        .read_until(b'\n', &mut line)?;
    let env: Envelope = serde_json::from_slice(&line).map_err(io::Error::other)?;
    if env.version > SPOOL_VERSION {
        return Err(io::Error::other(format!(
            "spool format version {} is newer than this build ({SPOOL_VERSION})",
            env.version
        )));
    }
    Ok(env)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(id: &str, at: u64) -> Envelope {
        Envelope {
            version: SPOOL_VERSION,
            id: id.into(),
            account: "a".into(),
            from: "".into(),
            params: "SMTPUTF8".into(),
            rcpts: vec!["x@y".into(), "z@y".into()],
            received_at: at,
            bytes: 5,
        }
    }

    #[test]
    fn store_scan_progress_remove_and_bury() {
        let tmp = tempfile::tempdir().unwrap();
        let s = Spool::open(tmp.path()).unwrap();
        s.store(&env("B", 2), b"bbb\r\n").unwrap();
        s.store(&env("A", 1), b".a\r\n\r\n").unwrap();
        let p = Progress {
            attempts: 1,
            delivered: vec!["x@y".into()],
            ..Progress::default()
        };
        s.save_progress("A", &p).unwrap();
        // A crash mid-write leaves a temporary file, which the next start discards.
        fs::write(tmp.path().join("spool/tmp/C.msg"), b"half").unwrap();
        let s = Spool::open(tmp.path()).unwrap();
        assert!(fs::read_dir(tmp.path().join("spool/tmp"))
            .unwrap()
            .next()
            .is_none());
        let all = s.scan().unwrap();
        assert_eq!(
            all.iter().map(|(e, _)| e.id.as_str()).collect::<Vec<_>>(),
            ["A", "B"]
        );
        assert_eq!(all[0].1, p);
        assert_eq!(all[0].1.pending(&all[0].0).collect::<Vec<_>>(), ["z@y"]);
        assert_eq!(s.body("A").unwrap(), b".a\r\n\r\n");
        s.remove("A").unwrap();
        s.bury("B", "550 5.1.10 gone").unwrap();
        assert!(s.scan().unwrap().is_empty());
        assert_eq!(
            fs::read_to_string(tmp.path().join("dead/B.reason")).unwrap(),
            "550 5.1.10 gone\n"
        );
        assert!(tmp.path().join("dead/B.msg").exists());
    }

    #[test]
    fn corrupt_progress_sends_the_message_to_dead_not_to_delivery() {
        let tmp = tempfile::tempdir().unwrap();
        let s = Spool::open(tmp.path()).unwrap();
        s.store(&env("A", 1), b"aaa\r\n").unwrap();
        s.store(&env("B", 2), b"bbb\r\n").unwrap();
        let p = Progress {
            attempts: 1,
            delivered: vec!["x@y".into()],
            ..Progress::default()
        };
        s.save_progress("A", &p).unwrap();
        let state = tmp.path().join("spool/A.state");
        let mut bytes = fs::read(&state).unwrap();
        bytes.truncate(bytes.len() / 2);
        fs::write(&state, &bytes).unwrap();

        let all = s.scan().unwrap();
        // Only B (no progress yet) is offered for delivery; A is not, to nobody.
        assert_eq!(
            all.iter().map(|(e, _)| e.id.as_str()).collect::<Vec<_>>(),
            ["B"]
        );
        assert_eq!(all[0].1, Progress::default());
        assert!(!tmp.path().join("spool/A.msg").exists());
        assert!(!state.exists());
        assert_eq!(
            fs::read(tmp.path().join("dead/A.msg")).unwrap(),
            [
                &serde_json::to_vec(&env("A", 1)).unwrap()[..],
                b"\n",
                b"aaa\r\n"
            ]
            .concat()
        );
        assert_eq!(fs::read(tmp.path().join("dead/A.state")).unwrap(), bytes);
        let reason = fs::read_to_string(tmp.path().join("dead/A.reason")).unwrap();
        assert!(
            reason.starts_with(&format!("delivery progress {} is corrupt", state.display())),
            "{reason}"
        );
        assert!(reason.ends_with('\n'), "{reason}");
        // A second scan (the next start) still offers only B.
        assert_eq!(s.scan().unwrap().len(), 1);
    }

    #[cfg(unix)]
    #[test]
    fn unreadable_progress_sends_the_message_to_dead() {
        let tmp = tempfile::tempdir().unwrap();
        let s = Spool::open(tmp.path()).unwrap();
        s.store(&env("A", 1), b"aaa\r\n").unwrap();
        // A directory where the file should be: reading it fails (even as root).
        fs::create_dir(tmp.path().join("spool/A.state")).unwrap();
        assert!(s.scan().unwrap().is_empty());
        assert!(tmp.path().join("dead/A.msg").exists());
        let reason = fs::read_to_string(tmp.path().join("dead/A.reason")).unwrap();
        assert!(reason.contains("A.state cannot be read"), "{reason}");
    }
}
