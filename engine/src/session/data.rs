//! DATA body scanning: end-of-data search, dot-unstuffing and line checks, in place.
//!
//! The receive buffer is scanned with memchr; the message body leaves this module as
//! `Bytes` slices of that same buffer (reference-counted views, no copy), with the one
//! stuffed dot of each transparent line simply left out between two slices (RFC 5321
//! §4.5.2). Only CRLF "." CRLF ends the data (RFC 5321 §4.1.1.4): a "." line after a bare
//! LF does not, which is what defeats SMTP smuggling (CVE-2023-51765). Bare CR and bare LF
//! are remembered and make the session reject the message once the real end arrives.
//!
//! This module must never copy body bytes line by line, never allocate per line, and never
//! keep more than the configured size limit of body slices.

use bytes::{Buf, Bytes, BytesMut};
use memchr::memchr;

/// What the scanner concluded about a finished message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BodyFlaws {
    /// A LF not preceded by CR, or a CR not followed by LF, was seen.
    pub bare_newline: bool,
    /// A line longer than the text-line limit was seen.
    pub long_line: bool,
    /// The body grew past the size limit; slices after that point were dropped.
    pub oversize: bool,
}

/// Incremental DATA scanner. One per DATA command; state survives across reads.
#[derive(Debug)]
pub struct DataScanner {
    /// True when the next byte starts a line (after CRLF, or at the start of DATA).
    at_line_start: bool,
    /// The last byte consumed, so a CRLF split across reads is recognised.
    last: u8,
    /// Octets of the current line consumed so far (for the text-line limit).
    line_len: usize,
    /// CRLF pairs and CR bytes seen; unequal at the end means a bare CR somewhere.
    crlf: u64,
    cr: u64,
    /// Body octets kept so far (after unstuffing).
    size: u64,
    max_line: usize,
    max_size: u64,
    flaws: BodyFlaws,
}

/// Result of one `feed` call.
#[derive(Debug, PartialEq, Eq)]
pub enum Scan {
    /// All input consumed (or a partial terminator kept); read more.
    More,
    /// The terminating CRLF.CRLF was consumed; the body is complete.
    End(BodyFlaws),
}

impl DataScanner {
    pub fn new(max_line: usize, max_size: u64) -> Self {
        DataScanner {
            at_line_start: true,
            last: b'\n',
            line_len: 0,
            crlf: 0,
            cr: 0,
            size: 0,
            max_line,
            max_size,
            flaws: BodyFlaws::default(),
        }
    }

    /// Body octets kept so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Consumes as much of `buf` as can be decided now, appending body slices to `body`.
    /// Bytes that might be the start of the terminator (".", ".\r") stay in `buf`.
    pub fn feed(&mut self, buf: &mut BytesMut, body: &mut Vec<Bytes>) -> Scan {
        loop {
            match self.feed_some(buf, body) {
                Some(scan) => return scan,
                None => continue,
            }
        }
    }

    /// One bounded pass: returns None when it stopped early (many stuffed dots) and should
    /// be called again on the rest of the buffer.
    fn feed_some(&mut self, buf: &mut BytesMut, body: &mut Vec<Bytes>) -> Option<Scan> {
        const MAX_CUTS: usize = 8;
        let data = &buf[..];
        let len = data.len();
        let mut i = 0;
        // Slices of `data` to keep: [start, end) pairs, emitted after the scan so the borrow
        // of `buf` ends before we split it. Usually one or two entries; a stuffed dot adds one.
        let mut cuts: [(usize, usize); MAX_CUTS + 1] = [(0, 0); MAX_CUTS + 1];
        let mut again = false;
        let mut ncuts = 0;
        let mut chunk_start = 0;
        let mut end = None;
        while i < len {
            if self.at_line_start {
                if data[i] == b'.' {
                    // A line starting with '.' is either the terminator ".\r\n" or a stuffed
                    // line whose first dot must be removed. Decide only with enough bytes.
                    if len - i < 3 {
                        let tail = &data[i..];
                        if b".\r\n".starts_with(tail) {
                            break; // keep ".", ".\r" for the next read
                        }
                    }
                    if len - i >= 3 && &data[i..i + 3] == b".\r\n" {
                        end = Some(i);
                        break;
                    }
                    // Stuffed dot: end the current slice before it, start the next after it.
                    if i > chunk_start {
                        if ncuts == MAX_CUTS {
                            again = true; // emit what we have; scan the rest in the next pass
                            break;
                        }
                        cuts[ncuts] = (chunk_start, i);
                        ncuts += 1;
                    }
                    chunk_start = i + 1;
                    self.line_len += 1;
                    i += 1;
                    self.last = b'.';
                }
                self.at_line_start = false;
                if i >= len {
                    break;
                }
            }
            match memchr(b'\n', &data[i..]) {
                Some(p) => {
                    let nl = i + p;
                    let prev = if nl > 0 { data[nl - 1] } else { self.last };
                    let line = self.line_len + p + 1;
                    if line > self.max_line {
                        self.flaws.long_line = true;
                    }
                    self.line_len = 0;
                    if prev == b'\r' {
                        self.crlf += 1;
                        self.at_line_start = true;
                    } else {
                        // Bare LF: not a line end as far as the terminator is concerned.
                        self.flaws.bare_newline = true;
                    }
                    self.last = b'\n';
                    i = nl + 1;
                }
                None => {
                    self.line_len += len - i;
                    i = len;
                    self.last = data[len - 1];
                    if self.line_len > self.max_line {
                        self.flaws.long_line = true;
                    }
                }
            }
        }
        // Count CRs in what we consume as body (the terminator is excluded): every CR must
        // have been half of a CRLF pair.
        let body_end = end.unwrap_or(i);
        self.cr += bytecount::count(&data[..body_end], b'\r') as u64;
        if chunk_start < body_end {
            cuts[ncuts] = (chunk_start, body_end);
            ncuts += 1;
        }
        let region = buf.split_to(body_end).freeze();
        if end.is_some() {
            buf.advance(3);
        }
        for &(s, e) in &cuts[..ncuts] {
            let n = (e - s) as u64;
            if self.size + n > self.max_size {
                self.flaws.oversize = true;
            }
            self.size += n;
            if !self.flaws.oversize {
                body.push(region.slice(s..e));
            }
        }
        if self.flaws.oversize {
            body.clear();
        }
        match end {
            Some(_) => {
                if self.cr != self.crlf {
                    self.flaws.bare_newline = true;
                }
                Some(Scan::End(self.flaws))
            }
            None if again => None,
            None => Some(Scan::More),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(chunks: &[&[u8]]) -> (Vec<u8>, Option<BodyFlaws>, Vec<u8>) {
        let mut s = DataScanner::new(1000, 1 << 20);
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        let mut res = None;
        for c in chunks {
            buf.extend_from_slice(c);
            if let Scan::End(f) = s.feed(&mut buf, &mut body) {
                res = Some(f);
                break;
            }
        }
        let flat: Vec<u8> = body.iter().flat_map(|b| b.iter().copied()).collect();
        (flat, res, buf.to_vec())
    }

    #[test]
    fn simple_and_stuffed() {
        let (b, f, rest) = run(&[b"Subject: x\r\n\r\n..hidden\r\n.\r\nQUIT\r\n"]);
        assert_eq!(b, b"Subject: x\r\n\r\n.hidden\r\n");
        assert_eq!(f, Some(BodyFlaws::default()));
        assert_eq!(rest, b"QUIT\r\n");
    }

    #[test]
    fn empty_body() {
        let (b, f, _) = run(&[b".\r\n"]);
        assert!(b.is_empty());
        assert!(f.is_some());
    }

    #[test]
    fn split_everywhere_same_result() {
        let msg: &[u8] = b"a\r\n..b\r\n.c\r\n\r\n.\r\n";
        let want = run(&[msg]);
        for cut in 0..msg.len() {
            let got = run(&[&msg[..cut], &msg[cut..]]);
            assert_eq!(got.0, want.0, "cut {cut}");
            assert_eq!(got.1, want.1, "cut {cut}");
        }
        // byte by byte
        let parts: Vec<&[u8]> = msg.chunks(1).collect();
        assert_eq!(run(&parts).0, want.0);
        assert_eq!(want.0, b"a\r\n.b\r\nc\r\n\r\n");
    }

    #[test]
    fn smuggling_variants_do_not_end_data() {
        for v in [
            &b"x\n.\nMAIL"[..],
            b"x\r\n.\nMAIL",
            b"x\n.\r\nMAIL",
            b"x\r.\r\nMAIL",
        ] {
            let mut input = v.to_vec();
            input.extend_from_slice(b"\r\n.\r\n");
            let (body, f, _) = run(&[&input]);
            let f = f.expect("ends at real CRLF.CRLF");
            assert!(f.bare_newline, "{:?}", String::from_utf8_lossy(v));
            assert!(body.ends_with(b"MAIL\r\n"));
        }
    }

    #[test]
    fn bare_cr_detected() {
        let (_, f, _) = run(&[b"a\rb\r\n.\r\n"]);
        assert!(f.unwrap().bare_newline);
        let (_, f, _) = run(&[b"a\r", b"\nb\r\n.\r\n"]);
        assert!(!f.unwrap().bare_newline);
    }

    #[test]
    fn long_line_and_oversize() {
        let mut s = DataScanner::new(10, 20);
        let mut buf = BytesMut::from(&b"0123456789ab\r\nxxxxxxxxxxxxxxxxxx\r\n.\r\n"[..]);
        let mut body = Vec::new();
        match s.feed(&mut buf, &mut body) {
            Scan::End(f) => {
                assert!(f.long_line);
                assert!(f.oversize);
            }
            Scan::More => panic!(),
        }
        assert!(body.is_empty());
    }

    #[test]
    fn many_stuffed_dots_in_one_buffer() {
        let mut msg = Vec::new();
        for _ in 0..50 {
            msg.extend_from_slice(b"..x\r\n");
        }
        msg.extend_from_slice(b".\r\n");
        let (b, f, _) = run(&[&msg]);
        assert!(f.is_some());
        assert_eq!(b, b".x\r\n".repeat(50));
    }
}
