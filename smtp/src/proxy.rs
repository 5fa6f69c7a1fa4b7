//! PROXY protocol header parser, versions 1 and 2 (sans-I/O, incremental).
//!
//! Owns: recognising and decoding the one header a trusted load balancer
//! prepends to a connection before any SMTP or TLS byte, as specified by
//! HAProxy's "The PROXY protocol, Versions 1 & 2" (doc/proxy-protocol.txt):
//! the v1 text line (`PROXY TCP4|TCP6|UNKNOWN ...\r\n`, at most 107 bytes) and
//! the v2 binary block (12-byte signature, version/command, family, length,
//! addresses, TLVs; at most 16 + 520 = 536 bytes, the smallest TCP segment
//! every host must accept, which the spec says both formats fit in).
//!
//! The caller accumulates the bytes read from the socket and calls [`parse`]
//! on all of them each time; [`Parse::Incomplete`] asks for more, and
//! [`Parse::Done`] reports the header and exactly how many bytes it occupies.
//! Errors are reported as soon as the bytes seen so far cannot be the start
//! of a valid header, so a client speaking SMTP (or garbage) is dropped at
//! once instead of being waited on.
//!
//! Must never:
//! - consume bytes after the header: a TLS ClientHello or SMTP command that
//!   arrived in the same segment stays in the caller's buffer (`len` stops at
//!   the header's last byte);
//! - allocate: nothing here touches the heap; the few TLV values worth
//!   logging borrow from the caller's buffer, so a v2 TCP4 header costs no
//!   allocation at all;
//! - panic, on any input (fuzzed by `fuzz/fuzz_targets/proxy_header.rs`).
//!
//! Policy decided here (the spec leaves the receiver a choice):
//! - v2 PROXY command: only TCP over IPv4 (`0x11`) and IPv6 (`0x21`) are
//!   accepted; UNSPEC, UDP, AF_UNIX and invalid families are errors.
//! - v2 LOCAL command: the family and the whole address block (TLVs included)
//!   are ignored, as the spec asks; the connection keeps its socket addresses.
//! - v2 TLVs are walked by their lengths (an overrun is an error); ALPN and SSL
//!   are exposed for logging (the first of each wins), CRC32C is not verified,
//!   everything else (NOOP, AUTHORITY, UNIQUE_ID, custom) is skipped.
//! - v1: strict syntax (single spaces, no leading zeros, CRLF only); IPv6
//!   literals are whatever `std::net::Ipv6Addr` parses (at most 45 bytes).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The 12 bytes every v2 header starts with.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v1 line, CRLF included (`PROXY UNKNOWN` with two full IPv6
/// addresses and ports).
pub const V1_MAX_LEN: usize = 107;
/// The longest v2 header accepted: the 16 fixed bytes plus a length field of
/// at most 520.
pub const V2_MAX_LEN: usize = 536;

const V1_PREFIX: &[u8; 6] = b"PROXY ";
const V2_FIXED_LEN: usize = 16;
/// Longest IPv6 literal: `ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255`.
const V6_TEXT_MAX: usize = 45;

const TLV_ALPN: u8 = 0x01;
const TLV_SSL: u8 = 0x20;
const SSL_SUB_VERSION: u8 = 0x21;

/// The outcome of [`parse`] on the bytes received so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Parse<'a> {
    /// The bytes so far are a valid start of a header: read more and call
    /// [`parse`] again on everything.
    Incomplete,
    /// A complete header occupying exactly `buf[..len]`; `buf[len..]` belongs
    /// to the protocol that follows (TLS or SMTP).
    Done { header: ProxyHeader<'a>, len: usize },
}

/// A decoded PROXY header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyHeader<'a> {
    /// Which format carried it.
    pub version: Version,
    /// The client's connection as the balancer saw it, or `None` for v2
    /// LOCAL and v1 UNKNOWN: use the socket's own addresses.
    pub addresses: Option<Addresses>,
    /// v2 TLVs worth logging (always empty for v1 and LOCAL).
    pub tlvs: Tlvs<'a>,
}

impl ProxyHeader<'_> {
    /// The original client's address, if the header carries one.
    pub fn source(&self) -> Option<SocketAddr> {
        self.addresses.map(|a| a.source)
    }

    /// The address the client connected to, if the header carries one.
    pub fn destination(&self) -> Option<SocketAddr> {
        self.addresses.map(|a| a.destination)
    }
}

/// PROXY protocol version of a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// The text line.
    V1,
    /// The binary block.
    V2,
}

/// The proxied connection's endpoints (always the same IP family).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addresses {
    /// The client (what `getpeername` would have said without the balancer).
    pub source: SocketAddr,
    /// The address the client connected to (`getsockname`).
    pub destination: SocketAddr,
}

/// The v2 TLVs exposed for logging; values borrow from the parsed buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tlvs<'a> {
    /// PP2_TYPE_ALPN (0x01): the ALPN protocol the client negotiated with the
    /// balancer, e.g. `b"h2"`.
    pub alpn: Option<&'a [u8]>,
    /// PP2_TYPE_SSL (0x20): how the client connected to the balancer.
    pub ssl: Option<Ssl<'a>>,
}

/// The PP2_TYPE_SSL TLV.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ssl<'a> {
    /// Bit field: [`Ssl::CLIENT_SSL`], [`Ssl::CLIENT_CERT_CONN`],
    /// [`Ssl::CLIENT_CERT_SESS`].
    pub client: u8,
    /// Zero if the client presented a certificate that was verified.
    pub verify: u32,
    /// PP2_SUBTYPE_SSL_VERSION (0x21): the TLS version as US-ASCII, e.g.
    /// `b"TLSv1.3"` (sent when [`Ssl::CLIENT_SSL`] is set).
    pub version: Option<&'a [u8]>,
}

impl Ssl<'_> {
    /// The client connected over SSL/TLS.
    pub const CLIENT_SSL: u8 = 0x01;
    /// The client presented a certificate on this connection.
    pub const CLIENT_CERT_CONN: u8 = 0x02;
    /// The client presented a certificate at least once in this TLS session.
    pub const CLIENT_CERT_SESS: u8 = 0x04;

    /// Whether the client spoke TLS to the balancer.
    pub fn is_tls(&self) -> bool {
        self.client & Self::CLIENT_SSL != 0
    }
}

/// A side of the proxied connection, named in v1 syntax errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Source,
    Destination,
}

/// What a v1 line should have had where it went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum V1Expected {
    /// `TCP4`, `TCP6` or `UNKNOWN`.
    Protocol,
    /// Exactly one space.
    Space,
    /// A space or CRLF (after `UNKNOWN`).
    SpaceOrCrlf,
    /// A dotted-quad IPv4 address without leading zeros.
    Ipv4(Endpoint),
    /// An IPv6 literal.
    Ipv6(Endpoint),
    /// A decimal port, 0-65535, without leading zeros.
    Port(Endpoint),
    /// The CRLF ending the line.
    Crlf,
}

/// Why the bytes are not a valid PROXY header. `at` offsets count from the
/// header's first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyError {
    /// Neither the v2 signature nor `PROXY ` (e.g. a client speaking SMTP).
    NotProxy,
    /// v1: no CRLF within the first 107 bytes.
    V1TooLong,
    /// v1: a LF without the CR before it.
    V1BareLf { at: usize },
    /// v1: something else than the syntax allows.
    V1Syntax { at: usize, expected: V1Expected },
    /// v2: the version nibble is not 2.
    V2Version(u8),
    /// v2: the command nibble is neither LOCAL (0) nor PROXY (1).
    V2Command(u8),
    /// v2 PROXY command: the family/protocol byte is not TCP over IPv4/IPv6.
    V2UnsupportedFamily(u8),
    /// v2: the length field announces more than the 536-byte bound.
    V2TooLong { len: usize },
    /// v2: the length field cannot hold the family's address block.
    V2ShortAddresses { family: u8, len: usize },
    /// v2: a TLV (or its 3-byte type/length) runs past the end of the header
    /// or of the SSL TLV enclosing it.
    V2TlvOverrun { at: usize, tlv_type: u8 },
    /// v2: the SSL TLV is shorter than its 5 fixed bytes.
    V2SslTooShort { len: usize },
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Endpoint::Source => "source",
            Endpoint::Destination => "destination",
        })
    }
}

impl fmt::Display for V1Expected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            V1Expected::Protocol => f.write_str("TCP4, TCP6 or UNKNOWN"),
            V1Expected::Space => f.write_str("a single space"),
            V1Expected::SpaceOrCrlf => f.write_str("a space or CRLF"),
            V1Expected::Ipv4(e) => {
                write!(
                    f,
                    "the {e} address as a dotted-quad IPv4 address without leading zeros"
                )
            }
            V1Expected::Ipv6(e) => write!(f, "the {e} address as an IPv6 address"),
            V1Expected::Port(e) => {
                write!(
                    f,
                    "the {e} port as 0-65535 in decimal without leading zeros"
                )
            }
            V1Expected::Crlf => f.write_str("CRLF"),
        }
    }
}

/// A name for a v2 family/protocol byte, for error messages.
fn family_name(fam: u8) -> &'static str {
    match fam {
        0x00 => "UNSPEC",
        0x01 | 0x02 | 0x10 | 0x20 | 0x30 => "an unspecified family or protocol",
        0x11 => "TCP over IPv4",
        0x12 => "UDP over IPv4",
        0x21 => "TCP over IPv6",
        0x22 => "UDP over IPv6",
        0x31 => "AF_UNIX stream",
        0x32 => "AF_UNIX datagram",
        _ => "not defined by the spec",
    }
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ProxyError::NotProxy => f.write_str(
                "not a PROXY protocol header (neither \"PROXY \" nor the v2 signature)",
            ),
            ProxyError::V1TooLong => write!(f, "PROXY v1: no CRLF within {V1_MAX_LEN} bytes"),
            ProxyError::V1BareLf { at } => {
                write!(f, "PROXY v1: bare LF at byte {at} (the line must end in CRLF)")
            }
            ProxyError::V1Syntax { at, expected } => {
                write!(f, "PROXY v1: expected {expected} at byte {at}")
            }
            ProxyError::V2Version(v) => {
                write!(f, "PROXY v2: unsupported version {v} (only 2 is defined)")
            }
            ProxyError::V2Command(c) => write!(
                f,
                "PROXY v2: unknown command 0x{c:x} (expected LOCAL 0x0 or PROXY 0x1)"
            ),
            ProxyError::V2UnsupportedFamily(fam) => write!(
                f,
                "PROXY v2: unsupported address family 0x{fam:02x} ({}); \
                 the PROXY command needs TCP over IPv4 (0x11) or IPv6 (0x21)",
                family_name(fam)
            ),
            ProxyError::V2TooLong { len } => write!(
                f,
                "PROXY v2: header of {len} bytes exceeds the {V2_MAX_LEN}-byte bound"
            ),
            ProxyError::V2ShortAddresses { family, len } => write!(
                f,
                "PROXY v2: length {len} cannot hold the address block of family 0x{family:02x} ({})",
                family_name(family)
            ),
            ProxyError::V2TlvOverrun { at, tlv_type } => write!(
                f,
                "PROXY v2: TLV 0x{tlv_type:02x} at byte {at} runs past the end of its block"
            ),
            ProxyError::V2SslTooShort { len } => write!(
                f,
                "PROXY v2: SSL TLV of {len} bytes is shorter than its 5 fixed bytes"
            ),
        }
    }
}

impl std::error::Error for ProxyError {}

/// Parses the PROXY header at the start of `buf`, everything received on the
/// connection so far.
///
/// Returns [`Parse::Incomplete`] while `buf` is a strict prefix of a valid
/// header (at any byte boundary), [`Parse::Done`] with the header's exact
/// length once it is whole (bytes after it are not looked at), and an error
/// as soon as `buf` can no longer begin a valid header. The result depends
/// only on `buf`: after `Incomplete`, call again with more bytes appended.
pub fn parse(buf: &[u8]) -> Result<Parse<'_>, ProxyError> {
    let matches = |sig: &[u8]| buf.iter().zip(sig).all(|(a, b)| a == b);
    match buf.first() {
        None => Ok(Parse::Incomplete),
        Some(b'\r') if matches(&V2_SIGNATURE) => {
            if buf.len() < V2_SIGNATURE.len() {
                Ok(Parse::Incomplete)
            } else {
                parse_v2(buf)
            }
        }
        Some(b'P') if matches(V1_PREFIX) => {
            if buf.len() < V1_PREFIX.len() {
                Ok(Parse::Incomplete)
            } else {
                parse_v1(buf)
            }
        }
        Some(_) => Err(ProxyError::NotProxy),
    }
}

/// `buf` starts with the whole v2 signature.
fn parse_v2(buf: &[u8]) -> Result<Parse<'_>, ProxyError> {
    let Some(&ver_cmd) = buf.get(12) else {
        return Ok(Parse::Incomplete);
    };
    if ver_cmd >> 4 != 2 {
        return Err(ProxyError::V2Version(ver_cmd >> 4));
    }
    let local = match ver_cmd & 0x0f {
        0 => true,
        1 => false,
        c => return Err(ProxyError::V2Command(c)),
    };
    let Some(&family) = buf.get(13) else {
        return Ok(Parse::Incomplete);
    };
    // LOCAL ignores the family; PROXY needs one whose addresses we can use.
    let addr_len = match (local, family) {
        (true, _) => 0,
        (false, 0x11) => 12,
        (false, 0x21) => 36,
        (false, _) => return Err(ProxyError::V2UnsupportedFamily(family)),
    };
    let (Some(&hi), Some(&lo)) = (buf.get(14), buf.get(15)) else {
        return Ok(Parse::Incomplete);
    };
    let body_len = usize::from(u16::from_be_bytes([hi, lo]));
    let len = V2_FIXED_LEN + body_len;
    if len > V2_MAX_LEN {
        return Err(ProxyError::V2TooLong { len });
    }
    if body_len < addr_len {
        return Err(ProxyError::V2ShortAddresses {
            family,
            len: body_len,
        });
    }
    let Some(body) = buf.get(V2_FIXED_LEN..len) else {
        return Ok(Parse::Incomplete);
    };
    if local {
        let header = ProxyHeader {
            version: Version::V2,
            addresses: None,
            tlvs: Tlvs::default(),
        };
        return Ok(Parse::Done { header, len });
    }
    let (addr, tlv_bytes) = body.split_at(addr_len);
    let addresses = if family == 0x11 {
        let (src, rest) = take::<4>(addr);
        let (dst, rest) = take::<4>(rest);
        let (sport, rest) = take::<2>(rest);
        let (dport, _) = take::<2>(rest);
        Addresses {
            source: SocketAddr::new(Ipv4Addr::from(src).into(), u16::from_be_bytes(sport)),
            destination: SocketAddr::new(Ipv4Addr::from(dst).into(), u16::from_be_bytes(dport)),
        }
    } else {
        let (src, rest) = take::<16>(addr);
        let (dst, rest) = take::<16>(rest);
        let (sport, rest) = take::<2>(rest);
        let (dport, _) = take::<2>(rest);
        Addresses {
            source: SocketAddr::new(Ipv6Addr::from(src).into(), u16::from_be_bytes(sport)),
            destination: SocketAddr::new(Ipv6Addr::from(dst).into(), u16::from_be_bytes(dport)),
        }
    };
    let mut tlvs = Tlvs::default();
    walk_tlvs(tlv_bytes, V2_FIXED_LEN + addr_len, |ty, value, at| {
        match ty {
            TLV_ALPN if tlvs.alpn.is_none() => tlvs.alpn = Some(value),
            TLV_SSL if tlvs.ssl.is_none() => tlvs.ssl = Some(parse_ssl(value, at)?),
            _ => {}
        }
        Ok(())
    })?;
    let header = ProxyHeader {
        version: Version::V2,
        addresses: Some(addresses),
        tlvs,
    };
    Ok(Parse::Done { header, len })
}

/// The first `N` bytes of `b` and the rest; zeros where `b` is shorter (the
/// callers have checked the length: this only keeps the code panic-free).
fn take<const N: usize>(b: &[u8]) -> ([u8; N], &[u8]) {
    match b.split_first_chunk::<N>() {
        Some((head, rest)) => (*head, rest),
        None => ([0; N], &[]),
    }
}

/// Calls `f(type, value, offset of value)` for each TLV in `data`, which
/// starts at header offset `at`.
fn walk_tlvs<'a>(
    mut data: &'a [u8],
    mut at: usize,
    mut f: impl FnMut(u8, &'a [u8], usize) -> Result<(), ProxyError>,
) -> Result<(), ProxyError> {
    while let Some((&tlv_type, rest)) = data.split_first() {
        let overrun = ProxyError::V2TlvOverrun { at, tlv_type };
        let Some((len, rest)) = rest.split_first_chunk::<2>() else {
            return Err(overrun);
        };
        let len = usize::from(u16::from_be_bytes(*len));
        if rest.len() < len {
            return Err(overrun);
        }
        let (value, rest) = rest.split_at(len);
        f(tlv_type, value, at + 3)?;
        at += 3 + len;
        data = rest;
    }
    Ok(())
}

/// The value of a PP2_TYPE_SSL TLV, starting at header offset `at`.
fn parse_ssl(value: &[u8], at: usize) -> Result<Ssl<'_>, ProxyError> {
    let Some((&client, rest)) = value.split_first() else {
        return Err(ProxyError::V2SslTooShort { len: value.len() });
    };
    let Some((verify, subs)) = rest.split_first_chunk::<4>() else {
        return Err(ProxyError::V2SslTooShort { len: value.len() });
    };
    let mut ssl = Ssl {
        client,
        verify: u32::from_be_bytes(*verify),
        version: None,
    };
    walk_tlvs(subs, at + 5, |ty, value, _| {
        if ty == SSL_SUB_VERSION && ssl.version.is_none() {
            ssl.version = Some(value);
        }
        Ok(())
    })?;
    Ok(ssl)
}

/// Why the v1 reader stopped before the end of the line.
enum Stop {
    Incomplete,
    Error(ProxyError),
}

impl From<ProxyError> for Stop {
    fn from(e: ProxyError) -> Self {
        Stop::Error(e)
    }
}

type Step<T> = Result<T, Stop>;

/// Reads a v1 line byte by byte; running off the end of what has arrived is
/// `Incomplete`, or `V1TooLong` once 107 bytes have arrived.
struct Cursor<'a> {
    line: &'a [u8],
    pos: usize,
    capped: bool,
}

impl Cursor<'_> {
    fn peek(&self) -> Step<u8> {
        match self.line.get(self.pos) {
            Some(&b) => Ok(b),
            None if self.capped => Err(ProxyError::V1TooLong.into()),
            None => Err(Stop::Incomplete),
        }
    }

    fn bump(&mut self) -> Step<u8> {
        let b = self.peek()?;
        self.pos += 1;
        Ok(b)
    }

    /// The error for the byte at the cursor (a bare LF is named as such).
    fn error(&self, expected: V1Expected) -> Stop {
        let at = self.pos;
        match self.line.get(at) {
            Some(b'\n') => ProxyError::V1BareLf { at }.into(),
            _ => ProxyError::V1Syntax { at, expected }.into(),
        }
    }

    fn expect(&mut self, lit: &[u8], expected: V1Expected) -> Step<()> {
        for &want in lit {
            if self.peek()? != want {
                return Err(self.error(expected));
            }
            self.pos += 1;
        }
        Ok(())
    }

    /// A decimal number up to `max`, no leading zeros.
    fn decimal(&mut self, max: u32, expected: V1Expected) -> Step<u32> {
        let first = self.peek()?;
        if !first.is_ascii_digit() {
            return Err(self.error(expected));
        }
        self.pos += 1;
        let mut value = u32::from(first - b'0');
        loop {
            let b = self.peek()?;
            if !b.is_ascii_digit() {
                return Ok(value);
            }
            // A leading zero, or a value over `max` (no overflow: value <= max).
            value = value * 10 + u32::from(b - b'0');
            if first == b'0' || value > max {
                return Err(self.error(expected));
            }
            self.pos += 1;
        }
    }

    fn ipv4(&mut self, expected: V1Expected) -> Step<Ipv4Addr> {
        let mut octets = [0u8; 4];
        for (i, octet) in octets.iter_mut().enumerate() {
            if i > 0 {
                self.expect(b".", expected)?;
            }
            // decimal(255) fits a u8.
            *octet = u8::try_from(self.decimal(255, expected)?).unwrap_or(u8::MAX);
        }
        Ok(Ipv4Addr::from(octets))
    }

    fn ipv6(&mut self, expected: V1Expected) -> Step<Ipv6Addr> {
        let start = self.pos;
        loop {
            let b = self.peek()?;
            if !(b.is_ascii_hexdigit() || b == b':' || b == b'.') {
                break;
            }
            if self.pos - start == V6_TEXT_MAX {
                return Err(self.error(expected));
            }
            self.pos += 1;
        }
        let parsed = self
            .line
            .get(start..self.pos)
            .and_then(|text| std::str::from_utf8(text).ok())
            .and_then(|text| text.parse().ok());
        match parsed {
            Some(addr) => Ok(addr),
            None => {
                self.pos = start;
                Err(self.error(expected))
            }
        }
    }

    fn crlf(&mut self) -> Step<()> {
        self.expect(b"\r\n", V1Expected::Crlf)
    }
}

/// `buf` starts with `PROXY `.
fn parse_v1(buf: &[u8]) -> Result<Parse<'_>, ProxyError> {
    let mut cursor = Cursor {
        line: buf.get(..V1_MAX_LEN).unwrap_or(buf),
        pos: V1_PREFIX.len(),
        capped: buf.len() >= V1_MAX_LEN,
    };
    match v1_line(&mut cursor) {
        Ok(addresses) => Ok(Parse::Done {
            header: ProxyHeader {
                version: Version::V1,
                addresses,
                tlvs: Tlvs::default(),
            },
            len: cursor.pos,
        }),
        Err(Stop::Incomplete) => Ok(Parse::Incomplete),
        Err(Stop::Error(e)) => Err(e),
    }
}

/// The rest of a v1 line after `PROXY `, CRLF included.
fn v1_line(c: &mut Cursor<'_>) -> Step<Option<Addresses>> {
    use Endpoint::{Destination, Source};
    match c.peek()? {
        b'T' => {
            c.expect(b"TCP", V1Expected::Protocol)?;
            let v6 = match c.peek()? {
                b'4' => false,
                b'6' => true,
                _ => return Err(c.error(V1Expected::Protocol)),
            };
            c.pos += 1;
            c.expect(b" ", V1Expected::Space)?;
            let (source, destination): (IpAddr, IpAddr) = if v6 {
                let s = c.ipv6(V1Expected::Ipv6(Source))?;
                c.expect(b" ", V1Expected::Space)?;
                (s.into(), c.ipv6(V1Expected::Ipv6(Destination))?.into())
            } else {
                let s = c.ipv4(V1Expected::Ipv4(Source))?;
                c.expect(b" ", V1Expected::Space)?;
                (s.into(), c.ipv4(V1Expected::Ipv4(Destination))?.into())
            };
            c.expect(b" ", V1Expected::Space)?;
            let sport = c.decimal(65535, V1Expected::Port(Source))?;
            c.expect(b" ", V1Expected::Space)?;
            let dport = c.decimal(65535, V1Expected::Port(Destination))?;
            c.crlf()?;
            // decimal(65535) fits a u16.
            let port = |p: u32| u16::try_from(p).unwrap_or(u16::MAX);
            Ok(Some(Addresses {
                source: SocketAddr::new(source, port(sport)),
                destination: SocketAddr::new(destination, port(dport)),
            }))
        }
        b'U' => {
            c.expect(b"UNKNOWN", V1Expected::Protocol)?;
            match c.peek()? {
                b'\r' => c.crlf()?,
                b' ' => {
                    // Anything up to the first LF, which must follow a CR.
                    let mut prev = b' ';
                    loop {
                        let b = c.peek()?;
                        if b == b'\n' {
                            if prev != b'\r' {
                                return Err(c.error(V1Expected::Crlf));
                            }
                            c.pos += 1;
                            break;
                        }
                        prev = c.bump()?;
                    }
                }
                _ => return Err(c.error(V1Expected::SpaceOrCrlf)),
            }
            Ok(None)
        }
        _ => Err(c.error(V1Expected::Protocol)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TLS_HELLO: &[u8] = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03";

    fn v2(ver_cmd: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let len = u16::try_from(body.len()).expect("test body fits u16");
        let mut b = V2_SIGNATURE.to_vec();
        b.extend_from_slice(&[ver_cmd, family]);
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(body);
        b
    }

    fn tlv(ty: u8, value: &[u8]) -> Vec<u8> {
        let len = u16::try_from(value.len()).expect("test TLV fits u16");
        let mut b = vec![ty];
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(value);
        b
    }

    fn tcp4_body() -> Vec<u8> {
        // 192.0.2.1:56324 -> 198.51.100.25:25
        vec![192, 0, 2, 1, 198, 51, 100, 25, 0xdc, 0x04, 0x00, 0x19]
    }

    fn tcp4_addresses() -> Addresses {
        Addresses {
            source: "192.0.2.1:56324".parse().unwrap(),
            destination: "198.51.100.25:25".parse().unwrap(),
        }
    }

    fn done(buf: &[u8]) -> (ProxyHeader<'_>, usize) {
        match parse(buf) {
            Ok(Parse::Done { header, len }) => (header, len),
            other => panic!("expected Done for {buf:?}, got {other:?}"),
        }
    }

    fn err(buf: &[u8]) -> ProxyError {
        match parse(buf) {
            Err(e) => e,
            other => panic!("expected an error for {buf:?}, got {other:?}"),
        }
    }

    /// Every strict prefix is Incomplete, the header alone and the header
    /// followed by anything give the same Done of `len` bytes.
    fn assert_whole(header: &[u8]) -> ProxyHeader<'_> {
        for k in 0..header.len() {
            assert_eq!(
                parse(&header[..k]),
                Ok(Parse::Incomplete),
                "prefix of {k} bytes"
            );
        }
        let (h, len) = done(header);
        assert_eq!(len, header.len());
        for tail in [
            &b"EHLO mx.example\r\n"[..],
            TLS_HELLO,
            b"\r\n",
            b"PROXY ",
            &V2_SIGNATURE,
        ] {
            let mut with_tail = header.to_vec();
            with_tail.extend_from_slice(tail);
            let (h2, len2) = done(&with_tail);
            assert_eq!((h2, len2), (h, len));
            assert_eq!(&with_tail[len2..], tail, "bytes after the header stay");
        }
        h
    }

    // ---- v2, valid ----

    #[test]
    fn v2_tcp4_as_haproxy_sends_it() {
        let mut bytes = V2_SIGNATURE.to_vec();
        bytes.extend_from_slice(&[0x21, 0x11, 0x00, 0x0c]);
        bytes.extend_from_slice(&tcp4_body());
        assert_eq!(bytes.len(), 28);
        let h = assert_whole(&bytes);
        assert_eq!(h.version, Version::V2);
        assert_eq!(h.addresses, Some(tcp4_addresses()));
        assert_eq!(h.source(), Some("192.0.2.1:56324".parse().unwrap()));
        assert_eq!(h.destination(), Some("198.51.100.25:25".parse().unwrap()));
        assert_eq!(h.tlvs, Tlvs::default());

        // With the client's TLS ClientHello in the same segment.
        let mut seg = bytes.clone();
        seg.extend_from_slice(TLS_HELLO);
        assert_eq!(done(&seg).1, 28);
    }

    #[test]
    fn v2_tcp6() {
        let src: Ipv6Addr = "2001:db8::1".parse().unwrap();
        let dst: Ipv6Addr = "2001:db8:ffff::25".parse().unwrap();
        let mut body = src.octets().to_vec();
        body.extend_from_slice(&dst.octets());
        body.extend_from_slice(&[0xff, 0xff, 0, 25]);
        let bytes = v2(0x21, 0x21, &body);
        let h = assert_whole(&bytes);
        assert_eq!(h.source(), Some("[2001:db8::1]:65535".parse().unwrap()));
        assert_eq!(
            h.destination(),
            Some("[2001:db8:ffff::25]:25".parse().unwrap())
        );
    }

    #[test]
    fn v2_local_uses_the_socket_addresses() {
        let bytes = v2(0x20, 0x00, &[]);
        let h = assert_whole(&bytes);
        assert_eq!(h.version, Version::V2);
        assert_eq!(h.addresses, None);
        assert_eq!(h.source(), None);
        // The receiver must skip `len` bytes and ignore the family, even one
        // it would reject with PROXY, and whatever the block holds.
        let bytes = v2(0x20, 0x11, &tcp4_body());
        let h = assert_whole(&bytes);
        assert_eq!(h.addresses, None);
        assert_eq!(assert_whole(&v2(0x20, 0x31, &[0xAA; 216])).addresses, None);
        assert_eq!(
            assert_whole(&v2(0x20, 0xff, &[0x01, 0xff, 0xff])).tlvs,
            Tlvs::default()
        );
    }

    #[test]
    fn v2_tlvs_alpn_ssl_noop_crc32c_and_others() {
        let mut ssl = vec![Ssl::CLIENT_SSL | Ssl::CLIENT_CERT_CONN, 0, 0, 0, 0];
        ssl.extend(tlv(0x21, b"TLSv1.3"));
        ssl.extend(tlv(0x23, b"TLS_AES_128_GCM_SHA256"));
        ssl.extend(tlv(0x22, b"client.example"));
        let mut body = tcp4_body();
        body.extend(tlv(0x03, &[0xde, 0xad, 0xbe, 0xef])); // CRC32C: not verified
        body.extend(tlv(0x04, &[])); // NOOP, empty
        body.extend(tlv(0x01, b"smtp"));
        body.extend(tlv(0x02, b"mx.example")); // AUTHORITY: skipped
        body.extend(tlv(0x20, &ssl));
        body.extend(tlv(0x04, &[0; 7])); // NOOP padding
        body.extend(tlv(0x05, &[9; 128])); // UNIQUE_ID: skipped
        body.extend(tlv(0xe0, b"custom"));
        body.extend(tlv(0x01, b"second")); // the first ALPN wins
        let bytes = v2(0x21, 0x11, &body);
        let h = assert_whole(&bytes);
        assert_eq!(h.addresses, Some(tcp4_addresses()));
        assert_eq!(h.tlvs.alpn, Some(&b"smtp"[..]));
        let s = h.tlvs.ssl.expect("SSL TLV");
        assert!(s.is_tls());
        assert_eq!(s.client, 0x03);
        assert_eq!(s.verify, 0);
        assert_eq!(s.version, Some(&b"TLSv1.3"[..]));
    }

    #[test]
    fn v2_ssl_without_version_and_plain_client() {
        let mut body = tcp4_body();
        body.extend(tlv(0x20, &[0, 0, 0, 0, 1]));
        let bytes = v2(0x21, 0x11, &body);
        let s = assert_whole(&bytes).tlvs.ssl.unwrap();
        assert!(!s.is_tls());
        assert_eq!((s.verify, s.version), (1, None));
    }

    #[test]
    fn v2_exactly_536_bytes() {
        let mut body = tcp4_body();
        body.extend(tlv(0x04, &[0; 520 - 12 - 3]));
        let bytes = v2(0x21, 0x11, &body);
        assert_eq!(bytes.len(), V2_MAX_LEN);
        assert_eq!(done(&bytes).1, 536);
    }

    // ---- v2, malformed ----

    #[test]
    fn v2_wrong_version() {
        for ver_cmd in [0x11, 0x31, 0x01, 0xf1] {
            let e = err(&v2(ver_cmd, 0x11, &tcp4_body()));
            assert_eq!(e, ProxyError::V2Version(ver_cmd >> 4));
            // Known at the 13th byte.
            assert_eq!(err(&v2(ver_cmd, 0x11, &[])[..13]), e);
        }
        assert_eq!(
            err(&v2(0x11, 0x11, &[])).to_string(),
            "PROXY v2: unsupported version 1 (only 2 is defined)"
        );
    }

    #[test]
    fn v2_wrong_command() {
        for c in [0x22, 0x2f, 0x23] {
            let e = err(&v2(c, 0x11, &tcp4_body()));
            assert_eq!(e, ProxyError::V2Command(c & 0x0f));
            assert_eq!(err(&v2(c, 0x11, &[])[..13]), e);
        }
    }

    #[test]
    fn v2_unsupported_family_with_proxy() {
        for fam in [0x00, 0x12, 0x22, 0x31, 0x32, 0x13, 0x41, 0xff] {
            let e = err(&v2(0x21, fam, &[0; 216]));
            assert_eq!(e, ProxyError::V2UnsupportedFamily(fam));
            // Known at the 14th byte.
            assert_eq!(err(&v2(0x21, fam, &[])[..14]), e);
        }
        assert_eq!(
            ProxyError::V2UnsupportedFamily(0x31).to_string(),
            "PROXY v2: unsupported address family 0x31 (AF_UNIX stream); \
             the PROXY command needs TCP over IPv4 (0x11) or IPv6 (0x21)"
        );
    }

    #[test]
    fn v2_length_too_short_for_the_addresses() {
        assert_eq!(
            err(&v2(0x21, 0x11, &[0; 8])),
            ProxyError::V2ShortAddresses {
                family: 0x11,
                len: 8
            }
        );
        assert_eq!(
            err(&v2(0x21, 0x21, &[0; 35])),
            ProxyError::V2ShortAddresses {
                family: 0x21,
                len: 35
            }
        );
        // Known from the length field, before the body arrives.
        assert_eq!(
            err(&v2(0x21, 0x11, &[])),
            ProxyError::V2ShortAddresses {
                family: 0x11,
                len: 0
            }
        );
    }

    #[test]
    fn v2_over_536_bytes() {
        let e = err(&v2(0x21, 0x11, &[0; 521]));
        assert_eq!(e, ProxyError::V2TooLong { len: 537 });
        // Rejected on the fixed 16 bytes alone, not waited for.
        let mut fixed = V2_SIGNATURE.to_vec();
        fixed.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert_eq!(err(&fixed), ProxyError::V2TooLong { len: 16 + 65535 });
        // LOCAL too.
        fixed[12] = 0x20;
        assert_eq!(err(&fixed), ProxyError::V2TooLong { len: 16 + 65535 });
    }

    #[test]
    fn v2_tlv_overrun() {
        // A TLV announcing more than the header holds.
        let mut body = tcp4_body();
        body.extend_from_slice(&[0x01, 0x00, 0x05, b'h', b'2']);
        assert_eq!(
            err(&v2(0x21, 0x11, &body)),
            ProxyError::V2TlvOverrun {
                at: 28,
                tlv_type: 0x01
            }
        );
        // Bytes after the header do not rescue it.
        let mut seg = v2(0x21, 0x11, &body);
        seg.extend_from_slice(b"smtp\r\n");
        assert_eq!(
            err(&seg),
            ProxyError::V2TlvOverrun {
                at: 28,
                tlv_type: 0x01
            }
        );
        // A TLV cut inside its 3-byte type and length.
        for tail in [&[0x04][..], &[0x04, 0x00]] {
            let mut body = tcp4_body();
            body.extend(tlv(0x04, b"pad"));
            body.extend_from_slice(tail);
            assert_eq!(
                err(&v2(0x21, 0x11, &body)),
                ProxyError::V2TlvOverrun {
                    at: 34,
                    tlv_type: 0x04
                }
            );
        }
        // A sub-TLV running past the end of the SSL TLV.
        let mut body = tcp4_body();
        body.extend(tlv(
            0x20,
            &[1, 0, 0, 0, 0, 0x21, 0x00, 0x09, b'T', b'L', b'S'],
        ));
        body.extend(tlv(0x04, &[0; 9]));
        assert_eq!(
            err(&v2(0x21, 0x11, &body)),
            ProxyError::V2TlvOverrun {
                at: 36,
                tlv_type: 0x21
            }
        );
    }

    #[test]
    fn v2_ssl_tlv_too_short() {
        let mut body = tcp4_body();
        body.extend(tlv(0x20, &[1, 0, 0]));
        assert_eq!(
            err(&v2(0x21, 0x11, &body)),
            ProxyError::V2SslTooShort { len: 3 }
        );
    }

    #[test]
    fn v2_signature_prefixes_and_near_misses() {
        for k in 0..=12 {
            assert_eq!(parse(&V2_SIGNATURE[..k]), Ok(Parse::Incomplete));
        }
        for k in 0..12 {
            let mut wrong = V2_SIGNATURE[..=k].to_vec();
            wrong[k] ^= 0x40;
            assert_eq!(err(&wrong), ProxyError::NotProxy, "flipped byte {k}");
        }
        // Blank lines are not the signature.
        assert_eq!(err(b"\r\n\r\n\r\n"), ProxyError::NotProxy);
        assert_eq!(err(b"\r\n\r\n\0\r\nQUIT\r\n"), ProxyError::NotProxy);
    }

    // ---- v1, valid ----

    #[test]
    fn v1_tcp4_as_haproxy_sends_it() {
        let line = b"PROXY TCP4 192.0.2.1 198.51.100.25 56324 25\r\n";
        let h = assert_whole(line);
        assert_eq!(h.version, Version::V1);
        assert_eq!(h.addresses, Some(tcp4_addresses()));
        assert_eq!(h.tlvs, Tlvs::default());
        let mut seg = line.to_vec();
        seg.extend_from_slice(b"EHLO client.example\r\n");
        assert_eq!(done(&seg).1, line.len());
    }

    #[test]
    fn v1_edges_of_numbers() {
        let h = assert_whole(b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n");
        assert_eq!(h.source(), Some("0.0.0.0:0".parse().unwrap()));
        assert_eq!(
            h.destination(),
            Some("255.255.255.255:65535".parse().unwrap())
        );
        assert_whole(b"PROXY TCP4 10.100.200.9 1.20.3.40 100 1000\r\n");
    }

    #[test]
    fn v1_tcp6() {
        let h = assert_whole(b"PROXY TCP6 2001:db8::1 2001:DB8:FFFF::25 56324 25\r\n");
        assert_eq!(h.source(), Some("[2001:db8::1]:56324".parse().unwrap()));
        assert_eq!(
            h.destination(),
            Some("[2001:db8:ffff::25]:25".parse().unwrap())
        );
        assert_whole(b"PROXY TCP6 :: ::1 0 0\r\n");
        assert_whole(b"PROXY TCP6 ::ffff:192.0.2.1 ::ffff:198.51.100.25 1 2\r\n");
        // The spec's longest TCP6 line, 104 bytes.
        let full = b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff \
ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        assert_eq!(full.len(), 104);
        assert_whole(full);
    }

    #[test]
    fn v1_unknown() {
        let h = assert_whole(b"PROXY UNKNOWN\r\n");
        assert_eq!((h.version, h.addresses), (Version::V1, None));
        let h = assert_whole(b"PROXY UNKNOWN 192.0.2.1 198.51.100.25 56324 25\r\n");
        assert_eq!(h.addresses, None);
        assert_whole(b"PROXY UNKNOWN whatever \x01\xff \r goes\r\n");
        // The spec's worst case, exactly 107 bytes.
        let worst = b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff \
ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        assert_eq!(worst.len(), V1_MAX_LEN);
        assert_whole(worst);
    }

    // ---- v1, malformed ----

    fn syntax(at: usize, expected: V1Expected) -> ProxyError {
        ProxyError::V1Syntax { at, expected }
    }

    #[test]
    fn v1_leading_zeros() {
        use Endpoint::*;
        let cases: [(&[u8], ProxyError); 6] = [
            (
                b"PROXY TCP4 192.0.2.1 198.51.100.25 056324 25\r\n",
                syntax(36, V1Expected::Port(Source)),
            ),
            (
                b"PROXY TCP4 192.0.2.1 198.51.100.25 56324 025\r\n",
                syntax(42, V1Expected::Port(Destination)),
            ),
            (
                b"PROXY TCP4 192.0.2.1 198.51.100.25 00 25\r\n",
                syntax(36, V1Expected::Port(Source)),
            ),
            (
                b"PROXY TCP4 192.0.2.01 198.51.100.25 1 2\r\n",
                syntax(20, V1Expected::Ipv4(Source)),
            ),
            (
                b"PROXY TCP4 192.0.2.1 198.051.100.25 1 2\r\n",
                syntax(26, V1Expected::Ipv4(Destination)),
            ),
            (
                b"PROXY TCP4 00.0.2.1 198.51.100.25 1 2\r\n",
                syntax(12, V1Expected::Ipv4(Source)),
            ),
        ];
        for (line, e) in cases {
            assert_eq!(err(line), e, "{}", String::from_utf8_lossy(line));
            // Rejected as soon as the offending digit arrives.
            let at = match e {
                ProxyError::V1Syntax { at, .. } => at,
                _ => unreachable!(),
            };
            assert_eq!(err(&line[..=at]), e);
            assert_eq!(parse(&line[..at]), Ok(Parse::Incomplete));
        }
    }

    #[test]
    fn v1_out_of_range_numbers() {
        use Endpoint::*;
        assert_eq!(
            err(b"PROXY TCP4 192.0.2.1 198.51.100.25 65536 25\r\n"),
            syntax(39, V1Expected::Port(Source))
        );
        assert_eq!(
            err(b"PROXY TCP4 192.0.2.256 198.51.100.25 1 2\r\n"),
            syntax(21, V1Expected::Ipv4(Source))
        );
        assert_eq!(
            err(b"PROXY TCP4 192.0.2.1 198.51.100.25 1 99999999999999999999\r\n"),
            syntax(41, V1Expected::Port(Destination))
        );
        assert!(parse(b"PROXY TCP4 1.2.3 4.5.6.7 1 2\r\n").is_err());
        assert!(parse(b"PROXY TCP4 1.2.3.4.5 4.5.6.7 1 2\r\n").is_err());
        assert!(parse(b"PROXY TCP4 1.2.3.4 4.5.6.7 +1 2\r\n").is_err());
        assert!(parse(b"PROXY TCP4 1.2.3.4 4.5.6.7 -1 2\r\n").is_err());
        assert!(parse(b"PROXY TCP4 1.2.3.4 4.5.6.7 1 2 3\r\n").is_err());
        assert!(parse(b"PROXY TCP4 1.2.3.4 4.5.6.7 1\r\n").is_err());
    }

    #[test]
    fn v1_wrong_family_addresses() {
        use Endpoint::*;
        assert_eq!(
            err(b"PROXY TCP4 2001:db8::1 2001:db8::2 1 2\r\n"),
            syntax(14, V1Expected::Ipv4(Source))
        );
        assert_eq!(
            err(b"PROXY TCP6 192.0.2.1 198.51.100.25 1 2\r\n"),
            syntax(11, V1Expected::Ipv6(Source))
        );
        assert_eq!(
            err(b"PROXY TCP6 2001:db8::1 2001:db8:::2 1 2\r\n"),
            syntax(23, V1Expected::Ipv6(Destination))
        );
        assert_eq!(
            err(b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n"),
            syntax(18, V1Expected::Space)
        );
        // An over-long token is rejected before its end.
        let mut long = b"PROXY TCP6 ".to_vec();
        long.extend_from_slice(&[b'0'; 46]);
        assert_eq!(err(&long), syntax(56, V1Expected::Ipv6(Source)));
    }

    #[test]
    fn v1_spaces() {
        for line in [
            &b"PROXY  TCP4 192.0.2.1 198.51.100.25 56324 25\r\n"[..],
            b"PROXY TCP4  192.0.2.1 198.51.100.25 56324 25\r\n",
            b"PROXY TCP4 192.0.2.1  198.51.100.25 56324 25\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.25  56324 25\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.25 56324  25\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.25 56324 25 \r\n",
            b"PROXY TCP4\t192.0.2.1 198.51.100.25 56324 25\r\n",
            b"PROXY TCP6  ::1 ::1 1 2\r\n",
            b" PROXY TCP4 192.0.2.1 198.51.100.25 56324 25\r\n",
            b"PROXY UNKNOWN\t\r\n",
            b"PROXY UNKNOWNX\r\n",
        ] {
            assert!(parse(line).is_err(), "{}", String::from_utf8_lossy(line));
        }
        assert_eq!(err(b"PROXY  TCP4"), syntax(6, V1Expected::Protocol));
        assert_eq!(err(b"PROXY UNKNOWNX"), syntax(13, V1Expected::SpaceOrCrlf));
    }

    #[test]
    fn v1_line_endings() {
        assert_eq!(
            err(b"PROXY TCP4 192.0.2.1 198.51.100.25 56324 25\n"),
            ProxyError::V1BareLf { at: 43 }
        );
        assert_eq!(err(b"PROXY UNKNOWN\n"), ProxyError::V1BareLf { at: 13 });
        assert_eq!(
            err(b"PROXY UNKNOWN 1.2.3.4\n"),
            ProxyError::V1BareLf { at: 21 }
        );
        assert_eq!(err(b"PROXY TCP4\n"), ProxyError::V1BareLf { at: 10 });
        assert_eq!(
            err(b"PROXY TCP4 192.0.2.1 198.51.100.25 56324 25\rEHLO"),
            syntax(44, V1Expected::Crlf)
        );
        assert_eq!(err(b"PROXY UNKNOWN\r\r\n"), syntax(14, V1Expected::Crlf));
        assert_eq!(
            err(b"PROXY TCP4 192.0.2.1 198.51.100.25 56324 25\n\r"),
            ProxyError::V1BareLf { at: 43 }
        );
        assert_eq!(
            err(b"PROXY TCP4 192.0.2.1\r\n"),
            syntax(20, V1Expected::Space)
        );
        assert_eq!(
            ProxyError::V1BareLf { at: 43 }.to_string(),
            "PROXY v1: bare LF at byte 43 (the line must end in CRLF)"
        );
    }

    #[test]
    fn v1_over_107_bytes() {
        let mut line = b"PROXY UNKNOWN ".to_vec();
        line.resize(V1_MAX_LEN - 1, b'x');
        assert_eq!(parse(&line), Ok(Parse::Incomplete));
        line.push(b'\r');
        assert_eq!(line.len(), 107);
        // 107 bytes and no CRLF: the LF can only come too late.
        assert_eq!(err(&line), ProxyError::V1TooLong);
        line.extend_from_slice(b"\n");
        assert_eq!(err(&line), ProxyError::V1TooLong);
        // 106 bytes then CRLF is 108.
        let mut line = b"PROXY UNKNOWN ".to_vec();
        line.resize(V1_MAX_LEN - 1, b'x');
        line.extend_from_slice(b"\r\n");
        assert_eq!(err(&line), ProxyError::V1TooLong);
        // A TCP6 line padded with an over-long UNKNOWN-free token never waits.
        let mut tcp6 = b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255 \
ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255 65535 65535"
            .to_vec();
        assert!(tcp6.len() > V1_MAX_LEN);
        assert_eq!(err(&tcp6), ProxyError::V1TooLong);
        tcp6.truncate(V1_MAX_LEN - 1);
        assert_eq!(parse(&tcp6), Ok(Parse::Incomplete));
    }

    #[test]
    fn v1_protocols() {
        assert_eq!(err(b"PROXY TCP5 1.2.3.4"), syntax(9, V1Expected::Protocol));
        assert_eq!(err(b"PROXY UDP4 1.2.3.4"), syntax(7, V1Expected::Protocol));
        assert_eq!(err(b"PROXY tcp4 1.2.3.4"), syntax(6, V1Expected::Protocol));
        assert_eq!(err(b"PROXY \r\n"), syntax(6, V1Expected::Protocol));
        for k in 0..=13 {
            assert_eq!(parse(&b"PROXY UNKNOWN"[..k]), Ok(Parse::Incomplete));
        }
    }

    #[test]
    fn not_a_proxy_header() {
        for bytes in [
            &b"EHLO client.example\r\n"[..],
            b"proxy TCP4 192.0.2.1 198.51.100.25 56324 25\r\n",
            b"Proxy TCP4",
            b"PROXY\r\n",
            b"PROXYTCP4",
            b"GET / HTTP/1.1\r\n",
            TLS_HELLO,
            b"\0\0\0\0",
            b"\n",
            b"\r\r",
            b"QUIT\r\n",
        ] {
            assert_eq!(err(bytes), ProxyError::NotProxy, "{bytes:?}");
        }
        // As soon as the first byte differs.
        assert_eq!(err(b"E"), ProxyError::NotProxy);
        assert_eq!(err(b"PROXX"), ProxyError::NotProxy);
        for k in 0..=6 {
            assert_eq!(parse(&b"PROXY "[..k]), Ok(Parse::Incomplete));
        }
        assert_eq!(
            ProxyError::NotProxy.to_string(),
            "not a PROXY protocol header (neither \"PROXY \" nor the v2 signature)"
        );
    }

    #[test]
    fn every_error_displays() {
        let errors = [
            ProxyError::NotProxy,
            ProxyError::V1TooLong,
            ProxyError::V1BareLf { at: 1 },
            syntax(11, V1Expected::Ipv4(Endpoint::Source)),
            syntax(11, V1Expected::Ipv6(Endpoint::Destination)),
            syntax(11, V1Expected::Port(Endpoint::Source)),
            syntax(11, V1Expected::Protocol),
            syntax(11, V1Expected::Space),
            syntax(11, V1Expected::SpaceOrCrlf),
            syntax(11, V1Expected::Crlf),
            ProxyError::V2Version(3),
            ProxyError::V2Command(2),
            ProxyError::V2UnsupportedFamily(0x00),
            ProxyError::V2TooLong { len: 600 },
            ProxyError::V2ShortAddresses {
                family: 0x21,
                len: 12,
            },
            ProxyError::V2TlvOverrun {
                at: 28,
                tlv_type: 1,
            },
            ProxyError::V2SslTooShort { len: 2 },
        ];
        for e in errors {
            let text = e.to_string();
            assert!(
                text.starts_with("PROXY v") || e == ProxyError::NotProxy,
                "{text}"
            );
        }
        assert_eq!(
            syntax(36, V1Expected::Port(Endpoint::Source)).to_string(),
            "PROXY v1: expected the source port as 0-65535 in decimal without leading zeros at byte 36"
        );
    }

    // ---- properties ----

    /// A valid header and what parsing it must give.
    #[derive(Debug, Clone)]
    struct Valid {
        bytes: Vec<u8>,
        version: Version,
        addresses: Option<Addresses>,
        alpn: Option<Vec<u8>>,
        ssl: Option<(u8, u32, Option<Vec<u8>>)>,
    }

    fn gen_v1_tcp() -> impl Strategy<Value = Valid> {
        (
            any::<bool>(),
            any::<[u8; 16]>(),
            any::<[u8; 16]>(),
            any::<u16>(),
            any::<u16>(),
        )
            .prop_map(|(v6, s, d, sp, dp)| {
                let (src, dst, proto): (IpAddr, IpAddr, _) = if v6 {
                    (Ipv6Addr::from(s).into(), Ipv6Addr::from(d).into(), "TCP6")
                } else {
                    let four = |b: [u8; 16]| Ipv4Addr::new(b[0], b[1], b[2], b[3]);
                    (four(s).into(), four(d).into(), "TCP4")
                };
                Valid {
                    bytes: format!("PROXY {proto} {src} {dst} {sp} {dp}\r\n").into_bytes(),
                    version: Version::V1,
                    addresses: Some(Addresses {
                        source: SocketAddr::new(src, sp),
                        destination: SocketAddr::new(dst, dp),
                    }),
                    alpn: None,
                    ssl: None,
                }
            })
    }

    fn gen_v1_unknown() -> impl Strategy<Value = Valid> {
        proptest::option::of(proptest::collection::vec(
            any::<u8>().prop_filter("no LF", |b| *b != b'\n'),
            0..=(V1_MAX_LEN - 16),
        ))
        .prop_map(|rest| {
            let mut bytes = b"PROXY UNKNOWN".to_vec();
            if let Some(rest) = rest {
                bytes.push(b' ');
                bytes.extend(rest);
            }
            bytes.extend_from_slice(b"\r\n");
            Valid {
                bytes,
                version: Version::V1,
                addresses: None,
                alpn: None,
                ssl: None,
            }
        })
    }

    #[derive(Debug, Clone)]
    enum GenTlv {
        Raw(u8, Vec<u8>),
        Ssl(u8, u32, Vec<(u8, Vec<u8>)>),
    }

    fn gen_tlv() -> impl Strategy<Value = GenTlv> {
        let value = || proptest::collection::vec(any::<u8>(), 0..24);
        prop_oneof![
            (
                any::<u8>().prop_filter("not SSL", |t| *t != TLV_SSL),
                value()
            )
                .prop_map(|(t, v)| GenTlv::Raw(t, v)),
            (
                any::<u8>(),
                any::<u32>(),
                proptest::collection::vec((prop_oneof![Just(0x21u8), any::<u8>()], value()), 0..3)
            )
                .prop_map(|(c, v, subs)| GenTlv::Ssl(c, v, subs)),
        ]
    }

    fn gen_v2_proxy() -> impl Strategy<Value = Valid> {
        (
            any::<bool>(),
            any::<[u8; 16]>(),
            any::<[u8; 16]>(),
            any::<u16>(),
            any::<u16>(),
            proptest::collection::vec(gen_tlv(), 0..5),
        )
            .prop_map(|(v6, s, d, sp, dp, tlvs)| {
                let (mut body, src, dst, family): (Vec<u8>, IpAddr, IpAddr, u8) = if v6 {
                    (
                        [s, d].concat(),
                        Ipv6Addr::from(s).into(),
                        Ipv6Addr::from(d).into(),
                        0x21,
                    )
                } else {
                    let four = |b: [u8; 16]| Ipv4Addr::new(b[0], b[1], b[2], b[3]);
                    (
                        [&s[..4], &d[..4]].concat(),
                        four(s).into(),
                        four(d).into(),
                        0x11,
                    )
                };
                body.extend_from_slice(&sp.to_be_bytes());
                body.extend_from_slice(&dp.to_be_bytes());
                let (mut alpn, mut ssl) = (None, None);
                for t in tlvs {
                    match t {
                        GenTlv::Raw(ty, v) => {
                            if ty == TLV_ALPN && alpn.is_none() {
                                alpn = Some(v.clone());
                            }
                            body.extend(tlv(ty, &v));
                        }
                        GenTlv::Ssl(client, verify, subs) => {
                            let mut value = vec![client];
                            value.extend_from_slice(&verify.to_be_bytes());
                            let mut version = None;
                            for (ty, v) in subs {
                                if ty == SSL_SUB_VERSION && version.is_none() {
                                    version = Some(v.clone());
                                }
                                value.extend(tlv(ty, &v));
                            }
                            if ssl.is_none() {
                                ssl = Some((client, verify, version));
                            }
                            body.extend(tlv(TLV_SSL, &value));
                        }
                    }
                }
                Valid {
                    bytes: v2(0x21, family, &body),
                    version: Version::V2,
                    addresses: Some(Addresses {
                        source: SocketAddr::new(src, sp),
                        destination: SocketAddr::new(dst, dp),
                    }),
                    alpn,
                    ssl,
                }
            })
    }

    fn gen_v2_local() -> impl Strategy<Value = Valid> {
        (any::<u8>(), proptest::collection::vec(any::<u8>(), 0..80)).prop_map(|(family, body)| {
            Valid {
                bytes: v2(0x20, family, &body),
                version: Version::V2,
                addresses: None,
                alpn: None,
                ssl: None,
            }
        })
    }

    fn valid() -> impl Strategy<Value = Valid> {
        prop_oneof![
            gen_v1_tcp(),
            gen_v1_unknown(),
            gen_v2_proxy(),
            gen_v2_local()
        ]
    }

    fn check_header(h: &ProxyHeader<'_>, want: &Valid) {
        assert_eq!(h.version, want.version);
        assert_eq!(h.addresses, want.addresses);
        assert_eq!(h.tlvs.alpn, want.alpn.as_deref());
        let ssl = h
            .tlvs
            .ssl
            .map(|s| (s.client, s.verify, s.version.map(<[u8]>::to_vec)));
        assert_eq!(ssl, want.ssl);
    }

    /// Inputs that get past the first bytes often.
    fn hostile() -> impl Strategy<Value = Vec<u8>> {
        let starts: Vec<&'static [u8]> = vec![
            b"",
            &V2_SIGNATURE,
            b"\r\n\r\n\0\r\nQUIT\n\x21\x11",
            b"\r\n\r\n\0\r\nQUIT\n\x21\x21\x00",
            b"\r\n\r\n\0\r\nQUIT\n\x20",
            b"PROXY ",
            b"PROXY TCP4 ",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 ",
            b"PROXY TCP6 ",
            b"PROXY UNKNOWN",
        ];
        let alphabet = prop_oneof![
            any::<u8>(),
            proptest::sample::select(&b"0123456789.: \r\nabcdefABCDEF"[..])
        ];
        (
            proptest::sample::select(starts),
            proptest::collection::vec(alphabet, 0..600),
        )
            .prop_map(|(start, rest)| [start, &rest[..]].concat())
    }

    /// The fuzz target's invariants: no panic; Done within the input; once a
    /// prefix decides (Done or error), every longer input decides the same.
    fn check_invariants(input: &[u8]) {
        let mut decided: Option<Result<Parse<'_>, ProxyError>> = None;
        for k in 0..=input.len() {
            let r = parse(&input[..k]);
            if let Ok(Parse::Done { len, .. }) = r {
                assert!(len <= k && len > 0);
            }
            match decided {
                Some(d) => assert_eq!(r, d, "prefix of {k} bytes of {input:?}"),
                None if r != Ok(Parse::Incomplete) => decided = Some(r),
                None => {}
            }
        }
    }

    proptest! {
        #[test]
        fn valid_headers_at_every_split(
            want in valid(),
            tail in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let len = want.bytes.len();
            prop_assert!(len <= V2_MAX_LEN);
            let input = [&want.bytes[..], &tail[..]].concat();
            for k in 0..len {
                prop_assert_eq!(parse(&input[..k]), Ok(Parse::Incomplete), "prefix of {}", k);
            }
            let (whole, whole_len) = done(&input);
            prop_assert_eq!(whole_len, len);
            check_header(&whole, &want);
            for k in len..=input.len() {
                prop_assert_eq!(parse(&input[..k]), Ok(Parse::Done { header: whole, len }));
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(input in proptest::collection::vec(any::<u8>(), 0..700)) {
            check_invariants(&input);
        }

        #[test]
        fn hostile_bytes_keep_the_invariants(input in hostile()) {
            check_invariants(&input);
        }

        #[test]
        fn mutated_headers_keep_the_invariants(
            want in valid(),
            tail in proptest::collection::vec(any::<u8>(), 0..16),
            at in any::<proptest::sample::Index>(),
            byte in any::<u8>(),
        ) {
            let mut input = [&want.bytes[..], &tail[..]].concat();
            let i = at.index(input.len());
            input[i] = byte;
            check_invariants(&input);
        }
    }
}
