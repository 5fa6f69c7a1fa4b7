//! The admin socket's server side: `tern queue ...` and `tern ctl ...` against a running server.
//!
//! NAME
//!   admin — a local control socket and its server thread (the wire format and the
//!   client are `admin::proto`).
//!
//! DESCRIPTION
//!   The server listens on a Unix stream socket (`admin.socket`, by default `admin.sock`
//!   in the spool directory), served by one dedicated std thread of the main process,
//!   one connection at a time. A connection carries exactly one exchange:
//!
//!   ```text
//!   client → {"op":"list","state":"held"}\n        one JSON object on one line
//!   server → {"ok":true,"items":[...]}\n            one JSON object, then close
//!   ```
//!
//!   Operations: `list`, `show`, `flush`, `delete`, `hold`, `release`, `stats` (queue,
//!   answered by every shard and merged here), `status`, `reload`, `stop`, `log-level`
//!   (server), `submit` (store one message; shard 0 only). Failures are `{"ok":false,"error":"..."}`. Queue operations travel to the
//!   shards through their control channels (`shard::Control::Admin`); each shard's
//!   control task runs them on its own thread against its own `Runner`, and answers on a
//!   std channel with a JSON value. No shard state is ever touched from this thread.
//!
//! SECURITY
//!   The socket is created with mode 0600 (umask 0177 around bind(2), then chmod), so only
//!   the server's owner (and root) can connect; every connection's peer credentials
//!   (SO_PEERCRED) are checked again: uid 0 or the server's effective uid. Requests are
//!   one line of at most 64 KiB (a `submit` line: `MAX_SUBMIT`), read with a timeout, so a stuck client cannot hold the
//!   thread. Nothing here is reachable from the network.
//!
//! DIAGNOSTICS
//!   A second server on the same socket is refused at start-up (the socket answers); a
//!   stale socket file (nobody answers) is removed; a path that exists but is not a
//!   socket is never removed.
//!
//! CONFIGURATION PARAMETERS
//!   `admin.socket`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::channel::mpsc;
use serde_json::{json, Map, Value};

use super::proto::{
    decode_submit, item_json, show_json, Request, ShardAnswer, WireEnvelope, BODY_CAP,
    ID_PLACEHOLDER, SHARD_TIMEOUT,
};
use crate::shard::{Control, Shard};

/// Longest request line.
const MAX_REQUEST: u64 = 64 * 1024;
/// Longest `submit` request line: base64 of a message of up to 64 MiB, plus the envelope.
const MAX_SUBMIT: u64 = 90 << 20;
/// Changes the tracing filter at run time (`tern ctl log-level`); set up by main.rs.
pub type LogLevelFn = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

// ---------------------------------------------------------------------------------------
// Server side: the socket
// ---------------------------------------------------------------------------------------

/// The bound admin socket. Dropping it removes the socket file (if it is still ours).
pub struct AdminSocket {
    path: PathBuf,
    ino: u64,
    listener: Option<UnixListener>,
}

impl AdminSocket {
    /// Binds `path` mode 0600. Refuses when another server answers there; removes a stale
    /// socket file; never removes anything that is not a socket.
    pub fn bind(path: &Path) -> Result<AdminSocket, String> {
        let shown = path.display();
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(format!("admin socket {shown} exists and is not a socket"));
            }
            match UnixStream::connect(path) {
                Ok(_) => {
                    return Err(format!(
                    "another server answers on the admin socket {shown} (is tern already running?)"
                ))
                }
                Err(_) => {
                    tracing::info!(socket = %shown, "removing a stale admin socket");
                    std::fs::remove_file(path)
                        .map_err(|e| format!("cannot remove stale admin socket {shown}: {e}"))?;
                }
            }
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        // The socket's mode comes from the umask at bind(2): no window in which another
        // user could connect. umask is process-wide; this runs before any shard starts.
        // SAFETY: umask(2) cannot fail and touches no memory.
        let old = unsafe { libc::umask(0o177) };
        let bound = UnixListener::bind(path);
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        let listener = bound.map_err(|e| format!("cannot bind admin socket {shown}: {e}"))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| format!("cannot chmod admin socket {shown}: {e}"))?;
        let ino = std::fs::symlink_metadata(path)
            .map(|m| m.ino())
            .map_err(|e| format!("admin socket {shown}: {e}"))?;
        Ok(AdminSocket {
            path: path.to_path_buf(),
            ino,
            listener: Some(listener),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for AdminSocket {
    fn drop(&mut self) {
        // Only our own socket: a newer server may have replaced it meanwhile.
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.ino) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// What the admin thread needs from the server.
pub struct AdminCtx {
    pub controls: Vec<mpsc::UnboundedSender<Control>>,
    /// Stops the server (what SIGTERM does); false if it was stopping already.
    pub stop: Box<dyn Fn() -> bool + Send>,
    /// Reloads the user store (what SIGHUP does): the number of users, or why not.
    pub reload: Box<dyn Fn() -> Result<usize, String> + Send>,
    pub log_level: Option<LogLevelFn>,
    pub started: Instant,
    /// The Redis thread's state, with `[cluster] redis`.
    pub cluster: Option<Arc<crate::cluster::Status>>,
    /// A client for the same Redis, to read the cluster's counts (`tern ctl limits`).
    pub cluster_client: Option<redis::Client>,
    /// The user store's state (file or database, fallback, snapshot age).
    pub userstore: Arc<crate::pgusers::Status>,
}

/// Starts the admin thread on `sock`'s listener.
pub fn spawn(sock: &mut AdminSocket, ctx: AdminCtx) -> std::io::Result<()> {
    let Some(listener) = sock.listener.take() else {
        return Ok(());
    };
    let path = sock.path.clone();
    std::thread::Builder::new()
        .name("tern-admin".into())
        .spawn(move || {
            let level = Mutex::new(None::<String>);
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                if let Err(e) = serve_one(&ctx, &level, conn) {
                    tracing::warn!(socket = %path.display(), error = %e, "admin request failed");
                }
            }
        })?;
    Ok(())
}

/// The peer's uid (SO_PEERCRED).
fn peer_uid(s: &UnixStream) -> std::io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: cred and len are valid for writing and sized for SO_PEERCRED.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred.uid)
}

fn serve_one(
    ctx: &AdminCtx,
    level: &Mutex<Option<String>>,
    conn: UnixStream,
) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    conn.set_write_timeout(Some(Duration::from_secs(10)))?;
    let uid = peer_uid(&conn)?;
    // SAFETY: geteuid(2) cannot fail.
    let me = unsafe { libc::geteuid() };
    let mut w = &conn;
    if uid != 0 && uid != me {
        tracing::warn!(uid, "admin socket: connection from another user refused");
        return writeln!(w, "{}", json!({"ok": false, "error": "permission denied"}));
    }
    let mut line = String::new();
    let mut r = BufReader::new(&conn);
    // A `submit` carries a whole message; every other request stays within 64 KiB.
    let head = r.fill_buf()?;
    let limit = if head.starts_with(br#"{"op":"submit""#) {
        MAX_SUBMIT
    } else {
        MAX_REQUEST
    };
    r.take(limit).read_line(&mut line)?;
    let (answer, stop) = match serde_json::from_str::<Request>(line.trim()) {
        Ok(req) => {
            if !matches!(req, Request::Submit { .. }) {
                tracing::debug!(request = ?req, "admin request");
            }
            let stop = matches!(req, Request::Stop);
            (handle(ctx, level, req), stop)
        }
        Err(e) => (Err(format!("bad request: {e}")), false),
    };
    let v = match answer {
        Ok(Value::Object(mut m)) => {
            m.insert("ok".into(), Value::Bool(true));
            Value::Object(m)
        }
        Ok(v) => json!({"ok": true, "result": v}),
        Err(e) => json!({"ok": false, "error": e}),
    };
    let r = writeln!(w, "{v}");
    // Answer first, then stop: the client learns that the stop was taken.
    if stop {
        tracing::info!("stop requested on the admin socket: no new connections, draining sessions");
        (ctx.stop)();
    }
    r
}

fn handle(ctx: &AdminCtx, level: &Mutex<Option<String>>, req: Request) -> Result<Value, String> {
    match req {
        Request::Stop => Ok(json!({"stopping": true})),
        Request::Reload => {
            tracing::info!("reload requested on the admin socket: reloading the user store");
            (ctx.reload)().map(|n| json!({"users": n}))
        }
        Request::LogLevel { level: l } => {
            let f = ctx
                .log_level
                .as_ref()
                .ok_or("this server cannot change its log level")?;
            f(&l)?;
            tracing::info!(level = %l, "log level changed on the admin socket");
            *level.lock().unwrap_or_else(|e| e.into_inner()) = Some(l.clone());
            Ok(json!({"level": l}))
        }
        Request::Delete(ref f) if f.id.is_none() && f.from.is_none() && f.to_domain.is_none() => {
            Err("delete needs a queue id, a sender or a recipient domain".into())
        }
        Request::Hold(ref f) | Request::Release(ref f) if f.is_empty() => {
            Err("hold/release need a selection (a queue id)".into())
        }
        // Shard 0 stores submissions: one shard, so the answer is one queue id.
        Request::Submit { .. } => {
            let first = ctx.controls.first().ok_or("no shard runs")?;
            let answers = ask_shards(std::slice::from_ref(first), &req)?;
            answers.into_iter().next().ok_or_else(|| "no answer".into())
        }
        req => {
            let answers = ask_shards(&ctx.controls, &req)?;
            let mut v = merge(&req, answers)?;
            if let (Request::Limits { .. }, Some(client)) = (&req, &ctx.cluster_client) {
                add_cluster_counts(client, &mut v);
            }
            if let (Request::Status, Value::Object(m)) = (&req, &mut v) {
                m.insert("pid".into(), json!(std::process::id()));
                m.insert("version".into(), json!(env!("CARGO_PKG_VERSION")));
                m.insert("uptime_secs".into(), json!(ctx.started.elapsed().as_secs()));
                let l = level.lock().unwrap_or_else(|e| e.into_inner()).clone();
                m.insert("log_level".into(), json!(l));
                if let Some(c) = &ctx.cluster {
                    use std::sync::atomic::Ordering::Relaxed;
                    m.insert(
                        "cluster".into(),
                        json!({
                            "redis": c.url,
                            "up": c.is_up(),
                            "fallbacks": c.fallbacks.load(Relaxed),
                            "round_trips": c.round_trips.load(Relaxed),
                            "ops": c.ops.load(Relaxed),
                            "dropped": c.dropped.load(Relaxed),
                        }),
                    );
                }
                m.insert("userstore".into(), ctx.userstore.json());
            }
            Ok(v)
        }
    }
}

/// `tern ctl limits` with `[cluster] redis`: each login's counts in the cluster's current
/// windows, read from Redis (`cluster_messages`, `cluster_recipients`; null without a
/// count); `cluster_error` when Redis does not answer (the local view is still shown).
fn add_cluster_counts(client: &redis::Client, v: &mut Value) {
    let logins: Vec<String> = v["users"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|u| u["user"].as_str().map(str::to_string))
        .collect();
    match crate::cluster::redis::read_counts(client, &logins) {
        Ok(counts) => {
            if let Some(users) = v["users"].as_array_mut() {
                for (u, (m, r)) in users.iter_mut().zip(counts) {
                    u["cluster_messages"] = json!(m);
                    u["cluster_recipients"] = json!(r);
                }
            }
        }
        Err(e) => {
            v["cluster_error"] = json!(crate::config::redact_url(&e));
        }
    }
}

/// Sends `req` to every shard and collects their answers (in shard order).
fn ask_shards(
    controls: &[mpsc::UnboundedSender<Control>],
    req: &Request,
) -> Result<Vec<Value>, String> {
    let req = Arc::new(req.clone());
    let (tx, rx) = std::sync::mpsc::channel::<ShardAnswer>();
    for c in controls {
        c.unbounded_send(Control::Admin(req.clone(), tx.clone()))
            .map_err(|_| "the server is stopping".to_string())?;
    }
    drop(tx);
    let deadline = Instant::now() + SHARD_TIMEOUT;
    let mut got: Vec<(usize, Value)> = Vec::with_capacity(controls.len());
    while got.len() < controls.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((shard, Ok(v))) => got.push((shard, v)),
            Ok((shard, Err(e))) => return Err(format!("shard {shard}: {e}")),
            Err(_) => return Err("a shard did not answer in time (or is stopping)".into()),
        }
    }
    got.sort_by_key(|(s, _)| *s);
    Ok(got.into_iter().map(|(_, v)| v).collect())
}

fn add_counts(into: &mut Map<String, Value>, from: &Value, keys: &[&str]) {
    for k in keys {
        let a = into.get(*k).and_then(Value::as_u64).unwrap_or(0);
        let b = from.get(*k).and_then(Value::as_u64).unwrap_or(0);
        into.insert((*k).to_string(), json!(a + b));
    }
}

/// Merges the shards' answers into one.
fn merge(req: &Request, answers: Vec<Value>) -> Result<Value, String> {
    Ok(match req {
        Request::List(_) => {
            let mut items: Vec<Value> = answers
                .into_iter()
                .filter_map(|mut a| a.get_mut("items").map(Value::take))
                .flat_map(|v| match v {
                    Value::Array(a) => a,
                    _ => Vec::new(),
                })
                .collect();
            items.sort_by_key(|i| {
                (
                    i.get("arrival_unix_micros").and_then(Value::as_u64),
                    i.get("id").and_then(Value::as_str).map(str::to_string),
                )
            });
            json!({ "items": items })
        }
        Request::Show { .. } => {
            let item = answers
                .into_iter()
                .filter_map(|mut a| a.get_mut("item").map(Value::take))
                .find(|v| !v.is_null())
                .unwrap_or(Value::Null);
            json!({ "item": item })
        }
        Request::Flush(_) => {
            let mut m = Map::new();
            for a in &answers {
                add_counts(&mut m, a, &["flushed"]);
            }
            Value::Object(m)
        }
        Request::Delete(_) | Request::Hold(_) | Request::Release(_) => {
            let mut m = Map::new();
            for a in &answers {
                add_counts(&mut m, a, &["matched", "changed", "busy", "failed"]);
            }
            Value::Object(m)
        }
        Request::Stats => {
            let mut m = Map::new();
            let mut domains = std::collections::BTreeMap::<String, u64>::new();
            let mut oldest: Option<u64> = None;
            for a in &answers {
                add_counts(
                    &mut m,
                    a,
                    &[
                        "messages",
                        "active",
                        "deferred",
                        "held",
                        "recipients",
                        "bytes",
                        "unreadable",
                    ],
                );
                if let Some(o) = a.get("oldest_arrival_unix_micros").and_then(Value::as_u64) {
                    oldest = Some(oldest.map_or(o, |x| x.min(o)));
                }
                if let Some(Value::Object(d)) = a.get("domains") {
                    for (k, v) in d {
                        *domains.entry(k.clone()).or_default() += v.as_u64().unwrap_or(0);
                    }
                }
            }
            m.insert("oldest_arrival_unix_micros".into(), json!(oldest));
            m.insert("domains".into(), json!(domains));
            Value::Object(m)
        }
        Request::Status => json!({ "shards": answers }),
        Request::Limits { .. } => {
            // Every shard counts every login's messages (anvil): their views agree up to
            // messages in flight; show the highest.
            // The cluster's over-rate flags reach every shard alike; any shard's is shown.
            let mut users: std::collections::BTreeMap<String, (f64, f64, bool, bool)> =
                Default::default();
            for a in &answers {
                for u in a["users"].as_array().into_iter().flatten() {
                    let name = u["user"].as_str().unwrap_or("").to_string();
                    let e = users.entry(name).or_default();
                    e.0 = e.0.max(u["messages"].as_f64().unwrap_or(0.0));
                    e.1 = e.1.max(u["recipients"].as_f64().unwrap_or(0.0));
                    e.2 |= u["cluster_over_messages"].as_bool().unwrap_or(false);
                    e.3 |= u["cluster_over_recipients"].as_bool().unwrap_or(false);
                }
            }
            let first = answers.first().cloned().unwrap_or(Value::Null);
            json!({
                "message_rate": first["message_rate"],
                "recipient_rate": first["recipient_rate"],
                "users": users.into_iter().map(|(u, (m, r, om, or))| json!({
                    "user": u, "messages": m.round(), "recipients": r.round(),
                    "cluster_over_messages": om, "cluster_over_recipients": or,
                })).collect::<Vec<_>>(),
            })
        }
        Request::Drain | Request::Undrain => {
            let draining = matches!(req, Request::Drain);
            let sessions: u64 = answers
                .iter()
                .filter_map(|a| a.get("connections").and_then(Value::as_u64))
                .sum();
            json!({ "draining": draining, "shards": answers.len(), "sessions": sessions })
        }
        Request::Reload | Request::Stop | Request::LogLevel { .. } | Request::Submit { .. } => {
            return Err("not a shard request".into())
        }
    })
}

// ---------------------------------------------------------------------------------------
// Shard side
// ---------------------------------------------------------------------------------------

/// Answers one request on the shard's thread (called by the shard's control task).
pub async fn on_shard(shard: &Shard, req: &Request) -> Result<Value, String> {
    let runner = shard.store.runner();
    Ok(match req {
        Request::List(f) => {
            let items: Vec<Value> = runner
                .list(&f.to_select()?)
                .await
                .iter()
                .map(|it| item_json(it, false))
                .collect();
            json!({ "items": items })
        }
        Request::Show { id, body } => {
            let item = runner
                .show(id, body.then_some(BODY_CAP))
                .map(|(it, b)| show_json(&it, b.as_deref()));
            json!({ "item": item })
        }
        Request::Flush(f) => json!({ "flushed": runner.flush_matching(&f.to_select()?).await }),
        Request::Delete(f) => changed_json(runner.delete(&f.to_select()?).await),
        Request::Hold(f) => changed_json(runner.hold(&f.to_select()?).await),
        Request::Release(f) => changed_json(runner.release(&f.to_select()?).await),
        Request::Stats => {
            let s = runner.stats().await;
            json!({
                "messages": s.messages,
                "active": s.active,
                "deferred": s.deferred,
                "held": s.held,
                "recipients": s.recipients,
                "bytes": s.bytes,
                "unreadable": s.unreadable,
                "oldest_arrival_unix_micros": s.oldest_arrival_unix_micros,
                "domains": s.domains,
            })
        }
        Request::Limits { user } => {
            let (rates, users) = shard.peers.user_counts(user.as_deref());
            let show = |r: Option<crate::anvil::Rate>| {
                r.map(|r| format!("{}/{}", r.count, humantime::format_duration(r.per)))
            };
            json!({
                "message_rate": show(rates.messages),
                "recipient_rate": show(rates.recipients),
                "users": users.iter().map(|u| json!({
                    "user": u.user, "messages": u.messages, "recipients": u.recipients,
                    "cluster_over_messages": u.cluster_over_messages,
                    "cluster_over_recipients": u.cluster_over_recipients,
                })).collect::<Vec<_>>(),
            })
        }
        Request::Drain | Request::Undrain => {
            let on = matches!(req, Request::Drain);
            if shard.draining() != on {
                shard.drain_started.set(on.then(std::time::Instant::now));
                tracing::info!(
                    shard = shard.id,
                    sessions = shard.connections(),
                    "{}",
                    if on {
                        "draining: /healthz 503; new connections refused (421 4.3.2) after shutdown.drain_delay; open sessions finish"
                    } else {
                        "undrained: taking new connections"
                    }
                );
            }
            json!({ "shard": shard.id, "connections": shard.connections() })
        }
        Request::Status => json!({
            "shard": shard.id,
            "draining": shard.draining(),
            "connections": shard.connections(),
            "queued": runner.len(),
            "in_flight": runner.in_flight(),
        }),
        Request::Submit {
            envelope,
            received,
            body,
        } => submit(shard, envelope, received, body).await?,
        Request::Reload | Request::Stop | Request::LogLevel { .. } => {
            return Err("not a shard request".into())
        }
    })
}

/// Stores a submitted message the way `ShardStore::store` stores a session's: the queue
/// id, the Received: header, the spool record, its commit, then the runner.
async fn submit(
    shard: &Shard,
    envelope: &WireEnvelope,
    received: &str,
    body: &str,
) -> Result<Value, String> {
    let (mut env, body) = decode_submit(envelope, body)?;
    let store = &shard.store;
    if !store.accepting() {
        return Err("queue full: above its high-water mark".into());
    }
    let prepared = store.group_commit().with_spool(|spool| {
        let id = spool.id_gen().next();
        let hdr = bytes::Bytes::from(received.replacen(ID_PLACEHOLDER, &id, 1));
        env.id = id;
        env.size = (hdr.len() + body.len()) as u64;
        spool.prepare(&env, &[hdr, body])
    });
    let write = prepared.map_err(|e| {
        if e.is_full() {
            format!("spool full: {e}")
        } else {
            format!("spool: {e}")
        }
    })?;
    let c = store
        .commit_and_enqueue(write, env.arrival_unix_micros, env.recipients.len())
        .await
        .map_err(|e| format!("spool: {e}"))?;
    tracing::info!(id = %c.id, "message submitted on the admin socket");
    Ok(json!({ "id": c.id.as_str() }))
}

fn changed_json(c: tern_queue::runner::Changed) -> Value {
    json!({"matched": c.matched, "changed": c.changed, "busy": c.busy, "failed": c.failed})
}
