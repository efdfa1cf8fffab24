//! Bytes in and out of one local connection: command lines with a length limit and a
//! whole-line deadline, message data up to `CRLF.CRLF` (dot-unstuffed, size-limited), and
//! buffered replies flushed only before we wait for input (PIPELINING, RFC 2920).
//!
//! Knows nothing of commands or state: the session decides what a line means. Every way
//! the connection can stop is a [`Stop`] value, never an error message to compare.

use crate::reply::Reply;
use smtp_proto::request::receiver::{DataReceiver, DummyDataReceiver};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Longest command or AUTH line we accept (RFC 5321 needs 512; AUTH responses are longer).
pub const MAX_LINE: usize = 4096;
/// How long we wait for the next chunk of message data (RFC 5321: 3 minutes per block).
pub const DATA_TIMEOUT: Duration = Duration::from_secs(180);
/// Buffer reserved for reading commands (one line is at most MAX_LINE).
const COMMAND_READ: usize = 4096;
/// Buffer reserved for reading message data.
const DATA_READ: usize = 64 * 1024;
/// The smallest receive buffer reserved for a message (grows as content arrives).
const MIN_MESSAGE_BUFFER: usize = 16 * 1024;

/// Why a connection stops being served.
#[derive(Debug)]
pub enum Stop {
    /// The client closed the connection.
    Eof,
    /// No complete line or data chunk arrived in time.
    TimedOut,
    /// The shutdown grace period is over.
    HardStop,
    /// A shutdown reached an idle session; it has been told 421 already.
    Shutdown,
    /// Too many failed AUTH attempts on this connection.
    AuthFailures,
    /// The socket failed.
    Io(std::io::Error),
}

impl From<std::io::Error> for Stop {
    fn from(e: std::io::Error) -> Self {
        Stop::Io(e)
    }
}

/// One line read from the client.
#[derive(Debug)]
pub enum Line {
    /// The line with its line ending.
    Ok(Vec<u8>),
    /// Longer than [`MAX_LINE`]: it was read and dropped.
    TooLong,
}

/// The connection's input and output buffers.
pub struct Framed<S> {
    io: S,
    inbuf: Vec<u8>,
    pos: usize,
    out: Vec<u8>,
    hard_stop: CancellationToken,
}

impl<S> std::fmt::Debug for Framed<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Framed")
            .field("buffered", &(self.inbuf.len() - self.pos))
            .finish_non_exhaustive()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Framed<S> {
    pub fn new(io: S, hard_stop: CancellationToken) -> Self {
        Framed {
            io,
            inbuf: Vec::with_capacity(1024),
            pos: 0,
            out: Vec::with_capacity(512),
            hard_stop,
        }
    }

    /// Queues a reply (sent before the next read).
    pub fn reply(&mut self, r: &Reply) {
        r.write_to(&mut self.out);
    }

    /// Queues raw reply bytes (multi-line EHLO, the greeting).
    pub fn raw(&mut self, bytes: &[u8]) {
        self.out.extend_from_slice(bytes);
    }

    /// Drops queued replies (a 421 at hard stop replaces whatever was pending).
    pub fn clear_output(&mut self) {
        self.out.clear();
    }

    /// Drops buffered input (anything pipelined after STARTTLS, RFC 3207 section 4.2).
    pub fn discard_input(&mut self) {
        self.inbuf.clear();
        self.pos = 0;
    }

    pub async fn flush(&mut self) -> std::io::Result<()> {
        if !self.out.is_empty() {
            self.io.write_all(&self.out).await?;
            self.io.flush().await?;
            self.out.clear();
        }
        Ok(())
    }

    /// Flushes and closes the write side.
    pub async fn close(&mut self) {
        let _ = self.flush().await;
        let _ = self.io.shutdown().await;
    }

    pub fn into_inner(self) -> S {
        self.io
    }

    /// Reads more input (reserving `want` bytes) before `deadline`; `Ok(false)` on EOF.
    /// Flushes pending replies first. The buffer is never zero-filled, so an idle session
    /// costs only what it has received.
    async fn fill(&mut self, deadline: Instant, want: usize) -> Result<bool, Stop> {
        self.flush().await?;
        if self.hard_stop.is_cancelled() {
            return Err(Stop::HardStop);
        }
        if self.pos > 0 {
            self.inbuf.drain(..self.pos);
            self.pos = 0;
        }
        self.inbuf.reserve(want);
        let stop = self.hard_stop.clone();
        tokio::select! {
            r = tokio::time::timeout_at(deadline, self.io.read_buf(&mut self.inbuf)) => match r {
                Ok(Ok(n)) => Ok(n > 0),
                Ok(Err(e)) => Err(Stop::Io(e)),
                Err(_) => Err(Stop::TimedOut),
            },
            _ = stop.cancelled() => Err(Stop::HardStop),
        }
    }

    /// The next line (with its LF), reading as needed; `None` on EOF. The whole line must
    /// arrive within `timeout` (a byte a second does not keep a session alive). With
    /// `shutdown`, a shutdown while waiting for the line tells the client 421 and stops.
    pub async fn next_line(
        &mut self,
        timeout: Duration,
        shutdown: Option<&CancellationToken>,
    ) -> Result<Option<Line>, Stop> {
        let deadline = Instant::now() + timeout;
        loop {
            let avail = &self.inbuf[self.pos..];
            if let Some(i) = memchr::memchr(b'\n', avail) {
                let line = avail[..=i].to_vec();
                self.pos += i + 1;
                if line.len() > MAX_LINE {
                    return Ok(Some(Line::TooLong));
                }
                return Ok(Some(Line::Ok(line)));
            }
            if avail.len() > MAX_LINE {
                // Drop what we have and the rest of this line.
                self.pos = self.inbuf.len();
                loop {
                    if !self.fill(deadline, COMMAND_READ).await? {
                        return Ok(None);
                    }
                    if let Some(i) = memchr::memchr(b'\n', &self.inbuf) {
                        self.pos = i + 1;
                        return Ok(Some(Line::TooLong));
                    }
                    self.pos = self.inbuf.len();
                }
            }
            let more = match shutdown {
                Some(shutdown) => {
                    let shutdown = shutdown.clone();
                    tokio::select! {
                        r = self.fill(deadline, COMMAND_READ) => r?,
                        _ = shutdown.cancelled() => return Err(Stop::Shutdown),
                    }
                }
                None => self.fill(deadline, COMMAND_READ).await?,
            };
            if !more {
                return Ok(None);
            }
        }
    }

    /// Reads message data up to CRLF.CRLF. Returns the unstuffed content, or `None` when it
    /// exceeded `limit` bytes (then the rest was read and discarded). `hint` (SIZE=) sizes
    /// the buffer once instead of letting it grow.
    pub async fn receive_data(
        &mut self,
        hint: usize,
        limit: usize,
    ) -> Result<Option<Vec<u8>>, Stop> {
        let mut rx = DataReceiver::new();
        let mut buf = Vec::with_capacity(hint.min(limit).max(MIN_MESSAGE_BUFFER.min(limit)) + 2);
        // smtp-proto only recognises a terminator or a stuffed dot after a line break; seed
        // one so that the very first line is handled too.
        rx.ingest(&mut DATA_PREFIX.iter(), &mut buf);
        let limit = limit + DATA_PREFIX.len();
        loop {
            let avail = &self.inbuf[self.pos..];
            let mut it = avail.iter();
            let done = rx.ingest(&mut it, &mut buf);
            self.pos += avail.len() - it.as_slice().len();
            if buf.len() > limit {
                if done {
                    // The whole message, terminator included, arrived in what we read.
                    return Ok(None);
                }
                let mut dummy = DummyDataReceiver::new_data(&rx);
                drop(buf);
                self.discard_data(&mut dummy).await?;
                return Ok(None);
            }
            if done {
                // Give back the large read buffer; the session may now idle for a long time.
                if self.inbuf.capacity() > 4 * COMMAND_READ {
                    self.inbuf.drain(..self.pos);
                    self.pos = 0;
                    self.inbuf.shrink_to(COMMAND_READ);
                }
                buf.drain(..DATA_PREFIX.len());
                return Ok(Some(buf));
            }
            if !self.fill(Instant::now() + DATA_TIMEOUT, DATA_READ).await? {
                return Err(Stop::Eof);
            }
        }
    }

    async fn discard_data(&mut self, rx: &mut DummyDataReceiver) -> Result<(), Stop> {
        loop {
            let avail = &self.inbuf[self.pos..];
            let mut it = avail.iter();
            let done = rx.ingest(&mut it);
            self.pos += avail.len() - it.as_slice().len();
            if done {
                return Ok(());
            }
            if !self.fill(Instant::now() + DATA_TIMEOUT, DATA_READ).await? {
                return Err(Stop::Eof);
            }
        }
    }
}

const DATA_PREFIX: &[u8] = b"\r\n";

/// The line without its CRLF (or LF).
pub fn trim_crlf(l: &[u8]) -> &[u8] {
    let l = l.strip_suffix(b"\n").unwrap_or(l);
    l.strip_suffix(b"\r").unwrap_or(l)
}

/// Client-supplied text made safe for replies and logs (bounded, no control characters).
pub fn sanitize(s: &str) -> String {
    s.chars()
        .take(255)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn data_is_unstuffed_and_size_limited() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let mut f = Framed::new(server, CancellationToken::new());
        client
            .write_all(b"..dot\r\nline\r\n.\r\nNEXT\r\n")
            .await
            .unwrap();
        assert_eq!(
            f.receive_data(0, 100).await.unwrap().unwrap(),
            b".dot\r\nline\r\n"
        );
        let Some(Line::Ok(l)) = f.next_line(Duration::from_secs(5), None).await.unwrap() else {
            panic!("a line")
        };
        assert_eq!(l, b"NEXT\r\n");
        // Over the limit: read to the end and discarded; the next line is still in sync.
        client
            .write_all(b"0123456789\r\n0123456789\r\n.\r\nAFTER\r\n")
            .await
            .unwrap();
        assert!(f.receive_data(10_000, 10).await.unwrap().is_none());
        let Some(Line::Ok(l)) = f.next_line(Duration::from_secs(5), None).await.unwrap() else {
            panic!("a line")
        };
        assert_eq!(l, b"AFTER\r\n");
        // A limit smaller than the minimum buffer does not panic.
        client.write_all(b"x\r\n.\r\n").await.unwrap();
        assert_eq!(f.receive_data(0, 3).await.unwrap().unwrap(), b"x\r\n");
    }
}
