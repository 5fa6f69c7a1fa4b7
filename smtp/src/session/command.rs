//! Command-line parsing: one SMTP command line (without its CRLF) into a borrowed `Command`.
//!
//! Zero-copy: every field borrows from the receive buffer; nothing here allocates except the
//! validated address strings that a transaction keeps. The parser knows RFC 5321 §4.1 syntax
//! and the parameters of the extensions tern advertises (SIZE, BODY, SMTPUTF8, DSN, DELIVERBY,
//! AUTH). It must never decide policy (relay, limits, state): the session does that.

/// One parsed command. Lifetimes tie every field to the line it came from.
#[derive(Debug, PartialEq, Eq)]
pub enum Command<'a> {
    Helo(&'a str),
    Ehlo(&'a str),
    Mail(MailFrom<'a>),
    Rcpt(RcptTo<'a>),
    Data,
    Bdat {
        size: u64,
        last: bool,
    },
    Rset,
    Noop,
    Quit,
    Vrfy,
    Expn,
    Help,
    StartTls,
    Auth {
        mechanism: &'a str,
        initial: Option<&'a str>,
    },
    Etrn(&'a str),
}

/// Why a line is not a valid command; each maps to exactly one reply.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum ParseError {
    /// 500 5.5.1: verb not recognised.
    UnknownVerb,
    /// 501 5.5.2: the arguments do not follow the command's syntax.
    Syntax(&'static str),
    /// 501 5.5.4: a parameter value is invalid (e.g. SIZE=abc).
    BadParam(&'static str),
    /// 555 5.5.4: a MAIL/RCPT parameter tern does not implement (RFC 5321 §4.1.1.11).
    UnknownParam,
    /// 501 5.1.7 (MAIL) / 501 5.1.3 (RCPT): the path is not a valid address.
    BadAddress(&'static str),
    /// 553 5.6.7: a non-ASCII address without SMTPUTF8 (RFC 6531 §3.6.1... handled by the session).
    NonAscii,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct MailFrom<'a> {
    /// The reverse-path without angle brackets; "" for the null path `<>`.
    pub path: &'a str,
    pub size: Option<u64>,
    pub body: Option<Body>,
    pub smtputf8: bool,
    pub ret: Option<Ret>,
    /// ENVID, still xtext-encoded (validated).
    pub envid: Option<&'a str>,
    pub by: Option<By>,
    /// RFC 4954 §5 AUTH=, xtext-encoded, "<>" allowed.
    pub auth: Option<&'a str>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    SevenBit,
    EightBitMime,
    BinaryMime,
}

pub use crate::envelope::Ret;

/// RFC 2852 BY=<seconds>;<R|N>[T]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct By {
    pub seconds: i64,
    pub return_mode: bool,
    pub trace: bool,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct RcptTo<'a> {
    pub path: &'a str,
    /// Bit flags, see `crate::envelope` NOTIFY_*; 0 = not given.
    pub notify: u8,
    /// ORCPT value as given: addr-type ";" xtext (validated).
    pub orcpt: Option<&'a str>,
}

pub const NOTIFY_NEVER: u8 = 1;
pub const NOTIFY_SUCCESS: u8 = 2;
pub const NOTIFY_FAILURE: u8 = 4;
pub const NOTIFY_DELAY: u8 = 8;

/// Maximum lengths from RFC 5321 §4.5.3.1.
const MAX_LOCAL: usize = 64;
const MAX_DOMAIN: usize = 255;
const MAX_PATH: usize = 256;

/// Parses one command line. `line` excludes the CRLF and has already been checked for bare
/// CR/LF and NUL by the session.
pub fn parse(line: &[u8]) -> Result<Command<'_>, ParseError> {
    // Commands are ASCII except for SMTPUTF8 addresses and EHLO arguments; require UTF-8 so
    // every later step can work on &str.
    let line = std::str::from_utf8(line).map_err(|_| ParseError::Syntax("invalid UTF-8"))?;
    let (verb, rest) = match line.find(' ') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, ""),
    };
    let upper = |s: &str| -> [u8; 8] {
        let mut v = [0u8; 8];
        for (d, c) in v.iter_mut().zip(s.bytes()) {
            *d = c.to_ascii_uppercase();
        }
        v
    };
    if verb.len() > 8 {
        return Err(ParseError::UnknownVerb);
    }
    let v = upper(verb);
    let v = &v[..verb.len()];
    let no_args = |cmd: Command<'static>| -> Result<Command<'static>, ParseError> {
        if rest.trim().is_empty() {
            Ok(cmd)
        } else {
            Err(ParseError::Syntax("no parameters allowed"))
        }
    };
    match v {
        b"HELO" => Ok(Command::Helo(domain_arg(rest)?)),
        b"EHLO" => Ok(Command::Ehlo(domain_arg(rest)?)),
        b"MAIL" => parse_mail(rest).map(Command::Mail),
        b"RCPT" => parse_rcpt(rest).map(Command::Rcpt),
        b"DATA" => no_args(Command::Data),
        b"BDAT" => parse_bdat(rest),
        b"RSET" => no_args(Command::Rset),
        // RFC 5321 §4.1.1.9: NOOP may carry a string, which is ignored.
        b"NOOP" => Ok(Command::Noop),
        b"QUIT" => no_args(Command::Quit),
        b"VRFY" => {
            if rest.trim().is_empty() {
                Err(ParseError::Syntax("VRFY needs an argument"))
            } else {
                Ok(Command::Vrfy)
            }
        }
        b"EXPN" => Ok(Command::Expn),
        b"HELP" => Ok(Command::Help),
        b"STARTTLS" => no_args(Command::StartTls),
        b"AUTH" => {
            let mut it = rest.split(' ').filter(|s| !s.is_empty());
            let mechanism = it
                .next()
                .ok_or(ParseError::Syntax("AUTH needs a mechanism"))?;
            let initial = it.next();
            if it.next().is_some() {
                return Err(ParseError::Syntax("too many AUTH arguments"));
            }
            Ok(Command::Auth { mechanism, initial })
        }
        b"ETRN" => {
            let arg = rest.trim();
            if arg.is_empty() {
                Err(ParseError::Syntax("ETRN needs a node name"))
            } else {
                Ok(Command::Etrn(arg))
            }
        }
        _ => Err(ParseError::UnknownVerb),
    }
}

/// The HELO/EHLO argument: a domain or address literal. RFC 5321 requires one; we accept any
/// printable token (clients send all sorts) but not an empty one or one with spaces inside.
fn domain_arg(rest: &str) -> Result<&str, ParseError> {
    let arg = rest.trim();
    if arg.is_empty() {
        return Err(ParseError::Syntax("a domain name is required"));
    }
    if arg.len() > MAX_DOMAIN || arg.contains(' ') || arg.bytes().any(|b| b < 0x21 || b == 0x7f) {
        return Err(ParseError::Syntax("invalid domain name"));
    }
    Ok(arg)
}

/// Splits `FROM:<path> params` / `TO:<path> params` after the keyword. Accepts one space
/// after the colon (many clients send it, Postfix and sendmail accept it).
fn split_path<'a>(rest: &'a str, keyword: &str) -> Result<(&'a str, &'a str), ParseError> {
    let k = keyword.len();
    // Compare bytes: `rest` may hold multi-byte UTF-8, and k need not be a char boundary.
    if rest.len() < k || !rest.as_bytes()[..k].eq_ignore_ascii_case(keyword.as_bytes()) {
        return Err(ParseError::Syntax(if keyword == "FROM:" {
            "expected MAIL FROM:<address>"
        } else {
            "expected RCPT TO:<address>"
        }));
    }
    let after = rest[k..].strip_prefix(' ').unwrap_or(&rest[k..]);
    if !after.starts_with('<') {
        return Err(ParseError::Syntax("address must be in angle brackets"));
    }
    // Find the closing '>' outside a quoted local part.
    let bytes = after.as_bytes();
    let mut i = 1;
    let mut quoted = false;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if quoted => i += 1,
            b'"' => quoted = !quoted,
            b'>' if !quoted => break,
            _ => {}
        }
        i += 1;
    }
    if i >= bytes.len() {
        return Err(ParseError::Syntax("missing closing angle bracket"));
    }
    let path = &after[1..i];
    let params = &after[i + 1..];
    if !params.is_empty() && !params.starts_with(' ') {
        return Err(ParseError::Syntax("garbage after address"));
    }
    Ok((path, params.trim_start()))
}

fn parse_mail(rest: &str) -> Result<MailFrom<'_>, ParseError> {
    let (path, params) = split_path(rest, "FROM:")?;
    let path = if path.is_empty() {
        path
    } else {
        validate_path(path, false).map_err(ParseError::BadAddress)?
    };
    let mut m = MailFrom {
        path,
        ..Default::default()
    };
    for p in params.split(' ').filter(|s| !s.is_empty()) {
        let (k, val) = match p.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (p, None),
        };
        let key = k.to_ascii_uppercase();
        match (key.as_str(), val) {
            ("SIZE", Some(v)) if m.size.is_none() => {
                m.size = Some(parse_u64(v).ok_or(ParseError::BadParam("invalid SIZE value"))?)
            }
            ("BODY", Some(v)) if m.body.is_none() => {
                m.body = Some(match v.to_ascii_uppercase().as_str() {
                    "7BIT" => Body::SevenBit,
                    "8BITMIME" => Body::EightBitMime,
                    "BINARYMIME" => Body::BinaryMime,
                    _ => return Err(ParseError::BadParam("invalid BODY value")),
                })
            }
            ("SMTPUTF8", None) if !m.smtputf8 => m.smtputf8 = true,
            ("RET", Some(v)) if m.ret.is_none() => {
                m.ret = Some(match v.to_ascii_uppercase().as_str() {
                    "FULL" => Ret::Full,
                    "HDRS" => Ret::Hdrs,
                    _ => return Err(ParseError::BadParam("invalid RET value")),
                })
            }
            ("ENVID", Some(v)) if m.envid.is_none() => {
                // RFC 3461 §4.4: at most 100 characters, xtext.
                if v.is_empty() || v.len() > 100 || !valid_xtext_printable(v) {
                    return Err(ParseError::BadParam("invalid ENVID value"));
                }
                m.envid = Some(v)
            }
            ("BY", Some(v)) if m.by.is_none() => m.by = Some(parse_by(v)?),
            ("AUTH", Some(v)) if m.auth.is_none() => {
                if v != "<>" && (v.is_empty() || v.len() > 500 || !valid_xtext_printable(v)) {
                    return Err(ParseError::BadParam("invalid AUTH value"));
                }
                m.auth = Some(v)
            }
            ("SIZE" | "BODY" | "SMTPUTF8" | "RET" | "ENVID" | "BY" | "AUTH", _) => {
                return Err(ParseError::BadParam("duplicate or malformed parameter"))
            }
            _ => return Err(ParseError::UnknownParam),
        }
    }
    if !m.smtputf8 && !m.path.is_ascii() {
        return Err(ParseError::NonAscii);
    }
    Ok(m)
}

fn parse_rcpt(rest: &str) -> Result<RcptTo<'_>, ParseError> {
    let (path, params) = split_path(rest, "TO:")?;
    if path.is_empty() {
        return Err(ParseError::BadAddress("empty recipient"));
    }
    // RFC 5321 §4.1.1.3: <Postmaster> without a domain must be accepted.
    let path = if path.eq_ignore_ascii_case("postmaster") {
        path
    } else {
        validate_path(path, true).map_err(ParseError::BadAddress)?
    };
    let mut r = RcptTo {
        path,
        ..Default::default()
    };
    let mut seen_notify = false;
    for p in params.split(' ').filter(|s| !s.is_empty()) {
        let (k, val) = match p.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (p, None),
        };
        match (k.to_ascii_uppercase().as_str(), val) {
            ("NOTIFY", Some(v)) if !seen_notify => {
                seen_notify = true;
                r.notify = parse_notify(v)?;
            }
            ("ORCPT", Some(v)) if r.orcpt.is_none() => {
                // RFC 3461 §4.2: addr-type ";" xtext, at most 500 characters.
                let (ty, addr) = v
                    .split_once(';')
                    .ok_or(ParseError::BadParam("invalid ORCPT value"))?;
                if ty.is_empty()
                    || !ty.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    || addr.is_empty()
                    || v.len() > 500
                    || !(valid_xtext_printable(addr) || ty.eq_ignore_ascii_case("utf-8"))
                {
                    return Err(ParseError::BadParam("invalid ORCPT value"));
                }
                r.orcpt = Some(v);
            }
            ("NOTIFY" | "ORCPT", _) => {
                return Err(ParseError::BadParam("duplicate or malformed parameter"))
            }
            _ => return Err(ParseError::UnknownParam),
        }
    }
    Ok(r)
}

fn parse_notify(v: &str) -> Result<u8, ParseError> {
    let mut flags = 0u8;
    for word in v.split(',') {
        flags |= match word.to_ascii_uppercase().as_str() {
            "NEVER" => NOTIFY_NEVER,
            "SUCCESS" => NOTIFY_SUCCESS,
            "FAILURE" => NOTIFY_FAILURE,
            "DELAY" => NOTIFY_DELAY,
            _ => return Err(ParseError::BadParam("invalid NOTIFY value")),
        };
    }
    // RFC 3461 §4.1: NEVER must not be combined with anything else.
    if flags & NOTIFY_NEVER != 0 && flags != NOTIFY_NEVER {
        return Err(ParseError::BadParam("NOTIFY=NEVER cannot be combined"));
    }
    Ok(flags)
}

fn parse_by(v: &str) -> Result<By, ParseError> {
    let bad = ParseError::BadParam("invalid BY value");
    let (num, mode) = v.split_once(';').ok_or(bad)?;
    // RFC 2852 §4: by-time is a signed decimal of at most 9 digits.
    let digits = num.strip_prefix(['-', '+']).unwrap_or(num);
    if digits.is_empty() || digits.len() > 9 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad);
    }
    let seconds: i64 = num.parse().map_err(|_| bad)?;
    let mode = mode.to_ascii_uppercase();
    let (return_mode, trace) = match mode.as_str() {
        "R" => (true, false),
        "RT" => (true, true),
        "N" => (false, false),
        "NT" => (false, true),
        _ => return Err(bad),
    };
    // RFC 2852 §4.1: with R, a by-time of zero or less is an error.
    if return_mode && seconds <= 0 {
        return Err(ParseError::BadParam("BY with R requires a positive time"));
    }
    Ok(By {
        seconds,
        return_mode,
        trace,
    })
}

fn parse_bdat(rest: &str) -> Result<Command<'_>, ParseError> {
    let mut it = rest.split(' ').filter(|s| !s.is_empty());
    let size = it
        .next()
        .and_then(parse_u64)
        .ok_or(ParseError::Syntax("BDAT needs a chunk size"))?;
    let last = match it.next() {
        None => false,
        Some(w) if w.eq_ignore_ascii_case("LAST") => true,
        Some(_) => return Err(ParseError::Syntax("expected LAST")),
    };
    if it.next().is_some() {
        return Err(ParseError::Syntax("too many BDAT arguments"));
    }
    Ok(Command::Bdat { size, last })
}

fn parse_u64(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 19 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// RFC 3461 §4: xtext = *( xchar other than "+" and "=" / "+" 2HEXCHAR ).
pub fn valid_xtext(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => {
                let h = |c: u8| c.is_ascii_digit() || (b'A'..=b'F').contains(&c);
                if i + 2 >= b.len() || !h(b[i + 1]) || !h(b[i + 2]) {
                    return false;
                }
                i += 3;
            }
            b'=' => return false,
            0x21..=0x7e => i += 1,
            _ => return false,
        }
    }
    true
}

/// Valid xtext that also decodes to no control character. ENVID, AUTH= and ORCPT are
/// stored decoded (or decoded later) and end up in DSN headers, `tern queue show` and
/// logs: "+0D+0A" must not smuggle a line break (or a NUL) into any of them, and no
/// envelope id or mailbox legitimately contains one.
pub fn valid_xtext_printable(s: &str) -> bool {
    valid_xtext(s) && decode_xtext(s).chars().all(|c| !c.is_control())
}

/// Decodes validated xtext (for storing ENVID/ORCPT in readable form).
pub fn decode_xtext(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'+' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("3F");
            out.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Validates an RFC 5321 §4.1.2 Path (without the angle brackets) and returns the mailbox:
/// an obsolete source route ("@a,@b:") is accepted and dropped, as §4.1.1.3 requires.
pub fn validate_path(path: &str, _rcpt: bool) -> Result<&str, &'static str> {
    if path.len() > MAX_PATH {
        return Err("address too long");
    }
    let mailbox = if path.starts_with('@') {
        match path.find(':') {
            Some(i) => {
                let route = &path[..i];
                for hop in route.split(',') {
                    let hop = hop.strip_prefix('@').ok_or("invalid source route")?;
                    valid_domain(hop)?;
                }
                &path[i + 1..]
            }
            None => return Err("invalid source route"),
        }
    } else {
        path
    };
    let at = local_part_end(mailbox).ok_or("missing @domain")?;
    let local = &mailbox[..at];
    let domain = &mailbox[at + 1..];
    if local.is_empty() || local.len() > MAX_LOCAL {
        return Err("invalid local part length");
    }
    valid_local(local)?;
    if domain.starts_with('[') {
        valid_address_literal(domain)?;
    } else {
        valid_domain(domain)?;
    }
    Ok(mailbox)
}

/// Finds the '@' separating local part and domain, skipping a quoted local part.
fn local_part_end(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    if b.first() == Some(&b'"') {
        let mut i = 1;
        while i < b.len() {
            match b[i] {
                b'\\' => i += 2,
                b'"' => return (b.get(i + 1) == Some(&b'@')).then_some(i + 1),
                _ => i += 1,
            }
        }
        None
    } else {
        s.rfind('@')
    }
}

fn valid_local(local: &str) -> Result<(), &'static str> {
    let b = local.as_bytes();
    if b[0] == b'"' {
        // Quoted-string: qtextSMTP or quoted-pairSMTP, between the quotes.
        let inner = &b[1..b.len() - 1];
        let mut i = 0;
        while i < inner.len() {
            match inner[i] {
                b'\\' => {
                    let c = *inner.get(i + 1).ok_or("bad quoted local part")?;
                    if !(0x20..=0x7e).contains(&c) {
                        return Err("bad quoted local part");
                    }
                    i += 2;
                }
                b'"' => return Err("bad quoted local part"),
                c if c == 0x20 || c == 0x21 || (0x23..=0x7e).contains(&c) || c >= 0x80 => i += 1,
                _ => return Err("bad quoted local part"),
            }
        }
        return Ok(());
    }
    // Dot-string: atoms separated by single dots.
    for atom in local.split('.') {
        if atom.is_empty() {
            return Err("invalid dot in local part");
        }
        if !atom.bytes().all(|c| c >= 0x80 || is_atext(c)) {
            return Err("invalid character in local part");
        }
    }
    Ok(())
}

fn is_atext(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&c)
}

fn valid_domain(d: &str) -> Result<(), &'static str> {
    if d.is_empty() || d.len() > MAX_DOMAIN {
        return Err("invalid domain length");
    }
    for label in d.split('.') {
        let lb = label.as_bytes();
        if lb.is_empty() || lb.len() > 63 {
            return Err("invalid domain label");
        }
        if lb[0] == b'-' || lb[lb.len() - 1] == b'-' {
            return Err("invalid domain label");
        }
        // U-labels (SMTPUTF8) are allowed through; the ASCII check happens in parse_mail/rcpt.
        if !lb
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || c == b'-' || c >= 0x80)
        {
            return Err("invalid character in domain");
        }
    }
    Ok(())
}

fn valid_address_literal(d: &str) -> Result<(), &'static str> {
    let inner = d
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .ok_or("invalid address literal")?;
    if let Some(v6) = inner
        .strip_prefix("IPv6:")
        .or_else(|| inner.strip_prefix("ipv6:"))
    {
        v6.parse::<std::net::Ipv6Addr>()
            .map(|_| ())
            .map_err(|_| "invalid IPv6 literal")
    } else {
        inner
            .parse::<std::net::Ipv4Addr>()
            .map(|_| ())
            .map_err(|_| "invalid IPv4 literal")
    }
}

/// The domain part of a validated mailbox, lower-cased for policy lookups.
pub fn domain_of(mailbox: &str) -> Option<&str> {
    local_part_end(mailbox).map(|i| &mailbox[i + 1..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbs() {
        assert_eq!(
            parse(b"EHLO client.example"),
            Ok(Command::Ehlo("client.example"))
        );
        assert_eq!(parse(b"quit"), Ok(Command::Quit));
        assert_eq!(parse(b"NOOP hello"), Ok(Command::Noop));
        assert_eq!(parse(b"FOO"), Err(ParseError::UnknownVerb));
        assert_eq!(
            parse(b"EHLO"),
            Err(ParseError::Syntax("a domain name is required"))
        );
        assert!(matches!(parse(b"DATA x"), Err(ParseError::Syntax(_))));
        assert_eq!(
            parse(b"BDAT 100 LAST"),
            Ok(Command::Bdat {
                size: 100,
                last: true
            })
        );
        assert!(parse(b"BDAT x").is_err());
    }

    #[test]
    fn mail_params() {
        let c = parse(b"MAIL FROM:<a@b.example> SIZE=1000 BODY=8BITMIME RET=HDRS ENVID=QQ+2B1 BY=120;RT AUTH=<>").unwrap();
        match c {
            Command::Mail(m) => {
                assert_eq!(m.path, "a@b.example");
                assert_eq!(m.size, Some(1000));
                assert_eq!(m.body, Some(Body::EightBitMime));
                assert_eq!(m.ret, Some(Ret::Hdrs));
                assert_eq!(m.envid, Some("QQ+2B1"));
                assert_eq!(
                    m.by,
                    Some(By {
                        seconds: 120,
                        return_mode: true,
                        trace: true
                    })
                );
                assert_eq!(m.auth, Some("<>"));
            }
            _ => panic!(),
        }
        assert!(matches!(
            parse(b"MAIL FROM:<>"),
            Ok(Command::Mail(MailFrom { path: "", .. }))
        ));
        assert!(matches!(parse(b"MAIL FROM: <a@b>"), Ok(Command::Mail(_))));
        assert_eq!(
            parse(b"MAIL FROM:<a@b> FOO=1"),
            Err(ParseError::UnknownParam)
        );
        assert!(matches!(
            parse(b"MAIL FROM:<a@b> SIZE=x"),
            Err(ParseError::BadParam(_))
        ));
        assert!(matches!(
            parse(b"MAIL FROM:<a@b> BY=0;R"),
            Err(ParseError::BadParam(_))
        ));
        assert!(parse(b"MAIL FROM:<a@b> BY=-10;N").is_ok());
        assert!(matches!(
            parse(b"MAIL FROM:a@b"),
            Err(ParseError::Syntax(_))
        ));
        assert_eq!(
            parse("MAIL FROM:<jö@b>".as_bytes()),
            Err(ParseError::NonAscii)
        );
        assert!(parse("MAIL FROM:<jö@b> SMTPUTF8".as_bytes()).is_ok());
    }

    #[test]
    fn rcpt_params() {
        match parse(b"RCPT TO:<x@y.example> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;x+40y").unwrap() {
            Command::Rcpt(r) => {
                assert_eq!(r.notify, NOTIFY_SUCCESS | NOTIFY_FAILURE);
                assert_eq!(r.orcpt, Some("rfc822;x+40y"));
            }
            _ => panic!(),
        }
        assert!(matches!(
            parse(b"RCPT TO:<Postmaster>"),
            Ok(Command::Rcpt(_))
        ));
        assert!(matches!(
            parse(b"RCPT TO:<@relay.example:x@y.example>"),
            Ok(Command::Rcpt(RcptTo {
                path: "x@y.example",
                ..
            }))
        ));
        assert!(matches!(
            parse(b"RCPT TO:<x@y> NOTIFY=NEVER,DELAY"),
            Err(ParseError::BadParam(_))
        ));
        assert!(matches!(
            parse(b"RCPT TO:<>"),
            Err(ParseError::BadAddress(_))
        ));
        assert!(matches!(
            parse(b"RCPT TO:<a..b@c>"),
            Err(ParseError::BadAddress(_))
        ));
        assert!(parse(b"RCPT TO:<\"a b\"@c>").is_ok());
        assert!(parse(b"RCPT TO:<a@[127.0.0.1]>").is_ok());
        assert!(parse(b"RCPT TO:<a@[IPv6:::1]>").is_ok());
        assert!(parse(b"RCPT TO:<a@[300.0.0.1]>").is_err());
        let long = format!("RCPT TO:<{}@b>", "a".repeat(65));
        assert!(matches!(
            parse(long.as_bytes()),
            Err(ParseError::BadAddress(_))
        ));
    }

    #[test]
    fn xtext() {
        assert!(valid_xtext("abc+2B"));
        assert!(!valid_xtext("abc+2"));
        assert!(!valid_xtext("abc+"));
        assert!(!valid_xtext("a=b"));
        assert_eq!(decode_xtext("a+2Bb"), "a+b");
        assert!(valid_xtext_printable("a+2Bb+7E"));
        for bad in ["x+0D+0Ay", "x+0A", "x+0D", "x+00", "x+7F", "x+09", "a=b"] {
            assert!(!valid_xtext_printable(bad), "{bad}");
        }
        for line in [
            "MAIL FROM:<a@b.example> ENVID=x+0D+0AX-Injected:+201",
            "MAIL FROM:<a@b.example> AUTH=x+0Ay",
            "MAIL FROM:<a@b.example> AUTH=x+00",
        ] {
            assert_eq!(
                parse(line.as_bytes()),
                Err(ParseError::BadParam(if line.contains("ENVID") {
                    "invalid ENVID value"
                } else {
                    "invalid AUTH value"
                })),
                "{line}"
            );
        }
        assert_eq!(
            parse(b"RCPT TO:<a@b.example> ORCPT=rfc822;a+0D+0A@b.example"),
            Err(ParseError::BadParam("invalid ORCPT value"))
        );
    }

    /// Arbitrary lines (ASCII, UTF-8 and the characters the grammar cares about) never
    /// panic the parser: a cheap stand-in for the fuzz target until it exists.
    #[test]
    fn random_lines_never_panic() {
        let alphabet: Vec<&str> = vec![
            "MAIL", "RCPT", "FROM:", "TO:", "<", ">", "@", ".", "\"", "\\", " ", "=", "+", ",",
            ";", "[", "]", ":", "é", "€", "BDAT", "EHLO", "SIZE", "BY", "NOTIFY", "ORCPT", "ENVID",
            "AUTH", "-", "0", "9", "a", "IPv6", "LAST", "\u{7f}", "\u{1}",
        ];
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..200_000 {
            let n = (next() % 12) as usize;
            let mut line = String::new();
            for _ in 0..n {
                line.push_str(alphabet[(next() % alphabet.len() as u64) as usize]);
            }
            let _ = parse(line.as_bytes());
        }
    }
}
