//! Bytes in and out of one local connection: command lines with a length limit and a
//! whole-line deadline, message data up to `CRLF.CRLF` (decoded by `data`: unstuffed, line
//! endings normalised; size-limited; handed out in pieces of a bounded buffer, never whole;
//! under a whole-DATA deadline as well as a per-read one), and buffered replies flushed only
//! before we wait for input (PIPELINING, RFC 2920).
//!
//! Knows nothing of commands or state: the session decides what a line means. Every way
//! the connection can stop is a [`Stop`] value, never an error message to compare.

use crate::reply::Reply;
use crate::smtp::data::DataDecoder;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Longest command or AUTH line we accept (RFC 5321 needs 512; AUTH responses are longer).
pub(crate) const MAX_LINE: usize = 4096;
/// How long we wait for the next chunk of message data (RFC 5321: 3 minutes per block),
/// and the least time the whole content gets.
pub(crate) const DATA_TIMEOUT: Duration = Duration::from_secs(180);
/// Slowest average rate at which content must arrive beyond [`DATA_TIMEOUT`]: each such
/// many bytes received add one second to the whole-DATA deadline (30 MiB: 3 min + 8 min).
pub(crate) const DATA_MIN_RATE: u64 = 64 * 1024;
/// Buffer reserved for reading commands (one line is at most MAX_LINE).
const COMMAND_READ: usize = 4096;
/// Buffer reserved for reading message data, and the most input decoded at once.
pub(crate) const DATA_READ: usize = 64 * 1024;

/// Why a connection stops being served.
#[derive(Debug)]
pub(crate) enum Stop {
    /// The client closed the connection.
    Eof,
    /// No complete line or data chunk arrived in time.
    TimedOut,
    /// The shutdown grace period is over.
    GraceOver,
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
pub(crate) enum Line {
    /// The line with its line ending.
    Ok(Vec<u8>),
    /// Longer than [`MAX_LINE`]: it was read and dropped.
    TooLong,
}

/// The connection's input and output buffers.
pub(crate) struct Framed<S> {
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
    pub(crate) fn reply(&mut self, r: &Reply) {
        r.write_to(&mut self.out);
    }

    /// Queues raw reply bytes (multi-line EHLO, the greeting).
    pub(crate) fn raw(&mut self, bytes: &[u8]) {
        self.out.extend_from_slice(bytes);
    }

    /// Drops queued replies (a 421 at hard stop replaces whatever was pending).
    pub(crate) fn clear_output(&mut self) {
        self.out.clear();
    }

    /// Drops buffered input (anything pipelined after STARTTLS, RFC 3207 section 4.2).
    pub(crate) fn discard_input(&mut self) {
        self.inbuf.clear();
        self.pos = 0;
    }

    pub(crate) async fn flush(&mut self) -> std::io::Result<()> {
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

    pub(crate) fn into_inner(self) -> S {
        self.io
    }

    /// Reads more input (reserving `want` bytes) before `deadline`; `Ok(false)` on EOF.
    /// Flushes pending replies first. The buffer is never zero-filled, so an idle session
    /// costs only what it has received.
    async fn fill(&mut self, deadline: Instant, want: usize) -> Result<bool, Stop> {
        self.flush().await?;
        if self.hard_stop.is_cancelled() {
            return Err(Stop::GraceOver);
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
            _ = stop.cancelled() => Err(Stop::GraceOver),
        }
    }

    /// The next line (with its LF), reading as needed; `None` on EOF. The whole line must
    /// arrive within `timeout` (a byte a second does not keep a session alive). With
    /// `shutdown`, a shutdown while waiting for the line tells the client 421 and stops.
    pub(crate) async fn next_line(
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

    /// The next piece of message content: decoded bytes (unstuffed, CRLF line endings)
    /// appended to `out`, at most about two reads' worth (a bare line ending doubles), so
    /// the memory a message takes is this buffer, whatever its size. [`Piece::TooBig`] as
    /// soon as the content passes the limit: then nothing more is decoded and the caller
    /// reads the rest away with [`Framed::discard_data`].
    pub(crate) async fn read_data(
        &mut self,
        rx: &mut DataIn,
        out: &mut Vec<u8>,
    ) -> Result<Piece, Stop> {
        loop {
            let avail = &self.inbuf[self.pos..];
            let take = avail.len().min(DATA_READ);
            let used = rx.decoder.feed(&avail[..take], out);
            self.pos += used;
            rx.raw += used as u64;
            if rx.decoder.size() > rx.limit {
                return Ok(Piece::TooBig);
            }
            if rx.decoder.is_done() {
                self.data_done();
                return Ok(Piece::End);
            }
            if !out.is_empty() {
                return Ok(Piece::More);
            }
            if self.pos < self.inbuf.len() {
                continue;
            }
            if !self.fill(rx.read_deadline(), DATA_READ).await? {
                return Err(Stop::Eof);
            }
        }
    }

    /// Reads the rest of the content up to CRLF.CRLF and drops it (too big, or nowhere to
    /// send it), within the same whole-DATA deadline.
    pub(crate) async fn discard_data(&mut self, rx: &mut DataIn) -> Result<(), Stop> {
        let mut scratch = Vec::new();
        loop {
            let avail = &self.inbuf[self.pos..];
            let take = avail.len().min(DATA_READ);
            let used = rx.decoder.feed(&avail[..take], &mut scratch);
            scratch.clear();
            self.pos += used;
            rx.raw += used as u64;
            if rx.decoder.is_done() {
                self.data_done();
                return Ok(());
            }
            if self.pos < self.inbuf.len() {
                continue;
            }
            if !self.fill(rx.read_deadline(), DATA_READ).await? {
                return Err(Stop::Eof);
            }
        }
    }

    /// Gives back the large read buffer; the session may now idle for a long time.
    fn data_done(&mut self) {
        if self.inbuf.capacity() > 4 * COMMAND_READ {
            self.inbuf.drain(..self.pos);
            self.pos = 0;
            self.inbuf.shrink_to(COMMAND_READ);
        }
    }
}

/// What [`Framed::read_data`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Piece {
    /// Some content (in `out`); more follows.
    More,
    /// The end of the content (`out` may hold its last bytes).
    End,
    /// The content passed the size limit.
    TooBig,
}

/// One DATA phase: the decoder, the size limit and the whole-DATA deadline.
#[derive(Debug)]
pub(crate) struct DataIn {
    decoder: DataDecoder,
    limit: u64,
    started: Instant,
    /// Bytes read from the client so far (stuffed, terminator included).
    raw: u64,
}

impl DataIn {
    /// Starts a DATA phase now, for content of at most `limit` bytes.
    pub fn new(limit: usize) -> DataIn {
        DataIn {
            decoder: DataDecoder::new(),
            limit: limit as u64,
            started: Instant::now(),
            raw: 0,
        }
    }

    /// The content's size so far (unstuffed, as the client sent it).
    #[cfg(test)]
    pub(crate) fn size(&self) -> u64 {
        self.decoder.size()
    }

    /// Whether the end of the content (CRLF.CRLF) was read.
    pub(crate) fn is_done(&self) -> bool {
        self.decoder.is_done()
    }

    /// When the whole content must have arrived: [`DATA_TIMEOUT`], plus one second per
    /// [`DATA_MIN_RATE`] bytes received (up to the size limit). It does not move with every
    /// read, so a trickle cannot hold the session (and its upstream transaction) forever.
    pub(crate) fn deadline(&self) -> Instant {
        let counted = self.raw.min(self.limit);
        self.started + DATA_TIMEOUT + Duration::from_secs(counted / DATA_MIN_RATE)
    }

    /// The deadline of the next read: [`DATA_TIMEOUT`] from now, or the whole-DATA one.
    fn read_deadline(&self) -> Instant {
        (Instant::now() + DATA_TIMEOUT).min(self.deadline())
    }
}

/// The line without its CRLF (or LF).
pub(crate) fn trim_crlf(l: &[u8]) -> &[u8] {
    let l = l.strip_suffix(b"\n").unwrap_or(l);
    l.strip_suffix(b"\r").unwrap_or(l)
}

/// Client-supplied text made safe for replies and logs (bounded, no control characters).
pub(crate) fn sanitize(s: &str) -> String {
    s.chars()
        .take(255)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole content through `read_data`, or `None` when it was too big (and then
    /// read away).
    async fn receive<S: AsyncRead + AsyncWrite + Unpin>(
        f: &mut Framed<S>,
        limit: usize,
    ) -> Result<Option<Vec<u8>>, Stop> {
        let mut rx = DataIn::new(limit);
        let mut all = Vec::new();
        let mut out = Vec::new();
        loop {
            out.clear();
            match f.read_data(&mut rx, &mut out).await? {
                Piece::More => all.extend_from_slice(&out),
                Piece::End => {
                    all.extend_from_slice(&out);
                    return Ok(Some(all));
                }
                Piece::TooBig => {
                    f.discard_data(&mut rx).await?;
                    return Ok(None);
                }
            }
        }
    }

    async fn next(f: &mut Framed<tokio::io::DuplexStream>) -> Vec<u8> {
        let Some(Line::Ok(l)) = f.next_line(Duration::from_secs(5), None).await.unwrap() else {
            panic!("a line")
        };
        l
    }

    #[tokio::test]
    async fn data_is_unstuffed_and_size_limited() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let mut f = Framed::new(server, CancellationToken::new());
        client
            .write_all(b"..dot\r\nline\r\n.\r\nNEXT\r\n")
            .await
            .unwrap();
        assert_eq!(
            receive(&mut f, 100).await.unwrap().unwrap(),
            b".dot\r\nline\r\n"
        );
        assert_eq!(next(&mut f).await, b"NEXT\r\n");
        // Over the limit: read to the end and discarded; the next line is still in sync.
        client
            .write_all(b"0123456789\r\n0123456789\r\n.\r\nAFTER\r\n")
            .await
            .unwrap();
        assert!(receive(&mut f, 10).await.unwrap().is_none());
        assert_eq!(next(&mut f).await, b"AFTER\r\n");
        // A tiny limit does not panic.
        client.write_all(b"x\r\n.\r\n").await.unwrap();
        assert_eq!(receive(&mut f, 3).await.unwrap().unwrap(), b"x\r\n");
    }

    #[tokio::test]
    async fn crlf_dot_cr_cr_lf_does_not_end_data() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let mut f = Framed::new(server, CancellationToken::new());
        client
            .write_all(b"a\r\n.\r\r\nRSET\r\n.\r\nNEXT\r\n")
            .await
            .unwrap();
        assert_eq!(
            receive(&mut f, 1000).await.unwrap().unwrap(),
            b"a\r\n\r\n\r\nRSET\r\n"
        );
        assert_eq!(next(&mut f).await, b"NEXT\r\n");
    }

    #[tokio::test]
    async fn content_comes_in_bounded_pieces() {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let mut f = Framed::new(server, CancellationToken::new());
        let body = b"0123456789abcdef\n".repeat(40_000);
        let writer = tokio::spawn(async move {
            client.write_all(&body).await.unwrap();
            client.write_all(b"\r\n.\r\n").await.unwrap();
            client
        });
        let mut rx = DataIn::new(usize::MAX);
        let mut out = Vec::new();
        let mut total = 0;
        loop {
            out.clear();
            let p = f.read_data(&mut rx, &mut out).await.unwrap();
            assert!(out.len() <= 2 * DATA_READ, "{}", out.len());
            total += out.len();
            if p == Piece::End {
                break;
            }
            assert_eq!(p, Piece::More);
        }
        // Every bare LF became CRLF; the size counts what the client sent.
        assert_eq!(total, 18 * 40_000 + 2);
        assert_eq!(rx.size(), 17 * 40_000 + 2);
        drop(writer.await.unwrap());
    }

    /// A client that sends a byte just before each read times out still has to finish the
    /// whole content within the whole-DATA deadline.
    #[tokio::test(start_paused = true)]
    async fn a_trickle_cannot_outlast_the_whole_data_deadline() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let mut f = Framed::new(server, CancellationToken::new());
        let started = Instant::now();
        let trickle = tokio::spawn(async move {
            loop {
                tokio::time::sleep(DATA_TIMEOUT - Duration::from_secs(1)).await;
                if client.write_all(b"x").await.is_err() {
                    return;
                }
            }
        });
        let r = receive(&mut f, 1 << 20).await;
        assert!(matches!(r, Err(Stop::TimedOut)), "{r:?}");
        // Each read waited up to DATA_TIMEOUT and got a byte; the whole phase did not.
        assert_eq!(started.elapsed(), DATA_TIMEOUT);
        trickle.abort();
    }
}
