//! `tern-loadgen milter-noop`: a milter (filter side, protocol 6) that accepts everything,
//! for measuring what the milter protocol itself costs an MTA.
//!
//! `--stages all` negotiates every stage with a reply to each (the most round trips a
//! filter can ask for: CONNECT, HELO, MAIL, each RCPT, DATA, each header, EOH, each body
//! chunk, end-of-message); `--stages eom` declines every stage but end-of-message (one
//! round trip per message). Either way it asks for no edits and answers "continue".
//!
//! One thread per connection with blocking sockets: the filter's own cost is not what is
//! measured (run it on its own core with `taskset`). Listens on TCP, or with `--unix PATH`
//! on a unix socket. Prints `listening: ADDR` (`listening: unix:PATH`) on stderr, and on
//! SIGINT/SIGTERM a summary on stdout: connections, messages (end-of-message packets) and
//! replies (every answer sent but the negotiation's: the round trips the MTA waited for,
//! which divided by messages is the conversation's round trips per message).
//!
//! SECURITY: a test tool; it refuses a non-loopback listen address unless
//! `--allow-remote`, and reads at most 1 MiB + 5 bytes per packet.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stages {
    /// Every stage, each answered.
    All,
    /// End-of-message only.
    Eom,
}

#[derive(clap::Args, Debug, Clone)]
pub struct MilterNoopArgs {
    /// Address to listen on (port 0: any free port; see the `listening:` line on stderr).
    #[arg(long, default_value = "127.0.0.1:8899")]
    listen: SocketAddr,
    /// Which stages to negotiate.
    #[arg(long, value_enum, default_value = "all")]
    stages: Stages,
    /// Allow a non-loopback listen address.
    #[arg(long)]
    allow_remote: bool,
    /// Listen on this unix socket instead (a stale socket file there is replaced).
    #[arg(long)]
    unix: Option<std::path::PathBuf>,
}

/// SMFIP_NOCONNECT | NOHELO | NOMAIL | NORCPT | NOBODY | NOHDRS | NOEOH | NOUNKNOWN | NODATA.
const ONLY_EOM: u32 = 0x1 | 0x2 | 0x4 | 0x8 | 0x10 | 0x20 | 0x40 | 0x100 | 0x200;
const MAX_PACKET: usize = (1 << 20) + 5;

pub fn run(a: MilterNoopArgs, stop: Arc<AtomicBool>) -> Result<(), String> {
    if !a.listen.ip().is_loopback() && !a.allow_remote {
        return Err(format!(
            "{}: not a loopback address (use --allow-remote)",
            a.listen
        ));
    }
    let protocol = match a.stages {
        Stages::All => 0,
        Stages::Eom => ONLY_EOM,
    };
    let conns = Arc::new(AtomicU64::new(0));
    let counts = Arc::new(Counts::default());
    enum L {
        Tcp(TcpListener),
        Unix(UnixListener),
    }
    let l = match &a.unix {
        Some(p) => {
            use std::os::unix::fs::FileTypeExt;
            if std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket()) {
                let _ = std::fs::remove_file(p);
            }
            let l = UnixListener::bind(p).map_err(|e| format!("bind {}: {e}", p.display()))?;
            eprintln!("listening: unix:{}", p.display());
            L::Unix(l)
        }
        None => {
            let l = TcpListener::bind(a.listen).map_err(|e| format!("bind {}: {e}", a.listen))?;
            eprintln!("listening: {}", l.local_addr().map_err(|e| e.to_string())?);
            L::Tcp(l)
        }
    };
    match &l {
        L::Tcp(l) => l.set_nonblocking(true),
        L::Unix(l) => l.set_nonblocking(true),
    }
    .map_err(|e| e.to_string())?;
    while !stop.load(Ordering::Relaxed) {
        let r = match &l {
            L::Tcp(l) => l.accept().map(|(s, _)| {
                let _ = s.set_nonblocking(false);
                let _ = s.set_nodelay(true);
                Box::new(s) as Box<dyn ReadWrite>
            }),
            L::Unix(l) => l.accept().map(|(s, _)| {
                let _ = s.set_nonblocking(false);
                Box::new(s) as Box<dyn ReadWrite>
            }),
        };
        match r {
            Ok(s) => {
                conns.fetch_add(1, Ordering::Relaxed);
                let counts = counts.clone();
                std::thread::spawn(move || {
                    let _ = serve(s, protocol, &counts);
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(format!("accept: {e}")),
        }
    }
    if let Some(p) = &a.unix {
        let _ = std::fs::remove_file(p);
    }
    println!(
        "connections {} messages {} replies {}",
        conns.load(Ordering::Relaxed),
        counts.messages.load(Ordering::Relaxed),
        counts.replies.load(Ordering::Relaxed)
    );
    Ok(())
}

trait ReadWrite: Read + Write + Send {}
impl<T: Read + Write + Send> ReadWrite for T {}

#[derive(Default)]
struct Counts {
    messages: AtomicU64,
    replies: AtomicU64,
}

fn packet(code: u8, data: &[u8]) -> Vec<u8> {
    let mut p = ((data.len() + 1) as u32).to_be_bytes().to_vec();
    p.push(code);
    p.extend_from_slice(data);
    p
}

fn serve(mut s: Box<dyn ReadWrite>, protocol: u32, counts: &Counts) -> std::io::Result<()> {
    let cont = packet(b'c', b"");
    let mut buf = Vec::new();
    loop {
        let mut len = [0u8; 4];
        s.read_exact(&mut len)?;
        let n = u32::from_be_bytes(len) as usize;
        if n == 0 || n > MAX_PACKET {
            return Ok(());
        }
        buf.resize(n, 0);
        s.read_exact(&mut buf)?;
        let reply = match buf[0] {
            b'O' => {
                let mut d = 6u32.to_be_bytes().to_vec();
                d.extend_from_slice(&0u32.to_be_bytes()); // no edits
                d.extend_from_slice(&protocol.to_be_bytes());
                Some(packet(b'O', &d))
            }
            // Macros, abort: no reply. Quit: done.
            b'D' | b'A' | b'K' => None,
            b'Q' => return Ok(()),
            b'E' => {
                counts.messages.fetch_add(1, Ordering::Relaxed);
                counts.replies.fetch_add(1, Ordering::Relaxed);
                Some(cont.clone())
            }
            _ => {
                counts.replies.fetch_add(1, Ordering::Relaxed);
                Some(cont.clone())
            }
        };
        if let Some(r) = reply {
            s.write_all(&r)?;
        }
    }
}
