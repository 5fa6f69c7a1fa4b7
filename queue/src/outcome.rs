//! What one delivery attempt did to each recipient: the vocabulary shared by `deliver`
//! (which produces it) and `runner` (which records it, logs it and sends DSNs about it).
//!
//! Owns: [`Outcome`] and [`NextHop`]. Why a module of its own: `deliver` must never import
//! `runner` (data flows runner → deliver → client, never back), yet both speak about the
//! same outcomes; the types live below both.
//! Must never: do I/O, or decide anything (the policy of mapping replies to outcomes is
//! `deliver`'s, what to do about them is `runner`'s).

use std::rc::Rc;
use std::time::Duration;

use crate::client::Reply;

/// Outcome of one recipient in one attempt.
#[derive(Debug, Clone)]
pub(crate) enum Outcome {
    /// 2xx. `line` is for the log; `reply` for a success DSN; `hop` is the next hop that
    /// took it (`None`: delivered here, into a maildir).
    Delivered {
        line: String,
        reply: Reply,
        /// Shared by the recipients of one transaction.
        hop: Option<Rc<NextHop>>,
    },
    /// Permanent failure. `line` is for the log, in the same form as `Delivered`'s
    /// (`host[addr] said: 550 5.1.1 ...` when a next hop said it); `reply` and `mta` (the
    /// remote host, `None` for a local decision) go into the bounce.
    Failed {
        line: String,
        reply: Reply,
        mta: Option<String>,
    },
    /// Try again later.
    Deferred(String),
    /// Not tried: the destination's rate limit has no token for this long. Neither an
    /// attempt nor a failure.
    Throttled(Duration),
}

/// What the SMTP server that took a recipient offered: decides whether tern owes the
/// sender a "relayed" DSN.
#[derive(Debug, Clone)]
pub(crate) struct NextHop {
    /// The host name (MX or route host) as tern looked it up.
    pub mta: String,
    /// It offered DSN (RFC 3461): NOTIFY/ORCPT went on, it reports from now on.
    pub dsn: bool,
    /// It offered DELIVERBY (RFC 2852): BY= went on.
    pub deliverby: bool,
}

impl Outcome {
    /// A permanent failure decided here (no next hop said it): DNS, expiry.
    pub(crate) fn failed_locally(reply: Reply) -> Outcome {
        Outcome::Failed {
            line: reply.to_string(),
            reply,
            mta: None,
        }
    }
}
