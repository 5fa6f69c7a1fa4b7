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
use bytes::BytesMut;

use tern_engine::admin::proto::{
    self as admin, ClientError, Request, WireEnvelope, ID_PLACEHOLDER,
};
use tern_engine::config::Config;
use tern_smtp::policy::RelayPolicy;
use tern_smtp::session::{Event, ListenerKind, Message, Session, SessionConfig, StoreError};

/// The `SessionConfig` of an `smtp` listener, without TLS and without AUTH.
pub fn session_config(cfg: &Config, extra_trusted: &[ipnet::IpNet]) -> SessionConfig {
    let mut trusted = cfg.relay.trusted_networks.clone();
    trusted.extend_from_slice(extra_trusted);
    SessionConfig {
        hostname: cfg.hostname.clone(),
        kind: ListenerKind::Smtp,
        limits: cfg.session_limits(),
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
    let mut session = Session::new(scfg, peer_from_env(), false, tern_engine::clock::now());
    let mut stdin = std::io::stdin().lock();
    let mut stdout = std::io::stdout().lock();
    let mut input = BytesMut::with_capacity(16 * 1024);
    let mut out = BytesMut::with_capacity(4096);
    let mut buf = vec![0u8; 64 * 1024];
    session.greeting(&mut out);
    loop {
        match session.process(&mut input, &mut out, tern_engine::clock::now()) {
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
            // No content filters here (filter_commands is never set): nothing to ask.
            Event::Check(_) => session.checked(None, &mut out),
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
            Some(Ok(c)) => Ok(c.id.as_str().to_owned()),
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
