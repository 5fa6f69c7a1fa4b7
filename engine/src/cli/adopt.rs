//! `tern queue adopt DIR`: re-queue the undelivered mail of another node's spool (a node
//! that will not come back: a moved disk, a shared volume) on the running server.
//!
//! What is adopted: every message record of `DIR/shard-*/` that still has a pending
//! recipient, as recovery would see it (`tern_queue::scan_spool_with_state`), with only
//! those pending recipients and otherwise its envelope unchanged (sender, arrival time,
//! SIZE/BODY/SMTPUTF8, RET/ENVID, NOTIFY/ORCPT, BY, AUTH, client HELO/address) and its
//! stored body (with the original node's Received: header; no new one is added). Each
//! goes to the running server through the admin socket's `submit` request: shard 0
//! writes and syncs it and hands it to its runner, and answers with the new queue id.
//! Not carried over: the hold flag (a held message is delivered by the adopting node),
//! the attempt count, the next attempt time and whether a delay DSN was sent (a delay
//! warning may be sent again). Messages whose recipients are all final are skipped.
//!
//! Only live: with no server answering on the admin socket the command exits 69 and
//! changes nothing (start the server, then adopt).
//!
//! Exactly once, and crash behaviour:
//! - Every shard lock of `DIR` (`shard-NNN/LOCK`, the lock a server holds on its own
//!   spool) is taken for the whole run: a server still running on `DIR`, or a second
//!   `adopt` of it, is refused (75). So is adopting the running server's own spool.
//! - After each message is accepted (durable on the adopting node), a line
//!   `SOURCE-ID NEW-ID` is appended to `DIR/ADOPTING` and fdatasync'ed; a re-run skips
//!   every message listed there.
//! - When every message has been handed over, `DIR/ADOPTED` is written (a summary),
//!   synced and renamed into place; with it present, `adopt` does nothing (exit 0).
//! - A crash (or kill) between the server's answer and the progress line's sync can
//!   make a re-run submit that one message again: at most one duplicate per interrupted
//!   run, never a loss (the source is never modified apart from the two files above).
//!   A torn last line of `ADOPTING` (a crash before its newline reached the disk) is
//!   not trusted (that message is submitted again) and is cut off before appending.
//!
//! Exit codes (sysexits.h): 0 done (or already adopted), 64 usage, 66 no such directory
//! (or one without `shard-NNN/`),
//! 69 no server, 70 the server refused a message, 74 I/O error (a body that cannot be
//! read, the progress file), 75 `DIR` in use by a running server or another adopt, or
//! the server's queue is full (re-run later: progress is kept), 77 permission denied.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde_json::json;
use tern_queue::{RcptState, SpoolError};

use tern_engine::admin::proto::{self as admin, ClientError, Request, WireEnvelope};

/// A failed adopt: exit code and message.
pub struct AdoptFail(pub u8, pub String);

impl From<ClientError> for AdoptFail {
    fn from(e: ClientError) -> Self {
        AdoptFail(e.exit_code(), e.to_string())
    }
}

/// What one run did.
#[derive(Debug, Default)]
pub struct Report {
    /// (source id, new id, recipients) adopted by this run.
    pub adopted: Vec<(String, String, usize)>,
    /// Messages whose recipients were all final already.
    pub finished: usize,
    /// Messages handed over by an earlier, interrupted run (listed in ADOPTING).
    pub earlier: usize,
    /// (source id, error) of messages that could not be read.
    pub unreadable: Vec<(String, String)>,
    /// DIR/ADOPTED was already there: nothing was done.
    pub already: bool,
}

const PROGRESS: &str = "ADOPTING";
const DONE: &str = "ADOPTED";

fn io_fail(what: &str, path: &Path, e: std::io::Error) -> AdoptFail {
    let code = match e.kind() {
        std::io::ErrorKind::PermissionDenied => 77,
        std::io::ErrorKind::NotFound => 66,
        _ => 74,
    };
    AdoptFail(code, format!("{what} {}: {e}", path.display()))
}

fn sync_dir(dir: &Path) -> Result<(), AdoptFail> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_fail("syncing", dir, e))
}

/// Source ids already handed over, from `DIR/ADOPTING`, and the length of its complete
/// lines: a torn last line (a crash before its newline) is not trusted, and is cut off
/// before anything is appended (else the next line would be glued to it).
fn read_progress(path: &Path) -> Result<(HashMap<String, String>, u64), AdoptFail> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((HashMap::new(), 0)),
        Err(e) => return Err(io_fail("reading", path, e)),
    };
    let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let map = String::from_utf8_lossy(&bytes[..complete])
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_string(), it.next().unwrap_or("").to_string()))
        })
        .collect();
    Ok((map, complete as u64))
}

/// Adopts `dir` into the server on `socket`; prints one line per adopted message.
pub fn adopt(dir: &Path, socket: &Path) -> Result<Report, AdoptFail> {
    if !dir.is_dir() {
        return Err(AdoptFail(
            66,
            format!("{}: no such spool directory", dir.display()),
        ));
    }
    // 1. The source's shard locks, for the whole run. A directory without shard
    // directories is not a spool (a typo must not leave marker files anywhere).
    let shards = shard_dirs(dir)?;
    if shards.is_empty() {
        return Err(AdoptFail(
            66,
            format!(
                "{}: not a spool directory (no shard-NNN/ in it)",
                dir.display()
            ),
        ));
    }
    let mut locks = Vec::new();
    for (_, sdir) in shards {
        match tern_queue::segment::lock_shard_dir(&sdir) {
            Ok(f) => locks.push(f),
            Err(SpoolError::Locked { path }) => {
                return Err(AdoptFail(
                    75,
                    format!(
                        "{} is locked: a server (or another adopt) is still using this spool; \
                         stop it first",
                        path.display()
                    ),
                ))
            }
            Err(e) => return Err(AdoptFail(74, e.to_string())),
        }
    }
    let done_path = dir.join(DONE);
    if done_path.exists() {
        return Ok(Report {
            already: true,
            ..Report::default()
        });
    }
    // 2. A live server, before anything is read.
    admin::call(socket, &Request::Status)?;

    let progress_path = dir.join(PROGRESS);
    let (handed, complete) = read_progress(&progress_path)?;
    let existed = progress_path.exists();
    let mut progress = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&progress_path)
        .map_err(|e| io_fail("opening", &progress_path, e))?;
    if !existed {
        sync_dir(dir)?;
    }
    let len = progress
        .metadata()
        .map_err(|e| io_fail("reading", &progress_path, e))?
        .len();
    if len > complete {
        progress
            .set_len(complete)
            .and_then(|()| progress.sync_data())
            .map_err(|e| io_fail("truncating", &progress_path, e))?;
    }

    // 3. Every message, as recovery sees it.
    let mut msgs =
        tern_queue::scan_spool_with_state(dir).map_err(|e| AdoptFail(74, e.to_string()))?;
    msgs.sort_by_key(|(m, q)| (q.arrival_unix_micros, m.shard, m.segment, m.offset));
    let mut report = Report::default();
    for (m, q) in msgs {
        let src = m.envelope.id.clone();
        if q.is_finished() {
            report.finished += 1;
            continue;
        }
        if handed.contains_key(&src) {
            report.earlier += 1;
            continue;
        }
        let body = match tern_queue::read_body(dir, m.shard, m.segment, m.offset) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("tern queue adopt: {src}: cannot read the body: {e}");
                report.unreadable.push((src, e.to_string()));
                continue;
            }
        };
        let mut env = m.envelope;
        env.recipients = env
            .recipients
            .into_iter()
            .enumerate()
            .filter(|(i, _)| q.rcpt_states.get(*i) == Some(RcptState::Pending))
            .map(|(_, r)| r)
            .collect();
        let n = env.recipients.len();
        let req = Request::Submit {
            envelope: WireEnvelope::from(&env),
            received: String::new(),
            body: base64::engine::general_purpose::STANDARD.encode(&body),
        };
        let v = admin::call(socket, &req).map_err(|e| match e {
            ClientError::Server(s) if s.contains("full") => {
                AdoptFail(75, format!("{src}: {s} (re-run later: progress is kept)"))
            }
            e => AdoptFail(e.exit_code(), format!("{src}: {e}")),
        })?;
        let new = v
            .get("id")
            .and_then(|i| i.as_str())
            .ok_or_else(|| AdoptFail(76, format!("{src}: no queue id in the answer {v}")))?
            .to_string();
        progress
            .write_all(format!("{src} {new}\n").as_bytes())
            .and_then(|()| progress.sync_data())
            .map_err(|e| io_fail("writing", &progress_path, e))?;
        println!("adopted {src} as {new} ({n} recipient(s))");
        report.adopted.push((src, new, n));
    }

    // 4. All handed over: the marker.
    if report.unreadable.is_empty() {
        let tmp = dir.join(format!("{DONE}.tmp"));
        let summary = json!({
            "adopted_unix": std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            "messages": report.adopted.len() + report.earlier,
            "finished": report.finished,
        });
        let mut f = File::create(&tmp).map_err(|e| io_fail("creating", &tmp, e))?;
        f.write_all(format!("{summary}\n").as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| io_fail("writing", &tmp, e))?;
        std::fs::rename(&tmp, &done_path).map_err(|e| io_fail("renaming", &tmp, e))?;
        sync_dir(dir)?;
    }
    drop(locks);
    Ok(report)
}

/// The shard directories under `dir`.
fn shard_dirs(dir: &Path) -> Result<Vec<(u16, PathBuf)>, AdoptFail> {
    tern_queue::segment::shard_dirs(dir).map_err(|e| io_fail("listing", dir, e))
}
