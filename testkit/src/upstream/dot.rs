//! The SMTP DATA decoder: dot-unstuffing and end-of-data detection (RFC 5321 section 4.5.2),
//! fed arbitrary chunks. Only `CRLF . CRLF` ends the data (a bare LF never does), and the
//! start of the data counts as the start of a line, so an empty message (`.` on the very
//! first line) and a stuffed dot on the first line are both handled.
//!
//! Pure: takes bytes, returns how many it used. Reading from the socket is `conn.rs`'s job.

/// Where the decoder is within the current line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    /// At the start of a line (after CRLF, or at the start of the data).
    LineStart,
    /// Inside a line.
    Mid,
    /// Inside a line, just after a CR (which has been emitted).
    MidCr,
    /// The line began with a dot, which was withheld.
    Dot,
    /// The line began with dot CR; both withheld, LF here ends the data.
    DotCr,
}

/// Incremental decoder for one DATA transfer.
#[derive(Debug, Clone)]
pub(crate) struct DotDecoder {
    at: At,
}

impl Default for DotDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl DotDecoder {
    pub(crate) fn new() -> Self {
        DotDecoder { at: At::LineStart }
    }

    /// Decodes `input`, appending the message bytes to `out`. Returns `Some(n)` when the
    /// terminator was found, `n` being the bytes of `input` used (terminator included; the
    /// rest belongs to the next command), or `None` when all of `input` was used and more is
    /// needed.
    pub(crate) fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Option<usize> {
        let mut i = 0;
        while i < input.len() {
            if self.at == At::Mid {
                // Fast path: copy up to the next CR in one go.
                let rest = &input[i..];
                match rest.iter().position(|&b| b == b'\r') {
                    Some(p) => {
                        out.extend_from_slice(&rest[..=p]);
                        i += p + 1;
                        self.at = At::MidCr;
                    }
                    None => {
                        out.extend_from_slice(rest);
                        return None;
                    }
                }
                continue;
            }
            let b = input[i];
            i += 1;
            self.at = match (self.at, b) {
                (At::LineStart, b'.') => At::Dot,
                (At::DotCr, b'\n') => {
                    self.at = At::LineStart;
                    return Some(i);
                }
                (At::DotCr, b) => {
                    // ".\r" followed by something else: the dot was stuffing, the CR is data.
                    out.push(b'\r');
                    self.step_mid(b, out)
                }
                (At::Dot, b'\r') => At::DotCr,
                (At::MidCr, b'\n') => {
                    out.push(b'\n');
                    At::LineStart
                }
                // LineStart (not a dot), Dot (the dot is dropped), MidCr (not LF).
                (_, b) => self.step_mid(b, out),
            };
        }
        None
    }

    fn step_mid(&self, b: u8, out: &mut Vec<u8>) -> At {
        out.push(b);
        if b == b'\r' {
            At::MidCr
        } else {
            At::Mid
        }
    }
}

/// Dot-stuffs `data` and appends the terminator, as a client sends it (for tests).
#[cfg(test)]
pub(crate) fn stuff(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 8);
    let mut line_start = true;
    for (i, &b) in data.iter().enumerate() {
        if line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        line_start = b == b'\n' && i > 0 && data[i - 1] == b'\r';
    }
    if !data.is_empty() && !data.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_chunks(chunks: &[&[u8]]) -> (Vec<u8>, Option<usize>) {
        let mut d = DotDecoder::new();
        let mut out = Vec::new();
        let mut used = 0;
        for c in chunks {
            if let Some(n) = d.feed(c, &mut out) {
                return (out, Some(used + n));
            }
            used += c.len();
        }
        (out, None)
    }

    #[test]
    fn terminator_and_stuffing_at_every_split() {
        let wire: &[u8] = b"..leading dot\r\nbody\n.\nbare lf\r\n.\r.x\r\n...\r\n\r\n.\r\nNEXT";
        let want: &[u8] = b".leading dot\r\nbody\n.\nbare lf\r\n\r.x\r\n..\r\n\r\n";
        let end = wire.len() - 4;
        for a in 0..=wire.len() {
            for b in a..=wire.len() {
                let (out, used) = decode_chunks(&[&wire[..a], &wire[a..b], &wire[b..]]);
                assert_eq!(used, Some(end), "split {a},{b}");
                assert_eq!(out, want, "split {a},{b}");
            }
        }
    }

    #[test]
    fn empty_message_and_first_line() {
        assert_eq!(decode_chunks(&[b".\r\n"]), (Vec::new(), Some(3)));
        assert_eq!(decode_chunks(&[b".", b"\r", b"\n"]), (Vec::new(), Some(3)));
        assert_eq!(
            decode_chunks(&[b"..\r\n.\r\n"]),
            (b".\r\n".to_vec(), Some(7))
        );
        // No terminator yet: everything used, nothing decided.
        assert_eq!(decode_chunks(&[b"a\r\n.\n"]), (b"a\r\n\n".to_vec(), None));
    }

    #[test]
    fn round_trips_with_stuff() {
        let samples: [&[u8]; 5] = [
            b"",
            b"Subject: x\r\n\r\n.\r\n..\r\n.x\r\n",
            b".\r\n",
            b"no final crlf",
            b"\r\n.\r\n\r\n",
        ];
        for s in samples {
            let wire = stuff(s);
            let (out, used) = decode_chunks(&[&wire]);
            assert_eq!(used, Some(wire.len()));
            let mut want = s.to_vec();
            if !s.is_empty() && !s.ends_with(b"\r\n") {
                want.extend_from_slice(b"\r\n");
            }
            assert_eq!(out, want);
        }
    }
}
