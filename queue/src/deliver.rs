//! One delivery attempt to one destination, for the runner: maildir or SMTP, with the
//! per-recipient outcome mapped to delivered / failed / deferred.
//!
//! Owns the policy of turning client results into outcomes: a 2xx is delivered (with what
//! the next hop offered, for success DSNs), a 5xx is a permanent failure, a 4xx, a
//! connection failure or a local error is deferred; a permanent DNS answer about the
//! domain (null MX, NXDOMAIN) fails, other DNS trouble defers. Tries each address of each
//! host in order until one answers (a TLS failure moves on too). Chooses the client
//! options per next hop: the route's or the MX domain's TLS policy over the global one,
//! AUTH only to the relay host. Keeps idle connections per address *and* per security
//! settings, so a connection opened under a weaker TLS policy is never reused for a
//! stricter one. Hands every connection the shard's prebuilt TLS configuration for its
//! trust policy (`tls_configs`), so connections to a hop resume TLS sessions. Must never
//! turn a connection problem into a bounce, or block the shard (maildir writes and CA
//! file reads run on the blocking thread, DNS on the resolver thread, `route::Dns`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::client::{
    connect, ClientError, ClientOptions, Connection, Reply, Stage, StarttlsPolicy,
};
use crate::config::RunnerConfig;
use crate::dsn::{DsnKind, DsnStatus};
use crate::outcome::{NextHop, Outcome};
use crate::route::Destination;
use crate::tls_configs::{TlsConfigs, TrustKey};
use crate::Envelope;

/// Delivers recipients `idx` of `env` to `dest`.
pub(crate) async fn to_destination(
    cfg: &RunnerConfig,
    pool: &ConnPool,
    dest: &Destination,
    env: &Envelope,
    body: &Bytes,
    idx: &[usize],
) -> Vec<(usize, Outcome)> {
    match dest {
        Destination::Maildir(path) => to_maildir(cfg, path, env, body, idx).await,
        Destination::Smtp {
            host,
            port,
            mx,
            tls,
            ..
        } => {
            let mut opts = cfg.client.clone();
            if let Some(t) = tls {
                t.apply(&mut opts);
            }
            if *mx {
                via_mx(cfg, pool, &opts, host, *port, env, body, idx).await
            } else {
                // The relayhost may want AUTH (sendmail's authinfo, Postfix's
                // smtp_sasl_password_maps); never to anyone else.
                let relay = cfg
                    .relayhost
                    .as_ref()
                    .is_some_and(|(h, p)| h.eq_ignore_ascii_case(host) && p == port);
                if relay {
                    opts.auth = cfg.relayhost_auth.clone();
                }
                to_smtp(
                    cfg,
                    pool,
                    &opts,
                    std::slice::from_ref(host),
                    *port,
                    env,
                    body,
                    idx,
                )
                .await
            }
        }
        Destination::Mx(domain) => match cfg.router.mx_tls_policy(domain) {
            Some(t) => {
                let mut opts = cfg.client.clone();
                t.apply(&mut opts);
                via_mx(cfg, pool, &opts, domain, cfg.mx_port, env, body, idx).await
            }
            None => via_mx(cfg, pool, &cfg.client, domain, cfg.mx_port, env, body, idx).await,
        },
    }
}

/// SMTP to the MX hosts of `domain` (RFC 5321 §5.1). A permanent DNS answer (null MX,
/// NXDOMAIN, no mail host) fails the recipients; any other DNS trouble defers them.
#[allow(clippy::too_many_arguments)]
async fn via_mx(
    cfg: &RunnerConfig,
    pool: &ConnPool,
    opts: &ClientOptions,
    domain: &str,
    port: u16,
    env: &Envelope,
    body: &Bytes,
    idx: &[usize],
) -> Vec<(usize, Outcome)> {
    match cfg.dns.mx_hosts(domain).await {
        Ok(mx) => to_smtp(cfg, pool, opts, &mx.hosts, port, env, body, idx).await,
        Err(e) => {
            let text = e.to_string();
            let outcome = match e.permanent() {
                Some((code, enhanced)) => {
                    Outcome::failed_locally(Reply::local(code, enhanced, text))
                }
                None => Outcome::Deferred(format!("451 4.4.3 {text}")),
            };
            idx.iter().map(|&i| (i, outcome.clone())).collect()
        }
    }
}

async fn to_maildir(
    cfg: &RunnerConfig,
    path: &std::path::Path,
    env: &Envelope,
    body: &Bytes,
    idx: &[usize],
) -> Vec<(usize, Outcome)> {
    let env = Arc::new(env.clone());
    let body = body.clone();
    let path = path.to_path_buf();
    let hostname = cfg.hostname.clone();
    let idx_owned = idx.to_vec();
    let results = glommio::executor()
        .spawn_blocking(move || {
            // glommio reads an uninitialised result if the closure panics.
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                idx_owned
                    .iter()
                    .map(|&i| (i, crate::maildir::deliver(&path, &env, i, &body, &hostname)))
                    .map(|(i, r)| match r {
                        Ok(p) => (i, Ok(p.display().to_string())),
                        Err(e) => (i, Err((e.is_no_space(), e.to_string()))),
                    })
                    .collect::<Vec<_>>()
            }))
            .unwrap_or_default()
        })
        .await;
    let mut out: Vec<(usize, Outcome)> = results
        .into_iter()
        .map(|(i, r)| match r {
            Ok(p) => (
                i,
                Outcome::Delivered {
                    line: format!("250 2.0.0 delivered to maildir as {p}"),
                    // What a success DSN says: no file names.
                    reply: Reply::local(250, (2, 0, 0), "delivered to mailbox"),
                    hop: None,
                },
            ),
            Err((true, e)) => (i, Outcome::Deferred(format!("452 4.3.1 maildir full: {e}"))),
            Err((false, e)) => (i, Outcome::Deferred(format!("451 4.3.0 maildir: {e}"))),
        })
        .collect();
    for &i in idx {
        if !out.iter().any(|(j, _)| *j == i) {
            out.push((
                i,
                Outcome::Deferred("451 4.3.0 local delivery failed".into()),
            ));
        }
    }
    out
}

fn reply_line(r: &Reply) -> String {
    match r.enhanced_string() {
        Some(e) => format!("{} {} {}", r.code, e, r.text.replace('\n', " ")),
        None => format!("{} {}", r.code, r.text.replace('\n', " ")),
    }
}

#[allow(clippy::too_many_arguments)]
async fn to_smtp(
    cfg: &RunnerConfig,
    pool: &ConnPool,
    base: &ClientOptions,
    hosts: &[String],
    port: u16,
    env: &Envelope,
    body: &Bytes,
    idx: &[usize],
) -> Vec<(usize, Outcome)> {
    // The shard's configuration for this trust policy, built before any connection: a
    // local fault (an unreadable CA file) defers at once with its own error, whatever
    // the next hop offers, and never looks like a server problem.
    let tls_config = if base.starttls == StarttlsPolicy::Never {
        None
    } else {
        match pool.tls.get(&TrustKey::of(base)).await {
            Ok(c) => Some(c),
            Err(e) => {
                let why = format!("451 4.7.5 {}", ClientError::TlsConfig(e));
                tracing::warn!(ca_file = ?base.ca_file, "{why}");
                return idx
                    .iter()
                    .map(|&i| (i, Outcome::Deferred(why.clone())))
                    .collect();
            }
        }
    };
    let mut last_err = String::from("no address to connect to");
    for host in hosts {
        let addrs = match cfg.dns.resolve(host, port).await {
            Ok(a) => a,
            Err(e) => {
                last_err = format!("{host}: {e}");
                continue;
            }
        };
        for addr in addrs {
            let mut opts = base.clone();
            opts.tls_config = tls_config.clone();
            if opts.server_name.is_none() && host.parse::<std::net::IpAddr>().is_err() {
                opts.server_name = Some(host.clone());
            }
            let key = (addr, security_key(&opts));
            // A cached connection to this address first; a fresh one if there is none or
            // if the cached one turns out to have been closed by the server meanwhile.
            let mut reused = pool.take(key);
            let result = loop {
                let was_reused = reused.is_some();
                let mut conn = match reused.take() {
                    Some(c) => c,
                    None => match connect(addr, &opts).await {
                        Ok(c) => c,
                        Err(e) => break Err(e),
                    },
                };
                match conn.send(env, idx, body).await {
                    Ok(replies) => {
                        let ext = conn.extensions();
                        let hop = std::rc::Rc::new(NextHop {
                            mta: host.clone(),
                            dsn: ext.dsn,
                            deliverby: ext.deliverby.is_some(),
                        });
                        pool.put(key, conn);
                        break Ok((replies, hop));
                    }
                    Err(e) if was_reused && stale(&e) => continue,
                    Err(e) => break Err(e),
                }
            };
            match result {
                Ok((replies, hop)) => {
                    return replies
                        .into_iter()
                        .map(|(i, r)| {
                            let line = format!("{host}[{addr}] said: {}", reply_line(&r));
                            let o = if r.is_positive() {
                                Outcome::Delivered {
                                    line,
                                    reply: r,
                                    hop: Some(hop.clone()),
                                }
                            } else if r.is_permanent() {
                                Outcome::Failed {
                                    line,
                                    reply: r,
                                    mta: Some(host.clone()),
                                }
                            } else {
                                Outcome::Deferred(line)
                            };
                            (i, o)
                        })
                        .collect();
                }
                Err(e) => {
                    // A 5xx greeting/HELO means this host will not take mail: try the next.
                    // So does a TLS failure (no STARTTLS where the policy needs it, a
                    // certificate that does not verify): another MX may do better, and
                    // the mail is deferred, never sent in the clear.
                    last_err = format!("{host}[{addr}]: {e}");
                    // Connection-level trouble after connecting: do not try other hosts
                    // with the same transaction half done elsewhere; defer.
                    let before_transaction = matches!(
                        e,
                        ClientError::Connect { .. }
                            | ClientError::Greeting(_)
                            | ClientError::Helo(_)
                            | ClientError::StartTlsNotOffered
                            | ClientError::StartTlsRefused(_)
                            | ClientError::Tls(_)
                            | ClientError::ServerName(_)
                            | ClientError::Timeout(
                                Stage::Connect
                                    | Stage::Greeting
                                    | Stage::StartTls
                                    | Stage::TlsHandshake
                            )
                    );
                    if !before_transaction {
                        return idx
                            .iter()
                            .map(|&i| (i, Outcome::Deferred(last_err.clone())))
                            .collect();
                    }
                }
            }
        }
    }
    idx.iter()
        .map(|&i| (i, Outcome::Deferred(last_err.clone())))
        .collect()
}

/// A cached connection failed before any transaction data: the server closed it while it
/// sat idle. Only then is the message retried on a fresh connection (after the final dot a
/// retry could deliver twice).
fn stale(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::Closed(Stage::Rset)
            | ClientError::Io {
                stage: Stage::Rset,
                ..
            }
            | ClientError::Broken
    )
}

/// How long an outbound connection may sit idle in the cache.
const POOL_IDLE: Duration = Duration::from_secs(5);
/// Idle connections kept per address.
const POOL_PER_ADDR: usize = 16;

/// What a cached connection is keyed by: the address, and a hash of every option that
/// decides its security (STARTTLS policy, verification, CA file, verified name, AUTH
/// user). A connection opened in plaintext for a `may` route is thus never handed to a
/// `verify` route to the same address. SipHash with fixed keys: a collision between the
/// handful of option sets a shard uses is not a practical concern, and the key costs no
/// allocation per delivery.
type PoolKey = (SocketAddr, u64);

fn security_key(o: &ClientOptions) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    o.starttls.hash(&mut h);
    o.verify_certs.hash(&mut h);
    o.ca_file.hash(&mut h);
    o.server_name.hash(&mut h);
    o.auth.as_ref().map(|(user, _)| user).hash(&mut h);
    o.helo.hash(&mut h);
    h.finish()
}

/// One shard's cache of idle outbound connections (Postfix's connection cache): a message
/// to an address that was just delivered to reuses the open, already-EHLO'd (and TLS'd)
/// connection, with RSET between transactions. With it, the TLS configurations new
/// connections are opened with. Shard-local, never shared.
#[derive(Default)]
pub(crate) struct ConnPool {
    idle: RefCell<HashMap<PoolKey, Vec<(Connection, Instant)>>>,
    pub(crate) tls: TlsConfigs,
}

impl ConnPool {
    fn take(&self, key: PoolKey) -> Option<Connection> {
        let mut idle = self.idle.borrow_mut();
        let list = idle.get_mut(&key)?;
        while let Some((c, since)) = list.pop() {
            if since.elapsed() < POOL_IDLE && c.is_usable() {
                return Some(c);
            }
        }
        None
    }

    fn put(&self, key: PoolKey, c: Connection) {
        if !c.is_usable() {
            return;
        }
        let mut idle = self.idle.borrow_mut();
        let list = idle.entry(key).or_default();
        if list.len() < POOL_PER_ADDR {
            list.push((c, Instant::now()));
        }
    }

    /// Closes every idle connection (their TLS was set up under trust settings a reload
    /// replaced).
    pub(crate) fn clear(&self) {
        self.idle.borrow_mut().clear();
    }

    /// Closes connections idle for too long (dropping one closes its socket).
    pub(crate) fn sweep(&self) {
        let mut idle = self.idle.borrow_mut();
        for list in idle.values_mut() {
            list.retain(|(_, since)| since.elapsed() < POOL_IDLE);
        }
        idle.retain(|_, list| !list.is_empty());
    }
}

/// The RFC 3464 report for `failed`, or None when nobody asked for one.
pub(crate) fn build_dsn(
    hostname: &str,
    env: &Envelope,
    failed: &[(usize, Reply, Option<String>)],
    kind: DsnKind,
    original: &[u8],
) -> Option<Vec<u8>> {
    let statuses: Vec<(usize, DsnStatus)> = failed
        .iter()
        .map(|(i, r, mta)| (*i, DsnStatus::from_reply(r, mta.clone())))
        .collect();
    crate::dsn::bounce(hostname, env, &statuses, kind, original, SystemTime::now())
}
