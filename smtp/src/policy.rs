//! Relay policy: who may send mail to which recipient domain.
//!
//! Postfix's `permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination` and
//! sendmail's TRUST_AUTH_MECH, as one immutable value per listener. The session asks
//! `may_relay` for each RCPT; this module never looks at messages, never blocks and never
//! keeps per-client state (rate limits and brute-force counters live elsewhere).

use std::collections::HashSet;
use std::net::IpAddr;

use ipnet::IpNet;

#[derive(Debug, Clone, Default)]
pub struct RelayPolicy {
    /// Lower-cased domains accepted from anybody.
    local_domains: HashSet<String>,
    trusted_networks: Vec<IpNet>,
}

impl RelayPolicy {
    pub fn new(local_domains: &[String], trusted_networks: &[IpNet]) -> Self {
        RelayPolicy {
            local_domains: local_domains
                .iter()
                .map(|d| d.trim_end_matches('.').to_ascii_lowercase())
                .collect(),
            trusted_networks: trusted_networks.to_vec(),
        }
    }

    /// Whether a client at `ip` may relay anywhere without authenticating.
    pub fn trusted_client(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.trusted_networks.iter().any(|n| n.contains(&ip))
    }

    /// Whether mail for `domain` is accepted from anybody. Address literals of our own are
    /// not special-cased: list them if wanted.
    pub fn local_domain(&self, domain: &str) -> bool {
        let d = domain.trim_end_matches('.');
        // Fast path: configured domains are lower case, most clients send lower case.
        self.local_domains.contains(d) || self.local_domains.contains(&d.to_ascii_lowercase())
    }

    /// The RCPT decision. `domain` is None for the bare `<postmaster>` (always accepted,
    /// RFC 5321 §4.1.1.3).
    pub fn may_relay(&self, ip: IpAddr, authenticated: bool, domain: Option<&str>) -> bool {
        match domain {
            None => true,
            Some(d) => authenticated || self.local_domain(d) || self.trusted_client(ip),
        }
    }
}

/// IPv4-mapped IPv6 addresses (from dual-stack listeners) are matched as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => ip,
        },
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions() {
        let p = RelayPolicy::new(&["Example.ORG".into()], &["10.0.0.0/8".parse().unwrap()]);
        let outside: IpAddr = "192.0.2.1".parse().unwrap();
        let inside: IpAddr = "10.1.2.3".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert!(p.may_relay(outside, false, Some("example.org")));
        assert!(p.may_relay(outside, false, Some("EXAMPLE.org.")));
        assert!(!p.may_relay(outside, false, Some("elsewhere.example")));
        assert!(p.may_relay(outside, true, Some("elsewhere.example")));
        assert!(p.may_relay(inside, false, Some("elsewhere.example")));
        assert!(p.may_relay(mapped, false, Some("elsewhere.example")));
        assert!(p.may_relay(outside, false, None));
        assert!(!p.may_relay("127.0.0.1".parse().unwrap(), false, Some("x.example")));
    }
}
