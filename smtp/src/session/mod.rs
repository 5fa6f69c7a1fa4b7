//! The SMTP session state machine (RFC 5321 with ESMTP extensions), free of I/O.
//!
//! A `Session` is fed the bytes a client sent (`process`) and appends replies to an output
//! buffer; it tells the connection driver what to do next through an `Event`: read more,
//! make a finished message durable (then call `stored`), start TLS (then call
//! `tls_started`), or close. Because it never touches a socket, a file or a clock (the
//! caller passes [`Now`]) it can be driven by a TCP connection, by `tern stdio`, by a
//! fuzzer, or by a test, identically. What it reports (refusals, AUTH results) and asks
//! (is this address blocked?) goes through [`SessionHooks`].
//!
//! Owns: the command/transaction state, limits (line lengths, recipients, size, error
//! count), relay decisions per RCPT, and the DATA/BDAT body as a list of `Bytes` slices of
//! the receive buffer. Must never: block, allocate per body line, answer a command that
//! arrived before a STARTTLS after the upgrade, or end DATA on anything but CRLF.CRLF.

pub mod command;
pub mod data;
pub mod reply;

use std::cell::{OnceCell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use memchr::{memchr, memchr2};

use crate::envelope::{BodyType, DeliverBy, DeliverByMode, Envelope, Recipient, Ret};
use crate::hooks::{AuthAttempt, Now, Reject, Rejection, SessionHooks};
use crate::policy::RelayPolicy;
use crate::sasl::nonces::NonceCache;
use crate::sasl::{self, AuthContext, AuthFailure, ClientLine, Exchange, Mechanism, Step};
use crate::users::UserDb;
use command::{Body, Command, ParseError};
use data::{BodyFlaws, Coalescer, DataScanner, Scan};

/// The role of the listener a session arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    /// Port 25: relay between MTAs, STARTTLS offered.
    Smtp,
    /// Port 587 (RFC 6409): message submission, STARTTLS offered.
    Submission,
    /// Port 465 (RFC 8314): implicit TLS.
    Smtps,
}

impl ListenerKind {
    pub fn name(self) -> &'static str {
        match self {
            ListenerKind::Smtp => "smtp",
            ListenerKind::Submission => "submission",
            ListenerKind::Smtps => "smtps",
        }
    }
}

/// Commands that move no mail (HELO/EHLO, NOOP, RSET, VRFY, HELP, ETRN) allowed between
/// two accepted messages; the next one is answered `421 4.7.0` and the session closes.
/// Like Postfix's `smtpd_junk_command_limit` (also 100): a client trickling NOOPs (or any
/// such loop) cannot hold a connection forever, while every accepted message resets it.
pub const MAX_JUNK_COMMANDS: u32 = 100;

/// The service extensions every EHLO reply lists, in order (`SIZE` with the limit after
/// it); `AUTH` and `STARTTLS` follow when they apply. `tern features` prints the same list.
pub const EHLO_EXTENSIONS: [&str; 11] = [
    "PIPELINING",
    "SIZE",
    "ENHANCEDSTATUSCODES",
    "8BITMIME",
    "DSN",
    "DELIVERBY",
    "CHUNKING",
    "BINARYMIME",
    "SMTPUTF8",
    "ETRN",
    "HELP",
];

/// Limits a session enforces; copied from the configuration.
#[derive(Debug, Clone)]
pub struct SessionLimits {
    pub command_line: usize,
    pub text_line: usize,
    pub message_size: u64,
    pub recipients: usize,
    pub errors: u32,
}

/// Everything a session needs to know about where it runs. One per listener per shard,
/// shared by that listener's sessions (immutable).
pub struct SessionConfig {
    pub hostname: String,
    pub kind: ListenerKind,
    pub limits: SessionLimits,
    /// Whether STARTTLS can be offered (a certificate is loaded).
    pub tls_available: bool,
    pub policy: RelayPolicy,
    /// SMTP AUTH (RFC 4954); None when no mechanism is configured.
    pub auth: Option<AuthSetup>,
    /// The host: counters, logs, cross-shard AUTH-failure blocks.
    pub hooks: Rc<dyn SessionHooks>,
    /// The EHLO replies without and with TLS, built on first use and then copied out as
    /// they are (the EHLO reply depends only on this configuration and the TLS state).
    pub ehlo_cache: EhloCache,
}

impl std::fmt::Debug for SessionConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionConfig")
            .field("hostname", &self.hostname)
            .field("kind", &self.kind)
            .field("limits", &self.limits)
            .field("tls_available", &self.tls_available)
            .field("auth", &self.auth)
            .finish_non_exhaustive()
    }
}

/// The two EHLO replies of a [`SessionConfig`] (before and after TLS), built once.
#[derive(Debug, Default)]
pub struct EhloCache {
    plain: OnceCell<Bytes>,
    tls: OnceCell<Bytes>,
}

/// AUTH settings of a listener, plus the shard's SASL state.
#[derive(Debug)]
pub struct AuthSetup {
    pub mechanisms: Vec<Mechanism>,
    /// Mechanisms trusted for relaying (TRUST_AUTH_MECH).
    pub relay_mechanisms: Vec<Mechanism>,
    pub allow_plaintext_without_tls: bool,
    pub allow_authzid: bool,
    pub max_failures: u32,
    pub tarpit: Duration,
    /// AUTH required before MAIL on this listener (530 5.7.0).
    pub required: bool,
    /// `auth.sender_policy = "own"`: an authenticated MAIL FROM must be owned by the login
    /// (`crate::sender`), else 553 5.7.1.
    pub sender_own: bool,
    /// `auth.check_header_from`: the ownership rule for the From: addresses of messages
    /// from authenticated sessions (550 5.7.1), whatever `sender_own` says.
    pub check_header_from: bool,
    pub realm: String,
    pub shared: Rc<AuthShared>,
}

/// The shard's SASL state: the user store snapshot (swapped whole on reload) and the
/// shard's challenge/nonce cache. Shard-local (Rc/RefCell): never crosses threads.
pub struct AuthShared {
    pub users: RefCell<Arc<UserDb>>,
    pub nonces: RefCell<NonceCache>,
    /// `auth.sender_map` snapshot (swapped whole on reload).
    pub senders: RefCell<Arc<crate::sender::SenderMap>>,
}

impl std::fmt::Debug for AuthShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AuthShared {{ users: {} }}", self.users.borrow().len())
    }
}

/// What the driver must do after `process` returns.
#[derive(Debug)]
pub enum Event {
    /// Every complete command in the input was handled; read more input (after flushing).
    NeedInput,
    /// A message is complete: make it durable, then call `Session::stored`.
    Message(Box<Message>),
    /// STARTTLS was accepted ("220" is in the output): flush, discard all buffered input,
    /// run the TLS handshake, then call `Session::tls_started`.
    StartTls,
    /// Flush the output and close the connection.
    Close,
    /// ETRN (RFC 1985) for this node: start a queue run, then call `Session::etrn_started`
    /// with how many messages were scheduled.
    Etrn(String),
    /// A command the session accepted, which content filters must see before it is
    /// answered (only after `filter_commands`): ask them, then call `Session::checked`.
    /// No input is consumed meanwhile.
    Check(Check),
}

/// What `Event::Check` asks the filters about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    Helo(String),
    Mail(String),
    Rcpt(String),
}

/// A finished message, ready for the spool. `envelope.id` is empty: the spool assigns it.
/// The Received: header's facts come from the envelope itself (HELO name, client
/// address, arrival time), so nothing is stored twice.
#[derive(Debug)]
pub struct Message {
    pub envelope: Envelope,
    pub body: Vec<Bytes>,
    /// RFC 3848 "with" keyword for the Received: header.
    protocol: &'static str,
    peer: SocketAddr,
    /// The session had authenticated (AUTH) when the message was sent.
    authenticated: bool,
    /// The client is in `relay.trusted_networks`.
    trusted: bool,
}

impl Message {
    /// Builds the Received: trace header (RFC 5321 §4.4) for queue id `id`. It becomes the
    /// first body slice, so prepending it copies nothing of the body; it is written into
    /// one buffer, with no intermediate strings.
    pub fn received_header(&self, hostname: &str, id: &str) -> Bytes {
        let e = &self.envelope;
        let mut h = BytesMut::with_capacity(160 + hostname.len() + e.client_helo.len());
        h.put_slice(b"Received: from ");
        put_sanitized(&mut h, &e.client_helo);
        h.put_slice(b" ([");
        let _ = std::fmt::Write::write_fmt(
            &mut BytesWriter(&mut h),
            format_args!("{}", self.peer.ip()),
        );
        h.put_slice(b"])\r\n\tby ");
        h.put_slice(hostname.as_bytes());
        h.put_slice(b" (tern) with ");
        h.put_slice(self.protocol.as_bytes());
        h.put_slice(b" id ");
        h.put_slice(id.as_bytes());
        if let [r] = e.recipients.as_slice() {
            h.put_slice(b"\r\n\tfor <");
            put_sanitized(&mut h, &r.addr);
            h.put_u8(b'>');
        }
        h.put_slice(b";\r\n\t");
        crate::date::rfc5322(&mut h, e.arrival_unix_micros / 1_000_000);
        h.put_slice(b"\r\n");
        h.freeze()
    }

    /// Whether the session had authenticated when the message was sent (whatever MAIL
    /// AUTH= said: `envelope.auth` may be `None` after `AUTH=<>`).
    pub fn authenticated(&self) -> bool {
        self.authenticated
    }

    /// Whether the client is in the relay policy's trusted networks.
    pub fn trusted(&self) -> bool {
        self.trusted
    }

    /// Prepends a header field (complete, CRLF-terminated: a `DKIM-Signature:`) as one
    /// more body slice, and counts it in the size. Copies nothing of the body.
    pub fn prepend_header(&mut self, field: Bytes) {
        self.envelope.size += field.len() as u64;
        self.body.insert(0, field);
    }

    /// Prepends the Received: header to the body and records the final size and id.
    pub fn finish(&mut self, hostname: &str, id: &str) {
        let hdr = self.received_header(hostname, id);
        self.envelope.size += hdr.len() as u64;
        self.envelope.id.clear();
        self.envelope.id.push_str(id);
        self.body.insert(0, hdr);
    }
}

/// `fmt::Write` into a `BytesMut` (an IP address formats without a temporary String).
struct BytesWriter<'a>(&'a mut BytesMut);

impl std::fmt::Write for BytesWriter<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.put_slice(s.as_bytes());
        Ok(())
    }
}

/// Keeps client-supplied text in a header to printable ASCII: CR, LF and anything else
/// that could break or forge header structure becomes '?' (per character, so a multi-byte
/// UTF-8 character becomes one '?').
fn put_sanitized(h: &mut BytesMut, s: &str) {
    for c in s.chars() {
        if c.is_ascii_graphic() && c != '(' && c != ')' {
            h.put_u8(c as u8);
        } else {
            h.put_u8(b'?');
        }
    }
}

/// Why the spool could not take a message; chooses the reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreError {
    /// No space (or over the high-water mark): 452 4.3.1.
    Full,
    /// Any other local failure (I/O, fsync): 451 4.3.0. Never 250.
    Local,
}

#[derive(Debug)]
enum State {
    Command,
    Data(DataScanner),
    Bdat {
        remaining: u64,
        last: bool,
        chunk: u64,
        /// The reply owed once the chunk is consumed, if the BDAT itself was refused.
        refused: Option<(u16, &'static str, &'static str)>,
    },
    /// A message was handed to the driver; waiting for `stored`.
    Storing,
    /// A command waits for the filters' verdict (`checked`); its reply is not written yet.
    Checking(CheckKind),
    /// An AUTH exchange is waiting for the client's next response line.
    Auth(Box<Exchange>),
    /// Authenticated; the server-final 334 was sent and the client's (empty) reply is due.
    AuthFinal {
        identity: String,
        mech: Mechanism,
    },
    Closed,
}

/// Which command waits in `State::Checking`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CheckKind {
    Helo,
    Ehlo,
    Mail,
    Rcpt,
}

#[derive(Debug)]
struct Transaction {
    sender: String,
    body_type: Body,
    smtputf8: bool,
    ret: Option<Ret>,
    envid: Option<String>,
    by: Option<DeliverBy>,
    auth: Option<String>,
    rcpts: Vec<Recipient>,
    rcpt_attempts: u32,
    body: Vec<Bytes>,
    /// Keeps `body` from becoming a long list of tiny slices (see `data::Coalescer`).
    coalesce: Coalescer,
    bdat_size: u64,
    bdat_oversize: bool,
    /// A BDAT chunk carried a NUL (checked as each piece arrives; see `bdat_last`).
    bdat_nul: bool,
    bdat_used: bool,
}

/// One SMTP session. Created per connection by the driver; see the module docs.
pub struct Session {
    cfg: Rc<SessionConfig>,
    peer: SocketAddr,
    tls: bool,
    helo: Option<String>,
    esmtp: bool,
    authenticated: Option<String>,
    /// The SASL mechanism of the successful AUTH (milter's `{auth_type}`).
    auth_mechanism: Option<&'static str>,
    /// Whether the mechanism used is trusted for relaying (TRUST_AUTH_MECH).
    auth_trusted: bool,
    txn: Option<Transaction>,
    state: State,
    errors: u32,
    /// Discarding the rest of an over-long command line until its LF.
    discarding: bool,
    messages: u32,
    auth_failures: u32,
    /// Tarpit owed before the next flush (set after a failed AUTH).
    delay: Option<Duration>,
    /// Commands since the last accepted message that moved no mail (see
    /// [`MAX_JUNK_COMMANDS`]).
    junk: u32,
    /// Content filters see HELO/MAIL/RCPT before they are answered (`Event::Check`).
    filter_commands: bool,
    /// The check the last command asked for.
    pending_check: Option<Check>,
    /// See [`Session::set_output_limit`].
    out_limit: Option<usize>,
    /// `process` stopped because `out` reached `out_limit` with input left.
    output_full: bool,
    /// The time of the current `process` call (see [`Now`]).
    now: Now,
    /// The login tried in the AUTH exchange under way (for the failure's log line).
    auth_login: Option<String>,
}

impl Session {
    pub fn new(cfg: Rc<SessionConfig>, peer: SocketAddr, tls: bool, now: Now) -> Self {
        Session {
            now,
            auth_login: None,
            cfg,
            peer,
            tls,
            helo: None,
            esmtp: false,
            authenticated: None,
            auth_mechanism: None,
            auth_trusted: false,
            txn: None,
            state: State::Command,
            errors: 0,
            discarding: false,
            messages: 0,
            auth_failures: 0,
            delay: None,
            junk: 0,
            filter_commands: false,
            pending_check: None,
            out_limit: None,
            output_full: false,
        }
    }

    /// Bounds the replies one `process` call appends: once `out` holds `limit` octets or
    /// more and input is left, `process` returns `Event::NeedInput` early and
    /// [`Session::take_output_full`] says so; the driver then writes `out` and calls
    /// `process` again before reading. Without it a client pipelining short commands that
    /// earn long replies (EHLO) and never reading them would make one read of input cost
    /// a reply buffer ~30 times its size. Off by default (tests, stdio).
    pub fn set_output_limit(&mut self, limit: usize) {
        self.out_limit = Some(limit);
    }

    /// True (once) if the last `process` call stopped because the output limit was reached.
    pub fn take_output_full(&mut self) -> bool {
        std::mem::take(&mut self.output_full)
    }

    /// The 220 greeting (RFC 5321 §4.2: no enhanced code).
    pub fn greeting(&self, out: &mut BytesMut) {
        reply::plain(out, 220, &format!("{} ESMTP tern", self.cfg.hostname));
    }

    /// True while a mail transaction is open (MAIL given and not yet finished or reset).
    pub fn in_transaction(&self) -> bool {
        self.txn.is_some() || !matches!(self.state, State::Command | State::Closed)
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// A delay the driver must wait before sending the pending replies (AUTH tarpit).
    pub fn take_delay(&mut self) -> Option<Duration> {
        self.delay.take()
    }

    /// The authenticated identity, if any.
    pub fn authenticated(&self) -> Option<&str> {
        self.authenticated.as_deref()
    }

    /// The login and its SASL mechanism, once AUTH succeeded (milter macros).
    pub fn login(&self) -> Option<(&str, &'static str)> {
        Some((
            self.authenticated.as_deref()?,
            self.auth_mechanism.unwrap_or(""),
        ))
    }

    /// The client's address (after a PROXY header: the real client).
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// From now on HELO/EHLO, MAIL and RCPT wait for the content filters
    /// (`Event::Check`, then `checked`) before they are answered.
    pub fn filter_commands(&mut self) {
        self.filter_commands = true;
    }

    /// The filters' verdict on the command `Event::Check` named: None writes the reply
    /// the session had for it; a refusal (4xx/5xx, text made safe by the caller) undoes
    /// the command (no HELO, no transaction, no recipient) and is logged and counted
    /// like every refusal.
    pub fn checked(&mut self, refusal: Option<(u16, &str, &str)>, out: &mut BytesMut) {
        let State::Checking(kind) = self.state else {
            return;
        };
        self.state = State::Command;
        match (kind, refusal) {
            (CheckKind::Helo, None) => reply::plain(out, 250, &self.cfg.hostname),
            (CheckKind::Ehlo, None) => self.ehlo_reply(out),
            (CheckKind::Mail, None) => reply::line(out, 250, "2.1.0", "Ok"),
            (CheckKind::Rcpt, None) => reply::line(out, 250, "2.1.5", "Ok"),
            (CheckKind::Helo | CheckKind::Ehlo, Some((code, enh, text))) => {
                self.refuse(out, Reject::Milter, "HELO", None, code, enh, text);
                self.helo = None;
            }
            (CheckKind::Mail, Some((code, enh, text))) => {
                self.refuse(out, Reject::Milter, "MAIL", None, code, enh, text);
                self.txn = None;
            }
            (CheckKind::Rcpt, Some((code, enh, text))) => {
                let rcpt = self.txn.as_mut().and_then(|t| t.rcpts.pop());
                self.refuse(
                    out,
                    Reject::Milter,
                    "RCPT",
                    rcpt.as_ref().map(|r| r.addr.as_str()),
                    code,
                    enh,
                    text,
                );
            }
        }
    }

    /// Messages accepted in this session (for the disconnect log line).
    pub fn messages(&self) -> u32 {
        self.messages
    }

    /// Idle timeout expired: 421 4.4.2 and close (RFC 5321 §4.5.3.2).
    pub fn timeout(&mut self, out: &mut BytesMut) {
        reply::line(
            out,
            421,
            "4.4.2",
            &format!("{} Error: timeout exceeded", self.cfg.hostname),
        );
        self.state = State::Closed;
    }

    /// Server shutting down: 421 4.3.2 and close.
    pub fn shutdown(&mut self, out: &mut BytesMut) {
        reply::line(
            out,
            421,
            "4.3.2",
            &format!(
                "{} Service shutting down, closing channel",
                self.cfg.hostname
            ),
        );
        self.state = State::Closed;
    }

    /// The TLS handshake after STARTTLS finished: RFC 3207 §4.2 says to forget everything
    /// learned from the client before it, including the EHLO.
    pub fn tls_started(&mut self) {
        self.tls = true;
        self.helo = None;
        self.esmtp = false;
        self.authenticated = None;
        self.auth_trusted = false;
        self.txn = None;
        self.state = State::Command;
    }

    /// Result of making the last `Event::Message` durable.
    pub fn stored(&mut self, result: Result<&str, StoreError>, out: &mut BytesMut) {
        if !matches!(self.state, State::Storing) {
            return;
        }
        self.state = State::Command;
        match result {
            Ok(id) => {
                self.messages += 1;
                self.junk = 0;
                reply::line_parts(out, 250, "2.0.0", &["Ok: queued as ", id]);
            }
            Err(e) => {
                let (code, enh, text) = match e {
                    StoreError::Full => {
                        (452, "4.3.1", "Insufficient system storage, try again later")
                    }
                    StoreError::Local => {
                        (451, "4.3.0", "Local error in processing, try again later")
                    }
                };
                self.refuse(out, Reject::Storage, "DATA", None, code, enh, text);
            }
        }
    }

    /// The answer to the last `Event::Message` when a content filter (milter) decided it
    /// instead of the spool: a 2xx accepts it (a discarded message is answered like a
    /// stored one, as sendmail and Postfix do), a 4xx/5xx refuses it (counted and logged
    /// through the hooks like every refusal). The text is the caller's, already made safe.
    /// `envelope` is the message's (for the log line: sender, the recipient if one).
    pub fn filtered(
        &mut self,
        code: u16,
        enhanced: &str,
        text: &str,
        envelope: &Envelope,
        out: &mut BytesMut,
    ) {
        if !matches!(self.state, State::Storing) {
            return;
        }
        self.state = State::Command;
        if code < 400 {
            self.messages += 1;
            self.junk = 0;
            reply::line(out, code, enhanced, text);
            return;
        }
        self.cfg.hooks.rejected(&Rejection {
            why: Reject::Milter,
            peer: self.peer,
            stage: "END-OF-MESSAGE",
            code,
            enhanced,
            text,
            sender: Some(envelope.sender.as_str()),
            recipient: match envelope.recipients.as_slice() {
                [r] => Some(r.addr.as_str()),
                _ => None,
            },
            helo: self.helo.as_deref(),
        });
        self.error(out, code, enhanced, text);
    }

    /// Handles all complete input, at time `now`. See `Event` for what the driver does
    /// next.
    pub fn process(&mut self, input: &mut BytesMut, out: &mut BytesMut, now: Now) -> Event {
        self.now = now;
        loop {
            if self.out_limit.is_some_and(|l| out.len() >= l)
                && !input.is_empty()
                && !matches!(
                    self.state,
                    State::Closed | State::Storing | State::Checking(_)
                )
            {
                self.output_full = true;
                return Event::NeedInput;
            }
            match &mut self.state {
                State::Closed => return Event::Close,
                State::Storing | State::Checking(_) => return Event::NeedInput,
                State::Auth(_) | State::AuthFinal { .. } => {
                    let Some(line) = self.next_line(input, out, sasl::MAX_LINE + 2) else {
                        if matches!(self.state, State::Closed) {
                            return Event::Close;
                        }
                        if matches!(self.state, State::Command) {
                            // A refused line ended the exchange; what follows is commands.
                            continue;
                        }
                        return Event::NeedInput;
                    };
                    self.auth_response(&line[..line.len() - 2], out);
                    if let Some(ev) = self.closed_event() {
                        return ev;
                    }
                }
                State::Command => {
                    // AUTH may carry an initial response up to 12288 octets (RFC 4954 §4);
                    // other commands are held to the command-line limit in `command`.
                    let limit = self.cfg.limits.command_line.max(sasl::MAX_LINE + 2);
                    let Some(line) = self.next_line(input, out, limit) else {
                        if matches!(self.state, State::Closed) {
                            return Event::Close;
                        }
                        return Event::NeedInput;
                    };
                    if let Some(ev) = self.command(&line, out) {
                        return ev;
                    }
                }
                State::Data(scanner) => {
                    let Some(txn) = self.txn.as_mut() else {
                        self.state = State::Command;
                        continue;
                    };
                    let scan = scanner.feed(input, &mut txn.body);
                    txn.coalesce.absorb(&mut txn.body);
                    match scan {
                        Scan::More => return Event::NeedInput,
                        Scan::End(flaws) => {
                            let size = scanner.size();
                            if let Some(ev) = self.end_of_data(flaws, size, out) {
                                return ev;
                            }
                        }
                    }
                }
                State::Bdat {
                    remaining,
                    last,
                    chunk,
                    refused,
                } => {
                    if *remaining > 0 {
                        let n = (*remaining).min(input.len() as u64) as usize;
                        if n == 0 {
                            return Event::NeedInput;
                        }
                        let piece = input.split_to(n).freeze();
                        *remaining -= n as u64;
                        if refused.is_none() {
                            if let Some(txn) = self.txn.as_mut() {
                                if txn.bdat_size + n as u64 > self.cfg.limits.message_size {
                                    txn.bdat_oversize = true;
                                    txn.body.clear();
                                }
                                txn.bdat_size += n as u64;
                                if !txn.bdat_oversize {
                                    txn.bdat_nul |= memchr(0, &piece).is_some();
                                    txn.body.push(piece);
                                    txn.coalesce.absorb(&mut txn.body);
                                }
                            }
                        }
                        if *remaining > 0 {
                            return Event::NeedInput;
                        }
                    }
                    let (last, chunk, refused) = (*last, *chunk, *refused);
                    self.state = State::Command;
                    if let Some(ev) = self.end_of_chunk(last, chunk, refused, out) {
                        return ev;
                    }
                }
            }
        }
    }

    /// Takes the next complete command line out of `input`, answering over-long lines and
    /// lines with bare CR/LF or NUL itself. Returns None when more input is needed.
    fn next_line(
        &mut self,
        input: &mut BytesMut,
        out: &mut BytesMut,
        limit: usize,
    ) -> Option<BytesMut> {
        loop {
            // Only CRLF ends a command line; a LF without CR before it is part of the line
            // (and makes it invalid), so "NOOP\nNOOP\r\n" is one bad line, not two commands.
            let mut from = 0;
            let mut bare_lf = false;
            let end = loop {
                match memchr(b'\n', &input[from..]) {
                    Some(p) => {
                        let nl = from + p;
                        if nl > 0 && input[nl - 1] == b'\r' {
                            break Some(nl);
                        }
                        bare_lf = true;
                        from = nl + 1;
                    }
                    None => break None,
                }
            };
            let Some(nl) = end else {
                if input.len() >= limit {
                    // Keep memory bounded: drop what we have, answer when the CRLF arrives.
                    self.discarding = true;
                    input.clear();
                }
                return None;
            };
            let line = input.split_to(nl + 1);
            let refusal = if self.discarding || line.len() > limit {
                self.discarding = false;
                "Error: line too long"
            } else if bare_lf {
                "Error: bare <LF> received; lines must end with <CR><LF>"
            } else if memchr2(b'\r', 0, &line[..nl - 1]).is_some() {
                "Error: bare <CR> or NUL in command"
            } else {
                return Some(line);
            };
            // RFC 4954 §4: a 500 to an AUTH response line ends the exchange, and the client
            // reads it so; staying in the exchange would take its next command for a response.
            let ends_auth = matches!(self.state, State::Auth(_) | State::AuthFinal { .. });
            if ends_auth {
                self.state = State::Command;
            }
            self.error(out, 500, "5.5.2", refusal);
            if ends_auth || matches!(self.state, State::Closed) {
                return None;
            }
        }
    }

    /// Counts a negative reply; past the limit the session ends with 421 4.7.0.
    fn error(&mut self, out: &mut BytesMut, code: u16, enh: &str, text: &str) {
        reply::line(out, code, enh, text);
        self.errors += 1;
        if self.errors >= self.cfg.limits.errors {
            reply::line(
                out,
                421,
                "4.7.0",
                &format!("{} Error: too many errors", self.cfg.hostname),
            );
            self.state = State::Closed;
        }
    }

    fn parse_error(&mut self, e: ParseError, verb_is_rcpt: bool, out: &mut BytesMut) {
        match e {
            ParseError::UnknownVerb => {
                self.error(out, 500, "5.5.1", "Error: command not recognized")
            }
            ParseError::Syntax(why) => {
                self.error(out, 501, "5.5.2", &format!("Syntax error: {why}"))
            }
            ParseError::BadParam(why) => self.error(out, 501, "5.5.4", &format!("Error: {why}")),
            ParseError::UnknownParam => {
                self.error(out, 555, "5.5.4", "Error: unsupported MAIL/RCPT parameter")
            }
            ParseError::BadAddress(why) => {
                let enh = if verb_is_rcpt { "5.1.3" } else { "5.1.7" };
                self.error(out, 501, enh, &format!("Bad address syntax: {why}"))
            }
            ParseError::NonAscii => self.error(
                out,
                553,
                "5.6.7",
                "Error: non-ASCII address requires SMTPUTF8",
            ),
        }
    }

    fn command(&mut self, line: &[u8], out: &mut BytesMut) -> Option<Event> {
        let text = &line[..line.len() - 2];
        if line.len() > self.cfg.limits.command_line
            && !(text.len() > 5 && text[..5].eq_ignore_ascii_case(b"AUTH "))
        {
            self.error(out, 500, "5.5.2", "Error: line too long");
            return self.closed_event();
        }
        let cmd = match command::parse(text) {
            Ok(c) => c,
            Err(e) => {
                let is_rcpt = text.len() >= 4 && text[..4].eq_ignore_ascii_case(b"RCPT");
                self.parse_error(e, is_rcpt, out);
                return self.closed_event();
            }
        };
        let junk = matches!(
            cmd,
            Command::Helo(_)
                | Command::Ehlo(_)
                | Command::Noop
                | Command::Rset
                | Command::Vrfy
                | Command::Help
                | Command::Etrn(_)
        );
        if junk {
            self.junk += 1;
            if self.junk > MAX_JUNK_COMMANDS {
                reply::line(
                    out,
                    421,
                    "4.7.0",
                    &format!(
                        "{} Error: too many commands without a message",
                        self.cfg.hostname
                    ),
                );
                self.state = State::Closed;
                return Some(Event::Close);
            }
        }
        match cmd {
            Command::Helo(name) => {
                self.reset_transaction();
                self.helo = Some(name.to_string());
                self.esmtp = false;
                if self.filter_commands {
                    self.state = State::Checking(CheckKind::Helo);
                    return Some(Event::Check(Check::Helo(name.to_string())));
                }
                reply::plain(out, 250, &self.cfg.hostname);
            }
            Command::Ehlo(name) => {
                self.reset_transaction();
                self.helo = Some(name.to_string());
                self.esmtp = true;
                if self.filter_commands {
                    self.state = State::Checking(CheckKind::Ehlo);
                    return Some(Event::Check(Check::Helo(name.to_string())));
                }
                self.ehlo_reply(out);
            }
            Command::Mail(m) => {
                self.mail(m, out);
                if let Some(c) = self.pending_check.take() {
                    return Some(Event::Check(c));
                }
            }
            Command::Rcpt(r) => {
                self.rcpt(r, out);
                if let Some(c) = self.pending_check.take() {
                    return Some(Event::Check(c));
                }
            }
            Command::Data => return self.data(out),
            Command::Bdat { size, last } => self.bdat(size, last),
            Command::Rset => {
                self.reset_transaction();
                reply::line(out, 250, "2.0.0", "Ok");
            }
            Command::Noop => reply::line(out, 250, "2.0.0", "Ok"),
            Command::Quit => {
                reply::line(out, 221, "2.0.0", "Bye");
                self.state = State::Closed;
                return Some(Event::Close);
            }
            Command::Vrfy => reply::line(
                out,
                252,
                "2.5.2",
                "Cannot VRFY user, but will accept message and attempt delivery",
            ),
            Command::Expn => self.error(out, 502, "5.5.1", "Error: EXPN not supported"),
            Command::Help => reply::multi(
                out,
                214,
                Some("2.0.0"),
                &[
                    "This is tern, an ESMTP relay and submission server",
                    "Commands: HELO EHLO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS AUTH ETRN",
                    "See RFC 5321 and the tern README",
                    "End of HELP info",
                ],
            ),
            Command::StartTls => return self.starttls(out),
            Command::Auth { mechanism, initial } => self.auth(mechanism, initial, out),
            Command::Etrn(node) => return self.etrn(node, out),
        }
        self.closed_event()
    }

    fn closed_event(&self) -> Option<Event> {
        matches!(self.state, State::Closed).then_some(Event::Close)
    }

    fn reset_transaction(&mut self) {
        self.txn = None;
    }

    fn ehlo_reply(&self, out: &mut BytesMut) {
        let cache = if self.tls {
            &self.cfg.ehlo_cache.tls
        } else {
            &self.cfg.ehlo_cache.plain
        };
        out.put_slice(cache.get_or_init(|| {
            let mut b = BytesMut::new();
            self.build_ehlo_reply(&mut b);
            b.freeze()
        }));
    }

    fn build_ehlo_reply(&self, out: &mut BytesMut) {
        let size = format!("SIZE {}", self.cfg.limits.message_size);
        let mut lines: Vec<&str> = vec![&self.cfg.hostname];
        lines.extend(
            EHLO_EXTENSIONS
                .iter()
                .map(|&e| if e == "SIZE" { size.as_str() } else { e }),
        );
        let auth_line;
        if let Some(a) = &self.cfg.auth {
            let offered: Vec<&str> = a
                .mechanisms
                .iter()
                .filter(|m| self.tls || a.allow_plaintext_without_tls || !m.is_plaintext())
                .map(|m| m.name())
                .collect();
            if !offered.is_empty() {
                auth_line = format!("AUTH {}", offered.join(" "));
                lines.push(&auth_line);
            }
        }
        if !self.tls && self.cfg.tls_available {
            lines.push("STARTTLS");
        }
        reply::multi(out, 250, None, &lines);
    }

    fn mail(&mut self, m: command::MailFrom<'_>, out: &mut BytesMut) {
        if self.helo.is_none() {
            return self.error(out, 503, "5.5.1", "Error: send HELO/EHLO first");
        }
        if self.txn.is_some() {
            return self.error(out, 503, "5.5.1", "Error: nested MAIL command");
        }
        if self.authenticated.is_none() && self.cfg.auth.as_ref().is_some_and(|a| a.required) {
            return self.refuse(
                out,
                Reject::AuthRequired,
                "MAIL",
                None,
                530,
                "5.7.0",
                "Authentication required",
            );
        }
        let has_params = m.size.is_some()
            || m.body.is_some()
            || m.smtputf8
            || m.ret.is_some()
            || m.envid.is_some()
            || m.by.is_some()
            || m.auth.is_some();
        if has_params && !self.esmtp {
            // Parameters are service extensions, which HELO did not negotiate.
            return self.error(out, 555, "5.5.4", "Error: parameters require EHLO");
        }
        if m.size.is_some_and(|s| s > self.cfg.limits.message_size) {
            return self.refuse(
                out,
                Reject::Size,
                "MAIL",
                None,
                552,
                "5.3.4",
                "Error: message size exceeds fixed limit",
            );
        }
        if let Some(login) = self.sender_not_owned(m.path) {
            let text = format!("<{}>: sender address not owned by user {login}", m.path);
            return self.refuse(
                out,
                Reject::SenderNotOwned,
                "MAIL",
                None,
                553,
                "5.7.1",
                &text,
            );
        }
        // Per-login sending rate (temporary: the client retries later, never a bounce).
        if let Some(login) = self.authenticated.as_deref() {
            if !self.cfg.hooks.user_message(login) {
                let text = format!("Error: too many messages from user {login}, try again later");
                return self.refuse(out, Reject::UserRate, "MAIL", None, 450, "4.7.1", &text);
            }
        }
        // RFC 4954 §5: AUTH= is honoured only from an authenticated client; otherwise it is
        // accepted and ignored (the identity becomes <>).
        let auth = match (&self.authenticated, m.auth) {
            (Some(_), Some(a)) if a != "<>" => Some(command::decode_xtext(a)),
            (Some(user), None) => Some(user.clone()),
            _ => None,
        };
        self.txn = Some(Transaction {
            sender: m.path.to_string(),
            body_type: m.body.unwrap_or(Body::SevenBit),
            smtputf8: m.smtputf8,
            ret: m.ret,
            envid: m.envid.map(command::decode_xtext),
            by: m.by.map(|b| DeliverBy {
                seconds: b.seconds,
                mode: if b.return_mode {
                    DeliverByMode::Return
                } else {
                    DeliverByMode::Notify
                },
                trace: b.trace,
            }),
            auth,
            rcpts: Vec::new(),
            rcpt_attempts: 0,
            body: Vec::new(),
            coalesce: Coalescer::default(),
            bdat_size: 0,
            bdat_oversize: false,
            bdat_nul: false,
            bdat_used: false,
        });
        if self.filter_commands {
            self.state = State::Checking(CheckKind::Mail);
            self.pending_check = Some(Check::Mail(m.path.to_string()));
            return;
        }
        reply::line(out, 250, "2.1.0", "Ok");
    }

    fn rcpt(&mut self, r: command::RcptTo<'_>, out: &mut BytesMut) {
        let Some(txn) = self.txn.as_mut() else {
            return self.error(out, 503, "5.5.1", "Error: need MAIL command");
        };
        txn.rcpt_attempts += 1;
        if !txn.smtputf8 && !r.path.is_ascii() {
            return self.error(
                out,
                553,
                "5.6.7",
                "Error: non-ASCII address requires SMTPUTF8",
            );
        }
        if txn.rcpts.len() >= self.cfg.limits.recipients {
            return self.refuse(
                out,
                Reject::TooManyRecipients,
                "RCPT",
                Some(r.path),
                452,
                "4.5.3",
                "Error: too many recipients",
            );
        }
        let domain = command::domain_of(r.path);
        if !self
            .cfg
            .policy
            .may_relay(self.peer.ip(), self.auth_trusted, domain)
        {
            let text = format!("<{}>: Relay access denied", r.path);
            return self.refuse(
                out,
                Reject::Relay,
                "RCPT",
                Some(r.path),
                554,
                "5.7.1",
                &text,
            );
        }
        if let Some(login) = self.authenticated.as_deref() {
            if !self.cfg.hooks.user_recipient(login) {
                let text = format!("Error: too many recipients from user {login}, try again later");
                return self.refuse(
                    out,
                    Reject::UserRate,
                    "RCPT",
                    Some(r.path),
                    452,
                    "4.5.3",
                    &text,
                );
            }
        }
        let Some(txn) = self.txn.as_mut() else {
            return;
        };
        txn.rcpts.push(Recipient {
            addr: r.path.to_string(),
            notify: r.notify,
            orcpt: r.orcpt.map(str::to_string),
        });
        if self.filter_commands {
            self.state = State::Checking(CheckKind::Rcpt);
            self.pending_check = Some(Check::Rcpt(r.path.to_string()));
            return;
        }
        reply::line(out, 250, "2.1.5", "Ok");
    }

    fn data(&mut self, out: &mut BytesMut) -> Option<Event> {
        let Some(txn) = self.txn.as_ref() else {
            self.error(out, 503, "5.5.1", "Error: need MAIL command");
            return self.closed_event();
        };
        if txn.rcpts.is_empty() {
            if txn.rcpt_attempts > 0 {
                self.error(out, 554, "5.5.1", "Error: no valid recipients");
            } else {
                self.error(out, 503, "5.5.1", "Error: need RCPT command");
            }
            return self.closed_event();
        }
        if txn.bdat_used {
            self.error(out, 503, "5.5.1", "Error: DATA after BDAT");
            return self.closed_event();
        }
        if txn.body_type == Body::BinaryMime {
            // RFC 3030 §3: BINARYMIME content can only be sent with BDAT.
            self.error(out, 503, "5.5.1", "Error: BODY=BINARYMIME requires BDAT");
            return self.closed_event();
        }
        reply::plain(out, 354, "End data with <CR><LF>.<CR><LF>");
        self.state = State::Data(DataScanner::new(
            self.cfg.limits.text_line,
            self.cfg.limits.message_size,
        ));
        None
    }

    fn bdat(&mut self, size: u64, last: bool) {
        // RFC 3030 §2: the chunk is consumed whatever the verdict; the reply comes after it.
        let refused = match self.txn.as_mut() {
            None => Some((503, "5.5.1", "Error: need MAIL command")),
            Some(t) if t.rcpts.is_empty() => Some((503, "5.5.1", "Error: need RCPT command")),
            Some(t) => {
                t.bdat_used = true;
                None
            }
        };
        self.state = State::Bdat {
            remaining: size,
            last,
            chunk: size,
            refused,
        };
    }

    fn end_of_chunk(
        &mut self,
        last: bool,
        chunk: u64,
        refused: Option<(u16, &'static str, &'static str)>,
        out: &mut BytesMut,
    ) -> Option<Event> {
        if let Some((code, enh, text)) = refused {
            self.error(out, code, enh, text);
            return self.closed_event();
        }
        if !last {
            reply::line(out, 250, "2.0.0", &format!("Ok: {chunk} octets received"));
            return None;
        }
        let oversize = self.txn.as_ref().is_some_and(|t| t.bdat_oversize);
        if oversize {
            self.refuse(
                out,
                Reject::Size,
                "BDAT",
                None,
                552,
                "5.3.4",
                "Error: message file too big",
            );
            self.reset_transaction();
            return self.closed_event();
        }
        // BDAT counts octets, so a NUL cannot end the data here; but a 7bit/8BITMIME body
        // may be relayed with DATA later, where a NUL-dropping receiver could (see data.rs).
        let nul = self
            .txn
            .as_ref()
            .is_some_and(|t| t.bdat_nul && !matches!(t.body_type, Body::BinaryMime));
        if nul {
            self.refuse(
                out,
                Reject::Nul,
                "BDAT",
                None,
                554,
                "5.6.0",
                "Error: NUL in message; only BODY=BINARYMIME may carry it",
            );
            self.reset_transaction();
            return self.closed_event();
        }
        let size = self.txn.as_ref().map_or(0, |t| t.bdat_size);
        self.finish_message(size, out)
    }

    fn end_of_data(&mut self, flaws: BodyFlaws, size: u64, out: &mut BytesMut) -> Option<Event> {
        self.state = State::Command;
        let refusal = if flaws.oversize {
            Some((552, "5.3.4", "Error: message file too big"))
        } else if flaws.bare_newline {
            Some((
                554,
                "5.6.0",
                "Error: bare <CR> or <LF> in message; lines must end with <CR><LF> (RFC 5321 2.3.8)",
            ))
        } else if flaws.nul {
            Some((
                554,
                "5.6.0",
                "Error: NUL in message (RFC 5322 2.3, RFC 6152 2)",
            ))
        } else if flaws.long_line {
            Some((
                554,
                "5.6.0",
                "Error: message has a line longer than allowed (RFC 5321 4.5.3.1.6)",
            ))
        } else {
            None
        };
        if let Some((code, enh, text)) = refusal {
            let why = if flaws.oversize {
                Reject::Size
            } else if flaws.bare_newline {
                Reject::BareNewline
            } else if flaws.nul {
                Reject::Nul
            } else {
                Reject::LongLine
            };
            self.refuse(out, why, "DATA", None, code, enh, text);
            self.reset_transaction();
            return self.closed_event();
        }
        self.finish_message(size, out)
    }

    fn finish_message(&mut self, size: u64, out: &mut BytesMut) -> Option<Event> {
        if let Some(t) = self.txn.as_mut() {
            t.coalesce.finish(&mut t.body);
        }
        let not_owned = self
            .txn
            .as_ref()
            .and_then(|t| self.header_from_not_owned(&t.body));
        if let Some((addr, login)) = not_owned {
            let text = format!("<{addr}>: sender address not owned by user {login}");
            let stage = if self.txn.as_ref().is_some_and(|t| t.bdat_used) {
                "BDAT"
            } else {
                "DATA"
            };
            self.refuse(
                out,
                Reject::SenderNotOwned,
                stage,
                None,
                550,
                "5.7.1",
                &text,
            );
            self.reset_transaction();
            return self.closed_event();
        }
        let txn = self.txn.take()?;
        let protocol = match (txn.smtputf8, self.tls, self.authenticated.is_some()) {
            (false, false, false) if self.esmtp => "ESMTP",
            (false, false, false) => "SMTP",
            (false, false, true) => "ESMTPA",
            (false, true, false) => "ESMTPS",
            (false, true, true) => "ESMTPSA",
            (true, false, false) => "UTF8SMTP",
            (true, false, true) => "UTF8SMTPA",
            (true, true, false) => "UTF8SMTPS",
            (true, true, true) => "UTF8SMTPSA",
        };
        let envelope = Envelope {
            id: String::new(),
            sender: txn.sender,
            recipients: txn.rcpts,
            arrival_unix_micros: self.now.unix_micros,
            size,
            body_type: match txn.body_type {
                Body::SevenBit => BodyType::SevenBit,
                Body::EightBitMime => BodyType::EightBitMime,
                Body::BinaryMime => BodyType::BinaryMime,
            },
            smtputf8: txn.smtputf8,
            ret: txn.ret,
            envid: txn.envid,
            deliver_by: txn.by,
            auth: txn.auth,
            client_helo: self.helo.clone().unwrap_or_default(),
            client_addr: self.peer.to_string(),
        };
        self.state = State::Storing;
        Some(Event::Message(Box::new(Message {
            envelope,
            body: txn.body,
            protocol,
            peer: self.peer,
            authenticated: self.authenticated.is_some(),
            trusted: self.cfg.policy.trusted_client(self.peer.ip()),
        })))
    }

    /// RFC 1985: `ETRN domain`, `ETRN @domain` (and subdomains) or `ETRN #queue`.
    fn etrn(&mut self, node: &str, out: &mut BytesMut) -> Option<Event> {
        if self.helo.is_none() {
            self.error(out, 503, "5.5.1", "Error: send HELO/EHLO first");
            return self.closed_event();
        }
        if self.txn.is_some() {
            self.error(out, 503, "5.5.1", "Error: MAIL transaction in progress");
            return self.closed_event();
        }
        let name = node
            .strip_prefix('@')
            .or_else(|| node.strip_prefix('#'))
            .unwrap_or(node);
        let valid = !name.is_empty()
            && name.len() <= 255
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_');
        if !valid {
            self.error(out, 501, "5.5.4", "Error: invalid ETRN node name");
            return self.closed_event();
        }
        Some(Event::Etrn(node.to_string()))
    }

    /// The queue run for an ETRN started: `scheduled` messages were made due now.
    pub fn etrn_started(&mut self, node: &str, scheduled: usize, out: &mut BytesMut) {
        if scheduled == 0 {
            reply::line(
                out,
                251,
                "2.0.0",
                &format!("OK, no messages waiting for node {node}"),
            );
        } else {
            reply::line(
                out,
                250,
                "2.0.0",
                &format!("Queuing for node {node} started"),
            );
        }
    }

    fn auth(&mut self, mechanism: &str, initial: Option<&str>, out: &mut BytesMut) {
        let Some(a) = self.cfg.auth.as_ref() else {
            return self.error(out, 503, "5.5.1", "Error: authentication not enabled");
        };
        if !self.esmtp {
            return self.error(out, 503, "5.5.1", "Error: send EHLO first");
        }
        if self.authenticated.is_some() {
            return self.error(out, 503, "5.5.1", "Error: already authenticated");
        }
        if self.txn.is_some() {
            return self.error(
                out,
                503,
                "5.5.1",
                "Error: AUTH not allowed during a mail transaction",
            );
        }
        let Some(mech) = Mechanism::from_name(mechanism).filter(|m| a.mechanisms.contains(m))
        else {
            return self.error(out, 504, "5.5.4", "Unrecognized authentication type");
        };
        if self.cfg.hooks.auth_blocked(self.peer.ip()) {
            return self.refuse(
                out,
                Reject::AuthBlocked,
                "AUTH",
                None,
                454,
                "4.7.0",
                "Too many failed authentication attempts from your address, try again later",
            );
        }
        // A node that has never had a snapshot of its users (its database was unreachable
        // since start) can judge nobody: a temporary failure (RFC 4954 §6, "454 4.7.0
        // Temporary authentication failure"), so the client retries instead of being told
        // its password is wrong, and nobody gets in.
        if a.shared.users.borrow().is_unavailable() {
            return self.error(
                out,
                454,
                "4.7.0",
                "Temporary authentication failure: user database unavailable, try again later",
            );
        }
        if mech.is_plaintext() && !self.tls && !a.allow_plaintext_without_tls {
            return self.refuse(
                out,
                Reject::EncryptionRequired,
                "AUTH",
                None,
                538,
                "5.7.11",
                "Encryption required for requested authentication mechanism",
            );
        }
        let initial = match initial.map(|i| sasl::decode_client_line(i.as_bytes(), true)) {
            None => None,
            Some(Ok(ClientLine::Data(d))) => Some(d),
            Some(Ok(ClientLine::Cancel)) => {
                return self.error(out, 501, "5.0.0", "Authentication aborted");
            }
            Some(Err(_)) => {
                return self.error(out, 501, "5.5.2", "Invalid base64 data in AUTH");
            }
        };
        let ((ex, step), login) = with_sasl(&self.cfg, a, self.now, |ctx| {
            Exchange::start(mech, initial.as_deref(), ctx)
        });
        self.auth_login = login;
        self.auth_step(ex, step, out);
    }

    /// A client line during an AUTH exchange (RFC 4954 §4: base64, or "*" to cancel).
    fn auth_response(&mut self, text: &[u8], out: &mut BytesMut) {
        let state = std::mem::replace(&mut self.state, State::Command);
        match state {
            State::AuthFinal { identity, mech } => {
                if text == b"*" {
                    self.error(out, 501, "5.0.0", "Authentication aborted");
                } else {
                    self.auth_ok(identity, mech, out);
                }
            }
            State::Auth(mut ex) => {
                let mech = ex.mechanism();
                match sasl::decode_client_line(text, false) {
                    Ok(ClientLine::Cancel) => {
                        self.error(out, 501, "5.0.0", "Authentication aborted")
                    }
                    Err(_) => self.auth_failed(AuthFailure::Malformed, mech, out),
                    Ok(ClientLine::Data(d)) => {
                        let Some(a) = self.cfg.auth.as_ref() else {
                            return;
                        };
                        let (step, login) =
                            with_sasl(&self.cfg, a, self.now, |ctx| ex.step(&d, ctx));
                        if login.is_some() {
                            self.auth_login = login;
                        }
                        self.auth_step(*ex, step, out);
                    }
                }
            }
            other => self.state = other,
        }
    }

    fn auth_step(&mut self, ex: Exchange, step: Step, out: &mut BytesMut) {
        use base64::Engine as _;
        let mech = ex.mechanism();
        match step {
            Step::Challenge(c) => {
                let b64 = base64::engine::general_purpose::STANDARD.encode(c);
                reply::plain(out, 334, &b64);
                self.state = State::Auth(Box::new(ex));
            }
            Step::Success {
                authcid,
                authzid,
                server_final,
            } => {
                let identity = authzid.filter(|z| !z.is_empty()).unwrap_or(authcid);
                match server_final {
                    Some(f) => {
                        let b64 = base64::engine::general_purpose::STANDARD.encode(f);
                        reply::plain(out, 334, &b64);
                        self.state = State::AuthFinal { identity, mech };
                    }
                    None => self.auth_ok(identity, mech, out),
                }
            }
            Step::Failure(f) => self.auth_failed(f, mech, out),
        }
    }

    fn auth_ok(&mut self, identity: String, mech: Mechanism, out: &mut BytesMut) {
        self.auth_login = None;
        // A blocked login gets the same 454 with the right password as with a wrong one
        // (`auth_failed`): the block must not become a password oracle.
        if self.cfg.hooks.auth_login_blocked(&identity) {
            self.state = State::Command;
            return self.login_blocked(out);
        }
        self.cfg.hooks.auth_attempt(&AuthAttempt {
            peer: self.peer,
            mechanism: mech,
            login: Some(&identity),
            outcome: Ok(()),
            failures: self.auth_failures,
        });
        self.authenticated = Some(identity);
        self.auth_mechanism = Some(mech.name());
        self.auth_trusted = self
            .cfg
            .auth
            .as_ref()
            .is_some_and(|a| a.relay_mechanisms.contains(&mech));
        self.state = State::Command;
        reply::line(out, 235, "2.7.0", "Authentication successful");
    }

    fn auth_failed(&mut self, f: AuthFailure, mech: Mechanism, out: &mut BytesMut) {
        self.state = State::Command;
        self.auth_failures += 1;
        let login = self.auth_login.take();
        // The hooks count the failure (metrics, the cross-shard block) and log it.
        self.cfg.hooks.auth_attempt(&AuthAttempt {
            peer: self.peer,
            mechanism: mech,
            login: login.as_deref(),
            outcome: Err(f),
            failures: self.auth_failures,
        });
        let (max, tarpit) = self
            .cfg
            .auth
            .as_ref()
            .map_or((1, Duration::ZERO), |a| (a.max_failures, a.tarpit));
        // Tarpit: each failure in the session waits longer before its reply. Only the
        // failure path pays; success never waits.
        self.delay = Some(tarpit * self.auth_failures);
        if login
            .as_deref()
            .is_some_and(|l| self.cfg.hooks.auth_login_blocked(l))
        {
            self.login_blocked(out);
        } else {
            match f {
                AuthFailure::Malformed => {
                    self.error(out, 501, "5.5.2", "Malformed authentication response")
                }
                _ => self.error(out, 535, "5.7.8", "Authentication credentials invalid"),
            }
        }
        if self.auth_failures >= max && !matches!(self.state, State::Closed) {
            reply::line(
                out,
                421,
                "4.7.0",
                &format!(
                    "{} Error: too many failed authentication attempts",
                    self.cfg.hostname
                ),
            );
            self.state = State::Closed;
        }
    }

    /// 454 4.7.0 to an AUTH as a login blocked after too many failures.
    fn login_blocked(&mut self, out: &mut BytesMut) {
        self.refuse(
            out,
            Reject::AuthBlocked,
            "AUTH",
            None,
            454,
            "4.7.0",
            "Too many failed authentication attempts for this login, try again later",
        );
    }

    /// With `auth.sender_policy = "own"`: the login of an authenticated session that may
    /// not use `addr` as a sender (None: allowed, or no policy, or not authenticated).
    fn sender_not_owned(&self, addr: &str) -> Option<String> {
        let a = self.cfg.auth.as_ref().filter(|a| a.sender_own)?;
        let login = self.authenticated.as_deref()?;
        let map = a.shared.senders.borrow();
        (!crate::sender::owns(login, &a.realm, addr, &map)).then(|| login.to_string())
    }

    /// With `auth.check_header_from`: the first From: address of the message that the
    /// authenticated login does not own, and the login.
    fn header_from_not_owned(&self, body: &[Bytes]) -> Option<(String, String)> {
        let a = self.cfg.auth.as_ref().filter(|a| a.check_header_from)?;
        let login = self.authenticated.as_deref()?;
        let header = crate::sender::header_section(body)?;
        let map = a.shared.senders.borrow();
        let addrs = crate::sender::header_from_addresses(&header).unwrap_or_default();
        addrs
            .into_iter()
            .find(|addr| !crate::sender::owns(login, &a.realm, addr, &map))
            .map(|addr| (addr, login.to_string()))
    }

    /// A policy or limit refusal: tells the hooks (one `NOQUEUE: reject:` line, the
    /// counters) and answers like [`Session::error`].
    #[allow(clippy::too_many_arguments)]
    fn refuse(
        &mut self,
        out: &mut BytesMut,
        why: Reject,
        stage: &'static str,
        recipient: Option<&str>,
        code: u16,
        enhanced: &str,
        text: &str,
    ) {
        let txn = self.txn.as_ref();
        let recipient = recipient.or_else(|| match txn.map(|t| t.rcpts.as_slice()) {
            Some([r]) => Some(r.addr.as_str()),
            _ => None,
        });
        self.cfg.hooks.rejected(&Rejection {
            why,
            peer: self.peer,
            stage,
            code,
            enhanced,
            text,
            sender: txn.map(|t| t.sender.as_str()),
            recipient,
            helo: self.helo.as_deref(),
        });
        self.error(out, code, enhanced, text);
    }

    fn starttls(&mut self, out: &mut BytesMut) -> Option<Event> {
        if self.tls {
            self.error(out, 503, "5.5.1", "Error: TLS already active");
            return self.closed_event();
        }
        if !self.cfg.tls_available {
            self.error(out, 454, "4.7.0", "TLS not available due to local problem");
            return self.closed_event();
        }
        reply::line(out, 220, "2.0.0", "Ready to start TLS");
        Some(Event::StartTls)
    }
}

/// Runs `f` with an AUTH context over the shard's SASL state: the current user-store
/// snapshot and the shard's nonce cache (borrowed only for the duration of `f`).
fn with_sasl<R>(
    cfg: &SessionConfig,
    a: &AuthSetup,
    now: Now,
    f: impl FnOnce(&mut AuthContext) -> R,
) -> (R, Option<String>) {
    let users = a.shared.users.borrow().clone();
    let mut nonces = a.shared.nonces.borrow_mut();
    let mut ctx = AuthContext {
        users: &users,
        nonces: &mut nonces,
        hostname: &cfg.hostname,
        realm: &a.realm,
        allow_authzid: a.allow_authzid,
        now: now.mono,
        unix_secs: now.unix_micros / 1_000_000,
        login: None,
    };
    let r = f(&mut ctx);
    (r, ctx.login)
}

/// Drops buffered input (used at STARTTLS: CVE-2011-0411).
pub fn discard_input(input: &mut BytesMut) {
    let n = input.len();
    input.advance(n);
}

#[cfg(test)]
mod tests;
