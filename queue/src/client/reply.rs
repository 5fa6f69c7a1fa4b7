//! SMTP reply parsing (RFC 5321 §4.2), sans-I/O.
//!
//! Owns: turning the bytes a remote server sent into [`Reply`] values, one complete
//! (possibly multi-line) reply at a time, and the enhanced status code (RFC 3463) in it.
//! Must never: panic or allocate without bound on anything a server sends. Lines are
//! limited to [`MAX_LINE`] octets and a whole reply to [`MAX_REPLY`]; anything else
//! malformed is a [`ReplyError`], which the driver treats as a broken connection.

use std::fmt;

/// Longest reply line accepted, CRLF included (RFC 5321 §4.5.3.1.5 says 512; real servers
/// send longer EHLO and diagnostic lines, so we are lenient up to this bound).
pub const MAX_LINE: usize = 4096;
/// Longest multi-line reply accepted, all lines together.
pub const MAX_REPLY: usize = 64 * 1024;

/// One complete SMTP reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The three-digit reply code (200..=599).
    pub code: u16,
    /// RFC 3463 enhanced status code, when the first line carries one whose class
    /// matches the reply code's first digit.
    pub enhanced: Option<(u8, u16, u16)>,
    /// The text of every line (enhanced codes removed), joined with `\n`. Non-UTF-8
    /// octets are replaced (U+FFFD).
    pub text: String,
}

impl Reply {
    /// A reply tern makes up itself (a local decision such as "server lacks BINARYMIME").
    pub fn local(code: u16, enhanced: (u8, u16, u16), text: impl Into<String>) -> Reply {
        Reply {
            code,
            enhanced: Some(enhanced),
            text: text.into(),
        }
    }

    /// 2xx.
    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }
    /// 3xx (354 to DATA, 334 in AUTH).
    pub fn is_intermediate(&self) -> bool {
        (300..400).contains(&self.code)
    }
    /// 4xx: try again later.
    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }
    /// 5xx: do not retry.
    pub fn is_permanent(&self) -> bool {
        (500..600).contains(&self.code)
    }
    /// The text lines (one per reply line).
    pub fn lines(&self) -> impl Iterator<Item = &str> {
        self.text.split('\n')
    }
    /// The enhanced status code as text ("5.1.1"), if present.
    pub fn enhanced_string(&self) -> Option<String> {
        self.enhanced.map(|(a, b, c)| format!("{a}.{b}.{c}"))
    }
}

impl fmt::Display for Reply {
    /// `550 5.1.1 text` with continuation lines joined by a space (for logs and DSNs).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.code)?;
        if let Some(e) = self.enhanced_string() {
            write!(f, " {e}")?;
        }
        for (i, line) in self.lines().enumerate() {
            if i == 0 {
                if !line.is_empty() {
                    write!(f, " {line}")?;
                }
            } else {
                write!(f, " {line}")?;
            }
        }
        Ok(())
    }
}

/// A reply that cannot be parsed. The connection is unusable after one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("reply line longer than {MAX_LINE} octets")]
    LineTooLong,
    #[error("multi-line reply longer than {MAX_REPLY} octets")]
    ReplyTooLong,
    #[error("malformed reply line {0:?}")]
    Malformed(String),
    #[error("reply lines disagree on the code ({0} then {1})")]
    CodeMismatch(u16, u16),
}

/// Parses the first complete reply at the start of `buf`.
///
/// Returns `Ok(None)` when more input is needed, `Ok(Some((reply, n)))` when the reply
/// occupies `buf[..n]`. Lines end in LF with an optional CR before it (servers that send
/// bare LF exist; accepting it costs nothing and cannot smuggle anything, since replies
/// are never relayed). Stateless: a driver that reads a reply in pieces should keep a
/// [`ReplyParser`] instead, which does not look at the same bytes twice.
pub fn parse_reply(buf: &[u8]) -> Result<Option<(Reply, usize)>, ReplyError> {
    ReplyParser::default().parse(buf)
}

/// An incremental [`parse_reply`]: it remembers the complete lines of the reply in
/// progress and how far it searched the incomplete one, so a reply that arrives a few
/// bytes at a time costs O(length) in all, not O(length²) (a server trickling a 64 KiB
/// reply would otherwise have every read re-parse everything from byte 0).
///
/// Contract: between calls the caller only appends to `buf` (never removes or changes
/// what it passed before) until a reply is returned; then it removes the `n` bytes of
/// that reply from the front and the parser starts afresh (it resets itself). After an
/// error the connection is unusable and so is the parser.
#[derive(Debug, Default, Clone)]
pub struct ReplyParser {
    /// Bytes of the reply in progress taken up by its complete lines.
    pos: usize,
    /// Bytes after `pos` already searched for LF without finding one.
    scanned: usize,
    code: Option<u16>,
    enhanced: Option<(u8, u16, u16)>,
    text: String,
}

impl ReplyParser {
    /// Continues parsing `buf` (see the type's contract); results as [`parse_reply`].
    pub fn parse(&mut self, buf: &[u8]) -> Result<Option<(Reply, usize)>, ReplyError> {
        if buf.len() < self.pos + self.scanned {
            // The contract was broken (the buffer shrank): start over rather than panic.
            *self = ReplyParser::default();
        }
        loop {
            let rest = &buf[self.pos..];
            let Some(lf) = memchr::memchr(b'\n', &rest[self.scanned..]).map(|i| i + self.scanned)
            else {
                self.scanned = rest.len();
                if rest.len() >= MAX_LINE {
                    return Err(ReplyError::LineTooLong);
                }
                if buf.len() >= MAX_REPLY {
                    return Err(ReplyError::ReplyTooLong);
                }
                return Ok(None);
            };
            self.scanned = 0;
            if lf + 1 > MAX_LINE {
                return Err(ReplyError::LineTooLong);
            }
            let end = self.pos + lf + 1;
            if end > MAX_REPLY {
                return Err(ReplyError::ReplyTooLong);
            }
            let mut line = &rest[..lf];
            if let [head @ .., b'\r'] = line {
                line = head;
            }
            let (this_code, last, body) = split_line(line)?;
            match self.code {
                None => self.code = Some(this_code),
                Some(c) if c != this_code => return Err(ReplyError::CodeMismatch(c, this_code)),
                Some(_) => {}
            }
            let body = String::from_utf8_lossy(body);
            let (enh, body) = strip_enhanced(this_code, &body);
            if self.pos == 0 {
                self.enhanced = enh;
            } else {
                self.text.push('\n');
            }
            self.text.push_str(body);
            self.pos = end;
            if last {
                let reply = Reply {
                    code: this_code,
                    enhanced: self.enhanced,
                    text: std::mem::take(&mut self.text),
                };
                *self = ReplyParser::default();
                return Ok(Some((reply, end)));
            }
        }
    }
}

/// `DDD`, `DDD text`, `DDD-text` → (code, is last line, text).
fn split_line(line: &[u8]) -> Result<(u16, bool, &[u8]), ReplyError> {
    let malformed = || ReplyError::Malformed(String::from_utf8_lossy(line).into_owned());
    let (digits, rest) = match line {
        [a, b, c, rest @ ..] => ([*a, *b, *c], rest),
        _ => return Err(malformed()),
    };
    if !(b'2'..=b'5').contains(&digits[0])
        || !digits[1].is_ascii_digit()
        || !digits[2].is_ascii_digit()
    {
        return Err(malformed());
    }
    let code = digits
        .iter()
        .fold(0u16, |acc, d| acc * 10 + u16::from(d - b'0'));
    match rest {
        [] => Ok((code, true, rest)),
        [b' ', text @ ..] => Ok((code, true, text)),
        [b'-', text @ ..] => Ok((code, false, text)),
        _ => Err(malformed()),
    }
}

/// Splits a leading RFC 3463 `class.subject.detail` off `text` when its class agrees with
/// the reply code (a `250 2.0.0` reply; `550 2.0.0` would be a lie and is left as text).
fn strip_enhanced(code: u16, text: &str) -> (Option<(u8, u16, u16)>, &str) {
    let word_end = text.find(' ').unwrap_or(text.len());
    let word = &text[..word_end];
    let mut parts = word.split('.');
    let parsed = (|| {
        let class: u8 = parts.next()?.parse().ok()?;
        let subject = parts.next()?;
        let detail = parts.next()?;
        if parts.next().is_some()
            || subject.is_empty()
            || detail.is_empty()
            || subject.len() > 3
            || detail.len() > 3
            || !subject.bytes().all(|b| b.is_ascii_digit())
            || !detail.bytes().all(|b| b.is_ascii_digit())
        {
            return None;
        }
        let subject: u16 = subject.parse().ok()?;
        let detail: u16 = detail.parse().ok()?;
        ((class == 2 || class == 4 || class == 5) && u16::from(class) == code / 100)
            .then_some((class, subject, detail))
    })();
    match parsed {
        Some(e) => (Some(e), text[word_end..].trim_start_matches(' ')),
        None => (None, text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_and_multi_line() {
        let (r, n) = parse_reply(b"250 2.1.0 Ok\r\nextra").unwrap().unwrap();
        assert_eq!(n, 14);
        assert_eq!(r.code, 250);
        assert_eq!(r.enhanced, Some((2, 1, 0)));
        assert_eq!(r.text, "Ok");
        let (r, n) = parse_reply(b"250-mx.example\r\n250-PIPELINING\r\n250 SIZE 10\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(n, 45);
        assert_eq!(
            r.lines().collect::<Vec<_>>(),
            ["mx.example", "PIPELINING", "SIZE 10"]
        );
        assert_eq!(parse_reply(b"250-a\r\n250 b").unwrap(), None);
        assert_eq!(parse_reply(b"").unwrap(), None);
        let (r, _) = parse_reply(b"354\r\n").unwrap().unwrap();
        assert_eq!((r.code, r.text.as_str()), (354, ""));
        assert_eq!(r.to_string(), "354");
    }

    /// Fed a byte at a time, the incremental parser finds the same replies as a whole
    /// parse, and the same errors.
    #[test]
    fn incremental_equals_whole() {
        let inputs: [&[u8]; 6] = [
            b"250 2.1.0 Ok\r\n",
            b"250-mx.example\r\n250-PIPELINING\r\n250 SIZE 10\r\n354 go\n",
            b"220-a\n220-\xff\r\n220 5.0.0 c\r\n",
            b"250-a\r\n251 b\r\n",
            b"250-a\r\nhello\r\n",
            b"421 4.3.2 bye\r\n",
        ];
        for input in inputs {
            let mut want = Vec::new();
            let mut rest = input;
            loop {
                match parse_reply(rest) {
                    Ok(Some((r, n))) => {
                        want.push(Ok(r));
                        rest = &rest[n..];
                    }
                    Ok(None) => break,
                    Err(e) => {
                        want.push(Err(e));
                        break;
                    }
                }
            }
            let mut got = Vec::new();
            let mut p = ReplyParser::default();
            let mut buf = Vec::new();
            'feed: for &b in input {
                buf.push(b);
                loop {
                    match p.parse(&buf) {
                        Ok(Some((r, n))) => {
                            got.push(Ok(r));
                            buf.drain(..n);
                        }
                        Ok(None) => break,
                        Err(e) => {
                            got.push(Err(e));
                            break 'feed;
                        }
                    }
                }
            }
            assert_eq!(got, want, "{input:?}");
        }
        // The longest line is refused as soon as it is too long, fed in pieces too.
        let mut p = ReplyParser::default();
        let long = vec![b'2'; MAX_LINE];
        assert_eq!(p.parse(&long[..MAX_LINE / 2]), Ok(None));
        assert_eq!(p.parse(&long), Err(ReplyError::LineTooLong));
    }

    #[test]
    fn enhanced_must_agree() {
        let (r, _) = parse_reply(b"550 2.0.0 odd\r\n").unwrap().unwrap();
        assert_eq!(r.enhanced, None);
        assert_eq!(r.text, "2.0.0 odd");
        let (r, _) = parse_reply(b"451 4.3.0\r\n").unwrap().unwrap();
        assert_eq!(r.enhanced, Some((4, 3, 0)));
        assert_eq!(r.to_string(), "451 4.3.0");
    }

    #[test]
    fn garbage() {
        assert!(parse_reply(b"hello\r\n").is_err());
        assert!(parse_reply(b"25\r\n").is_err());
        assert!(parse_reply(b"250x\r\n").is_err());
        assert!(parse_reply(b"650 no\r\n").is_err());
        assert!(parse_reply(b"250-a\r\n251 b\r\n").is_err());
        assert_eq!(parse_reply(&[b'2'; MAX_LINE]), Err(ReplyError::LineTooLong));
        let mut long = b"250-".to_vec();
        long.extend(std::iter::repeat_n(b'x', MAX_LINE));
        long.extend(b"\r\n");
        assert_eq!(parse_reply(&long), Err(ReplyError::LineTooLong));
        let many: Vec<u8> = b"250-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\r\n"
            .iter()
            .copied()
            .cycle()
            .take(MAX_REPLY + 100)
            .collect();
        assert_eq!(parse_reply(&many), Err(ReplyError::ReplyTooLong));
        assert_eq!(parse_reply(&many[..MAX_REPLY - 200]).unwrap(), None);
        // Every prefix of every byte soup parses or errors, never panics.
        for seed in 0u32..2000 {
            let mut x = seed.wrapping_mul(2654435761);
            let bytes: Vec<u8> = (0..64)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    b"25- \r\n.0x\xff"[(x % 10) as usize]
                })
                .collect();
            let _ = parse_reply(&bytes);
        }
    }
}
