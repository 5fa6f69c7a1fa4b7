//! Where a recipient's mail goes next: static routes, the relay host, or MX.
//!
//! Owns: the route table ([`Router`]), the route string syntax (`maildir:/path`,
//! `smtp:host[:port]`, `smtp:[host][:port]`, Postfix transport(5) style), the lookup order,
//! and turning a host name into addresses on a blocking thread.
//! Must never: do DNS on the shard thread (resolution goes through `spawn_blocking`), or
//! decide retries. MX lookups are not implemented yet: see [`mx_hosts`] (XXX).
//!
//! Lookup order for a recipient domain (lower-cased, trailing dot removed):
//! 1. a route for the exact domain (`example.org`);
//! 2. a route for a parent domain written with a leading dot (`.example.org` matches
//!    `a.example.org` and `b.a.example.org`, not `example.org`), most specific first;
//! 3. the `*` route;
//! 4. the relay host (always used without MX lookup, like Postfix's `[host]`);
//! 5. otherwise [`Destination::Mx`] for the domain itself.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;

/// Where to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// SMTP to `host:port`. `mx` = look up MX records for `host` first (`smtp:host`);
    /// false for `smtp:[host]` (connect to the host's addresses directly).
    /// `options_name` selects a named set of client options (TLS/AUTH) from the
    /// configuration; `None` = the defaults.
    Smtp {
        host: String,
        port: u16,
        mx: bool,
        options_name: Option<String>,
    },
    /// Local delivery into a Maildir.
    Maildir(PathBuf),
    /// SMTP to the domain's MX hosts (RFC 5321 §5.1), port 25.
    Mx(String),
}

/// A route string or table that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("route {0:?}: unknown kind (expected maildir: or smtp:)")]
    UnknownKind(String),
    #[error("route {0:?}: empty host")]
    EmptyHost(String),
    #[error("route {0:?}: bad port")]
    BadPort(String),
    #[error("route {0:?}: maildir path must be absolute")]
    RelativeMaildir(String),
    #[error("route {0:?}: unknown attribute")]
    BadAttribute(String),
    #[error("route key {0:?} is not a domain, .domain or *")]
    BadKey(String),
    #[error("cannot resolve {host}: {reason}")]
    Resolve { host: String, reason: String },
    /// XXX: the seam for MX lookups (hickory-resolver), not built yet.
    #[error("MX lookup for {0} is not implemented yet")]
    MxNotImplemented(String),
}

impl Destination {
    /// Parses a route string:
    /// - `maildir:/abs/path`
    /// - `smtp:host`, `smtp:host:port` (MX lookup of `host`)
    /// - `smtp:[host]`, `smtp:[host]:port`, `smtp:[ipv6:2001:db8::1]:port` (no MX)
    ///
    /// followed by optional whitespace-separated attributes; the only one is
    /// `options=NAME`. The default port is 25.
    pub fn parse(s: &str) -> Result<Destination, RouteError> {
        let err_s = || s.to_string();
        let mut words = s.split_ascii_whitespace();
        let spec = words
            .next()
            .ok_or_else(|| RouteError::UnknownKind(err_s()))?;
        let mut options_name = None;
        for w in words {
            match w.split_once('=') {
                Some(("options", v)) if !v.is_empty() => options_name = Some(v.to_string()),
                _ => return Err(RouteError::BadAttribute(err_s())),
            }
        }
        let (kind, rest) = spec
            .split_once(':')
            .ok_or_else(|| RouteError::UnknownKind(err_s()))?;
        match kind.to_ascii_lowercase().as_str() {
            "maildir" => {
                if options_name.is_some() {
                    return Err(RouteError::BadAttribute(err_s()));
                }
                let p = PathBuf::from(rest);
                if !p.is_absolute() {
                    return Err(RouteError::RelativeMaildir(err_s()));
                }
                Ok(Destination::Maildir(p))
            }
            "smtp" => {
                let (host, mx, after) = if let Some(inner) = rest.strip_prefix('[') {
                    let (host, after) = inner
                        .split_once(']')
                        .ok_or_else(|| RouteError::EmptyHost(err_s()))?;
                    let host = match host.get(..5) {
                        Some(p) if p.eq_ignore_ascii_case("ipv6:") => &host[5..],
                        _ => host,
                    };
                    (host, false, after)
                } else {
                    match rest.split_once(':') {
                        Some((h, _)) => (h, true, &rest[h.len()..]),
                        None => (rest, true, ""),
                    }
                };
                if host.is_empty() {
                    return Err(RouteError::EmptyHost(err_s()));
                }
                let port = match after {
                    "" => 25,
                    p => p
                        .strip_prefix(':')
                        .and_then(|p| p.parse::<u16>().ok())
                        .filter(|&p| p != 0)
                        .ok_or_else(|| RouteError::BadPort(err_s()))?,
                };
                Ok(Destination::Smtp {
                    host: host.to_ascii_lowercase(),
                    port,
                    mx,
                    options_name,
                })
            }
            _ => Err(RouteError::UnknownKind(err_s())),
        }
    }
}

/// The route table of one tern instance (immutable; shared by the shards).
#[derive(Debug, Clone, Default)]
pub struct Router {
    relayhost: Option<(String, u16)>,
    routes: HashMap<String, Destination>,
}

impl Router {
    /// `routes` keys: `domain`, `.parent.domain` or `*` (case-insensitive).
    pub fn new(
        relayhost: Option<(String, u16)>,
        routes: impl IntoIterator<Item = (String, Destination)>,
    ) -> Result<Router, RouteError> {
        let mut table = HashMap::new();
        for (key, dest) in routes {
            let k = normalise(&key);
            let bare = k.strip_prefix('.').unwrap_or(&k);
            let ok = k == "*"
                || (!bare.is_empty()
                    && bare.split('.').all(|l| {
                        !l.is_empty()
                            && l.bytes().all(|b| {
                                b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b >= 0x80
                            })
                    }));
            if !ok {
                return Err(RouteError::BadKey(key));
            }
            table.insert(k, dest);
        }
        Ok(Router {
            relayhost: relayhost.map(|(h, p)| (h.to_ascii_lowercase(), p)),
            routes: table,
        })
    }

    /// Builds a router from configuration strings: `relayhost` as `[host]:port`,
    /// `host:port` or `host` (always used without MX), routes as `(key, route string)`.
    pub fn from_config<'a>(
        relayhost: Option<&str>,
        routes: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Router, RouteError> {
        let relay = match relayhost {
            None => None,
            Some(r) => match Destination::parse(&format!("smtp:{r}"))? {
                Destination::Smtp { host, port, .. } => Some((host, port)),
                _ => return Err(RouteError::UnknownKind(r.to_string())),
            },
        };
        let parsed = routes
            .into_iter()
            .map(|(k, v)| Destination::parse(v).map(|d| (k.to_string(), d)))
            .collect::<Result<Vec<_>, _>>()?;
        Router::new(relay, parsed)
    }

    /// The destination for a recipient domain (see the module documentation for the order).
    pub fn route(&self, rcpt_domain: &str) -> Destination {
        let domain = normalise(rcpt_domain);
        if let Some(d) = self.routes.get(&domain) {
            return d.clone();
        }
        let mut rest = domain.as_str();
        while let Some(i) = rest.find('.') {
            if let Some(d) = self.routes.get(&rest[i..]) {
                return d.clone();
            }
            rest = &rest[i + 1..];
        }
        if let Some(d) = self.routes.get("*") {
            return d.clone();
        }
        if let Some((host, port)) = &self.relayhost {
            return Destination::Smtp {
                host: host.clone(),
                port: *port,
                mx: false,
                options_name: None,
            };
        }
        Destination::Mx(domain)
    }
}

fn normalise(d: &str) -> String {
    d.trim_end_matches('.').to_ascii_lowercase()
}

/// The domain of an address (`local@domain`; an address literal `[1.2.3.4]` stays as is).
pub fn domain_of(addr: &str) -> &str {
    addr.rsplit_once('@').map(|(_, d)| d).unwrap_or("")
}

/// MX hosts of `domain`, best first.
///
/// XXX: not implemented. This is the seam for an asynchronous MX lookup (hickory-resolver
/// on the shard, RFC 5321 §5.1: MX records sorted by preference, implicit MX = the domain's
/// own A/AAAA when there is no MX, a null MX (RFC 7505) = permanent failure). Until then
/// every MX destination fails with a temporary-looking `MxNotImplemented`, so nothing is
/// ever sent to a wrong host.
pub async fn mx_hosts(domain: &str) -> Result<Vec<String>, RouteError> {
    Err(RouteError::MxNotImplemented(domain.to_string()))
}

/// Addresses of `host` (an IP literal or a name) on `port`.
///
/// Names are resolved with the system resolver (`ToSocketAddrs`, i.e. getaddrinfo) on
/// glommio's blocking thread pool: acceptable for relay hosts and static routes, which are
/// few and cached by the system resolver. XXX: replace with hickory-resolver together
/// with [`mx_hosts`]. Must be called inside a glommio executor.
pub async fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, RouteError> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let h = host.to_string();
    let result = glommio::executor()
        .spawn_blocking(move || {
            // glommio reads an uninitialised result if the closure panics.
            std::panic::catch_unwind(|| {
                (h.as_str(), port)
                    .to_socket_addrs()
                    .map(|a| a.collect::<Vec<_>>())
                    .map_err(|e| e.to_string())
            })
            .unwrap_or_else(|_| Err("resolver panicked".into()))
        })
        .await;
    match result {
        Ok(addrs) if !addrs.is_empty() => Ok(addrs),
        Ok(_) => Err(RouteError::Resolve {
            host: host.to_string(),
            reason: "no addresses".into(),
        }),
        Err(reason) => Err(RouteError::Resolve {
            host: host.to_string(),
            reason,
        }),
    }
}
