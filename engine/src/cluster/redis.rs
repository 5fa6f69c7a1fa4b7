//! The Redis counting thread (`[cluster] redis`): AUTH failures per IP and per login, and
//! per-login message/recipient rates, counted across every node that shares the Redis.
//!
//! NAME
//!   tern-redis — one std thread per node, one synchronous `redis` connection.
//!
//! DESCRIPTION
//!   Shards queue [`Op`]s without waiting (`cluster::Link`, a bounded crossbeam channel).
//!   The thread takes everything queued, merges it per key (`cluster::Batch`) and sends
//!   it as ONE pipeline (one round trip, however many operations):
//!
//!   ```text
//!   INCRBY tern:authfail:ip:<ip> n       PEXPIRE ... <window ms> NX   (fixed window)
//!   INCRBY tern:authfail:login:<esc> n   PEXPIRE ... NX
//!   INCRBY tern:rate:msg:<esc> n         PEXPIRE ... <per ms> NX      PTTL ...
//!   [every 250 ms] ZREMRANGEBYSCORE tern:blocks -inf <now>; ZRANGEBYSCORE tern:blocks (<now> +inf WITHSCORES
//!   ```
//!
//!   Counters are plain keys whose TTL is the window, set by the first increment (`NX`),
//!   so they expire by themselves. A counter that reaches its limit puts its subject
//!   into the sorted set `tern:blocks` (score: the Unix time in ms the block ends; an IP
//!   or login for `auth.ip_block`, a login over a rate for the rest of the window) in a
//!   second round trip, deletes an AUTH-failure counter (a fresh count after the block, as
//!   the anvil does) and tells this node's shards at once. Every node polls the set every
//!   250 ms (piggy-backed on the next pipeline) and hands each new entry to its shards
//!   (`News`, through their control channels): a block set by another node takes effect
//!   here within about 250 ms plus one round trip. A poll, not pub/sub: it needs no
//!   second connection and no keyspace-notification setting on the server, survives a
//!   reconnect without a resubscription gap, and costs one small read per node per poll.
//!
//! FAILURE
//!   Connect or command errors end the connection: the node logs once per outage
//!   (`redis unreachable ...`), counts it in `tern_cluster_redis_fallback_total`, sets
//!   `tern_cluster_redis_up` to 0 and drops queued operations (the shards' anvils counted
//!   them already: local counting is the fallback). It reconnects with backoff (100 ms
//!   doubling to 5 s) and logs the recovery. A successful AUTH never involves this
//!   thread; a failure's count reaches Redis asynchronously.
//!
//! SECURITY
//!   Logins are escaped into keys (`cluster::escape_login`): no client text can reach
//!   another key's name. The URL's password is never logged (`config::redact_url`).
//!   Clocks: block ends are wall-clock times; nodes are assumed NTP-synchronised (an
//!   offset of a second shifts a block's end by as much).
//!
//! CONFIGURATION PARAMETERS
//!   `cluster.redis`, `auth.ip_failure_limit`, `auth.login_failure_limit`,
//!   `auth.ip_failure_window`, `auth.ip_block`, `auth.user_message_rate`,
//!   `auth.user_recipient_rate` (and users' own rates).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam::channel::{Receiver, RecvTimeoutError};
use redis::Value;

use super::{Batch, Counter, FailureLimits, Keys, News, Op, Status, Subject};

/// How often the node reads the cluster's blocks.
pub const POLL: Duration = Duration::from_millis(250);
/// Most counters merged into one pipeline.
const MAX_BATCH: usize = 4096;
/// Most blocks read per poll.
const MAX_BLOCKS: usize = 10_000;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const IO_TIMEOUT: Duration = Duration::from_secs(2);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Where the decisions go: every shard of this node (the server sends them down the
/// shards' control channels).
pub type Deliver = Box<dyn Fn(News) + Send>;

/// Starts the thread. `client` comes from a URL checked at configuration load.
pub fn spawn(
    client: redis::Client,
    limits: FailureLimits,
    rx: Receiver<Op>,
    status: Arc<Status>,
    deliver: Deliver,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("tern-redis".into())
        .spawn(move || run(client, limits, rx, status, deliver))
        .map(|_| ())
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn run(
    client: redis::Client,
    limits: FailureLimits,
    rx: Receiver<Op>,
    status: Arc<Status>,
    deliver: Deliver,
) {
    let mut conn: Option<redis::Connection> = None;
    let mut backoff = BACKOFF_MIN;
    // In an outage already reported (the start counts as one when Redis is not there).
    let mut in_outage = false;
    // The cluster's entries this node has handed to its shards already: member → end (ms).
    let mut known: HashMap<String, u64> = HashMap::new();
    let mut next_poll = Instant::now();
    let down = |in_outage: &mut bool, why: &dyn std::fmt::Display| {
        status.up.store(false, Ordering::Relaxed);
        if !std::mem::replace(in_outage, true) {
            status.fallbacks.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(redis = %status.url, error = %why, "redis unreachable: counting AUTH failures and sending rates locally on this node until it returns");
        }
    };
    loop {
        let Some(c) = conn.as_mut() else {
            match connect(&client) {
                Ok(c) => {
                    // Up only once a round trip (this poll, at once) has worked: a server
                    // that accepts connections but fails our commands must not flap.
                    conn = Some(c);
                    next_poll = Instant::now();
                }
                Err(e) => {
                    down(&mut in_outage, &e);
                    // What was queued before the outage was counted locally; drop it.
                    let n = rx.try_iter().count() as u64;
                    status.dropped.fetch_add(n, Ordering::Relaxed);
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
            continue;
        };
        let mut batch = Batch::default();
        let mut ops = 0u64;
        match rx.recv_timeout(next_poll.saturating_duration_since(Instant::now())) {
            Ok(op) => {
                batch.add(op, &limits);
                ops += 1;
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => {
                    batch.add(op, &limits);
                    ops += 1;
                }
                Err(_) => break,
            }
        }
        let poll = Instant::now() >= next_poll;
        if poll {
            next_poll = Instant::now() + POLL;
        }
        let now = unix_ms();
        let mut restore_failed: Option<String> = None;
        match round_trip(c, &batch, poll, now, &status) {
            Ok(outcome) => {
                if !status.up.swap(true, Ordering::Relaxed) {
                    backoff = BACKOFF_MIN;
                    // A Redis that comes back may have lost its set of blocks (no
                    // append-only file, a crash inside the fsync interval, a new
                    // instance): a node that starts later would learn nothing of them.
                    // Every running node writes back what it knows; ZADD GT keeps the
                    // longest end, so several nodes doing it at once agree.
                    if let Some(p) = restore_pipeline(&known, now) {
                        match p.query::<()>(c) {
                            Ok(()) => tracing::info!(
                                blocks = known.len(),
                                "wrote this node's known blocks back to redis"
                            ),
                            // Handled below, after this round's news.
                            Err(e) => restore_failed = Some(e.to_string()),
                        }
                    }
                    if std::mem::replace(&mut in_outage, false) {
                        tracing::info!(redis = %status.url, "redis reachable again: counting across the cluster");
                    } else {
                        tracing::info!(redis = %status.url, "redis connected: counting across the cluster");
                    }
                }
                status.ops.fetch_add(ops, Ordering::Relaxed);
                for n in outcome.news(&mut known, now) {
                    deliver(n);
                }
                if let Some(e) = restore_failed.take() {
                    // A fresh connection after the backoff writes them back again (and
                    // the replies of a half-read pipeline never meet the next one).
                    conn = None;
                    down(
                        &mut in_outage,
                        &format!("writing the known blocks back: {e}"),
                    );
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
            Err(e) => {
                status.dropped.fetch_add(ops, Ordering::Relaxed);
                conn = None;
                down(&mut in_outage, &e);
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

fn connect(client: &redis::Client) -> Result<redis::Connection, String> {
    let e = |e: redis::RedisError| e.to_string();
    let mut c = client
        .get_connection_with_timeout(CONNECT_TIMEOUT)
        .map_err(e)?;
    c.set_read_timeout(Some(IO_TIMEOUT)).map_err(e)?;
    c.set_write_timeout(Some(IO_TIMEOUT)).map_err(e)?;
    // A server that answers, and one recent enough for `PEXPIRE ... NX` (Redis 7.0;
    // Valkey reports its Redis-compatible version here too).
    let info: String = redis::cmd("INFO").arg("server").query(&mut c).map_err(e)?;
    check_version(&info)?;
    Ok(c)
}

/// `redis_version` from `INFO server` must be 7.0 or later.
fn check_version(info: &str) -> Result<(), String> {
    let v = info
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .map(str::trim)
        .ok_or("INFO server names no redis_version")?;
    let major: u32 = v
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .ok_or_else(|| format!("unreadable redis_version {v:?}"))?;
    if major < 7 {
        return Err(format!(
            "Redis {v} is too old: [cluster] redis needs 7.0 or later (PEXPIRE NX)"
        ));
    }
    Ok(())
}

/// A login's (messages, recipients) in the cluster's current windows (None: no count).
pub type ClusterCounts = (Option<u64>, Option<u64>);

/// The cluster's current message and recipient counts of `logins` (None: no count in the
/// current window), for `tern ctl limits`. Blocking, bounded by the connect and I/O
/// timeouts: called on the admin thread, never on a shard.
pub fn read_counts(
    client: &redis::Client,
    logins: &[String],
) -> Result<Vec<ClusterCounts>, String> {
    if logins.is_empty() {
        return Ok(Vec::new());
    }
    let mut c = connect(client)?;
    let mut p = redis::pipe();
    for l in logins {
        let esc = super::escape_login(l);
        p.cmd("GET")
            .arg(Keys::rate(super::UserCount::Message, &esc));
        p.cmd("GET")
            .arg(Keys::rate(super::UserCount::Recipient, &esc));
    }
    let v: Vec<Option<u64>> = p.query(&mut c).map_err(|e| e.to_string())?;
    Ok(v.chunks(2)
        .map(|p| (p[0], p.get(1).copied().flatten()))
        .collect())
}

/// What one round trip learnt: counters that reached their limit (subject, end in ms),
/// and the cluster's current entries when it polled.
#[derive(Debug, Default, PartialEq)]
pub struct Outcome {
    pub tripped: Vec<(Subject, u64)>,
    pub polled: Option<Vec<(String, u64)>>,
}

impl Outcome {
    /// The news for this node's shards: what tripped here, and what is new or longer in
    /// the poll; `known` remembers what was handed over (and forgets what ended).
    pub fn news(&self, known: &mut HashMap<String, u64>, now: u64) -> Vec<News> {
        let mut out = Vec::new();
        let mut push = |subject: Subject, member: String, until: u64| {
            if until <= now || known.get(&member).is_some_and(|&k| k >= until) {
                return;
            }
            known.insert(member, until);
            out.push(News {
                subject,
                remaining: Duration::from_millis(until - now),
            });
        };
        for (s, until) in &self.tripped {
            push(s.clone(), s.member(), *until);
        }
        for (m, until) in self.polled.iter().flatten() {
            if let Some(s) = Subject::parse(m) {
                push(s, m.clone(), *until);
            }
        }
        known.retain(|_, until| *until > now);
        out
    }
}

/// The pipeline for `batch` (and the poll): INCRBY + PEXPIRE NX per counter, PTTL for
/// rate counters, then the poll's ZREMRANGEBYSCORE + ZRANGEBYSCORE.
pub fn pipeline(batch: &Batch, poll: bool, now: u64) -> redis::Pipeline {
    let mut p = redis::pipe();
    for c in &batch.counters {
        p.cmd("INCRBY").arg(&c.key).arg(c.add);
        p.cmd("PEXPIRE")
            .arg(&c.key)
            .arg(ms(c.window))
            .arg("NX")
            .ignore();
        if c.block.is_none() {
            p.cmd("PTTL").arg(&c.key);
        }
    }
    if poll {
        p.cmd("ZREMRANGEBYSCORE")
            .arg(Keys::BLOCKS)
            .arg("-inf")
            .arg(now)
            .ignore();
        p.cmd("ZRANGEBYSCORE")
            .arg(Keys::BLOCKS)
            .arg(format!("({now}"))
            .arg("+inf")
            .arg("WITHSCORES")
            .arg("LIMIT")
            .arg(0)
            .arg(MAX_BLOCKS);
    }
    p
}

fn ms(d: Duration) -> u64 {
    (d.as_millis() as u64).max(1)
}

/// Reads the replies of [`pipeline`]: which counters reached their limit, and the poll.
pub fn parse_replies(
    batch: &Batch,
    poll: bool,
    now: u64,
    replies: &[Value],
) -> Result<Outcome, String> {
    let mut it = replies.iter();
    let mut next = || it.next().ok_or("short reply");
    let mut out = Outcome::default();
    for c in &batch.counters {
        let count = int(next()?)?;
        let until = match c.block {
            Some(b) => now + ms(b),
            None => {
                let pttl = int(next()?)?;
                now + u64::try_from(pttl).unwrap_or(0)
            }
        };
        if count >= 0 && count as u64 >= c.limit && until > now {
            out.tripped.push((c.subject.clone(), until));
        }
    }
    if poll {
        let Value::Array(items) = next()? else {
            return Err("ZRANGEBYSCORE: not an array".into());
        };
        let mut entries = Vec::with_capacity(items.len() / 2);
        for pair in items.chunks(2) {
            if let [m, s] = pair {
                let member = text(m)?;
                let score = text(s)?
                    .parse::<f64>()
                    .map_err(|_| "ZRANGEBYSCORE: bad score")?;
                entries.push((member, score as u64));
            }
        }
        out.polled = Some(entries);
    }
    Ok(out)
}

fn int(v: &Value) -> Result<i64, String> {
    match v {
        Value::Int(i) => Ok(*i),
        other => Err(format!("expected an integer, got {other:?}")),
    }
}

fn text(v: &Value) -> Result<String, String> {
    match v {
        Value::BulkString(b) => Ok(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Ok(s.clone()),
        Value::Double(d) => Ok(d.to_string()),
        other => Err(format!("expected a string, got {other:?}")),
    }
}

/// One round trip (two when a counter reached its limit: the block is written then).
fn round_trip(
    c: &mut redis::Connection,
    batch: &Batch,
    poll: bool,
    now: u64,
    status: &Status,
) -> Result<Outcome, String> {
    if batch.is_empty() && !poll {
        return Ok(Outcome::default());
    }
    let replies: Vec<Value> = pipeline(batch, poll, now)
        .query(c)
        .map_err(|e| e.to_string())?;
    status.round_trips.fetch_add(1, Ordering::Relaxed);
    let outcome = parse_replies(batch, poll, now, &replies)?;
    if !outcome.tripped.is_empty() {
        block_pipeline(batch, &outcome.tripped)
            .query::<()>(c)
            .map_err(|e| e.to_string())?;
        status.round_trips.fetch_add(1, Ordering::Relaxed);
        for (s, until) in &outcome.tripped {
            let secs = until.saturating_sub(now) / 1000;
            match s {
                Subject::Ip(ip) => {
                    tracing::warn!(%ip, cooldown_secs = secs, "too many failed AUTH attempts across the cluster: blocking AUTH from this address on every node")
                }
                Subject::Login(l) => {
                    tracing::warn!(login = %l, cooldown_secs = secs, "too many failed AUTH attempts across the cluster: blocking AUTH as this login (escaped) on every node")
                }
                Subject::Over(w, l) => {
                    tracing::info!(login = %l, rate = ?w, secs, "login over its sending rate across the cluster")
                }
            }
        }
    }
    Ok(outcome)
}

/// After a reconnect: ZADD GT every block this node knows that has not ended (`known`:
/// member → end in ms), with the set's expiry as `block_pipeline` sets it; None when
/// there is nothing to write.
pub fn restore_pipeline(known: &HashMap<String, u64>, now: u64) -> Option<redis::Pipeline> {
    let live: Vec<(&String, u64)> = known
        .iter()
        .filter(|(_, until)| **until > now)
        .map(|(m, u)| (m, *u))
        .collect();
    let last = live.iter().map(|(_, u)| *u).max()?;
    let mut p = redis::pipe();
    for (member, until) in live {
        zadd_block(&mut p, member, until);
    }
    expire_blocks(&mut p, last, now);
    Some(p)
}

/// ZADD GT: the block of `member` ends at `until` (ms), unless it ends later already.
fn zadd_block(p: &mut redis::Pipeline, member: &str, until: u64) {
    p.cmd("ZADD")
        .arg(Keys::BLOCKS)
        .arg("GT")
        .arg(until)
        .arg(member)
        .ignore();
}

/// The set of blocks expires after its last block (`last`, ms): PEXPIRE NX for a new
/// set, then GT to lengthen an existing one.
fn expire_blocks(p: &mut redis::Pipeline, last: u64, now: u64) {
    let ttl = last.saturating_sub(now).max(1);
    for when in ["NX", "GT"] {
        p.cmd("PEXPIRE")
            .arg(Keys::BLOCKS)
            .arg(ttl)
            .arg(when)
            .ignore();
    }
}

/// ZADD GT each tripped subject into `tern:blocks` (the set expires after its last
/// block: PEXPIRE NX, then GT), and DEL the AUTH-failure counters that tripped.
pub fn block_pipeline(batch: &Batch, tripped: &[(Subject, u64)]) -> redis::Pipeline {
    let mut p = redis::pipe();
    let now = unix_ms();
    let mut last = 0;
    for (s, until) in tripped {
        zadd_block(&mut p, &s.member(), *until);
        last = last.max(*until);
        if let Some(c) = batch
            .counters
            .iter()
            .find(|c: &&Counter| &c.subject == s && c.block.is_some())
        {
            p.cmd("DEL").arg(&c.key).ignore();
        }
    }
    expire_blocks(&mut p, last, now);
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::UserCount;

    fn limits() -> FailureLimits {
        FailureLimits {
            ip_limit: 3,
            login_limit: 5,
            window: Duration::from_secs(600),
            block: Duration::from_secs(900),
        }
    }

    #[test]
    fn redis_before_7_is_refused() {
        assert!(
            check_version("# Server\r\nredis_version:7.0.15\r\nredis_mode:standalone\r\n").is_ok()
        );
        assert!(check_version("redis_version:8.2.1\r\n").is_ok());
        let e = check_version("redis_version:6.2.6\r\n").unwrap_err();
        assert!(e.contains("7.0 or later"), "{e}");
        assert!(check_version("nothing").is_err());
    }

    #[test]
    fn one_pipeline_for_a_whole_batch() {
        let mut b = Batch::default();
        let ip = "192.0.2.7".parse().unwrap();
        for _ in 0..10 {
            b.add(
                Op::AuthFailure {
                    ip,
                    login: Some("bob".into()),
                },
                &limits(),
            );
        }
        b.add(
            Op::UserSent {
                login: "bob".into(),
                what: UserCount::Message,
                limit: 2,
                per: Duration::from_secs(60),
            },
            &limits(),
        );
        let p = pipeline(&b, true, 1_000);
        let cmds: Vec<String> = p
            .cmd_iter()
            .map(|c| {
                c.args_iter()
                    .map(|a| match a {
                        redis::Arg::Simple(s) => String::from_utf8_lossy(s).into_owned(),
                        _ => "<other>".into(),
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect();
        assert_eq!(
            cmds,
            [
                "INCRBY tern:authfail:ip:192.0.2.7 10",
                "PEXPIRE tern:authfail:ip:192.0.2.7 600000 NX",
                "INCRBY tern:authfail:login:bob 10",
                "PEXPIRE tern:authfail:login:bob 600000 NX",
                "INCRBY tern:rate:msg:bob 1",
                "PEXPIRE tern:rate:msg:bob 60000 NX",
                "PTTL tern:rate:msg:bob",
                "ZREMRANGEBYSCORE tern:blocks -inf 1000",
                "ZRANGEBYSCORE tern:blocks (1000 +inf WITHSCORES LIMIT 0 10000",
            ]
        );
        // Replies (ignored commands left out): the IP over its limit, the login not, the
        // rate at its limit for 30 more seconds; one entry in the set.
        let replies = [
            Value::Int(10),
            Value::Int(4),
            Value::Int(2),
            Value::Int(30_000),
            Value::Array(vec![
                Value::BulkString(b"ip:198.51.100.1".to_vec()),
                Value::BulkString(b"5000".to_vec()),
            ]),
        ];
        let o = parse_replies(&b, true, 1_000, &replies).unwrap();
        assert_eq!(
            o.tripped,
            [
                (Subject::Ip(ip), 901_000),
                (Subject::Over(UserCount::Message, "bob".into()), 31_000),
            ]
        );
        assert_eq!(o.polled, Some(vec![("ip:198.51.100.1".to_string(), 5000)]));
        let mut known = HashMap::new();
        let news = o.news(&mut known, 1_000);
        assert_eq!(news.len(), 3);
        assert_eq!(news[2].remaining, Duration::from_millis(4000));
        // The same poll again brings nothing new; a longer block does.
        assert!(o.news(&mut known, 1_000).is_empty());
        let longer = Outcome {
            tripped: vec![],
            polled: Some(vec![("ip:198.51.100.1".into(), 9000)]),
        };
        assert_eq!(longer.news(&mut known, 2_000).len(), 1);
        // Ended entries are forgotten.
        assert!(longer.news(&mut known, 10_000).is_empty());
        assert!(!known.contains_key("ip:198.51.100.1"));
        assert!(known.contains_key("ip:192.0.2.7"));
        // A short reply is an error, not a panic.
        assert!(parse_replies(&b, true, 1_000, &replies[..2]).is_err());
        let blocks = block_pipeline(&b, &o.tripped);
        let first: Vec<String> = blocks
            .cmd_iter()
            .map(|c| {
                c.args_iter()
                    .filter_map(|a| match a {
                        redis::Arg::Simple(s) => Some(String::from_utf8_lossy(s).into_owned()),
                        _ => None,
                    })
                    .take(2)
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect();
        // The IP's counter is reset after its block; the rate counter keeps its window.
        assert_eq!(
            first,
            [
                "ZADD tern:blocks",
                "DEL tern:authfail:ip:192.0.2.7",
                "ZADD tern:blocks",
                "PEXPIRE tern:blocks",
                "PEXPIRE tern:blocks"
            ]
        );
    }

    #[test]
    fn known_blocks_are_written_back_after_a_reconnect() {
        let args = |p: &redis::Pipeline| -> Vec<String> {
            p.cmd_iter()
                .map(|c| {
                    c.args_iter()
                        .filter_map(|a| match a {
                            redis::Arg::Simple(s) => Some(String::from_utf8_lossy(s).into_owned()),
                            _ => None,
                        })
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .collect()
        };
        let mut known = HashMap::new();
        assert!(restore_pipeline(&known, 1_000).is_none(), "nothing known");
        known.insert("ip:192.0.2.7".to_string(), 901_000u64);
        known.insert("login:bob".to_string(), 500u64); // ended: not written back
        let p = restore_pipeline(&known, 1_000).expect("one live block");
        assert_eq!(
            args(&p),
            [
                "ZADD tern:blocks GT 901000 ip:192.0.2.7",
                "PEXPIRE tern:blocks 900000 NX",
                "PEXPIRE tern:blocks 900000 GT",
            ]
        );
    }
}
