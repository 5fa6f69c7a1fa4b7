//! One SMTP connection as the generator (client) or the sink (server) sees it.
//!
//! Owns: the byte stream (plain TCP, client TLS or server TLS over a glommio
//! `TcpStream`), a read buffer, reply parsing (RFC 5321 §4.2 multi-line
//! replies) and the STARTTLS upgrade on both sides.
//!
//! Must never: carry bytes read before a STARTTLS upgrade into the TLS
//! session (RFC 3207 §4.2; the CVE-2011-0411 class). Both `starttls_*`
//! functions refuse to upgrade while unread plaintext is buffered.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_lite::io::{AsyncRead, AsyncWrite};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use rustls::pki_types::ServerName;

/// What went wrong in one operation, by kind. Counted, never hidden in the rate.
#[derive(Debug, Clone)]
pub enum OpError {
    /// An unexpected reply: its code (4xx, 5xx, or an out-of-sequence 2xx/3xx).
    Reply(u16),
    /// The operation did not finish within `--timeout`.
    Timeout,
    /// TLS handshake or record failure.
    Tls(String),
    /// TCP connect failed (refused, unreachable, ...).
    Connect(String),
    /// Read/write error or unexpected EOF on an established connection.
    Io(String),
    /// The peer said something that is not SMTP (bad reply line, bad challenge).
    Protocol(String),
}

impl OpError {
    /// The kind under which the error is counted.
    pub fn kind(&self) -> String {
        match self {
            OpError::Reply(c) if (400..500).contains(c) => "4xx".into(),
            OpError::Reply(c) if (500..600).contains(c) => "5xx".into(),
            OpError::Reply(_) => "unexpected_reply".into(),
            OpError::Timeout => "timeout".into(),
            OpError::Tls(_) => "tls".into(),
            OpError::Connect(_) => "connect".into(),
            OpError::Io(_) => "io".into(),
            OpError::Protocol(_) => "protocol".into(),
        }
    }

    /// Whether the connection can carry on (a reply error leaves it in sync).
    pub fn connection_usable(&self) -> bool {
        matches!(self, OpError::Reply(c) if *c != 421)
    }
}

impl std::fmt::Display for OpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpError::Reply(c) => write!(f, "reply {c}"),
            OpError::Timeout => write!(f, "timeout"),
            OpError::Tls(e) => write!(f, "tls: {e}"),
            OpError::Connect(e) => write!(f, "connect: {e}"),
            OpError::Io(e) => write!(f, "io: {e}"),
            OpError::Protocol(e) => write!(f, "protocol: {e}"),
        }
    }
}

fn io_err(e: io::Error) -> OpError {
    // rustls errors come back wrapped in io::Error(InvalidData).
    if e.kind() == io::ErrorKind::InvalidData {
        OpError::Tls(e.to_string())
    } else {
        OpError::Io(e.to_string())
    }
}

/// The byte stream under an SMTP connection.
pub enum Stream {
    Plain(TcpStream),
    ClientTls(Box<futures_rustls::client::TlsStream<TcpStream>>),
    ServerTls(Box<futures_rustls::server::TlsStream<TcpStream>>),
    /// Transient state while the stream is handed to a TLS handshake.
    Taken,
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Stream::Plain($s) => $e,
            Stream::ClientTls($s) => $e,
            Stream::ServerTls($s) => $e,
            Stream::Taken => Poll::Ready(Err(io::Error::other("stream taken"))),
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => Pin::new(s).poll_write(cx, buf))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_flush(cx))
    }
    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_close(cx))
    }
}

/// An SMTP reply: its code and the text of every line (without the code).
#[derive(Debug, Clone, Default)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Reply {
    /// The text of the last line (where a 334 carries its base64 challenge).
    pub fn last(&self) -> &str {
        self.lines.last().map(String::as_str).unwrap_or("")
    }

    /// Fails with `OpError::Reply` unless the code is `want`.
    pub fn expect(self, want: u16) -> Result<Reply, OpError> {
        if self.code == want {
            Ok(self)
        } else {
            Err(OpError::Reply(self.code))
        }
    }
}

/// A TCP stream with TCP_NODELAY set. Without it a TLS handshake stalls on delayed ACKs
/// (~20/s instead of ~3,000/s, see the stack notes).
pub async fn connect(addr: SocketAddr) -> Result<TcpStream, OpError> {
    let s = TcpStream::connect(addr)
        .await
        .map_err(|e| OpError::Connect(e.to_string()))?;
    s.set_nodelay(true)
        .map_err(|e| OpError::Connect(e.to_string()))?;
    Ok(s)
}

/// Which PROXY protocol header a connection begins with (`--proxy-v1`/`--proxy-v2`), as
/// a load balancer's `send-proxy`/`send-proxy-v2` would write it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyVersion {
    V1,
    V2,
}

/// The PROXY header claiming a TCP connection from `src` to `dst` (same address family):
/// v1 `PROXY TCP4|TCP6 SRC DST SPORT DPORT\r\n`, or v2 PROXY command, STREAM over
/// INET/INET6, no TLVs (what HAProxy 2.6 sends).
pub fn proxy_header(v: ProxyVersion, src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    match v {
        ProxyVersion::V1 => {
            let fam = if src.is_ipv4() { "TCP4" } else { "TCP6" };
            format!(
                "PROXY {fam} {} {} {} {}\r\n",
                src.ip(),
                dst.ip(),
                src.port(),
                dst.port()
            )
            .into_bytes()
        }
        ProxyVersion::V2 => {
            let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
            h.push(0x21); // version 2, PROXY
            match (src.ip(), dst.ip()) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    h.push(0x11); // INET, STREAM
                    h.extend_from_slice(&12u16.to_be_bytes());
                    h.extend_from_slice(&s.octets());
                    h.extend_from_slice(&d.octets());
                }
                (s, d) => {
                    let v6 = |a: IpAddr| match a {
                        IpAddr::V4(a) => a.to_ipv6_mapped(),
                        IpAddr::V6(a) => a,
                    };
                    h.push(0x21); // INET6, STREAM
                    h.extend_from_slice(&36u16.to_be_bytes());
                    h.extend_from_slice(&v6(s).octets());
                    h.extend_from_slice(&v6(d).octets());
                }
            }
            h.extend_from_slice(&src.port().to_be_bytes());
            h.extend_from_slice(&dst.port().to_be_bytes());
            h
        }
    }
}

/// A buffered SMTP connection.
pub struct SmtpConn {
    stream: Stream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Whether the last TLS handshake resumed a session (client side only).
    pub resumed: Option<bool>,
}

/// Longest line accepted from the peer (RFC 5321 §4.5.3.1.5 says 512 for replies; we allow
/// more, and the sink reads message content line by line, up to 998 + CRLF and beyond).
const MAX_LINE: usize = 64 * 1024;

impl SmtpConn {
    pub fn new(stream: Stream) -> SmtpConn {
        SmtpConn {
            stream,
            buf: vec![0; 16 * 1024],
            start: 0,
            end: 0,
            resumed: None,
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self.stream, Stream::ClientTls(_) | Stream::ServerTls(_))
    }

    /// Bytes read but not yet consumed.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    async fn fill(&mut self) -> Result<(), OpError> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else if self.buf.len() < MAX_LINE {
                self.buf.resize(self.buf.len() * 2, 0);
            } else {
                return Err(OpError::Protocol("line too long".into()));
            }
        }
        let n = self
            .stream
            .read(&mut self.buf[self.end..])
            .await
            .map_err(io_err)?;
        if n == 0 {
            return Err(OpError::Io("connection closed by peer".into()));
        }
        self.end += n;
        Ok(())
    }

    /// The next line including its LF (CRLF or bare LF). The slice is valid until the
    /// next call.
    pub async fn read_line(&mut self) -> Result<&[u8], OpError> {
        let mut scanned = self.start;
        loop {
            if let Some(i) = memchr::memchr(b'\n', &self.buf[scanned..self.end]) {
                let s = self.start;
                self.start = scanned + i + 1;
                return Ok(&self.buf[s..self.start]);
            }
            scanned = self.end;
            let before = self.start;
            self.fill().await?;
            // `fill` may have moved the unconsumed bytes to the front.
            scanned = scanned - before + self.start;
        }
    }

    /// Appends exactly `n` bytes to `out` (BDAT chunks).
    pub async fn read_exact_into(
        &mut self,
        mut n: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), OpError> {
        while n > 0 {
            if self.start == self.end {
                self.fill().await?;
            }
            let take = n.min(self.end - self.start);
            out.extend_from_slice(&self.buf[self.start..self.start + take]);
            self.start += take;
            n -= take;
        }
        Ok(())
    }

    /// One (possibly multi-line) reply.
    pub async fn read_reply(&mut self) -> Result<Reply, OpError> {
        let mut reply = Reply::default();
        loop {
            let line = self.read_line().await?;
            let line = trim_eol(line);
            if line.len() < 3 || !line[..3].iter().all(u8::is_ascii_digit) {
                return Err(OpError::Protocol(format!(
                    "bad reply line {:?}",
                    String::from_utf8_lossy(line)
                )));
            }
            let code = (line[0] - b'0') as u16 * 100
                + (line[1] - b'0') as u16 * 10
                + (line[2] - b'0') as u16;
            let more = line.get(3) == Some(&b'-');
            let text = if line.len() > 4 { &line[4..] } else { &[][..] };
            reply.code = code;
            reply.lines.push(String::from_utf8_lossy(text).into_owned());
            if !more {
                return Ok(reply);
            }
        }
    }

    pub async fn write_all(&mut self, data: &[u8]) -> Result<(), OpError> {
        self.stream.write_all(data).await.map_err(io_err)?;
        self.stream.flush().await.map_err(io_err)
    }

    /// Writes `cmd` and reads one reply.
    pub async fn cmd(&mut self, cmd: &[u8]) -> Result<Reply, OpError> {
        self.write_all(cmd).await?;
        self.read_reply().await
    }

    pub async fn close(&mut self) {
        let _ = self.stream.close().await;
    }

    fn take_plain(&mut self) -> Result<TcpStream, OpError> {
        if self.buffered() != 0 {
            return Err(OpError::Protocol(
                "data pipelined before the TLS handshake".into(),
            ));
        }
        match std::mem::replace(&mut self.stream, Stream::Taken) {
            Stream::Plain(s) => Ok(s),
            other => {
                self.stream = other;
                Err(OpError::Protocol("already TLS".into()))
            }
        }
    }

    /// Client side: runs the TLS handshake on the plain stream (after `220` to STARTTLS, or
    /// straight away for implicit TLS).
    pub async fn client_tls(
        &mut self,
        config: &Arc<rustls::ClientConfig>,
        name: &ServerName<'static>,
    ) -> Result<(), OpError> {
        let tcp = self.take_plain()?;
        let tls = futures_rustls::TlsConnector::from(config.clone())
            .connect(name.clone(), tcp)
            .await
            .map_err(|e| OpError::Tls(e.to_string()))?;
        self.resumed = Some(matches!(
            tls.get_ref().1.handshake_kind(),
            Some(rustls::HandshakeKind::Resumed)
        ));
        self.stream = Stream::ClientTls(Box::new(tls));
        Ok(())
    }

    /// Server side (sink): the TLS handshake after our `220` to STARTTLS.
    pub async fn server_tls(&mut self, config: &Arc<rustls::ServerConfig>) -> Result<(), OpError> {
        let tcp = self.take_plain()?;
        let tls = futures_rustls::TlsAcceptor::from(config.clone())
            .accept(tcp)
            .await
            .map_err(|e| OpError::Tls(e.to_string()))?;
        self.stream = Stream::ServerTls(Box::new(tls));
        Ok(())
    }
}

pub fn trim_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}
