//! Milter packets: encoding the MTA's commands, decoding and validating the filter's
//! responses, and option negotiation.
//!
//! Wire format (libmilter `mfdef.h`, Postfix `src/milter/milter8.c`): a 4-byte big-endian
//! length counting the command byte and the data, the command byte, the data; strings are
//! NUL-terminated. Must never: panic or allocate without bound on a filter's input (a
//! packet over `MAX_PACKET` is an error before anything is buffered for it).

use std::net::SocketAddr;

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The protocol version tern speaks (sendmail 8.14's).
pub const VERSION: u32 = 6;
/// Largest body chunk in one `SMFIC_BODY` (tern never offers `SMFIP_MDS_256K`/`_1M`).
pub const MAX_BODY_CHUNK: usize = 65535;
/// Largest packet accepted from a filter (a replaced body chunk may be up to 1 MiB with
/// `SMFIP_MDS_1M` on other MTAs; tern allows that much, and no more).
pub const MAX_PACKET: usize = (1 << 20) + 64;

/// Commands, MTA to filter (`SMFIC_*`).
pub mod cmd {
    pub const ABORT: u8 = b'A';
    pub const BODY: u8 = b'B';
    pub const CONNECT: u8 = b'C';
    pub const MACRO: u8 = b'D';
    pub const BODYEOB: u8 = b'E';
    pub const HELO: u8 = b'H';
    pub const QUIT_NC: u8 = b'K';
    pub const HEADER: u8 = b'L';
    pub const MAIL: u8 = b'M';
    pub const EOH: u8 = b'N';
    pub const OPTNEG: u8 = b'O';
    pub const QUIT: u8 = b'Q';
    pub const RCPT: u8 = b'R';
    pub const DATA: u8 = b'T';
    pub const UNKNOWN: u8 = b'U';
}

/// Message edits a filter may ask for (`SMFIF_*`), offered all.
pub mod act {
    pub const ADDHDRS: u32 = 0x01;
    pub const CHGBODY: u32 = 0x02;
    pub const ADDRCPT: u32 = 0x04;
    pub const DELRCPT: u32 = 0x08;
    pub const CHGHDRS: u32 = 0x10;
    pub const QUARANTINE: u32 = 0x20;
    pub const CHGFROM: u32 = 0x40;
    pub const ADDRCPT_PAR: u32 = 0x80;
    pub const SETSYMLIST: u32 = 0x100;
    pub const ALL: u32 = 0x1ff;
}

/// Protocol steps (`SMFIP_*`).
pub mod proto {
    pub const NOCONNECT: u32 = 0x1;
    pub const NOHELO: u32 = 0x2;
    pub const NOMAIL: u32 = 0x4;
    pub const NORCPT: u32 = 0x8;
    pub const NOBODY: u32 = 0x10;
    pub const NOHDRS: u32 = 0x20;
    pub const NOEOH: u32 = 0x40;
    pub const NR_HDR: u32 = 0x80;
    pub const NOUNKNOWN: u32 = 0x100;
    pub const NODATA: u32 = 0x200;
    pub const SKIP: u32 = 0x400;
    pub const RCPT_REJ: u32 = 0x800;
    pub const NR_CONN: u32 = 0x1000;
    pub const NR_HELO: u32 = 0x2000;
    pub const NR_MAIL: u32 = 0x4000;
    pub const NR_RCPT: u32 = 0x8000;
    pub const NR_DATA: u32 = 0x10000;
    pub const NR_UNKN: u32 = 0x20000;
    pub const NR_EOH: u32 = 0x40000;
    pub const NR_BODY: u32 = 0x80000;
    pub const HDR_LEADSPC: u32 = 0x100000;
    /// What tern can honour: every stage may be skipped or left unanswered, SKIP is
    /// understood. Not offered: RCPT_REJ (only accepted recipients are sent), HDR_LEADSPC
    /// (values are sent with the leading space removed, as sendmail does by default),
    /// MDS_256K/MDS_1M (body chunks stay at 65535).
    pub const OFFER: u32 = NOCONNECT
        | NOHELO
        | NOMAIL
        | NORCPT
        | NOBODY
        | NOHDRS
        | NOEOH
        | NR_HDR
        | NOUNKNOWN
        | NODATA
        | SKIP
        | NR_CONN
        | NR_HELO
        | NR_MAIL
        | NR_RCPT
        | NR_DATA
        | NR_UNKN
        | NR_EOH
        | NR_BODY;
    /// Size bits a filter may ask for; tern ignores them (it never sends more than 64 KiB).
    pub const MDS: u32 = 0x1000_0000 | 0x2000_0000;
}

/// One stage of the conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    Connect,
    Helo,
    Mail,
    Rcpt,
    Data,
    Header,
    Eoh,
    Body,
    Eom,
}

impl Stage {
    pub const ALL: [Stage; 9] = [
        Stage::Connect,
        Stage::Helo,
        Stage::Mail,
        Stage::Rcpt,
        Stage::Data,
        Stage::Header,
        Stage::Eoh,
        Stage::Body,
        Stage::Eom,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Stage::Connect => "connect",
            Stage::Helo => "helo",
            Stage::Mail => "mail",
            Stage::Rcpt => "rcpt",
            Stage::Data => "data",
            Stage::Header => "header",
            Stage::Eoh => "eoh",
            Stage::Body => "body",
            Stage::Eom => "eom",
        }
    }

    /// The `SMFIP_NO*` bit that removes the stage (end-of-message cannot be removed).
    fn skip_bit(self) -> u32 {
        match self {
            Stage::Connect => proto::NOCONNECT,
            Stage::Helo => proto::NOHELO,
            Stage::Mail => proto::NOMAIL,
            Stage::Rcpt => proto::NORCPT,
            Stage::Data => proto::NODATA,
            Stage::Header => proto::NOHDRS,
            Stage::Eoh => proto::NOEOH,
            Stage::Body => proto::NOBODY,
            Stage::Eom => 0,
        }
    }

    /// The `SMFIP_NR_*` bit that says the filter sends no reply at this stage.
    fn no_reply_bit(self) -> u32 {
        match self {
            Stage::Connect => proto::NR_CONN,
            Stage::Helo => proto::NR_HELO,
            Stage::Mail => proto::NR_MAIL,
            Stage::Rcpt => proto::NR_RCPT,
            Stage::Data => proto::NR_DATA,
            Stage::Header => proto::NR_HDR,
            Stage::Eoh => proto::NR_EOH,
            Stage::Body => proto::NR_BODY,
            Stage::Eom => 0,
        }
    }

    /// The `SMFIM_*` index a filter uses to ask for a stage's macros, and the command
    /// byte that `SMFIC_MACRO` names for it.
    pub fn macro_slot(self) -> Option<(usize, u8)> {
        match self {
            Stage::Connect => Some((0, cmd::CONNECT)),
            Stage::Helo => Some((1, cmd::HELO)),
            Stage::Mail => Some((2, cmd::MAIL)),
            Stage::Rcpt => Some((3, cmd::RCPT)),
            Stage::Data => Some((4, cmd::DATA)),
            Stage::Eom => Some((5, cmd::BODYEOB)),
            Stage::Eoh => Some((6, cmd::EOH)),
            Stage::Header | Stage::Body => None,
        }
    }
}

/// What one filter agreed to in option negotiation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub version: u32,
    /// `SMFIF_*` edits the filter may make.
    pub actions: u32,
    /// `SMFIP_*` steps: stages not wanted, stages not answered.
    pub protocol: u32,
    /// Macro lists the filter asked for per `SMFIM_*` stage (space-separated names, as
    /// `SMFIR_SETSYMLIST` sends them); None: the MTA's defaults.
    pub macros: [Option<String>; 7],
}

impl Negotiated {
    /// Is the stage sent to the filter at all?
    pub fn sends(&self, s: Stage) -> bool {
        self.protocol & s.skip_bit() == 0
    }

    /// Does the filter answer the stage (or must the MTA not wait)?
    pub fn replies(&self, s: Stage) -> bool {
        let bit = s.no_reply_bit();
        bit == 0 || self.protocol & bit == 0
    }

    /// Takes `SMFIC_UNKNOWN` without answering it (it did not decline the step, and
    /// negotiated `SMFIP_NR_UNKN`).
    pub fn takes_unknown_silently(&self) -> bool {
        self.protocol & proto::NOUNKNOWN == 0 && self.protocol & proto::NR_UNKN != 0
    }

    /// May the filter make this `SMFIF_*` edit?
    pub fn may(&self, action: u32) -> bool {
        self.actions & action == action
    }

    /// Does the filter want macro `name` at stage `s`? Without a list of its own it gets
    /// every macro the MTA sends there.
    pub fn wants_macro(&self, s: Stage, name: &str) -> bool {
        let Some((i, _)) = s.macro_slot() else {
            return false;
        };
        match &self.macros[i] {
            None => true,
            Some(list) => list
                .split([' ', ','])
                .any(|n| n == name || n.trim_matches(['{', '}']) == name.trim_matches(['{', '}'])),
        }
    }
}

/// A filter's response, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    OptNeg(Negotiated),
    Accept,
    Continue,
    Discard,
    Reject,
    Tempfail,
    /// Skip the rest of this stage (body chunks).
    Skip,
    /// The filter is still working: restart the timer.
    Progress,
    /// The filter's own reply (`smfi_setreply`), already checked.
    ReplyCode(FilterReply),
    /// `SMFIR_CONN_FAIL`/`SMFIR_SHUTDOWN`: treated as tempfail.
    Shutdown,
    Quarantine(String),
    AddHeader {
        name: String,
        value: String,
    },
    InsertHeader {
        index: u32,
        name: String,
        value: String,
    },
    ChangeHeader {
        index: u32,
        name: String,
        value: String,
    },
    AddRcpt {
        rcpt: String,
        args: Option<String>,
    },
    DelRcpt(String),
    ChangeFrom {
        from: String,
        args: Option<String>,
    },
    ReplaceBody(Bytes),
}

impl Response {
    /// The verdicts that end a stage (everything else is an edit or progress).
    pub fn is_verdict(&self) -> bool {
        matches!(
            self,
            Response::Accept
                | Response::Continue
                | Response::Discard
                | Response::Reject
                | Response::Tempfail
                | Response::Skip
                | Response::ReplyCode(_)
                | Response::Shutdown
        )
    }

    /// A short name for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Response::OptNeg(_) => "optneg",
            Response::Accept => "accept",
            Response::Continue => "continue",
            Response::Discard => "discard",
            Response::Reject => "reject",
            Response::Tempfail => "tempfail",
            Response::Skip => "skip",
            Response::Progress => "progress",
            Response::ReplyCode(_) => "replycode",
            Response::Shutdown => "shutdown",
            Response::Quarantine(_) => "quarantine",
            Response::AddHeader { .. } => "addheader",
            Response::InsertHeader { .. } => "insheader",
            Response::ChangeHeader { .. } => "chgheader",
            Response::AddRcpt { .. } => "addrcpt",
            Response::DelRcpt(_) => "delrcpt",
            Response::ChangeFrom { .. } => "chgfrom",
            Response::ReplaceBody(_) => "replbody",
        }
    }

    /// Decodes one packet from the front of `buf` if it is complete (consuming it);
    /// `Ok(None)`: more bytes are needed.
    pub fn decode(buf: &mut BytesMut) -> Result<Option<Response>, DecodeError> {
        if buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len == 0 {
            return Err(DecodeError::Empty);
        }
        if len > MAX_PACKET {
            return Err(DecodeError::TooLong(len));
        }
        if buf.len() < 4 + len {
            return Ok(None);
        }
        buf.advance(4);
        let code = buf.get_u8();
        let data = buf.split_to(len - 1).freeze();
        parse(code, data).map(Some)
    }
}

/// Why a filter's bytes were refused (the connection is then dropped and the filter's
/// default action taken).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty packet")]
    Empty,
    #[error("packet of {0} bytes (limit {MAX_PACKET})")]
    TooLong(usize),
    #[error("unknown response code {0:#04x}")]
    Unknown(u8),
    #[error("malformed {0} response")]
    Malformed(&'static str),
    #[error("reply code not 4xx/5xx: {0:?}")]
    BadReplyCode(String),
}

fn parse(code: u8, mut data: Bytes) -> Result<Response, DecodeError> {
    Ok(match code {
        b'O' => {
            if data.len() < 12 {
                return Err(DecodeError::Malformed("optneg"));
            }
            let version = data.get_u32();
            let actions = data.get_u32();
            let protocol = data.get_u32();
            let mut macros: [Option<String>; 7] = Default::default();
            // Optional SMFIR_SETSYMLIST-style lists: (u32 stage, "names\0")*.
            while data.len() >= 4 {
                let stage = data.get_u32() as usize;
                let list = cstr(&mut data).ok_or(DecodeError::Malformed("optneg"))?;
                if let Some(slot) = macros.get_mut(stage) {
                    *slot = Some(list);
                }
            }
            Response::OptNeg(Negotiated {
                version,
                actions,
                protocol,
                macros,
            })
        }
        b'a' => Response::Accept,
        b'c' => Response::Continue,
        b'd' => Response::Discard,
        b'r' => Response::Reject,
        b't' => Response::Tempfail,
        b's' => Response::Skip,
        b'p' => Response::Progress,
        b'f' | b'4' => Response::Shutdown,
        b'y' => {
            let text = cstr(&mut data).ok_or(DecodeError::Malformed("replycode"))?;
            Response::ReplyCode(FilterReply::parse(&text)?)
        }
        b'q' => Response::Quarantine(cstr(&mut data).unwrap_or_default()),
        b'h' => {
            let name = cstr(&mut data).ok_or(DecodeError::Malformed("addheader"))?;
            let value = cstr(&mut data).ok_or(DecodeError::Malformed("addheader"))?;
            Response::AddHeader {
                name: header_name(name, "addheader")?,
                value,
            }
        }
        b'i' | b'm' => {
            let what = if code == b'i' {
                "insheader"
            } else {
                "chgheader"
            };
            if data.len() < 4 {
                return Err(DecodeError::Malformed(what));
            }
            let index = data.get_u32();
            let name = header_name(cstr(&mut data).ok_or(DecodeError::Malformed(what))?, what)?;
            let value = cstr(&mut data).ok_or(DecodeError::Malformed(what))?;
            if code == b'i' {
                Response::InsertHeader { index, name, value }
            } else {
                Response::ChangeHeader { index, name, value }
            }
        }
        b'+' | b'2' => {
            let rcpt = cstr(&mut data).ok_or(DecodeError::Malformed("addrcpt"))?;
            let args = if code == b'2' { cstr(&mut data) } else { None };
            Response::AddRcpt {
                rcpt: address(rcpt, "addrcpt")?,
                args: args.filter(|a| !a.is_empty()),
            }
        }
        b'-' => Response::DelRcpt(address(
            cstr(&mut data).ok_or(DecodeError::Malformed("delrcpt"))?,
            "delrcpt",
        )?),
        b'e' => {
            let from = cstr(&mut data).ok_or(DecodeError::Malformed("chgfrom"))?;
            Response::ChangeFrom {
                from: address(from, "chgfrom")?,
                args: cstr(&mut data).filter(|a| !a.is_empty()),
            }
        }
        b'b' => Response::ReplaceBody(data),
        other => return Err(DecodeError::Unknown(other)),
    })
}

/// A NUL-terminated string from the front of `data` (lossy UTF-8); None without a NUL.
fn cstr(data: &mut Bytes) -> Option<String> {
    let end = memchr::memchr(0, data)?;
    let s = String::from_utf8_lossy(&data[..end]).into_owned();
    data.advance(end + 1);
    Some(s)
}

/// A header field name (RFC 5322 §3.6.8: printable ASCII but ':').
fn header_name(name: String, what: &'static str) -> Result<String, DecodeError> {
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
        return Err(DecodeError::Malformed(what));
    }
    Ok(name)
}

/// An envelope address from a filter, `<a@b>` or `a@b`, returned without brackets;
/// refused if it holds whitespace or control characters (it goes into SMTP commands).
fn address(a: String, what: &'static str) -> Result<String, DecodeError> {
    let t = a.trim();
    let t = t
        .strip_prefix('<')
        .and_then(|t| t.strip_suffix('>'))
        .unwrap_or(t);
    if t.chars()
        .any(|c| c.is_control() || c == ' ' || c == '<' || c == '>')
    {
        return Err(DecodeError::Malformed(what));
    }
    Ok(t.to_string())
}

/// A filter's own SMTP reply (`SMFIR_REPLYCODE`: "550 5.7.1 text", possibly multi-line
/// "550-5.7.1 a\r\n550 5.7.1 b"), reduced to one safe line: the code must be 4xx or 5xx
/// (sendmail and Postfix refuse anything else), the enhanced code's class must match it
/// (else a default is used), and the text keeps printable characters only, lines joined
/// with "; ", so nothing a filter sends can split the SMTP reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterReply {
    pub code: u16,
    pub enhanced: String,
    pub text: String,
}

impl FilterReply {
    pub fn parse(raw: &str) -> Result<FilterReply, DecodeError> {
        let b = raw.as_bytes();
        let bad = || DecodeError::BadReplyCode(raw.chars().take(40).collect());
        if b.len() < 3
            || !b[..3].iter().all(u8::is_ascii_digit)
            || !(b[0] == b'4' || b[0] == b'5')
            || b.get(3).is_some_and(|&c| c != b' ' && c != b'-')
        {
            return Err(bad());
        }
        let code: u16 = raw[..3].parse().map_err(|_| bad())?;
        let class = (b[0] - b'0') as u16;
        let mut enhanced: Option<String> = None;
        let mut parts: Vec<String> = Vec::new();
        for line in raw.split(['\r', '\n']).filter(|l| !l.is_empty()) {
            // Each line may repeat "NNN-" / "NNN " and the enhanced code.
            let mut l = line;
            if l.len() >= 4 && l.as_bytes()[..3] == b[..3] && matches!(l.as_bytes()[3], b' ' | b'-')
            {
                l = &l[4..];
            } else if l.len() == 3 && l.as_bytes() == &b[..3] {
                l = "";
            }
            l = l.trim_start();
            let (first, rest) = l.split_once(' ').unwrap_or((l, ""));
            if is_enhanced(first, class) {
                enhanced.get_or_insert_with(|| first.to_string());
                l = rest;
            }
            // Printable ASCII only: an SMTP reply is 7-bit (RFC 5321 §4.2), and no
            // control character may split it.
            let clean: String = l
                .chars()
                .map(|c| match c {
                    ' '..='~' => c,
                    c if c.is_control() => ' ',
                    _ => '?',
                })
                .collect();
            let clean = clean.trim();
            if !clean.is_empty() {
                parts.push(clean.to_string());
            }
        }
        let enhanced = enhanced.unwrap_or_else(|| format!("{class}.7.1"));
        let text = if parts.is_empty() {
            if class == 5 {
                "Message rejected by filter".to_string()
            } else {
                "Message deferred by filter, try again later".to_string()
            }
        } else {
            parts.join("; ")
        };
        Ok(FilterReply {
            code,
            enhanced,
            text,
        })
    }
}

/// "C.S.D" with C the reply's class (RFC 3463).
fn is_enhanced(s: &str, class: u16) -> bool {
    let mut it = s.split('.');
    let (Some(c), Some(sub), Some(d), None) = (it.next(), it.next(), it.next(), it.next()) else {
        return false;
    };
    c == class.to_string()
        && !sub.is_empty()
        && sub.len() <= 3
        && sub.bytes().all(|b| b.is_ascii_digit())
        && !d.is_empty()
        && d.len() <= 3
        && d.bytes().all(|b| b.is_ascii_digit())
}

// ---- encoding (MTA to filter) ----

/// Starts a packet of command `cmd`; `finish` writes its length.
fn begin(out: &mut BytesMut, cmd: u8) -> usize {
    let at = out.len();
    out.put_u32(0);
    out.put_u8(cmd);
    at
}

fn finish(out: &mut BytesMut, at: usize) {
    let len = (out.len() - at - 4) as u32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

/// A NUL-terminated string; a NUL inside would end it early, so it becomes a space.
fn put_cstr(out: &mut BytesMut, s: &[u8]) {
    if memchr::memchr(0, s).is_none() {
        out.put_slice(s);
    } else {
        out.extend(s.iter().map(|&b| if b == 0 { b' ' } else { b }));
    }
    out.put_u8(0);
}

/// `SMFIC_OPTNEG`: version 6, every edit, every step tern can honour.
pub fn optneg(out: &mut BytesMut) {
    let at = begin(out, cmd::OPTNEG);
    out.put_u32(VERSION);
    out.put_u32(act::ALL);
    out.put_u32(proto::OFFER);
    finish(out, at);
}

/// Checks a filter's negotiation reply against the offer.
pub fn check_negotiation(n: &Negotiated) -> Result<(), String> {
    if !(2..=VERSION).contains(&n.version) {
        return Err(format!("protocol version {} not supported", n.version));
    }
    if n.actions & !act::ALL != 0 {
        return Err(format!("actions {:#x} not offered", n.actions & !act::ALL));
    }
    let asked = n.protocol & !proto::MDS;
    if asked & !proto::OFFER != 0 {
        return Err(format!(
            "protocol steps {:#x} not offered",
            asked & !proto::OFFER
        ));
    }
    Ok(())
}

/// `SMFIC_MACRO` for a stage: `pairs` of (name, value); nothing is written when empty.
pub fn macros(out: &mut BytesMut, stage: Stage, pairs: &[(&str, &str)]) {
    let Some((_, code)) = stage.macro_slot() else {
        return;
    };
    if pairs.is_empty() {
        return;
    }
    let at = begin(out, cmd::MACRO);
    out.put_u8(code);
    for (n, v) in pairs {
        put_cstr(out, n.as_bytes());
        put_cstr(out, v.as_bytes());
    }
    finish(out, at);
}

/// `SMFIC_CONNECT`: client host name, family, port and address.
pub fn connect(out: &mut BytesMut, hostname: &str, addr: Option<SocketAddr>) {
    let at = begin(out, cmd::CONNECT);
    put_cstr(out, hostname.as_bytes());
    match addr {
        Some(SocketAddr::V4(a)) => {
            out.put_u8(b'4');
            out.put_u16(a.port());
            put_cstr(out, a.ip().to_string().as_bytes());
        }
        Some(SocketAddr::V6(a)) => {
            out.put_u8(b'6');
            out.put_u16(a.port());
            put_cstr(out, a.ip().to_string().as_bytes());
        }
        None => out.put_u8(b'U'),
    }
    finish(out, at);
}

/// `SMFIC_HELO`.
pub fn helo(out: &mut BytesMut, name: &str) {
    let at = begin(out, cmd::HELO);
    put_cstr(out, name.as_bytes());
    finish(out, at);
}

/// `SMFIC_MAIL` / `SMFIC_RCPT`: `<addr>` then each ESMTP argument.
pub fn envelope_addr(out: &mut BytesMut, command: u8, addr: &str, args: &[&str]) {
    let at = begin(out, command);
    out.put_u8(b'<');
    out.put_slice(addr.replace('\0', " ").as_bytes());
    out.put_u8(b'>');
    out.put_u8(0);
    for a in args {
        put_cstr(out, a.as_bytes());
    }
    finish(out, at);
}

/// `SMFIC_UNKNOWN`: an SMTP command line the MTA did not handle itself.
pub fn unknown(out: &mut BytesMut, line: &str) {
    let at = begin(out, cmd::UNKNOWN);
    put_cstr(out, line.as_bytes());
    finish(out, at);
}

/// A packet with no data (`SMFIC_DATA`, `EOH`, `BODYEOB`, `ABORT`, `QUIT`, `QUIT_NC`).
pub fn bare(out: &mut BytesMut, command: u8) {
    let at = begin(out, command);
    finish(out, at);
}

/// `SMFIC_HEADER`: name and value (unfolded as received: CRLF inside a folded value is
/// sent as LF, the way sendmail and Postfix pass it).
pub fn header(out: &mut BytesMut, name: &[u8], value: &[u8]) {
    let at = begin(out, cmd::HEADER);
    put_cstr(out, name);
    let mut rest = value;
    while let Some(i) = memchr::memmem::find(rest, b"\r\n") {
        put_raw_no_nul(out, &rest[..i]);
        out.put_u8(b'\n');
        rest = &rest[i + 2..];
    }
    put_raw_no_nul(out, rest);
    out.put_u8(0);
    finish(out, at);
}

fn put_raw_no_nul(out: &mut BytesMut, s: &[u8]) {
    if memchr::memchr(0, s).is_none() {
        out.put_slice(s);
    } else {
        out.extend(s.iter().map(|&b| if b == 0 { b' ' } else { b }));
    }
}

/// The 5-byte head of an `SMFIC_BODY` packet carrying `len` (≤ `MAX_BODY_CHUNK`) bytes:
/// the chunk itself is written by the caller straight from the message's slice.
pub fn body_head(len: usize) -> [u8; 5] {
    debug_assert!(len <= MAX_BODY_CHUNK);
    let n = (len as u32 + 1).to_be_bytes();
    [n[0], n[1], n[2], n[3], cmd::BODY]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(code: u8, data: &[u8]) -> BytesMut {
        let mut b = BytesMut::new();
        b.put_u32(data.len() as u32 + 1);
        b.put_u8(code);
        b.put_slice(data);
        b
    }

    #[test]
    fn optneg_bytes() {
        let mut b = BytesMut::new();
        optneg(&mut b);
        assert_eq!(&b[..5], &[0, 0, 0, 13, b'O']);
        assert_eq!(&b[5..9], &6u32.to_be_bytes());
        assert_eq!(&b[9..13], &0x1ffu32.to_be_bytes());
        assert_eq!(b.len(), 17);
    }

    #[test]
    fn decodes_negotiation_with_macro_lists() {
        let mut d = Vec::new();
        d.extend_from_slice(&6u32.to_be_bytes());
        d.extend_from_slice(&(act::ADDHDRS | act::QUARANTINE).to_be_bytes());
        d.extend_from_slice(&(proto::NOHELO | proto::NR_HDR).to_be_bytes());
        d.extend_from_slice(&2u32.to_be_bytes());
        d.extend_from_slice(b"{mail_addr} i\0");
        let mut b = packet(b'O', &d);
        let Some(Response::OptNeg(n)) = Response::decode(&mut b).unwrap() else {
            panic!()
        };
        assert!(b.is_empty());
        check_negotiation(&n).unwrap();
        assert!(!n.sends(Stage::Helo));
        assert!(n.sends(Stage::Mail));
        assert!(!n.replies(Stage::Header));
        assert!(n.replies(Stage::Eom));
        assert!(n.wants_macro(Stage::Mail, "{mail_addr}"));
        assert!(!n.wants_macro(Stage::Mail, "{auth_type}"));
        assert!(n.wants_macro(Stage::Connect, "j"));
        assert!(n.may(act::QUARANTINE) && !n.may(act::CHGBODY));
    }

    #[test]
    fn refuses_unoffered_steps() {
        let n = Negotiated {
            version: 6,
            actions: 0,
            protocol: proto::RCPT_REJ,
            macros: Default::default(),
        };
        assert!(check_negotiation(&n).is_err());
        let n = Negotiated {
            version: 7,
            actions: 0,
            protocol: 0,
            macros: Default::default(),
        };
        assert!(check_negotiation(&n).is_err());
    }

    #[test]
    fn partial_and_bad_packets() {
        let mut b = BytesMut::from(&[0u8, 0, 0][..]);
        assert_eq!(Response::decode(&mut b), Ok(None));
        let mut b = BytesMut::from(&[0u8, 0, 0, 5, b'c'][..]);
        assert_eq!(Response::decode(&mut b), Ok(None));
        let mut b = BytesMut::from(&[0u8, 0, 0, 0][..]);
        assert_eq!(Response::decode(&mut b), Err(DecodeError::Empty));
        let mut b = BytesMut::from(&[0xffu8, 0, 0, 0][..]);
        assert!(matches!(
            Response::decode(&mut b),
            Err(DecodeError::TooLong(_))
        ));
        let mut b = packet(b'Z', b"");
        assert_eq!(Response::decode(&mut b), Err(DecodeError::Unknown(b'Z')));
        let mut b = packet(b'h', b"X-No-Nul");
        assert!(Response::decode(&mut b).is_err());
        let mut b = packet(b'h', b"Bad Name\0v\0");
        assert!(Response::decode(&mut b).is_err());
        let mut b = packet(b'+', b"<a b@c>\0");
        assert!(Response::decode(&mut b).is_err());
    }

    #[test]
    fn two_packets_in_one_read() {
        let mut b = packet(b'h', b"X-Spam\0yes\0");
        b.extend_from_slice(&packet(b'c', b""));
        assert_eq!(
            Response::decode(&mut b).unwrap(),
            Some(Response::AddHeader {
                name: "X-Spam".into(),
                value: "yes".into()
            })
        );
        assert_eq!(Response::decode(&mut b).unwrap(), Some(Response::Continue));
        assert_eq!(Response::decode(&mut b).unwrap(), None);
    }

    #[test]
    fn reply_codes() {
        let r = FilterReply::parse("554 5.7.1 Gtube pattern").unwrap();
        assert_eq!(
            (r.code, r.enhanced.as_str(), r.text.as_str()),
            (554, "5.7.1", "Gtube pattern")
        );
        let r = FilterReply::parse("451 4.7.1 a\r\n451 4.7.1 b\nBcc: x").unwrap();
        assert_eq!(r.text, "a; b; Bcc: x");
        let r = FilterReply::parse("550 2.0.0 odd class").unwrap();
        assert_eq!(r.enhanced, "5.7.1");
        assert_eq!(r.text, "2.0.0 odd class");
        assert!(FilterReply::parse("250 ok").is_err());
        assert!(FilterReply::parse("55").is_err());
        assert!(FilterReply::parse("5500 x").is_err());
        let r = FilterReply::parse("550 5.7.1 caf\u{e9}\u{1b}[31m").unwrap();
        assert_eq!(r.text, "caf? [31m");
        let r = FilterReply::parse("421").unwrap();
        assert_eq!((r.code, r.enhanced.as_str()), (421, "4.7.1"));
    }

    #[test]
    fn encodes_commands() {
        let mut b = BytesMut::new();
        connect(
            &mut b,
            "mx.example",
            Some("192.0.2.1:2525".parse().unwrap()),
        );
        assert_eq!(&b[4..], b"Cmx.example\x004\x09\xdd192.0.2.1\0");
        b.clear();
        envelope_addr(&mut b, cmd::MAIL, "a@b", &["SIZE=10"]);
        assert_eq!(&b[4..], b"M<a@b>\0SIZE=10\0");
        b.clear();
        header(&mut b, b"Subject", b"one\r\n two");
        assert_eq!(&b[4..], b"LSubject\0one\n two\0");
        b.clear();
        macros(
            &mut b,
            Stage::Connect,
            &[("j", "mx"), ("{daemon_name}", "tern")],
        );
        assert_eq!(&b[4..], b"DCj\0mx\0{daemon_name}\0tern\0");
        assert_eq!(&b[..4], &((b.len() - 4) as u32).to_be_bytes());
        assert_eq!(body_head(3), [0, 0, 0, 4, b'B']);
    }
}

#[cfg(test)]
mod prop {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any bytes a filter sends: decoded or refused, never a panic, never more
        /// consumed than there is.
        #[test]
        fn decode_never_panics(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut b = BytesMut::from(&data[..]);
            for _ in 0..10 {
                match Response::decode(&mut b) {
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
        }

        /// Whatever a filter's reply text holds, the SMTP reply made of it is one line of
        /// printable ASCII with a 4xx/5xx code.
        #[test]
        fn replies_are_safe(raw in "[45][0-9][0-9][ -]\\PC{0,60}(\r?\n\\PC{0,30}){0,3}") {
            if let Ok(r) = FilterReply::parse(&raw) {
                prop_assert!((400..600).contains(&r.code));
                prop_assert!(r.text.bytes().all(|b| (b' '..=b'~').contains(&b)));
                prop_assert!(r.enhanced.bytes().all(|b| b.is_ascii_digit() || b == b'.'));
            }
        }
    }
}
