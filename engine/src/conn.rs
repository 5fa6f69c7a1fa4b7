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
//! Must never: act on input received before a TLS handshake after it, let a slow or
//! silent client hold the shard (every wait is bounded by a timer), or grow the receive
//! buffer past what the session's limits allow.

use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_lite::future;
use futures_lite::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use futures_rustls::TlsAcceptor;
use glommio::net::TcpStream;
use glommio::timer::Timer;

use crate::shard::Shard;
use tern_smtp::session::{reply, Event, ListenerKind, Session, SessionConfig};

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

/// Serves one accepted connection to completion.
pub async fn serve(stream: TcpStream, peer: SocketAddr, lst: Rc<ListenerCtx>, shard: Rc<Shard>) {
    // Without TCP_NODELAY, small replies wait for delayed ACKs (~40 ms per round trip).
    let _ = stream.set_nodelay(true);
    let session_cfg = lst.session.borrow().clone();
    let kind = session_cfg.kind;
    if let Err(why) = shard.admit_connection(peer.ip()) {
        tracing::info!(shard = shard.id, %peer, listener = kind.name(), "refused: {why}");
        if kind != ListenerKind::Smtps {
            let mut out = BytesMut::new();
            reply::line(
                &mut out,
                421,
                "4.7.0",
                &format!("{} Error: {why}, try again later", session_cfg.hostname),
            );
            let mut s = stream;
            let _ = timed(shard.idle_timeout, s.write_all(&out)).await;
        }
        return;
    }
    let _guard = ConnGuard {
        shard: shard.clone(),
        ip: peer.ip(),
    };
    shard.metrics.connection();
    tracing::info!(shard = shard.id, %peer, listener = kind.name(), "connect");
    let started = Instant::now();
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
            Some(tls) => Box::pin(run(tls, &mut session, &shard, true))
                .await
                .map(|_| ()),
            None => Ok(()),
        },
        _ => match run(stream, &mut session, &shard, true).await {
            Ok(Outcome::StartTls(plain)) => match Box::pin(handshake(&lst, plain, &shard)).await {
                Some(tls) => {
                    session.tls_started();
                    Box::pin(run(tls, &mut session, &shard, false))
                        .await
                        .map(|_| ())
                }
                None => Ok(()),
            },
            Ok(Outcome::Done) => Ok(()),
            Err(e) => Err(e),
        },
    };
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
) -> std::io::Result<Outcome<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut inbuf = BytesMut::new();
    let mut out = BytesMut::with_capacity(512);
    if greet {
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
                let id = shard.store.store(&mut msg).await;
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

/// Runs `f` for at most `d`.
async fn timed<F: std::future::Future>(d: Duration, f: F) -> Option<F::Output> {
    future::or(async { Some(f.await) }, async {
        Timer::new(d).await;
        None
    })
    .await
}
