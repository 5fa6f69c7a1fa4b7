//! anvil: failed-AUTH counting per client IP and per login across shards (named after
//! Postfix's anvil).
//!
//! Each client IP (and each login tried) has one owner shard, `hash(key) % shards`. A shard
//! that sees a failed AUTH sends a one-way `Failure(key)` message to the owner over the
//! glommio channel mesh (or counts it itself when it is the owner). When a key crosses its
//! limit (`auth.ip_failure_limit`, `auth.login_failure_limit`) within `window`, the owner
//! blocks it for `cooldown` and broadcasts `Block` to every shard, which keeps its own copy
//! of the block list. So the check made before every AUTH is a lookup in a shard-local
//! map: no message, no lock, and nothing on the successful path waits.
//!
//! With `[cluster] redis`, the anvil stays the fast first line and the fallback: it counts
//! exactly as above, and also hands every failure and every per-login count to the Redis
//! thread (`cluster::Link`, one-way, dropped while Redis is down). The blocks and
//! over-rate logins the cluster decides come back as `cluster::News` through the shard's
//! control channel (`cluster_news`) into the same shard-local maps.
//!
//! Owns: the counters of the keys this shard owns, and this shard's copy of the blocks.
//! Must never: wait on another shard while a client waits, or grow without bound (both maps
//! are capped; when a cap is hit, expired entries go first, then the oldest half).
//!
//! The same mesh carries `FlushQueue`, sent by the shard that received an ETRN so that
//! every shard's runner starts a run, and `UserSent`: per-login sending rates
//! (`auth.user_message_rate`, `auth.user_recipient_rate`). Each shard keeps a token bucket
//! per login and applies to it every message and recipient counted on *any* shard (its
//! own at once, the others' when their `UserSent` arrives), so the check at MAIL/RCPT is a
//! shard-local lookup and the count is the login's across all shards. A message accepted
//! on two shards in the same microsecond may both pass: the overshoot is bounded by the
//! shards' in-flight messages, then the buckets agree again.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use glommio::channels::channel_mesh::{Full, MeshBuilder, Receivers, Senders};

pub use crate::cluster::UserCount;
use crate::cluster::{escape_login, Link, News, Op, Subject};
pub use crate::config::{Rate, UserRates};

/// What failed AUTHs are counted and blocked by. A login is kept escaped
/// (`cluster::escape_login`), the form the cluster uses too.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Key {
    Ip(IpAddr),
    Login(Arc<str>),
}

/// Messages between shards.
#[derive(Debug, Clone)]
pub enum AnvilMsg {
    /// A login sent one more message (`recipients == 0`) or this many more recipients.
    UserSent(Arc<str>, UserCount, UserRates),
    /// A failed AUTH from this IP (or trying this login), sent to its owner.
    Failure(Key),
    /// The owner blocked this key for this long (from receipt).
    Block(Key, Duration),
    /// Start a queue run now (ETRN received on another shard).
    FlushQueue,
}

pub type Mesh = MeshBuilder<AnvilMsg, Full>;

/// Settings (from `[auth]`).
#[derive(Debug, Clone, Copy)]
pub struct AnvilLimits {
    pub limit: u32,
    /// Failures per login before it is blocked; 0: logins are never blocked.
    pub login_limit: u32,
    pub window: Duration,
    pub cooldown: Duration,
}

/// One login's line in `tern ctl limits`: used in the current windows (this shard's
/// view) and whether the cluster says it is over a rate.
#[derive(Debug, Clone, PartialEq)]
pub struct UserLine {
    pub user: String,
    pub messages: f64,
    pub recipients: f64,
    pub cluster_over_messages: bool,
    pub cluster_over_recipients: bool,
}

/// One login's two buckets: tokens left (may go below 0 when other shards' counts arrive)
/// and when they were last refilled.
#[derive(Debug, Clone, Copy)]
struct Buckets {
    messages: f64,
    recipients: f64,
    at: Instant,
    /// The rates this login's buckets run at (its own, or the global ones).
    rates: UserRates,
}

const MAX_ENTRIES: usize = 100_000;

/// One shard's anvil. Shard-local (Rc): never crosses threads; the mesh does.
pub struct Anvil {
    limits: AnvilLimits,
    me: usize,
    peers: usize,
    senders: Option<Senders<AnvilMsg>>,
    counts: RefCell<HashMap<Key, (u32, Instant)>>,
    blocked: RefCell<HashMap<Key, Instant>>,
    /// Logins (escaped) the cluster says are over a rate, until when.
    over: RefCell<HashMap<(Arc<str>, UserCount), Instant>>,
    /// The Redis thread, with `[cluster] redis`.
    cluster: RefCell<Option<Link>>,
    /// What a `FlushQueue` from a peer does on this shard (set once the runner exists).
    on_flush: RefCell<Option<Box<dyn Fn()>>>,
    user_rates: Cell<UserRates>,
    users: RefCell<HashMap<Arc<str>, Buckets>>,
}

impl std::fmt::Debug for Anvil {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Anvil {{ me: {}, peers: {} }}", self.me, self.peers)
    }
}

impl Anvil {
    /// An anvil that counts alone (one shard, or tests).
    pub fn local(limits: AnvilLimits) -> Rc<Anvil> {
        Rc::new(Anvil {
            limits,
            me: 0,
            peers: 1,
            senders: None,
            counts: RefCell::new(HashMap::new()),
            blocked: RefCell::new(HashMap::new()),
            over: RefCell::new(HashMap::new()),
            cluster: RefCell::new(None),
            on_flush: RefCell::new(None),
            user_rates: Cell::new(UserRates::default()),
            users: RefCell::new(HashMap::new()),
        })
    }

    /// Joins the mesh (every shard must join before any returns) and starts the tasks that
    /// receive from the other shards. Must run inside the shard's executor.
    pub async fn join(mesh: Mesh, limits: AnvilLimits) -> Result<Rc<Anvil>, String> {
        if mesh.nr_peers() <= 1 {
            return Ok(Anvil::local(limits));
        }
        let (senders, mut receivers): (Senders<AnvilMsg>, Receivers<AnvilMsg>) = mesh
            .join()
            .await
            .map_err(|e| format!("cannot join the anvil channel mesh: {e}"))?;
        let anvil = Rc::new(Anvil {
            limits,
            me: senders.peer_id(),
            peers: senders.nr_consumers(),
            senders: Some(senders),
            counts: RefCell::new(HashMap::new()),
            blocked: RefCell::new(HashMap::new()),
            over: RefCell::new(HashMap::new()),
            cluster: RefCell::new(None),
            on_flush: RefCell::new(None),
            user_rates: Cell::new(UserRates::default()),
            users: RefCell::new(HashMap::new()),
        });
        for (_, rx) in receivers.streams() {
            let a = anvil.clone();
            glommio::spawn_local(async move {
                while let Some(msg) = rx.recv().await {
                    a.handle(msg);
                }
            })
            .detach();
        }
        Ok(anvil)
    }

    /// Connects this shard's anvil to the Redis thread (`[cluster] redis`).
    pub fn set_cluster(&self, link: Link) {
        *self.cluster.borrow_mut() = Some(link);
    }

    /// Whether AUTH from `ip` is refused right now (454 4.7.0). Shard-local lookup.
    pub fn is_blocked(&self, ip: IpAddr) -> bool {
        self.blocked_key(&Key::Ip(ip))
    }

    /// Whether AUTH as `login` is refused right now (454 4.7.0), whatever the password.
    /// Shard-local lookup; nothing to escape while no block is in force.
    pub fn is_login_blocked(&self, login: &str) -> bool {
        if self.blocked.borrow().is_empty() {
            return false;
        }
        self.blocked_key(&Key::Login(escape_login(login).into()))
    }

    fn blocked_key(&self, key: &Key) -> bool {
        let mut blocked = self.blocked.borrow_mut();
        match blocked.get(key) {
            Some(&until) if Instant::now() < until => true,
            Some(_) => {
                blocked.remove(key);
                false
            }
            None => false,
        }
    }

    /// Records a failed AUTH from `ip` trying `login`: each key counted here if this
    /// shard owns it, otherwise sent to the owner without waiting (if its queue is full
    /// the failure is dropped: counting is a defence, not an account); and handed to the
    /// Redis thread, with `[cluster] redis`.
    pub fn record_failure(&self, ip: IpAddr, login: Option<&str>) {
        let login: Option<Arc<str>> = login
            .filter(|l| !l.is_empty())
            .map(|l| escape_login(l).into());
        self.route(Key::Ip(ip));
        if let Some(l) = login.as_ref().filter(|_| self.limits.login_limit > 0) {
            self.route(Key::Login(l.clone()));
        }
        if let Some(link) = self.cluster.borrow().as_ref() {
            link.send(Op::AuthFailure { ip, login });
        }
    }

    fn route(&self, key: Key) {
        let owner = self.owner(&key);
        if owner == self.me {
            self.count(key);
        } else if let Some(s) = &self.senders {
            let _ = s.try_send_to(owner, AnvilMsg::Failure(key));
        }
    }

    fn owner(&self, key: &Key) -> usize {
        if self.peers <= 1 {
            return self.me;
        }
        // DefaultHasher::new() uses fixed keys, so every shard computes the same owner.
        let mut h = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut h);
        (h.finish() % self.peers as u64) as usize
    }

    /// A decision of the cluster (any node's counts, through Redis), for this shard.
    pub fn cluster_news(&self, news: News) {
        match news.subject {
            Subject::Ip(ip) => self.block_locally(Key::Ip(ip), news.remaining),
            Subject::Login(l) => self.block_locally(Key::Login(l), news.remaining),
            Subject::Over(what, l) => {
                let now = Instant::now();
                let mut over = self.over.borrow_mut();
                if over.len() >= MAX_ENTRIES {
                    over.retain(|_, until| *until > now);
                    if over.len() >= MAX_ENTRIES {
                        over.clear();
                    }
                }
                over.insert((l, what), now + news.remaining);
            }
        }
    }

    /// Whether the cluster says `login` is over its `what` rate.
    fn cluster_over(&self, login: &str, what: UserCount) -> bool {
        let mut over = self.over.borrow_mut();
        if over.is_empty() {
            return false;
        }
        let key = (Arc::from(escape_login(login)), what);
        match over.get(&key) {
            Some(&until) if Instant::now() < until => true,
            Some(_) => {
                over.remove(&key);
                false
            }
            None => false,
        }
    }

    fn handle(&self, msg: AnvilMsg) {
        match msg {
            AnvilMsg::Failure(key) => self.count(key),
            AnvilMsg::UserSent(login, what, rates) => {
                self.take(&login, what, rates, Instant::now());
            }
            AnvilMsg::Block(key, d) => self.block_locally(key, d),
            AnvilMsg::FlushQueue => {
                if let Some(f) = self.on_flush.borrow().as_ref() {
                    f();
                }
            }
        }
    }

    /// Sets the per-login rates (at start and on a configuration reload).
    pub fn set_user_rates(&self, rates: UserRates) {
        if self.user_rates.replace(rates) != rates {
            self.users.borrow_mut().clear();
        }
    }

    /// May `login` send one more message / recipient now, under its own rates from the
    /// user store (`own`, each falling back to the global one)? If so it is counted here
    /// and on every other shard (one-way, never waits). Without a rate, always yes.
    pub fn user_try(&self, login: &str, what: UserCount, own: Option<UserRates>) -> bool {
        let rates = own.unwrap_or_default().or(self.user_rates.get());
        let rate = match what {
            UserCount::Message => rates.messages,
            UserCount::Recipient => rates.recipients,
        };
        if rate.is_none() {
            return true;
        }
        let now = Instant::now();
        if self.tokens(login, what, rates, now) < 1.0 || self.cluster_over(login, what) {
            return false;
        }
        if let (Some(link), Some(r)) = (self.cluster.borrow().as_ref(), rate) {
            link.send(Op::UserSent {
                login: escape_login(login).into(),
                what,
                limit: r.count,
                per: r.per,
            });
        }
        let login: Arc<str> = Arc::from(login);
        self.take(&login, what, rates, now);
        if let Some(s) = &self.senders {
            for peer in 0..self.peers {
                if peer != self.me {
                    let _ = s.try_send_to(peer, AnvilMsg::UserSent(login.clone(), what, rates));
                }
            }
        }
        true
    }

    /// Per login (all, or `only`): messages and recipients counted in the current rate
    /// windows, as this shard sees them, whether the cluster says it is over, and the
    /// limits.
    pub fn user_counts(&self, only: Option<&str>) -> (UserRates, Vec<UserLine>) {
        let rates = self.user_rates.get();
        let now = Instant::now();
        let mut logins: Vec<Arc<str>> = self
            .users
            .borrow()
            .keys()
            .filter(|l| only.is_none_or(|o| &***l == o))
            .cloned()
            .collect();
        // Logins over a rate on another node, never counted here.
        for ((esc, _), until) in self.over.borrow().iter() {
            let login = crate::cluster::unescape_login(esc);
            if *until > now
                && only.is_none_or(|o| o == login)
                && !logins.iter().any(|l| **l == *login)
            {
                logins.push(login.into());
            }
        }
        let mut out: Vec<UserLine> = logins
            .iter()
            .map(|l| {
                // The login's buckets run at the rates its last count used.
                let r = self.users.borrow().get(l).map_or(rates, |b| b.rates);
                let used = |what, rate: Option<Rate>| {
                    rate.map_or(0.0, |x| {
                        (f64::from(x.count) - self.tokens(l, what, r, now)).max(0.0)
                    })
                };
                UserLine {
                    user: l.to_string(),
                    messages: used(UserCount::Message, r.messages),
                    recipients: used(UserCount::Recipient, r.recipients),
                    cluster_over_messages: self.cluster_over(l, UserCount::Message),
                    cluster_over_recipients: self.cluster_over(l, UserCount::Recipient),
                }
            })
            .collect();
        out.sort_by(|a, b| a.user.cmp(&b.user));
        (rates, out)
    }

    /// Refills `login`'s buckets to `now` and returns the tokens left for `what` under
    /// `rates` (a login not counted yet has full buckets).
    fn tokens(&self, login: &str, what: UserCount, rates: UserRates, now: Instant) -> f64 {
        let mut users = self.users.borrow_mut();
        let Some(b) = users.get_mut(login) else {
            let full = |r: Option<Rate>| r.map_or(f64::MAX, |r| f64::from(r.count));
            return match what {
                UserCount::Message => full(rates.messages),
                UserCount::Recipient => full(rates.recipients),
            };
        };
        b.rates = rates;
        refill(b, now);
        match what {
            UserCount::Message => b.messages,
            UserCount::Recipient => b.recipients,
        }
    }

    /// Counts one message or recipient of `login` (ours or another shard's).
    fn take(&self, login: &Arc<str>, what: UserCount, rates: UserRates, now: Instant) {
        let mut users = self.users.borrow_mut();
        if users.len() >= MAX_ENTRIES && !users.contains_key(login) {
            // Forget the logins whose buckets are full again: they carry no information.
            users.retain(|_, b| {
                refill(b, now);
                !is_full(b)
            });
            if users.len() >= MAX_ENTRIES {
                users.clear();
            }
        }
        let b = users.entry(login.clone()).or_insert(Buckets {
            messages: rates.messages.map_or(0.0, |r| f64::from(r.count)),
            recipients: rates.recipients.map_or(0.0, |r| f64::from(r.count)),
            at: now,
            rates,
        });
        b.rates = rates;
        refill(b, now);
        match what {
            UserCount::Message => b.messages -= 1.0,
            UserCount::Recipient => b.recipients -= 1.0,
        }
    }

    /// Sets what a peer's `FlushQueue` does here (the shard's runner flush).
    pub fn set_on_flush(&self, f: impl Fn() + 'static) {
        *self.on_flush.borrow_mut() = Some(Box::new(f));
    }

    /// Asks every other shard to start a queue run (ETRN). One-way, never waits.
    pub fn broadcast_flush(&self) {
        if let Some(s) = &self.senders {
            for peer in 0..self.peers {
                if peer != self.me {
                    let _ = s.try_send_to(peer, AnvilMsg::FlushQueue);
                }
            }
        }
    }

    fn count(&self, key: Key) {
        let now = Instant::now();
        let limit = match key {
            Key::Ip(_) => self.limits.limit,
            Key::Login(_) => self.limits.login_limit,
        };
        if limit == 0 {
            return;
        }
        let over = {
            let mut counts = self.counts.borrow_mut();
            if counts.len() >= MAX_ENTRIES && !counts.contains_key(&key) {
                let window = self.limits.window;
                counts.retain(|_, (_, start)| now.duration_since(*start) < window);
                if counts.len() >= MAX_ENTRIES {
                    trim_oldest(&mut counts, |(_, start)| *start);
                }
            }
            let e = counts.entry(key.clone()).or_insert((0, now));
            if now.duration_since(e.1) >= self.limits.window {
                *e = (0, now);
            }
            e.0 += 1;
            if e.0 >= limit {
                counts.remove(&key);
                true
            } else {
                false
            }
        };
        if over {
            let secs = self.limits.cooldown.as_secs();
            match &key {
                Key::Ip(ip) => {
                    tracing::warn!(%ip, cooldown_secs = secs, "too many failed AUTH attempts: blocking AUTH from this address")
                }
                Key::Login(l) => {
                    tracing::warn!(login = %l, cooldown_secs = secs, "too many failed AUTH attempts: blocking AUTH as this login (escaped)")
                }
            }
            self.block_locally(key.clone(), self.limits.cooldown);
            if let Some(s) = &self.senders {
                for peer in 0..self.peers {
                    if peer != self.me {
                        let _ =
                            s.try_send_to(peer, AnvilMsg::Block(key.clone(), self.limits.cooldown));
                    }
                }
            }
        }
    }

    /// Blocks `key` for `d` from now, unless a longer block is in force already.
    fn block_locally(&self, key: Key, d: Duration) {
        let now = Instant::now();
        let mut blocked = self.blocked.borrow_mut();
        if blocked.len() >= MAX_ENTRIES && !blocked.contains_key(&key) {
            blocked.retain(|_, until| *until > now);
            if blocked.len() >= MAX_ENTRIES {
                trim_oldest(&mut blocked, |until| *until);
            }
        }
        let until = now + d;
        let e = blocked.entry(key).or_insert(until);
        if *e < until {
            *e = until;
        }
    }
}

fn refill(b: &mut Buckets, now: Instant) {
    let rates = b.rates;
    let secs = now.saturating_duration_since(b.at).as_secs_f64();
    if let Some(r) = rates.messages {
        let cap = f64::from(r.count);
        b.messages = (b.messages + secs * cap / r.per.as_secs_f64()).min(cap);
    }
    if let Some(r) = rates.recipients {
        let cap = f64::from(r.count);
        b.recipients = (b.recipients + secs * cap / r.per.as_secs_f64()).min(cap);
    }
    b.at = now;
}

fn is_full(b: &Buckets) -> bool {
    let rates = b.rates;
    rates
        .messages
        .is_none_or(|r| b.messages >= f64::from(r.count))
        && rates
            .recipients
            .is_none_or(|r| b.recipients >= f64::from(r.count))
}

/// Drops the older half of a map by the instant `key` returns.
fn trim_oldest<K, V>(map: &mut HashMap<K, V>, key: impl Fn(&V) -> Instant) {
    let mut times: Vec<Instant> = map.values().map(&key).collect();
    times.sort_unstable();
    let cut = times[times.len() / 2];
    map.retain(|_, v| key(v) > cut);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_after_limit_and_expires() {
        let a = Anvil::local(AnvilLimits {
            limit: 3,
            login_limit: 0,
            window: Duration::from_secs(60),
            cooldown: Duration::from_millis(50),
        });
        let ip: IpAddr = "192.0.2.9".parse().unwrap();
        let other: IpAddr = "192.0.2.10".parse().unwrap();
        a.record_failure(ip, Some("bob"));
        a.record_failure(ip, None);
        assert!(!a.is_blocked(ip));
        a.record_failure(ip, Some("bob"));
        assert!(a.is_blocked(ip));
        // login_limit 0: logins are never blocked.
        assert!(!a.is_login_blocked("bob"));
        assert!(!a.is_blocked(other));
        std::thread::sleep(Duration::from_millis(60));
        assert!(!a.is_blocked(ip));
    }

    #[test]
    fn logins_are_blocked_across_addresses_and_escaped() {
        let a = Anvil::local(AnvilLimits {
            limit: 10,
            login_limit: 2,
            window: Duration::from_secs(60),
            cooldown: Duration::from_secs(60),
        });
        let (ip1, ip2): (IpAddr, IpAddr) =
            ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        assert!(!a.is_login_blocked("b:ob"));
        a.record_failure(ip1, Some("b:ob"));
        a.record_failure(ip2, Some("b:ob"));
        assert!(a.is_login_blocked("b:ob"));
        assert!(!a.is_login_blocked("b%3Aob"));
        assert!(!a.is_login_blocked("alice"));
        assert!(!a.is_blocked(ip1) && !a.is_blocked(ip2));
    }

    #[test]
    fn cluster_news_blocks_and_limits_here() {
        let a = Anvil::local(AnvilLimits {
            limit: 10,
            login_limit: 0,
            window: Duration::from_secs(60),
            cooldown: Duration::from_secs(60),
        });
        let ip: IpAddr = "2001:db8::7".parse().unwrap();
        a.cluster_news(News {
            subject: Subject::Ip(ip),
            remaining: Duration::from_secs(30),
        });
        assert!(a.is_blocked(ip));
        a.cluster_news(News {
            subject: Subject::Login(escape_login("x y").into()),
            remaining: Duration::from_secs(30),
        });
        assert!(a.is_login_blocked("x y"));
        let rates = UserRates {
            messages: Rate::parse("100/1m").unwrap(),
            recipients: Rate::parse("100/1m").unwrap(),
        };
        a.set_user_rates(rates);
        assert!(a.user_try("al:ice", UserCount::Message, None));
        a.cluster_news(News {
            subject: Subject::Over(UserCount::Message, escape_login("al:ice").into()),
            remaining: Duration::from_secs(30),
        });
        // Over the message rate cluster-wide; recipients and other logins unaffected.
        assert!(!a.user_try("al:ice", UserCount::Message, None));
        assert!(a.user_try("al:ice", UserCount::Recipient, None));
        assert!(a.user_try("bob", UserCount::Message, None));
        let (_, lines) = a.user_counts(Some("al:ice"));
        assert_eq!(lines.len(), 1);
        assert!(lines[0].cluster_over_messages && !lines[0].cluster_over_recipients);
        // A login over the rate on another node only is listed too.
        a.cluster_news(News {
            subject: Subject::Over(UserCount::Recipient, "carol".into()),
            remaining: Duration::from_secs(30),
        });
        let (_, lines) = a.user_counts(None);
        let users: Vec<&str> = lines.iter().map(|l| l.user.as_str()).collect();
        assert_eq!(users, ["al:ice", "bob", "carol"]);
    }

    #[test]
    fn mesh_spreads_blocks_to_every_shard() {
        use glommio::{LocalExecutorBuilder, Placement};
        let mesh: Mesh = MeshBuilder::full(2, 64);
        let limits = AnvilLimits {
            limit: 4,
            login_limit: 0,
            window: Duration::from_secs(60),
            cooldown: Duration::from_secs(60),
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let handles: Vec<_> = (0..2)
            .map(|i| {
                let mesh = mesh.clone();
                let tx = tx.clone();
                LocalExecutorBuilder::new(Placement::Unbound)
                    .ring_depth(64)
                    .io_memory(128 * 1024)
                    .spawn(move || async move {
                        let a = Anvil::join(mesh, limits).await.unwrap();
                        let ip: IpAddr = "198.51.100.1".parse().unwrap();
                        // Each shard sees two failures; together they reach the limit.
                        a.record_failure(ip, None);
                        a.record_failure(ip, None);
                        let mut blocked = false;
                        for _ in 0..200 {
                            if a.is_blocked(ip) {
                                blocked = true;
                                break;
                            }
                            glommio::timer::sleep(Duration::from_millis(5)).await;
                        }
                        tx.send((i, blocked)).unwrap();
                        // Stay alive until both have checked, so messages are delivered.
                        glommio::timer::sleep(Duration::from_millis(200)).await;
                    })
                    .unwrap()
            })
            .collect();
        drop(tx);
        let results: Vec<_> = rx.iter().collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(results.len(), 2);
        assert!(results.iter().all(|(_, b)| *b), "{results:?}");
    }
}
