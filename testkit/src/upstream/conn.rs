//! Buffered I/O for one fake-upstream connection: the plain/TLS stream, the STARTTLS
//! upgrade, command lines, DATA content (through [`DotDecoder`]), BDAT chunks, and writing
//! replies. Input is buffered so pipelined commands and arbitrary chunking both work; the
//! replies to pipelined commands are sent together (as RFC 2920 asks of a server, and as
//! Postfix and Microsoft 365 do), when no further command is waiting in the input, so that a
//! pipelining client does not wait on Nagle's algorithm and a delayed ACK between them. Also
//! the I/O side of injected faults: discarding input while stalled, reading a little before
//! a drop, and garbage instead of a TLS handshake.
//!
//! Knows nothing of SMTP semantics; `session.rs` decides what lines mean.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use super::dot::DotDecoder;
use super::Reply;

/// Longest command line accepted (RFC 5321 allows 512; AUTH lines with a token run to a
/// few KiB, and Microsoft accepts long XOAUTH2 lines).
const MAX_LINE_BYTES: usize = 64 * 1024;
/// How much to try to read at once.
const READ_CHUNK: usize = 64 * 1024;
/// Sent after `220` to STARTTLS by `set_tls_failure`: not a TLS record (the first byte is
/// no TLS content type), so any TLS client rejects it.
const NOT_TLS: &[u8] = b"garbage instead of a TLS ServerHello [FAKE]\r\n";
/// How long a broken STARTTLS waits for the ClientHello (read only so that closing does not
/// reset the connection before the client saw the garbage).
const CLIENT_HELLO_WAIT: Duration = Duration::from_secs(2);

/// The transport, before or after TLS.
pub(super) enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// What waiting for a command line produced.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Input {
    /// One line, without its line ending.
    Line(String),
    /// The peer closed the connection.
    Closed,
    /// `close_idle_sessions` was called while we waited.
    Idle,
    /// The line exceeded [`MAX_LINE_BYTES`].
    TooLong,
}

/// One connection: the stream plus unconsumed input.
pub(super) struct Conn {
    stream: Stream,
    buf: Vec<u8>,
    /// Bytes of `buf` already consumed.
    pos: usize,
    /// Reads from the stream so far (a command that needed none arrived with the previous
    /// input: it was pipelined).
    reads: u64,
    /// Replies not yet written (more pipelined commands were waiting when they were made).
    out: Vec<u8>,
}

impl Conn {
    pub(super) fn new(stream: Stream) -> Conn {
        Conn {
            stream,
            buf: Vec::with_capacity(READ_CHUNK),
            pos: 0,
            reads: 0,
            out: Vec::new(),
        }
    }

    /// How many reads from the stream filled the buffer so far.
    pub(super) fn reads(&self) -> u64 {
        self.reads
    }

    pub(super) fn is_tls(&self) -> bool {
        matches!(self.stream, Stream::Tls(_))
    }

    /// Upgrades to TLS. Input buffered before the handshake is discarded (a client must not
    /// pipeline past STARTTLS; keeping it would allow command injection).
    pub(super) async fn starttls(mut self, acceptor: &TlsAcceptor) -> io::Result<Conn> {
        self.flush_replies().await?;
        match self.stream {
            Stream::Plain(tcp) => {
                let tls = acceptor.accept(tcp).await?;
                Ok(Conn::new(Stream::Tls(Box::new(tls))))
            }
            Stream::Tls(_) => Err(io::Error::other("TLS is already active")),
        }
    }

    fn pending(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    fn consume(&mut self, n: usize) {
        self.pos += n;
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
    }

    /// Writes the replies held back, if any.
    pub(super) async fn flush_replies(&mut self) -> io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let out = std::mem::take(&mut self.out);
        self.stream.write_all(&out).await?;
        self.stream.flush().await
    }

    /// Reads more input; false at end of stream. Replies held back go out first: the
    /// client may be waiting for them.
    async fn fill(&mut self) -> io::Result<bool> {
        self.flush_replies().await?;
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.reserve(READ_CHUNK);
        let n = self.stream.read_buf(&mut self.buf).await?;
        self.reads += 1;
        Ok(n > 0)
    }

    /// Next command line (terminated by LF; a CR before it is dropped). While waiting for
    /// input, a change on `idle` ends the wait with [`Input::Idle`].
    pub(super) async fn read_line(&mut self, idle: &mut watch::Receiver<u64>) -> io::Result<Input> {
        let mut scanned = 0;
        loop {
            let pending = self.pending();
            if let Some(i) = pending[scanned..].iter().position(|&b| b == b'\n') {
                let end = scanned + i;
                let line = pending[..end]
                    .strip_suffix(b"\r")
                    .unwrap_or(&pending[..end]);
                let text = String::from_utf8_lossy(line).into_owned();
                self.consume(end + 1);
                return Ok(Input::Line(text));
            }
            scanned = pending.len();
            if scanned > MAX_LINE_BYTES {
                return Ok(Input::TooLong);
            }
            // Outside the select: an idle kick must not cut a reply short.
            self.flush_replies().await?;
            tokio::select! {
                biased;
                // Err would mean the sender is gone, but the session's Arc keeps it alive;
                // either way, stop.
                _ = idle.changed() => return Ok(Input::Idle),
                more = self.fill() => if !more? { return Ok(Input::Closed) },
            }
        }
    }

    /// DATA content up to and including CRLF.CRLF, unstuffed into `out`. Once `out` would
    /// exceed `max` bytes it stops growing and `Ok(Some(false))` reports the overflow (the
    /// content is still read to its end). `Ok(None)` = the peer closed first.
    pub(super) async fn read_data(
        &mut self,
        out: &mut Vec<u8>,
        max: usize,
    ) -> io::Result<Option<bool>> {
        let mut decoder = DotDecoder::new();
        let mut scratch = Vec::new();
        let mut fits = true;
        loop {
            let target = if fits { &mut *out } else { &mut scratch };
            let done = decoder.feed(self.pending(), target);
            if fits && out.len() > max {
                fits = false;
                out.clear();
            }
            scratch.clear();
            match done {
                Some(n) => {
                    self.consume(n);
                    return Ok(Some(fits));
                }
                None => {
                    let n = self.pending().len();
                    self.consume(n);
                }
            }
            if !self.fill().await? {
                return Ok(None);
            }
        }
    }

    /// Exactly `n` raw bytes (a BDAT chunk), appended to `out` unless `out` is `None`.
    /// False if the peer closed first.
    pub(super) async fn read_chunk(
        &mut self,
        mut n: usize,
        mut out: Option<&mut Vec<u8>>,
    ) -> io::Result<bool> {
        loop {
            let take = n.min(self.pending().len());
            if let Some(out) = out.as_deref_mut() {
                out.extend_from_slice(&self.pending()[..take]);
            }
            self.consume(take);
            n -= take;
            if n == 0 {
                return Ok(true);
            }
            if !self.fill().await? {
                return Ok(false);
            }
        }
    }

    /// Reads and discards input until the peer closes (or the read fails): a stalled server.
    pub(super) async fn discard_until_closed(&mut self) -> io::Result<()> {
        loop {
            self.buf.clear();
            self.pos = 0;
            if !self.fill().await? {
                return Ok(());
            }
        }
    }

    /// Reads until at least one full line of input is buffered (or a line's worth of
    /// bytes, or EOF), without consuming anything: the start of DATA content before an
    /// injected drop.
    pub(super) async fn read_first_line(&mut self) -> io::Result<()> {
        while !self.pending().contains(&b'\n') && self.pending().len() <= MAX_LINE_BYTES {
            if !self.fill().await? {
                break;
            }
        }
        Ok(())
    }

    /// Instead of a TLS handshake after `220` to STARTTLS: writes [`NOT_TLS`], reads what
    /// the client sent (its ClientHello, for up to [`CLIENT_HELLO_WAIT`]) and closes.
    pub(super) async fn fail_tls(mut self) -> io::Result<()> {
        self.stream.write_all(NOT_TLS).await?;
        self.stream.flush().await?;
        // Timing out just means the client said nothing yet; close anyway.
        let _ = tokio::time::timeout(CLIENT_HELLO_WAIT, self.fill()).await;
        self.stream.shutdown().await
    }

    /// Writes one (possibly multi-line) reply: now, with any held back before it, unless
    /// another command is already waiting in the input (then with that one's reply).
    pub(super) async fn write_reply(&mut self, reply: &Reply) -> io::Result<()> {
        self.out.extend_from_slice(reply.to_wire().as_bytes());
        if self.pending().is_empty() {
            self.flush_replies().await?;
        }
        Ok(())
    }

    /// Writes one reply followed by `extra` raw bytes, in one write (with any replies held
    /// back before it), and flushes.
    pub(super) async fn write_reply_and(&mut self, reply: &Reply, extra: &[u8]) -> io::Result<()> {
        self.out.extend_from_slice(reply.to_wire().as_bytes());
        self.out.extend_from_slice(extra);
        self.flush_replies().await
    }

    /// Orderly close (TLS close_notify, then FIN), after the replies held back.
    pub(super) async fn shutdown(&mut self) -> io::Result<()> {
        self.flush_replies().await?;
        self.stream.shutdown().await
    }
}
