//! `tern stdio`: one SMTP session on stdin/stdout (sendmail's `-bs`), and the local
//! submission path it shares with `tern sendmail`.
//!
//! NAME
//!   stdio — a real `Session` driven by pipes instead of a socket.
//!
//! DESCRIPTION
//!   Builds the same `SessionConfig` an `smtp` listener gets (hostname, limits, relay
//!   policy), reads stdin into the session, writes its replies to stdout and flushes
//!   whenever the input is drained. The peer address is taken from `$SSH_CLIENT` or
//!   `$REMOTE_ADDR` when present (inetd, ssh), else 127.0.0.1:0.
//!
//!   A finished message is made durable by [`make_durable`]:
//!   - a running server (its admin socket answers) gets an admin `submit` request with
//!     the envelope, the body (base64) and the session's Received: header with the queue
//!     id left as a placeholder; shard 0 assigns the id, writes and syncs the record and
//!     hands it to its runner (see `admin::on_shard`);
//!   - with no server, the first shard spool whose lock is free is opened directly and
//!     the record is written and fdatasync'ed; the next server start recovers it.
//!
//!   Either way the session answers 250 only after the record is durable, else 451 4.3.0
//!   (452 4.3.1 when the spool is full).
//!
//! SECURITY
//!   Whoever runs this is trusted as much as a client from the peer address above: the
//!   relay policy is the listener's. XXX AUTH is not offered on stdio (no user store is
//!   loaded and there is no TLS): the caller is authenticated by the OS (ssh, inetd,
//!   file permissions on the spool/admin socket). STARTTLS is not offered either.
//!   Run as root with no server up, the direct write creates root-owned spool files; a
//!   server that drops privileges hands the whole spool to its user at start-up
//!   (`privileges::drop_privileges`), so it can still read them.
//!
//! CONFIGURATION PARAMETERS
//!   hostname, limits.*, relay.local_domains, relay.trusted_networks, spool.dir,
//!   spool.segment_size, admin.socket, shards.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::rc::Rc;

use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tern_queue::{BodyType, DeliverBy, DeliverByMode, Envelope, Recipient, Ret};

use crate::admin::{self, ClientError, Request};
use crate::config::Config;
use tern_smtp::policy::RelayPolicy;
use tern_smtp::session::{
    Event, ListenerKind, Message, Session, SessionConfig, SessionLimits, StoreError,
};

/// Stands for the queue id in the Received: header sent with a `submit` request. The
/// session's header sanitises client text to printable ASCII, so this byte cannot come
/// from the client.
pub const ID_PLACEHOLDER: &str = "\u{1}";

/// The `SessionConfig` of an `smtp` listener, without TLS and without AUTH.
pub fn session_config(cfg: &Config, extra_trusted: &[ipnet::IpNet]) -> SessionConfig {
    let mut trusted = cfg.relay.trusted_networks.clone();
    trusted.extend_from_slice(extra_trusted);
    SessionConfig {
        hostname: cfg.hostname.clone(),
        kind: ListenerKind::Smtp,
        limits: SessionLimits {
            command_line: cfg.limits.command_line,
            text_line: cfg.limits.text_line,
            message_size: cfg.limits.message_size,
            recipients: cfg.limits.recipients,
            errors: cfg.limits.errors,
        },
        tls_available: false,
        policy: RelayPolicy::new(&cfg.relay.local_domains, &trusted),
        auth: None,
        // A one-session process: its counters are never scraped.
        hooks: Rc::new(tern_smtp::hooks::NoHooks),
        ehlo_cache: Default::default(),
    }
}

/// `$SSH_CLIENT` ("ip port port") or `$REMOTE_ADDR`, else 127.0.0.1:0.
fn peer_from_env() -> SocketAddr {
    let from_ssh = std::env::var("SSH_CLIENT").ok().and_then(|v| {
        let mut it = v.split_whitespace();
        let ip = it.next()?.parse().ok()?;
        let port = it.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        Some(SocketAddr::new(ip, port))
    });
    let from_remote = || {
        std::env::var("REMOTE_ADDR")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .map(|ip| SocketAddr::new(ip, 0))
    };
    from_ssh
        .or_else(from_remote)
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)))
}

/// Runs one session on stdin/stdout; exits 0 on QUIT or EOF.
pub fn run(cfg: &Config) -> ExitCode {
    let scfg = Rc::new(session_config(cfg, &[]));
    let mut session = Session::new(scfg, peer_from_env(), false, crate::clock::now());
    let mut stdin = std::io::stdin().lock();
    let mut stdout = std::io::stdout().lock();
    let mut input = BytesMut::with_capacity(16 * 1024);
    let mut out = BytesMut::with_capacity(4096);
    let mut buf = vec![0u8; 64 * 1024];
    session.greeting(&mut out);
    loop {
        match session.process(&mut input, &mut out, crate::clock::now()) {
            Event::NeedInput => {
                if let Some(d) = session.take_delay() {
                    std::thread::sleep(d);
                }
                if flush(&mut stdout, &mut out).is_err() {
                    return ExitCode::from(74); // EX_IOERR
                }
                match stdin.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => input.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => return ExitCode::from(74),
                }
            }
            Event::Message(mut msg) => {
                let r = make_durable(cfg, &mut msg);
                session.stored(r.as_deref().map_err(|e| *e), &mut out);
            }
            // STARTTLS is never offered here; the session refuses it before this.
            Event::StartTls | Event::Close => break,
            Event::Etrn(node) => {
                // A queue run is the server's business: ask it to flush, if one runs.
                let f = admin::Filter {
                    to_domain: Some(node.trim_start_matches('@').to_string()),
                    ..Default::default()
                };
                let n = admin::call(&cfg.admin_socket(), &Request::Flush(f))
                    .ok()
                    .and_then(|v| v.get("flushed").and_then(|f| f.as_u64()))
                    .unwrap_or(0);
                session.etrn_started(&node, n as usize, &mut out);
            }
        }
    }
    let _ = flush(&mut stdout, &mut out);
    ExitCode::SUCCESS
}

fn flush(w: &mut impl Write, out: &mut BytesMut) -> std::io::Result<()> {
    if !out.is_empty() {
        w.write_all(out)?;
        out.clear();
    }
    w.flush()
}

/// Makes a finished message durable: live `submit` to a running server, else straight
/// into a free shard spool. Returns the queue id.
pub fn make_durable(cfg: &Config, msg: &mut Message) -> Result<String, StoreError> {
    let sock = cfg.admin_socket();
    match admin::connect(&sock) {
        Ok(conn) => submit_live(&sock, conn, cfg, msg),
        Err(ClientError::NoServer { .. }) => store_direct(cfg, msg),
        Err(e) => {
            tracing::error!(error = %e, "admin socket refused the submission");
            Err(StoreError::Local)
        }
    }
}

fn submit_live(
    sock: &std::path::Path,
    conn: std::os::unix::net::UnixStream,
    cfg: &Config,
    msg: &Message,
) -> Result<String, StoreError> {
    let mut body = Vec::with_capacity(msg.envelope.size as usize);
    for b in &msg.body {
        body.extend_from_slice(b);
    }
    let received =
        String::from_utf8_lossy(&msg.received_header(&cfg.hostname, ID_PLACEHOLDER)).into_owned();
    let req = Request::Submit {
        envelope: WireEnvelope::from(&msg.envelope),
        received,
        body: base64::engine::general_purpose::STANDARD.encode(&body),
    };
    match admin::call_on(sock, conn, &req) {
        Ok(v) => v
            .get("id")
            .and_then(|i| i.as_str())
            .map(str::to_string)
            .ok_or(StoreError::Local),
        Err(ClientError::Server(e)) if e.contains("full") => Err(StoreError::Full),
        Err(e) => {
            tracing::error!(error = %e, "submit to the running server failed");
            Err(StoreError::Local)
        }
    }
}

/// No server runs: write the record into the first shard spool whose lock is free.
fn store_direct(cfg: &Config, msg: &mut Message) -> Result<String, StoreError> {
    let opts = tern_queue::SpoolOptions {
        segment_size: cfg.spool.segment_size,
    };
    let mut last_err = None;
    for shard in 0..cfg.shard_count() {
        let spool = tern_queue::ShardSpool::open_with(
            &cfg.spool.dir,
            shard as u16,
            opts.clone(),
            tern_queue::Listing::QueueOnly,
        );
        let mut spool = match spool {
            Ok((s, _)) => s,
            Err(e) => {
                // Locked by someone else (or unreadable): try the next shard.
                last_err = Some(e);
                continue;
            }
        };
        let id = spool.id_gen().next();
        msg.finish(&cfg.hostname, &id);
        let write = spool.prepare(&msg.envelope, &msg.body).map_err(|e| {
            tracing::error!(error = %e, "spool prepare failed");
            if e.is_full() {
                StoreError::Full
            } else {
                StoreError::Local
            }
        })?;
        return match tern_queue::commit_batch(vec![write]).pop() {
            Some(Ok(c)) => Ok(c.id),
            Some(Err(e)) => {
                tracing::error!(error = %e, "spool commit failed");
                Err(StoreError::Local)
            }
            None => Err(StoreError::Local),
        };
    }
    if let Some(e) = last_err {
        tracing::error!(error = %e, "no shard spool could be opened");
    }
    Err(StoreError::Local)
}

// ---------------------------------------------------------------------------------------
// The envelope on the admin socket
// ---------------------------------------------------------------------------------------

/// An envelope as JSON (the spool's `Envelope` is rkyv-only). `id` and `size` are set by
/// the shard that stores it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireEnvelope {
    pub sender: String,
    pub recipients: Vec<WireRecipient>,
    pub arrival_unix_micros: u64,
    /// "7bit", "8bitmime" or "binarymime".
    pub body_type: String,
    pub smtputf8: bool,
    /// "full" or "hdrs".
    pub ret: Option<String>,
    pub envid: Option<String>,
    /// (seconds, "R" or "N", trace).
    pub deliver_by: Option<(i64, String, bool)>,
    pub auth: Option<String>,
    pub client_helo: String,
    pub client_addr: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireRecipient {
    pub addr: String,
    pub notify: u8,
    pub orcpt: Option<String>,
}

impl From<&Envelope> for WireEnvelope {
    fn from(e: &Envelope) -> Self {
        WireEnvelope {
            sender: e.sender.clone(),
            recipients: e
                .recipients
                .iter()
                .map(|r| WireRecipient {
                    addr: r.addr.clone(),
                    notify: r.notify,
                    orcpt: r.orcpt.clone(),
                })
                .collect(),
            arrival_unix_micros: e.arrival_unix_micros,
            body_type: match e.body_type {
                BodyType::SevenBit => "7bit",
                BodyType::EightBitMime => "8bitmime",
                BodyType::BinaryMime => "binarymime",
            }
            .into(),
            smtputf8: e.smtputf8,
            ret: e.ret.map(|r| {
                match r {
                    Ret::Full => "full",
                    Ret::Hdrs => "hdrs",
                }
                .into()
            }),
            envid: e.envid.clone(),
            deliver_by: e.deliver_by.map(|b| {
                let m = match b.mode {
                    DeliverByMode::Return => "R",
                    DeliverByMode::Notify => "N",
                };
                (b.seconds, m.to_string(), b.trace)
            }),
            auth: e.auth.clone(),
            client_helo: e.client_helo.clone(),
            client_addr: e.client_addr.clone(),
        }
    }
}

impl WireEnvelope {
    /// The spool envelope (id empty, size 0: the storing shard fills them in).
    pub fn to_envelope(&self) -> Result<Envelope, String> {
        Ok(Envelope {
            id: String::new(),
            sender: self.sender.clone(),
            recipients: self
                .recipients
                .iter()
                .map(|r| Recipient {
                    addr: r.addr.clone(),
                    notify: r.notify,
                    orcpt: r.orcpt.clone(),
                })
                .collect(),
            arrival_unix_micros: self.arrival_unix_micros,
            size: 0,
            body_type: match self.body_type.as_str() {
                "7bit" => BodyType::SevenBit,
                "8bitmime" => BodyType::EightBitMime,
                "binarymime" => BodyType::BinaryMime,
                o => return Err(format!("bad body_type {o:?}")),
            },
            smtputf8: self.smtputf8,
            ret: match self.ret.as_deref() {
                None => None,
                Some("full") => Some(Ret::Full),
                Some("hdrs") => Some(Ret::Hdrs),
                Some(o) => return Err(format!("bad ret {o:?}")),
            },
            envid: self.envid.clone(),
            deliver_by: self
                .deliver_by
                .as_ref()
                .map(|(seconds, m, trace)| DeliverBy {
                    seconds: *seconds,
                    mode: if m == "R" {
                        DeliverByMode::Return
                    } else {
                        DeliverByMode::Notify
                    },
                    trace: *trace,
                }),
            auth: self.auth.clone(),
            client_helo: self.client_helo.clone(),
            client_addr: self.client_addr.clone(),
        })
    }
}

/// Decodes a `submit` request's envelope and body (id and size are set when stored).
pub fn decode_submit(envelope: &WireEnvelope, body: &str) -> Result<(Envelope, Bytes), String> {
    let env = envelope.to_envelope()?;
    if env.recipients.is_empty() {
        return Err("no recipients".into());
    }
    let body = base64::engine::general_purpose::STANDARD
        .decode(body)
        .map_err(|e| format!("bad body: {e}"))?;
    Ok((env, Bytes::from(body)))
}
