//! The durable queue on disk: `<state.dir>/spool/<id>.msg` (one JSON envelope line, then
//! the message bytes), `<id>.state` (delivery progress), and `<state.dir>/dead/` for messages
//! that will not be delivered (`<id>.msg` plus `<id>.reason`).
//!
//! A message streams into `spool/tmp/` as it arrives ([`SpoolWriter`]: only a bounded
//! buffer in memory), is fsync'd, renamed into `spool/` and the directory fsync'd before the
//! client hears 250, so it survives a crash from then on. Half-written temporary files are
//! discarded at start. The spool's total size (message files, and those being written) is
//! tracked and bounded by `queue.max_bytes`, so the token store beside it keeps room. A message whose `.state` cannot be read goes to
//! `dead/` rather than being sent again to recipients who may already have it. The file
//! primitives (0700 directories, 0600 files, atomic write + fsync) are `fsutil`'s; when and
//! how messages are delivered is `deliver`'s business.

use crate::fsutil::{
    create_private_dir, create_private_file, fsync_dir, write_atomic, write_private,
};
use serde::{Deserialize, Serialize};
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The spool file format version this build writes and reads.
pub(crate) const SPOOL_VERSION: u32 = 1;
/// Longest envelope line accepted when reading a spool file back.
const MAX_ENVELOPE_LINE: u64 = 1024 * 1024;

/// Who the message is from and for, as the client gave it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Envelope {
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
pub(crate) struct Progress {
    pub attempts: u32,
    pub delivered: Vec<String>,
    /// Recipients refused permanently, with the upstream's reply.
    pub failed: Vec<(String, String)>,
    pub last_error: Option<String>,
}

impl Progress {
    /// Recipients still to be tried.
    pub(crate) fn pending<'a>(
        &'a self,
        env: &'a Envelope,
    ) -> impl Iterator<Item = &'a String> + 'a {
        env.rcpts
            .iter()
            .filter(|r| !self.delivered.contains(r) && !self.failed.iter().any(|(f, _)| f == *r))
    }
}

/// Room for the decimal `bytes` value in a message file's envelope line, filled in when
/// the message is complete (u64::MAX has 20 digits; JSON allows the spaces after it).
const BYTES_FIELD: usize = 20;

/// Why a message could not be stored.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SpoolError {
    /// Storing it would take the spool past `queue.max_bytes`.
    #[error("the spool is full: {used} of queue.max_bytes = {max} bytes in use")]
    Full { used: u64, max: u64 },
    #[error("the message's account {0} has no queue")]
    UnknownAccount(String),
    /// Sync mode: there is no spool.
    #[error("no spool in sync mode")]
    NotSpooling,
    #[error(transparent)]
    Io(#[from] io::Error),
}

#[derive(Debug, Clone)]
pub(crate) struct Spool {
    dir: PathBuf,
    tmp: PathBuf,
    dead: PathBuf,
    /// Bytes of the message files in `spool/` plus those being written.
    used: Arc<AtomicU64>,
    max_bytes: u64,
}

impl Spool {
    /// Creates the directories (0700), discards half-written temporary files, and counts
    /// what the spool holds against `max_bytes`.
    pub(crate) fn open(state_dir: &Path, max_bytes: u64) -> io::Result<Spool> {
        let dir = state_dir.join("spool");
        let spool = Spool {
            tmp: dir.join("tmp"),
            dead: state_dir.join("dead"),
            dir,
            used: Arc::new(AtomicU64::new(0)),
            max_bytes,
        };
        for d in [&spool.dir, &spool.tmp, &spool.dead] {
            create_private_dir(d)?;
        }
        for e in fs::read_dir(&spool.tmp)? {
            let p = e?.path();
            tracing::warn!(file = %p.display(), "discarding a half-written spool file");
            fs::remove_file(&p)?;
        }
        let mut used = 0u64;
        for e in fs::read_dir(&spool.dir)? {
            let e = e?;
            if e.path().extension().and_then(|x| x.to_str()) == Some("msg") {
                used = used.saturating_add(e.metadata()?.len());
            }
        }
        spool.used.store(used, Ordering::SeqCst);
        Ok(spool)
    }

    /// Bytes the spool holds (message files, and those being written).
    pub(crate) fn used(&self) -> u64 {
        self.used.load(Ordering::SeqCst)
    }

    /// Whether a message of `size` bytes (0: unknown) may still fit under `max_bytes`.
    pub(crate) fn has_room(&self, size: usize) -> bool {
        let used = self.used();
        used < self.max_bytes && used.saturating_add(size as u64) <= self.max_bytes
    }

    /// Counts `n` more bytes against `max_bytes`, or refuses them.
    fn reserve(&self, n: u64) -> Result<(), SpoolError> {
        let max = self.max_bytes;
        self.used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |u| {
                u.checked_add(n).filter(|t| *t <= max)
            })
            .map(|_| ())
            .map_err(|used| SpoolError::Full { used, max })
    }

    /// The spool no longer holds `n` bytes.
    fn release(&self, n: u64) {
        let _ = self
            .used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |u| {
                Some(u.saturating_sub(n))
            });
    }

    /// Starts storing a message: its temporary file with the envelope line. The content
    /// follows with [`SpoolWriter::write`]; only after [`SpoolWriter::commit`] is it stored.
    pub(crate) fn create(&self, env: &Envelope) -> Result<SpoolWriter, SpoolError> {
        let mut head = serde_json::to_vec(&Envelope {
            bytes: 0,
            ..env.clone()
        })
        .map_err(io::Error::other)?;
        // `bytes` is the envelope's last field: `..."bytes":0}` becomes `..."bytes":` and
        // room for the value, filled in at commit.
        if !head.ends_with(b"0}") {
            return Err(io::Error::other("unexpected envelope serialization").into());
        }
        head.truncate(head.len() - 2);
        let bytes_at = head.len() as u64;
        head.extend_from_slice(&[b' '; BYTES_FIELD]);
        head.extend_from_slice(b"}\n");
        let tmp = self.tmp.join(format!("{}.msg", env.id));
        self.reserve(head.len() as u64)?;
        let mut w = SpoolWriter {
            spool: self.clone(),
            file: None,
            dest: self.msg(&env.id),
            tmp,
            reserved: head.len() as u64,
            bytes_at,
            body: 0,
        };
        let mut file = create_private_file(&w.tmp)?;
        file.write_all(&head)?;
        w.file = Some(file);
        Ok(w)
    }

    fn msg(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.msg"))
    }

    fn state(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.state"))
    }

    /// Stores a whole message durably (as [`Spool::create`], one write, commit); the
    /// envelope's `bytes` is the body's length.
    #[cfg(test)]
    pub(crate) fn store(&self, env: &Envelope, body: &[u8]) -> Result<(), SpoolError> {
        let mut w = self.create(env)?;
        w.write(body)?;
        w.commit()?;
        Ok(())
    }

    /// Every message in the spool with its progress, for resuming after a start.
    pub(crate) fn scan(&self) -> io::Result<Vec<(Envelope, Progress)>> {
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
                    let len = fs::metadata(&p).map_or(0, |m| m.len());
                    if fs::rename(&p, self.dead.join(&name)).is_ok() {
                        self.release(len);
                    }
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

    /// The message bytes (after the envelope line), whole.
    #[cfg(test)]
    pub(crate) fn body(&self, id: &str) -> io::Result<Vec<u8>> {
        let mut body = Vec::new();
        self.open_body(id)?.0.read_to_end(&mut body)?;
        Ok(body)
    }

    /// A reader of the message bytes (after the envelope line) and their length, to send
    /// them in pieces.
    pub(crate) fn open_body(&self, id: &str) -> io::Result<(BufReader<File>, u64)> {
        let file = File::open(self.msg(id))?;
        let len = file.metadata()?.len();
        let mut r = BufReader::new(file);
        let mut line = Vec::new();
        (&mut r)
            .take(MAX_ENVELOPE_LINE)
            .read_until(b'\n', &mut line)?;
        Ok((r, len.saturating_sub(line.len() as u64)))
    }

    pub(crate) fn save_progress(&self, id: &str, p: &Progress) -> io::Result<()> {
        let tmp = self.tmp.join(format!("{id}.state"));
        let bytes = serde_json::to_vec(p).map_err(io::Error::other)?;
        Ok(write_atomic(&tmp, &self.state(id), &[&bytes])?)
    }

    /// Delivered: the message leaves the spool.
    pub(crate) fn remove(&self, id: &str) -> io::Result<()> {
        let len = fs::metadata(self.msg(id))?.len();
        fs::remove_file(self.msg(id))?;
        self.release(len);
        let _ = fs::remove_file(self.state(id));
        fsync_dir(&self.dir)
    }

    /// Will not be delivered: moved to `dead/` with the reason beside it.
    pub(crate) fn bury(&self, id: &str, reason: &str) -> io::Result<()> {
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
        let len = fs::metadata(self.msg(id))?.len();
        fs::rename(self.msg(id), self.dead.join(format!("{id}.msg")))?;
        self.release(len);
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

/// A message on its way into the spool: a temporary file written as the content arrives.
/// Dropped without [`SpoolWriter::commit`], the file is removed and its bytes released.
#[derive(Debug)]
pub(crate) struct SpoolWriter {
    spool: Spool,
    file: Option<File>,
    tmp: PathBuf,
    dest: PathBuf,
    /// Bytes counted against `max_bytes` for this file.
    reserved: u64,
    /// Where the envelope's `bytes` value goes.
    bytes_at: u64,
    body: u64,
}

impl SpoolWriter {
    /// Appends content; refused (and nothing more accepted) when the spool would pass
    /// `queue.max_bytes`.
    pub(crate) fn write(&mut self, chunk: &[u8]) -> Result<(), SpoolError> {
        let Some(file) = self.file.as_mut() else {
            return Err(io::Error::other("spool file already failed").into());
        };
        let n = chunk.len() as u64;
        if let Err(e) = self.spool.reserve(n) {
            self.file = None;
            return Err(e);
        }
        self.reserved += n;
        if let Err(e) = file.write_all(chunk) {
            self.file = None;
            return Err(e.into());
        }
        self.body += n;
        Ok(())
    }

    /// Completes the message: its size into the envelope, fsync, rename into the spool,
    /// fsync of the directory. Only after this returns Ok may the client hear 250. Returns
    /// the content's length.
    pub(crate) fn commit(mut self) -> Result<u64, SpoolError> {
        let Some(mut file) = self.file.take() else {
            return Err(io::Error::other("spool file already failed").into());
        };
        file.seek(SeekFrom::Start(self.bytes_at))?;
        file.write_all(self.body.to_string().as_bytes())?;
        file.sync_all()?;
        drop(file);
        fs::rename(&self.tmp, &self.dest)?;
        // From here on the file is the spool's (even if the directory sync fails).
        self.reserved = 0;
        self.tmp = PathBuf::new();
        fsync_dir(&self.spool.dir)?;
        Ok(self.body)
    }
}

impl Drop for SpoolWriter {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            self.file = None;
            let _ = fs::remove_file(&self.tmp);
            self.spool.release(self.reserved);
        }
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
        let s = Spool::open(tmp.path(), u64::MAX).unwrap();
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
        let s = Spool::open(tmp.path(), u64::MAX).unwrap();
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

    fn names(dir: &Path) -> Vec<String> {
        let mut n: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        n.sort();
        n
    }

    #[test]
    fn a_message_streams_in_and_its_size_is_filled_in_at_commit() {
        let tmp = tempfile::tempdir().unwrap();
        let s = Spool::open(tmp.path(), u64::MAX).unwrap();
        let mut w = s.create(&env("A", 1)).unwrap();
        for piece in [&b"Subject: x\r\n"[..], b"\r\n", b"body\r\n"] {
            w.write(piece).unwrap();
        }
        // Not in the spool before the commit.
        assert!(s.scan().unwrap().is_empty());
        assert_eq!(names(&tmp.path().join("spool/tmp")), ["A.msg"]);
        assert_eq!(w.commit().unwrap(), 20);
        assert!(names(&tmp.path().join("spool/tmp")).is_empty());
        let all = s.scan().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(
            all[0].0,
            Envelope {
                bytes: 20,
                ..env("A", 1)
            }
        );
        assert_eq!(s.body("A").unwrap(), b"Subject: x\r\n\r\nbody\r\n");
        let (mut r, len) = s.open_body("A").unwrap();
        let mut body = Vec::new();
        r.read_to_end(&mut body).unwrap();
        assert_eq!((body.len() as u64, len), (20, 20));
        // The used bytes are the file's; a new start counts the same.
        let file = fs::metadata(tmp.path().join("spool/A.msg")).unwrap().len();
        assert_eq!(s.used(), file);
        assert_eq!(Spool::open(tmp.path(), u64::MAX).unwrap().used(), file);
        // Dropped without a commit: nothing kept, nothing counted.
        let mut w = s.create(&env("B", 2)).unwrap();
        w.write(b"half").unwrap();
        drop(w);
        assert!(names(&tmp.path().join("spool/tmp")).is_empty());
        assert_eq!(s.used(), file);
        s.remove("A").unwrap();
        assert_eq!(s.used(), 0);
    }

    #[test]
    fn max_bytes_bounds_what_is_stored_and_written() {
        let tmp = tempfile::tempdir().unwrap();
        let probe = Spool::open(tmp.path(), u64::MAX).unwrap();
        probe.store(&env("P", 1), b"").unwrap();
        let head = probe.used();
        probe.remove("P").unwrap();
        // Room for two messages of 100 bytes, not a third.
        let s = Spool::open(tmp.path(), 2 * (head + 100)).unwrap();
        let head_us = usize::try_from(head).unwrap();
        assert!(s.has_room(100));
        s.store(&env("A", 1), &[b'a'; 100]).unwrap();
        assert!(s.has_room(head_us + 100));
        assert!(!s.has_room(head_us + 101));
        let mut w = s.create(&env("B", 2)).unwrap();
        w.write(&[b'b'; 60]).unwrap();
        // Another message cannot take what B already holds.
        assert!(matches!(
            s.create(&env("C", 3)),
            Err(SpoolError::Full { .. })
        ));
        w.write(&[b'b'; 40]).unwrap();
        assert!(matches!(w.write(b"!"), Err(SpoolError::Full { .. })));
        assert!(w.write(b"").is_err(), "nothing more after a refusal");
        assert!(w.commit().is_err());
        assert!(names(&tmp.path().join("spool/tmp")).is_empty());
        assert_eq!(names(&tmp.path().join("spool")), ["A.msg", "tmp"]);
        assert_eq!(s.used(), head + 100);
        // Burying frees the room too.
        s.bury("A", "x").unwrap();
        assert_eq!(s.used(), 0);
        assert!(s.has_room(2 * head_us + 200));
    }

    #[test]
    fn corrupt_progress_sends_the_message_to_dead_not_to_delivery() {
        let tmp = tempfile::tempdir().unwrap();
        let s = Spool::open(tmp.path(), u64::MAX).unwrap();
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
        let dead = fs::read(tmp.path().join("dead/A.msg")).unwrap();
        let nl = dead.iter().position(|b| *b == b'\n').unwrap();
        let head: Envelope = serde_json::from_slice(&dead[..nl]).unwrap();
        assert_eq!(head, env("A", 1));
        assert_eq!(&dead[nl + 1..], b"aaa\r\n");
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
        let s = Spool::open(tmp.path(), u64::MAX).unwrap();
        s.store(&env("A", 1), b"aaa\r\n").unwrap();
        // A directory where the file should be: reading it fails (even as root).
        fs::create_dir(tmp.path().join("spool/A.state")).unwrap();
        assert!(s.scan().unwrap().is_empty());
        assert!(tmp.path().join("dead/A.msg").exists());
        let reason = fs::read_to_string(tmp.path().join("dead/A.reason")).unwrap();
        assert!(reason.contains("A.state cannot be read"), "{reason}");
    }
}
