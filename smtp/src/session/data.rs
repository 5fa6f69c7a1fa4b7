//! DATA body scanning: end-of-data search, dot-unstuffing and line checks, in place.
//!
//! The receive buffer is scanned with memchr; the message body leaves this module as
//! `Bytes` slices of that same buffer (reference-counted views, no copy), with the one
//! stuffed dot of each transparent line simply left out between two slices (RFC 5321
//! §4.5.2). Only CRLF "." CRLF ends the data (RFC 5321 §4.1.1.4): a "." line after a bare
//! LF does not, which is what defeats SMTP smuggling (CVE-2023-51765). Bare CR and bare LF
//! are remembered and make the session reject the message once the real end arrives, and
//! so are NUL octets: RFC 5322 text and RFC 6152 8-bit data exclude NUL, and a receiver
//! further on that drops NULs would read CRLF NUL "." CRLF as the end of data (smuggling
//! through us to it).
//!
//! This module must never copy body bytes line by line, never allocate per line, and never
//! keep more than the configured size limit of body slices.
//!
//! `Coalescer` bounds what a body costs besides its bytes: a client can make the slices
//! tiny (a body trickled in 1-byte TCP segments, or short lines that all start with a
//! stuffed dot), and each `Bytes` costs 32 octets plus a share of the allocation it views.
//! Pieces under `MIN_SLICE` octets are copied once into a staging buffer, so the slice
//! list stays a small fraction of the body however it arrives; large pieces stay views.

use bytes::{Buf, Bytes, BytesMut};
use memchr::{memchr, memmem, memrchr};

/// What the scanner concluded about a finished message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BodyFlaws {
    /// A LF not preceded by CR, or a CR not followed by LF, was seen.
    pub bare_newline: bool,
    /// A line longer than the text-line limit was seen.
    pub long_line: bool,
    /// The body grew past the size limit; slices after that point were dropped.
    pub oversize: bool,
    /// A NUL octet was seen.
    pub nul: bool,
}

/// Body pieces shorter than this are copied together instead of kept as views.
pub const MIN_SLICE: usize = 512;

/// Staged small pieces are emitted as one slice once they reach this size.
const STAGE_CHUNK: usize = 8 * 1024;

/// Keeps a body's slice list proportional to its size (see the module docs). Call
/// [`Coalescer::absorb`] after each step that appended pieces to the body and
/// [`Coalescer::finish`] before the body is used; order is preserved.
#[derive(Debug, Default)]
pub struct Coalescer {
    /// Copies of small pieces that come after every slice already in the body.
    stage: BytesMut,
    /// Pieces of the body before this index have been looked at.
    seen: usize,
}

impl Coalescer {
    /// Looks at the pieces appended to `body` since the last call: small ones move into
    /// the staging buffer (copied once), large ones stay, after whatever was staged.
    pub fn absorb(&mut self, body: &mut Vec<Bytes>) {
        let start = self.seen.min(body.len());
        // Common case (large reads, nothing staged): the new pieces stay where they are,
        // without moving them through a second vector.
        if self.stage.is_empty() && body[start..].iter().all(|p| p.len() >= MIN_SLICE) {
            self.seen = body.len();
            return;
        }
        let fresh = body.split_off(start);
        for piece in fresh {
            if piece.len() < MIN_SLICE {
                if self.stage.capacity() == 0 {
                    // Later chunks get the same capacity when the frozen one is still shared.
                    self.stage.reserve(STAGE_CHUNK);
                }
                self.stage.extend_from_slice(&piece);
                if self.stage.len() >= STAGE_CHUNK {
                    body.push(self.stage.split().freeze());
                }
            } else {
                self.flush(body);
                body.push(piece);
            }
        }
        self.seen = body.len();
    }

    /// Appends whatever is staged: the body is complete.
    pub fn finish(&mut self, body: &mut Vec<Bytes>) {
        self.absorb(body);
        self.flush(body);
        self.seen = body.len();
    }

    fn flush(&mut self, body: &mut Vec<Bytes>) {
        if !self.stage.is_empty() {
            body.push(self.stage.split().freeze());
        }
    }
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
    ///
    /// Three vectorised passes instead of a walk over every line: `memmem` finds the
    /// "CRLF ." line starts (the only places where unstuffing or the terminator can occur),
    /// a branch-free compare checks that every LF follows a CR and every CR precedes a LF,
    /// and `memrchr` over windows of the line limit finds an over-long line.
    fn feed_some(&mut self, buf: &mut BytesMut, body: &mut Vec<Bytes>) -> Option<Scan> {
        const MAX_CUTS: usize = 8;
        let data = &buf[..];
        let len = data.len();
        if len == 0 {
            return Some(Scan::More);
        }
        let mut cuts: [(usize, usize); MAX_CUTS + 1] = [(0, 0); MAX_CUTS + 1];
        let mut ncuts = 0;
        let mut chunk_start = 0;
        let mut consumed = len;
        let mut end = None;
        let mut again = false;

        // Line starts that begin with '.', in order: the two that depend on bytes from the
        // previous read, then every "\r\n." inside this buffer.
        let head = if self.at_line_start && data[0] == b'.' {
            Some(0)
        } else if self.last == b'\r' && data[0] == b'\n' && len > 1 && data[1] == b'.' {
            Some(1)
        } else {
            None
        };
        let dots = head
            .into_iter()
            .chain(memmem::find_iter(data, b"\r\n.").map(|h| h + 2));
        for p in dots {
            let rest = &data[p..];
            if rest.len() >= 3 && &rest[..3] == b".\r\n" {
                end = Some(p);
                consumed = p;
                break;
            }
            if rest.len() < 3 && b".\r\n".starts_with(rest) {
                consumed = p; // maybe the terminator: decide when more bytes arrive
                break;
            }
            if ncuts == MAX_CUTS {
                consumed = p;
                again = true;
                break;
            }
            if p > chunk_start {
                cuts[ncuts] = (chunk_start, p);
                ncuts += 1;
            }
            chunk_start = p + 1; // drop the stuffed dot
        }

        let region = &data[..consumed];
        if !region.is_empty() {
            if !self.flaws.bare_newline && !newlines_paired(self.last, region) {
                self.flaws.bare_newline = true;
            }
            if !self.flaws.long_line {
                self.check_line_lengths(region);
            }
            if !self.flaws.nul && memchr(0, region).is_some() {
                self.flaws.nul = true;
            }
            let ends_crlf = match consumed {
                1 => region[0] == b'\n' && self.last == b'\r',
                _ => region[consumed - 2..] == *b"\r\n",
            };
            self.at_line_start = ends_crlf;
            self.last = region[consumed - 1];
        }
        if chunk_start < consumed {
            cuts[ncuts] = (chunk_start, consumed);
            ncuts += 1;
        }

        let region = buf.split_to(consumed).freeze();
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
            Some(_) => Some(Scan::End(self.flaws)),
            None if again => None,
            None => Some(Scan::More),
        }
    }

    /// Flags a line longer than `max_line` octets (CRLF included) in `region`, carrying the
    /// length of the unfinished last line over to the next call. Each step looks for the
    /// last LF within the next window of allowed length, so a 64 KiB body of short lines
    /// costs a few dozen short backward searches.
    fn check_line_lengths(&mut self, region: &[u8]) {
        let mut pos = 0;
        let mut run = self.line_len; // non-LF octets of the current line so far
        loop {
            if run >= self.max_line {
                self.flaws.long_line = true;
                return;
            }
            let window = self.max_line - run; // the next LF must come within this many octets
            let stop = (pos + window).min(region.len());
            match memrchr(b'\n', &region[pos..stop]) {
                Some(q) => {
                    pos += q + 1;
                    run = 0;
                }
                None => {
                    run += stop - pos;
                    pos = stop;
                }
            }
            if pos >= region.len() {
                if run >= self.max_line {
                    self.flaws.long_line = true;
                }
                self.line_len = run;
                return;
            }
        }
    }
}

/// True when every LF in `region` follows a CR and every CR is followed by a LF, `prev`
/// being the byte before the region. A trailing CR is settled by the next call (its LF
/// arrives then), and the terminator's own CRLF is excluded by the caller.
fn newlines_paired(prev: u8, region: &[u8]) -> bool {
    if (region[0] == b'\n') != (prev == b'\r') {
        return false;
    }
    // Compare each byte with its successor; a branch-free OR per 64-byte block vectorises.
    let cur = &region[..region.len() - 1];
    let next = &region[1..];
    for (a, b) in cur.chunks(64).zip(next.chunks(64)) {
        let mut bad = 0u8;
        for (x, y) in a.iter().zip(b) {
            bad |= ((*x == b'\r') != (*y == b'\n')) as u8;
        }
        if bad != 0 {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalescer_copies_small_pieces_together_and_keeps_large_ones() {
        let mut c = Coalescer::default();
        let mut body: Vec<Bytes> = Vec::new();
        let mut want = Vec::new();
        let big = Bytes::from(vec![b'B'; 4096]);
        for i in 0..100_000u32 {
            let piece = Bytes::from(vec![(i % 251) as u8]);
            want.extend_from_slice(&piece);
            body.push(piece);
            if i % 7 == 0 {
                c.absorb(&mut body);
            }
            if i == 50_000 {
                body.push(big.clone());
                want.extend_from_slice(&big);
            }
        }
        c.finish(&mut body);
        assert_eq!(body.concat(), want);
        // 100,001 pieces in, a few dozen slices out.
        assert!(body.len() < 20, "{} slices", body.len());
        // The large piece is still a view of its buffer (not copied).
        assert!(body.iter().any(|b| b.as_ptr() == big.as_ptr()));
    }

    #[test]
    fn coalescer_survives_a_cleared_body() {
        let mut c = Coalescer::default();
        let mut body = vec![Bytes::from(vec![1u8; 600]), Bytes::from(vec![2u8; 600])];
        c.absorb(&mut body);
        body.clear(); // what the scanner does once a body is over the size limit
        body.push(Bytes::from_static(b"x"));
        c.finish(&mut body);
        assert_eq!(body.concat(), b"x");
    }

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
    fn nul_detected_and_does_not_end_data() {
        for v in [&b"x\r\n\x00.\r\nMAIL"[..], b"x\r\n.\x00\r\nMAIL", b"\x00"] {
            let mut input = v.to_vec();
            input.extend_from_slice(b"\r\n.\r\n");
            let (body, f, _) = run(&[&input]);
            let f = f.expect("ends at real CRLF.CRLF");
            assert!(f.nul && !f.bare_newline, "{v:?}");
            assert!(body.ends_with(b"\r\n"));
        }
        let (_, f, _) = run(&[b"a\r\n", b"\x00", b"\r\n.\r\n"]);
        assert!(f.unwrap().nul);
        let (_, f, _) = run(&[b"a\r\nb\r\n.\r\n"]);
        assert!(!f.unwrap().nul);
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

    /// Byte-at-a-time reference semantics, to check the vectorised scanner against.
    fn reference(input: &[u8], max_line: usize) -> Option<(Vec<u8>, BodyFlaws, Vec<u8>)> {
        let mut out = Vec::new();
        let mut f = BodyFlaws::default();
        let (mut at_start, mut prev, mut line_len, mut i) = (true, b'\n', 0usize, 0);
        while i < input.len() {
            if at_start && input[i] == b'.' {
                if input[i..].starts_with(b".\r\n") {
                    return Some((out, f, input[i + 3..].to_vec()));
                }
                line_len += 1;
                prev = b'.';
                at_start = false;
                i += 1;
                continue;
            }
            at_start = false;
            let c = input[i];
            line_len += 1;
            if c == 0 {
                f.nul = true;
            }
            if c == b'\n' {
                if prev == b'\r' {
                    at_start = true;
                } else {
                    f.bare_newline = true;
                }
                if line_len > max_line {
                    f.long_line = true;
                }
                line_len = 0;
            } else if prev == b'\r' {
                f.bare_newline = true;
            }
            out.push(c);
            prev = c;
            i += 1;
        }
        None
    }

    #[test]
    fn matches_reference_on_random_inputs_and_splits() {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..20_000 {
            let n = (rnd() % 120) as usize;
            let mut input: Vec<u8> = (0..n)
                .map(|_| match rnd() % 11 {
                    0..=4 => b'a',
                    5 => b'.',
                    6 | 7 => b'\r',
                    10 => 0,
                    _ => b'\n',
                })
                .collect();
            if rnd() % 2 == 0 {
                input.extend_from_slice(b"\r\n.\r\nREST");
            }
            let want = reference(&input, 12);
            // Feed in random pieces.
            let mut sc = DataScanner::new(12, 1 << 20);
            let mut buf = BytesMut::new();
            let mut body = Vec::new();
            let mut got = None;
            let mut pos = 0;
            while pos < input.len() {
                let step = 1 + (rnd() % 9) as usize;
                let end = (pos + step).min(input.len());
                buf.extend_from_slice(&input[pos..end]);
                pos = end;
                if let Scan::End(f) = sc.feed(&mut buf, &mut body) {
                    let mut rest = buf.to_vec();
                    rest.extend_from_slice(&input[pos..]);
                    got = Some((body.concat(), f, rest));
                    break;
                }
            }
            match (&want, &got) {
                (Some(w), Some(g)) => {
                    assert_eq!(w.0, g.0, "body for {:?}", String::from_utf8_lossy(&input));
                    assert_eq!(w.1, g.1, "flaws for {:?}", String::from_utf8_lossy(&input));
                    assert_eq!(w.2, g.2, "rest for {:?}", String::from_utf8_lossy(&input));
                }
                (None, None) => {}
                _ => panic!(
                    "end mismatch for {:?}: {want:?} vs {got:?}",
                    String::from_utf8_lossy(&input)
                ),
            }
        }
    }
}
