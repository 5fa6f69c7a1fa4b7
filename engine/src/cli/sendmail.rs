//! `tern sendmail`: the sendmail(8) command-line interface that cron, PHP's mail() and
//! git send-email expect.
//!
//! NAME
//!   sendmail — read one message on stdin and queue it.
//!
//! SYNOPSIS
//!   tern sendmail [-t] [-i|-oi] [-f SENDER] [-F NAME] [--] [RECIPIENT...]
//!   (also when the binary is invoked as `sendmail`)
//!
//! DESCRIPTION
//!   Without -i, a line holding a single "." ends the message. -t adds the addresses of
//!   the To:, Cc: and Bcc: headers to the recipients and removes Bcc:. The sender is -f,
//!   else the invoking user @ `hostname`. From:, Date: and Message-ID: are added when
//!   missing. The message then goes through a real `Session` (EHLO, MAIL, RCPT, DATA)
//!   in-process, so size limits, address syntax and the Received: header are exactly
//!   those of SMTP, and is made durable like `tern stdio` does (`stdio::make_durable`).
//!   Other -o and -b options are accepted and ignored, as most sendmail clones do.
//!
//! SECURITY
//!   A local user submitting mail is trusted to relay (loopback is added to the trusted
//!   networks of this session only), as with Postfix's sendmail. Policy, not an RFC.
//!
//! DIAGNOSTICS
//!   Exit codes from sysexits.h: 0 queued, 64 usage, 65 data error (no recipients, or the
//!   message refused), 67 a recipient refused, 74 I/O error, 75 temporary failure (try
//!   again), 78 configuration error.

use std::io::Read;
use std::process::ExitCode;
use std::rc::Rc;

use bytes::BytesMut;

use tern_engine::config::Config;
use tern_smtp::session::{Event, Session};

const EX_USAGE: u8 = 64;
const EX_DATAERR: u8 = 65;
const EX_NOUSER: u8 = 67;
const EX_SOFTWARE: u8 = 70;
const EX_IOERR: u8 = 74;
const EX_TEMPFAIL: u8 = 75;

/// What the command line asked for.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Options {
    pub headers_recipients: bool,
    pub ignore_dots: bool,
    pub sender: Option<String>,
    pub full_name: Option<String>,
    pub recipients: Vec<String>,
}

/// Parses sendmail's options (after the program name). Unknown `-o`/`-b` options are
/// ignored; any other unknown option is a usage error.
pub fn parse_args(args: &[String]) -> Result<Options, String> {
    let mut o = Options::default();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--" {
            o.recipients.extend(it.by_ref().cloned());
            break;
        }
        if !a.starts_with('-') || a == "-" {
            o.recipients.push(a.clone());
            continue;
        }
        let mut value = |flag: &str| -> Result<String, String> {
            let rest = &a[flag.len()..];
            if !rest.is_empty() {
                Ok(rest.to_string())
            } else {
                it.next().cloned().ok_or(format!("{flag} needs a value"))
            }
        };
        match a.as_str() {
            "-t" => o.headers_recipients = true,
            "-i" | "-oi" => o.ignore_dots = true,
            s if s.starts_with("-f") || s.starts_with("-r") => {
                o.sender = Some(value(&s[..2])?);
            }
            s if s.starts_with("-F") => o.full_name = Some(value("-F")?),
            s if s.starts_with("-o") || s.starts_with("-b") || s == "-v" => {}
            s => return Err(format!("unknown option {s}")),
        }
    }
    // Addresses given as "a@x, b@y" in one argument (PHP does that).
    o.recipients = o
        .recipients
        .iter()
        .flat_map(|r| split_addresses(r))
        .collect();
    Ok(o)
}

/// `tern sendmail`: returns the sysexits code.
pub fn run(cfg: &Config, args: &[String]) -> ExitCode {
    let opts = match parse_args(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("sendmail: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let mut raw = Vec::new();
    if let Err(e) = std::io::stdin().lock().read_to_end(&mut raw) {
        eprintln!("sendmail: reading the message: {e}");
        return ExitCode::from(EX_IOERR);
    }
    let sender = opts
        .sender
        .clone()
        .unwrap_or_else(|| format!("{}@{}", login_name(), cfg.hostname));
    let (message, mut rcpts) = prepare_message(&raw, &opts, &sender, &cfg.hostname);
    rcpts.extend(opts.recipients.iter().cloned());
    dedup(&mut rcpts);
    if rcpts.is_empty() {
        eprintln!("sendmail: no recipients");
        return ExitCode::from(EX_DATAERR);
    }
    match submit(cfg, &sender, &rcpts, &message) {
        Ok(id) => {
            tracing::info!(id = %id, "queued");
            ExitCode::SUCCESS
        }
        Err((code, why)) => {
            eprintln!("sendmail: {why}");
            ExitCode::from(code)
        }
    }
}

fn dedup(v: &mut Vec<String>) {
    let mut seen = std::collections::HashSet::new();
    v.retain(|r| seen.insert(r.to_ascii_lowercase()));
}

/// The invoking user's login name: $USER, $LOGNAME, else the passwd entry of the uid.
fn login_name() -> String {
    for var in ["USER", "LOGNAME"] {
        if let Ok(v) = std::env::var(var) {
            if !v.is_empty() && v.chars().all(|c| c.is_ascii_graphic() && c != '@') {
                return v;
            }
        }
    }
    // SAFETY: getpwuid returns NULL or a pointer to a static entry, read at once here
    // (this process is single-threaded at this point).
    unsafe {
        let pw = libc::getpwuid(libc::geteuid());
        if !pw.is_null() && !(*pw).pw_name.is_null() {
            if let Ok(s) = std::ffi::CStr::from_ptr((*pw).pw_name).to_str() {
                return s.to_string();
            }
        }
    }
    "nobody".into()
}

/// Normalises the message to CRLF lines (ending at a lone "." unless -i), applies -t
/// (collecting To/Cc/Bcc, removing Bcc) and adds missing From:, Date:, Message-ID:.
/// Returns the message and the header recipients.
pub fn prepare_message(
    raw: &[u8],
    opts: &Options,
    sender: &str,
    hostname: &str,
) -> (Vec<u8>, Vec<String>) {
    let mut lines: Vec<&[u8]> = Vec::new();
    for line in raw.split_inclusive(|&b| b == b'\n') {
        let l = line.strip_suffix(b"\n").unwrap_or(line);
        let l = l.strip_suffix(b"\r").unwrap_or(l);
        if !opts.ignore_dots && l == b"." {
            break;
        }
        lines.push(l);
    }
    // Headers: up to the first empty line; a message without one is all headers only if
    // every line looks like a header, else all body.
    let split = lines.iter().position(|l| l.is_empty());
    let header_end = split.unwrap_or(lines.len());
    let looks_like_headers = lines[..header_end].iter().all(|l| {
        l.starts_with(b" ")
            || l.starts_with(b"\t")
            || l.iter()
                .position(|&b| b == b':')
                .is_some_and(|p| p > 0 && l[..p].iter().all(|b| b.is_ascii_graphic()))
    });
    let (header_lines, body_lines): (&[&[u8]], &[&[u8]]) = if looks_like_headers {
        let body_start = split.map_or(lines.len(), |i| i + 1);
        (&lines[..header_end], &lines[body_start..])
    } else {
        (&[], &lines[..])
    };
    // Unfold into (name, full field text with CRLFs).
    let mut fields: Vec<(String, Vec<u8>)> = Vec::new();
    for l in header_lines {
        if (l.starts_with(b" ") || l.starts_with(b"\t")) && !fields.is_empty() {
            if let Some(f) = fields.last_mut() {
                f.1.extend_from_slice(b"\r\n");
                f.1.extend_from_slice(l);
            }
        } else {
            let name = l
                .iter()
                .position(|&b| b == b':')
                .map(|p| String::from_utf8_lossy(&l[..p]).trim().to_ascii_lowercase())
                .unwrap_or_default();
            fields.push((name, l.to_vec()));
        }
    }
    let mut rcpts = Vec::new();
    if opts.headers_recipients {
        for (name, text) in &fields {
            if matches!(name.as_str(), "to" | "cc" | "bcc") {
                let value = String::from_utf8_lossy(text);
                let value = value.split_once(':').map_or("", |(_, v)| v);
                rcpts.extend(split_addresses(&value.replace("\r\n", "")));
            }
        }
        // RFC 5322 §3.6.3: Bcc recipients must not be visible to the others.
        fields.retain(|(n, _)| n != "bcc");
    }
    let has = |n: &str| fields.iter().any(|(f, _)| f == n);
    let mut added: Vec<Vec<u8>> = Vec::new();
    if !has("from") {
        let from = match &opts.full_name {
            Some(n) => format!("From: {} <{sender}>", quote_phrase(n)),
            None => format!("From: {sender}"),
        };
        added.push(from.into_bytes());
    }
    if !has("date") {
        use time::format_description::well_known::Rfc2822;
        let now = time::OffsetDateTime::now_utc()
            .format(&Rfc2822)
            .unwrap_or_else(|_| "Thu, 1 Jan 1970 00:00:00 +0000".into());
        added.push(format!("Date: {now}").into_bytes());
    }
    if !has("message-id") {
        let micros = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros())
            .unwrap_or(0);
        added
            .push(format!("Message-ID: <{micros}.{}@{hostname}>", std::process::id()).into_bytes());
    }
    let mut out = Vec::with_capacity(raw.len() + 256);
    for f in fields.iter().map(|(_, t)| t).chain(added.iter()) {
        out.extend_from_slice(f);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    for l in body_lines {
        out.extend_from_slice(l);
        out.extend_from_slice(b"\r\n");
    }
    (out, rcpts)
}

/// A display name as an RFC 5322 phrase: quoted unless it is plain atoms.
fn quote_phrase(n: &str) -> String {
    let n: String = n.chars().filter(|c| *c != '\r' && *c != '\n').collect();
    if n.chars().all(|c| c.is_ascii_alphanumeric() || c == ' ') {
        n
    } else {
        format!("\"{}\"", n.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

/// The addr-specs of an address list: "A <a@x>, b@y (c), "Q, R" <q@z>" → a@x, b@y, q@z.
/// Groups ("list: a@x;") and comments are handled; anything odd is passed as written and
/// left to the session's address check.
pub fn split_addresses(list: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    // quoted string, inside <...>, comment depth, an <addr> was taken (ignore the rest).
    let (mut quoted, mut angle, mut comment, mut taken) = (false, false, 0u32, false);
    let mut push = |cur: &mut String| {
        let s = cur.trim();
        let s = s.rsplit_once(':').map_or(s, |(_, a)| a).trim(); // a group's name
        if !s.is_empty() {
            out.push(s.to_string());
        }
        cur.clear();
    };
    for c in list.chars() {
        match c {
            '(' if comment > 0 => comment += 1,
            ')' if comment > 0 => comment -= 1,
            _ if comment > 0 => {}
            '"' => quoted = !quoted,
            _ if quoted => {}
            '(' => comment = 1,
            '<' => {
                angle = true;
                cur.clear();
            }
            '>' if angle => {
                angle = false;
                taken = true;
            }
            ',' | ';' if !angle => {
                push(&mut cur);
                taken = false;
            }
            _ if taken => {}
            _ => cur.push(c),
        }
    }
    push(&mut cur);
    out
}

/// Runs the message through an in-process `Session` and makes it durable. Returns the
/// queue id, or the sysexits code and why.
fn submit(
    cfg: &Config,
    sender: &str,
    rcpts: &[String],
    message: &[u8],
) -> Result<String, (u8, String)> {
    let loopback: Vec<ipnet::IpNet> = vec!["127.0.0.0/8"
        .parse()
        .map_err(|_| (EX_SOFTWARE, "ipnet".into()))?];
    let scfg = Rc::new(crate::cli::stdio::session_config(cfg, &loopback));
    let peer = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let mut s = Session::new(scfg, peer, false, tern_engine::clock::now());
    let mut out = BytesMut::new();
    s.greeting(&mut out);
    let eight_bit = message.iter().any(|b| *b >= 0x80);
    let body_param = if eight_bit { " BODY=8BITMIME" } else { "" };
    let mut steps: Vec<(String, u8)> = vec![
        ("EHLO localhost\r\n".into(), EX_SOFTWARE),
        (format!("MAIL FROM:<{sender}>{body_param}\r\n"), EX_DATAERR),
    ];
    steps.extend(
        rcpts
            .iter()
            .map(|r| (format!("RCPT TO:<{r}>\r\n"), EX_NOUSER)),
    );
    steps.push(("DATA\r\n".into(), EX_DATAERR));
    let mut id = None;
    for (cmd, code) in steps {
        out.clear();
        let mut input = BytesMut::from(cmd.as_bytes());
        if let Event::Close = s.process(&mut input, &mut out, tern_engine::clock::now()) {
            return Err((EX_TEMPFAIL, reply_text(&out)));
        }
        check(&out, code, &cmd)?;
    }
    // The body, dot-stuffed (RFC 5321 §4.5.2), then the terminator.
    let mut input = BytesMut::with_capacity(message.len() + message.len() / 64 + 8);
    for line in message.split_inclusive(|&b| b == b'\n') {
        if line.starts_with(b".") {
            input.extend_from_slice(b".");
        }
        input.extend_from_slice(line);
    }
    input.extend_from_slice(b".\r\n");
    out.clear();
    while let Event::Message(mut msg) = s.process(&mut input, &mut out, tern_engine::clock::now()) {
        let r = crate::cli::stdio::make_durable(cfg, &mut msg);
        id = r.as_ref().ok().cloned();
        s.stored(r.as_deref().map_err(|e| *e), &mut out);
    }
    check(&out, EX_DATAERR, "end of data")?;
    id.ok_or((EX_TEMPFAIL, "message not stored".into()))
}

fn reply_text(out: &[u8]) -> String {
    String::from_utf8_lossy(out)
        .trim_end()
        .replace("\r\n", " / ")
}

/// The last reply in `out` must be 2xx/3xx; a 4xx is a temporary failure (75), a 5xx
/// gives `code`.
fn check(out: &[u8], code: u8, what: &str) -> Result<(), (u8, String)> {
    let text = String::from_utf8_lossy(out);
    let last = text.trim_end().rsplit("\r\n").next().unwrap_or("");
    match last.as_bytes().first() {
        Some(b'2') | Some(b'3') => Ok(()),
        Some(b'4') => Err((EX_TEMPFAIL, format!("{}: {last}", what.trim_end()))),
        _ => Err((code, format!("{}: {last}", what.trim_end()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            split_addresses(r#"A <a@x>, b@y (c), "Q, R" <q@z>, list: l@m, n@o;"#),
            vec!["a@x", "b@y", "q@z", "l@m", "n@o"]
        );
    }

    #[test]
    fn args() {
        let a: Vec<String> = ["-t", "-oi", "-fme@x", "-F", "Me", "a@b, c@d"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let o = parse_args(&a).unwrap();
        assert!(o.headers_recipients && o.ignore_dots);
        assert_eq!(o.sender.as_deref(), Some("me@x"));
        assert_eq!(o.full_name.as_deref(), Some("Me"));
        assert_eq!(o.recipients, vec!["a@b", "c@d"]);
        assert!(parse_args(&["-q".to_string()]).is_err());
    }

    #[test]
    fn bcc_removed_and_headers_added() {
        let opts = Options {
            headers_recipients: true,
            ..Default::default()
        };
        let (m, r) = prepare_message(
            b"To: a@x\nBcc: b@y,\n c@z\nSubject: s\n\nhello\n.\nafter\n",
            &opts,
            "me@h",
            "h",
        );
        let m = String::from_utf8(m).unwrap();
        assert_eq!(r, vec!["a@x", "b@y", "c@z"]);
        assert!(!m.contains("Bcc") && !m.contains("after"));
        assert!(m.contains("From: me@h\r\n") && m.contains("Message-ID: <"));
        assert!(m.ends_with("\r\n\r\nhello\r\n"));
    }
}
