//! Message content rules applied while DATA is received, as a pure incremental decoder.
//!
//! Only `CRLF.CRLF` ends the message (RFC 5321 4.1.1.4; smtp-proto's receiver also ends at
//! `CRLF.CR CR LF`, which two servers can disagree on). A `.` that starts a line (after a
//! real CRLF) is removed (dot-unstuffing, RFC 5321 4.5.2). Lines are expected to end with
//! CRLF, and then the content is relayed byte for byte. A bare LF or bare CR is turned into
//! CRLF (as Postfix's `smtpd_forbid_bare_newline = normalize` does), so the upstream can
//! never read a `<LF>.<CR><LF>` or `<CR>.<CR><LF>` inside the content as an early end of
//! data (SMTP smuggling): after normalising, every `.` at a line start is dot-stuffed on the
//! way out. A `.` after a bare line ending is content (it did not start a line for us).
//!
//! [`DataDecoder`] takes the bytes in any split and gives the same output as one call on
//! the whole input; reading the socket and the size limit's consequences are `framing`'s.

/// Where the decoder stands between two input bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// After a CRLF (or at the start): a `.` here is stuffing (or the terminator's).
    LineStart,
    /// Inside a line.
    Mid,
    /// After a CR whose meaning depends on the next byte; `after_dot` when it came right
    /// after a line-start `.` (then an LF ends the message).
    Cr { after_dot: bool },
    /// After a line-start `.` (removed).
    Dot,
}

/// Decodes DATA content incrementally: unstuffed, line endings normalised to CRLF, up to
/// the `CRLF.CRLF` terminator (not included in the output).
#[derive(Debug, Clone)]
pub(crate) struct DataDecoder {
    state: State,
    done: bool,
    /// Unstuffed bytes before normalisation (what `SIZE` and the size limit count: a bare
    /// LF counts one byte, as the client sent it).
    size: u64,
}

impl Default for DataDecoder {
    fn default() -> Self {
        DataDecoder::new()
    }
}

impl DataDecoder {
    pub fn new() -> DataDecoder {
        DataDecoder {
            state: State::LineStart,
            done: false,
            size: 0,
        }
    }

    /// The content's size so far (unstuffed, before normalisation).
    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// Whether the terminator was seen.
    pub(crate) fn is_done(&self) -> bool {
        self.done
    }

    /// Decodes from `input`, appending content to `out`; returns how many input bytes were
    /// consumed. It stops right after the terminator (then [`DataDecoder::is_done`]): the
    /// bytes after it are the next command's.
    pub(crate) fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> usize {
        let mut i = 0;
        while i < input.len() && !self.done {
            if self.state == State::Mid {
                // Fast path: copy the run up to the next CR or LF.
                let run = memchr::memchr2(b'\r', b'\n', &input[i..]).unwrap_or(input.len() - i);
                if run > 0 {
                    out.extend_from_slice(&input[i..i + run]);
                    self.size += run as u64;
                    i += run;
                    continue;
                }
            }
            self.byte(input[i], out);
            i += 1;
        }
        i
    }

    fn byte(&mut self, b: u8, out: &mut Vec<u8>) {
        match self.state {
            State::LineStart if b == b'.' => self.state = State::Dot,
            State::Dot if b == b'\r' => self.state = State::Cr { after_dot: true },
            State::LineStart | State::Dot | State::Mid => self.mid(b, out),
            State::Cr { after_dot } => match b {
                b'\n' if after_dot => self.done = true,
                b'\n' => {
                    out.extend_from_slice(b"\r\n");
                    self.size += 2;
                    self.state = State::LineStart;
                }
                // A bare CR: a line ending of its own; this CR waits for its next byte.
                b'\r' => {
                    out.extend_from_slice(b"\r\n");
                    self.size += 1;
                    self.state = State::Cr { after_dot: false };
                }
                _ => {
                    out.extend_from_slice(b"\r\n");
                    self.size += 1;
                    self.mid(b, out);
                }
            },
        }
    }

    /// A byte inside a line.
    fn mid(&mut self, b: u8, out: &mut Vec<u8>) {
        match b {
            b'\r' => self.state = State::Cr { after_dot: false },
            b'\n' => {
                // A bare LF ends the line for the upstream, but did not start one for us.
                out.extend_from_slice(b"\r\n");
                self.size += 1;
                self.state = State::Mid;
            }
            _ => {
                out.push(b);
                self.size += 1;
                self.state = State::Mid;
            }
        }
    }
}

/// The whole-buffer form: the decoded content and the bytes consumed, or `None` when the
/// terminator is not in `data`.
#[cfg(test)]
pub(crate) fn decode_all(data: &[u8]) -> Option<(Vec<u8>, usize)> {
    let mut d = DataDecoder::new();
    let mut out = Vec::with_capacity(data.len());
    let used = d.feed(data, &mut out);
    d.is_done().then_some((out, used))
}

/// `None` when `data` has only CRLF line endings (the common case: nothing is copied);
/// otherwise the content with every bare LF and bare CR replaced by CRLF.
#[cfg(test)]
pub(crate) fn normalize_line_endings(data: &[u8]) -> Option<Vec<u8>> {
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
    use super::*;
    use proptest::prelude::*;

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

    fn d(input: &[u8]) -> Option<(Vec<u8>, usize)> {
        decode_all(input)
    }

    #[test]
    fn only_crlf_dot_crlf_ends_the_message() {
        assert_eq!(d(b".\r\n"), Some((Vec::new(), 3)));
        assert_eq!(d(b"a\r\n.\r\nNEXT"), Some((b"a\r\n".to_vec(), 6)));
        // CRLF . CR CR LF is content (smtp-proto ended the message there).
        assert_eq!(d(b"a\r\n.\r\r\nb\r\n"), None);
        assert_eq!(
            d(b"a\r\n.\r\r\nb\r\n.\r\n").unwrap().0,
            b"a\r\n\r\n\r\nb\r\n"
        );
        // Neither bare line ending around the dot ends it.
        assert_eq!(d(b"a\n.\n"), None);
        assert_eq!(d(b"a\n.\r\n"), None);
        assert_eq!(d(b"a\r.\r\n"), None);
        assert_eq!(d(b"a\r\n.\n"), None);
        assert_eq!(d(b"a\r\n.\r"), None);
    }

    #[test]
    fn dots_are_unstuffed_only_after_a_real_crlf() {
        assert_eq!(
            d(b"..dot\r\nline\r\n.x\r\n.\r\n").unwrap().0,
            b".dot\r\nline\r\nx\r\n"
        );
        // After a bare LF the dot is content (and the upstream will see it stuffed).
        assert_eq!(d(b"a\n..b\r\n.\r\n").unwrap().0, b"a\r\n..b\r\n");
        assert_eq!(d(b"a\r..b\r\n.\r\n").unwrap().0, b"a\r\n..b\r\n");
    }

    #[test]
    fn size_counts_unstuffed_bytes_before_normalisation() {
        let mut dec = DataDecoder::new();
        let mut out = Vec::new();
        dec.feed(b"..a\nb\r\n.\r\n", &mut out);
        assert!(dec.is_done());
        assert_eq!(out, b".a\r\nb\r\n");
        assert_eq!(dec.size(), 6);
    }

    /// What the first edition did (smtp-proto's receiver, then normalising the whole
    /// content): the reference for every input without the `CRLF.CR CR` it ended at.
    fn first_edition(input: &[u8]) -> Option<(Vec<u8>, usize)> {
        use smtp_proto::request::receiver::DataReceiver;
        let mut rx = DataReceiver::new();
        let mut buf = Vec::new();
        rx.ingest(&mut b"\r\n".iter(), &mut buf);
        let mut it = input.iter();
        if !rx.ingest(&mut it, &mut buf) {
            return None;
        }
        let used = input.len() - it.as_slice().len();
        buf.drain(..2);
        let out = normalize_line_endings(&buf).unwrap_or(buf);
        Some((out, used))
    }

    fn content() -> impl Strategy<Value = Vec<u8>> {
        let piece = prop_oneof![
            Just(b"\r".to_vec()),
            Just(b"\n".to_vec()),
            Just(b".".to_vec()),
            Just(b"\r\n".to_vec()),
            Just(b"\r\n.".to_vec()),
            Just(b"\r\n.\r\n".to_vec()),
            Just(b"x".to_vec()),
            proptest::collection::vec(any::<u8>(), 0..8),
        ];
        proptest::collection::vec(piece, 0..40).prop_map(|v| v.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        /// Any split of the input gives the whole-buffer result, consumed length included.
        #[test]
        fn any_split_equals_the_whole_buffer(input in content(), cuts in proptest::collection::vec(0usize..64, 0..12)) {
            let whole = decode_all(&input);
            let mut dec = DataDecoder::new();
            let mut out = Vec::new();
            let mut pos = 0;
            let mut bounds: Vec<usize> = cuts.iter().map(|c| c * input.len() / 64).collect();
            bounds.push(input.len());
            bounds.sort_unstable();
            for b in bounds {
                if dec.is_done() || b < pos {
                    continue;
                }
                pos += dec.feed(&input[pos..b], &mut out);
            }
            match whole {
                Some((w, used)) => {
                    prop_assert!(dec.is_done());
                    prop_assert_eq!(out, w);
                    prop_assert_eq!(pos, used);
                }
                None => {
                    prop_assert!(!dec.is_done());
                    prop_assert_eq!(pos, input.len());
                }
            }
        }

        /// The same bytes as the first edition, except where it ended at CRLF.CR CR LF.
        #[test]
        fn same_result_as_the_first_edition(input in content()) {
            let mut seeded = b"\r\n".to_vec();
            seeded.extend_from_slice(&input);
            prop_assume!(!seeded.windows(5).any(|w| w == b"\r\n.\r\r"));
            prop_assert_eq!(decode_all(&input), first_edition(&input));
        }

        /// The output never holds a bare CR or LF, so the upstream sees no other line end.
        #[test]
        fn output_has_only_crlf(input in content()) {
            let mut dec = DataDecoder::new();
            let mut out = Vec::new();
            dec.feed(&input, &mut out);
            prop_assert_eq!(normalize_line_endings(&out), None);
        }
    }
}
