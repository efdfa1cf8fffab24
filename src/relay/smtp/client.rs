//! The upstream connection under the session: our own TCP socket (TCP_NODELAY), the TLS
//! upgrade (STARTTLS or implicit), buffered reply reading through the bounded parser, and
//! writing commands (one, or a pipelined group in one write), dot-stuffed content
//! (streamed: piece by piece as it arrives) and BDAT chunks (a command and its bytes in one
//! write).
//!
//! Two rules keep replies matched to commands: the connection counts the replies its
//! commands still wait for, and a reply is only read while one is owed; bytes the server
//! sends that no command asked for (after the last owed reply, or while none is owed) are a
//! protocol error, never a later command's reply. STARTTLS is the sharpest case: whatever
//! follows the `220` in plaintext would otherwise be read as a reply inside TLS (response
//! injection), so [`Connection::starttls`] refuses to upgrade while any byte is buffered or
//! waiting.
//!
//! Knows the wire, not the SMTP dialogue; `session.rs` decides what to send when.

use super::reply::{excerpt, Reply, ReplyError, ReplyParser, MAX_LINE};
use rustls::pki_types::ServerName;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_util::either::Either;
use zeroize::Zeroize;

/// Size of one write of message content.
const WRITE_CHUNK: usize = 64 * 1024;
/// How much is read at most at once while waiting for a reply.
const READ_CHUNK: usize = 8 * 1024;
/// Room kept in front of a BDAT chunk's bytes for its command line
/// (`BDAT <20 digits> LAST\r\n` is 31 bytes).
const BDAT_HEADROOM: usize = 32;

/// What went wrong on the wire.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ClientError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("connection closed by the server")]
    Closed,
    #[error(transparent)]
    Reply(#[from] ReplyError),
    /// The server sent bytes no command of ours asked for.
    #[error("server sent data we did not ask for (\"{0}\")")]
    Unsolicited(String),
}

/// The transport, before TLS (`Left`) or after (`Right`); tokio-util's `Either` forwards
/// reads and writes to whichever it holds.
type Stream = Either<TcpStream, Box<TlsStream<TcpStream>>>;

/// One connection to the upstream: the stream and the input not yet consumed.
pub(crate) struct Connection {
    stream: Stream,
    /// Received bytes; only the unconsumed part of one reply line (at most [`MAX_LINE`])
    /// plus one read stays here between reads.
    buf: Vec<u8>,
    /// Command line being written (zeroed after each write: AUTH lines carry a token).
    line: Vec<u8>,
    /// Stuffed content being written (at most twice [`WRITE_CHUNK`]).
    out: Vec<u8>,
    /// Replies owed to commands sent (a greeting counts as owed when nothing was sent).
    owed: usize,
    /// The reply being parsed (a pipelined reply may arrive in pieces across reads).
    parser: ReplyParser,
}

impl Connection {
    /// Opens the TCP connection (Nagle's algorithm off: commands and the end of the
    /// content are small writes that must not wait for a delayed ACK).
    pub(crate) async fn connect(host: &str, port: u16) -> io::Result<Connection> {
        let tcp = TcpStream::connect((host, port)).await?;
        tcp.set_nodelay(true)?;
        Ok(Connection::new(Either::Left(tcp)))
    }

    fn new(stream: Stream) -> Connection {
        Connection {
            stream,
            buf: Vec::with_capacity(READ_CHUNK),
            line: Vec::new(),
            out: Vec::new(),
            owed: 0,
            parser: ReplyParser::default(),
        }
    }

    /// Replies still owed to commands sent.
    pub(crate) fn owed(&self) -> usize {
        self.owed
    }

    /// Implicit TLS (port 465 style): the handshake before anything else.
    pub(crate) async fn tls(
        self,
        connector: &TlsConnector,
        name: &ServerName<'static>,
    ) -> Result<Connection, ClientError> {
        let Either::Left(tcp) = self.stream else {
            return Err(io::Error::other("TLS is already active").into());
        };
        let tls = connector.connect(name.clone(), tcp).await?;
        Ok(Connection::new(Either::Right(Box::new(tls))))
    }

    /// Upgrades after the server's `220` to STARTTLS. Refused if the server sent anything
    /// after that reply: those bytes would otherwise be taken as replies inside TLS.
    pub(crate) async fn starttls(
        mut self,
        connector: &TlsConnector,
        name: &ServerName<'static>,
    ) -> Result<Connection, ClientError> {
        self.ensure_quiet()?;
        self.tls(connector, name).await
    }

    /// Fails if the server sent anything since its last reply (already buffered, or ready
    /// on the socket right now): a reply no command asked for. Also reports a connection
    /// the server closed meanwhile.
    /// While replies are owed, bytes from the server are those replies: nothing to check.
    pub(crate) fn ensure_quiet(&mut self) -> Result<(), ClientError> {
        if self.owed > 0 {
            return Ok(());
        }
        if !self.buf.is_empty() {
            return Err(ClientError::Unsolicited(excerpt(&self.buf)));
        }
        let mut scratch = [0u8; 256];
        let mut rb = ReadBuf::new(&mut scratch);
        let mut cx = Context::from_waker(Waker::noop());
        match Pin::new(&mut self.stream).poll_read(&mut cx, &mut rb) {
            Poll::Pending => Ok(()),
            Poll::Ready(Err(e)) => Err(e.into()),
            Poll::Ready(Ok(())) if rb.filled().is_empty() => Err(ClientError::Closed),
            Poll::Ready(Ok(())) => Err(ClientError::Unsolicited(excerpt(rb.filled()))),
        }
    }

    /// Sends one command line (CRLF is added) in one write.
    pub(crate) async fn send_line(&mut self, line: &[u8]) -> Result<(), ClientError> {
        self.send_lines(&[line]).await
    }

    /// Sends command lines (CRLF is added to each) in one write: a pipelined group (RFC
    /// 2920), one reply owed per line.
    pub(crate) async fn send_lines(&mut self, lines: &[&[u8]]) -> Result<(), ClientError> {
        self.ensure_quiet()?;
        self.line.clear();
        for line in lines {
            self.line.extend_from_slice(line);
            self.line.extend_from_slice(b"\r\n");
        }
        let r = write_flush(&mut self.stream, &self.line).await;
        self.line.zeroize();
        r?;
        self.owed += lines.len();
        Ok(())
    }

    /// Sends a BDAT chunk (RFC 3030): the command and the chunk's bytes in one write; one
    /// reply owed. The chunk's bytes follow [`BDAT_HEADROOM`] bytes of room at the start
    /// of `framed`, where the command line is put.
    pub(crate) async fn send_bdat(
        &mut self,
        framed: &mut [u8],
        last: bool,
    ) -> Result<(), ClientError> {
        self.ensure_quiet()?;
        let len = framed.len().saturating_sub(BDAT_HEADROOM);
        let command = format!("BDAT {len}{}\r\n", if last { " LAST" } else { "" });
        let start = BDAT_HEADROOM
            .checked_sub(command.len())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "BDAT chunk too large"))?;
        framed[start..BDAT_HEADROOM].copy_from_slice(command.as_bytes());
        write_flush(&mut self.stream, &framed[start..]).await?;
        self.owed += 1;
        Ok(())
    }

    /// A reply that is already here (buffered, or readable without waiting), if complete;
    /// `None` if none is owed or it has not arrived yet. Lets a sender that does not wait
    /// for replies (BDAT chunks) notice a refusal early and keep the server's replies from
    /// piling up.
    pub(crate) fn try_read_reply(&mut self) -> Result<Option<Reply>, ClientError> {
        if self.owed == 0 {
            return Ok(None);
        }
        if let Some(reply) = self.parse_buffered()? {
            return Ok(Some(reply));
        }
        let mut scratch = [0u8; READ_CHUNK];
        let mut rb = ReadBuf::new(&mut scratch);
        let mut cx = Context::from_waker(Waker::noop());
        match Pin::new(&mut self.stream).poll_read(&mut cx, &mut rb) {
            Poll::Pending => return Ok(None),
            Poll::Ready(Err(e)) => return Err(e.into()),
            Poll::Ready(Ok(())) if rb.filled().is_empty() => return Err(ClientError::Closed),
            Poll::Ready(Ok(())) => self.buf.extend_from_slice(rb.filled()),
        }
        self.parse_buffered()
    }

    /// A complete reply from the buffered bytes, if there is one; checks that bytes after
    /// the last owed reply are not there.
    fn parse_buffered(&mut self) -> Result<Option<Reply>, ClientError> {
        let (used, reply) = self.parser.feed(&self.buf)?;
        self.buf.drain(..used);
        let Some(reply) = reply else {
            return Ok(None);
        };
        self.owed = self.owed.saturating_sub(1);
        if self.owed == 0 && !self.buf.is_empty() {
            return Err(ClientError::Unsolicited(excerpt(&self.buf)));
        }
        Ok(Some(reply))
    }

    /// Reads one reply. Bytes after the last owed reply (a reply we did not ask for) are an
    /// error.
    pub(crate) async fn read_reply(&mut self) -> Result<Reply, ClientError> {
        loop {
            if let Some(reply) = self.parse_buffered()? {
                return Ok(reply);
            }
            // The parser refuses a partial line of MAX_LINE bytes, so this stays bounded.
            debug_assert!(self.buf.len() < MAX_LINE);
            self.buf.reserve(READ_CHUNK);
            let n = (&mut self.stream)
                .take(READ_CHUNK as u64)
                .read_buf(&mut self.buf)
                .await?;
            if n == 0 {
                return Err(ClientError::Closed);
            }
        }
    }

    /// Message content after the `354`, the whole of it: dot-stuffed, written in pieces of
    /// at most [`WRITE_CHUNK`] bytes, ended by CRLF.CRLF.
    #[cfg(test)]
    pub(crate) async fn send_content(&mut self, content: &[u8]) -> Result<(), ClientError> {
        let mut stuffer = DotStuffer::new();
        self.send_content_chunk(&mut stuffer, content).await?;
        self.end_content(&stuffer).await
    }

    /// One piece of message content after the `354` (any split: `stuffer` remembers where
    /// the previous piece ended), dot-stuffed and written in pieces of at most
    /// [`WRITE_CHUNK`] input bytes. Fails if the server said anything meanwhile (an early
    /// reply is no reply to content we have not finished).
    pub(crate) async fn send_content_chunk(
        &mut self,
        stuffer: &mut DotStuffer,
        chunk: &[u8],
    ) -> Result<(), ClientError> {
        self.ensure_quiet()?;
        for piece in chunk.chunks(WRITE_CHUNK) {
            self.out.clear();
            stuffer.stuff(piece, &mut self.out);
            write_flush(&mut self.stream, &self.out).await?;
        }
        if self.out.capacity() > 2 * WRITE_CHUNK + 8 {
            self.out = Vec::new();
        }
        Ok(())
    }

    /// Ends the content: CRLF.CRLF (a CRLF first if the content did not end with one).
    pub(crate) async fn end_content(&mut self, stuffer: &DotStuffer) -> Result<(), ClientError> {
        self.ensure_quiet()?;
        self.out.clear();
        stuffer.finish(&mut self.out);
        write_flush(&mut self.stream, &self.out).await?;
        self.owed += 1;
        Ok(())
    }

    /// Orderly close (TLS close_notify, then FIN).
    pub async fn shutdown(&mut self) {
        let _ = self.stream.shutdown().await;
    }
}

async fn write_flush(stream: &mut Stream, bytes: &[u8]) -> io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}

/// Message content gathered for the next BDAT chunk, behind room for the command line
/// ([`Connection::send_bdat`] puts it there, so command and bytes go in one write without a
/// copy). Also remembers the content's last two bytes: content that does not end with CRLF
/// gets one with the last chunk, as the DATA terminator adds one.
#[derive(Debug, Clone)]
pub(crate) struct ChunkBuf {
    framed: Vec<u8>,
    tail: [u8; 2],
}

impl Default for ChunkBuf {
    fn default() -> Self {
        ChunkBuf::new()
    }
}

impl ChunkBuf {
    pub(crate) fn new() -> ChunkBuf {
        ChunkBuf {
            framed: vec![0; BDAT_HEADROOM],
            tail: [0, 0],
        }
    }

    /// Content bytes gathered.
    pub(crate) fn len(&self) -> usize {
        self.framed.len() - BDAT_HEADROOM
    }

    pub(crate) fn push(&mut self, piece: &[u8]) {
        self.framed.extend_from_slice(piece);
        match piece {
            [] => {}
            [b] => self.tail = [self.tail[1], *b],
            [.., a, b] => self.tail = [*a, *b],
        }
    }

    /// The gathered bytes with room for the command in front; for the last chunk, CRLF is
    /// added if the content did not end with one.
    pub(crate) fn framed(&mut self, last: bool) -> &mut [u8] {
        if last && self.tail != *b"\r\n" {
            self.push(b"\r\n");
        }
        &mut self.framed
    }

    /// Empties it for the next chunk (the capacity stays: the chunk size bounds it).
    pub(crate) fn clear(&mut self) {
        self.framed.truncate(BDAT_HEADROOM);
    }
}

/// Dot-stuffs message content piece by piece (RFC 5321 section 4.5.2): a `.` at the start
/// of a line (after any LF) gets a second `.`; the end is CRLF.CRLF. The pieces may split
/// the content anywhere: the state carries over.
#[derive(Debug, Clone)]
pub(crate) struct DotStuffer {
    /// The next byte starts a line.
    line_start: bool,
    /// The content's last two bytes so far (decides the terminator).
    tail: [u8; 2],
}

impl Default for DotStuffer {
    fn default() -> Self {
        DotStuffer::new()
    }
}

impl DotStuffer {
    pub fn new() -> DotStuffer {
        DotStuffer {
            line_start: true,
            tail: [0, 0],
        }
    }

    /// Appends `piece`, stuffed, to `out` (at most twice its length).
    pub(crate) fn stuff(&mut self, piece: &[u8], out: &mut Vec<u8>) {
        let mut rest = piece;
        while let Some((&first, _)) = rest.split_first() {
            if self.line_start && first == b'.' {
                out.push(b'.');
            }
            let line_end = memchr::memchr(b'\n', rest).map_or(rest.len(), |i| i + 1);
            out.extend_from_slice(&rest[..line_end]);
            self.line_start = rest[line_end - 1] == b'\n';
            rest = &rest[line_end..];
        }
        match piece {
            [] => {}
            [b] => self.tail = [self.tail[1], *b],
            [.., a, b] => self.tail = [*a, *b],
        }
    }

    /// Appends the terminator to `out`.
    pub fn finish(&self, out: &mut Vec<u8>) {
        if self.tail != *b"\r\n" {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The content stuffed in pieces of `max` bytes, and the largest stuffed piece.
    fn stuff(content: &[u8], max: usize) -> (Vec<u8>, usize) {
        let mut s = DotStuffer::new();
        let mut all = Vec::new();
        let mut largest = 0;
        for piece in content.chunks(max) {
            let mut out = Vec::new();
            s.stuff(piece, &mut out);
            assert!(
                out.len() <= 2 * piece.len(),
                "{} for {}",
                out.len(),
                piece.len()
            );
            largest = largest.max(out.len());
            all.extend_from_slice(&out);
        }
        s.finish(&mut all);
        (all, largest)
    }

    #[test]
    fn dots_at_line_start_are_doubled_and_the_end_is_crlf_dot_crlf() {
        for max in [1, 2, 3, 5, 64 * 1024] {
            let (got, _) = stuff(b".a\r\nb.\r\n..c\r\n.\r\n", max);
            assert_eq!(got, b"..a\r\nb.\r\n...c\r\n..\r\n.\r\n", "max {max}");
            // Content without a final CRLF gets one before the terminator.
            assert_eq!(stuff(b"x\r\n.", max).0, b"x\r\n..\r\n.\r\n", "max {max}");
            assert_eq!(stuff(b"x\r", max).0, b"x\r\r\n.\r\n", "max {max}");
            assert_eq!(stuff(b"", max).0, b"\r\n.\r\n", "max {max}");
            assert_eq!(stuff(b"\r\n", max).0, b"\r\n.\r\n", "max {max}");
            assert_eq!(stuff(b"\n", max).0, b"\n\r\n.\r\n", "max {max}");
            // A dot after a bare LF is stuffed as well (a lenient server ends lines there).
            assert_eq!(stuff(b"a\n.\r\n", max).0, b"a\n..\r\n.\r\n", "max {max}");
        }
    }

    #[test]
    fn content_goes_in_bounded_pieces() {
        let content = b"0123456789\r\n".repeat(10_000);
        let (got, largest) = stuff(&content, 4096);
        let mut want = content.clone();
        want.extend_from_slice(b".\r\n");
        assert_eq!(got, want);
        assert_eq!(largest, 4096);
    }

    proptest::proptest! {
        /// Any split gives the stuffing of the whole.
        #[test]
        fn any_split_stuffs_like_the_whole(
            content in proptest::collection::vec(proptest::sample::select(&b"\r\n.x"[..]), 0..64),
            max in 1usize..9,
        ) {
            proptest::prop_assert_eq!(stuff(&content, max).0, stuff(&content, usize::MAX).0);
        }
    }
}

#[cfg(test)]
mod wire_tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A connection to a server task that runs `script` on its end.
    async fn pair<F, Fut>(script: F) -> Connection
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            script(tcp).await;
        });
        Connection::connect("127.0.0.1", port)
            .await
            .expect("connect")
    }

    #[tokio::test]
    async fn a_late_unsolicited_reply_fails_the_next_command() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut c = pair(|mut s| async move {
            s.write_all(b"220 hi\r\n").await.expect("write");
            let _ = rx.await;
            s.write_all(b"421 4.4.2 idle\r\n").await.expect("write");
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink).await;
        })
        .await;
        assert_eq!(c.read_reply().await.expect("greeting").code, 220);
        tx.send(()).expect("server waits");
        // Give the 421 time to arrive; it must not become NOOP's reply.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        match c.send_line(b"NOOP").await {
            Err(ClientError::Unsolicited(s)) => assert_eq!(s, "421 4.4.2 idle\\r\\n"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_closed_connection_is_seen_before_the_next_command() {
        let mut c = pair(|mut s| async move {
            s.write_all(b"220 hi\r\n").await.expect("write");
        })
        .await;
        assert_eq!(c.read_reply().await.expect("greeting").code, 220);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(matches!(
            c.send_line(b"NOOP").await,
            Err(ClientError::Closed)
        ));
    }

    #[tokio::test]
    async fn content_is_stuffed_on_the_wire() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut c = pair(|mut s| async move {
            let mut got = Vec::new();
            while !got.ends_with(b"\r\n.\r\n") {
                let mut chunk = [0u8; 4096];
                let n = s.read(&mut chunk).await.expect("read");
                assert!(n > 0);
                got.extend_from_slice(&chunk[..n]);
            }
            s.write_all(b"250 2.0.0 queued\r\n").await.expect("write");
            let _ = tx.send(got);
        })
        .await;
        c.send_content(b".hidden\r\nbody").await.expect("content");
        assert_eq!(c.read_reply().await.expect("reply").code, 250);
        assert_eq!(rx.await.expect("server"), b"..hidden\r\nbody\r\n.\r\n");
    }

    /// A server that reads until it has `want` bytes, records them, then writes `answer`.
    async fn answering(
        want: usize,
        answer: &'static [u8],
    ) -> (Connection, tokio::sync::oneshot::Receiver<Vec<u8>>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let c = pair(move |mut s| async move {
            s.write_all(b"220 hi\r\n").await.expect("write");
            let mut got = vec![0u8; want];
            s.read_exact(&mut got).await.expect("read");
            s.write_all(answer).await.expect("write");
            let _ = tx.send(got);
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink).await;
        })
        .await;
        (c, rx)
    }

    #[tokio::test]
    async fn pipelined_commands_go_in_one_write_and_each_reply_is_read_in_order() {
        let (mut c, rx) = answering(
            32,
            b"250 2.1.0 ok\r\n550 5.1.1 no\r\n250 2.1.5 ok\r\n421 4.4.2 extra\r\n",
        )
        .await;
        assert_eq!(c.read_reply().await.expect("greeting").code, 220);
        c.send_lines(&[b"MAIL FROM:<a@b>", b"RCPT TO:<x@y>"])
            .await
            .expect("send");
        c.send_line(b"RCPT TO:<z@y>").await.expect("send");
        assert_eq!(c.owed(), 3);
        let codes = [
            c.read_reply().await.expect("1").code,
            c.read_reply().await.expect("2").code,
        ];
        assert_eq!(codes, [250, 550]);
        // The third owed reply arrives with a fourth nobody asked for.
        match c.read_reply().await {
            Err(ClientError::Unsolicited(s)) => assert_eq!(s, "421 4.4.2 extra\\r\\n"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            rx.await.expect("server"),
            b"MAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\n".to_vec()
        );
    }

    #[tokio::test]
    async fn a_bdat_chunk_is_its_command_and_bytes_in_one_write() {
        let (mut c, rx) = answering(20, b"250 2.0.0 queued\r\n").await;
        assert_eq!(c.read_reply().await.expect("greeting").code, 220);
        assert!(c.try_read_reply().expect("nothing owed").is_none());
        let mut chunk = ChunkBuf::new();
        chunk.push(b".a\r\n");
        chunk.push(b"b");
        c.send_bdat(chunk.framed(true), true).await.expect("send");
        // Until the reply is here, trying does not wait.
        let mut reply = None;
        for _ in 0..200 {
            reply = c.try_read_reply().expect("try");
            if reply.is_some() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(reply.expect("reply").code, 250);
        assert_eq!(c.owed(), 0);
        // Unstuffed, and CRLF added to content that did not end with one.
        assert_eq!(
            rx.await.expect("server"),
            b"BDAT 7 LAST\r\n.a\r\nb\r\n".to_vec()
        );
    }

    #[test]
    fn the_last_chunk_ends_with_crlf_as_data_would() {
        for (content, want) in [
            (&b""[..], &b"\r\n"[..]),
            (b"x\r\n", b"x\r\n"),
            (b"x\r", b"x\r\r\n"),
            (b"\n", b"\n\r\n"),
        ] {
            let mut c = ChunkBuf::new();
            c.push(content);
            assert_eq!(c.len(), content.len());
            assert_eq!(&c.framed(true)[BDAT_HEADROOM..], want);
            c.clear();
            assert_eq!(c.len(), 0);
        }
        // Not the last chunk: nothing added.
        let mut c = ChunkBuf::new();
        c.push(b"x");
        assert_eq!(&c.framed(false)[BDAT_HEADROOM..], b"x");
    }
}
