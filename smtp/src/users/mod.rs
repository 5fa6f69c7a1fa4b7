//! The user store: who may authenticate, and the derived secrets to check them.
//!
//! Owns: the text format of the store (`tern-users.db`, one `user@realm` per line) and the
//! immutable [`UserDb`] snapshot that shards share via `Arc`. Reading and writing the
//! file (mode checks, atomic rewrite) is the engine's `userstore`: this crate does no I/O.
//!
//! Must never: store or accept a password (only derived secrets, see
//! [`secrets`]), change after it is shared (reload = parse a new snapshot and swap the
//! `Arc`), or print a secret.
//!
//! File format (text, UTF-8, `#` comments and blank lines ignored):
//! ```text
//! user@realm cram-md5=<inner hex32>:<outer hex32> digest-md5=<hex32> scram-sha-256=<iter>:<salt b64>:<StoredKey b64>:<ServerKey b64>
//! ```
//! The realm is everything after the LAST `@` (realms cannot contain `@`).
//!
//! Logins are split the other way, at the FIRST `@` ([`split_login`], as Cyrus's
//! sasldb lookup does): a stored user name that contains `@` (possible in files
//! written before logins were split, and accepted here so such files still load) can
//! never be reached by a login; [`UserDb::unreachable`] lists such entries so the
//! engine can warn. `tern passwd` no longer creates them. See docs/decisions.md,
//! "Logins `user@realm`".

pub mod rates;
pub mod secrets;

pub use rates::{Rate, UserRates};

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hmac::Mac;

pub use secrets::{ScramSecrets, Secrets};

/// Longest user name or realm accepted (octets). RFC 4616 §2 requires PLAIN
/// servers to accept at least 255 octets for authcid.
pub const MAX_NAME_LEN: usize = 255;

/// Everything that can go wrong reading or writing the store.
#[derive(Debug, thiserror::Error)]
pub enum UserDbError {
    #[error("{path}: no such file")]
    NotFound { path: PathBuf },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: mode {mode:04o} lets group or others read it; run `chmod 600 {path}`")]
    Permissions { path: PathBuf, mode: u32 },
    #[error("{path}: not a regular file")]
    NotRegular { path: PathBuf },
    #[error("{path}:{line}: {reason}")]
    Malformed {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("invalid name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
}

/// An immutable snapshot of the user store. `Clone` lets a database-backed store build
/// the next snapshot from the last one plus the rows that changed.
#[derive(Clone)]
pub struct UserDb {
    /// realm → user → secrets; nested so a lookup borrows `&str` keys without
    /// allocating.
    realms: HashMap<String, HashMap<String, Secrets>>,
    /// realm → user → the user's own sending rates (`message-rate=`, `recipient-rate=`),
    /// for the few users that have them.
    rates: HashMap<String, HashMap<String, UserRates>>,
    /// Key for the fake SCRAM salt of unknown users (see [`UserDb::fake_salt`]).
    fake_salt_key: [u8; 32],
    /// No snapshot exists yet (a database-backed store that has not been reachable since
    /// start): AUTH answers 454 4.7.0 instead of judging anyone against no users.
    unavailable: bool,
}

impl std::fmt::Debug for UserDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UserDb {{ users: {} }}", self.len())
    }
}

/// Check a user name: non-empty, bounded, no spaces or control characters
/// (they would break the line format and the CRAM-MD5 "user digest" split).
pub fn check_user(name: &str) -> Result<(), UserDbError> {
    check_name(name, false)
}

/// Check a realm: as a user name, and no `@` (the realm follows the last `@`).
pub fn check_realm(name: &str) -> Result<(), UserDbError> {
    check_name(name, true)
}

fn check_name(name: &str, realm: bool) -> Result<(), UserDbError> {
    let bad = |reason| {
        Err(UserDbError::InvalidName {
            name: name.chars().take(64).collect(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > MAX_NAME_LEN {
        return bad("longer than 255 octets");
    }
    if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return bad("contains white space or a control character");
    }
    if realm && name.contains('@') {
        return bad("a realm cannot contain '@'");
    }
    Ok(())
}

/// Split a SASL login into `(user, realm)` as Cyrus SASL's sasldb lookup does
/// (`_plug_parseuser` in plugins/plugin_common.c): at the FIRST `@`; a login
/// without `@` is in `default_realm`. `alice@example.org` is user `alice` in realm
/// `example.org`; `a@b@c` is user `a` in realm `b@c` (which cannot exist here,
/// so it fails like an unknown user).
pub fn split_login<'a>(login: &'a str, default_realm: &'a str) -> (&'a str, &'a str) {
    login.split_once('@').unwrap_or((login, default_realm))
}

impl UserDb {
    /// A store with no users: every authentication fails (with the same
    /// result as a wrong password).
    pub fn empty() -> UserDb {
        let mut fake_salt_key = [0u8; 32];
        rand::Rng::fill(&mut rand::rng(), &mut fake_salt_key[..]);
        UserDb {
            realms: HashMap::new(),
            rates: HashMap::new(),
            fake_salt_key,
            unavailable: false,
        }
    }

    /// The placeholder a node holds before it has ever loaded its users (a database
    /// store unreachable at start): every AUTH gets a temporary failure, never a 535
    /// and never a success.
    pub fn unavailable() -> UserDb {
        UserDb {
            unavailable: true,
            ..UserDb::empty()
        }
    }

    /// True for [`UserDb::unavailable`].
    pub fn is_unavailable(&self) -> bool {
        self.unavailable
    }

    /// Parse the text format; `path` only labels errors.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<UserDb, UserDbError> {
        let mut db = UserDb::empty();
        for (index, raw) in bytes.split(|&b| b == b'\n').enumerate() {
            let line_no = index + 1;
            let malformed = |reason: String| UserDbError::Malformed {
                path: path.to_owned(),
                line: line_no,
                reason,
            };
            let line = std::str::from_utf8(raw).map_err(|_| malformed("not UTF-8".into()))?;
            let line = line.strip_suffix('\r').unwrap_or(line);
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let (user, realm, secrets, rates) = parse_line(line).map_err(malformed)?;
            if db.lookup(user, realm).is_some() {
                return Err(malformed(format!("duplicate entry for {user}@{realm}")));
            }
            db.insert(user, realm, secrets)
                .map_err(|e| malformed(e.to_string()))?;
            db.set_rates(user, realm, rates);
        }
        Ok(db)
    }

    /// The secrets of `user` in `realm`, if any. Exact, case-sensitive match
    /// (as sasldb; SASL identities are case-sensitive unless a profile says
    /// otherwise).
    pub fn lookup(&self, user: &str, realm: &str) -> Option<&Secrets> {
        self.realms.get(realm)?.get(user)
    }

    /// A per-snapshot, deterministic salt for a user that does not exist, so
    /// SCRAM's server-first message does not reveal which users exist
    /// (RFC 5802 §9 notes the salt can otherwise leak this). Keyed with a
    /// random per-snapshot key so it cannot be predicted from outside.
    pub fn fake_salt(&self, user: &str, realm: &str) -> [u8; secrets::SCRAM_SALT_LEN] {
        let mut mac = secrets::hmac_sha256(&self.fake_salt_key);
        mac.update(realm.as_bytes());
        mac.update(b"\0");
        mac.update(user.as_bytes());
        let full: [u8; 32] = mac.finalize().into_bytes().into();
        let mut out = [0u8; secrets::SCRAM_SALT_LEN];
        out.copy_from_slice(&full[..secrets::SCRAM_SALT_LEN]);
        out
    }

    /// Add or replace a user. Only for building a store (the CLI, tests): a
    /// snapshot shared with shards is behind `Arc` and cannot be mutated.
    pub fn insert(&mut self, user: &str, realm: &str, secrets: Secrets) -> Result<(), UserDbError> {
        check_user(user)?;
        check_realm(realm)?;
        self.realms
            .entry(realm.to_owned())
            .or_default()
            .insert(user.to_owned(), secrets);
        Ok(())
    }

    /// The user's own sending rates, if the store sets any.
    pub fn rates(&self, user: &str, realm: &str) -> Option<UserRates> {
        self.rates.get(realm)?.get(user).copied()
    }

    /// Sets (or, with empty rates, clears) the user's own sending rates.
    pub fn set_rates(&mut self, user: &str, realm: &str, rates: UserRates) {
        if rates.is_empty() {
            if let Some(m) = self.rates.get_mut(realm) {
                m.remove(user);
                if m.is_empty() {
                    self.rates.remove(realm);
                }
            }
        } else {
            self.rates
                .entry(realm.to_owned())
                .or_default()
                .insert(user.to_owned(), rates);
        }
    }

    /// Remove a user; returns whether it existed.
    pub fn remove(&mut self, user: &str, realm: &str) -> bool {
        self.set_rates(user, realm, UserRates::default());
        let Some(users) = self.realms.get_mut(realm) else {
            return false;
        };
        let existed = users.remove(user).is_some();
        if users.is_empty() {
            self.realms.remove(realm);
        }
        existed
    }

    /// Entries no login can reach: user names containing `@` (a login splits at
    /// the first `@`, see [`split_login`]). Sorted like [`UserDb::entries`].
    pub fn unreachable(&self) -> Vec<(&str, &str)> {
        self.entries()
            .into_iter()
            .filter(|(user, _)| user.contains('@'))
            .collect()
    }

    /// Number of users.
    pub fn len(&self) -> usize {
        self.realms.values().map(HashMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// All `(user, realm)` pairs, sorted by realm then user (stable output
    /// for `--list` and for diffs of the file).
    pub fn entries(&self) -> Vec<(&str, &str)> {
        let mut out: Vec<(&str, &str)> = self
            .realms
            .iter()
            .flat_map(|(realm, users)| users.keys().map(move |u| (u.as_str(), realm.as_str())))
            .collect();
        out.sort_by(|a, b| (a.1, a.0).cmp(&(b.1, b.0)));
        out
    }

    /// Serialise to the text format.
    pub fn to_text(&self) -> String {
        let mut out = String::from(
            "# tern user store (format 1): derived secrets only; written by `tern passwd`.\n\
             # Must stay mode 0600: the values are password-equivalents for CRAM-MD5/DIGEST-MD5.\n",
        );
        for (user, realm) in self.entries() {
            let Some(s) = self.lookup(user, realm) else {
                continue;
            };
            let [cram, digest, scram] = secret_fields(s);
            let _ = writeln!(
                out,
                "{user}@{realm} cram-md5={cram} digest-md5={digest} scram-sha-256={scram}",
            );
            if let Some(r) = self.rates(user, realm) {
                // Optional trailing fields: the user's own sending rates.
                out.pop(); // the newline writeln! added
                if let Some(m) = r.messages {
                    let _ = write!(out, " message-rate={}", m.to_text());
                }
                if let Some(m) = r.recipients {
                    let _ = write!(out, " recipient-rate={}", m.to_text());
                }
                out.push('\n');
            }
        }
        out
    }
}

/// The values of a user's three secret fields as the file writes them (after
/// `cram-md5=`, `digest-md5=`, `scram-sha-256=`): `inner:outer` hex, hex, and
/// `iterations:salt:StoredKey:ServerKey` (base64). A database store keeps the same texts
/// in its columns.
pub fn secret_fields(s: &Secrets) -> [String; 3] {
    [
        format!("{}:{}", hex(&s.cram_inner), hex(&s.cram_outer)),
        hex(&s.digest_ha1),
        format!(
            "{}:{}:{}:{}",
            s.scram.iterations,
            B64.encode(&s.scram.salt),
            B64.encode(s.scram.stored_key),
            B64.encode(s.scram.server_key),
        ),
    ]
}

pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in s.as_bytes().chunks_exact(2).enumerate() {
        let pair = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(out)
}

fn unb64_32(s: &str) -> Option<[u8; 32]> {
    let v = B64.decode(s).ok()?;
    v.try_into().ok()
}

/// Parse one non-comment line; the error is the reason, the caller adds the
/// line number.
fn parse_line(line: &str) -> Result<(&str, &str, Secrets, UserRates), String> {
    let mut fields = line.split(' ');
    let (Some(id), Some(cram), Some(digest), Some(scram)) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return Err("expected 4 space-separated fields: user@realm cram-md5=.. digest-md5=.. scram-sha-256=..".into());
    };
    // Optional trailing fields: the user's own sending rates.
    let mut rates = UserRates::default();
    for extra in fields {
        let (key, value) = extra
            .split_once('=')
            .ok_or_else(|| format!("unexpected field {extra:?}"))?;
        let rate = Rate::parse(value)?;
        match key {
            "message-rate" => rates.messages = rate,
            "recipient-rate" => rates.recipients = rate,
            _ => {
                return Err(format!(
                    "unknown field {key:?} (expected message-rate= or recipient-rate=)"
                ))
            }
        }
    }
    let (user, realm) = id
        .rsplit_once('@')
        .ok_or_else(|| "first field is not user@realm".to_string())?;
    check_user(user).map_err(|e| e.to_string())?;
    check_realm(realm).map_err(|e| e.to_string())?;

    let cram = cram
        .strip_prefix("cram-md5=")
        .ok_or("second field must be cram-md5=")?;
    let (inner, outer) = cram
        .split_once(':')
        .ok_or("cram-md5: expected inner:outer")?;
    let cram_inner = unhex::<16>(inner).ok_or("cram-md5: inner state is not 32 hex digits")?;
    let cram_outer = unhex::<16>(outer).ok_or("cram-md5: outer state is not 32 hex digits")?;

    let digest = digest
        .strip_prefix("digest-md5=")
        .ok_or("third field must be digest-md5=")?;
    let digest_ha1 = unhex::<16>(digest).ok_or("digest-md5: not 32 hex digits")?;

    let scram = scram
        .strip_prefix("scram-sha-256=")
        .ok_or("fourth field must be scram-sha-256=")?;
    let mut parts = scram.split(':');
    let (Some(iter), Some(salt), Some(stored), Some(server), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err("scram-sha-256: expected iterations:salt:StoredKey:ServerKey".into());
    };
    let iterations: u32 = iter
        .parse()
        .ok()
        .filter(|i| (1..=secrets::MAX_SCRAM_ITERATIONS).contains(i))
        .ok_or("scram-sha-256: bad iteration count")?;
    let salt = B64
        .decode(salt)
        .ok()
        .filter(|s| !s.is_empty() && s.len() <= secrets::MAX_SCRAM_SALT_LEN)
        .ok_or("scram-sha-256: bad salt")?;
    let stored_key = unb64_32(stored).ok_or("scram-sha-256: bad StoredKey")?;
    let server_key = unb64_32(server).ok_or("scram-sha-256: bad ServerKey")?;
    Ok((
        user,
        realm,
        Secrets {
            cram_inner,
            cram_outer,
            digest_ha1,
            scram: ScramSecrets {
                iterations,
                salt,
                stored_key,
                server_key,
            },
        },
        rates,
    ))
}
