//! `tern queue ...`: the queue tools, live (a running server's admin socket) or offline
//! (a spool directory).
//!
//! Where a command goes:
//! - `--socket PATH`: the server answering there (`admin.rs`); none answering is an error.
//! - `--spool DIR`: offline, on that spool directory.
//! - neither: the admin socket of `--config FILE` (or of the built-in defaults); when no
//!   server answers there, offline on that configuration's spool directory.
//!
//! Offline reading (`list`, `show`, `stats`) walks the segment files read-only (no lock,
//! no write, torn tails left alone), so it is safe next to a live server; it applies the
//! state records the way recovery does, so held messages, attempts and last replies show.
//! Offline changes (`delete`, `hold`, `release`) open each shard's spool with
//! `ShardSpool::open`, which takes the shard's lock: while a server runs they are refused
//! (use the live mode), so the server's index never disagrees with the spool. `flush` is
//! live only: there is nothing to flush without a queue runner. `adopt DIR` (another
//! node's spool onto the running server, exactly once) is live only too: `adopt.rs`.
//!
//! Output: columns for people, `--json` for scripts (list: one object per line). Exit
//! codes from sysexits.h: 0 done, 64 usage, 66 no such spool or message, 69 no server
//! (live only commands), 70 server error, 74 I/O error, 75 spool locked by a running
//! server or messages busy, 76 bad answer, 77 permission denied, 78 bad configuration.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand};
use serde_json::{json, Value};
use tern_queue::runner::{AdminChange, MsgState, QueueItem, Select};
use tern_queue::{SpoolError, SpoolOptions};

use tern_engine::admin::proto::{self as admin, ClientError, Filter, Request};
use tern_engine::config::Config;

/// Where a queue command goes (see the module docs).
#[derive(Args, Clone, Debug)]
pub struct Target {
    /// Talk to the server on this admin socket.
    #[arg(long, value_name = "PATH", conflicts_with = "spool")]
    pub socket: Option<PathBuf>,
    /// Work offline on this spool directory.
    #[arg(long, value_name = "DIR")]
    pub spool: Option<PathBuf>,
    /// Configuration file naming admin.socket and spool.dir (default: built-in defaults).
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// Which messages (`--from`, `--to-domain`).
#[derive(Args, Clone, Debug, Default)]
pub struct Which {
    /// Sender contains ADDR (case-insensitive; "<>" is the null sender).
    #[arg(long, value_name = "ADDR")]
    pub from: Option<String>,
    /// A pending recipient is in domain D.
    #[arg(long = "to-domain", value_name = "D")]
    pub to_domain: Option<String>,
}

#[derive(Subcommand)]
pub enum QueueCmd {
    /// List queued messages (like mailq): id, size, age, sender, pending recipients.
    /// "!" after the id: held; "*": being delivered now.
    List {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        which: Which,
        /// Queued at least this long (e.g. 30m, 2h, 1d).
        #[arg(long = "older-than", value_name = "DURATION")]
        older_than: Option<humantime::Duration>,
        /// Only messages in this state: active, deferred, held or all.
        #[arg(long, value_name = "STATE")]
        state: Option<String>,
        /// One JSON object per line instead of columns.
        #[arg(long)]
        json: bool,
        /// Offline: also list messages that are completely delivered or bounced (until
        /// their segment is recycled), with every recipient's state.
        #[arg(long)]
        all: bool,
    },
    /// Show one message: envelope, recipients and their states, attempts, last reply.
    Show {
        /// Queue id.
        id: String,
        /// Also print the body (at most 1 MiB).
        #[arg(long)]
        body: bool,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Try every queued message now (or only those with a recipient in DOMAIN). Live only.
    Flush {
        domain: Option<String>,
        #[command(flatten)]
        target: Target,
    },
    /// Delete messages: their pending recipients fail WITHOUT a bounce.
    Delete {
        /// Queue id (or select with --from / --to-domain).
        #[arg(required_unless_present_any = ["from", "to_domain"])]
        id: Option<String>,
        #[command(flatten)]
        which: Which,
        #[command(flatten)]
        target: Target,
    },
    /// Put a message on hold: it stays queued but is not tried until released.
    Hold {
        id: String,
        #[command(flatten)]
        target: Target,
    },
    /// Release a held message: it is tried at its next attempt time (now if passed).
    Release {
        id: String,
        #[command(flatten)]
        target: Target,
    },
    /// Re-queue the undelivered mail of another node's spool DIR (a node that will not
    /// come back) on the running server, exactly once: DIR is marked ADOPTED afterwards.
    /// Live only; DIR must not be in use by a server.
    Adopt {
        /// The other node's spool directory.
        dir: PathBuf,
        /// The running server's admin socket (default: that of --config).
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// Configuration file naming admin.socket (default: built-in defaults).
        #[arg(long, short = 'c', value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Queue counts, bytes, oldest message and pending recipients per domain.
    Stats {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: Target,
    },
}

/// A failed command: exit code and message.
struct Fail(u8, String);

impl From<ClientError> for Fail {
    fn from(e: ClientError) -> Fail {
        Fail(e.exit_code(), e.to_string())
    }
}

/// Where a command goes once resolved.
enum Mode {
    Live(PathBuf, std::os::unix::net::UnixStream),
    Offline(PathBuf, SpoolOptions),
}

fn resolve(t: &Target) -> Result<Mode, Fail> {
    if let Some(s) = &t.socket {
        return Ok(Mode::Live(s.clone(), admin::connect(s)?));
    }
    let cfg = Config::load(t.config.as_deref(), &[]).map_err(|e| Fail(78, e.to_string()))?;
    let opts = SpoolOptions {
        segment_size: cfg.spool.segment_size,
    };
    if let Some(d) = &t.spool {
        return Ok(Mode::Offline(d.clone(), opts));
    }
    let sock = cfg.admin_socket();
    match admin::connect(&sock) {
        Ok(c) => Ok(Mode::Live(sock, c)),
        Err(ClientError::NoServer { .. }) => {
            eprintln!(
                "tern queue: no server answers on {}; working offline on {}",
                sock.display(),
                cfg.spool.dir.display()
            );
            Ok(Mode::Offline(cfg.spool.dir.clone(), opts))
        }
        Err(e) => Err(e.into()),
    }
}

pub fn run(cmd: QueueCmd) -> ExitCode {
    let (name, r) = match cmd {
        QueueCmd::List {
            target,
            which,
            older_than,
            state,
            json,
            all,
        } => {
            let f = Filter {
                from: which.from,
                to_domain: which.to_domain,
                older_than_secs: older_than.map(|d| Duration::from(d).as_secs()),
                state,
                ..Filter::default()
            };
            ("list", list(&target, f, json, all))
        }
        QueueCmd::Show {
            id,
            body,
            json,
            target,
        } => ("show", show(&target, &id, body, json)),
        QueueCmd::Flush { domain, target } => ("flush", flush(&target, domain)),
        QueueCmd::Delete { id, which, target } => {
            let f = Filter {
                id,
                from: which.from,
                to_domain: which.to_domain,
                ..Filter::default()
            };
            ("delete", change(&target, f, AdminChange::Delete))
        }
        QueueCmd::Hold { id, target } => {
            ("hold", change(&target, id_filter(id), AdminChange::Hold))
        }
        QueueCmd::Release { id, target } => (
            "release",
            change(&target, id_filter(id), AdminChange::Release),
        ),
        QueueCmd::Stats { json, target } => ("stats", stats(&target, json)),
        QueueCmd::Adopt {
            dir,
            socket,
            config,
        } => ("adopt", adopt(&dir, socket, config)),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(Fail(code, msg)) => {
            eprintln!("tern queue {name}: {msg}");
            ExitCode::from(code)
        }
    }
}

/// A filter that selects one message by id.
fn id_filter(id: String) -> Filter {
    Filter {
        id: Some(id),
        ..Filter::default()
    }
}

// ---------------------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------------------

fn list(t: &Target, f: Filter, json: bool, all: bool) -> Result<(), Fail> {
    let items: Vec<Value> = match resolve(t)? {
        Mode::Live(path, conn) => {
            let mut v = admin::call_on(&path, conn, &Request::List(f))?;
            match v.get_mut("items").map(Value::take) {
                Some(Value::Array(a)) => a,
                _ => return Err(bad_answer(&path)),
            }
        }
        Mode::Offline(dir, _) => {
            let sel = f.to_select().map_err(|e| Fail(64, e))?;
            offline_items(&dir, &sel, all)?
                .iter()
                .map(|it| admin::item_json(it, all))
                .collect()
        }
    };
    if json {
        for it in &items {
            println!("{it}");
        }
        return Ok(());
    }
    println!(
        "{:<17} {:>9} {:>8}  {:<30} RECIPIENTS",
        "ID", "SIZE", "AGE", "SENDER"
    );
    for it in &items {
        let id = format!(
            "{}{}",
            s(it, "id"),
            match s(it, "state") {
                "held" => "!",
                _ if it["in_flight"].as_bool() == Some(true) => "*",
                _ => "",
            }
        );
        let rcpts: Vec<&str> = it["recipients"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        println!(
            "{:<17} {:>9} {:>8}  {:<30} {}",
            id,
            n(it, "size"),
            human_age(n(it, "age_secs")),
            s(it, "sender"),
            rcpts.join(", ")
        );
        if let Some(r) = it["last_reply"].as_str() {
            println!("{:>19}({})", "", r);
        }
    }
    println!("-- {} message(s)", items.len());
    Ok(())
}

fn show(t: &Target, id: &str, body: bool, json: bool) -> Result<(), Fail> {
    let item = match resolve(t)? {
        Mode::Live(path, conn) => {
            let mut v = admin::call_on(
                &path,
                conn,
                &Request::Show {
                    id: id.to_string(),
                    body,
                },
            )?;
            v.get_mut("item").map(Value::take).unwrap_or(Value::Null)
        }
        Mode::Offline(dir, _) => {
            let sel = Select {
                id: Some(id.to_string()),
                ..Select::default()
            };
            match offline_items(&dir, &sel, true)?.first() {
                Some(it) => {
                    let b = if body {
                        let m = it.q.msg;
                        let mut b = tern_queue::read_body(&dir, m.shard, m.segment, m.offset)
                            .map_err(spool_fail)?;
                        b.truncate(admin::BODY_CAP);
                        Some(b)
                    } else {
                        None
                    };
                    admin::show_json(it, b.as_deref())
                }
                None => Value::Null,
            }
        }
    };
    if item.is_null() {
        return Err(Fail(66, format!("no message {id} in the queue")));
    }
    if json {
        println!("{item}");
        return Ok(());
    }
    let arrival = n(&item, "arrival_unix_micros");
    println!("id:           {}", s(&item, "id"));
    println!(
        "where:        shard {}, segment {}, offset {}",
        n(&item, "shard"),
        n(&item, "segment"),
        n(&item, "offset")
    );
    println!("state:        {}", s(&item, "state"));
    println!(
        "arrival:      {} ({} ago)",
        rfc3339(arrival / 1_000_000),
        human_age(n(&item, "age_secs"))
    );
    println!("sender:       {}", s(&item, "sender"));
    println!(
        "size:         {} ({}{})",
        n(&item, "size"),
        s(&item, "body_type"),
        if item["smtputf8"].as_bool() == Some(true) {
            ", SMTPUTF8"
        } else {
            ""
        }
    );
    println!(
        "client:       {} ({})",
        s(&item, "client_helo"),
        s(&item, "client_addr")
    );
    if let Some(a) = item["auth"].as_str() {
        println!("auth:         {a}");
    }
    if let Some(e) = item["envid"].as_str() {
        println!("envid:        {e}");
    }
    let attempts = n(&item, "attempts");
    println!("attempts:     {attempts}");
    let next = n(&item, "next_attempt_unix");
    if attempts > 0 && next > 0 && s(&item, "state") != "held" {
        println!("next attempt: {}", rfc3339(next));
    }
    if let Some(r) = item["last_reply"].as_str() {
        println!("last reply:   {r}");
    }
    println!("recipients:");
    for r in item["all_recipients"].as_array().into_iter().flatten() {
        println!("  {:<40} {}", s(r, "addr"), s(r, "state"));
    }
    if let Some(b) = item["body"].as_str() {
        let trunc = item["body_truncated"].as_bool() == Some(true);
        println!("-- body{} --", if trunc { " (first 1 MiB)" } else { "" });
        print!("{b}");
        if !b.ends_with('\n') {
            println!();
        }
    }
    Ok(())
}

fn flush(t: &Target, domain: Option<String>) -> Result<(), Fail> {
    match resolve(t)? {
        Mode::Live(path, conn) => {
            let f = Filter {
                to_domain: domain,
                ..Filter::default()
            };
            let v = admin::call_on(&path, conn, &Request::Flush(f))?;
            println!("{} message(s) to be tried now", n(&v, "flushed"));
            Ok(())
        }
        Mode::Offline(dir, _) => Err(Fail(
            69,
            format!(
                "flush needs a running server (working offline on {}: nothing delivers from there)",
                dir.display()
            ),
        )),
    }
}

fn change(t: &Target, f: Filter, what: AdminChange) -> Result<(), Fail> {
    let verb = match what {
        AdminChange::Hold => "held",
        AdminChange::Release => "released",
        AdminChange::Delete => "deleted",
    };
    let (matched, changed, busy, failed) = match resolve(t)? {
        Mode::Live(path, mut conn) => {
            // A message in the middle of a delivery attempt is left alone by the server
            // ("busy"); attempts are short, so ask again for a few seconds. Messages
            // changed already no longer match (deleted) or are skipped (held).
            let (mut matched, mut changed, mut failed) = (0, 0, 0);
            let mut tries = 0;
            loop {
                let req = match what {
                    AdminChange::Hold => Request::Hold(f.clone()),
                    AdminChange::Release => Request::Release(f.clone()),
                    AdminChange::Delete => Request::Delete(f.clone()),
                };
                let v = admin::call_on(&path, conn, &req)?;
                matched = matched.max(n(&v, "matched"));
                changed += n(&v, "changed");
                failed += n(&v, "failed");
                let busy = n(&v, "busy");
                tries += 1;
                if busy == 0 || tries >= 20 {
                    break (matched, changed, busy, failed);
                }
                std::thread::sleep(Duration::from_millis(250));
                conn = admin::connect(&path)?;
            }
        }
        Mode::Offline(dir, opts) => {
            let sel = f.to_select().map_err(|e| Fail(64, e))?;
            let (m, c, fl) = offline_change(&dir, opts, &sel, what)?;
            (m as u64, c as u64, 0, fl as u64)
        }
    };
    if matched > 0 || f.id.is_none() {
        println!("{changed} message(s) {verb}");
    }
    if failed > 0 {
        return Err(Fail(
            74,
            format!("{failed} message(s) could not be changed (see the server log)"),
        ));
    }
    if busy > 0 {
        return Err(Fail(
            75,
            format!("{busy} message(s) are being delivered right now; try again"),
        ));
    }
    if matched == 0 {
        if let Some(id) = &f.id {
            return Err(Fail(66, format!("no message {id} in the queue")));
        }
    }
    Ok(())
}

fn adopt(dir: &Path, socket: Option<PathBuf>, config: Option<PathBuf>) -> Result<(), Fail> {
    let socket = match socket {
        Some(s) => s,
        None => Config::load(config.as_deref(), &[])
            .map_err(|e| Fail(78, e.to_string()))?
            .admin_socket(),
    };
    let r = super::adopt::adopt(dir, &socket).map_err(|e| Fail(e.0, e.1))?;
    if r.already {
        println!(
            "{} was adopted already ({} present): nothing to do",
            dir.display(),
            dir.join("ADOPTED").display()
        );
        return Ok(());
    }
    let rcpts: usize = r.adopted.iter().map(|a| a.2).sum();
    println!(
        "adopted {} message(s), {} recipient(s); skipped {} finished message(s) and {} \
         handed over by an earlier run",
        r.adopted.len(),
        rcpts,
        r.finished,
        r.earlier
    );
    if !r.unreadable.is_empty() {
        return Err(Fail(
            74,
            format!(
                "{} message(s) could not be read (see above); {} not marked ADOPTED",
                r.unreadable.len(),
                dir.display()
            ),
        ));
    }
    Ok(())
}

fn stats(t: &Target, json: bool) -> Result<(), Fail> {
    let v = match resolve(t)? {
        Mode::Live(path, conn) => admin::call_on(&path, conn, &Request::Stats)?,
        Mode::Offline(dir, _) => offline_stats(&offline_items(&dir, &Select::default(), false)?),
    };
    if json {
        println!("{v}");
        return Ok(());
    }
    println!(
        "messages:   {} (active {}, deferred {}, held {})",
        n(&v, "messages"),
        n(&v, "active"),
        n(&v, "deferred"),
        n(&v, "held")
    );
    println!("recipients: {} pending", n(&v, "recipients"));
    println!("bytes:      {}", n(&v, "bytes"));
    if let Some(o) = v["oldest_arrival_unix_micros"].as_u64() {
        println!(
            "oldest:     {} ({} ago)",
            rfc3339(o / 1_000_000),
            human_age(now_micros().saturating_sub(o) / 1_000_000)
        );
    }
    if let Some(d) = v["domains"].as_object() {
        let mut d: Vec<(&String, u64)> = d
            .iter()
            .map(|(k, v)| (k, v.as_u64().unwrap_or(0)))
            .collect();
        d.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        if !d.is_empty() {
            println!("pending recipients per domain:");
        }
        for (k, c) in d {
            println!("  {c:>8}  {k}");
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Offline
// ---------------------------------------------------------------------------------------

fn spool_fail(e: SpoolError) -> Fail {
    match e {
        SpoolError::Locked { path } => Fail(
            75,
            format!(
                "the spool is in use by a running server ({} is locked): use the live mode \
                 (--socket, or no --spool), or stop the server first",
                path.display()
            ),
        ),
        SpoolError::Io { ref source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            Fail(66, e.to_string())
        }
        e => Fail(74, e.to_string()),
    }
}

/// The shard directories under `dir`, by shard number.
fn shard_dirs(dir: &Path) -> Result<Vec<(u16, PathBuf)>, Fail> {
    tern_queue::segment::shard_dirs(dir).map_err(|e| Fail(66, format!("{}: {e}", dir.display())))
}

/// Every message of the spool under `dir` with its state after every state record (as
/// recovery computes it, through `tern_queue::scan_spool_with_state`), read-only, oldest
/// first; finished ones only with `all`.
fn offline_items(dir: &Path, sel: &Select, all: bool) -> Result<Vec<QueueItem>, Fail> {
    if !dir.is_dir() {
        return Err(Fail(
            66,
            format!("{}: no such spool directory", dir.display()),
        ));
    }
    let out: Vec<QueueItem> = tern_queue::scan_spool_with_state(dir)
        .map_err(spool_fail)?
        .into_iter()
        .map(|(m, q)| QueueItem {
            q,
            in_flight: false,
            envelope: m.envelope,
        })
        .collect();
    let now = now_micros();
    let mut v: Vec<QueueItem> = out
        .into_iter()
        .filter(|it| all || !it.q.is_finished())
        .filter(|it| {
            sel.matches_entry(&it.q, false, now) && sel.matches_envelope(&it.q, &it.envelope)
        })
        .collect();
    v.sort_by_key(|it| (it.q.arrival_unix_micros, it.q.msg));
    Ok(v)
}

fn offline_stats(items: &[QueueItem]) -> Value {
    let mut domains = std::collections::BTreeMap::<String, u64>::new();
    let (mut active, mut deferred, mut held, mut rcpts, mut bytes) = (0, 0, 0, 0, 0u64);
    for it in items {
        match it.state() {
            MsgState::Held => held += 1,
            MsgState::Deferred => deferred += 1,
            _ => active += 1,
        }
        bytes += it.envelope.size;
        for a in it.pending_recipients() {
            rcpts += 1;
            let d = a.rsplit_once('@').map_or("", |(_, d)| d);
            *domains.entry(d.to_ascii_lowercase()).or_default() += 1;
        }
    }
    json!({
        "messages": items.len(),
        "active": active,
        "deferred": deferred,
        "held": held,
        "recipients": rcpts,
        "bytes": bytes,
        "unreadable": 0,
        "oldest_arrival_unix_micros": items.iter().map(|it| it.q.arrival_unix_micros).min(),
        "domains": domains,
    })
}

/// Offline hold/release/delete: take every shard's lock first (refused while a server
/// runs), then write each shard's state records in one batch, then mark deleted
/// messages finished. Returns (matched, changed, failed).
fn offline_change(
    dir: &Path,
    opts: SpoolOptions,
    sel: &Select,
    what: AdminChange,
) -> Result<(usize, usize, usize), Fail> {
    let mut opened = Vec::new();
    for (shard, _) in shard_dirs(dir)? {
        let (spool, rec) = tern_queue::ShardSpool::open_with(
            dir,
            shard,
            opts.clone(),
            if sel.needs_envelope() {
                tern_queue::Listing::All
            } else {
                tern_queue::Listing::QueueOnly
            },
        )
        .map_err(spool_fail)?;
        opened.push((spool, rec));
    }
    let now = now_micros();
    let (mut matched, mut changed, mut failed) = (0, 0, 0);
    for (mut spool, rec) in opened {
        let envs: std::collections::HashMap<(u64, u64), &tern_queue::Envelope> = rec
            .messages
            .iter()
            .map(|m| ((m.segment, m.offset), &m.envelope))
            .collect();
        let mut writes = Vec::new();
        let mut changes = Vec::new();
        for q in &rec.queue {
            if !sel.matches_entry(q, false, now) {
                continue;
            }
            if sel.needs_envelope() {
                match envs.get(&(q.msg.segment, q.msg.offset)) {
                    Some(e) if sel.matches_envelope(q, e) => {}
                    _ => continue,
                }
            }
            matched += 1;
            let Some(c) = what.record(q) else { continue };
            match spool.prepare_state(&c) {
                Ok(w) => {
                    writes.push(w);
                    changes.push(c);
                }
                Err(e) => {
                    eprintln!("tern queue: {}: {e}", c.id);
                    failed += 1;
                }
            }
        }
        for (c, r) in changes.iter().zip(tern_queue::commit_batch(writes)) {
            match r {
                Ok(_) => {
                    changed += 1;
                    if what == AdminChange::Delete {
                        if let Err(e) = spool.finished(c.msg) {
                            eprintln!("tern queue: {}: finished mark: {e}", c.id);
                        }
                    }
                }
                Err(e) => {
                    eprintln!("tern queue: {}: {e}", c.id);
                    failed += 1;
                }
            }
        }
    }
    Ok((matched, changed, failed))
}

// ---------------------------------------------------------------------------------------
// Formatting
// ---------------------------------------------------------------------------------------

fn bad_answer(path: &Path) -> Fail {
    Fail(76, format!("{}: unexpected answer", path.display()))
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("")
}

fn n(v: &Value, k: &str) -> u64 {
    v.get(k).and_then(Value::as_u64).unwrap_or(0)
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn rfc3339(unix: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix as i64)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

fn human_age(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 86400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}
