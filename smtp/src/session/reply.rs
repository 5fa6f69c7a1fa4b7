//! Reply formatting: code, enhanced status code (RFC 3463 / RFC 2034) and text into the
//! session's output buffer.
//!
//! Replies are appended to a `BytesMut` that the connection driver flushes once the input is
//! drained, so a pipelined batch (RFC 2920) costs one write. This module must never write
//! to a socket and never put CR or LF from client data into a reply.

use bytes::{BufMut, BytesMut};

/// Appends a single-line reply: "CODE X.Y.Z text\r\n".
pub fn line(out: &mut BytesMut, code: u16, enhanced: &str, text: &str) {
    write_line(out, code, ' ', Some(enhanced), text);
}

/// Appends a single-line reply whose text is the concatenation of `parts` (no
/// intermediate String: the 250 after every message is written this way).
pub fn line_parts(out: &mut BytesMut, code: u16, enhanced: &str, parts: &[&str]) {
    put_code(out, code, ' ');
    out.put_slice(enhanced.as_bytes());
    out.put_u8(b' ');
    for p in parts {
        put_text(out, p);
    }
    out.put_slice(b"\r\n");
}

/// Appends a single-line reply without an enhanced code (greeting, HELO/EHLO, 334, 354),
/// which RFC 2034 §3 exempts.
pub fn plain(out: &mut BytesMut, code: u16, text: &str) {
    write_line(out, code, ' ', None, text);
}

/// Appends a multi-line reply; every line but the last uses "CODE-".
pub fn multi(out: &mut BytesMut, code: u16, enhanced: Option<&str>, lines: &[&str]) {
    for (i, l) in lines.iter().enumerate() {
        let sep = if i + 1 == lines.len() { ' ' } else { '-' };
        write_line(out, code, sep, enhanced, l);
    }
}

fn put_code(out: &mut BytesMut, code: u16, sep: char) {
    let mut num = [0u8; 4];
    num[0] = b'0' + (code / 100 % 10) as u8;
    num[1] = b'0' + (code / 10 % 10) as u8;
    num[2] = b'0' + (code % 10) as u8;
    num[3] = sep as u8;
    out.put_slice(&num);
}

fn write_line(out: &mut BytesMut, code: u16, sep: char, enhanced: Option<&str>, text: &str) {
    put_code(out, code, sep);
    if let Some(e) = enhanced {
        out.put_slice(e.as_bytes());
        if !text.is_empty() {
            out.put_u8(b' ');
        }
    }
    put_text(out, text);
    out.put_slice(b"\r\n");
}

/// Client-derived text (an address echoed back) has been validated as a path, which
/// cannot contain CR or LF; strip them anyway so no reply can ever be split.
fn put_text(out: &mut BytesMut, text: &str) {
    let t = text.as_bytes();
    if memchr::memchr2(b'\r', b'\n', t).is_none() {
        out.put_slice(t);
        return;
    }
    for &b in t {
        out.put_u8(if b == b'\r' || b == b'\n' { b' ' } else { b });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        let mut o = BytesMut::new();
        line(&mut o, 250, "2.0.0", "Ok");
        plain(&mut o, 354, "go ahead");
        multi(&mut o, 214, Some("2.0.0"), &["a", "b"]);
        line(&mut o, 500, "5.5.1", "x\r\ny");
        assert_eq!(
            &o[..],
            b"250 2.0.0 Ok\r\n354 go ahead\r\n214-2.0.0 a\r\n214 2.0.0 b\r\n500 5.5.1 x  y\r\n"
        );
    }
}
