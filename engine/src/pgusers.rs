//! The user store in PostgreSQL: `auth.users = "postgresql://..."`.
//!
//! NAME
//!   pgusers — the database-backed user store: its schema, `tern passwd`'s reads and
//!   writes, and the node's watcher thread that keeps every shard's snapshot current.
//!
//! DESCRIPTION
//!   The table holds exactly what the file holds (the derived secrets, as the same texts
//!   the file's fields carry, never a password; optional per-user rates). A row trigger
//!   sends `NOTIFY tern_users` naming the changed row and the time of the change (a
//!   TRUNCATE: no row, meaning all). Each node's watcher thread LISTENs; on notifications
//!   it reads the changed rows again (or the whole table after a TRUNCATE, a reconnect, a
//!   reload request or more than [`MAX_ROW_CHANGES`] rows), parses them with the file's own
//!   parser (`tern_smtp::users`), makes the next immutable snapshot (the last one with
//!   those rows replaced) and hands it to the shards through `publish` — exactly what a
//!   file reload does. AUTH reads the shard's snapshot and never waits for the database.

//!   The client is the `postgres` crate (synchronous, its own current-thread tokio
//!   runtime inside), used only on this module's own thread and by the CLI: no shard ever
//!   calls into it (docs/decisions.md). TLS follows the URL's libpq-style `sslmode` /
//!   `sslrootcert` ([`Tls`]), through tokio-postgres-rustls and the outbound SMTP
//!   client's rustls configuration (ring, the system CA bundle or a given CA file).
//!
//!   Losing the database: the watcher says so once per outage (log, `Status`), keeps the
//!   last snapshot in force, reconnects with a jittered backoff (0.25 s doubling to 5 s)
//!   and reloads the whole table when it is back (changes made meanwhile are caught up:
//!   LISTEN is issued before the reload, so nothing falls between them).
//!
//! SECURITY
//!   The URL may carry a password: it is shown only through [`PgUrl`]'s `Display`/`Debug`,
//!   which replace it with `***`. A row that does not parse (a tampered table) keeps the
//!   previous snapshot in force, like a malformed file.
//!
//! CONFIGURATION PARAMETERS
//!   `auth.users` (a `postgresql://` or `postgres://` URL), `auth.realm` (unchanged).

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use postgres::{Client, NoTls};
use tern_smtp::users::{secret_fields, UserDb, UserDbError};

/// The table and the NOTIFY channel.
pub const TABLE: &str = "tern_users";
pub const CHANNEL: &str = "tern_users";

/// The schema `tern passwd --init` creates (idempotent: every statement can run again).
/// docs/cluster.md shows it; a unit test checks it creates what `load` and `save` use.
pub const SCHEMA_SQL: &str = r#"
CREATE TABLE IF NOT EXISTS tern_users (
    username       text NOT NULL,
    realm          text NOT NULL,
    -- The same texts as the file's fields (derived secrets, never a password):
    cram_md5       text NOT NULL,  -- HMAC-MD5 inner:outer midstates, hex
    digest_md5     text NOT NULL,  -- H(user:realm:password), hex
    scram_sha_256  text NOT NULL,  -- iterations:salt:StoredKey:ServerKey, base64
    message_rate   text,           -- e.g. '500/1m'; NULL: auth.user_message_rate
    recipient_rate text,           -- e.g. '5000/1d'; NULL: auth.user_recipient_rate
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (realm, username),
    CHECK (realm NOT LIKE '%@%')
);
CREATE OR REPLACE FUNCTION tern_users_notify() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    -- The change's time (µs since 1970): a node tells how long it took to reach it.
    at bigint := (extract(epoch FROM clock_timestamp()) * 1000000)::bigint;
BEGIN
    -- [at, realm, username] names one changed row; [at] alone (TRUNCATE): all of them.
    IF TG_LEVEL = 'STATEMENT' THEN
        PERFORM pg_notify('tern_users', json_build_array(at)::text);
    ELSE
        IF TG_OP IN ('UPDATE', 'DELETE') THEN
            PERFORM pg_notify('tern_users', json_build_array(at, OLD.realm, OLD.username)::text);
        END IF;
        IF TG_OP IN ('INSERT', 'UPDATE') THEN
            PERFORM pg_notify('tern_users', json_build_array(at, NEW.realm, NEW.username)::text);
        END IF;
    END IF;
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS tern_users_notify ON tern_users;
CREATE TRIGGER tern_users_notify
    AFTER INSERT OR UPDATE OR DELETE ON tern_users
    FOR EACH ROW EXECUTE FUNCTION tern_users_notify();
DROP TRIGGER IF EXISTS tern_users_truncate ON tern_users;
CREATE TRIGGER tern_users_truncate
    AFTER TRUNCATE ON tern_users
    FOR EACH STATEMENT EXECUTE FUNCTION tern_users_notify();
-- auth.sender_map in the database: one row per line of the file's format.
CREATE TABLE IF NOT EXISTS tern_sender_map (
    address text PRIMARY KEY,      -- 'boss@example.org' or '@example.org'
    logins  text NOT NULL          -- 'alice, bob@example.org'
);
CREATE OR REPLACE FUNCTION tern_sender_map_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tern_sender_map', '');
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS tern_sender_map_notify ON tern_sender_map;
CREATE TRIGGER tern_sender_map_notify
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON tern_sender_map
    FOR EACH STATEMENT EXECUTE FUNCTION tern_sender_map_notify();
"#;

const SELECT_ALL: &str = "SELECT username, realm, cram_md5, digest_md5, scram_sha_256, \
     coalesce(message_rate, ''), coalesce(recipient_rate, '') FROM tern_users";

/// Connect timeout for every connection (the CLI and the watcher).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Reconnection backoff bounds.
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often a quiet connection is checked with a round trip.
const PING_EVERY: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------
// The URL
// ---------------------------------------------------------------------------------------

/// A `postgresql://` URL whose `Display` and `Debug` never show the password.
#[derive(Clone, PartialEq, Eq)]
pub struct PgUrl(String);

impl PgUrl {
    /// `Some` when `s` is a PostgreSQL URL (`postgresql://` or `postgres://`, as libpq).
    pub fn parse(s: &str) -> Option<PgUrl> {
        (s.starts_with("postgresql://") || s.starts_with("postgres://")).then(|| PgUrl(s.into()))
    }

    /// The URL as given, password included: only for connecting.
    pub fn secret(&self) -> &str {
        &self.0
    }

    /// The URL with any password replaced by `***` (the `user:password@` part of the
    /// authority and a `password=` query parameter).
    pub fn redacted(&self) -> String {
        redact(&self.0)
    }

    /// True when the URL itself carries a password.
    pub fn has_password(&self) -> bool {
        redact(&self.0) != self.0
    }
}

impl fmt::Display for PgUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Debug for PgUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PgUrl({})", self.redacted())
    }
}

/// `postgresql://user:secret@host/db?password=x&sslmode=y` →
/// `postgresql://user:***@host/db?password=***&sslmode=y`. Anything that is not a URL
/// with a scheme is returned unchanged.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    // The authority ends at the first '/', '?' or '#'; the userinfo at its LAST '@'
    // (a password may contain '@' when the URL was written carelessly).
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{user}:***@{host}"),
            None => format!("{userinfo}@{host}"),
        },
        None => authority.to_string(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let params: Vec<String> = query
                .split('&')
                .map(|p| match p.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                    _ => p.to_string(),
                })
                .collect();
            format!("{path}?{}", params.join("&"))
        }
        None => tail.to_string(),
    };
    format!("{scheme}://{authority}{tail}")
}

// ---------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------

/// What can go wrong talking to the database. Texts name the redacted URL, never the
/// password (the driver's own messages do not repeat it).
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("{url}: cannot connect: {reason}")]
    Connect { url: String, reason: String },
    #[error("{url}: no table tern_users; create the schema with `tern passwd --init -f URL`")]
    NoSchema { url: String },
    #[error("{url}: {reason}")]
    Query { url: String, reason: String },
    #[error("{0}")]
    Data(#[from] UserDbError),
}

fn query_err(url: &PgUrl, e: postgres::Error) -> PgError {
    if e.code() == Some(&postgres::error::SqlState::UNDEFINED_TABLE) {
        return PgError::NoSchema {
            url: url.redacted(),
        };
    }
    let reason = match e.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => e.to_string(),
    };
    PgError::Query {
        url: url.redacted(),
        reason,
    }
}

/// Full error chain of a connection failure ("Connection refused", "password
/// authentication failed ..."), for the log and the CLI.
fn chain(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{}: {}", db.severity(), db.message());
    }
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

// ---------------------------------------------------------------------------------------
// Reading and writing (the CLI and the watcher)
// ---------------------------------------------------------------------------------------

/// How a connection is protected, from the URL's libpq-style `sslmode` and
/// `sslrootcert` (which tern reads itself: the driver knows only disable/prefer/require).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tls {
    /// `sslmode=disable`: plain TCP.
    Off,
    /// `sslmode=prefer` (the default, as libpq's) or `require` without `sslrootcert`:
    /// encrypted without checking who answers (`prefer` falls back to plain TCP when the
    /// server has no TLS; `require` does not).
    Unverified { required: bool },
    /// `verify-ca`, `verify-full`, or `require` with `sslrootcert`: the server's
    /// certificate must chain to `sslrootcert` (or the system bundle) and name the host
    /// (rustls always checks the name: `verify-ca` is as strict as `verify-full`).
    Verified { ca: Option<std::path::PathBuf> },
}

/// Splits the URL into what the driver parses and the TLS choice.
pub fn tls_of(url: &str) -> Result<(String, Tls), String> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_string(), Tls::Unverified { required: false }));
    };
    let (mut mode, mut ca) = (None::<String>, None::<std::path::PathBuf>);
    let mut kept = Vec::new();
    for p in query.split('&') {
        match p.split_once('=') {
            Some(("sslmode", v)) => mode = Some(v.to_string()),
            Some(("sslrootcert", v)) => ca = Some(v.into()),
            _ => kept.push(p),
        }
    }
    let (driver_mode, tls) = match mode.as_deref() {
        Some("disable") => ("disable", Tls::Off),
        None | Some("prefer") | Some("allow") => ("prefer", Tls::Unverified { required: false }),
        Some("require") if ca.is_none() => ("require", Tls::Unverified { required: true }),
        Some("require") | Some("verify-ca") | Some("verify-full") => {
            ("require", Tls::Verified { ca: ca.clone() })
        }
        Some(other) => {
            return Err(format!(
                "sslmode={other}: expected disable, prefer, require, verify-ca or verify-full"
            ))
        }
    };
    kept.push(match driver_mode {
        "disable" => "sslmode=disable",
        "require" => "sslmode=require",
        _ => "sslmode=prefer",
    });
    Ok((format!("{base}?{}", kept.join("&")), tls))
}

/// Connects (5 s timeout, TCP keepalives), with TLS as the URL's `sslmode` says
/// ([`Tls`]; rustls with the ring provider, the outbound SMTP client's trust anchors).
pub fn connect(url: &PgUrl) -> Result<Client, PgError> {
    let bad = |reason: String| PgError::Connect {
        url: url.redacted(),
        reason,
    };
    let (driver_url, tls) = tls_of(url.secret()).map_err(bad)?;
    let mut cfg: postgres::Config = driver_url
        .parse()
        .map_err(|e| bad(format!("bad URL: {}", chain(&e))))?;
    cfg.connect_timeout(CONNECT_TIMEOUT)
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(30))
        .application_name("tern");
    let connected = match &tls {
        Tls::Off => cfg.connect(NoTls),
        Tls::Unverified { .. } | Tls::Verified { .. } => {
            let (verify, ca) = match &tls {
                Tls::Verified { ca } => (true, ca.as_deref()),
                _ => (false, None),
            };
            let rustls = tern_queue::client::tls::client_config(verify, ca)
                .map_err(|e| bad(format!("TLS: {e}")))?;
            cfg.connect(tokio_postgres_rustls::MakeRustlsConnect::new(
                (*rustls).clone(),
            ))
        }
    };
    connected.map_err(|e| bad(chain(&e)))
}

/// Creates the table, the notify function and the trigger (idempotent).
pub fn init(client: &mut Client, url: &PgUrl) -> Result<(), PgError> {
    let mut tx = client.transaction().map_err(|e| query_err(url, e))?;
    tx.batch_execute(SCHEMA_SQL)
        .map_err(|e| query_err(url, e))?;
    tx.commit().map_err(|e| query_err(url, e))
}

/// Reads the whole table into a snapshot, through the file format's parser (so a row is
/// checked exactly as a line of the file is). A field with white space in it could
/// smuggle a second entry into the line: such a row is refused.
pub fn load(client: &mut Client, url: &PgUrl) -> Result<UserDb, PgError> {
    let rows = client
        .query(SELECT_ALL, &[])
        .map_err(|e| query_err(url, e))?;
    parse_rows(&rows, url)
}

/// Rows of `SELECT_ALL` → a snapshot, through the file format's parser.
fn parse_rows(rows: &[postgres::Row], url: &PgUrl) -> Result<UserDb, PgError> {
    let mut text = String::with_capacity(rows.len() * 220);
    let label = std::path::PathBuf::from(url.redacted());
    for (i, row) in rows.iter().enumerate() {
        let mut f: [String; 7] = Default::default();
        for (k, slot) in f.iter_mut().enumerate() {
            *slot = row.try_get::<_, String>(k).map_err(|e| query_err(url, e))?;
        }
        if f.iter()
            .any(|v| v.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            return Err(UserDbError::Malformed {
                path: label,
                line: i + 1,
                reason: "a column contains white space or a control character".into(),
            }
            .into());
        }
        let [user, realm, cram, digest, scram, mrate, rrate] = &f;
        text.push_str(&format!(
            "{user}@{realm} cram-md5={cram} digest-md5={digest} scram-sha-256={scram}"
        ));
        if !mrate.is_empty() {
            text.push_str(&format!(" message-rate={mrate}"));
        }
        if !rrate.is_empty() {
            text.push_str(&format!(" recipient-rate={rrate}"));
        }
        text.push('\n');
    }
    // Row numbers stand in for line numbers in an error (the order is the server's).
    Ok(UserDb::parse(text.as_bytes(), &label)?)
}

/// What the notifications since the last snapshot ask for.
#[derive(Debug, Default, PartialEq, Eq)]
struct Changes {
    /// Reload the whole table (TRUNCATE, a payload we do not understand, too many rows).
    all: bool,
    /// The (realm, username) of each changed row.
    rows: std::collections::BTreeSet<(String, String)>,
    /// The newest change's trigger time (µs since 1970).
    newest_us: u64,
}

/// Above this many changed rows at once, one full reload is cheaper than the lookups.
const MAX_ROW_CHANGES: usize = 1000;

impl Changes {
    fn is_empty(&self) -> bool {
        !self.all && self.rows.is_empty()
    }

    /// Folds in one payload: `[at, realm, username]` or `[at]`.
    fn add(&mut self, payload: &str) {
        let v: Vec<serde_json::Value> = serde_json::from_str(payload).unwrap_or_default();
        if let Some(at) = v.first().and_then(serde_json::Value::as_u64) {
            self.newest_us = self.newest_us.max(at);
        }
        match (
            v.get(1).and_then(|r| r.as_str()),
            v.get(2).and_then(|u| u.as_str()),
        ) {
            (Some(realm), Some(user)) if v.len() == 3 && self.rows.len() < MAX_ROW_CHANGES => {
                self.rows.insert((realm.to_string(), user.to_string()));
            }
            _ => self.all = true,
        }
    }
}

/// The next snapshot: `current` with the changed rows read again (a row gone is a user
/// deleted). Only those rows are read and parsed; the rest is copied.
fn apply_rows(
    client: &mut Client,
    url: &PgUrl,
    current: &UserDb,
    keys: &std::collections::BTreeSet<(String, String)>,
) -> Result<UserDb, PgError> {
    let (realms, users): (Vec<&str>, Vec<&str>) =
        keys.iter().map(|(r, u)| (r.as_str(), u.as_str())).unzip();
    let rows = client
        .query(
            &format!(
                "{SELECT_ALL} WHERE (realm, username) IN \
                 (SELECT * FROM unnest($1::text[], $2::text[]))"
            ),
            &[&realms, &users],
        )
        .map_err(|e| query_err(url, e))?;
    let fresh = parse_rows(&rows, url)?;
    let mut next = current.clone();
    for (realm, user) in keys {
        next.remove(user, realm);
        if let Some(secrets) = fresh.lookup(user, realm) {
            next.insert(user, realm, secrets.clone())?;
            next.set_rates(user, realm, fresh.rates(user, realm).unwrap_or_default());
        }
    }
    Ok(next)
}

/// Writes the difference between `old` (as loaded) and `new` in one transaction: rows of
/// users gone are deleted, rows of users added or changed (secrets or rates) are upserted.
/// Users nobody touched are not written, so two administrators changing different users
/// at once do not undo each other. Returns (upserted, deleted).
pub fn save(
    client: &mut Client,
    url: &PgUrl,
    old: &UserDb,
    new: &UserDb,
) -> Result<(usize, usize), PgError> {
    let mut tx = client.transaction().map_err(|e| query_err(url, e))?;
    let (mut upserted, mut deleted) = (0, 0);
    for (user, realm) in old.entries() {
        if new.lookup(user, realm).is_none() {
            tx.execute(
                "DELETE FROM tern_users WHERE realm = $1 AND username = $2",
                &[&realm, &user],
            )
            .map_err(|e| query_err(url, e))?;
            deleted += 1;
        }
    }
    for (user, realm) in new.entries() {
        let Some(s) = new.lookup(user, realm) else {
            continue;
        };
        let rates = new.rates(user, realm).unwrap_or_default();
        if old.lookup(user, realm) == Some(s) && old.rates(user, realm).unwrap_or_default() == rates
        {
            continue;
        }
        let [cram, digest, scram] = secret_fields(s);
        let m = rates.messages.map(|r| r.to_text());
        let r = rates.recipients.map(|r| r.to_text());
        tx.execute(
            "INSERT INTO tern_users (username, realm, cram_md5, digest_md5, scram_sha_256, \
             message_rate, recipient_rate) VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (realm, username) DO UPDATE SET cram_md5 = EXCLUDED.cram_md5, \
             digest_md5 = EXCLUDED.digest_md5, scram_sha_256 = EXCLUDED.scram_sha_256, \
             message_rate = EXCLUDED.message_rate, recipient_rate = EXCLUDED.recipient_rate, \
             updated_at = now()",
            &[&user, &realm, &cram, &digest, &scram, &m, &r],
        )
        .map_err(|e| query_err(url, e))?;
        upserted += 1;
    }
    tx.commit().map_err(|e| query_err(url, e))?;
    Ok((upserted, deleted))
}

// ---------------------------------------------------------------------------------------
// The node's view: status and the watcher thread
// ---------------------------------------------------------------------------------------

/// The user store's state as metrics and `tern ctl status` show it. Written by the
/// watcher thread (or the file reload), read by the metrics and admin threads.
#[derive(Default)]
pub struct Status {
    /// What the store is: the file's path or the redacted URL.
    pub source: String,
    /// True for a database store.
    pub database: bool,
    /// The database answers (always true for a file).
    pub up: AtomicBool,
    /// Some snapshot was ever loaded.
    pub loaded: AtomicBool,
    /// Users in the snapshot in force.
    pub users: AtomicU64,
    /// When the snapshot in force was last known to be current (µs since 1970): set at
    /// each load and at each check of a live connection.
    pub verified_us: AtomicU64,
    /// Full reloads done (start, notifications, catch-ups, SIGHUP).
    pub reloads: AtomicU64,
    /// Outages seen (the database lost, or unreachable at start).
    pub outages: AtomicU64,
    /// Last change-to-shards delay (µs): from the trigger's clock to the hand-over.
    pub notify_delay_us: AtomicU64,
}

impl Status {
    pub fn new(source: String, database: bool) -> Status {
        Status {
            source,
            database,
            up: AtomicBool::new(!database),
            ..Status::default()
        }
    }

    /// Records a freshly loaded snapshot.
    pub fn loaded(&self, users: usize) {
        self.users.store(users as u64, Ordering::Relaxed);
        self.loaded.store(true, Ordering::Relaxed);
        self.verified_us.store(now_us(), Ordering::Relaxed);
        self.reloads.fetch_add(1, Ordering::Relaxed);
    }

    /// The snapshot in force is still current (a live connection, an unchanged file).
    pub fn verified(&self) {
        self.verified_us.store(now_us(), Ordering::Relaxed);
    }

    /// Seconds since the snapshot in force was last known current (None: no snapshot).
    pub fn snapshot_age(&self) -> Option<f64> {
        if !self.loaded.load(Ordering::Relaxed) {
            return None;
        }
        let v = self.verified_us.load(Ordering::Relaxed);
        Some(now_us().saturating_sub(v) as f64 / 1e6)
    }

    /// True while AUTH is served from a snapshot the database could not confirm.
    pub fn fallback(&self) -> bool {
        self.database && !self.up.load(Ordering::Relaxed)
    }

    /// The JSON `tern ctl status` shows.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "source": self.source,
            "kind": if self.database { "postgresql" } else { "file" },
            "up": self.up.load(Ordering::Relaxed),
            "fallback": self.fallback(),
            "loaded": self.loaded.load(Ordering::Relaxed),
            "users": self.users.load(Ordering::Relaxed),
            "snapshot_age_secs": self.snapshot_age(),
            "reloads": self.reloads.load(Ordering::Relaxed),
            "outages": self.outages.load(Ordering::Relaxed),
            "notify_delay_ms": self.notify_delay_us.load(Ordering::Relaxed) as f64 / 1e3,
        })
    }

    /// The Prometheus lines for `/metrics`.
    pub fn metrics(&self) -> String {
        let up = u8::from(self.up.load(Ordering::Relaxed));
        let fallback = u8::from(self.fallback());
        let age = self.snapshot_age().unwrap_or(-1.0);
        format!(
            "# HELP tern_userstore_up 1 while the user store can be read (the database answers; always 1 for a file).\n\
             # TYPE tern_userstore_up gauge\ntern_userstore_up {up}\n\
             # HELP tern_userstore_fallback 1 while AUTH is served from the last snapshot because the database is unreachable.\n\
             # TYPE tern_userstore_fallback gauge\ntern_userstore_fallback {fallback}\n\
             # HELP tern_userstore_snapshot_age_seconds Seconds since the snapshot in force was last known current (-1: none yet).\n\
             # TYPE tern_userstore_snapshot_age_seconds gauge\ntern_userstore_snapshot_age_seconds {age:.3}\n\
             # HELP tern_userstore_users Users in the snapshot in force.\n\
             # TYPE tern_userstore_users gauge\ntern_userstore_users {}\n\
             # HELP tern_userstore_reloads_total Snapshots loaded.\n\
             # TYPE tern_userstore_reloads_total counter\ntern_userstore_reloads_total {}\n\
             # HELP tern_userstore_outages_total Times the user database was lost or unreachable.\n\
             # TYPE tern_userstore_outages_total counter\ntern_userstore_outages_total {}\n\
             # HELP tern_userstore_notify_delay_seconds Last delay from a change in the database (its trigger's clock) to the new snapshot handed to the shards.\n\
             # TYPE tern_userstore_notify_delay_seconds gauge\ntern_userstore_notify_delay_seconds {:.6}\n",
            self.users.load(Ordering::Relaxed),
            self.reloads.load(Ordering::Relaxed),
            self.outages.load(Ordering::Relaxed),
            self.notify_delay_us.load(Ordering::Relaxed) as f64 / 1e6,
        )
    }
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Hands a snapshot to every shard (the server supplies it: it sends `Control::Users`).
pub type Publish = Box<dyn Fn(Arc<UserDb>) + Send>;

/// A request to the watcher: reload now (SIGHUP, `tern ctl reload`); the answer is the
/// number of users, or why not.
type ReloadRequest = mpsc::Sender<Result<usize, String>>;

/// The running watcher, for reload requests.
#[derive(Clone)]
pub struct Watcher {
    tx: mpsc::Sender<ReloadRequest>,
}

impl Watcher {
    /// Asks for a full reload and waits (at most 10 s) for its outcome.
    pub fn reload(&self) -> Result<usize, String> {
        let (tx, rx) = mpsc::channel();
        self.tx
            .send(tx)
            .map_err(|_| "the user store watcher has stopped".to_string())?;
        rx.recv_timeout(Duration::from_secs(10))
            .map_err(|_| "the user store did not answer within 10 s".to_string())?
    }
}

/// Loads a first snapshot at start, synchronously (so a node whose database answers is
/// ready with its users). `Ok(None)`: the database is unreachable — the node starts with
/// [`UserDb::unavailable`] (AUTH answers 454 4.7.0) and the watcher catches up; an
/// error: the database answers but the store is unusable (no schema, a bad row), which
/// a start refuses like a malformed file.
pub fn first_snapshot(url: &PgUrl, status: &Status) -> Result<Option<UserDb>, PgError> {
    let mut client = match connect(url) {
        Ok(c) => c,
        Err(e) => {
            status.outages.fetch_add(1, Ordering::Relaxed);
            tracing::error!(store = %url, error = %e, "user database unreachable at start: AUTH answers 454 4.7.0 until it is reached; retrying in the background");
            return Ok(None);
        }
    };
    let db = load(&mut client, url)?;
    status.up.store(true, Ordering::Relaxed);
    status.loaded(db.len());
    tracing::info!(users = db.len(), store = %url, "user store loaded");
    Ok(Some(db))
}

/// Starts the watcher thread: LISTEN, reload on every notification, reconnect with
/// backoff, catch up after an outage. `publish` hands each new snapshot to the shards;
/// the thread ends when `alive` says the server is gone.
pub fn spawn_watcher(
    url: PgUrl,
    status: Arc<Status>,
    publish: Publish,
    alive: Box<dyn Fn() -> bool + Send>,
) -> std::io::Result<Watcher> {
    let (tx, rx) = mpsc::channel::<ReloadRequest>();
    std::thread::Builder::new()
        .name("tern-userdb".into())
        .spawn(move || watch(url, &status, &publish, &*alive, &rx))?;
    Ok(Watcher { tx })
}

fn watch(
    url: PgUrl,
    status: &Status,
    publish: &Publish,
    alive: &dyn Fn() -> bool,
    requests: &mpsc::Receiver<ReloadRequest>,
) {
    let mut backoff = BACKOFF_MIN;
    // Whether the current outage was reported (once per outage, not per retry). An
    // unreachable database at start was reported by `first_snapshot`.
    let mut reported = !status.up.load(Ordering::Relaxed);
    while alive() {
        match session(&url, status, publish, alive, requests) {
            // The server is gone.
            Ok(()) => return,
            Err(e) => {
                let was_up = status.up.swap(false, Ordering::Relaxed);
                if was_up || !reported {
                    status.outages.fetch_add(1, Ordering::Relaxed);
                    reported = true;
                    tracing::error!(
                        store = %url,
                        error = %e,
                        users = status.users.load(Ordering::Relaxed),
                        "user database lost: AUTH goes on from the last snapshot; reconnecting in the background"
                    );
                } else {
                    tracing::debug!(store = %url, error = %e, "user database still unreachable");
                }
                backoff = if was_up {
                    BACKOFF_MIN
                } else {
                    (backoff * 2).min(BACKOFF_MAX)
                };
            }
        }
        // Answer reload requests while down: the snapshot stays.
        let deadline = Instant::now() + jitter(backoff);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match requests.recv_timeout(left) {
                Ok(reply) => {
                    let _ = reply.send(Err(format!(
                        "user database unreachable; AUTH goes on from the last snapshot ({} users)",
                        status.users.load(Ordering::Relaxed)
                    )));
                }
                Err(mpsc::RecvTimeoutError::Timeout) => break,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    std::thread::sleep(left);
                    break;
                }
            }
        }
    }
}

fn jitter(d: Duration) -> Duration {
    // ±20%, so a fleet that lost its database does not reconnect in lockstep.
    let f: f64 = rand::random_range(0.8..1.2);
    d.mul_f64(f)
}

/// One connected stretch: connect, LISTEN, full load, then reload on notifications until
/// the connection fails (`Err`) or the server is gone (`Ok`).
fn session(
    url: &PgUrl,
    status: &Status,
    publish: &Publish,
    alive: &dyn Fn() -> bool,
    requests: &mpsc::Receiver<ReloadRequest>,
) -> Result<(), PgError> {
    let mut client = connect(url)?;
    // LISTEN before the load: a change committed after the load's snapshot is notified.
    client
        .batch_execute(&format!("LISTEN {CHANNEL}"))
        .map_err(|e| query_err(url, e))?;
    let was_down = !status.up.load(Ordering::Relaxed);
    // The snapshot this connection last handed to the shards: row changes apply to it.
    let mut current = reload(&mut client, url, status, publish, None, Changes::default())?;
    status.up.store(true, Ordering::Relaxed);
    if was_down {
        tracing::info!(store = %url, users = status.users.load(Ordering::Relaxed), "user database reached: snapshot caught up");
    }
    let mut last_ping = Instant::now();
    loop {
        if !alive() {
            return Ok(());
        }
        // Wait up to 1 s for a notification; take it at once, with every other one
        // already pending, and fold them all into one new snapshot.
        let mut changes = Changes::default();
        {
            use postgres::fallible_iterator::FallibleIterator;
            let mut notes = client.notifications();
            let first = notes
                .timeout_iter(Duration::from_secs(1))
                .next()
                .map_err(|e| query_err(url, e))?;
            if let Some(n) = first {
                changes.add(n.payload());
                let mut pending = notes.iter();
                while let Some(n) = pending.next().map_err(|e| query_err(url, e))? {
                    changes.add(n.payload());
                }
            }
        }
        if client.is_closed() {
            return Err(PgError::Query {
                url: url.redacted(),
                reason: "connection closed".into(),
            });
        }
        let mut replies = Vec::new();
        while let Ok(r) = requests.try_recv() {
            replies.push(r);
        }
        if !changes.is_empty() || !replies.is_empty() {
            // A reload request (SIGHUP, `tern ctl reload`) reads everything.
            changes.all |= !replies.is_empty();
            let r = reload(&mut client, url, status, publish, Some(&current), changes);
            let answer = match &r {
                Ok(db) => Ok(db.len()),
                Err(e) => Err(e.to_string()),
            };
            for reply in replies {
                let _ = reply.send(answer.clone());
            }
            match r {
                Ok(db) => current = db,
                // A bad row keeps the snapshot in force; the connection is fine.
                Err(PgError::Data(e)) => {
                    tracing::error!(store = %url, error = %e, "user store not reloaded; keeping the previous snapshot")
                }
                Err(e) => return Err(e),
            }
            last_ping = Instant::now();
        } else if last_ping.elapsed() >= PING_EVERY {
            // A quiet connection may be dead without a FIN (a partition): one round trip.
            client
                .is_valid(Duration::from_secs(3))
                .map_err(|e| query_err(url, e))?;
            last_ping = Instant::now();
        }
        status.verified_us.store(now_us(), Ordering::Relaxed);
    }
}

/// Makes the next snapshot and hands it to the shards: the whole table (at connect, on
/// TRUNCATE, on request, after many changes), else `current` with the changed rows read
/// again.
fn reload(
    client: &mut Client,
    url: &PgUrl,
    status: &Status,
    publish: &Publish,
    current: Option<&Arc<UserDb>>,
    changes: Changes,
) -> Result<Arc<UserDb>, PgError> {
    let started = Instant::now();
    let (db, how) = match current {
        Some(cur) if !changes.all && !changes.rows.is_empty() => {
            (apply_rows(client, url, cur, &changes.rows)?, "rows")
        }
        _ => (load(client, url)?, "table"),
    };
    let n = db.len();
    let db = Arc::new(db);
    publish(db.clone());
    status.loaded(n);
    let load_ms = started.elapsed().as_secs_f64() * 1e3;
    if changes.newest_us > 0 {
        let delay = now_us().saturating_sub(changes.newest_us);
        status.notify_delay_us.store(delay, Ordering::Relaxed);
        tracing::info!(
            users = n,
            rows = changes.rows.len(),
            read = how,
            delay_ms = delay as f64 / 1e3,
            load_ms,
            "user store changed in the database: new snapshot"
        );
    } else {
        tracing::info!(users = n, load_ms, store = %url, "user store loaded");
    }
    Ok(db)
}

// ---------------------------------------------------------------------------------------
// auth.sender_map in the database
// ---------------------------------------------------------------------------------------

/// Reads `tern_sender_map` into a map, through the file format's parser (one row is one
/// line: `address logins`).
pub fn load_senders(
    client: &mut Client,
    url: &PgUrl,
) -> Result<tern_smtp::sender::SenderMap, PgError> {
    let rows = client
        .query(
            "SELECT address, logins FROM tern_sender_map ORDER BY address",
            &[],
        )
        .map_err(|e| query_err(url, e))?;
    let mut text = String::new();
    for row in &rows {
        let address: String = row.try_get(0).map_err(|e| query_err(url, e))?;
        let logins: String = row.try_get(1).map_err(|e| query_err(url, e))?;
        if address.contains(['\n', '\r']) || logins.contains(['\n', '\r']) {
            return Err(PgError::Query {
                url: url.redacted(),
                reason: format!("tern_sender_map: a line break in the row of {address:?}"),
            });
        }
        text.push_str(&address);
        text.push(' ');
        text.push_str(&logins);
        text.push('\n');
    }
    tern_smtp::sender::SenderMap::parse(&text).map_err(|e| PgError::Query {
        url: url.redacted(),
        reason: format!("tern_sender_map: {e}"),
    })
}

/// Hands a sender map to every shard.
pub type PublishSenders = Box<dyn Fn(Arc<tern_smtp::sender::SenderMap>) + Send>;

/// The sender map's watcher: LISTEN `tern_sender_map`, the whole (small) table again on
/// every change, the last map kept while the database is away (logged once per outage),
/// reconnection with the user store's backoff.
pub fn spawn_senders_watcher(
    url: PgUrl,
    publish: PublishSenders,
    alive: Box<dyn Fn() -> bool + Send>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("tern-sendermap".into())
        .spawn(move || {
            let mut backoff = BACKOFF_MIN;
            let mut reported = false;
            while alive() {
                let mut connected = false;
                let r = (|| -> Result<(), PgError> {
                    let mut client = connect(&url)?;
                    client
                        .batch_execute("LISTEN tern_sender_map")
                        .map_err(|e| query_err(&url, e))?;
                    connected = true;
                    let mut dirty = true;
                    loop {
                        if !alive() {
                            return Ok(());
                        }
                        if dirty {
                            match load_senders(&mut client, &url) {
                                Ok(map) => {
                                    tracing::info!(store = %url, entries = map.len(), "sender map loaded");
                                    publish(Arc::new(map));
                                    if reported {
                                        tracing::info!(store = %url, "sender map database reached again");
                                        reported = false;
                                    }
                                }
                                Err(PgError::Query { reason, .. })
                                    if reason.starts_with("tern_sender_map:") =>
                                {
                                    tracing::error!(store = %url, error = %reason, "sender map not reloaded; keeping the previous one")
                                }
                                Err(e) => return Err(e),
                            }
                        }
                        {
                            use postgres::fallible_iterator::FallibleIterator;
                            let mut notes = client.notifications();
                            let first = notes
                                .timeout_iter(Duration::from_secs(1))
                                .next()
                                .map_err(|e| query_err(&url, e))?;
                            dirty = first.is_some();
                            if dirty {
                                let mut pending = notes.iter();
                                while pending.next().map_err(|e| query_err(&url, e))?.is_some() {}
                            }
                        }
                        if client.is_closed() {
                            return Err(PgError::Query {
                                url: url.redacted(),
                                reason: "connection closed".into(),
                            });
                        }
                    }
                })();
                match r {
                    Ok(()) => return,
                    Err(e) => {
                        if !reported {
                            reported = true;
                            tracing::error!(store = %url, error = %e, "sender map database lost: keeping the last map; reconnecting in the background");
                        }
                        backoff = if connected {
                            BACKOFF_MIN
                        } else {
                            (backoff * 2).min(BACKOFF_MAX)
                        };
                        std::thread::sleep(jitter(backoff));
                    }
                }
            }
        })
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction() {
        for (url, want) in [
            (
                "postgresql://tern:s3cret@db.example:5432/mail",
                "postgresql://tern:***@db.example:5432/mail",
            ),
            (
                "postgres://tern:p%40ss@10.0.0.1/mail?sslmode=disable",
                "postgres://tern:***@10.0.0.1/mail?sslmode=disable",
            ),
            // A careless '@' in the password: the userinfo ends at the last '@'.
            (
                "postgresql://tern:a@b@db/mail",
                "postgresql://tern:***@db/mail",
            ),
            (
                "postgresql:///mail?host=/run/postgresql&user=tern&password=x&port=5433",
                "postgresql:///mail?host=/run/postgresql&user=tern&password=***&port=5433",
            ),
            ("postgresql://tern@db/mail", "postgresql://tern@db/mail"),
            ("postgresql://db", "postgresql://db"),
            ("postgresql://:pw@db", "postgresql://:***@db"),
        ] {
            let u = PgUrl::parse(url).unwrap();
            assert_eq!(u.redacted(), want, "{url}");
            assert_eq!(u.to_string(), want);
            assert_eq!(format!("{u:?}"), format!("PgUrl({want})"));
            assert_eq!(u.has_password(), url != want, "{url}");
            assert!(!u.to_string().contains("s3cret"));
        }
        assert!(PgUrl::parse("/etc/tern/users.db").is_none());
        assert!(PgUrl::parse("mysql://x").is_none());
    }

    #[test]
    fn sslmode_and_sslrootcert() {
        let t = |u: &str| tls_of(u).unwrap();
        assert_eq!(
            t("postgresql://h/db"),
            (
                "postgresql://h/db".into(),
                Tls::Unverified { required: false }
            )
        );
        assert_eq!(
            t("postgresql://h/db?sslmode=disable&user=x"),
            ("postgresql://h/db?user=x&sslmode=disable".into(), Tls::Off)
        );
        assert_eq!(
            t("postgresql://h/db?sslmode=require").1,
            Tls::Unverified { required: true }
        );
        assert_eq!(
            t("postgresql://h/db?sslrootcert=/ca.pem&sslmode=require"),
            (
                "postgresql://h/db?sslmode=require".into(),
                Tls::Verified {
                    ca: Some("/ca.pem".into())
                }
            )
        );
        assert_eq!(
            t("postgresql://h/db?sslmode=verify-full").1,
            Tls::Verified { ca: None }
        );
        assert!(tls_of("postgresql://h/db?sslmode=sometimes").is_err());
    }

    #[test]
    fn schema_has_what_load_and_save_use() {
        // The columns load reads and save writes, the key save's upsert names, and the
        // trigger on the channel the watcher LISTENs to; every statement re-runnable.
        for col in [
            "username",
            "realm",
            "cram_md5",
            "digest_md5",
            "scram_sha_256",
            "message_rate",
            "recipient_rate",
        ] {
            assert!(SCHEMA_SQL.contains(&format!("\n    {col} ")), "{col}");
            assert!(SELECT_ALL.contains(col), "{col}");
        }
        assert!(SCHEMA_SQL.contains("PRIMARY KEY (realm, username)"));
        assert!(SCHEMA_SQL.contains(&format!("pg_notify('{CHANNEL}'")));
        assert!(SCHEMA_SQL.contains("FOR EACH ROW"));
        assert!(SCHEMA_SQL.contains("AFTER TRUNCATE ON tern_users"));
        // Every top-level statement (a line at column 0 that starts one) re-runnable.
        let starts: Vec<&str> = SCHEMA_SQL
            .lines()
            .filter(|l| l.starts_with("CREATE") || l.starts_with("DROP") || l.starts_with("ALTER"))
            .collect();
        assert_eq!(starts.len(), 10, "{starts:?}");
        for first in starts {
            assert!(
                first.starts_with("CREATE TABLE IF NOT EXISTS")
                    || first.starts_with("CREATE OR REPLACE FUNCTION")
                    || first.starts_with("DROP TRIGGER IF EXISTS")
                    || first.starts_with("CREATE TRIGGER"),
                "not idempotent: {first}"
            );
        }
        // CREATE TRIGGER is re-runnable only because its DROP precedes it.
        for t in [
            "tern_users_notify",
            "tern_users_truncate",
            "tern_sender_map_notify",
        ] {
            let drop = SCHEMA_SQL
                .find(&format!("DROP TRIGGER IF EXISTS {t} "))
                .unwrap();
            let create = SCHEMA_SQL.find(&format!("CREATE TRIGGER {t}\n")).unwrap();
            assert!(drop < create, "{t}");
        }
    }

    #[test]
    fn notifications_fold_into_changes() {
        let mut c = Changes::default();
        assert!(c.is_empty());
        c.add(r#"[1700000000000001, "example.org", "alice"]"#);
        c.add(r#"[1700000000000005, "example.org", "bob"]"#);
        c.add(r#"[1700000000000003, "example.org", "alice"]"#);
        assert!(!c.all && c.rows.len() == 2 && c.newest_us == 1_700_000_000_000_005);
        // TRUNCATE, or anything not understood: everything.
        let mut t = Changes::default();
        t.add("[1700000000000009]");
        assert!(t.all && t.newest_us == 1_700_000_000_000_009);
        let mut g = Changes::default();
        g.add("garbage");
        assert!(g.all);
        // Too many rows at once: one full reload.
        let mut m = Changes::default();
        for i in 0..=MAX_ROW_CHANGES {
            m.add(&format!(r#"[1, "r", "u{i}"]"#));
        }
        assert!(m.all && m.rows.len() == MAX_ROW_CHANGES);
    }

    #[test]
    fn status_reports_fallback_and_age() {
        let s = Status::new("postgresql://tern:***@db/mail".into(), true);
        assert!(s.fallback());
        assert_eq!(s.snapshot_age(), None);
        assert!(s
            .metrics()
            .contains("tern_userstore_snapshot_age_seconds -1.000"));
        s.loaded(3);
        s.up.store(true, Ordering::Relaxed);
        assert!(!s.fallback());
        assert!(s.metrics().contains("tern_userstore_up 1\n"));
        assert!(s.metrics().contains("tern_userstore_users 3\n"));
        s.up.store(false, Ordering::Relaxed);
        assert!(s.metrics().contains("tern_userstore_fallback 1\n"));
        assert_eq!(s.json()["fallback"], true);
        let f = Status::new("/etc/tern/users.db".into(), false);
        assert!(!f.fallback() && f.up.load(Ordering::Relaxed));
    }
}
