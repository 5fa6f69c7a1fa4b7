//! SASL server side, sans-I/O: the mechanisms tern offers after `AUTH`.
//!
//! Owns: RFC 4954 §4 decoding of one client line ([`decode_client_line`]),
//! and the server half of CRAM-MD5 (RFC 2195), DIGEST-MD5 (RFC 2831),
//! SCRAM-SHA-256 (RFC 5802, RFC 7677; no channel binding), PLAIN (RFC 4616)
//! and LOGIN (draft-murchison-sasl-login) as an [`Exchange`] driven by the
//! SMTP session: the session reads lines and writes replies, this module only
//! turns client bytes into [`Step`]s.
//!
//! Must never: do I/O, log or return a secret or a client response, panic on
//! client input, tell an unknown user apart from a wrong password (same
//! [`AuthFailure::BadCredentials`], same code path: unknown users are checked
//! against [`Secrets::dummy`]), or accept a server nonce twice.
//!
//! Flow: `AUTH <mech> [ir]` → session calls [`decode_client_line`] on `ir`,
//! then [`Exchange::start`]; for every `334` continuation it calls
//! `decode_client_line(line, false)` and, unless `Cancel`, [`Exchange::step`].
//! `Step::Success { server_final: Some(..) }` means: send it as a 334, read
//! the client's (empty) line, then answer 235 2.7.0 (RFC 4954 §4).
//!
//! Logins (`user` or `user@realm`): every mechanism splits the login at the first
//! `@` as Cyrus's sasldb lookup does ([`crate::users::split_login`]); a bare name is
//! in [`AuthContext::realm`]. DIGEST-MD5 takes its realm from the `realm=`
//! directive instead (see `digest_md5.rs`). The identity reported on success is
//! the login as the client sent it (`alice@example.org`, or `alice`).
//!
//! Policy not from an RFC (ours): which mechanisms are offered without TLS
//! ([`Mechanism::is_plaintext`] lets the session decide) and whether PLAIN may
//! carry a foreign authzid ([`AuthContext::allow_authzid`]).

pub mod client;
mod cram_md5;
mod digest_md5;
mod login;
pub mod nonces;
mod plain;
pub mod saslprep;
mod scram;

use std::time::Instant;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;

pub use nonces::NonceCache;

use crate::users::{Secrets, UserDb};

/// RFC 4954 §4: "the maximum length of [an AUTH] line ... is 12288 octets"
/// (after the 12 octets of `AUTH <mech> `, base64 of a 9 KiB response).
pub const MAX_LINE: usize = 12288;

/// The mechanisms tern implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mechanism {
    CramMd5,
    DigestMd5,
    ScramSha256,
    Plain,
    Login,
}

impl Mechanism {
    /// All mechanisms, strongest first (the order for the EHLO AUTH keyword).
    pub const ALL: [Mechanism; 5] = [
        Mechanism::ScramSha256,
        Mechanism::DigestMd5,
        Mechanism::CramMd5,
        Mechanism::Plain,
        Mechanism::Login,
    ];

    /// Parse a mechanism name; SASL names are case-insensitive in SMTP
    /// (RFC 4954 §4 refers to RFC 4422 §3.1, whose names are upper case, and
    /// clients send lower case in the wild).
    pub fn from_name(name: &str) -> Option<Mechanism> {
        Self::ALL
            .into_iter()
            .find(|m| m.name().eq_ignore_ascii_case(name))
    }

    /// The registered name.
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::CramMd5 => "CRAM-MD5",
            Mechanism::DigestMd5 => "DIGEST-MD5",
            Mechanism::ScramSha256 => "SCRAM-SHA-256",
            Mechanism::Plain => "PLAIN",
            Mechanism::Login => "LOGIN",
        }
    }

    /// The password travels in the clear (only base64): offer only over TLS
    /// (RFC 4616 §6, RFC 4954 §4 "MUST NOT ... without ... confidentiality").
    pub fn is_plaintext(self) -> bool {
        matches!(self, Mechanism::Plain | Mechanism::Login)
    }
}

/// One decoded client line (RFC 4954 §4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientLine {
    /// `*`: the client cancels; the session answers 501 and ends the exchange.
    Cancel,
    /// Decoded base64 (possibly empty).
    Data(Vec<u8>),
}

/// Framing errors; the session answers 501 5.5.2 to both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    #[error("invalid base64")]
    BadBase64,
    #[error("line longer than 12288 octets")]
    TooLong,
}

/// Decode one client line (without its CRLF).
///
/// RFC 4954 §4: `*` cancels (continuation lines only); `=` is an empty
/// initial response (an empty initial response cannot be sent otherwise);
/// an empty continuation line is an empty response; everything else must be
/// strict, padded base64.
pub fn decode_client_line(line: &[u8], initial: bool) -> Result<ClientLine, FramingError> {
    if line.len() > MAX_LINE {
        return Err(FramingError::TooLong);
    }
    match (line, initial) {
        (b"*", false) => Ok(ClientLine::Cancel),
        (b"=", true) => Ok(ClientLine::Data(Vec::new())),
        (b"", false) => Ok(ClientLine::Data(Vec::new())),
        (b"", true) | (b"=", false) | (b"*", true) => Err(FramingError::BadBase64),
        _ => B64
            .decode(line)
            .map(ClientLine::Data)
            .map_err(|_| FramingError::BadBase64),
    }
}

/// What a step needs from the shard. Borrowed per call: the exchange keeps
/// no reference to shard state between lines.
pub struct AuthContext<'a> {
    /// Immutable user store snapshot.
    pub users: &'a UserDb,
    /// This shard's nonce cache.
    pub nonces: &'a mut NonceCache,
    /// Server host name: CRAM-MD5 challenge, DIGEST-MD5 `digest-uri` host.
    pub hostname: &'a str,
    /// Default realm: the realm DIGEST-MD5 offers, and the realm of a login
    /// without `@` (a `user@realm` login names its own realm).
    pub realm: &'a str,
    /// May an authzid differ from the authcid? (PLAIN, DIGEST-MD5, SCRAM.)
    pub allow_authzid: bool,
    /// Monotonic time of this step (nonce lifetimes); the caller reads the clock.
    pub now: Instant,
    /// Wall-clock seconds since the Unix epoch (the CRAM-MD5 challenge's timestamp).
    pub unix_secs: u64,
    /// Set by the step that judged credentials: the login the client tried (authcid), so
    /// the host can log a failure with the name tried (never the secret).
    pub login: Option<String>,
}

/// The outcome of one step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Raw challenge; the session sends `334 <base64>`.
    Challenge(Vec<u8>),
    /// Authenticated. `server_final` (DIGEST-MD5 `rspauth=`, SCRAM `v=`) must
    /// be sent as a 334 and the client's empty reply read before 235 2.7.0.
    Success {
        authcid: String,
        authzid: Option<String>,
        server_final: Option<Vec<u8>>,
    },
    Failure(AuthFailure),
}

/// Why authentication failed, with the reply the session should send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// 535 5.7.8. Same for an unknown user and a wrong password.
    BadCredentials,
    /// 501 5.5.2: the client's message does not parse.
    Malformed,
    /// 535 5.7.8: the credentials are right but may not act as the authzid.
    AuthzidDenied,
    /// 535 5.7.8: the nonce is not a live one of this shard (used, expired,
    /// or never issued).
    Replay,
}

/// Per-mechanism state of an exchange in progress.
enum State {
    Cram(cram_md5::Cram),
    Digest(digest_md5::Digest),
    Scram(scram::Scram),
    Plain,
    Login(login::Login),
    /// Finished (success or failure): any further step is Malformed.
    Done,
}

/// One in-progress exchange, owned by the session.
pub struct Exchange {
    mech: Mechanism,
    state: State,
}

impl std::fmt::Debug for Exchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Exchange {{ mech: {} }}", self.mech.name())
    }
}

impl Exchange {
    /// Begin `mech`. `initial` is the decoded initial response, if the client
    /// sent one (`Some(b"")` for `=`).
    pub fn start(
        mech: Mechanism,
        initial: Option<&[u8]>,
        ctx: &mut AuthContext,
    ) -> (Exchange, Step) {
        Self::start_inner(mech, initial, ctx, None)
    }

    /// As [`Exchange::start`], with the server's random part fixed: the
    /// CRAM-MD5 `random.timestamp`, the DIGEST-MD5 nonce, or the SCRAM server
    /// nonce part. The nonce is registered in the cache as if issued.
    ///
    /// For RFC known-answer tests and benchmarks only: a fixed nonce defeats
    /// replay protection. The SMTP session must never call this.
    #[doc(hidden)]
    pub fn start_with_nonce(
        mech: Mechanism,
        initial: Option<&[u8]>,
        ctx: &mut AuthContext,
        nonce: &str,
    ) -> (Exchange, Step) {
        Self::start_inner(mech, initial, ctx, Some(nonce))
    }

    fn start_inner(
        mech: Mechanism,
        initial: Option<&[u8]>,
        ctx: &mut AuthContext,
        nonce: Option<&str>,
    ) -> (Exchange, Step) {
        let mut ex = Exchange {
            mech,
            state: State::Done,
        };
        let step = match mech {
            // RFC 4954 §4: an initial response to a server-first mechanism
            // MUST be rejected with 501.
            Mechanism::CramMd5 | Mechanism::DigestMd5 if initial.is_some() => {
                Step::Failure(AuthFailure::Malformed)
            }
            Mechanism::CramMd5 => {
                let (st, step) = cram_md5::Cram::start(ctx, nonce);
                ex.state = State::Cram(st);
                step
            }
            Mechanism::DigestMd5 => {
                let (st, step) = digest_md5::Digest::start(ctx, nonce, digest_md5::SERVICE);
                ex.state = State::Digest(st);
                step
            }
            Mechanism::ScramSha256 => match initial {
                Some(first) => {
                    let (st, step) = scram::Scram::client_first(first, ctx, nonce);
                    ex.state = st.map_or(State::Done, State::Scram);
                    step
                }
                None => {
                    ex.state = State::Scram(scram::Scram::awaiting_first(nonce));
                    Step::Challenge(Vec::new())
                }
            },
            Mechanism::Plain => match initial {
                Some(msg) => plain::verify(msg, ctx),
                None => {
                    // RFC 4616 §2 via RFC 4954 §4: empty challenge, then
                    // the message.
                    ex.state = State::Plain;
                    Step::Challenge(Vec::new())
                }
            },
            Mechanism::Login => {
                let (st, step) = login::Login::start(initial);
                ex.state = st.map_or(State::Done, State::Login);
                step
            }
        };
        (ex, step)
    }

    /// Feed one decoded client response.
    pub fn step(&mut self, response: &[u8], ctx: &mut AuthContext) -> Step {
        let state = std::mem::replace(&mut self.state, State::Done);
        let (next, step) = match state {
            State::Done => (State::Done, Step::Failure(AuthFailure::Malformed)),
            State::Cram(st) => (State::Done, st.finish(response, ctx)),
            State::Digest(st) => (State::Done, st.finish(response, ctx)),
            State::Scram(st) => {
                let (st, step) = st.step(response, ctx);
                (st.map_or(State::Done, State::Scram), step)
            }
            State::Plain => (State::Done, plain::verify(response, ctx)),
            State::Login(st) => {
                let (st, step) = st.step(response, ctx);
                (st.map_or(State::Done, State::Login), step)
            }
        };
        self.state = next;
        step
    }

    pub fn mechanism(&self) -> Mechanism {
        self.mech
    }
}

/// The secrets to verify a login (`user` or `user@realm`) against: the user's
/// (with the user name and realm the login selects, which the DIGEST-MD5
/// hash covers), or the dummy set with `found = false` so both cases run the
/// same computation.
fn login_secrets<'a, 'l>(
    users: &'a UserDb,
    login: &'l str,
    default_realm: &'l str,
) -> (&'a Secrets, bool, &'l str, &'l str) {
    let (user, realm) = crate::users::split_login(login, default_realm);
    let (secrets, found) = secrets_or_dummy(users, user, realm);
    (secrets, found, user, realm)
}

/// The secrets to verify against: the user's, or the dummy set with
/// `found = false` so both cases run the same computation.
fn secrets_or_dummy<'a>(users: &'a UserDb, user: &str, realm: &str) -> (&'a Secrets, bool) {
    match users.lookup(user, realm) {
        Some(s) => (s, true),
        None => (Secrets::dummy(), false),
    }
}

/// The authzid rule shared by PLAIN, DIGEST-MD5 and SCRAM: empty or equal to
/// the authcid is always fine (RFC 4616 §2: "an empty authzid ... derived
/// from the authcid"); anything else only if policy allows it.
fn check_authzid(
    authcid: &str,
    authzid: Option<&str>,
    allow: bool,
) -> Result<Option<String>, AuthFailure> {
    match authzid {
        None | Some("") => Ok(None),
        Some(z) if z == authcid => Ok(None),
        Some(z) if allow => Ok(Some(z.to_owned())),
        Some(_) => Err(AuthFailure::AuthzidDenied),
    }
}

/// Final verdict after the constant-time comparison. Credentials are judged
/// first, so the authzid answer is only ever given to a client that proved
/// the password (an authzid probe reveals nothing about other identities).
fn verdict(
    ok: bool,
    found: bool,
    authcid: &str,
    authzid: Option<&str>,
    ctx: &mut AuthContext,
    server_final: Option<Vec<u8>>,
) -> Step {
    ctx.login = Some(authcid.to_owned());
    // `&` not `&&`: no short-circuit on a secret-dependent value.
    if !(ok & found) {
        return Step::Failure(AuthFailure::BadCredentials);
    }
    match check_authzid(authcid, authzid, ctx.allow_authzid) {
        Ok(authzid) => Step::Success {
            authcid: authcid.to_owned(),
            authzid,
            server_final,
        },
        Err(f) => Step::Failure(f),
    }
}

fn hex_lower(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(HEX[usize::from(b >> 4)] as char);
        s.push(HEX[usize::from(b & 15)] as char);
    }
    s
}

/// Decode exactly 32 hex digits (either case).
fn unhex16(s: &[u8]) -> Option<[u8; 16]> {
    if s.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        let d = |c: u8| (c as char).to_digit(16);
        out[i] = u8::try_from(d(pair[0])? * 16 + d(pair[1])?).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests;
