//! Delivery status notifications (RFC 3464 multipart/report, RFC 3461 semantics).
//!
//! Owns: deciding which recipients a DSN covers (NOTIFY), and building the whole message:
//! headers, a human-readable part, `message/delivery-status`, and the original message
//! (RET=FULL) or its headers (RET=HDRS, `text/rfc822-headers`).
//! Must never: produce a DSN for a null reverse-path (never bounce a bounce, RFC 3461 §6.2
//! / RFC 5321 §6.1), let a byte from a remote server or an envelope break a header line
//! (controls are replaced), or do I/O. Queuing the DSN is the runner's job; it must
//! enqueue it with the null sender `<>`, recipient `env.sender`, and body type
//! `EightBitMime` when the original was not 7-bit (the original is embedded as is).
//!
//! Policy (not from an RFC): without NOTIFY only failures are reported; without RET a
//! failure returns the full message and a delay/success/relayed report only the headers;
//! a BINARYMIME original is always returned as headers only (binary cannot sit in a
//! message/rfc822 part sent with DATA).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::client::transaction::xtext;
use crate::client::Reply;
use crate::envelope::{
    BodyType, DeliverByMode, Envelope, Ret, NOTIFY_DELAY, NOTIFY_FAILURE, NOTIFY_NEVER,
    NOTIFY_SUCCESS,
};

/// What the DSN reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DsnKind {
    /// Action: failed (permanent).
    Failure,
    /// Action: delayed (still retrying).
    Delay,
    /// Action: delivered (into a mailbox here).
    Success,
    /// Action: relayed (RFC 3464 §2.3.3): handed to a next hop that will not send DSNs
    /// (no DSN extension, RFC 3461 §5.2.2). Covers recipients with NOTIFY=SUCCESS, and,
    /// for a message with BY=;N (RFC 2852 §4.1.4.2, the caller only lists hops without
    /// DELIVERBY then), any recipient without NOTIFY=NEVER.
    Relayed,
}

/// One recipient's status, as a server (or tern itself) reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DsnStatus {
    pub code: u16,
    pub enhanced: Option<(u8, u16, u16)>,
    pub text: String,
    /// The remote server's name when the status came from one (`Remote-MTA`, and the
    /// Diagnostic-Code is then of type `smtp`); `None` for tern's own decisions.
    pub remote_mta: Option<String>,
}

impl DsnStatus {
    pub fn from_reply(reply: &Reply, remote_mta: Option<String>) -> DsnStatus {
        DsnStatus {
            code: reply.code,
            enhanced: reply.enhanced,
            text: reply.text.clone(),
            remote_mta,
        }
    }

    /// RFC 3463 status: the enhanced code, else one derived from the reply class.
    fn status(&self, kind: DsnKind) -> String {
        match self.enhanced {
            Some((a, b, c)) => format!("{a}.{b}.{c}"),
            None => match (kind, self.code / 100) {
                (DsnKind::Success | DsnKind::Relayed, _) | (_, 2) => "2.0.0".into(),
                (DsnKind::Delay, _) | (_, 4) => "4.0.0".into(),
                _ => "5.0.0".into(),
            },
        }
    }
}

/// Longest diagnostic text kept (header lines must stay under 998 octets, RFC 5322 §2.1.1).
const MAX_DIAG: usize = 900;

/// Builds the DSN for `env`'s recipients in `statuses` (index into `env.recipients`,
/// status). `original` is the stored message (with tern's Received header). Returns
/// `None` when nothing is to be sent: a null sender, or no recipient asked for this kind.
pub fn bounce(
    hostname: &str,
    env: &Envelope,
    statuses: &[(usize, DsnStatus)],
    kind: DsnKind,
    original: &[u8],
    date: SystemTime,
) -> Option<Vec<u8>> {
    if env.sender.is_empty() {
        return None;
    }
    let wanted = match kind {
        DsnKind::Failure => NOTIFY_FAILURE,
        DsnKind::Delay => NOTIFY_DELAY,
        DsnKind::Success | DsnKind::Relayed => NOTIFY_SUCCESS,
    };
    let by_notify = kind == DsnKind::Relayed
        && env
            .deliver_by
            .is_some_and(|b| b.mode == DeliverByMode::Notify);
    let covered: Vec<(&crate::envelope::Recipient, &DsnStatus)> = statuses
        .iter()
        .filter_map(|(i, s)| env.recipients.get(*i).map(|r| (r, s)))
        .filter(|(r, _)| {
            if r.notify & NOTIFY_NEVER != 0 {
                false
            } else if by_notify {
                true
            } else if r.notify == 0 {
                kind == DsnKind::Failure
            } else {
                r.notify & wanted != 0
            }
        })
        .collect();
    if covered.is_empty() {
        return None;
    }

    let hostname = clean(hostname);
    let headers_only = match (env.ret, kind) {
        _ if env.body_type == BodyType::BinaryMime => true,
        (Some(Ret::Full), _) => false,
        (Some(Ret::Hdrs), _) => true,
        (None, DsnKind::Failure) => false,
        (None, _) => true,
    };
    let returned: &[u8] = if headers_only {
        header_block(original)
    } else {
        original
    };
    let boundary = boundary(env, date, returned);
    let now = rfc5322_date(date);

    let mut m = String::with_capacity(2048);
    let (subject, action) = match kind {
        DsnKind::Failure => ("Undelivered Mail Returned to Sender", "failed"),
        DsnKind::Delay => ("Delayed Mail (still being retried)", "delayed"),
        DsnKind::Success => ("Successful Mail Delivery Report", "delivered"),
        DsnKind::Relayed => ("Relayed Mail Report", "relayed"),
    };
    let since = date
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros();
    m += &format!("From: Mail Delivery System <MAILER-DAEMON@{hostname}>\r\n");
    m += &format!("To: <{}>\r\n", clean(&env.sender));
    m += &format!("Subject: {subject}\r\n");
    m += &format!("Date: {now}\r\n");
    m += &format!(
        "Message-ID: <{}.{since}.dsn@{hostname}>\r\n",
        clean(&env.id)
    );
    m += "Auto-Submitted: auto-replied\r\n";
    m += "MIME-Version: 1.0\r\n";
    m += &format!(
        "Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\"\r\n"
    );
    m += "\r\nThis is a MIME-encapsulated message.\r\n\r\n";

    // Part 1: for people.
    m += &format!("--{boundary}\r\n");
    m += "Content-Description: Notification\r\n";
    m += "Content-Type: text/plain; charset=utf-8\r\n\r\n";
    m += &format!("This is the mail system at host {hostname}.\r\n\r\n");
    m += match kind {
        DsnKind::Failure => {
            "I'm sorry to have to inform you that your message could not\r\n\
             be delivered to one or more recipients. It's attached below.\r\n"
        }
        DsnKind::Delay => {
            "Your message could not be delivered yet to one or more recipients.\r\n\
             The mail system will keep trying; you do not need to resend it.\r\n"
        }
        DsnKind::Success => {
            "Your message was successfully delivered to the recipients below,\r\n\
             as you asked with a delivery status notification request.\r\n"
        }
        DsnKind::Relayed => {
            "Your message was relayed to the recipients below to a system that does\r\n\
             not send delivery status notifications: expect no further notice about\r\n\
             these recipients unless their delivery fails.\r\n"
        }
    };
    m += "\r\n";
    for (r, s) in &covered {
        m += &format!("<{}>: {}\r\n", clean(&r.addr), diagnostic_text(s));
    }
    m += "\r\n";

    // Part 2: for machines (RFC 3464 §2).
    m += &format!("--{boundary}\r\n");
    m += "Content-Description: Delivery report\r\n";
    m += "Content-Type: message/delivery-status\r\n\r\n";
    m += &format!("Reporting-MTA: dns; {hostname}\r\n");
    m += &format!("X-Tern-Queue-ID: {}\r\n", clean(&env.id));
    if let Some(envid) = &env.envid {
        let mut x = String::new();
        xtext(envid, &mut x);
        m += &format!("Original-Envelope-Id: {x}\r\n");
    }
    let arrival = UNIX_EPOCH + Duration::from_micros(env.arrival_unix_micros);
    m += &format!("Arrival-Date: {}\r\n", rfc5322_date(arrival));
    for (r, s) in &covered {
        m += "\r\n";
        if let Some(orcpt) = &r.orcpt {
            match orcpt.split_once(';') {
                Some((t, a)) => m += &format!("Original-Recipient: {}; {}\r\n", clean(t), clean(a)),
                None => m += &format!("Original-Recipient: rfc822; {}\r\n", clean(orcpt)),
            }
        }
        let addr_type = if r.addr.is_ascii() { "rfc822" } else { "utf-8" };
        m += &format!("Final-Recipient: {addr_type}; {}\r\n", clean(&r.addr));
        m += &format!("Action: {action}\r\n");
        m += &format!("Status: {}\r\n", s.status(kind));
        match &s.remote_mta {
            Some(mta) => {
                m += &format!("Remote-MTA: dns; {}\r\n", clean(mta));
                m += &format!("Diagnostic-Code: smtp; {}\r\n", diagnostic_text(s));
            }
            None => m += &format!("Diagnostic-Code: X-tern; {}\r\n", diagnostic_text(s)),
        }
        if kind == DsnKind::Delay {
            m += &format!("Last-Attempt-Date: {now}\r\n");
        }
    }
    m += "\r\n";

    // Part 3: the original.
    m += &format!("--{boundary}\r\n");
    let what = match kind {
        DsnKind::Failure | DsnKind::Delay => "Undelivered Message",
        DsnKind::Success | DsnKind::Relayed => "Message",
    };
    if headers_only {
        m += &format!("Content-Description: {what} Headers\r\n");
        m += "Content-Type: text/rfc822-headers\r\n";
    } else {
        m += &format!("Content-Description: {what}\r\n");
        m += "Content-Type: message/rfc822\r\n";
    }
    if env.body_type != BodyType::SevenBit {
        m += "Content-Transfer-Encoding: 8bit\r\n";
    }
    m += "\r\n";
    let mut out = m.into_bytes();
    out.extend_from_slice(returned);
    if !returned.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    Some(out)
}

/// `550 5.1.1 text` on one line, controls replaced, bounded.
fn diagnostic_text(s: &DsnStatus) -> String {
    let mut t = s.code.to_string();
    if let Some((a, b, c)) = s.enhanced {
        t += &format!(" {a}.{b}.{c}");
    }
    for line in s.text.split('\n') {
        if !line.is_empty() {
            t.push(' ');
            t += line;
        }
    }
    let mut t = clean(&t);
    if t.len() > MAX_DIAG {
        let mut cut = MAX_DIAG;
        while !t.is_char_boundary(cut) {
            cut -= 1;
        }
        t.truncate(cut);
    }
    t
}

/// Replaces every control character (CR and LF included) with a space.
fn clean(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// The header block of a message, including the blank line that ends it (or the whole
/// message if it has no body).
fn header_block(msg: &[u8]) -> &[u8] {
    if let Some(i) = memchr::memmem::find(msg, b"\r\n\r\n") {
        return &msg[..i + 2];
    }
    if let Some(i) = memchr::memmem::find(msg, b"\n\n") {
        return &msg[..i + 1];
    }
    msg
}

/// A boundary that does not occur in the returned content (RFC 2046 §5.1.1).
fn boundary(env: &Envelope, date: SystemTime, content: &[u8]) -> String {
    let secs = date
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let id: String = env
        .id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(40)
        .collect();
    let mut b = format!("{id}.{secs}/tern");
    while memchr::memmem::find(content, b.as_bytes()).is_some() {
        b.push_str(&format!("{:08x}", rand::random::<u32>()));
    }
    b
}

/// RFC 5322 §3.3 date in UTC (`Tue, 01 Dec 2026 10:00:00 +0000`).
fn rfc5322_date(t: SystemTime) -> String {
    use time::format_description::well_known::Rfc2822;
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    time::OffsetDateTime::from_unix_timestamp(i64::try_from(secs).unwrap_or(0))
        .ok()
        .and_then(|d| d.format(&Rfc2822).ok())
        .unwrap_or_else(|| "Thu, 01 Jan 1970 00:00:00 +0000".into())
}
