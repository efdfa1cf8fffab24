//! The durable queue on disk: `<state.dir>/spool/<id>.msg` (one JSON envelope line, then
//! the message bytes), `<id>.state` (delivery progress), and `<state.dir>/dead/` for messages
//! that will not be delivered (`<id>.msg` plus `<id>.reason`).
//!
//! A message is written to `spool/tmp/`, fsync'd, renamed into `spool/` and the directory
//! fsync'd before the client hears 250, so it survives a crash from then on. Half-written
//! temporary files are discarded at start. When and how messages are delivered is
//! `deliver`'s business.

use crate::oauth::store::create_private_dir;
use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
#[cfg(unix)]
use std::os::unix::fs::OpenOptionsExt;
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

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn write_new(path: &Path, parts: &[&[u8]]) -> io::Result<()> {
    let mut opts = OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    opts.mode(0o600);
    let mut f = opts.open(path)?;
    for p in parts {
        f.write_all(p)?;
    }
    f.sync_all()
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
        let r = write_new(&tmp, &[&line, body])
            .and_then(|_| fs::rename(&tmp, self.msg(&env.id)))
            .and_then(|_| fsync_dir(&self.dir));
        if r.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        r
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
                Ok(env) => {
                    let progress = fs::read(self.state(&env.id))
                        .ok()
                        .and_then(|b| serde_json::from_slice(&b).ok())
                        .unwrap_or_default();
                    out.push((env, progress));
                }
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
        write_new(&tmp, &[&serde_json::to_vec(p).map_err(io::Error::other)?])?;
        fs::rename(&tmp, self.state(id))?;
        fsync_dir(&self.dir)
    }

    /// Delivered: the message leaves the spool.
    pub fn remove(&self, id: &str) -> io::Result<()> {
        fs::remove_file(self.msg(id))?;
        let _ = fs::remove_file(self.state(id));
        fsync_dir(&self.dir)
    }

    /// Will not be delivered: moved to `dead/` with the reason beside it.
    pub fn bury(&self, id: &str, reason: &str) -> io::Result<()> {
        write_new(
            &self.dead.join(format!("{id}.reason")),
            &[reason.as_bytes(), b"\n"],
        )?;
        fs::rename(self.msg(id), self.dead.join(format!("{id}.msg")))?;
        let _ = fs::remove_file(self.state(id));
        fsync_dir(&self.dead)?;
        fsync_dir(&self.dir)
    }
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
}
