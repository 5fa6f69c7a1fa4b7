//! What a session needs from its host, and what it reports to it.
//!
//! Owns: the [`SessionHooks`] trait (the one seam between the protocol core and the shard
//! that runs it), the events it carries ([`Rejection`], [`AuthAttempt`]), the refusal
//! reasons ([`Reject`], the `reason` label of `tern_messages_rejected_total`) and [`Now`],
//! the time the host hands to every call.
//!
//! Must never: name a runtime type. As Postfix's smtpd reaches anvil only through
//! `anvil_clnt`, a session reaches the shard's counters, its logs and the cross-shard
//! AUTH-failure counting only through this trait; the host decides whether that is a
//! glommio channel, a Redis counter, a test double or nothing at all ([`NoHooks`]).

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use crate::sasl::{AuthFailure, Mechanism};

/// The time as the host read it, passed into every call that needs it: the protocol core
/// never reads a clock, so a test or a fuzzer can drive it at any time it likes.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    /// Monotonic time, for nonce lifetimes.
    pub mono: Instant,
    /// Wall-clock time in microseconds since the Unix epoch, for arrival times, trace
    /// headers and CRAM-MD5 challenges.
    pub unix_micros: u64,
}

impl Now {
    /// A fixed point in time (tests, fuzzing, replays).
    pub fn at(mono: Instant, unix_micros: u64) -> Now {
        Now { mono, unix_micros }
    }
}

/// Why a message or command was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// SIZE= or the message over `limits.message_size`.
    Size,
    /// Bare CR/LF in the message (SMTP smuggling defence).
    BareNewline,
    /// A text line over `limits.text_line`.
    LongLine,
    /// A NUL octet in a DATA body (or a non-BINARYMIME BDAT body).
    Nul,
    /// RCPT to a domain we do not relay for.
    Relay,
    TooManyRecipients,
    /// The spool refused the message (full or failed).
    Storage,
    /// MAIL before AUTH where AUTH is required.
    AuthRequired,
    /// A plaintext AUTH mechanism without TLS (538).
    EncryptionRequired,
    /// AUTH from an address blocked after too many failures (454).
    AuthBlocked,
    /// An authenticated sender (MAIL FROM or From:) the login does not own (553/550 5.7.1).
    SenderNotOwned,
    /// A login over its message or recipient rate (450 4.7.1 / 452 4.5.3).
    UserRate,
    /// A content filter (milter) rejected or deferred the message.
    Milter,
}

impl Reject {
    pub const ALL: [Reject; 13] = [
        Reject::Size,
        Reject::BareNewline,
        Reject::LongLine,
        Reject::Nul,
        Reject::Relay,
        Reject::TooManyRecipients,
        Reject::Storage,
        Reject::AuthRequired,
        Reject::EncryptionRequired,
        Reject::AuthBlocked,
        Reject::SenderNotOwned,
        Reject::UserRate,
        Reject::Milter,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Reject::Size => "size",
            Reject::BareNewline => "bare_newline",
            Reject::LongLine => "long_line",
            Reject::Nul => "nul",
            Reject::Relay => "relay",
            Reject::TooManyRecipients => "too_many_recipients",
            Reject::Storage => "storage",
            Reject::AuthRequired => "auth_required",
            Reject::EncryptionRequired => "encryption_required",
            Reject::AuthBlocked => "auth_blocked",
            Reject::SenderNotOwned => "sender_not_owned",
            Reject::UserRate => "user_rate",
            Reject::Milter => "milter",
        }
    }

    /// Position in [`Reject::ALL`] (a counter array index).
    pub fn index(self) -> usize {
        Reject::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

/// A refusal, as the client saw it: enough for one `NOQUEUE: reject:` log line.
#[derive(Debug, Clone, Copy)]
pub struct Rejection<'a> {
    pub why: Reject,
    pub peer: SocketAddr,
    /// The command that was refused (`MAIL`, `RCPT`, `DATA`, `BDAT`, `AUTH`).
    pub stage: &'static str,
    pub code: u16,
    pub enhanced: &'a str,
    pub text: &'a str,
    /// MAIL FROM of the open transaction, if any ("" is `<>`).
    pub sender: Option<&'a str>,
    /// The recipient refused, or the single one of the transaction.
    pub recipient: Option<&'a str>,
    /// HELO/EHLO name, if given.
    pub helo: Option<&'a str>,
}

/// One finished AUTH exchange.
#[derive(Debug, Clone, Copy)]
pub struct AuthAttempt<'a> {
    pub peer: SocketAddr,
    pub mechanism: Mechanism,
    /// The login the client tried (authcid, or the identity on success); never a secret.
    pub login: Option<&'a str>,
    /// `Ok(())` or why it failed.
    pub outcome: Result<(), AuthFailure>,
    /// Failures so far in this session.
    pub failures: u32,
}

/// The host side of a session. Default methods do nothing, so a host implements only
/// what it counts.
pub trait SessionHooks {
    /// Is `ip` blocked for AUTH after too many failures (counted across shards, or across
    /// nodes)? Asked before every AUTH; must not block.
    fn auth_blocked(&self, _ip: IpAddr) -> bool {
        false
    }
    /// Is `login` blocked for AUTH after too many failures (`auth.login_failure_limit`,
    /// across shards or nodes)? Asked when an exchange ends, success or failure alike (so
    /// the reply says nothing about the password). Must not block.
    fn auth_login_blocked(&self, _login: &str) -> bool {
        false
    }
    /// An AUTH exchange ended (success or failure). A failure counts towards blocks.
    fn auth_attempt(&self, _attempt: &AuthAttempt<'_>) {}
    /// A command or message was refused by policy or limits.
    fn rejected(&self, _rejection: &Rejection<'_>) {}
    /// May authenticated `login` start another message now (`auth.user_message_rate`,
    /// counted per login across shards)? A `true` counts it. Must not block.
    fn user_message(&self, _login: &str) -> bool {
        true
    }
    /// May authenticated `login` add another recipient now (`auth.user_recipient_rate`)?
    /// A `true` counts it. Must not block.
    fn user_recipient(&self, _login: &str) -> bool {
        true
    }
}

/// Hooks that count nothing and block nobody (tests, fuzzing, `tern stdio`).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoHooks;

impl SessionHooks for NoHooks {}
