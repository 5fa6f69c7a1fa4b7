//! Sender authorization: which envelope and header senders an authenticated login may use.
//!
//! Owns: the `auth.sender_map` text format and its immutable snapshot ([`SenderMap`]), and
//! the ownership rule ([`owns`]) the session applies to MAIL FROM (and, with
//! `auth.check_header_from`, to the From: addresses) when `auth.sender_policy = "own"`:
//! a login owns itself when it is an address, `login@realm` otherwise, plus what the map
//! grants. As Postfix's `reject_sender_login_mismatch` with `smtpd_sender_login_maps`.
//! Must never: do I/O (the engine reads the file and hands over a snapshot), or grant
//! anything to an unauthenticated session (the session only asks for authenticated ones).
//!
//! Map format (UTF-8 text; `#` comments and blank lines ignored), one grant per line:
//! ```text
//! alice@example.org      alice, bob        # this address, to these logins
//! @example.net           carol             # every address in this domain
//! ```
//! Addresses and domains compare case-insensitively (as Postfix's map lookups do); logins
//! exactly, as the user store does.

use std::collections::HashMap;

use bytes::Bytes;

/// One parsed map: address → logins, domain → logins.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SenderMap {
    by_address: HashMap<String, Vec<String>>,
    by_domain: HashMap<String, Vec<String>>,
}

/// A line of the map that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct MapError {
    pub line: usize,
    pub reason: String,
}

impl SenderMap {
    /// Parses the map's text.
    pub fn parse(text: &str) -> Result<SenderMap, MapError> {
        let mut map = SenderMap::default();
        for (i, raw) in text.lines().enumerate() {
            let bad = |reason: &str| MapError {
                line: i + 1,
                reason: reason.to_string(),
            };
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let (key, rest) = line
                .split_once(char::is_whitespace)
                .ok_or_else(|| bad("expected `address-or-@domain  login[, login...]`"))?;
            let logins: Vec<String> = rest
                .split(',')
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect();
            if logins.is_empty() {
                return Err(bad("no login after the address"));
            }
            if logins.iter().any(|l| l.contains(char::is_whitespace)) {
                return Err(bad("logins are separated by commas"));
            }
            let key = key.to_ascii_lowercase();
            if let Some(domain) = key.strip_prefix('@') {
                if domain.is_empty() || domain.contains('@') {
                    return Err(bad("a domain entry is `@domain`"));
                }
                map.by_domain
                    .entry(domain.to_string())
                    .or_default()
                    .extend(logins);
            } else {
                match key.rsplit_once('@') {
                    Some((local, domain)) if !local.is_empty() && !domain.is_empty() => {}
                    _ => return Err(bad("an address entry is `local@domain`")),
                }
                map.by_address.entry(key).or_default().extend(logins);
            }
        }
        Ok(map)
    }

    /// Entries (addresses and domains) in the map.
    pub fn len(&self) -> usize {
        self.by_address.len() + self.by_domain.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Does the map grant `addr` to `login`?
    pub fn grants(&self, addr: &str, login: &str) -> bool {
        let addr = addr.to_ascii_lowercase();
        let has = |v: Option<&Vec<String>>| v.is_some_and(|v| v.iter().any(|l| l == login));
        if has(self.by_address.get(&addr)) {
            return true;
        }
        match addr.rsplit_once('@') {
            Some((_, domain)) => has(self.by_domain.get(domain)),
            None => false,
        }
    }
}

/// May `login` (authenticated in `realm`) send as `addr`? `<>` (empty) is always allowed:
/// bounces and other notifications are not impersonation.
pub fn owns(login: &str, realm: &str, addr: &str, map: &SenderMap) -> bool {
    if addr.is_empty() {
        return true;
    }
    let own = match login.contains('@') {
        true => addr.eq_ignore_ascii_case(login),
        false => addr
            .rsplit_once('@')
            .is_some_and(|(l, d)| l.eq_ignore_ascii_case(login) && d.eq_ignore_ascii_case(realm)),
    };
    own || map.grants(addr, login)
}

/// Longest header section [`header_section`] copies: past it the rest is not looked at
/// (RFC 5322 puts no limit on the number of fields, but 64 KiB of them is abuse).
pub const MAX_HEADER_SECTION: usize = 64 * 1024;

/// A message's header section (up to and including the CRLF that ends its last field),
/// copied out of the first body slices, at most [`MAX_HEADER_SECTION`] bytes; None when
/// the message begins with the empty line (no header at all). Each slice is searched
/// once (only the 3 bytes before it again, for a separator split across slices).
pub fn header_section(body: &[Bytes]) -> Option<Vec<u8>> {
    let mut h = Vec::new();
    for piece in body {
        let from = h.len().saturating_sub(3);
        h.extend_from_slice(piece);
        if h.starts_with(b"\r\n") {
            return None;
        }
        if let Some(end) = memchr::memmem::find(&h[from..], b"\r\n\r\n") {
            h.truncate(from + end + 2);
            return Some(h);
        }
        if h.len() >= MAX_HEADER_SECTION {
            h.truncate(MAX_HEADER_SECTION);
            break;
        }
    }
    (!h.is_empty()).then_some(h)
}

/// The addresses in the From: field(s) of a header section (RFC 5322 §3.6.2), unfolded:
/// `Name <a@b>, c@d` gives `a@b` and `c@d`. Quoted strings and comments are skipped, so an
/// address-like display name is not taken for an address. `None` if there is no From:
/// field at all.
pub fn header_from_addresses(header: &[u8]) -> Option<Vec<String>> {
    let text = String::from_utf8_lossy(header);
    let mut fields: Vec<String> = Vec::new();
    let mut current: Option<String> = None;
    for line in text.split("\r\n").flat_map(|l| l.split('\n')) {
        if line.starts_with([' ', '\t']) {
            if let Some(c) = current.as_mut() {
                c.push(' ');
                c.push_str(line.trim());
            }
            continue;
        }
        if let Some(c) = current.take() {
            fields.push(c);
        }
        if line.len() >= 5 && line[..5].eq_ignore_ascii_case("from:") {
            current = Some(line[5..].trim().to_string());
        }
    }
    if let Some(c) = current.take() {
        fields.push(c);
    }
    if fields.is_empty() {
        return None;
    }
    let mut out = Vec::new();
    for f in fields {
        out.extend(mailbox_addresses(&f));
    }
    Some(out)
}

/// Addresses in a mailbox-list: the `<...>` part of each mailbox, or the bare address.
fn mailbox_addresses(list: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut item = String::new();
    let mut angle: Option<String> = None;
    let (mut quoted, mut comment, mut escaped) = (false, 0u32, false);
    let mut push = |item: &mut String, angle: &mut Option<String>| {
        let a = angle.take().unwrap_or_else(|| item.trim().to_string());
        // A group's name ("undisclosed:;") carries no address.
        let a = a.trim().trim_end_matches(';').trim().to_string();
        if a.contains('@') {
            out.push(a);
        }
        item.clear();
    };
    for c in list.chars() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' if quoted || comment > 0 => escaped = true,
            '"' if comment == 0 => quoted = !quoted,
            '(' if !quoted => comment += 1,
            ')' if !quoted && comment > 0 => comment -= 1,
            _ if quoted || comment > 0 => {}
            '<' => angle = Some(String::new()),
            '>' => {}
            ',' => push(&mut item, &mut angle),
            ':' if angle.is_none() => item.clear(), // group name
            _ => match angle.as_mut() {
                Some(a) => a.push(c),
                None => item.push(c),
            },
        }
    }
    push(&mut item, &mut angle);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map() -> SenderMap {
        SenderMap::parse(
            "# grants\nShared@Example.org  alice, bob\n@example.net carol # whole domain\n\n",
        )
        .unwrap()
    }

    #[test]
    fn ownership() {
        let m = map();
        // A login that is an address owns exactly itself.
        assert!(owns("alice@example.org", "x", "Alice@Example.ORG", &m));
        assert!(!owns("alice@example.org", "x", "bob@example.org", &m));
        // A bare login owns login@realm.
        assert!(owns("alice", "example.org", "alice@example.org", &m));
        assert!(!owns("alice", "example.org", "alice@example.com", &m));
        // Map entries by address and by domain, exact logins.
        assert!(owns("bob", "r", "shared@example.org", &m));
        assert!(!owns("Bob", "r", "shared@example.org", &m));
        assert!(owns("carol", "r", "anyone@EXAMPLE.net", &m));
        assert!(!owns("carol", "r", "anyone@sub.example.net", &m));
        // <> always.
        assert!(owns("mallory", "r", "", &m));
    }

    #[test]
    fn bad_maps_name_the_line() {
        for (text, line) in [
            ("ok@example.org a\nnobody-here\n", 2),
            ("@ a\n", 1),
            ("x@ a\n", 1),
            ("a@b.c  ,\n", 1),
            ("a@b.c  x y\n", 1),
        ] {
            assert_eq!(SenderMap::parse(text).unwrap_err().line, line, "{text:?}");
        }
    }

    #[test]
    fn from_header_addresses() {
        let h = b"Subject: hi\r\nFrom: \"Eve <eve@evil.example>\" <alice@example.org>,\r\n bob@example.org (Bob, <x@y>)\r\nTo: z@z\r\n";
        assert_eq!(
            header_from_addresses(h).unwrap(),
            vec![
                "alice@example.org".to_string(),
                "bob@example.org".to_string()
            ]
        );
        assert_eq!(header_from_addresses(b"To: a@b\r\n"), None);
        assert_eq!(
            header_from_addresses(b"from: Team: a@b, c@d;\r\n").unwrap(),
            vec!["a@b".to_string(), "c@d".to_string()]
        );
    }
}
