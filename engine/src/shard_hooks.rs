//! The shard's side of `tern_smtp::hooks::SessionHooks`: what a session reports and asks.
//!
//! Owns: turning session events into the shard's counters (`metrics::ShardMetrics`),
//! its log lines (one `NOQUEUE: reject:` line per refusal, as Postfix's smtpd writes them;
//! one line per AUTH result naming the login tried) and the cross-shard AUTH-failure
//! counting (`anvil`, which also feeds the cluster's Redis thread with `[cluster] redis`). One per listener role per shard (the log lines name the listener).
//! Must never: log a secret (only the login the client tried), put client-supplied CR/LF
//! or control characters into a log line, or block: the anvil is asked over the shard's
//! own channels, never a lock.

use std::fmt;
use std::net::IpAddr;
use std::rc::Rc;

use tern_smtp::hooks::{AuthAttempt, Rejection, SessionHooks};

use crate::anvil::{Anvil, UserCount};
use crate::metrics::counters::ShardMetrics;

pub struct ShardHooks {
    pub shard: usize,
    pub listener: &'static str,
    pub metrics: Rc<ShardMetrics>,
    pub anvil: Rc<Anvil>,
    /// The shard's user-store snapshot (a user's own sending rates) and default realm.
    pub auth: Option<(Rc<tern_smtp::session::AuthShared>, String)>,
}

impl ShardHooks {
    /// The login's own sending rates from the user store, if it sets any.
    fn own_rates(&self, login: &str) -> Option<tern_smtp::users::UserRates> {
        let (shared, realm) = self.auth.as_ref()?;
        let (user, realm) = tern_smtp::users::split_login(login, realm);
        shared.users.borrow().rates(user, realm)
    }
}

/// Client-supplied text in a log line: printable characters as they are, anything else
/// (CR, LF, other controls) escaped, so a client cannot forge a log line or a fail2ban
/// match.
pub struct Printable<'a>(pub &'a str);

impl fmt::Display for Printable<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.0.chars() {
            if c.is_control() {
                write!(f, "\\x{:02x}", c as u32)?;
            } else {
                fmt::Write::write_char(f, c)?;
            }
        }
        Ok(())
    }
}

impl SessionHooks for ShardHooks {
    fn auth_blocked(&self, ip: IpAddr) -> bool {
        self.anvil.is_blocked(ip)
    }

    fn auth_login_blocked(&self, login: &str) -> bool {
        self.anvil.is_login_blocked(login)
    }

    fn auth_attempt(&self, a: &AuthAttempt<'_>) {
        let login = Printable(a.login.unwrap_or(""));
        let mech = a.mechanism.name();
        match a.outcome {
            Ok(()) => {
                self.metrics.auth(mech, true);
                tracing::info!(
                    shard = self.shard,
                    "auth ok: client=[{}]:{} mechanism={mech} login=<{login}> listener={}",
                    a.peer.ip(),
                    a.peer.port(),
                    self.listener
                );
            }
            Err(why) => {
                self.metrics.auth(mech, false);
                self.anvil.record_failure(a.peer.ip(), a.login);
                tracing::info!(
                    shard = self.shard,
                    "auth failed: client=[{}]:{} mechanism={mech} login=<{login}> reason={why:?} failures={} listener={}",
                    a.peer.ip(),
                    a.peer.port(),
                    a.failures,
                    self.listener
                );
            }
        }
    }

    fn user_message(&self, login: &str) -> bool {
        let ok = self
            .anvil
            .user_try(login, UserCount::Message, self.own_rates(login));
        self.metrics.user_rate(0, ok);
        ok
    }

    fn user_recipient(&self, login: &str) -> bool {
        let ok = self
            .anvil
            .user_try(login, UserCount::Recipient, self.own_rates(login));
        self.metrics.user_rate(1, ok);
        ok
    }

    fn rejected(&self, r: &Rejection<'_>) {
        self.metrics.rejected(r);
        tracing::info!(
            shard = self.shard,
            "NOQUEUE: reject: {} from [{}]:{}: {} {} {}; from=<{}> to=<{}> helo=<{}> listener={}",
            r.stage,
            r.peer.ip(),
            r.peer.port(),
            r.code,
            r.enhanced,
            Printable(r.text),
            Printable(r.sender.unwrap_or("")),
            Printable(r.recipient.unwrap_or("")),
            Printable(r.helo.unwrap_or("")),
            self.listener
        );
    }
}
