//! Outbound SMTP client (RFC 5321), driven on a glommio executor.
//!
//! Owns: one TCP connection to one remote server at a time: greeting, EHLO (HELO fallback),
//! STARTTLS (RFC 3207) per [`StarttlsPolicy`] (the per-hop [`TlsPolicy`] levels map onto
//! it), AUTH (RFC 4954: PLAIN/LOGIN only inside TLS, CRAM-MD5 otherwise), and message
//! transactions with PIPELINING (RFC 2920), SIZE (RFC 1870), 8BITMIME (RFC 6152),
//! SMTPUTF8 (RFC 6531), DSN (RFC 3461), DELIVERBY (RFC 2852) and CHUNKING/BINARYMIME
//! (RFC 3030), every wait bounded by the RFC 5321 §4.5.3.2 timeouts.
//! The protocol decisions are sans-I/O in [`reply`] and [`transaction`]; this file only
//! moves bytes.
//!
//! Must never: decide retry/bounce policy (it reports replies; the runner decides), send
//! PLAIN or LOGIN credentials without TLS, act on bytes a server sent before the TLS
//! handshake after it, wait without a timer, or panic on anything a server sends.
//!
//! Outcome contract of [`Connection::send`]: `Ok(v)` has one `(index, reply)` per
//! recipient asked for, in the order asked: the RCPT reply if the recipient was refused,
//! the MAIL reply if MAIL was refused, otherwise the reply to the end of data — or a reply
//! made up locally (see [`Reply::local`]) when the message cannot go to this server at all.
//! `Err(_)` means the connection failed before every recipient had an answer (timeout,
//! I/O, a 421, a protocol violation); treat every recipient of that call as "try again
//! later" and drop the connection. XXX: a failure after the final dot was sent but
//! before its reply arrived may deliver the message twice (RFC 1047); nothing can fix that.

pub mod reply;
pub mod tls;
pub mod transaction;

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_lite::future;
use futures_lite::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use futures_rustls::TlsConnector;
use glommio::net::TcpStream;
use glommio::timer::Timer;
use rustls::pki_types::ServerName;

pub use reply::{parse_reply, Reply, ReplyError, ReplyParser};
pub use tls::TlsConfigError;
pub use transaction::{DataPieces, Extensions, PIPELINED_CHUNK_MAX};

use crate::envelope::{BodyType, Envelope};
use transaction::sasl;

/// When to use STARTTLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StarttlsPolicy {
    /// Use it when offered; continue in plaintext when it is not offered or refused
    /// (RFC 7435). A failed handshake still fails the connection.
    Opportunistic,
    /// Fail the connection unless TLS is established.
    Required,
    /// Never send STARTTLS.
    Never,
}

/// A next hop's TLS requirement: per route (`tls=` attribute), per MX domain
/// (`queue.tls_policy`), else the global `queue.starttls` / `queue.tls_verify`. The
/// names are Postfix's `smtp_tls_security_level` values that mean the same thing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TlsLevel {
    /// Never send STARTTLS.
    None,
    /// STARTTLS when offered, any certificate accepted; plaintext when it is not offered
    /// or refused (RFC 7435 opportunistic security).
    May,
    /// STARTTLS required, any certificate accepted: no plaintext fallback (a hop without
    /// STARTTLS defers the mail).
    Encrypt,
    /// STARTTLS required and the certificate verified: chain to the CA file (the policy's,
    /// else `queue.tls_ca_file`, else the system bundle) and the next hop's name (the MX
    /// or route host name; an IP address when the route gives one). Failure defers.
    Verify,
}

/// A [`TlsLevel`] and, for `verify`, an optional CA file for this hop only.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TlsPolicy {
    pub level: TlsLevel,
    pub ca_file: Option<PathBuf>,
}

impl TlsPolicy {
    pub fn new(level: TlsLevel) -> TlsPolicy {
        TlsPolicy {
            level,
            ca_file: None,
        }
    }

    /// Parses `none`, `may`, `encrypt`, `verify` or `verify ca=/absolute/file.pem`
    /// (case-insensitive level). The error says what is wrong.
    pub fn parse(s: &str) -> Result<TlsPolicy, String> {
        let mut words = s.split_ascii_whitespace();
        let level = match words.next().map(str::to_ascii_lowercase).as_deref() {
            Some("none") => TlsLevel::None,
            Some("may") => TlsLevel::May,
            Some("encrypt") => TlsLevel::Encrypt,
            Some("verify") => TlsLevel::Verify,
            _ => return Err("expected none, may, encrypt or verify".into()),
        };
        let mut ca_file = None;
        for w in words {
            match w.strip_prefix("ca=") {
                Some(p) if level == TlsLevel::Verify && ca_file.is_none() => {
                    let p = PathBuf::from(p);
                    if !p.is_absolute() {
                        return Err("ca= needs an absolute path".into());
                    }
                    ca_file = Some(p);
                }
                Some(_) => return Err("ca= goes once, with verify".into()),
                None => return Err(format!("unknown word {w:?}")),
            }
        }
        Ok(TlsPolicy { level, ca_file })
    }

    /// Makes `o` follow this policy (a CA file of the policy replaces `o`'s; without one
    /// `o`'s stays, which is the global `queue.tls_ca_file`).
    pub fn apply(&self, o: &mut ClientOptions) {
        let (starttls, verify) = match self.level {
            TlsLevel::None => (StarttlsPolicy::Never, false),
            TlsLevel::May => (StarttlsPolicy::Opportunistic, false),
            TlsLevel::Encrypt => (StarttlsPolicy::Required, false),
            TlsLevel::Verify => (StarttlsPolicy::Required, true),
        };
        o.starttls = starttls;
        o.verify_certs = verify;
        if let Some(ca) = &self.ca_file {
            o.ca_file = Some(ca.clone());
        }
        // A prebuilt configuration was built for the old trust settings: never let it
        // stand in for the new ones (a no-verify one for a `verify` hop).
        o.tls_config = None;
    }
}

/// Per-stage timeouts. `Default` is RFC 5321 §4.5.3.2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP connect (not in the RFC; 30 s like Postfix's smtp_connect_timeout).
    pub connect: Duration,
    /// Initial 220 (§4.5.3.2.1: 5 min).
    pub greeting: Duration,
    /// EHLO/HELO, STARTTLS, AUTH, RSET, QUIT (5 min, as MAIL).
    pub helo: Duration,
    /// MAIL (§4.5.3.2.2: 5 min).
    pub mail: Duration,
    /// Each RCPT (§4.5.3.2.3: 5 min).
    pub rcpt: Duration,
    /// The 354 to DATA (§4.5.3.2.4: 2 min).
    pub data_init: Duration,
    /// Each block of at most 64 KiB written (§4.5.3.2.5: 3 min).
    pub data_block: Duration,
    /// The reply to the final dot or to BDAT LAST (§4.5.3.2.6: 10 min).
    pub data_final: Duration,
    /// The TLS handshake (not in the RFC; 5 min like Postfix's smtp_starttls_timeout).
    pub tls_handshake: Duration,
    /// Octets per second a reply must keep up once it has started arriving (Postfix's
    /// `smtp_min_data_rate` idea, as the inbound side's `limits.min_data_rate`): each wait
    /// above is the deadline of a whole reply, and bytes that arrive without completing
    /// it extend that deadline by bytes / this rate, never past the wait from now. So a
    /// next hop trickling a 64 KiB reply holds a delivery slot for at most the wait plus
    /// 64 KiB / rate, not for hours. 0 = every read restarts the wait (the old way).
    pub min_data_rate: u64,
}

impl Default for Timeouts {
    fn default() -> Timeouts {
        const MIN: u64 = 60;
        Timeouts {
            connect: Duration::from_secs(30),
            greeting: Duration::from_secs(5 * MIN),
            helo: Duration::from_secs(5 * MIN),
            mail: Duration::from_secs(5 * MIN),
            rcpt: Duration::from_secs(5 * MIN),
            data_init: Duration::from_secs(2 * MIN),
            data_block: Duration::from_secs(3 * MIN),
            data_final: Duration::from_secs(10 * MIN),
            tls_handshake: Duration::from_secs(5 * MIN),
            min_data_rate: DEFAULT_MIN_DATA_RATE,
        }
    }
}

/// The default [`Timeouts::min_data_rate`]: the inbound side's default too.
pub const DEFAULT_MIN_DATA_RATE: u64 = 500;

impl Timeouts {
    /// The same timeout everywhere (tests).
    pub fn uniform(d: Duration) -> Timeouts {
        Timeouts {
            connect: d,
            greeting: d,
            helo: d,
            mail: d,
            rcpt: d,
            data_init: d,
            data_block: d,
            data_final: d,
            tls_handshake: d,
            min_data_rate: DEFAULT_MIN_DATA_RATE,
        }
    }
}

/// How to talk to one destination.
#[derive(Clone)]
pub struct ClientOptions {
    /// Our name for EHLO/HELO.
    pub helo: String,
    pub starttls: StarttlsPolicy,
    /// Verify the server certificate against `ca_file` (or the system bundle) and
    /// `server_name`. Off = opportunistic encryption without authentication.
    pub verify_certs: bool,
    pub ca_file: Option<PathBuf>,
    /// The name to verify and send as SNI; without it the IP address is used (which
    /// rarely verifies: the runner should pass the MX or relay host name).
    pub server_name: Option<String>,
    /// (user, password) for AUTH.
    pub auth: Option<(String, String)>,
    pub timeouts: Timeouts,
    /// A prebuilt rustls configuration for STARTTLS; it must have been built from
    /// `verify_certs` and `ca_file` (`tls::client_config`). The runner passes the shard's
    /// cached one: no file is read on the shard thread, and connections sharing it resume
    /// TLS sessions. `None`: `connect` builds one itself, reading the CA file on the
    /// calling thread (tools and tests), and nothing is resumed.
    pub tls_config: Option<Arc<rustls::ClientConfig>>,
    /// Send every body with `BDAT n LAST` (RFC 3030), pipelined with MAIL and RCPT, to a
    /// server offering CHUNKING and PIPELINING: the whole transaction is one write and one
    /// round trip instead of two (DATA must wait for its 354). Exim does the same
    /// (`hosts_try_chunking = *`); off, BDAT is used only for BINARYMIME bodies.
    pub chunking: bool,
}

impl ClientOptions {
    /// Opportunistic STARTTLS without verification, no AUTH, RFC timeouts.
    pub fn new(helo: impl Into<String>) -> ClientOptions {
        ClientOptions {
            helo: helo.into(),
            starttls: StarttlsPolicy::Opportunistic,
            verify_certs: false,
            ca_file: None,
            server_name: None,
            auth: None,
            timeouts: Timeouts::default(),
            tls_config: None,
            chunking: true,
        }
    }
}

impl fmt::Debug for ClientOptions {
    /// Never prints the password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientOptions")
            .field("helo", &self.helo)
            .field("starttls", &self.starttls)
            .field("verify_certs", &self.verify_certs)
            .field("ca_file", &self.ca_file)
            .field("server_name", &self.server_name)
            .field("auth_user", &self.auth.as_ref().map(|(u, _)| u))
            .field("timeouts", &self.timeouts)
            .field("tls_config", &self.tls_config.as_ref().map(|_| "prebuilt"))
            .finish()
    }
}

/// Where in the conversation something happened (for errors and logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Connect,
    Greeting,
    Ehlo,
    Helo,
    StartTls,
    TlsHandshake,
    Auth,
    Rset,
    Mail,
    Rcpt,
    Data,
    DataBody,
    DataFinal,
    Bdat,
    Quit,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Stage::Connect => "connect",
            Stage::Greeting => "greeting",
            Stage::Ehlo => "EHLO",
            Stage::Helo => "HELO",
            Stage::StartTls => "STARTTLS",
            Stage::TlsHandshake => "TLS handshake",
            Stage::Auth => "AUTH",
            Stage::Rset => "RSET",
            Stage::Mail => "MAIL FROM",
            Stage::Rcpt => "RCPT TO",
            Stage::Data => "DATA",
            Stage::DataBody => "message body",
            Stage::DataFinal => "end of data",
            Stage::Bdat => "BDAT",
            Stage::Quit => "QUIT",
        };
        f.write_str(s)
    }
}

/// A connection-level failure. Every recipient without an answer is "try again later";
/// the connection must not be reused.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("timed out during {0}")]
    Timeout(Stage),
    #[error("I/O error during {stage}: {source}")]
    Io {
        stage: Stage,
        #[source]
        source: io::Error,
    },
    #[error("connection closed by the server during {0}")]
    Closed(Stage),
    #[error("unparsable reply during {stage}: {source}")]
    BadReply {
        stage: Stage,
        #[source]
        source: ReplyError,
    },
    /// A 421 at any point (RFC 5321 §3.8).
    #[error("server is closing the connection: {0}")]
    ServiceClosing(Reply),
    #[error("greeting was not 220: {0}")]
    Greeting(Reply),
    #[error("EHLO and HELO refused: {0}")]
    Helo(Reply),
    #[error("TLS is required but the server does not offer STARTTLS")]
    StartTlsNotOffered,
    #[error("TLS is required but STARTTLS was refused: {0}")]
    StartTlsRefused(Reply),
    /// Bytes after the 220 to STARTTLS, before the handshake: a response-injection
    /// attempt (the client side of CVE-2011-0411).
    #[error("server sent data after its 220 to STARTTLS")]
    StartTlsInjection,
    #[error("TLS configuration: {0}")]
    TlsConfig(#[from] TlsConfigError),
    #[error("invalid TLS server name {0:?}")]
    ServerName(String),
    #[error("TLS handshake failed: {0}")]
    Tls(#[source] io::Error),
    #[error("AUTH configured but no usable mechanism (offered: {offered:?}, TLS: {tls})")]
    AuthUnavailable { offered: Vec<String>, tls: bool },
    #[error("authentication failed: {0}")]
    Auth(Reply),
    /// A reply that makes no sense at this point (a 3xx to MAIL, a 2xx to DATA, ...).
    #[error("unexpected reply during {stage}: {reply}")]
    Unexpected { stage: Stage, reply: Reply },
    #[error("invalid option: {0}")]
    InvalidOption(&'static str),
    #[error("recipient index {0} out of range")]
    BadIndex(usize),
    #[error("connection unusable after an earlier error")]
    Broken,
}

impl ClientError {
    /// The server's reply behind this error, if there was one.
    pub fn reply(&self) -> Option<&Reply> {
        match self {
            ClientError::ServiceClosing(r)
            | ClientError::Greeting(r)
            | ClientError::Helo(r)
            | ClientError::StartTlsRefused(r)
            | ClientError::Auth(r)
            | ClientError::Unexpected { reply: r, .. } => Some(r),
            _ => None,
        }
    }
}

/// The byte stream under a connection.
enum Io {
    Plain(TcpStream),
    Tls(Box<futures_rustls::client::TlsStream<TcpStream>>),
    /// Only while the stream is handed to the TLS connector.
    Gone,
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "stream is gone")
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Io::Gone => Poll::Ready(Err(gone())),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Io::Gone => Poll::Ready(Err(gone())),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Io::Gone => Poll::Ready(Err(gone())),
        }
    }
    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_close(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_close(cx),
            Io::Gone => Poll::Ready(Ok(())),
        }
    }
}

/// Largest single write: the unit the `data_block` timeout applies to.
const BLOCK: usize = 64 * 1024;
/// Read size for replies.
const READ_CHUNK: usize = 4096;

/// An open SMTP session with one server, ready for transactions.
pub struct Connection {
    io: Io,
    /// Received bytes not yet parsed (bounded by the reply parser's limits).
    rbuf: Vec<u8>,
    /// Where parsing of the reply at the front of `rbuf` got to.
    parser: ReplyParser,
    /// Staging for small data pieces, flushed at [`BLOCK`].
    wbuf: Vec<u8>,
    ext: Extensions,
    timeouts: Timeouts,
    peer: SocketAddr,
    remote_name: String,
    tls: bool,
    /// The TLS handshake resumed an earlier session (no certificate exchange).
    tls_resumed: bool,
    authenticated: bool,
    /// A transaction was attempted: RSET before the next one.
    used: bool,
    /// An error happened: refuse further use.
    broken: bool,
    /// `ClientOptions::chunking`.
    chunking: bool,
}

/// Runs `f` for at most `d`.
async fn timed<F: Future>(d: Duration, f: F) -> Option<F::Output> {
    future::or(async { Some(f.await) }, async {
        Timer::new(d).await;
        None
    })
    .await
}

/// Opens a connection: TCP, greeting, EHLO, STARTTLS per policy, EHLO again, AUTH.
pub async fn connect(addr: SocketAddr, opts: &ClientOptions) -> Result<Connection, ClientError> {
    if opts.helo.is_empty() || opts.helo.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(ClientError::InvalidOption(
            "helo must be a non-empty name without spaces or controls",
        ));
    }
    let t = opts.timeouts;
    let stream = match TcpStream::connect_timeout(addr, t.connect).await {
        Ok(s) => s,
        Err(e) => {
            let e = io::Error::from(e);
            if e.kind() == io::ErrorKind::TimedOut {
                return Err(ClientError::Timeout(Stage::Connect));
            }
            return Err(ClientError::Connect { addr, source: e });
        }
    };
    // glommio does not set TCP_NODELAY; without it every pipelined round trip can
    // stall on a delayed ACK (shared notes: ~40 ms each).
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(%addr, "set_nodelay: {e}");
    }
    let mut conn = Connection {
        io: Io::Plain(stream),
        rbuf: Vec::with_capacity(READ_CHUNK),
        parser: ReplyParser::default(),
        wbuf: Vec::new(),
        ext: Extensions::default(),
        timeouts: t,
        peer: addr,
        remote_name: String::new(),
        tls: false,
        tls_resumed: false,
        authenticated: false,
        used: false,
        broken: false,
        chunking: opts.chunking,
    };
    match conn.open(opts).await {
        Ok(()) => Ok(conn),
        Err(e) => {
            conn.broken = true;
            Err(e)
        }
    }
}

impl Connection {
    /// What the server offered in its last EHLO reply (after STARTTLS, the second one).
    pub fn extensions(&self) -> &Extensions {
        &self.ext
    }
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }
    /// The name the server gave in its EHLO (or greeting) reply, as sent (untrusted).
    pub fn remote_name(&self) -> &str {
        &self.remote_name
    }
    pub fn is_tls(&self) -> bool {
        self.tls
    }
    /// Whether the TLS handshake resumed an earlier session of the same configuration.
    pub fn is_tls_resumed(&self) -> bool {
        self.tls_resumed
    }
    pub fn is_authenticated(&self) -> bool {
        self.authenticated
    }
    /// False after any error: drop the connection instead of sending more.
    pub fn is_usable(&self) -> bool {
        !self.broken
    }

    async fn open(&mut self, opts: &ClientOptions) -> Result<(), ClientError> {
        let t = self.timeouts;
        let greeting = self.read_reply(Stage::Greeting, t.greeting).await?;
        if greeting.code != 220 {
            self.best_effort_quit().await;
            return Err(ClientError::Greeting(greeting));
        }
        self.remote_name = first_word(&greeting.text);
        self.hello(&opts.helo).await?;

        let want_tls = match opts.starttls {
            StarttlsPolicy::Never => false,
            StarttlsPolicy::Opportunistic => self.ext.starttls,
            StarttlsPolicy::Required if !self.ext.starttls => {
                self.best_effort_quit().await;
                return Err(ClientError::StartTlsNotOffered);
            }
            StarttlsPolicy::Required => true,
        };
        if want_tls {
            // The configuration first: a local mistake (unreadable CA file) must not look
            // like a server problem halfway through STARTTLS.
            let config = match &opts.tls_config {
                Some(c) => c.clone(),
                None => tls::client_config(opts.verify_certs, opts.ca_file.as_deref())?,
            };
            let name = match &opts.server_name {
                Some(n) => ServerName::try_from(n.clone())
                    .map_err(|_| ClientError::ServerName(n.clone()))?,
                None => ServerName::IpAddress(self.peer.ip().into()),
            };
            self.write(Stage::StartTls, t.helo, b"STARTTLS\r\n").await?;
            let reply = self.read_reply(Stage::StartTls, t.helo).await?;
            if reply.code == 220 {
                if !self.rbuf.is_empty() {
                    return Err(ClientError::StartTlsInjection);
                }
                let Io::Plain(tcp) = std::mem::replace(&mut self.io, Io::Gone) else {
                    return Err(ClientError::Unexpected {
                        stage: Stage::StartTls,
                        reply,
                    });
                };
                let connector = TlsConnector::from(config);
                let stream = match timed(t.tls_handshake, connector.connect(name, tcp)).await {
                    None => return Err(ClientError::Timeout(Stage::TlsHandshake)),
                    Some(Err(e)) => return Err(ClientError::Tls(e)),
                    Some(Ok(s)) => s,
                };
                self.tls_resumed =
                    stream.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
                if self.tls_resumed {
                    tracing::debug!(peer = %self.peer, "TLS session resumed");
                }
                self.io = Io::Tls(Box::new(stream));
                self.tls = true;
                // RFC 3207 §4.2: forget everything learnt before TLS.
                self.hello(&opts.helo).await?;
            } else if opts.starttls == StarttlsPolicy::Required {
                self.best_effort_quit().await;
                return Err(ClientError::StartTlsRefused(reply));
            } else {
                tracing::info!(peer = %self.peer, %reply, "STARTTLS refused; continuing without TLS");
            }
        }
        if let Some((user, pass)) = &opts.auth {
            self.authenticate(user, pass).await?;
        }
        Ok(())
    }

    /// EHLO, or HELO if EHLO gets a 5xx (RFC 5321 §4.1.4 / §3.2).
    async fn hello(&mut self, name: &str) -> Result<(), ClientError> {
        let t = self.timeouts.helo;
        self.write(Stage::Ehlo, t, format!("EHLO {name}\r\n").as_bytes())
            .await?;
        let reply = self.read_reply(Stage::Ehlo, t).await?;
        if reply.is_positive() {
            self.ext = Extensions::from_ehlo(&reply);
            let n = first_word(&reply.text);
            if !n.is_empty() {
                self.remote_name = n;
            }
            return Ok(());
        }
        if !reply.is_permanent() {
            return Err(ClientError::Helo(reply));
        }
        self.write(Stage::Helo, t, format!("HELO {name}\r\n").as_bytes())
            .await?;
        let reply = self.read_reply(Stage::Helo, t).await?;
        if !reply.is_positive() {
            return Err(ClientError::Helo(reply));
        }
        self.ext = Extensions::default();
        Ok(())
    }

    /// RFC 4954 AUTH: PLAIN, then LOGIN, inside TLS; CRAM-MD5 otherwise (and inside TLS
    /// when neither is offered). Credentials never go out in the clear.
    async fn authenticate(&mut self, user: &str, pass: &str) -> Result<(), ClientError> {
        let t = self.timeouts.helo;
        let offers = |m: &str| self.ext.auth.iter().any(|x| x == m);
        let mech = if self.tls && offers("PLAIN") {
            "PLAIN"
        } else if self.tls && offers("LOGIN") {
            "LOGIN"
        } else if offers("CRAM-MD5") {
            "CRAM-MD5"
        } else {
            return Err(ClientError::AuthUnavailable {
                offered: self.ext.auth.clone(),
                tls: self.tls,
            });
        };
        let reply = match mech {
            "PLAIN" => {
                let cmd = format!("AUTH PLAIN {}\r\n", sasl::plain(user, pass));
                self.write(Stage::Auth, t, cmd.as_bytes()).await?;
                self.read_reply(Stage::Auth, t).await?
            }
            "LOGIN" => {
                self.write(Stage::Auth, t, b"AUTH LOGIN\r\n").await?;
                let mut reply = self.read_reply(Stage::Auth, t).await?;
                for secret in [user, pass] {
                    if reply.code != 334 {
                        break;
                    }
                    let line = format!("{}\r\n", sasl::b64(secret));
                    self.write(Stage::Auth, t, line.as_bytes()).await?;
                    reply = self.read_reply(Stage::Auth, t).await?;
                }
                reply
            }
            _ => {
                self.write(Stage::Auth, t, b"AUTH CRAM-MD5\r\n").await?;
                let challenge = self.read_reply(Stage::Auth, t).await?;
                if challenge.code != 334 {
                    return Err(ClientError::Auth(challenge));
                }
                let Some(response) = sasl::cram_md5(user, pass, &challenge.text) else {
                    // Cancel the exchange (RFC 4954 §4) and give up.
                    self.write(Stage::Auth, t, b"*\r\n").await?;
                    let _ = self.read_reply(Stage::Auth, t).await;
                    return Err(ClientError::Auth(challenge));
                };
                self.write(Stage::Auth, t, format!("{response}\r\n").as_bytes())
                    .await?;
                self.read_reply(Stage::Auth, t).await?
            }
        };
        if reply.code != 235 {
            return Err(ClientError::Auth(reply));
        }
        self.authenticated = true;
        Ok(())
    }

    /// Sends one message to the recipients `rcpts` (indices into `env.recipients`).
    /// See the module documentation for the outcome contract.
    pub async fn send(
        &mut self,
        env: &Envelope,
        rcpts: &[usize],
        body: &[u8],
    ) -> Result<Vec<(usize, Reply)>, ClientError> {
        if self.broken {
            return Err(ClientError::Broken);
        }
        if let Some(&bad) = rcpts.iter().find(|&&i| i >= env.recipients.len()) {
            return Err(ClientError::BadIndex(bad));
        }
        let mut results = match self.transaction(env, rcpts, body).await {
            Ok(r) => r,
            Err(e) => {
                self.broken = true;
                return Err(e);
            }
        };
        // Report in the order asked.
        results.sort_by_key(|(i, _)| rcpts.iter().position(|r| r == i));
        Ok(results)
    }

    async fn transaction(
        &mut self,
        env: &Envelope,
        rcpts: &[usize],
        body: &[u8],
    ) -> Result<Vec<(usize, Reply)>, ClientError> {
        let t = self.timeouts;
        // A reused connection gets RSET first: it clears whatever a failed transaction left
        // behind, and proves the cached connection is still alive before a message is
        // committed to it. With PIPELINING it rides in the same write as MAIL/RCPT/DATA
        // (RFC 2920 §3.1 allows RSET anywhere in a group), which saves a round trip per
        // message on a busy route; its reply is read first, so a dead connection still
        // fails at the RSET stage, before the server has seen any of this transaction.
        let rset_first = self.used && self.ext.pipelining;
        if self.used && !rset_first {
            self.write(Stage::Rset, t.helo, b"RSET\r\n").await?;
            let reply = self.read_reply(Stage::Rset, t.helo).await?;
            if !reply.is_positive() {
                return Err(ClientError::Unexpected {
                    stage: Stage::Rset,
                    reply,
                });
            }
        }
        let now_micros = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        let plan = match transaction::plan(env, rcpts, body, &self.ext, self.chunking, now_micros) {
            Ok(p) => p,
            Err(reply) => {
                tracing::info!(peer = %self.peer, id = %env.id, %reply, "not sent");
                return Ok(rcpts.iter().map(|&i| (i, reply.clone())).collect());
            }
        };
        if env.body_type == BodyType::EightBitMime
            && !self.ext.eightbitmime
            && transaction::has_8bit(body)
        {
            tracing::info!(peer = %self.peer, id = %env.id, "8-bit body sent to a server without 8BITMIME");
        }
        let mut results = plan.refused.clone();
        if plan.rcpts.is_empty() {
            return Ok(results);
        }
        let mut accepted: Vec<usize> = Vec::with_capacity(plan.rcpts.len());
        // From here on the server has seen this transaction: RSET before the next one.
        self.used = true;
        let data_reply = if self.ext.pipelining {
            // RFC 2920: [RSET,] MAIL, every RCPT and DATA in one write; replies come in order.
            let mut batch = String::with_capacity(64 + plan.mail.len());
            if rset_first {
                batch.push_str("RSET\r\n");
            }
            batch.push_str(&plan.mail);
            for (_, cmd) in &plan.rcpts {
                batch.push_str(cmd);
            }
            let first = if rset_first { Stage::Rset } else { Stage::Mail };
            if plan.bdat_with_commands {
                // RFC 3030 §4.2: BDAT may be pipelined; the body follows its command at
                // once, so the whole transaction is one write and one round trip. The
                // server consumes the chunk even when it refuses it (no recipient).
                // Into the batch directly: no second string per message.
                let _ =
                    fmt::Write::write_fmt(&mut batch, format_args!("BDAT {} LAST\r\n", body.len()));
                if let Err(e) = self.write_pieces(first, [batch.as_bytes(), body]).await {
                    self.broken = true;
                    return self
                        .replies_after_failed_write(&plan, rset_first, results, e)
                        .await;
                }
            } else {
                if !plan.bdat {
                    batch.push_str("DATA\r\n");
                }
                self.write(first, t.mail, batch.as_bytes()).await?;
            }
            // A refused RSET with the message already sent: only the replies tell whether
            // the server took it anyway (then it must not be sent again).
            let mut rset_refused = None;
            if rset_first {
                let reply = self.read_reply(Stage::Rset, t.helo).await?;
                if !reply.is_positive() {
                    // The rest of the group is answered too, out of step with us: this
                    // connection is not used again.
                    self.broken = true;
                    if !plan.bdat_with_commands {
                        return Err(ClientError::Unexpected {
                            stage: Stage::Rset,
                            reply,
                        });
                    }
                    rset_refused = Some(reply);
                }
            }
            let mail = self.read_reply(Stage::Mail, t.mail).await?;
            no_intermediate(Stage::Mail, &mail)?;
            for (i, _) in &plan.rcpts {
                let r = self.read_reply(Stage::Rcpt, t.rcpt).await?;
                no_intermediate(Stage::Rcpt, &r)?;
                if !mail.is_positive() {
                    results.push((*i, mail.clone()));
                } else if r.is_positive() {
                    accepted.push(*i);
                } else {
                    results.push((*i, r));
                }
            }
            if plan.bdat_with_commands {
                // The chunk went with the commands: its reply comes whatever the others
                // said, and is the message's outcome only if some recipient was accepted.
                let last = self.read_reply(Stage::Bdat, t.data_final).await?;
                no_intermediate(Stage::Bdat, &last)?;
                let taken = mail.is_positive() && !accepted.is_empty() && last.is_positive();
                if let Some(reply) = rset_refused {
                    if !taken {
                        // Not taken (or its refusals follow from the refused RSET): try
                        // again later on a fresh connection.
                        return Err(ClientError::Unexpected {
                            stage: Stage::Rset,
                            reply,
                        });
                    }
                }
                if mail.is_positive() && !accepted.is_empty() {
                    results.extend(accepted.iter().map(|&i| (i, last.clone())));
                }
                return Ok(results);
            }
            let data = if plan.bdat {
                None
            } else {
                Some(self.read_reply(Stage::Data, t.data_init).await?)
            };
            if accepted.is_empty() {
                if let Some(d) = &data {
                    if d.code == 354 {
                        // RFC 2920 §3.1: the server wants a message although no
                        // recipient was accepted; send an empty one and ignore the reply.
                        self.write(Stage::DataBody, t.data_block, b".\r\n").await?;
                        let _ = self.read_reply(Stage::DataFinal, t.data_final).await?;
                    } else if d.is_positive() {
                        return Err(ClientError::Unexpected {
                            stage: Stage::Data,
                            reply: d.clone(),
                        });
                    }
                }
                return Ok(results);
            }
            data
        } else {
            self.write(Stage::Mail, t.mail, plan.mail.as_bytes())
                .await?;
            let mail = self.read_reply(Stage::Mail, t.mail).await?;
            no_intermediate(Stage::Mail, &mail)?;
            if !mail.is_positive() {
                results.extend(plan.rcpts.iter().map(|(i, _)| (*i, mail.clone())));
                return Ok(results);
            }
            for (i, cmd) in &plan.rcpts {
                self.write(Stage::Rcpt, t.rcpt, cmd.as_bytes()).await?;
                let r = self.read_reply(Stage::Rcpt, t.rcpt).await?;
                no_intermediate(Stage::Rcpt, &r)?;
                if r.is_positive() {
                    accepted.push(*i);
                } else {
                    results.push((*i, r));
                }
            }
            if accepted.is_empty() {
                return Ok(results);
            }
            if plan.bdat {
                None
            } else {
                self.write(Stage::Data, t.data_init, b"DATA\r\n").await?;
                Some(self.read_reply(Stage::Data, t.data_init).await?)
            }
        };

        let final_reply = match data_reply {
            None => {
                // RFC 3030: one chunk, no dot-stuffing, the body exactly as stored.
                let header = format!("BDAT {} LAST\r\n", body.len());
                self.write_pieces(Stage::Bdat, [header.as_bytes(), body])
                    .await?;
                self.read_reply(Stage::Bdat, t.data_final).await?
            }
            Some(d) if d.code == 354 => {
                self.write_pieces(Stage::DataBody, DataPieces::new(body))
                    .await?;
                self.read_reply(Stage::DataFinal, t.data_final).await?
            }
            Some(d) if d.is_transient() || d.is_permanent() => {
                results.extend(accepted.iter().map(|&i| (i, d.clone())));
                return Ok(results);
            }
            Some(d) => {
                return Err(ClientError::Unexpected {
                    stage: Stage::Data,
                    reply: d,
                })
            }
        };
        no_intermediate(Stage::DataFinal, &final_reply)?;
        results.extend(accepted.iter().map(|&i| (i, final_reply.clone())));
        Ok(results)
    }

    /// The pipelined write carrying the body failed: a server that refused MAIL or every
    /// RCPT may have closed without taking the chunk. Its replies, if they arrived, are the
    /// answer (a 5xx bounces now rather than the upload being retried until `max_age`);
    /// otherwise, or if any recipient was accepted, the write's error stands (deferred).
    async fn replies_after_failed_write(
        &mut self,
        plan: &transaction::Plan,
        rset_first: bool,
        mut results: Vec<(usize, Reply)>,
        err: ClientError,
    ) -> Result<Vec<(usize, Reply)>, ClientError> {
        let d = self.timeouts.mail.min(Duration::from_secs(5));
        if rset_first {
            match self.read_reply(Stage::Rset, d).await {
                Ok(r) if r.is_positive() => {}
                _ => return Err(err),
            }
        }
        let Ok(mail) = self.read_reply(Stage::Mail, d).await else {
            return Err(err);
        };
        if mail.is_transient() || mail.is_permanent() {
            results.extend(plan.rcpts.iter().map(|(i, _)| (*i, mail.clone())));
            return Ok(results);
        }
        for (i, _) in &plan.rcpts {
            match self.read_reply(Stage::Rcpt, d).await {
                Ok(r) if r.is_transient() || r.is_permanent() => results.push((*i, r)),
                _ => return Err(err),
            }
        }
        Ok(results)
    }

    /// QUIT and close (TLS close_notify included). Errors are ignored: the messages are
    /// already accounted for.
    pub async fn quit(mut self) {
        if !self.broken {
            self.best_effort_quit().await;
        }
        let _ = timed(self.timeouts.helo, self.io.close()).await;
    }

    async fn best_effort_quit(&mut self) {
        let t = self.timeouts.helo;
        if self.write(Stage::Quit, t, b"QUIT\r\n").await.is_ok() {
            let _ = self.read_reply(Stage::Quit, t).await;
        }
    }

    async fn write(&mut self, stage: Stage, d: Duration, bytes: &[u8]) -> Result<(), ClientError> {
        write_timed(&mut self.io, stage, d, bytes).await?;
        flush_timed(&mut self.io, stage, d).await
    }

    /// Writes a sequence of slices: small ones are gathered up to [`BLOCK`] bytes, large
    /// ones go out directly in [`BLOCK`]-sized writes; each write has the `data_block`
    /// timeout (RFC 5321 §4.5.3.2.5).
    async fn write_pieces<'a, I>(&mut self, stage: Stage, pieces: I) -> Result<(), ClientError>
    where
        I: IntoIterator<Item = &'a [u8]>,
    {
        let d = self.timeouts.data_block;
        self.wbuf.clear();
        for piece in pieces {
            if self.wbuf.len() + piece.len() > BLOCK && !self.wbuf.is_empty() {
                write_timed(&mut self.io, stage, d, &self.wbuf).await?;
                self.wbuf.clear();
            }
            if piece.len() >= BLOCK {
                for chunk in piece.chunks(BLOCK) {
                    write_timed(&mut self.io, stage, d, chunk).await?;
                }
            } else {
                self.wbuf.extend_from_slice(piece);
            }
        }
        if !self.wbuf.is_empty() {
            write_timed(&mut self.io, stage, d, &self.wbuf).await?;
            self.wbuf.clear();
        }
        if self.wbuf.capacity() > 2 * BLOCK {
            self.wbuf = Vec::new();
        }
        flush_timed(&mut self.io, stage, d).await
    }

    /// Reads one complete reply within `d` (extended by the bytes that arrive, at
    /// [`Timeouts::min_data_rate`], never past `d` from now). A 421 is always an error
    /// (RFC 5321 §3.8).
    async fn read_reply(&mut self, stage: Stage, d: Duration) -> Result<Reply, ClientError> {
        let mut deadline = Instant::now() + d;
        loop {
            match self.parser.parse(&self.rbuf) {
                Ok(Some((reply, n))) => {
                    self.rbuf.drain(..n);
                    if reply.code == 421 {
                        self.broken = true;
                        return Err(ClientError::ServiceClosing(reply));
                    }
                    return Ok(reply);
                }
                Ok(None) => {}
                Err(source) => return Err(ClientError::BadReply { stage, source }),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ClientError::Timeout(stage));
            }
            let old = self.rbuf.len();
            self.rbuf.resize(old + READ_CHUNK, 0);
            let r = timed(left, self.io.read(&mut self.rbuf[old..])).await;
            match r {
                Some(Ok(0)) => {
                    self.rbuf.truncate(old);
                    return Err(ClientError::Closed(stage));
                }
                Some(Ok(n)) => {
                    self.rbuf.truncate(old + n);
                    deadline = extend_deadline(deadline, n, d, self.timeouts.min_data_rate);
                }
                Some(Err(source)) => {
                    self.rbuf.truncate(old);
                    return Err(ClientError::Io { stage, source });
                }
                None => {
                    self.rbuf.truncate(old);
                    return Err(ClientError::Timeout(stage));
                }
            }
        }
    }
}

/// A reply's deadline after `n` more bytes arrived: `n / rate` seconds later, but never
/// more than `wait` from now (a rate of 0: `wait` from now, every read restarts it). The
/// same rule as the inbound side's request deadline (engine `conn.rs`).
fn extend_deadline(deadline: Instant, n: usize, wait: Duration, rate: u64) -> Instant {
    let now = Instant::now();
    let cap = now + wait;
    if rate == 0 {
        return cap;
    }
    let earned = Duration::from_secs_f64(n as f64 / rate as f64);
    deadline
        .max(now)
        .checked_add(earned)
        .unwrap_or(cap)
        .min(cap)
}

async fn write_timed(
    io: &mut Io,
    stage: Stage,
    d: Duration,
    bytes: &[u8],
) -> Result<(), ClientError> {
    match timed(d, io.write_all(bytes)).await {
        None => Err(ClientError::Timeout(stage)),
        Some(Err(source)) => Err(ClientError::Io { stage, source }),
        Some(Ok(())) => Ok(()),
    }
}

async fn flush_timed(io: &mut Io, stage: Stage, d: Duration) -> Result<(), ClientError> {
    match timed(d, io.flush()).await {
        None => Err(ClientError::Timeout(stage)),
        Some(Err(source)) => Err(ClientError::Io { stage, source }),
        Some(Ok(())) => Ok(()),
    }
}

/// A 3xx where only a final answer makes sense is a protocol violation.
fn no_intermediate(stage: Stage, reply: &Reply) -> Result<(), ClientError> {
    if reply.is_intermediate() {
        return Err(ClientError::Unexpected {
            stage,
            reply: reply.clone(),
        });
    }
    Ok(())
}

fn first_word(text: &str) -> String {
    text.split_ascii_whitespace()
        .next()
        .unwrap_or("")
        .chars()
        .take(255)
        .collect()
}
