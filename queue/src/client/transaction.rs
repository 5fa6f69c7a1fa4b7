//! The outbound SMTP transaction, sans-I/O: what to send and what the answers mean.
//!
//! Owns: reading the EHLO keywords into [`Extensions`]; deciding, before a byte is sent,
//! whether a message can go to this server at all (SIZE, BINARYMIME, SMTPUTF8); building
//! MAIL FROM and RCPT TO with their RFC 1870/3461/6152/6531/3030 parameters; the DATA
//! byte stream (dot-stuffing and line-ending repair as slices of the body, RFC 5321
//! §4.5.2 and §2.3.8); SASL client responses.
//! Must never: do I/O, or put a byte from an envelope on the wire that could end a command
//! line early (CR, LF and other controls are refused here, not escaped).

use super::reply::Reply;
use crate::envelope::{
    BodyType, Envelope, Recipient, Ret, NOTIFY_DELAY, NOTIFY_FAILURE, NOTIFY_NEVER, NOTIFY_SUCCESS,
};

/// The service extensions a server announced in its EHLO reply (RFC 5321 §4.1.1.1).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extensions {
    /// Whether EHLO was answered at all (false after a HELO fallback: no extensions).
    pub esmtp: bool,
    pub pipelining: bool,
    /// RFC 1870 SIZE: `Some(0)` = offered without a limit.
    pub size: Option<u64>,
    pub eightbitmime: bool,
    pub smtputf8: bool,
    pub chunking: bool,
    pub binarymime: bool,
    pub dsn: bool,
    pub starttls: bool,
    pub enhancedstatuscodes: bool,
    /// RFC 4954 AUTH mechanisms, upper case.
    pub auth: Vec<String>,
}

impl Extensions {
    /// Reads the keywords of a 250 EHLO reply (the first line is the server's name).
    pub fn from_ehlo(reply: &Reply) -> Extensions {
        let mut ext = Extensions {
            esmtp: true,
            ..Extensions::default()
        };
        for line in reply.lines().skip(1) {
            let mut words = line.split_ascii_whitespace();
            let Some(keyword) = words.next() else {
                continue;
            };
            // Old servers announce "AUTH=LOGIN PLAIN".
            let (keyword, first_param) = match keyword.split_once('=') {
                Some((k, p)) => (k, Some(p)),
                None => (keyword, None),
            };
            match keyword.to_ascii_uppercase().as_str() {
                "PIPELINING" => ext.pipelining = true,
                "SIZE" => ext.size = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0)),
                "8BITMIME" => ext.eightbitmime = true,
                "SMTPUTF8" => ext.smtputf8 = true,
                "CHUNKING" => ext.chunking = true,
                "BINARYMIME" => ext.binarymime = true,
                "DSN" => ext.dsn = true,
                "STARTTLS" => ext.starttls = true,
                "ENHANCEDSTATUSCODES" => ext.enhancedstatuscodes = true,
                "AUTH" => {
                    for m in first_param.into_iter().chain(words) {
                        let m = m.to_ascii_uppercase();
                        if !m.is_empty() && !ext.auth.contains(&m) {
                            ext.auth.push(m);
                        }
                    }
                }
                _ => {}
            }
        }
        ext
    }
}

/// What one `send` will put on the wire, decided before anything is written.
#[derive(Debug)]
pub struct Plan {
    /// `MAIL FROM:<...> params\r\n`.
    pub mail: String,
    /// (index into `env.recipients`, `RCPT TO:<...> params\r\n`).
    pub rcpts: Vec<(usize, String)>,
    /// Recipients refused locally (bad address bytes), with the reply to report.
    pub refused: Vec<(usize, Reply)>,
    /// Send the body with `BDAT n LAST` (RFC 3030) instead of DATA.
    pub bdat: bool,
}

/// Decides whether and how `env` can be sent to a server with `ext`. `Err(reply)` is a
/// locally made permanent failure for every recipient (nothing is sent).
///
/// Policy on an 8-bit body to a server without 8BITMIME: send it anyway, without BODY=
/// (what Postfix does with MIME conversion off, and what every such server we know of
/// accepts). RFC 6152 §3 asks for conversion to 7 bit or a 5.6.3 bounce; we do neither.
/// XXX: no 7-bit downgrade (quoted-printable) is implemented.
pub fn plan(
    env: &Envelope,
    rcpts: &[usize],
    body_len: usize,
    ext: &Extensions,
) -> Result<Plan, Reply> {
    if !safe_address(&env.sender) {
        return Err(Reply::local(
            553,
            (5, 1, 7),
            "sender address contains control characters",
        ));
    }
    if let Some(limit) = ext.size {
        if limit > 0 && body_len as u64 > limit {
            return Err(Reply::local(
                552,
                (5, 3, 4),
                format!("message size {body_len} exceeds the remote server's limit {limit}"),
            ));
        }
    }
    let bdat = env.body_type == BodyType::BinaryMime;
    if bdat && !(ext.chunking && ext.binarymime) {
        return Err(Reply::local(
            554,
            (5, 6, 3),
            "binary message, but the remote server does not offer BINARYMIME and CHUNKING",
        ));
    }
    if env.smtputf8 && !ext.smtputf8 {
        // RFC 6531 §3.2: no SMTPUTF8 transaction with a server that lacks it.
        return Err(Reply::local(
            554,
            (5, 6, 7),
            "SMTPUTF8 is required, but the remote server does not offer it",
        ));
    }

    let mut mail = format!("MAIL FROM:<{}>", env.sender);
    if ext.size.is_some() {
        mail.push_str(&format!(" SIZE={body_len}"));
    }
    match env.body_type {
        BodyType::SevenBit => {}
        BodyType::EightBitMime if ext.eightbitmime => mail.push_str(" BODY=8BITMIME"),
        BodyType::EightBitMime => {}
        BodyType::BinaryMime => mail.push_str(" BODY=BINARYMIME"),
    }
    if env.smtputf8 {
        mail.push_str(" SMTPUTF8");
    }
    if ext.dsn {
        match env.ret {
            Some(Ret::Full) => mail.push_str(" RET=FULL"),
            Some(Ret::Hdrs) => mail.push_str(" RET=HDRS"),
            None => {}
        }
        if let Some(envid) = &env.envid {
            mail.push_str(" ENVID=");
            xtext(envid, &mut mail);
        }
    }
    mail.push_str("\r\n");

    let mut plan = Plan {
        mail,
        rcpts: Vec::with_capacity(rcpts.len()),
        refused: Vec::new(),
        bdat,
    };
    for &i in rcpts {
        let Some(r) = env.recipients.get(i) else {
            continue;
        };
        if !safe_address(&r.addr) {
            plan.refused.push((
                i,
                Reply::local(
                    553,
                    (5, 1, 3),
                    "recipient address contains control characters",
                ),
            ));
            continue;
        }
        plan.rcpts.push((i, rcpt_command(r, ext)));
    }
    Ok(plan)
}

fn rcpt_command(r: &Recipient, ext: &Extensions) -> String {
    let mut cmd = format!("RCPT TO:<{}>", r.addr);
    if ext.dsn {
        if r.notify & NOTIFY_NEVER != 0 {
            cmd.push_str(" NOTIFY=NEVER");
        } else if r.notify != 0 {
            let words: Vec<&str> = [
                (NOTIFY_SUCCESS, "SUCCESS"),
                (NOTIFY_FAILURE, "FAILURE"),
                (NOTIFY_DELAY, "DELAY"),
            ]
            .iter()
            .filter(|(bit, _)| r.notify & bit != 0)
            .map(|(_, w)| *w)
            .collect();
            cmd.push_str(" NOTIFY=");
            cmd.push_str(&words.join(","));
        }
        if let Some(orcpt) = &r.orcpt {
            // Stored as "type;decoded-address": re-encode the address part.
            if let Some((kind, addr)) = orcpt.split_once(';') {
                if !kind.is_empty() && kind.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                {
                    cmd.push_str(" ORCPT=");
                    cmd.push_str(kind);
                    cmd.push(';');
                    xtext(addr, &mut cmd);
                }
            }
        }
    }
    cmd.push_str("\r\n");
    cmd
}

/// An address may go inside `<...>` on a command line: no controls, no `<>`, no spaces
/// outside quotes is the engine's business; here we only make sure the line cannot end
/// early or be split.
fn safe_address(a: &str) -> bool {
    !a.bytes()
        .any(|b| b < 0x20 || b == 0x7f || b == b'<' || b == b'>')
}

/// RFC 3461 §4 xtext: `+HH` for '+', '=', and everything outside 33..=126.
pub fn xtext(s: &str, out: &mut String) {
    for b in s.bytes() {
        if (33..=126).contains(&b) && b != b'+' && b != b'=' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
}

/// The DATA byte stream for `body` as a sequence of slices: the body's own bytes, with
/// a '.' inserted before every line that starts with one (RFC 5321 §4.5.2), a CR inserted
/// before a bare LF and an LF after a bare CR (§2.3.8: no bare CR or LF on the wire, which
/// also rules out SMTP smuggling through us), and the `.CRLF` terminator (preceded by CRLF
/// if the body does not end with one). No body byte is copied.
pub struct DataPieces<'a> {
    body: &'a [u8],
    /// Next body byte not yet yielded.
    pos: usize,
    /// Pending inserted piece, yielded before the body resumes.
    insert: Option<&'static [u8]>,
    done: bool,
}

impl<'a> DataPieces<'a> {
    pub fn new(body: &'a [u8]) -> DataPieces<'a> {
        let insert = (body.first() == Some(&b'.')).then_some(&b"."[..]);
        DataPieces {
            body,
            pos: 0,
            insert,
            done: false,
        }
    }
}

impl<'a> Iterator for DataPieces<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        if let Some(ins) = self.insert.take() {
            return Some(ins);
        }
        if self.done {
            return None;
        }
        let body = self.body;
        let start = self.pos;
        let rest = &body[start..];
        let mut search = 0;
        while let Some(off) = memchr::memchr2(b'\r', b'\n', &rest[search..]) {
            let i = start + search + off;
            let dot_after = |j: usize| body.get(j) == Some(&b'.');
            if body[i] == b'\r' {
                if body.get(i + 1) == Some(&b'\n') {
                    // A proper CRLF: the line after it may need a stuffed dot.
                    if dot_after(i + 2) {
                        self.pos = i + 2;
                        self.insert = Some(b".");
                        return Some(&body[start..i + 2]);
                    }
                    search = i + 2 - start;
                    continue;
                }
                // Bare CR: complete it to CRLF.
                self.pos = i + 1;
                self.insert = Some(if dot_after(i + 1) { b"\n." } else { b"\n" });
                return Some(&body[start..i + 1]);
            }
            // Bare LF (a CRLF's LF was skipped above): put a CR before it.
            self.pos = i + 1;
            self.insert = Some(if dot_after(i + 1) { b"\r\n." } else { b"\r\n" });
            let piece = &body[start..i];
            if piece.is_empty() {
                return self.insert.take();
            }
            return Some(piece);
        }
        self.done = true;
        self.pos = body.len();
        let ends_in_newline = body.ends_with(b"\n") || body.ends_with(b"\r");
        self.insert = Some(if body.is_empty() || ends_in_newline {
            b".\r\n"
        } else {
            b"\r\n.\r\n"
        });
        if rest.is_empty() {
            return self.insert.take();
        }
        Some(rest)
    }
}

/// SASL client responses (RFC 4616 PLAIN, draft LOGIN, RFC 2195 CRAM-MD5), base64-encoded
/// for the wire.
pub mod sasl {
    use base64::engine::general_purpose::STANDARD as B64;
    use base64::Engine as _;
    use hmac::{Hmac, KeyInit, Mac};
    use md5::Md5;

    /// `AUTH PLAIN <base64(\0user\0pass)>`.
    pub fn plain(user: &str, pass: &str) -> String {
        let mut raw = Vec::with_capacity(user.len() + pass.len() + 2);
        raw.push(0);
        raw.extend_from_slice(user.as_bytes());
        raw.push(0);
        raw.extend_from_slice(pass.as_bytes());
        B64.encode(raw)
    }

    pub fn b64(s: &str) -> String {
        B64.encode(s)
    }

    /// The CRAM-MD5 response to a base64 challenge (the text of a 334 reply), or `None`
    /// if the challenge is not base64.
    pub fn cram_md5(user: &str, pass: &str, challenge_b64: &str) -> Option<String> {
        let challenge = B64.decode(challenge_b64.trim()).ok()?;
        let mut mac = <Hmac<Md5> as KeyInit>::new_from_slice(pass.as_bytes()).ok()?;
        mac.update(&challenge);
        let digest = mac.finalize().into_bytes();
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        Some(B64.encode(format!("{user} {hex}")))
    }
}

/// Whether a body has any octet ≥ 0x80 (used to log 8-bit bodies sent to 7-bit servers).
pub fn has_8bit(body: &[u8]) -> bool {
    body.iter().any(|&b| b >= 0x80)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::STANDARD as B64;
    use base64::Engine as _;

    fn stuff(body: &[u8]) -> Vec<u8> {
        DataPieces::new(body).flatten().copied().collect()
    }

    #[test]
    fn dot_stuffing() {
        assert_eq!(stuff(b""), b".\r\n");
        assert_eq!(stuff(b"a\r\n"), b"a\r\n.\r\n");
        assert_eq!(stuff(b"a"), b"a\r\n.\r\n");
        assert_eq!(
            stuff(b".a\r\n.\r\n..\r\nb.\r\n"),
            b"..a\r\n..\r\n...\r\nb.\r\n.\r\n"
        );
        assert_eq!(stuff(b"a\nb\r\n"), b"a\r\nb\r\n.\r\n");
        assert_eq!(stuff(b"a\n.\n"), b"a\r\n..\r\n.\r\n");
        assert_eq!(stuff(b"\n\n"), b"\r\n\r\n.\r\n");
        assert_eq!(stuff(b"a\rb\r.\r"), b"a\r\nb\r\n..\r\n.\r\n");
        assert_eq!(stuff(b"."), b"..\r\n.\r\n");
        // Only the inserted bytes are not slices of the body.
        let body = b"x\r\n.y\r\nz";
        let pieces: Vec<&[u8]> = DataPieces::new(body).collect();
        assert_eq!(pieces, [&b"x\r\n"[..], b".", b".y\r\nz", b"\r\n.\r\n"]);
    }

    #[test]
    fn ehlo_keywords() {
        let r = Reply {
            code: 250,
            enhanced: None,
            text: "mx\nPIPELINING\nSIZE 1000\nauth=LOGIN\nAUTH PLAIN cram-md5\nDSN\n8bitmime"
                .into(),
        };
        let e = Extensions::from_ehlo(&r);
        assert!(e.pipelining && e.dsn && e.eightbitmime && !e.chunking);
        assert_eq!(e.size, Some(1000));
        assert_eq!(e.auth, ["LOGIN", "PLAIN", "CRAM-MD5"]);
    }

    #[test]
    fn xtext_and_cram() {
        let mut s = String::new();
        xtext("a+b=c d\u{e9}", &mut s);
        assert_eq!(s, "a+2Bb+3Dc+20d+C3+A9");
        // RFC 2195 §2 example.
        let r = sasl::cram_md5(
            "tim",
            "tanstaaftanstaaf",
            &B64.encode("<1896.697170952@postoffice.reston.mci.net>"),
        )
        .unwrap();
        assert_eq!(
            B64.decode(r).unwrap(),
            b"tim b913a602c7eda7a495b4e6e7334d3890"
        );
    }
}
