//! Message content rules applied between receiving DATA and relaying it.
//!
//! Lines are expected to end with CRLF (RFC 5321/5322), and then the content is relayed
//! byte for byte. A bare LF or bare CR is turned into CRLF (as Postfix's
//! `smtpd_forbid_bare_newline = normalize` does), so the upstream can never read a
//! `<LF>.<CR><LF>` or `<CR>.<CR><LF>` inside the content as an early end of data (SMTP
//! smuggling): after normalising, every `.` at a line start is dot-stuffed on the way out.

/// `None` when `data` has only CRLF line endings (the common case: nothing is copied);
/// otherwise the content with every bare LF and bare CR replaced by CRLF.
pub fn normalize_line_endings(data: &[u8]) -> Option<Vec<u8>> {
    let clean = memchr::memchr2_iter(b'\r', b'\n', data).all(|i| match data[i] {
        b'\r' => data.get(i + 1) == Some(&b'\n'),
        _ => i > 0 && data[i - 1] == b'\r',
    });
    if clean {
        return None;
    }
    let mut out = Vec::with_capacity(data.len() + data.len() / 64 + 2);
    let mut i = 0;
    while i < data.len() {
        match data[i] {
            b'\r' if data.get(i + 1) == Some(&b'\n') => {
                out.extend_from_slice(b"\r\n");
                i += 2;
            }
            b'\r' | b'\n' => {
                out.extend_from_slice(b"\r\n");
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::normalize_line_endings as n;

    #[test]
    fn crlf_content_is_left_alone() {
        assert_eq!(n(b"a\r\nb\r\n.\r\n"), None);
        assert_eq!(n(b""), None);
        assert_eq!(n(b"no line end"), None);
    }

    #[test]
    fn bare_lf_and_cr_become_crlf() {
        assert_eq!(n(b"a\nb\r\n").unwrap(), b"a\r\nb\r\n");
        assert_eq!(
            n(b"\n.\r\nMAIL FROM:<x>\r\n").unwrap(),
            b"\r\n.\r\nMAIL FROM:<x>\r\n"
        );
        assert_eq!(n(b"x\r.\r\n").unwrap(), b"x\r\n.\r\n");
        assert_eq!(n(b"x\r\r\n").unwrap(), b"x\r\n\r\n");
        assert_eq!(n(b"end\r").unwrap(), b"end\r\n");
    }
}
