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
//!
//! Off the async worker threads: a file or directory fsync can take tens of milliseconds on a
//! busy or networked disk, and on a runtime worker thread it would stall every session that
//! thread serves. So the async callers (a session's [`SpoolSink`], the deliverer's progress,
//! removal and dead-letter writes) run the blocking part in tokio's blocking pool through
//! [`Spool::off_thread`], at most [`MAX_DISK_OPS`] at once (a semaphore; tokio's pool would
//! otherwise grow to 512 threads). We chose `spawn_blocking` per operation over one writer
//! thread with group commit: each message needs its own file fsync anyway, and a single
//! thread would queue those one behind another (one slow message delays all the others),
//! while concurrent fsyncs on one file system are already merged by its journal (ext4, XFS
//! commit them together). A message costs one hop per [`WRITE_BATCH`] of content (a 10 KiB
//! message: one hop in all, for create + write + fsync + rename + directory fsync), a few
//! microseconds against the fsync itself, so per-message latency stays what the disk makes it.

use crate::fsutil::{
    create_private_dir, create_private_file, fsync_dir, write_atomic, write_private,
};
use serde::{Deserialize, Serialize};
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

/// The spool file format version this build writes and reads.
pub(crate) const SPOOL_VERSION: u32 = 1;
/// Longest envelope line accepted when reading a spool file back.
const MAX_ENVELOPE_LINE: u64 = 1024 * 1024;
/// Longest header line `queue show` reads (longer ones are cut).
const MAX_HEADER_LINE: u64 = 64 * 1024;
/// Most header bytes `queue show` prints.
const MAX_HEADERS: usize = 64 * 1024;
/// Spool operations (fsync, create, rename) running in the blocking pool at once: more would
/// not make one disk faster, and tokio's blocking pool (512 threads) is shared.
pub(crate) const MAX_DISK_OPS: usize = 16;
/// Content a [`SpoolSink`] collects before it hands it to the blocking pool: one hop per
/// 256 KiB (a small message makes a single hop, at commit), and a bounded buffer per session.
pub(crate) const WRITE_BATCH: usize = 256 * 1024;

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

/// Delivery progress, so a restart never sends to a recipient twice. Fields added after
/// the first edition have serde defaults, so older `.state` files still load.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Progress {
    pub attempts: u32,
    pub delivered: Vec<String>,
    /// Recipients refused permanently, with the upstream's reply.
    pub failed: Vec<(String, String)>,
    pub last_error: Option<String>,
    /// The last [`MAX_HISTORY`] attempts, oldest first (for `queue show`).
    #[serde(default)]
    pub history: Vec<Attempt>,
    /// Unix seconds of the next attempt, when one is scheduled (for `queue list`).
    #[serde(default)]
    pub next_attempt: Option<u64>,
    /// Unix seconds when an operator moved the message back from `dead/`: `max_age` counts
    /// from then, not from its arrival.
    #[serde(default)]
    pub requeued_at: Option<u64>,
    /// A delivery status notification this bridge wrote: if it cannot be delivered either,
    /// it is logged and dropped (never a report about a report).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dsn: bool,
}

/// How many attempts a message's progress remembers (the oldest are dropped).
pub const MAX_HISTORY: usize = 20;

/// One delivery attempt: when, and the upstream's reply (code 0: no reply, e.g. no
/// connection; the text says why).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Attempt {
    pub at: u64,
    pub code: u16,
    pub reply: String,
}

impl Progress {
    /// Recipients still to be tried.
    pub fn pending<'a>(&'a self, env: &'a Envelope) -> impl Iterator<Item = &'a String> + 'a {
        env.rcpts
            .iter()
            .filter(|r| !self.delivered.contains(r) && !self.failed.iter().any(|(f, _)| f == *r))
    }

    /// Records an attempt's reply, keeping the last [`MAX_HISTORY`].
    pub fn record(&mut self, at: u64, code: u16, reply: &str) {
        if self.history.len() >= MAX_HISTORY {
            let excess = self.history.len() + 1 - MAX_HISTORY;
            self.history.drain(..excess);
        }
        self.history.push(Attempt {
            at,
            code,
            reply: reply.to_string(),
        });
    }

    /// Unix seconds from which `queue.max_age` counts: arrival, or the last requeue.
    pub fn age_from(&self, env: &Envelope) -> u64 {
        self.requeued_at
            .map_or(env.received_at, |r| r.max(env.received_at))
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
pub struct Spool {
    dir: PathBuf,
    tmp: PathBuf,
    dead: PathBuf,
    /// Bytes of the message files in `spool/` plus those being written.
    used: Arc<AtomicU64>,
    max_bytes: u64,
    /// Bounds the spool operations in the blocking pool ([`MAX_DISK_OPS`]).
    disk: Arc<Semaphore>,
    /// Runs before a message file's fsync (tests: a slow disk).
    #[cfg(test)]
    sync_hook: SyncHook,
}

/// A function run before each message file's fsync, shared by the clones of a spool.
#[cfg(test)]
#[derive(Clone, Default)]
pub(crate) struct SyncHook(Arc<std::sync::Mutex<Option<HookFn>>>);

#[cfg(test)]
type HookFn = Arc<dyn Fn() + Send + Sync>;

#[cfg(test)]
impl std::fmt::Debug for SyncHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SyncHook")
    }
}

#[cfg(test)]
impl SyncHook {
    pub(crate) fn set(&self, f: impl Fn() + Send + Sync + 'static) {
        *crate::sync::lock(&self.0) = Some(Arc::new(f));
    }

    fn run(&self) {
        let f = crate::sync::lock(&self.0).clone();
        if let Some(f) = f {
            f();
        }
    }
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
            disk: Arc::new(Semaphore::new(MAX_DISK_OPS)),
            #[cfg(test)]
            sync_hook: SyncHook::default(),
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

    /// Runs `f` (file operations that may wait on the disk) in tokio's blocking pool, at most
    /// [`MAX_DISK_OPS`] at once, so that an async caller's worker thread serves its other
    /// tasks meanwhile. Cancelling the caller does not cancel `f`: it runs to its end (and
    /// drops what it returns), holding its permit.
    pub(crate) async fn off_thread<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&Spool) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<io::Error> + Send + 'static,
    {
        let permit = self
            .disk
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| io::Error::other("spool closed"))?;
        let spool = self.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            f(&spool)
        })
        .await
        .map_err(|e| io::Error::other(format!("spool operation did not finish: {e}")))?
    }

    /// [`Spool::save_progress`] off the async worker threads.
    pub(crate) async fn save_progress_async(&self, id: &str, p: &Progress) -> io::Result<()> {
        let (id, p) = (id.to_string(), p.clone());
        self.off_thread(move |s| s.save_progress(&id, &p)).await
    }

    /// [`Spool::remove`] off the async worker threads.
    pub(crate) async fn remove_async(&self, id: &str) -> io::Result<()> {
        let id = id.to_string();
        self.off_thread(move |s| s.remove(&id)).await
    }

    /// [`Spool::bury`] off the async worker threads.
    pub(crate) async fn bury_async(&self, id: &str, reason: &str) -> io::Result<()> {
        let (id, reason) = (id.to_string(), reason.to_string());
        self.off_thread(move |s| s.bury(&id, &reason)).await
    }

    /// Starts storing a message from async code: nothing touches the disk until the content
    /// reaches [`WRITE_BATCH`] or the commit.
    pub(crate) fn sink(&self, env: &Envelope) -> SpoolSink {
        SpoolSink {
            spool: self.clone(),
            env: env.clone(),
            writer: None,
            buf: Vec::new(),
            failed: false,
        }
    }

    /// The hook run before each message file's fsync.
    #[cfg(test)]
    pub(crate) fn sync_hook(&self) -> &SyncHook {
        &self.sync_hook
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
            out.extend(self.load(&p));
        }
        out.sort_by(|a, b| (a.0.received_at, &a.0.id).cmp(&(b.0.received_at, &b.0.id)));
        Ok(out)
    }

    /// One message file of the spool with its progress; one that cannot be read, or whose
    /// progress cannot, goes to `dead/` (and None).
    pub(crate) fn load(&self, p: &Path) -> Option<(Envelope, Progress)> {
        {
            match read_envelope(p) {
                Ok(env) => match self.read_progress(&env.id) {
                    Ok(progress) => return Some((env, progress)),
                    // Without its progress we cannot tell who already has the message:
                    // sending again could deliver it twice, so it goes to dead/ instead.
                    Err(e) => {
                        let state = self.state(&env.id);
                        tracing::error!(id = %env.id, file = %state.display(), error = %e, "delivery progress unreadable; moving the message to dead");
                        let reason = format!(
                            "delivery progress {} {e}; not retried, so that recipients who already have the message do not get it twice (the file is kept beside it in dead/)",
                            state.display()
                        );
                        if let Err(e) = self.entomb(&env.id, &reason) {
                            tracing::error!(id = %env.id, error = %e, "cannot move the message to dead; it stays in the spool and is not delivered");
                        }
                    }
                },
                // Delivered, deleted or moved to dead/ since the directory was listed.
                Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
                Err(e) => {
                    tracing::error!(file = %p.display(), error = %e, "unreadable spool file; moving it to dead");
                    let name = p.file_name().map(|n| n.to_os_string()).unwrap_or_default();
                    let len = fs::metadata(p).map_or(0, |m| m.len());
                    if fs::rename(p, self.dead.join(&name)).is_ok() {
                        self.release(len);
                    }
                    let _ = fs::write(
                        self.dead.join(Path::new(&name).with_extension("reason")),
                        format!("unreadable spool file: {e}\n"),
                    );
                }
            }
        }
        None
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

    /// Removes a progress file written for a message that was then not stored.
    pub(crate) fn remove_progress(&self, id: &str) -> io::Result<()> {
        fs::remove_file(self.state(id))
    }

    /// Whether the message file was written (or renamed into place with a new time) within
    /// `d`: a file that new may be a writer's that is about to queue it itself.
    pub(crate) fn is_fresh(&self, id: &str, d: Duration) -> bool {
        fs::metadata(self.msg(id))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age < d)
    }

    /// Delivered: the message leaves the spool.
    pub(crate) fn remove(&self, id: &str) -> io::Result<()> {
        let len = fs::metadata(self.msg(id))?.len();
        fs::remove_file(self.msg(id))?;
        self.release(len);
        let _ = fs::remove_file(self.state(id));
        let _ = fs::remove_file(self.retry_marker(id));
        fsync_dir(&self.dir)
    }

    /// Will not be delivered: moved to `dead/` with the reason beside it.
    /// Its progress goes beside it (attempts for `queue show`, and who already has it for
    /// `queue retry --dead`).
    pub fn bury(&self, id: &str, reason: &str) -> io::Result<()> {
        self.entomb(id, reason)
    }

    /// Moves a message to `dead/` with its reason, its progress file beside it (for the
    /// operator to read, and for a requeue to know who already has it). The message leaves
    /// the spool before its progress does, so a crash in between never leaves a message in
    /// the spool without one.
    fn entomb(&self, id: &str, reason: &str) -> io::Result<()> {
        write_private(
            &self.dead.join(format!("{id}.reason")),
            &[reason.as_bytes(), b"\n"],
        )?;
        let len = fs::metadata(self.msg(id))?.len();
        fs::rename(self.msg(id), self.dead.join(format!("{id}.msg")))?;
        self.release(len);
        let _ = fs::rename(self.state(id), self.dead.join(format!("{id}.state")));
        let _ = fs::remove_file(self.retry_marker(id));
        fsync_dir(&self.dead)?;
        fsync_dir(&self.dir)
    }

    /// A message's delivery progress: none yet if it has no `.state` file.
    fn read_progress(&self, id: &str) -> Result<Progress, StateError> {
        read_state(&self.state(id))
    }
}

/// How long a `queue` command waits for a delivery in flight to finish before it gives up
/// on a message (an attempt is bounded by the upstream timeouts, which are far shorter).
pub const CONTROL_LOCK_WAIT: Duration = Duration::from_secs(120);
/// How often a waiting `queue` command tries the lock again.
const CONTROL_LOCK_POLL: Duration = Duration::from_millis(50);

/// An exclusive lock (`flock`) on one message file. A delivery attempt holds it from start
/// to end; `queue` commands take it before they move, remove or requeue the message, so the
/// two never act on the same message at once. Dropped, the lock is released.
#[derive(Debug)]
pub struct MsgLock {
    _file: File,
}

/// What trying a message's lock found.
#[derive(Debug)]
pub enum Locked {
    Held(MsgLock),
    /// Someone else holds it (a delivery in flight, or a `queue` command).
    Busy,
    /// The file is not there (any more): delivered, moved or removed.
    Gone,
}

/// Why a `queue` command could not act on a message.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("unknown message id {0}")]
    Unknown(String),
    #[error("message {0} is in dead/; use --dead")]
    IsDead(String),
    #[error("message {0} is still being delivered; try again")]
    Busy(String),
    #[error("message {id}: delivery progress {reason}; requeueing it could deliver it twice (fix or remove {id}.state in dead/ first)")]
    Progress { id: String, reason: String },
    #[error("message {id}: {source}")]
    Io {
        id: String,
        #[source]
        source: io::Error,
    },
}

/// A message as `queue list` and `queue show` see it.
#[derive(Debug, Clone)]
pub struct Entry {
    pub env: Envelope,
    pub progress: Progress,
    /// Its `.state` could not be read (why); `progress` is then empty.
    pub progress_error: Option<String>,
    /// In `dead/`: why it is there.
    pub dead_reason: Option<String>,
    /// `queue retry` asked for it and the running `serve` has not taken it up yet.
    pub retry_requested: bool,
}

/// Whether `id` can be a message id of ours (letters and digits only: never a path).
pub fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// Tries the lock on the message file at `path`.
fn try_lock_at(path: &Path) -> io::Result<Locked> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Locked::Gone),
        Err(e) => return Err(e),
    };
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => return Ok(Locked::Busy),
        Err(std::fs::TryLockError::Error(e)) => return Err(e),
    }
    // Whoever held it before may have moved or removed it: the lock counts only if the
    // path still names the file we locked.
    if !same_file(&file, path)? {
        return Ok(Locked::Gone);
    }
    Ok(Locked::Held(MsgLock { _file: file }))
}

#[cfg(unix)]
fn same_file(file: &File, path: &Path) -> io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let held = file.metadata()?;
    match fs::metadata(path) {
        Ok(now) => Ok(now.dev() == held.dev() && now.ino() == held.ino()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(not(unix))]
fn same_file(_file: &File, path: &Path) -> io::Result<bool> {
    Ok(path.exists())
}

/// Waits (up to [`CONTROL_LOCK_WAIT`]) for the lock on the message file at `path`.
fn lock_at(path: &Path, id: &str) -> Result<Option<MsgLock>, ControlError> {
    let deadline = std::time::Instant::now() + CONTROL_LOCK_WAIT;
    loop {
        match try_lock_at(path).map_err(|source| ControlError::Io {
            id: id.to_string(),
            source,
        })? {
            Locked::Held(l) => return Ok(Some(l)),
            Locked::Gone => return Ok(None),
            Locked::Busy if std::time::Instant::now() >= deadline => {
                return Err(ControlError::Busy(id.to_string()))
            }
            Locked::Busy => std::thread::sleep(CONTROL_LOCK_POLL),
        }
    }
}

/// Queue control: what `queue list|show|retry|delete` do, safe while `serve` runs.
///
/// The hand-off with a running `serve`: every change to a message file happens under its
/// [`MsgLock`], which a delivery attempt holds throughout, so a command waits for an attempt
/// in flight and an attempt never starts on a message a command is changing. `retry` does
/// not touch the message: it leaves a `<id>.retry` marker that `serve` picks up (within a
/// second) and makes the message due at once. `serve` also notices message files that
/// appear (requeued from `dead/`) and vanish (deleted).
impl Spool {
    /// The spool of `state_dir` for queue control: nothing is created, discarded or counted
    /// (a running `serve` owns those).
    pub fn at(state_dir: &Path) -> Spool {
        let dir = state_dir.join("spool");
        Spool {
            tmp: dir.join("tmp"),
            dead: state_dir.join("dead"),
            dir,
            used: Arc::new(AtomicU64::new(0)),
            max_bytes: u64::MAX,
            disk: Arc::new(Semaphore::new(MAX_DISK_OPS)),
            #[cfg(test)]
            sync_hook: SyncHook::default(),
        }
    }

    fn retry_marker(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.retry"))
    }

    /// Tries the lock on a spooled message (a delivery attempt does, and skips the message
    /// when it is busy).
    pub fn try_lock(&self, id: &str) -> io::Result<Locked> {
        try_lock_at(&self.msg(id))
    }

    /// The message file's size in bytes (what it counts against `max_bytes`).
    pub(crate) fn file_len(&self, id: &str) -> u64 {
        fs::metadata(self.msg(id)).map_or(0, |m| m.len())
    }

    /// Counts bytes that appeared in the spool without [`Spool::create`] (a requeue).
    pub(crate) fn adopt(&self, n: u64) {
        self.used.fetch_add(n, Ordering::SeqCst);
    }

    /// Bytes that left the spool without this process (a `queue delete`).
    pub(crate) fn disown(&self, n: u64) {
        self.release(n);
    }

    /// The ids of the message files in the spool, and of the retry markers.
    pub(crate) fn ids(&self) -> io::Result<(Vec<String>, Vec<String>)> {
        let (mut msgs, mut retries) = (Vec::new(), Vec::new());
        for e in fs::read_dir(&self.dir)? {
            let p = e?.path();
            let (Some(stem), Some(ext)) = (
                p.file_stem().and_then(|x| x.to_str()),
                p.extension().and_then(|x| x.to_str()),
            ) else {
                continue;
            };
            match ext {
                "msg" => msgs.push(stem.to_string()),
                "retry" => retries.push(stem.to_string()),
                _ => {}
            }
        }
        Ok((msgs, retries))
    }

    /// A message file's path in the spool (for [`Spool::load`]).
    pub(crate) fn msg_path(&self, id: &str) -> PathBuf {
        self.msg(id)
    }

    /// `serve` took up a retry request.
    pub(crate) fn clear_retry(&self, id: &str) {
        let _ = fs::remove_file(self.retry_marker(id));
    }

    /// Every message in the spool (or in `dead/`), oldest first; changes nothing.
    pub fn entries(&self, dead: bool) -> io::Result<Vec<Entry>> {
        let dir = if dead { &self.dead } else { &self.dir };
        let mut out = Vec::new();
        let rd = match fs::read_dir(dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e),
        };
        for e in rd {
            let p = e?.path();
            if p.extension().and_then(|x| x.to_str()) != Some("msg") {
                continue;
            }
            let Some(id) = p.file_stem().and_then(|x| x.to_str()) else {
                continue;
            };
            if let Some(entry) = self.read_entry(id, dead) {
                out.push(entry);
            }
        }
        out.sort_by(|a, b| (a.env.received_at, &a.env.id).cmp(&(b.env.received_at, &b.env.id)));
        Ok(out)
    }

    /// One message, from the spool or else `dead/`.
    pub fn entry(&self, id: &str) -> Option<Entry> {
        if !valid_id(id) {
            return None;
        }
        self.read_entry(id, false)
            .or_else(|| self.read_entry(id, true))
    }

    fn read_entry(&self, id: &str, dead: bool) -> Option<Entry> {
        let dir = if dead { &self.dead } else { &self.dir };
        let env = read_envelope(&dir.join(format!("{id}.msg"))).ok()?;
        let (progress, progress_error) = match read_state(&dir.join(format!("{id}.state"))) {
            Ok(p) => (p, None),
            Err(e) => (Progress::default(), Some(e.to_string())),
        };
        let dead_reason = dead.then(|| {
            fs::read_to_string(self.dead.join(format!("{id}.reason")))
                .map(|r| r.trim_end().to_string())
                .unwrap_or_default()
        });
        Some(Entry {
            env,
            progress,
            progress_error,
            dead_reason,
            retry_requested: !dead && self.retry_marker(id).exists(),
        })
    }

    /// The message's header block (up to the first empty line, at most 64 KiB).
    pub fn headers(&self, id: &str, dead: bool) -> io::Result<Vec<u8>> {
        let dir = if dead { &self.dead } else { &self.dir };
        let mut r = BufReader::new(File::open(dir.join(format!("{id}.msg")))?);
        let mut line = Vec::new();
        (&mut r)
            .take(MAX_ENVELOPE_LINE)
            .read_until(b'\n', &mut line)?;
        let mut out = Vec::new();
        loop {
            line.clear();
            let n = (&mut r)
                .take(MAX_HEADER_LINE)
                .read_until(b'\n', &mut line)?;
            if n == 0 || line == b"\r\n" || line == b"\n" || out.len() >= MAX_HEADERS {
                break;
            }
            out.extend_from_slice(&line);
        }
        Ok(out)
    }

    /// `queue retry ID`: due now. The running `serve` takes the marker up.
    pub fn request_retry(&self, id: &str) -> Result<(), ControlError> {
        let io = |source| ControlError::Io {
            id: id.to_string(),
            source,
        };
        if !valid_id(id) {
            return Err(ControlError::Unknown(id.to_string()));
        }
        if !self.msg(id).exists() {
            return Err(if self.dead.join(format!("{id}.msg")).exists() {
                ControlError::IsDead(id.to_string())
            } else {
                ControlError::Unknown(id.to_string())
            });
        }
        write_private(&self.retry_marker(id), &[b""]).map_err(io)?;
        Ok(())
    }

    /// `queue retry --dead ID`: moves a dead message back into the spool. Recipients it was
    /// delivered to stay delivered; those refused are tried again, and `max_age` counts from
    /// now. Its progress arrives in the spool before the message does, so `serve` never
    /// sees the message without it.
    pub fn requeue(&self, id: &str) -> Result<Envelope, ControlError> {
        let io = |source| ControlError::Io {
            id: id.to_string(),
            source,
        };
        if !valid_id(id) {
            return Err(ControlError::Unknown(id.to_string()));
        }
        let path = self.dead.join(format!("{id}.msg"));
        let Some(_lock) = lock_at(&path, id)? else {
            return Err(ControlError::Unknown(id.to_string()));
        };
        let env = read_envelope(&path).map_err(io)?;
        let dead_state = self.dead.join(format!("{id}.state"));
        let mut progress = read_state(&dead_state).map_err(|e| ControlError::Progress {
            id: id.to_string(),
            reason: e.to_string(),
        })?;
        progress.failed.clear();
        progress.next_attempt = None;
        progress.requeued_at = Some(crate::clock::unix_now());
        self.save_progress(id, &progress).map_err(io)?;
        fs::rename(&path, self.msg(id)).map_err(io)?;
        let _ = fs::remove_file(&dead_state);
        let _ = fs::remove_file(self.dead.join(format!("{id}.reason")));
        fsync_dir(&self.dir).map_err(io)?;
        fsync_dir(&self.dead).map_err(io)?;
        Ok(env)
    }

    /// `queue delete ID`: removes a message from the spool (or from `dead/`), after any
    /// delivery in flight is over. The message file goes first, so `serve` never delivers
    /// one whose progress is gone.
    pub fn delete(&self, id: &str, dead: bool) -> Result<Envelope, ControlError> {
        let io = |source| ControlError::Io {
            id: id.to_string(),
            source,
        };
        if !valid_id(id) {
            return Err(ControlError::Unknown(id.to_string()));
        }
        let dir = if dead { &self.dead } else { &self.dir };
        let path = dir.join(format!("{id}.msg"));
        let Some(_lock) = lock_at(&path, id)? else {
            return Err(ControlError::Unknown(id.to_string()));
        };
        let env = read_envelope(&path).map_err(io)?;
        fs::remove_file(&path).map_err(io)?;
        for ext in ["state", "retry", "reason"] {
            let _ = fs::remove_file(dir.join(format!("{id}.{ext}")));
        }
        fsync_dir(dir).map_err(io)?;
        Ok(env)
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
        #[cfg(test)]
        self.spool.sync_hook.run();
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

/// A message on its way into the spool from async code (a session in spool mode): content
/// collects in memory up to [`WRITE_BATCH`], then the blocking pool creates the temporary
/// file and writes it ([`Spool::off_thread`]); [`SpoolSink::commit`] writes the rest, fsyncs,
/// renames and fsyncs the directory there too. The `queue.max_bytes` reservation happens as
/// the content reaches the file, so a full spool is found at the first batch or the commit.
/// Dropped without a commit, the temporary file is removed (off the worker thread too).
#[derive(Debug)]
pub(crate) struct SpoolSink {
    spool: Spool,
    env: Envelope,
    /// The file, once the first batch was written.
    writer: Option<SpoolWriter>,
    buf: Vec<u8>,
    /// A batch failed: nothing more is accepted.
    failed: bool,
}

impl SpoolSink {
    /// Appends content, writing a full batch in the blocking pool. After an error (a full
    /// spool, a failed write) nothing more is accepted.
    pub(crate) async fn write(&mut self, chunk: &[u8]) -> Result<(), SpoolError> {
        if self.failed {
            return Err(io::Error::other("spool file already failed").into());
        }
        self.buf.extend_from_slice(chunk);
        if self.buf.len() < WRITE_BATCH {
            return Ok(());
        }
        let (writer, buf, env) = (
            self.writer.take(),
            std::mem::take(&mut self.buf),
            self.env.clone(),
        );
        let written = self
            .spool
            .off_thread(move |s| {
                let mut w = match writer {
                    Some(w) => w,
                    None => s.create(&env)?,
                };
                w.write(&buf)?;
                Ok::<_, SpoolError>((w, buf))
            })
            .await;
        match written {
            Ok((w, mut buf)) => {
                buf.clear();
                self.writer = Some(w);
                self.buf = buf;
                Ok(())
            }
            Err(e) => {
                self.failed = true;
                Err(e)
            }
        }
    }

    /// Completes the message in the blocking pool ([`SpoolWriter::commit`]). Only after this
    /// returns Ok may the client hear 250. Returns the content's length.
    pub(crate) async fn commit(mut self) -> Result<u64, SpoolError> {
        if self.failed {
            return Err(io::Error::other("spool file already failed").into());
        }
        let (writer, buf, env) = (
            self.writer.take(),
            std::mem::take(&mut self.buf),
            self.env.clone(),
        );
        self.spool
            .off_thread(move |s| {
                let mut w = match writer {
                    Some(w) => w,
                    None => s.create(&env)?,
                };
                if !buf.is_empty() {
                    w.write(&buf)?;
                }
                w.commit()
            })
            .await
    }
}

impl Drop for SpoolSink {
    fn drop(&mut self) {
        let Some(w) = self.writer.take() else { return };
        // Removing the temporary file is a disk operation too.
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                let spool = self.spool.clone();
                rt.spawn(async move {
                    let _ = spool
                        .off_thread(move |_| {
                            drop(w);
                            Ok::<_, io::Error>(())
                        })
                        .await;
                });
            }
            Err(_) => drop(w),
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

/// A `.state` file's progress: none yet if there is no file.
fn read_state(path: &Path) -> Result<Progress, StateError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Progress::default()),
        Err(e) => return Err(StateError::Unreadable(e)),
    };
    serde_json::from_slice(&bytes).map_err(|e| StateError::Corrupt {
        line: e.line(),
        column: e.column(),
    })
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

    use crate::fsutil::tests::names;

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

    #[tokio::test]
    async fn a_sink_writes_in_batches_off_thread_and_commits_the_exact_content() {
        let tmp = tempfile::tempdir().unwrap();
        let s = Spool::open(tmp.path(), u64::MAX).unwrap();
        let piece: Vec<u8> = (0..100 * 1024).map(|i| b'a' + (i % 26) as u8).collect();
        let mut k = s.sink(&env("A", 1));
        k.write(&piece).await.unwrap();
        k.write(&piece).await.unwrap();
        // Under a batch: nothing on disk yet.
        assert!(names(&tmp.path().join("spool/tmp")).is_empty());
        k.write(&piece).await.unwrap();
        // A batch is written: the temporary file exists, the spool does not list it.
        assert_eq!(names(&tmp.path().join("spool/tmp")), ["A.msg"]);
        assert!(s.scan().unwrap().is_empty());
        k.write(b"tail\r\n").await.unwrap();
        assert_eq!(k.commit().await.unwrap(), 3 * 100 * 1024 + 6);
        let mut want = [&piece[..], &piece, &piece].concat();
        want.extend_from_slice(b"tail\r\n");
        assert_eq!(s.body("A").unwrap(), want);
        assert!(names(&tmp.path().join("spool/tmp")).is_empty());
        assert_eq!(s.used(), s.file_len("A"));
        // A small message: one commit makes the whole file.
        let mut k = s.sink(&env("B", 2));
        k.write(b"small\r\n").await.unwrap();
        assert_eq!(k.commit().await.unwrap(), 7);
        assert_eq!(s.body("B").unwrap(), b"small\r\n");
        // Dropped after a batch: the temporary file is removed (in the blocking pool, under
        // the gate: once every permit is free again, the removal is done).
        let used = s.used();
        let mut k = s.sink(&env("C", 3));
        k.write(&[&piece[..], &piece, &piece].concat())
            .await
            .unwrap();
        assert_eq!(names(&tmp.path().join("spool/tmp")), ["C.msg"]);
        drop(k);
        tokio::task::yield_now().await;
        drop(s.disk.acquire_many(MAX_DISK_OPS as u32).await.unwrap());
        assert!(names(&tmp.path().join("spool/tmp")).is_empty());
        assert_eq!(s.used(), used);
    }

    #[tokio::test]
    async fn a_full_spool_refuses_a_sink_at_its_first_batch() {
        let tmp = tempfile::tempdir().unwrap();
        let s = Spool::open(tmp.path(), 1000).unwrap();
        let mut k = s.sink(&env("A", 1));
        assert!(matches!(
            k.write(&vec![b'x'; WRITE_BATCH]).await,
            Err(SpoolError::Full { max: 1000, .. })
        ));
        assert!(
            k.write(b"more").await.is_err(),
            "nothing more after a refusal"
        );
        assert!(k.commit().await.is_err());
        assert!(names(&tmp.path().join("spool/tmp")).is_empty());
        assert_eq!(s.used(), 0);
        // Too big only at the commit: refused there, nothing kept.
        let mut k = s.sink(&env("B", 2));
        k.write(&[b'y'; 999]).await.unwrap();
        assert!(matches!(k.commit().await, Err(SpoolError::Full { .. })));
        assert_eq!(names(&tmp.path().join("spool")), ["tmp"]);
        assert!(names(&tmp.path().join("spool/tmp")).is_empty());
        assert_eq!(s.used(), 0);
    }

    /// More commits than [`MAX_DISK_OPS`] at once: at most that many are in the blocking
    /// pool together (their fsync held until the test lets one go), and all complete.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn spool_operations_in_the_blocking_pool_are_bounded() {
        use std::sync::atomic::AtomicUsize;
        use std::sync::{Condvar, Mutex};
        let tmp = tempfile::tempdir().unwrap();
        let s = Spool::open(tmp.path(), u64::MAX).unwrap();
        let n = MAX_DISK_OPS + 4;
        let inside = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new((Mutex::new(0usize), Condvar::new()));
        let (entered_tx, mut entered) = tokio::sync::mpsc::unbounded_channel();
        {
            let (inside, most, gate) = (inside.clone(), most.clone(), gate.clone());
            s.sync_hook().set(move || {
                let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                let _ = entered_tx.send(());
                let (lock, cv) = &*gate;
                let mut go = cv
                    .wait_while(crate::sync::lock(lock), |go| *go == 0)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                *go -= 1;
                inside.fetch_sub(1, Ordering::SeqCst);
            });
        }
        let mut tasks = Vec::new();
        for i in 0..n {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                let id = format!("M{i}");
                let mut k = s.sink(&env(&id, i as u64));
                k.write(id.as_bytes()).await?;
                k.commit().await
            }));
        }
        for _ in 0..MAX_DISK_OPS {
            entered.recv().await.unwrap();
        }
        // One let go at a time: each lets exactly one more in.
        for _ in MAX_DISK_OPS..n {
            {
                let (lock, cv) = &*gate;
                *crate::sync::lock(lock) += 1;
                cv.notify_all();
            }
            entered.recv().await.unwrap();
        }
        {
            let (lock, cv) = &*gate;
            *crate::sync::lock(lock) += MAX_DISK_OPS;
            cv.notify_all();
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(most.load(Ordering::SeqCst), MAX_DISK_OPS);
        assert_eq!(s.scan().unwrap().len(), n);
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

    #[test]
    fn progress_of_the_first_edition_still_loads_and_history_is_bounded() {
        let old = br#"{"attempts":2,"delivered":["x@y"],"failed":[["z@y","550 5.1.1 no"]],"last_error":"451 4.3.0 later"}"#;
        let p: Progress = serde_json::from_slice(old).unwrap();
        assert_eq!(p.attempts, 2);
        assert_eq!(p.failed, [("z@y".to_string(), "550 5.1.1 no".to_string())]);
        assert!(p.history.is_empty() && p.next_attempt.is_none() && !p.dsn);
        let mut p = Progress::default();
        for n in 0..(MAX_HISTORY as u64 + 5) {
            p.record(n, 451, &format!("try {n}"));
        }
        assert_eq!(p.history.len(), MAX_HISTORY);
        assert_eq!(p.history[0].at, 5, "the oldest are dropped");
        assert_eq!(p.history[MAX_HISTORY - 1].reply, "try 24");
        // A report's flag survives a round trip; an ordinary message's is not written.
        assert!(!serde_json::to_string(&p).unwrap().contains("dsn"));
        p.dsn = true;
        let back: Progress = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(back, p);
    }

    #[test]
    fn a_message_lock_is_exclusive_and_follows_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let s = Spool::open(tmp.path(), u64::MAX).unwrap();
        s.store(&env("A", 1), b"aaa\r\n").unwrap();
        let control = Spool::at(tmp.path());
        let Locked::Held(held) = s.try_lock("A").unwrap() else {
            panic!("free lock not taken")
        };
        assert!(matches!(control.try_lock("A").unwrap(), Locked::Busy));
        assert!(
            matches!(s.try_lock("A").unwrap(), Locked::Busy),
            "also within one process"
        );
        drop(held);
        assert!(matches!(control.try_lock("A").unwrap(), Locked::Held(_)));
        // A delete waits for the holder, and whoever waited on the old file finds it gone.
        let Locked::Held(held) = s.try_lock("A").unwrap() else {
            panic!("lock")
        };
        let waiter = std::thread::spawn(move || control.delete("A", false));
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            !waiter.is_finished(),
            "delete waits for the attempt in flight"
        );
        assert!(tmp.path().join("spool/A.msg").exists());
        drop(held);
        assert_eq!(waiter.join().unwrap().unwrap().id, "A");
        assert!(!tmp.path().join("spool/A.msg").exists());
        assert!(matches!(s.try_lock("A").unwrap(), Locked::Gone));
        assert!(matches!(
            Spool::at(tmp.path()).delete("A", false),
            Err(ControlError::Unknown(_))
        ));
        assert!(matches!(
            Spool::at(tmp.path()).delete("../spool/A", false),
            Err(ControlError::Unknown(_))
        ));
    }

    #[test]
    fn a_requeued_dead_message_keeps_who_has_it_and_retries_the_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let s = Spool::open(tmp.path(), u64::MAX).unwrap();
        s.store(&env("A", 1), b"Subject: a\r\n\r\nbody\r\n")
            .unwrap();
        let mut p = Progress {
            attempts: 1,
            delivered: vec!["x@y".into()],
            failed: vec![("z@y".into(), "550 5.1.1 no".into())],
            next_attempt: Some(99),
            ..Progress::default()
        };
        p.record(5, 550, "5.1.1 no");
        s.save_progress("A", &p).unwrap();
        s.bury("A", "z@y: 550 5.1.1 no").unwrap();
        let c = Spool::at(tmp.path());
        let dead = c.entries(true).unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(
            dead[0].progress, p,
            "the progress is kept beside a dead message"
        );
        assert_eq!(dead[0].dead_reason.as_deref(), Some("z@y: 550 5.1.1 no"));
        assert_eq!(c.headers("A", true).unwrap(), b"Subject: a\r\n");
        assert!(matches!(c.request_retry("A"), Err(ControlError::IsDead(_))));
        assert_eq!(c.requeue("A").unwrap().id, "A");
        assert!(c.entries(true).unwrap().is_empty());
        assert_eq!(names(&tmp.path().join("dead")), Vec::<String>::new());
        let back = s.scan().unwrap();
        assert_eq!(back.len(), 1);
        let q = &back[0].1;
        assert_eq!(q.delivered, ["x@y"]);
        assert!(q.failed.is_empty() && q.next_attempt.is_none());
        assert_eq!(q.history, p.history);
        assert!(
            q.age_from(&back[0].0) + 5 >= crate::clock::unix_now(),
            "max_age counts from the requeue"
        );
        assert_eq!(q.pending(&back[0].0).collect::<Vec<_>>(), ["z@y"]);
        assert!(matches!(c.requeue("A"), Err(ControlError::Unknown(_))));
        // A retry request is a marker beside the message; an unknown id is refused.
        c.request_retry("A").unwrap();
        assert!(c.entries(false).unwrap()[0].retry_requested);
        assert_eq!(
            s.ids().unwrap(),
            (vec!["A".to_string()], vec!["A".to_string()])
        );
        assert!(matches!(
            c.request_retry("B"),
            Err(ControlError::Unknown(_))
        ));
    }
}
