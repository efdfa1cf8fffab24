//! The HTTP side of the fake token endpoint, on axum (hyper underneath does the HTTP/1.1
//! framing: request heads, `Content-Length` and chunked bodies, `Expect: 100-continue`,
//! keep-alive and `Connection: close`). This file turns an axum request into the plain
//! [`Request`] the grant handlers take and their [`Response`] back into an axum one, and
//! holds the `application/x-www-form-urlencoded` / HTTP Basic decoding and encoding.
//!
//! What a request *means* is left to the handler given to [`router`]; the handlers are
//! pure functions of a [`Request`], unit-tested without a socket.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::IntoResponse;
use axum::Router;
use base64::Engine as _;

/// Largest request body we accept (413 above it); a token request form is a few hundred
/// bytes. Request heads are bounded by hyper's own buffer limit (431 above it).
const MAX_BODY_BYTES: usize = 1024 * 1024;
/// `Cache-Control` of every answer, as Microsoft's token endpoint sends it.
const NO_STORE: &str = "no-store, no-cache";

/// A request as the handlers see it. Header names are lower case (as hyper gives them);
/// look them up with [`Request::header`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Request {
    pub method: String,
    /// The request target without the query string.
    pub path: String,
    /// The raw query string (after `?`, still percent-encoded), empty if there is none.
    pub query: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    /// First header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// A request as the server would hand it over for `target` (path and query) and a
    /// form-encoded `body`, for unit tests of the handlers.
    #[cfg(test)]
    pub fn form(method: &str, target: &str, body: &str) -> Request {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        Request {
            method: method.to_string(),
            path: path.to_string(),
            query: query.to_string(),
            headers: vec![(
                "content-type".to_string(),
                "application/x-www-form-urlencoded".to_string(),
            )],
            body: body.as_bytes().to_vec(),
        }
    }

    fn from_parts(method: &Method, uri: &Uri, headers: &HeaderMap, body: &[u8]) -> Request {
        let query = uri.query().unwrap_or_default();
        Request {
            method: method.as_str().to_string(),
            path: uri.path().to_string(),
            query: query.split('#').next().unwrap_or_default().to_string(),
            headers: headers
                .iter()
                .map(|(n, v)| {
                    let value = String::from_utf8_lossy(v.as_bytes());
                    (n.as_str().to_string(), value.trim().to_string())
                })
                .collect(),
            body: body.to_vec(),
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
}

impl IntoResponse for Response {
    fn into_response(self) -> axum::response::Response {
        // A canned status outside 100..=999 (`fail_next`) or a Location that is not a valid
        // header value cannot be sent as asked: answer 500 and say why.
        let Ok(status) = StatusCode::from_u16(self.status) else {
            return server_error("canned status is not a valid HTTP status");
        };
        let location = match self.location.as_deref().map(HeaderValue::from_str) {
            None => None,
            Some(Ok(v)) => Some(v),
            Some(Err(_)) => return server_error("redirect location is not a valid header"),
        };
        let content_type = if location.is_some() {
            "text/html; charset=utf-8"
        } else {
            "application/json; charset=utf-8"
        };
        let mut resp = (
            status,
            [
                (header::CONTENT_TYPE, content_type),
                (header::CACHE_CONTROL, NO_STORE),
                (header::PRAGMA, "no-cache"),
            ],
            self.body,
        )
            .into_response();
        if let Some(l) = location {
            resp.headers_mut().insert(header::LOCATION, l);
        }
        resp
    }
}

fn server_error(why: &str) -> axum::response::Response {
    let body = serde_json::json!({"error": "server_error", "error_description": why});
    let mut resp = Response::json(500, body.to_string()).into_response();
    *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    resp
}

/// Every request, whatever its method and path, goes to `handle` (which does its own
/// routing and 404s); bodies above [`MAX_BODY_BYTES`] are refused with 413 first (at once
/// when `Content-Length` declares one, without waiting for it).
pub(crate) fn router<T>(target: Arc<T>, handle: fn(&T, &Request) -> Response) -> Router
where
    T: Send + Sync + 'static,
{
    let serve = move |State(target): State<Arc<T>>, req: axum::extract::Request| async move {
        let (parts, body) = req.into_parts();
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
            return too_large();
        }
        // Past the declared-length check, a failure is a chunked body over the limit or
        // a peer gone mid-body (which reads no answer).
        let Ok(body) = axum::body::to_bytes(body, MAX_BODY_BYTES).await else {
            return too_large();
        };
        let req = Request::from_parts(&parts.method, &parts.uri, &parts.headers, &body);
        handle(&target, &req)
    };
    Router::new().fallback(serve).with_state(target)
}

fn too_large() -> Response {
    let body =
        serde_json::json!({"error": "invalid_request", "error_description": "body too large"});
    Response::json(413, body.to_string())
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
    fn request_from_parts() {
        let uri: Uri = "/t/oauth2/v2.0/token?x=1&y=%20".parse().expect("uri");
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        headers.insert(
            "x-odd",
            HeaderValue::from_bytes(b" caf\xe9 ").expect("value"),
        );
        let req = Request::from_parts(&Method::POST, &uri, &headers, b"abc");
        assert_eq!(req.method, "POST");
        assert_eq!(req.path, "/t/oauth2/v2.0/token");
        assert_eq!(req.query, "x=1&y=%20");
        assert_eq!(req.header("Content-Length"), Some("3"));
        assert_eq!(req.header("X-ODD"), Some("caf\u{fffd}"));
        assert_eq!(req.body, b"abc");
        let bare = Request::from_parts(
            &Method::GET,
            &"/".parse().expect("uri"),
            &HeaderMap::new(),
            b"",
        );
        assert_eq!((bare.path.as_str(), bare.query.as_str()), ("/", ""));
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
    fn redirect_and_json_responses() {
        let r = Response::redirect("http://localhost:1/?code=x").into_response();
        assert_eq!(r.status(), StatusCode::FOUND);
        let h = r.headers();
        assert_eq!(h[header::LOCATION], "http://localhost:1/?code=x");
        assert_eq!(h[header::CONTENT_TYPE], "text/html; charset=utf-8");
        assert_eq!(h[header::CACHE_CONTROL], "no-store, no-cache");
        assert_eq!(h[header::PRAGMA], "no-cache");

        let r = Response::json(429, "{}").into_response();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            "application/json; charset=utf-8"
        );
        assert!(r.headers().get(header::LOCATION).is_none());

        // What cannot be sent as asked becomes a 500, not a panic.
        assert_eq!(Response::json(1000, "{}").into_response().status(), 500);
        let bad = Response::redirect("http://x/\r\nSet-Cookie: a=b").into_response();
        assert_eq!(bad.status(), 500);
        assert!(bad.headers().get(header::LOCATION).is_none());
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
