//! A deliberately small HTTP/1.1 server core for the fake token endpoint: request-head
//! parsing, `Content-Length` bodies, `Expect: 100-continue`, keep-alive, JSON and redirect
//! responses, and `application/x-www-form-urlencoded` / HTTP Basic decoding and encoding.
//!
//! Parsers here take bytes and return values; [`serve_connection`] is the only code that
//! touches a socket. What a request *means* is left to the caller's handler.

use base64::Engine as _;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest request head (request line + headers) we buffer; real token requests are < 2 KiB.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Largest request body we accept; a token request form is a few hundred bytes.
const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Read buffer growth step.
const READ_CHUNK: usize = 8 * 1024;

/// A parsed request. Header names are kept as sent; look them up with [`Request::header`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Request {
    pub method: String,
    /// The request target without the query string.
    pub path: String,
    /// The raw query string (after `?`, still percent-encoded), empty if there is none.
    pub query: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// HTTP/1.1 (keep-alive by default) rather than HTTP/1.0.
    pub http11: bool,
}

impl Request {
    /// First header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// A request as the parser would produce it from `target` (path and query) and a
    /// form-encoded `body`, for unit tests of the handlers.
    #[cfg(test)]
    pub fn form(method: &str, target: &str, body: &str) -> Request {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        Request {
            method: method.to_string(),
            path: path.to_string(),
            query: query.to_string(),
            headers: vec![(
                "Content-Type".to_string(),
                "application/x-www-form-urlencoded".to_string(),
            )],
            body: body.as_bytes().to_vec(),
            http11: true,
        }
    }

    /// Whether the connection stays open after the response.
    fn keep_alive(&self) -> bool {
        match self.header("connection") {
            Some(v) if v.eq_ignore_ascii_case("close") => false,
            Some(v) if v.eq_ignore_ascii_case("keep-alive") => true,
            _ => self.http11,
        }
    }
}

/// A JSON response, or a redirect (`location` set, empty body).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Response {
    pub status: u16,
    pub body: String,
    /// The `Location` header of a redirect.
    pub location: Option<String>,
}

impl Response {
    pub fn json(status: u16, body: impl Into<String>) -> Response {
        Response {
            status,
            body: body.into(),
            location: None,
        }
    }

    /// `302 Found` to `location`, as the authorize endpoint answers a browser.
    pub fn redirect(location: impl Into<String>) -> Response {
        Response {
            status: 302,
            body: String::new(),
            location: Some(location.into()),
        }
    }

    fn to_bytes(&self, keep_alive: bool) -> Vec<u8> {
        let (content_type, location) = match &self.location {
            Some(l) => ("text/html; charset=utf-8", format!("Location: {l}\r\n")),
            None => ("application/json; charset=utf-8", String::new()),
        };
        let head = format!(
            "HTTP/1.1 {} {}\r\n{location}Content-Type: {content_type}\r\n\
             Content-Length: {}\r\nCache-Control: no-store, no-cache\r\nPragma: no-cache\r\n\
             Connection: {}\r\n\r\n",
            self.status,
            reason(self.status),
            self.body.len(),
            if keep_alive { "keep-alive" } else { "close" },
        );
        let mut out = head.into_bytes();
        out.extend_from_slice(self.body.as_bytes());
        out
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        302 => "Found",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

/// A request head that is complete but unusable: answer with this status and close.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BadRequest {
    pub status: u16,
    pub why: &'static str,
}

/// The head of a request and how many bytes of `buf` it used, `Ok(None)` while incomplete.
pub(crate) fn parse_head(buf: &[u8]) -> Result<Option<(Request, usize)>, BadRequest> {
    let Some(end) = find(buf, b"\r\n\r\n") else {
        if buf.len() > MAX_HEAD_BYTES {
            return Err(BadRequest {
                status: 431,
                why: "request head too large",
            });
        }
        return Ok(None);
    };
    let bad = |why| BadRequest { status: 400, why };
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| bad("request head is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("malformed request line"));
    };
    let http11 = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        _ => return Err(bad("unsupported HTTP version")),
    };
    let mut headers = Vec::new();
    for line in lines {
        let (name, value) = line.split_once(':').ok_or(bad("malformed header line"))?;
        if name.is_empty() || name.contains(' ') {
            return Err(bad("malformed header name"));
        }
        headers.push((name.to_string(), value.trim().to_string()));
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let query = query.split('#').next().unwrap_or_default();
    let req = Request {
        method: method.to_string(),
        path: path.to_string(),
        query: query.to_string(),
        headers,
        body: Vec::new(),
        http11,
    };
    Ok(Some((req, end + 4)))
}

/// The declared body length of a parsed head.
fn body_len(req: &Request) -> Result<usize, BadRequest> {
    if req.header("transfer-encoding").is_some() {
        return Err(BadRequest {
            status: 411,
            why: "chunked bodies are not supported; send Content-Length",
        });
    }
    match req.header("content-length") {
        None => Ok(0),
        Some(v) => {
            let n: usize = v.parse().map_err(|_| BadRequest {
                status: 400,
                why: "bad Content-Length",
            })?;
            if n > MAX_BODY_BYTES {
                return Err(BadRequest {
                    status: 413,
                    why: "body too large",
                });
            }
            Ok(n)
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Serves requests on one connection until the peer closes it, a request asks to close,
/// or a request is malformed. `handle` turns each complete request into a response.
pub(crate) async fn serve_connection<S, F>(mut stream: S, mut handle: F) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: FnMut(&Request) -> Response,
{
    let mut buf: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    loop {
        // Head.
        let (mut req, head_len) = loop {
            match parse_head(&buf) {
                Ok(Some(done)) => break done,
                Ok(None) => {}
                Err(e) => return reject(&mut stream, &e).await,
            }
            if !read_more(&mut stream, &mut buf).await? {
                return Ok(()); // peer closed between (or inside) requests
            }
        };
        let len = match body_len(&req) {
            Ok(n) => n,
            Err(e) => return reject(&mut stream, &e).await,
        };
        let have = buf.len() - head_len;
        if have < len
            && req
                .header("expect")
                .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
        {
            stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
        }
        // Body.
        while buf.len() < head_len + len {
            if !read_more(&mut stream, &mut buf).await? {
                return Ok(());
            }
        }
        req.body = buf[head_len..head_len + len].to_vec();
        buf.drain(..head_len + len);

        let keep_alive = req.keep_alive();
        let resp = handle(&req);
        stream.write_all(&resp.to_bytes(keep_alive)).await?;
        stream.flush().await?;
        if !keep_alive {
            return stream.shutdown().await;
        }
    }
}

/// Reads at least one more byte into `buf`; false on end of stream.
async fn read_more<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
) -> std::io::Result<bool> {
    let mut chunk = [0u8; READ_CHUNK];
    let n = stream.read(&mut chunk).await?;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n > 0)
}

async fn reject<S: AsyncWrite + Unpin>(stream: &mut S, e: &BadRequest) -> std::io::Result<()> {
    let body = serde_json::json!({"error": "invalid_request", "error_description": e.why});
    let resp = Response::json(e.status, body.to_string());
    stream.write_all(&resp.to_bytes(false)).await?;
    stream.shutdown().await
}

/// Decodes an `application/x-www-form-urlencoded` body into name/value pairs, in order.
/// `+` is a space, `%XX` a byte; malformed escapes are kept literally; invalid UTF-8 is
/// replaced (lossy), as form values here are ASCII in practice.
pub(crate) fn parse_form(body: &[u8]) -> Vec<(String, String)> {
    body.split(|&b| b == b'&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = match pair.iter().position(|&b| b == b'=') {
                Some(i) => (&pair[..i], &pair[i + 1..]),
                None => (pair, &b""[..]),
            };
            (form_decode(name), form_decode(value))
        })
        .collect()
}

/// Percent-decoding with `+` as space (the form encoding, also used inside HTTP Basic
/// credentials by OAuth 2.0 clients, RFC 6749 section 2.3.1).
pub(crate) fn form_decode(s: &[u8]) -> String {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < s.len() => match (hex(s[i + 1]), hex(s[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Percent-encodes `s` for a query string or form: everything except the RFC 3986
/// unreserved characters (`A-Z a-z 0-9 - . _ ~`) becomes `%XX`, so the result is safe in
/// any query component and decodes back with [`form_decode`].
pub(crate) fn form_encode(s: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0x0f)]));
        }
    }
    out
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// `(client_id, client_secret)` from an `Authorization: Basic` header value, if it is one.
pub(crate) fn basic_credentials(header: &str) -> Option<(String, String)> {
    let (scheme, rest) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .ok()?;
    let i = raw.iter().position(|&b| b == b':')?;
    Some((form_decode(&raw[..i]), form_decode(&raw[i + 1..])))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_head_incrementally() {
        let raw =
            b"POST /t/oauth2/v2.0/token?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc";
        for cut in 0..raw.len() - 3 {
            assert_eq!(parse_head(&raw[..cut]), Ok(None), "cut {cut}");
        }
        let (req, n) = parse_head(raw).expect("valid").expect("complete");
        assert_eq!(n, raw.len() - 3);
        assert_eq!(req.method, "POST");
        assert_eq!(req.path, "/t/oauth2/v2.0/token");
        assert_eq!(req.query, "x=1");
        assert_eq!(req.header("content-length"), Some("3"));
        assert!(req.http11 && req.keep_alive());
        assert_eq!(body_len(&req), Ok(3));
    }

    #[test]
    fn rejects_bad_heads() {
        assert_eq!(
            parse_head(b"GARBAGE\r\n\r\n").map_err(|e| e.status),
            Err(400)
        );
        assert_eq!(
            parse_head(b"GET / HTTP/2\r\n\r\n").map_err(|e| e.status),
            Err(400)
        );
        assert_eq!(
            parse_head(&vec![b'a'; MAX_HEAD_BYTES + 1]).map_err(|e| e.status),
            Err(431)
        );
    }

    #[test]
    fn decodes_forms() {
        let form = parse_form(b"grant_type=client_credentials&scope=https%3A%2F%2Fx%2F.default+offline_access&empty=&flag&bad=%zz%4");
        assert_eq!(
            form,
            vec![
                ("grant_type".into(), "client_credentials".into()),
                ("scope".into(), "https://x/.default offline_access".into()),
                ("empty".into(), String::new()),
                ("flag".into(), String::new()),
                ("bad".into(), "%zz%4".into()),
            ]
        );
    }

    #[test]
    fn encodes_forms_reversibly() {
        let raw = "http://localhost:8400/cb?a=1&b=2 3+4%/é~._-";
        let enc = form_encode(raw);
        assert_eq!(
            enc,
            "http%3A%2F%2Flocalhost%3A8400%2Fcb%3Fa%3D1%26b%3D2%203%2B4%25%2F%C3%A9~._-"
        );
        assert_eq!(form_decode(enc.as_bytes()), raw);
    }

    #[test]
    fn redirect_response_framing() {
        let bytes = Response::redirect("http://localhost:1/?code=x").to_bytes(true);
        let text = String::from_utf8(bytes).expect("ascii");
        assert!(text.starts_with("HTTP/1.1 302 Found\r\n"), "{text}");
        assert!(
            text.contains("\r\nLocation: http://localhost:1/?code=x\r\n"),
            "{text}"
        );
        assert!(text.ends_with("Content-Length: 0\r\nCache-Control: no-store, no-cache\r\nPragma: no-cache\r\nConnection: keep-alive\r\n\r\n"), "{text}");
    }

    #[test]
    fn decodes_basic_auth() {
        let b64 = base64::engine::general_purpose::STANDARD.encode("my%20id:s%3Acret+x");
        assert_eq!(
            basic_credentials(&format!("Basic {b64}")),
            Some(("my id".into(), "s:cret x".into()))
        );
        assert_eq!(basic_credentials("Bearer abc"), None);
    }
}
