//! One client connection: socket I/O around a `Session`, on the shard that accepted it.
//!
//! Reads into a `BytesMut` receive buffer, lets the session consume it, and writes the
//! replies it produced once the input is drained (one write per pipelined batch, RFC 2920)
//! or before waiting on the disk. Runs the STARTTLS upgrade (dropping every byte that was
//! buffered before it: CVE-2011-0411) and implicit TLS. Applies the graceful stop and the
//! request deadline.
//!
//! Deadline (RFC 5321 §4.5.3.2, and Postfix's per-request deadline with a minimum data
//! rate): after each reply the client has `idle_timeout` to complete its next request;
//! bytes that arrive without completing it extend the deadline only by
//! `bytes / min_data_rate` seconds (never past `idle_timeout` from now), so a client
//! trickling a command or a body a byte at a time cannot hold the connection forever.
//!
//! Bounded per connection: replies waiting to be written (`OUTPUT_LIMIT`: past it the
//! session stops consuming pipelined commands until they are written, so a client that
//! never reads stalls on TCP flow control, not on our memory), the receive buffer (the
//! session's line limits; body reads fill the room left in the current allocation before
//! asking for a new one, since body slices keep their allocation alive).
//!
//! Behind a load balancer (`listeners.proxy_from`), a connection from the balancer begins
//! with a PROXY protocol header (v1 or v2, `tern_smtp::proxy`), read here before anything
//! else (before the banner, before a TLS handshake on 465) within `limits.proxy_timeout`;
//! its client address is from then on *the* client address. Bytes that arrived with the
//! header (a ClientHello, pipelined commands) are kept and read first (`Prefixed`).
//!
//! Must never: act on input received before a TLS handshake after it, let a slow or
//! silent client hold the shard (every wait is bounded by a timer), grow the receive
//! buffer past what the session's limits allow, parse a PROXY header from anyone but a
//! configured balancer, or send a banner before the whole header has arrived.

use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use futures_lite::future;
use futures_lite::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use futures_rustls::TlsAcceptor;
use glommio::net::TcpStream;
use glommio::timer::Timer;

use crate::shard::{Shard, DRAINING};
use tern_smtp::session::{reply, Check, Event, ListenerKind, Session, SessionConfig};

/// Per-listener context shared by that listener's connections on one shard.
pub struct ListenerCtx {
    /// Replaced whole on a configuration reload; each connection takes the current one.
    pub session: std::cell::RefCell<Rc<SessionConfig>>,
    pub acceptor: Option<TlsAcceptor>,
}

/// Read size while reading commands; small so idle sessions stay small.
const READ_COMMANDS: usize = 4 * 1024;
/// Read size of an idle session's first read (the size of the shard's scratch buffer
/// before body reads went through it too).
const READ_IDLE: usize = 16 * 1024;
/// Read size while receiving a body; the shard's scratch buffer is this large.
pub const READ_BODY: usize = 64 * 1024;
/// A body read goes into the room left in the receive buffer's allocation; when there is
/// none, at least this much is reserved. A fresh allocation per read would pin one
/// allocation per TCP segment, since the body slices handed to the session share it (a
/// client sending its body in tiny segments once made each byte cost ~6 KiB of memory).
const MIN_BODY_ROOM: usize = 4 * 1024;
/// Replies held before they are written even though pipelined input is left.
const OUTPUT_LIMIT: usize = 8 * 1024;

/// Releases the shard's connection counters when a connection ends, however it ends.
struct ConnGuard {
    shard: Rc<Shard>,
    ip: IpAddr,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.shard.release_connection(self.ip);
    }
}

/// Serves one accepted connection to completion. `sock_peer` is the socket's peer: the
/// client, or a load balancer that says who the client is in a PROXY header.
pub async fn serve(
    mut stream: TcpStream,
    sock_peer: SocketAddr,
    lst: Rc<ListenerCtx>,
    shard: Rc<Shard>,
) {
    // Without TCP_NODELAY, small replies wait for delayed ACKs (~40 ms per round trip).
    let _ = stream.set_nodelay(true);
    let session_cfg = lst.session.borrow().clone();
    let kind = session_cfg.kind;
    let (stream, peer) = if shard.from_balancer(sock_peer.ip()) {
        // Boxed: only proxied connections carry the header reader's state.
        match Box::pin(proxy_header(&mut stream, sock_peer, &shard, kind)).await {
            Some((client, rest)) => (Prefixed::new(stream, rest), client),
            None => return, // logged; no banner
        }
    } else {
        (Prefixed::new(stream, Vec::new()), sock_peer)
    };
    if let Err(why) = shard.admit_connection(peer.ip()) {
        tracing::info!(shard = shard.id, %peer, listener = kind.name(), "refused: {why}");
        // A draining or stopping node is a temporary condition of this node (4.3.2: the
        // client tries another); too many connections is a policy limit (4.7.0).
        let enhanced = if why == DRAINING || shard.stopping.fired() {
            "4.3.2"
        } else {
            "4.7.0"
        };
        let mut out = BytesMut::new();
        reply::line(
            &mut out,
            421,
            enhanced,
            &format!("{} Error: {why}, try again later", session_cfg.hostname),
        );
        if kind != ListenerKind::Smtps {
            let mut s = stream;
            let _ = timed(shard.idle_timeout, s.write_all(&out)).await;
        } else if why == DRAINING {
            // On 465 the 421 can only be read inside TLS; a drain is rare and short, so
            // the handshake is worth it (a client sees a clear answer, not a reset).
            if let Some(mut tls) = Box::pin(handshake(&lst, stream, &shard)).await {
                let _ = timed(shard.idle_timeout, async {
                    tls.write_all(&out).await?;
                    tls.close().await
                })
                .await;
            }
        }
        return;
    }
    let _guard = ConnGuard {
        shard: shard.clone(),
        ip: peer.ip(),
    };
    shard.metrics.connection();
    if peer == sock_peer {
        tracing::info!(shard = shard.id, %peer, listener = kind.name(), "connect");
    } else {
        tracing::info!(shard = shard.id, %peer, balancer = %sock_peer, listener = kind.name(), "connect");
    }
    let started = Instant::now();
    // None without filters for this listener: nothing below costs anything then.
    let mut milters = shard.milters.session(kind, &session_cfg.hostname);
    let mut session = Session::new(
        session_cfg,
        peer,
        kind == ListenerKind::Smtps,
        crate::clock::now(),
    );
    // The TLS paths are boxed so that a plain connection's task carries only its own
    // state (memory per idle connection is bounded and small).
    let result = match kind {
        ListenerKind::Smtps => match Box::pin(handshake(&lst, stream, &shard)).await {
            Some(tls) => {
                if let Some(m) = milters.as_mut() {
                    m.set_tls(tls_info(tls.get_ref().1));
                }
                Box::pin(run(tls, &mut session, &shard, true, &mut milters))
                    .await
                    .map(|_| ())
            }
            None => Ok(()),
        },
        _ => match run(stream, &mut session, &shard, true, &mut milters).await {
            Ok(Outcome::StartTls(plain)) => match Box::pin(handshake(&lst, plain, &shard)).await {
                Some(tls) => {
                    session.tls_started();
                    if let Some(m) = milters.as_mut() {
                        m.set_tls(tls_info(tls.get_ref().1));
                    }
                    Box::pin(run(tls, &mut session, &shard, false, &mut milters))
                        .await
                        .map(|_| ())
                }
                None => Ok(()),
            },
            Ok(Outcome::Done) => Ok(()),
            Err(e) => Err(e),
        },
    };
    if let Some(m) = milters.as_mut() {
        // Filter connections that may carry another session go back to the shard's pool.
        m.finish(&shard.milters);
    }
    match result {
        Ok(()) => tracing::info!(
            shard = shard.id,
            %peer,
            messages = session.messages(),
            secs = started.elapsed().as_secs_f64(),
            "disconnect"
        ),
        Err(e) => tracing::info!(
            shard = shard.id,
            %peer,
            messages = session.messages(),
            error = %e,
            "disconnect after error"
        ),
    }
}

async fn handshake<S>(
    lst: &ListenerCtx,
    stream: S,
    shard: &Shard,
) -> Option<futures_rustls::server::TlsStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    lst.acceptor.as_ref()?; // TLS offered on this listener at all
    let acceptor = shard.tls.borrow().clone();
    let r = timed(shard.idle_timeout, acceptor.accept(stream)).await;
    shard.metrics.tls(matches!(r, Some(Ok(_))));
    match r {
        Some(Ok(tls)) => Some(tls),
        Some(Err(e)) => {
            tracing::info!(shard = shard.id, error = %e, "TLS handshake failed");
            None
        }
        None => {
            tracing::info!(shard = shard.id, "TLS handshake timed out");
            None
        }
    }
}

enum Outcome<S> {
    Done,
    StartTls(S),
}

enum Wake {
    Read(std::io::Result<usize>),
    Timeout,
    Stop,
}

/// Runs the session over `io` until it closes or asks for STARTTLS. The receive buffer
/// is local: returning for STARTTLS drops whatever plaintext the client pipelined.
async fn run<S>(
    mut io: S,
    session: &mut Session,
    shard: &Shard,
    greet: bool,
    milters: &mut Option<crate::milter::MilterSession>,
) -> std::io::Result<Outcome<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut inbuf = BytesMut::new();
    let mut out = BytesMut::with_capacity(512);
    if greet {
        if let Some(m) = milters.as_mut() {
            // The filters' connect stage, before the banner (the real client's address,
            // after a PROXY header). A refusal ends the session with its reply.
            let peer = session.peer();
            if let Some(r) = Box::pin(m.connect(&shard.milters, shard.id, peer)).await {
                tracing::info!(shard = shard.id, %peer, code = r.code, text = %r.text,
                    "connection refused by milter");
                let code = if r.code >= 500 { 554 } else { 421 };
                reply::line(&mut out, code, &r.enhanced, &r.text);
                flush(&mut io, &mut out, shard).await?;
                let _ = io.close().await;
                return Ok(Outcome::Done);
            }
            // HELO/MAIL/RCPT wait for the filters only if one of them takes those stages.
            if m.checks_commands() {
                session.filter_commands();
            }
        }
        session.greeting(&mut out);
    }
    session.set_output_limit(OUTPUT_LIMIT);
    let mut stop = shard.stopping.wait();
    let mut grace_deadline: Option<Instant> = None;
    // The client must complete its next request by then (see the module docs).
    let mut deadline = Instant::now() + shard.idle_timeout;
    // A reply was written since the last wait: a request was completed.
    let mut replied = false;
    loop {
        match session.process(&mut inbuf, &mut out, crate::clock::now()) {
            Event::NeedInput => {
                if session.take_output_full() {
                    // PIPELINING backpressure: write what is due before reading on.
                    replied |= flush(&mut io, &mut out, shard).await?;
                    continue;
                }
            }
            Event::Message(mut msg) => {
                // Let the client see the replies so far while the disk works.
                replied |= flush(&mut io, &mut out, shard).await?;
                let t0 = Instant::now();
                let mut given = None;
                let mut held = None;
                if let Some(m) = milters.as_mut() {
                    // The filters run before the message is signed, committed and
                    // acknowledged: the spool holds exactly what they accepted.
                    let id = m.take_queue_id().unwrap_or_else(|| shard.store.next_id());
                    let outcome =
                        Box::pin(m.filter(&shard.milters, shard.id, &mut msg, id.as_str())).await;
                    match outcome {
                        crate::milter::Outcome::Store { held: h } => {
                            given = Some(id);
                            held = h.map(|r| crate::milter::held_reason(&r));
                        }
                        crate::milter::Outcome::Discard { filter } => {
                            tracing::info!(shard = shard.id, id = %id, milter = %filter,
                                from = %msg.envelope.sender, "discarded by milter");
                            session.filtered(
                                250,
                                "2.0.0",
                                &format!("Ok: queued as {id}"),
                                &msg.envelope,
                                &mut out,
                            );
                            continue;
                        }
                        crate::milter::Outcome::Refuse(r) => {
                            session.filtered(r.code, &r.enhanced, &r.text, &msg.envelope, &mut out);
                            continue;
                        }
                    }
                }
                let id = shard.store.store_as(&mut msg, given, held.as_deref()).await;
                match &id {
                    Ok(id) => {
                        shard.metrics.accepted(t0.elapsed());
                        tracing::info!(
                        shard = shard.id,
                        id = %id,
                        from = %msg.envelope.sender,
                        size = msg.envelope.size,
                        nrcpt = msg.envelope.recipients.len(),
                        "accepted"
                        )
                    }
                    Err(e) => tracing::warn!(shard = shard.id, error = ?e, "message not stored"),
                }
                session.stored(id.as_ref().map(|i| i.as_str()).map_err(|e| *e), &mut out);
                continue;
            }
            Event::Check(check) => {
                // HELO/MAIL/RCPT through the filters before the session answers it.
                let refusal = match milters.as_mut() {
                    None => None,
                    Some(m) => match check {
                        Check::Helo(name) => {
                            Box::pin(m.helo(&shard.milters, shard.id, &name)).await
                        }
                        Check::Mail(sender) => {
                            let id = shard.store.next_id();
                            let login = session.login();
                            Box::pin(m.mail(&shard.milters, shard.id, id, &sender, login)).await
                        }
                        Check::Rcpt(addr) => {
                            Box::pin(m.rcpt(&shard.milters, shard.id, &addr)).await
                        }
                    },
                };
                session.checked(
                    refusal
                        .as_ref()
                        .map(|r| (r.code, r.enhanced.as_str(), r.text.as_str())),
                    &mut out,
                );
                continue;
            }
            Event::Etrn(node) => {
                // A queue run on every shard: the node's mail may sit on any of them.
                let n = shard.store.runner().flush();
                shard.peers.broadcast_flush();
                tracing::info!(shard = shard.id, node = %node, scheduled_here = n, "ETRN");
                session.etrn_started(&node, n, &mut out);
                continue;
            }
            Event::StartTls => {
                flush(&mut io, &mut out, shard).await?;
                return Ok(Outcome::StartTls(io));
            }
            Event::Close => {
                if let Some(d) = session.take_delay() {
                    Timer::new(d).await;
                }
                flush(&mut io, &mut out, shard).await?;
                let _ = io.close().await;
                return Ok(Outcome::Done);
            }
        }
        if shard.stopping.fired() && !session.in_transaction() {
            session.shutdown(&mut out);
            continue;
        }
        if let Some(d) = session.take_delay() {
            // AUTH tarpit: only failed attempts get here.
            Timer::new(d).await;
        }
        replied |= flush(&mut io, &mut out, shard).await?;
        if std::mem::take(&mut replied) {
            deadline = Instant::now() + shard.idle_timeout;
        }

        // Wait for input, the request deadline, or the stop signal.
        let mut wait = deadline.saturating_duration_since(Instant::now());
        if let Some(d) = grace_deadline {
            wait = wait.min(d.saturating_duration_since(Instant::now()));
        }
        let len = inbuf.len();
        // Every read goes through the shard's scratch buffer (zeroed once, when the shard
        // started) and only the bytes that arrived are copied into `inbuf`: growing
        // `inbuf` by a zero-filled read window cost a memset of up to `READ_BODY` per read
        // (and a fresh 64 KiB allocation per small message). Between commands with nothing
        // buffered (the idle case), hold no receive or reply buffer while waiting.
        let idle = len == 0 && !session.in_transaction();
        let (want, min_room) = if idle {
            inbuf = BytesMut::new();
            out = BytesMut::new();
            (READ_IDLE, 0)
        } else if session.in_transaction() {
            (READ_BODY, MIN_BODY_ROOM)
        } else {
            (READ_COMMANDS, 0)
        };
        let stopping = grace_deadline.is_some();
        let scratch = &shard.scratch;
        let woke = future::or(
            async {
                Wake::Read(read_via_scratch(&mut io, scratch, want, min_room, &mut inbuf).await)
            },
            future::or(
                async {
                    Timer::new(wait).await;
                    Wake::Timeout
                },
                async {
                    if stopping {
                        future::pending::<()>().await;
                    }
                    (&mut stop).await;
                    Wake::Stop
                },
            ),
        )
        .await;
        match woke {
            Wake::Read(Ok(0)) => {
                return Ok(Outcome::Done);
            }
            Wake::Read(Ok(n)) => {
                deadline = extend_deadline(deadline, n, shard);
            }
            Wake::Read(Err(e)) => return Err(e),
            Wake::Timeout => {
                let now = Instant::now();
                if grace_deadline.is_some_and(|d| now >= d) {
                    session.shutdown(&mut out);
                } else if now >= deadline {
                    session.timeout(&mut out);
                }
            }
            Wake::Stop => {
                if session.in_transaction() {
                    grace_deadline = Some(Instant::now() + shard.grace);
                } else {
                    session.shutdown(&mut out);
                }
            }
        }
    }
}

/// Reads the PROXY header a balancer sends first (`sock_peer` is the balancer), within
/// `limits.proxy_timeout`, however it is split over TCP segments. Returns the client's
/// address (the balancer's own for v2 LOCAL health checks and v1 UNKNOWN) and the bytes
/// that arrived after the header; None (logged with the balancer's address) closes the
/// connection without a banner.
async fn proxy_header(
    stream: &mut TcpStream,
    sock_peer: SocketAddr,
    shard: &Shard,
    kind: ListenerKind,
) -> Option<(SocketAddr, Vec<u8>)> {
    use tern_smtp::proxy::{parse, Parse, Version};
    let mut buf: Vec<u8> = Vec::with_capacity(256);
    let mut chunk = [0u8; 1024];
    let read = async {
        loop {
            match parse(&buf) {
                Ok(Parse::Incomplete) => {}
                Ok(Parse::Done { header, len }) => {
                    let client = header.source().unwrap_or(sock_peer);
                    let version = match header.version {
                        Version::V1 => "v1",
                        Version::V2 => "v2",
                    };
                    // The `connect` line names client and balancer; the header's details
                    // are for debugging only (one log line per connection, not two).
                    let alpn = header.tlvs.alpn.map(String::from_utf8_lossy);
                    tracing::debug!(
                        shard = shard.id,
                        client = %client,
                        balancer = %sock_peer,
                        listener = kind.name(),
                        proxy = version,
                        local = header.source().is_none(),
                        alpn = alpn.as_deref().unwrap_or(""),
                        "proxied connection"
                    );
                    buf.drain(..len);
                    return Ok((client, buf));
                }
                Err(e) => return Err(e.to_string()),
            }
            match stream.read(&mut chunk).await {
                Ok(0) => return Err("connection closed before the end of the header".into()),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(e.to_string()),
            }
        }
    };
    let why = match timed(shard.proxy_timeout, read).await {
        Some(Ok(v)) => return Some(v),
        Some(Err(why)) => why,
        None => format!(
            "no complete header within {}",
            humantime::format_duration(shard.proxy_timeout)
        ),
    };
    tracing::info!(
        shard = shard.id,
        balancer = %sock_peer,
        listener = kind.name(),
        "PROXY header refused, connection closed: {why}"
    );
    None
}

/// A stream whose first bytes were already read (what followed a PROXY header): they are
/// read again first, then the stream itself. Writes go straight through.
pub struct Prefixed<S> {
    prefix: bytes::Bytes,
    inner: S,
}

impl<S> Prefixed<S> {
    fn new(inner: S, prefix: Vec<u8>) -> Self {
        Prefixed {
            prefix: prefix.into(),
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut [u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.len());
            buf[..n].copy_from_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return std::task::Poll::Ready(Ok(n));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_close(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_close(cx)
    }
}

/// Reads at most `want` bytes once through the shard's scratch buffer and appends what
/// arrived to `inbuf`; when `inbuf`'s allocation has no room for it, at least `min_room`
/// bytes are reserved (never zeroed). The scratch is borrowed only inside `poll_read`
/// (glommio and rustls use the buffer only during the poll), never across an await, so
/// every connection of the shard can share it; a read cancelled by the timer leaves
/// `inbuf` untouched.
async fn read_via_scratch<S: AsyncRead + Unpin>(
    io: &mut S,
    scratch: &std::cell::RefCell<Box<[u8]>>,
    want: usize,
    min_room: usize,
    inbuf: &mut BytesMut,
) -> std::io::Result<usize> {
    std::future::poll_fn(|cx| {
        let mut buf = scratch.borrow_mut();
        let want = want.min(buf.len());
        match std::pin::Pin::new(&mut *io).poll_read(cx, &mut buf[..want]) {
            std::task::Poll::Ready(Ok(n)) => {
                // Fill the room left in the current allocation first: body slices keep
                // their allocation alive, so a fresh one per read would pin memory per
                // tiny TCP segment.
                if inbuf.capacity() - inbuf.len() < n {
                    inbuf.reserve(n.max(min_room));
                }
                inbuf.extend_from_slice(&buf[..n]);
                std::task::Poll::Ready(Ok(n))
            }
            other => other,
        }
    })
    .await
}

/// The request deadline after `n` more bytes arrived: `n / min_data_rate` seconds later,
/// but never more than `idle_timeout` from now (a rate of 0 restores a plain idle timer).
fn extend_deadline(deadline: Instant, n: usize, shard: &Shard) -> Instant {
    let now = Instant::now();
    let cap = now + shard.idle_timeout;
    if shard.min_data_rate == 0 {
        return cap;
    }
    let earned = Duration::from_secs_f64(n as f64 / shard.min_data_rate as f64);
    deadline
        .max(now)
        .checked_add(earned)
        .unwrap_or(cap)
        .min(cap)
}

/// Writes `out` (bounded by the idle timeout); true if there was anything to write.
async fn flush<S: AsyncWrite + Unpin>(
    io: &mut S,
    out: &mut BytesMut,
    shard: &Shard,
) -> std::io::Result<bool> {
    if out.is_empty() {
        return Ok(false);
    }
    // A client that never reads its replies must not hold the session forever.
    let r = timed(shard.idle_timeout, async {
        io.write_all(out).await?;
        io.flush().await
    })
    .await;
    out.clear();
    match r {
        Some(r) => r.map(|()| true),
        None => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "write timed out",
        )),
    }
}

/// The milter macros `{tls_version}` and `{cipher}` of an established TLS session.
fn tls_info(c: &rustls::ServerConnection) -> crate::milter::TlsInfo {
    let version = match c.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_string(),
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_string(),
        Some(v) => format!("{v:?}"),
        None => String::new(),
    };
    let cipher = c
        .negotiated_cipher_suite()
        .and_then(|s| s.suite().as_str())
        .unwrap_or("")
        .to_string();
    crate::milter::TlsInfo { version, cipher }
}

/// Runs `f` for at most `d`.
async fn timed<F: std::future::Future>(d: Duration, f: F) -> Option<F::Output> {
    future::or(async { Some(f.await) }, async {
        Timer::new(d).await;
        None
    })
    .await
}
