//! The admin protocol: what `tern queue`, `tern ctl`, `tern stdio` and `tern sendmail` say
//! to a running server over its admin socket, and the client side of saying it.
//!
//! Owns: the wire format (one JSON [`Request`] line in, one JSON object out; the
//! [`WireEnvelope`] of a `submit`), the JSON forms of queue items both the live server
//! and the offline CLI print ([`item_json`], [`show_json`]), and the client ([`call`]).
//! Must never: name the server or a shard (the server side, `admin::server`, uses this
//! module; the CLI uses it; this module uses neither).

use std::io::{BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tern_queue::runner::{MsgState, QueueItem, Select};
use tern_queue::{BodyType, DeliverBy, DeliverByMode, Envelope, RcptState, Recipient, Ret};

/// Longest body `show --body` returns (the rest is cut; the CLI says so).
pub const BODY_CAP: usize = 1 << 20;
/// How long the server waits for every shard to answer one request.
pub const SHARD_TIMEOUT: Duration = Duration::from_secs(120);

/// Stands for the queue id in the Received: header sent with a `submit` request. The
/// session's header sanitises client text to printable ASCII, so this byte cannot come
/// from the client.
pub const ID_PLACEHOLDER: &str = "\u{1}";

/// Which messages a queue operation applies to (the wire form of `runner::Select`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Filter {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Sender contains this ("<>": the null sender).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// A pending recipient is in this domain.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to_domain: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub older_than_secs: Option<u64>,
    /// "active", "deferred", "held" or "all" (absent: all).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
}

impl Filter {
    pub fn is_empty(&self) -> bool {
        self.id.is_none()
            && self.from.is_none()
            && self.to_domain.is_none()
            && self.older_than_secs.is_none()
            && self.state.as_deref().is_none_or(|s| s == "all")
    }

    pub fn to_select(&self) -> Result<Select, String> {
        let state = match self.state.as_deref() {
            None | Some("all") => None,
            Some("active") => Some(MsgState::Active),
            Some("deferred") => Some(MsgState::Deferred),
            Some("held") => Some(MsgState::Held),
            Some(s) => {
                return Err(format!(
                    "unknown state {s:?} (expected active, deferred, held or all)"
                ))
            }
        };
        Ok(Select {
            id: self.id.clone(),
            sender_contains: self.from.clone(),
            rcpt_domain: self.to_domain.clone(),
            min_age: self.older_than_secs.map(Duration::from_secs),
            state,
        })
    }
}

/// One request on the admin socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    List(Filter),
    Show {
        id: String,
        #[serde(default)]
        body: bool,
    },
    Flush(Filter),
    Delete(Filter),
    Hold(Filter),
    Release(Filter),
    Stats,
    Status,
    /// Stop taking new connections (`421 4.3.2`, `/healthz` 503); open sessions finish and
    /// the queue keeps delivering. For rolling restarts behind a balancer.
    Drain,
    /// Take new connections again.
    Undrain,
    /// Per-login sending counts in the current rate windows (`tern ctl limits [USER]`).
    Limits {
        #[serde(default)]
        user: Option<String>,
    },
    Reload,
    Stop,
    LogLevel {
        level: String,
    },
    /// Store one message (`tern stdio`, `tern sendmail`): answered by shard 0 with the
    /// queue id once the record is durable and handed to that shard's runner.
    Submit {
        envelope: WireEnvelope,
        /// The Received: header, with [`ID_PLACEHOLDER`] where the queue id goes.
        received: String,
        /// The message, base64.
        body: String,
    },
}

/// A shard's answer to one request: its id and a JSON value (or an error).
pub type ShardAnswer = (usize, Result<Value, String>);

/// One message as `tern queue list --json` prints it (live and offline alike).
/// `all`: list every recipient, final ones marked "(delivered)"/"(failed)".
pub fn item_json(it: &QueueItem, all: bool) -> Value {
    let e = &it.envelope;
    let q = &it.q;
    let recipients: Vec<String> = e
        .recipients
        .iter()
        .enumerate()
        .filter_map(|(i, r)| match (q.rcpt_states.get(i), all) {
            (Some(RcptState::Pending), _) => Some(r.addr.clone()),
            (Some(RcptState::Delivered), true) => Some(format!("{} (delivered)", r.addr)),
            (Some(RcptState::Failed), true) => Some(format!("{} (failed)", r.addr)),
            _ => None,
        })
        .collect();
    json!({
        "id": q.id.as_str(),
        "shard": q.msg.shard,
        "size": e.size,
        "arrival_unix_micros": q.arrival_unix_micros,
        "age_secs": now_micros().saturating_sub(q.arrival_unix_micros) / 1_000_000,
        "sender": if e.sender.is_empty() { "<>" } else { e.sender.as_str() },
        "recipients": recipients,
        "state": it.state().name(),
        "held": q.held,
        "in_flight": it.in_flight,
        "attempts": q.attempts,
        "next_attempt_unix": q.next_attempt_unix,
        "last_reply": q.last_reply.as_deref(),
    })
}

/// One message as `tern queue show --json` prints it: the list fields, every recipient
/// with its state and DSN parameters, the rest of the envelope, and the body if asked.
pub fn show_json(it: &QueueItem, body: Option<&[u8]>) -> Value {
    let e = &it.envelope;
    let mut v = item_json(it, false);
    let rcpts: Vec<Value> = e
        .recipients
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let st = match it.q.rcpt_states.get(i) {
                Some(RcptState::Pending) => "pending",
                Some(RcptState::Delivered) => "delivered",
                Some(RcptState::Failed) => "failed",
                None => "unknown",
            };
            json!({"addr": r.addr, "state": st, "notify": r.notify, "orcpt": r.orcpt})
        })
        .collect();
    if let Value::Object(m) = &mut v {
        m.insert("segment".into(), json!(it.q.msg.segment));
        m.insert("offset".into(), json!(it.q.msg.offset));
        m.insert("all_recipients".into(), Value::Array(rcpts));
        m.insert("body_type".into(), json!(format!("{:?}", e.body_type)));
        m.insert("smtputf8".into(), json!(e.smtputf8));
        m.insert("ret".into(), json!(e.ret.map(|r| format!("{r:?}"))));
        m.insert("envid".into(), json!(e.envid));
        m.insert("auth".into(), json!(e.auth));
        m.insert("client_helo".into(), json!(e.client_helo));
        m.insert("client_addr".into(), json!(e.client_addr));
        m.insert("warned".into(), json!(it.q.warned));
        if let Some(b) = body {
            // XXX: a body that is not UTF-8 (8BITMIME in another charset, BINARYMIME) is
            // shown with replacement characters; `body_bytes` is the exact length.
            m.insert("body".into(), json!(String::from_utf8_lossy(b)));
            m.insert("body_truncated".into(), json!((b.len() as u64) < e.size));
        }
    }
    v
}

// ---------------------------------------------------------------------------------------
// Client side
// ---------------------------------------------------------------------------------------

/// Why a request on the admin socket did not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nobody listens there (no socket file, or a stale one).
    #[error("no server answers on {path}: {source}")]
    NoServer {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("permission denied on {path} (the admin socket is for the server's owner and root)")]
    Denied { path: PathBuf },
    #[error("admin socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("admin socket {path}: bad answer: {message}")]
    Protocol { path: PathBuf, message: String },
    /// The server answered `ok: false`.
    #[error("{0}")]
    Server(String),
}

impl ClientError {
    /// sysexits.h code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::NoServer { .. } => 69, // EX_UNAVAILABLE
            ClientError::Denied { .. } => 77,   // EX_NOPERM
            ClientError::Io { .. } => 74,       // EX_IOERR
            ClientError::Protocol { .. } => 76, // EX_PROTOCOL
            ClientError::Server(_) => 70,       // EX_SOFTWARE
        }
    }
}

/// Connects to the admin socket (`NoServer` when nobody answers).
pub fn connect(path: &Path) -> Result<UnixStream, ClientError> {
    UnixStream::connect(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::PermissionDenied => ClientError::Denied {
            path: path.to_path_buf(),
        },
        _ => ClientError::NoServer {
            path: path.to_path_buf(),
            source,
        },
    })
}

/// Sends one request on a connected socket and returns the answer (without `ok`).
pub fn call_on(path: &Path, conn: UnixStream, req: &Request) -> Result<Value, ClientError> {
    let io = |source| ClientError::Io {
        path: path.to_path_buf(),
        source,
    };
    conn.set_write_timeout(Some(Duration::from_secs(10)))
        .map_err(io)?;
    conn.set_read_timeout(Some(SHARD_TIMEOUT + Duration::from_secs(10)))
        .map_err(io)?;
    let line = serde_json::to_string(req).map_err(|e| ClientError::Protocol {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let mut w = &conn;
    writeln!(w, "{line}").map_err(io)?;
    let mut answer = String::new();
    BufReader::new(&conn)
        .take(256 << 20)
        .read_to_string(&mut answer)
        .map_err(io)?;
    let mut v: Value = serde_json::from_str(answer.trim()).map_err(|e| ClientError::Protocol {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    match v.get("ok").and_then(Value::as_bool) {
        Some(true) => {
            if let Value::Object(m) = &mut v {
                m.remove("ok");
            }
            Ok(v)
        }
        _ => Err(ClientError::Server(
            v.get("error")
                .and_then(Value::as_str)
                .unwrap_or("request failed")
                .to_string(),
        )),
    }
}

/// Connects and sends one request.
pub fn call(path: &Path, req: &Request) -> Result<Value, ClientError> {
    let conn = connect(path)?;
    call_on(path, conn, req)
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

pub(crate) fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}
