//! Scenarios: what one operation is, and the session set-up they share.
//!
//! - `connect`: TCP connect (and TLS) to the greeting; one op per connection.
//! - `auth`: connect, greeting, EHLO, [STARTTLS, EHLO], AUTH, QUIT; one op per connection.
//! - `relay`: messages over kept-alive (optionally authenticated) sessions; one op per
//!   message.
//!
//! Each op records its own latencies into the core's `Stats` (only when it started inside
//! the measured window); the runner counts successes and errors. Latencies are measured
//! from `origin`: the actual start in closed loop, the intended start in open loop.

pub mod auth;
pub mod connect;
pub mod relay;

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;

use crate::conn::{OpError, ProxyVersion, SmtpConn, Stream};
use crate::sasl::{Creds, Mech, SaslCache};
use crate::stats::{Progress, Stats};
use crate::tls::Trust;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Connect,
    Auth,
    Relay,
}

impl Kind {
    /// The metric whose rate and latency are the headline.
    pub fn headline(self) -> &'static str {
        match self {
            Kind::Connect => "connect",
            Kind::Auth => "handshake",
            Kind::Relay => "accept",
        }
    }
    pub fn unit(self) -> &'static str {
        match self {
            Kind::Connect => "connections",
            Kind::Auth => "AUTH handshakes",
            Kind::Relay => "messages accepted",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    None,
    Implicit,
    Starttls,
}

#[derive(Clone, Debug)]
pub struct RelayCfg {
    pub size: usize,
    pub rcpts: usize,
    pub msgs_per_conn: u32,
    pub pipeline: bool,
    pub bdat: bool,
    pub from: String,
    /// Recipient template; `{n}` is replaced by the recipient's number (1..=rcpts).
    pub to: String,
    /// `--ids FILE`: keep each sent message's Message-ID and outcome (`Stats::ids`).
    pub ids: Option<std::path::PathBuf>,
}

/// Everything a core needs to run a scenario; shared read-only by all cores.
pub struct ScenarioCfg {
    pub kind: Kind,
    pub target: SocketAddr,
    pub tls: TlsMode,
    pub trust: Trust,
    pub resume: bool,
    pub sni: String,
    pub ehlo: String,
    pub mech: Option<Mech>,
    pub creds: Creds,
    pub relay: RelayCfg,
    pub open_loop: bool,
    /// Begin every connection with a PROXY header claiming this client address (the
    /// connection's own source port), as a balancer in front of the target would.
    pub proxy: Option<(ProxyVersion, std::net::IpAddr)>,
}

/// One core's state: configuration, TLS client config, caches and its measurements.
pub struct Core {
    pub cfg: Arc<ScenarioCfg>,
    pub index: usize,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub server_name: ServerName<'static>,
    pub sasl: SaslCache,
    pub stats: RefCell<Stats>,
    pub progress: Arc<Progress>,
    /// When the measured window starts (end of warm-up).
    pub measure_from: Instant,
    /// Message body filler (relay), built once.
    pub body: Vec<u8>,
    pub seq: Cell<u64>,
}

impl Core {
    /// Records `d` under `metric` if the op is measured.
    pub fn record(&self, measured: bool, metric: &'static str, d: Duration) {
        if measured {
            let mut s = self.stats.borrow_mut();
            s.record(metric, d);
            if metric == self.cfg.kind.headline() {
                let sec = Instant::now()
                    .saturating_duration_since(self.measure_from)
                    .as_secs() as usize;
                s.record_interval(sec, d);
            }
        }
    }

    fn note_tls(&self, measured: bool, conn: &SmtpConn) {
        if measured {
            let mut s = self.stats.borrow_mut();
            match conn.resumed {
                Some(true) => s.tls_resumed += 1,
                Some(false) => s.tls_full += 1,
                None => {}
            }
        }
    }
}

/// One worker's own state. Each worker has its own TLS client configuration and session
/// cache, as separate clients would: rustls keeps at most 8 TLS 1.3 tickets per server
/// name, so workers sharing one cache would race for tickets and fall back to full
/// handshakes even with resumption on.
pub struct Worker {
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// The kept-alive session (relay).
    pub session: Option<Session>,
}

impl Worker {
    pub fn new(core: &Core) -> Worker {
        let tls = core.tls.as_ref().map(|c| {
            let mut own = (**c).clone();
            if core.cfg.resume {
                own.resumption = rustls::client::Resumption::in_memory_sessions(16);
            }
            Arc::new(own)
        });
        Worker { tls, session: None }
    }
}

/// An established session: the connection and the server's name from its greeting.
pub struct Session {
    pub conn: SmtpConn,
    pub host: String,
    pub msgs: u32,
}

/// Connect, TLS as configured, greeting, EHLO (STARTTLS, EHLO). Returns the session and
/// the instant the greeting (after TLS, if any) arrived.
pub async fn open(core: &Core, w: &Worker, measured: bool) -> Result<Session, OpError> {
    let cfg = &core.cfg;
    let mut tcp = crate::conn::connect(cfg.target).await?;
    if let Some((v, ip)) = cfg.proxy {
        use futures_lite::AsyncWriteExt;
        let sport = tcp.local_addr().map(|a| a.port()).unwrap_or(0);
        let hdr = crate::conn::proxy_header(v, std::net::SocketAddr::new(ip, sport), cfg.target);
        tcp.write_all(&hdr)
            .await
            .map_err(|e| OpError::Io(e.to_string()))?;
    }
    if measured {
        core.stats.borrow_mut().connections += 1;
    }
    let mut conn = SmtpConn::new(Stream::Plain(tcp));
    if cfg.tls == TlsMode::Implicit {
        conn.client_tls(w.tls.as_ref().expect("tls config"), &core.server_name)
            .await?;
        core.note_tls(measured, &conn);
    }
    let greeting = conn.read_reply().await?.expect(220)?;
    let host = greeting
        .lines
        .first()
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or("localhost")
        .to_string();
    let ehlo = format!("EHLO {}\r\n", cfg.ehlo);
    conn.cmd(ehlo.as_bytes()).await?.expect(250)?;
    if cfg.tls == TlsMode::Starttls {
        conn.cmd(b"STARTTLS\r\n").await?.expect(220)?;
        conn.client_tls(w.tls.as_ref().expect("tls config"), &core.server_name)
            .await?;
        core.note_tls(measured, &conn);
        conn.cmd(ehlo.as_bytes()).await?.expect(250)?;
    }
    Ok(Session {
        conn,
        host,
        msgs: 0,
    })
}

/// AUTH on an open session; returns the duration of the AUTH exchange alone.
pub async fn authenticate(core: &Core, s: &mut Session, mech: Mech) -> Result<Duration, OpError> {
    let t = Instant::now();
    crate::sasl::authenticate(&mut s.conn, mech, &core.cfg.creds, &s.host, &core.sasl).await?;
    Ok(t.elapsed())
}

/// QUIT politely and wait for the 221; errors here do not matter any more. The stream is
/// then dropped (closed) without a separate shutdown(2): one syscall less per connection
/// on a path where the kernel's loopback TCP already dominates the generator's CPU time.
pub async fn quit(mut s: Session) {
    if s.conn.write_all(b"QUIT\r\n").await.is_ok() {
        let _ = s.conn.read_reply().await;
    }
}
