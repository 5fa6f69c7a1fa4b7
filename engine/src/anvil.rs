//! anvil: failed-AUTH counting per client IP across shards (named after Postfix's anvil).
//!
//! Each client IP has one owner shard, `hash(ip) % shards`. A shard that sees a failed AUTH
//! sends a one-way `Failure(ip)` message to the owner over the glommio channel mesh (or
//! counts it itself when it is the owner). When an IP crosses `limit` failures within
//! `window`, the owner blocks it for `cooldown` and broadcasts `Block` to every shard, which
//! keeps its own copy of the block list. So the check made before every AUTH is a lookup in
//! a shard-local map: no message, no lock, and nothing on the successful path waits.
//!
//! Owns: the counters of the IPs this shard owns, and this shard's copy of the blocks.
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

pub use crate::config::{Rate, UserRates};

/// Messages between shards.
#[derive(Debug, Clone)]
pub enum AnvilMsg {
    /// A login sent one more message (`recipients == 0`) or this many more recipients.
    UserSent(Arc<str>, UserCount, UserRates),
    /// A failed AUTH from this IP, sent to its owner.
    Failure(IpAddr),
    /// The owner blocked this IP for this long (from receipt).
    Block(IpAddr, Duration),
    /// Start a queue run now (ETRN received on another shard).
    FlushQueue,
}

pub type Mesh = MeshBuilder<AnvilMsg, Full>;

/// Settings (from `[auth]`).
#[derive(Debug, Clone, Copy)]
pub struct AnvilLimits {
    pub limit: u32,
    pub window: Duration,
    pub cooldown: Duration,
}

/// Which per-login rate a count is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserCount {
    Message,
    Recipient,
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
    counts: RefCell<HashMap<IpAddr, (u32, Instant)>>,
    blocked: RefCell<HashMap<IpAddr, Instant>>,
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

    /// Whether AUTH from `ip` is refused right now (454 4.7.0). Shard-local lookup.
    pub fn is_blocked(&self, ip: IpAddr) -> bool {
        let mut blocked = self.blocked.borrow_mut();
        match blocked.get(&ip) {
            Some(&until) if Instant::now() < until => true,
            Some(_) => {
                blocked.remove(&ip);
                false
            }
            None => false,
        }
    }

    /// Records a failed AUTH: counted here if this shard owns `ip`, otherwise sent to the
    /// owner without waiting (if its queue is full the failure is dropped: counting is a
    /// defence, not an account).
    pub fn record_failure(&self, ip: IpAddr) {
        let owner = self.owner(ip);
        if owner == self.me {
            self.count(ip);
        } else if let Some(s) = &self.senders {
            let _ = s.try_send_to(owner, AnvilMsg::Failure(ip));
        }
    }

    fn owner(&self, ip: IpAddr) -> usize {
        if self.peers <= 1 {
            return self.me;
        }
        // DefaultHasher::new() uses fixed keys, so every shard computes the same owner.
        let mut h = std::collections::hash_map::DefaultHasher::new();
        ip.hash(&mut h);
        (h.finish() % self.peers as u64) as usize
    }

    fn handle(&self, msg: AnvilMsg) {
        match msg {
            AnvilMsg::Failure(ip) => self.count(ip),
            AnvilMsg::UserSent(login, what, rates) => {
                self.take(&login, what, rates, Instant::now());
            }
            AnvilMsg::Block(ip, d) => self.block_locally(ip, d),
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
        if self.tokens(login, what, rates, now) < 1.0 {
            return false;
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
    /// windows, as this shard sees them, and the limits.
    pub fn user_counts(&self, only: Option<&str>) -> (UserRates, Vec<(String, f64, f64)>) {
        let rates = self.user_rates.get();
        let now = Instant::now();
        let logins: Vec<Arc<str>> = self
            .users
            .borrow()
            .keys()
            .filter(|l| only.is_none_or(|o| &***l == o))
            .cloned()
            .collect();
        let mut out: Vec<(String, f64, f64)> = logins
            .iter()
            .map(|l| {
                // The login's buckets run at the rates its last count used.
                let r = self.users.borrow().get(l).map_or(rates, |b| b.rates);
                let used = |what, rate: Option<Rate>| {
                    rate.map_or(0.0, |x| {
                        (f64::from(x.count) - self.tokens(l, what, r, now)).max(0.0)
                    })
                };
                (
                    l.to_string(),
                    used(UserCount::Message, r.messages),
                    used(UserCount::Recipient, r.recipients),
                )
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
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

    fn count(&self, ip: IpAddr) {
        let now = Instant::now();
        let over = {
            let mut counts = self.counts.borrow_mut();
            if counts.len() >= MAX_ENTRIES && !counts.contains_key(&ip) {
                let window = self.limits.window;
                counts.retain(|_, (_, start)| now.duration_since(*start) < window);
                if counts.len() >= MAX_ENTRIES {
                    trim_oldest(&mut counts, |(_, start)| *start);
                }
            }
            let e = counts.entry(ip).or_insert((0, now));
            if now.duration_since(e.1) >= self.limits.window {
                *e = (0, now);
            }
            e.0 += 1;
            if e.0 >= self.limits.limit {
                counts.remove(&ip);
                true
            } else {
                false
            }
        };
        if over {
            tracing::warn!(%ip, cooldown_secs = self.limits.cooldown.as_secs(), "too many failed AUTH attempts: blocking AUTH from this address");
            self.block_locally(ip, self.limits.cooldown);
            if let Some(s) = &self.senders {
                for peer in 0..self.peers {
                    if peer != self.me {
                        let _ = s.try_send_to(peer, AnvilMsg::Block(ip, self.limits.cooldown));
                    }
                }
            }
        }
    }

    fn block_locally(&self, ip: IpAddr, d: Duration) {
        let now = Instant::now();
        let mut blocked = self.blocked.borrow_mut();
        if blocked.len() >= MAX_ENTRIES && !blocked.contains_key(&ip) {
            blocked.retain(|_, until| *until > now);
            if blocked.len() >= MAX_ENTRIES {
                trim_oldest(&mut blocked, |until| *until);
            }
        }
        blocked.insert(ip, now + d);
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
fn trim_oldest<V>(map: &mut HashMap<IpAddr, V>, key: impl Fn(&V) -> Instant) {
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
            window: Duration::from_secs(60),
            cooldown: Duration::from_millis(50),
        });
        let ip: IpAddr = "192.0.2.9".parse().unwrap();
        let other: IpAddr = "192.0.2.10".parse().unwrap();
        a.record_failure(ip);
        a.record_failure(ip);
        assert!(!a.is_blocked(ip));
        a.record_failure(ip);
        assert!(a.is_blocked(ip));
        assert!(!a.is_blocked(other));
        std::thread::sleep(Duration::from_millis(60));
        assert!(!a.is_blocked(ip));
    }

    #[test]
    fn mesh_spreads_blocks_to_every_shard() {
        use glommio::{LocalExecutorBuilder, Placement};
        let mesh: Mesh = MeshBuilder::full(2, 64);
        let limits = AnvilLimits {
            limit: 4,
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
                        a.record_failure(ip);
                        a.record_failure(ip);
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
