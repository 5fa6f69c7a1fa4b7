//! The outbound SMTP transaction, sans-I/O: what to send and what the answers mean.
//!
//! Owns: reading the EHLO keywords into [`Extensions`]; deciding, before a byte is sent,
//! whether a message can go to this server at all (SIZE, BINARYMIME, SMTPUTF8); building
//! MAIL FROM and RCPT TO with their RFC 1870/2852/3461/6152/6531/3030 parameters; the DATA
//! byte stream (dot-stuffing and line-ending repair as slices of the body, RFC 5321
//! §4.5.2 and §2.3.8); SASL client responses.
//! Must never: do I/O, or put a byte from an envelope on the wire that could end a command
//! line early (CR, LF and other controls are refused here, not escaped).

use super::reply::Reply;
use crate::envelope::{
    BodyType, DeliverByMode, Envelope, Recipient, Ret, NOTIFY_DELAY, NOTIFY_FAILURE, NOTIFY_NEVER,
    NOTIFY_SUCCESS,
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
    /// RFC 2852 DELIVERBY with its min-by-time in seconds (`Some(0)`: none given).
    pub deliverby: Option<u64>,
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
                "DELIVERBY" => {
                    let min = first_param.or_else(|| words.next());
                    ext.deliverby = Some(min.and_then(|n| n.parse().ok()).unwrap_or(0))
                }
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
    /// ... in the same write as MAIL and RCPT (one round trip), rather than after their
    /// replies.
    pub bdat_with_commands: bool,
}

/// The largest body sent pipelined behind MAIL and RCPT. Up to this it fits the socket
/// buffers, so the write completes whether or not the server has read its commands yet;
/// a larger one would wait for the server's RCPT checks under a body timeout, and make
/// a server that refuses early read (and discard) a large chunk for nothing.
pub const PIPELINED_CHUNK_MAX: usize = 64 * 1024;

/// Whether `body` has a CR or LF that is not part of a CRLF pair. DATA repairs those
/// (`DataPieces`); BDAT sends the body as stored, so such a body goes by DATA (RFC 5321
/// §2.3.8: no bare CR or LF on the wire; they are what SMTP smuggling is made of).
pub fn has_bare_line_ending(body: &[u8]) -> bool {
    let mut ends = memchr::memchr2_iter(b'\r', b'\n', body);
    while let Some(i) = ends.next() {
        // An LF here was not the second half of a CRLF; a CR must have its LF next.
        if body[i] == b'\n' || body.get(i + 1) != Some(&b'\n') {
            return true;
        }
        ends.next(); // that LF
    }
    false
}

/// Decides whether and how `env` can be sent to a server with `ext` at `now_unix_micros`.
/// `Err(reply)` is a locally made permanent failure for every recipient (nothing is sent).
///
/// RFC 2852 DELIVERBY: to a server that offers it, `BY=` goes on with the by-time less
/// the whole seconds (rounded up) since arrival (§4: the time spent here counts). A
/// message in R (return) mode is not relayed to a server without DELIVERBY, nor with
/// less time left than the server's min-by-time, nor once its time is up: `554 5.4.7`
/// (§4.1.4.2; sendmail does the same). N (notify) mode goes on without BY=, and each
/// recipient's NOTIFY gets DELAY (see [`rcpt_command`]) so the next hop still reports a
/// late delivery; the runner sends a "relayed" DSN when the server lacks DSN as well.
///
/// With `chunking` (`ClientOptions::chunking`) and a server offering CHUNKING and
/// PIPELINING, a body of at most [`PIPELINED_CHUNK_MAX`] without bare CR or LF goes with
/// `BDAT n LAST` pipelined behind MAIL and RCPT (one round trip); a BINARYMIME body always
/// goes by BDAT (RFC 3030 §3 allows nothing else), pipelined under the same conditions.
///
/// Policy on an 8-bit body to a server without 8BITMIME: send it anyway, without BODY=
/// (what Postfix does with MIME conversion off, and what every such server we know of
/// accepts). RFC 6152 §3 asks for conversion to 7 bit or a 5.6.3 bounce; we do neither.
/// XXX: no 7-bit downgrade (quoted-printable) is implemented.
pub fn plan(
    env: &Envelope,
    rcpts: &[usize],
    body: &[u8],
    ext: &Extensions,
    chunking: bool,
    now_unix_micros: u64,
) -> Result<Plan, Reply> {
    let body_len = body.len();
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
    let binary = env.body_type == BodyType::BinaryMime;
    if binary && !(ext.chunking && ext.binarymime) {
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
    let mut by_notify_without_deliverby = false;
    if let Some(by) = env.deliver_by {
        let spent = now_unix_micros
            .saturating_sub(env.arrival_unix_micros)
            .div_ceil(1_000_000);
        let left = by
            .seconds
            .saturating_sub(i64::try_from(spent).unwrap_or(i64::MAX));
        let trace = if by.trace { "T" } else { "" };
        match (ext.deliverby, by.mode) {
            (Some(_), DeliverByMode::Return) if left <= 0 => {
                return Err(Reply::local(
                    554,
                    (5, 4, 7),
                    "delivery time (DELIVERBY) expired",
                ));
            }
            (Some(min), DeliverByMode::Return) if left.unsigned_abs() < min => {
                return Err(Reply::local(
                    554,
                    (5, 4, 7),
                    format!(
                        "{left} s of the DELIVERBY time left; the remote server needs at least {min} s"
                    ),
                ));
            }
            (Some(_), mode) => {
                // RFC 2852 §4: at most nine digits, either sign.
                let left = left.clamp(-999_999_999, 999_999_999);
                let m = if mode == DeliverByMode::Return {
                    'R'
                } else {
                    'N'
                };
                mail.push_str(&format!(" BY={left};{m}{trace}"));
            }
            (None, DeliverByMode::Return) => {
                return Err(Reply::local(
                    554,
                    (5, 4, 7),
                    "the remote server does not support DELIVERBY, required by BY=...;R (RFC 2852 §4.1.4.2)",
                ));
            }
            (None, DeliverByMode::Notify) => by_notify_without_deliverby = true,
        }
    }
    mail.push_str("\r\n");
    // BDAT pipelined with the commands wherever it saves the DATA round trip and the body
    // can go exactly as stored; BINARYMIME has no other way than BDAT (after the RCPT
    // replies when it is not pipelined).
    let bdat_with_commands = chunking
        && ext.chunking
        && ext.pipelining
        && body_len <= PIPELINED_CHUNK_MAX
        // DATA ends an unterminated last line; BDAT would not.
        && (binary || (!has_bare_line_ending(body) && (body.is_empty() || body.ends_with(b"\r\n"))));
    let bdat = binary || bdat_with_commands;

    let mut plan = Plan {
        mail,
        rcpts: Vec::with_capacity(rcpts.len()),
        refused: Vec::new(),
        bdat,
        bdat_with_commands,
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
        plan.rcpts
            .push((i, rcpt_command(r, ext, by_notify_without_deliverby)));
    }
    Ok(plan)
}

/// `RCPT TO` with the DSN parameters when the server offers DSN. `add_delay`: the message
/// has a DELIVERBY in N mode that this server cannot take, so NOTIFY gets DELAY (and no
/// NOTIFY becomes FAILURE,DELAY, the default plus DELAY; NEVER stays NEVER), letting the
/// next hop report a late delivery the way BY=;N asked (RFC 2852 §4.1.4.2).
fn rcpt_command(r: &Recipient, ext: &Extensions, add_delay: bool) -> String {
    let mut cmd = format!("RCPT TO:<{}>", r.addr);
    if ext.dsn {
        let notify = match r.notify {
            n if !add_delay || n & NOTIFY_NEVER != 0 => n,
            0 => NOTIFY_FAILURE | NOTIFY_DELAY,
            n => n | NOTIFY_DELAY,
        };
        if notify & NOTIFY_NEVER != 0 {
            cmd.push_str(" NOTIFY=NEVER");
        } else if notify != 0 {
            let words: Vec<&str> = [
                (NOTIFY_SUCCESS, "SUCCESS"),
                (NOTIFY_FAILURE, "FAILURE"),
                (NOTIFY_DELAY, "DELAY"),
            ]
            .iter()
            .filter(|(bit, _)| notify & bit != 0)
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
    #[test]
    fn bare_line_endings_are_found_and_crlf_is_not() {
        use super::has_bare_line_ending as bare;
        assert!(!bare(b""));
        assert!(!bare(b"a\r\nb\r\n\r\n"));
        assert!(bare(b"a\nb"));
        assert!(bare(b"a\rb"));
        assert!(bare(b"a\r\n\n"));
        assert!(bare(b"a\r\r\n"));
        assert!(bare(b"end\r"));
        assert!(bare(b"\n"));
    }

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

    fn by_env(seconds: i64, mode: DeliverByMode, notify: u8) -> Envelope {
        Envelope {
            id: "Q".into(),
            sender: "s@x".into(),
            recipients: vec![Recipient {
                addr: "r@y".into(),
                notify,
                orcpt: None,
            }],
            arrival_unix_micros: 1_000_000_000,
            size: 10,
            body_type: BodyType::SevenBit,
            smtputf8: false,
            ret: None,
            envid: None,
            deliver_by: Some(crate::envelope::DeliverBy {
                seconds,
                mode,
                trace: false,
            }),
            auth: None,
            client_helo: "c".into(),
            client_addr: "192.0.2.1:1".into(),
        }
    }

    #[test]
    fn deliverby_parameters() {
        let ehlo = |t: &str| {
            Extensions::from_ehlo(&Reply {
                code: 250,
                enhanced: None,
                text: t.into(),
            })
        };
        assert_eq!(ehlo("mx\nDELIVERBY").deliverby, Some(0));
        assert_eq!(ehlo("mx\nDELIVERBY 120").deliverby, Some(120));
        assert_eq!(ehlo("mx\nDSN").deliverby, None);
        let with = ehlo("mx\nDELIVERBY 60\nDSN");
        let without = ehlo("mx\nDSN");
        // 10.2 s after arrival: 11 s count as spent (rounded up).
        let now = 1_000_000_000 + 10_200_000;
        let mail =
            |e: &Envelope, x: &Extensions| plan(e, &[0], &[b'x'; 10], x, true, now).map(|p| p.mail);
        let rcpt = |e: &Envelope, x: &Extensions| {
            plan(e, &[0], &[b'x'; 10], x, true, now).unwrap().rcpts[0]
                .1
                .clone()
        };

        let e = by_env(100, DeliverByMode::Return, 0);
        assert_eq!(mail(&e, &with).unwrap(), "MAIL FROM:<s@x> BY=89;R\r\n");
        // R mode: not below the hop's minimum, not expired, not to a hop without it.
        let e = by_env(70, DeliverByMode::Return, 0);
        let err = mail(&e, &with).unwrap_err();
        assert_eq!((err.code, err.enhanced), (554, Some((5, 4, 7))));
        let e = by_env(11, DeliverByMode::Return, 0);
        assert_eq!(mail(&e, &with).unwrap_err().enhanced, Some((5, 4, 7)));
        let e = by_env(100, DeliverByMode::Return, 0);
        let err = mail(&e, &without).unwrap_err();
        assert!(
            err.text.contains("does not support DELIVERBY"),
            "{}",
            err.text
        );

        // N mode: sent whatever is left, even late; without DELIVERBY, NOTIFY gains DELAY.
        let e = by_env(5, DeliverByMode::Notify, 0);
        assert_eq!(mail(&e, &with).unwrap(), "MAIL FROM:<s@x> BY=-6;N\r\n");
        assert_eq!(rcpt(&e, &with), "RCPT TO:<r@y>\r\n");
        assert_eq!(mail(&e, &without).unwrap(), "MAIL FROM:<s@x>\r\n");
        assert_eq!(rcpt(&e, &without), "RCPT TO:<r@y> NOTIFY=FAILURE,DELAY\r\n");
        let e = by_env(5, DeliverByMode::Notify, NOTIFY_SUCCESS);
        assert_eq!(rcpt(&e, &without), "RCPT TO:<r@y> NOTIFY=SUCCESS,DELAY\r\n");
        let e = by_env(5, DeliverByMode::Notify, NOTIFY_NEVER);
        assert_eq!(rcpt(&e, &without), "RCPT TO:<r@y> NOTIFY=NEVER\r\n");
        // A huge by-time stays within nine digits.
        let e = by_env(i64::MIN, DeliverByMode::Notify, 0);
        assert_eq!(
            mail(&e, &with).unwrap(),
            "MAIL FROM:<s@x> BY=-999999999;N\r\n"
        );
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
