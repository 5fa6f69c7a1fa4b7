//! `relay`: messages over kept-alive sessions; one op per message.
//!
//! A worker keeps its session for `--msgs-per-conn` messages, then QUITs and opens a new
//! one (with AUTH if `--mech` is given). `accept` is measured from the first command of
//! the transaction (MAIL, or in open loop the intended send time) to the 250 after the
//! final dot (or after `BDAT ... LAST` with `--bdat`). With `--pipeline` MAIL, RCPT... and
//! DATA go in one write (RFC 2920 §3.1: DATA ends a command group).
//!
//! Every message carries `X-Tern-Loadgen-Sent: <unix nanos>` (wall clock at MAIL) so a
//! sink can compute the relay latency.

use std::fmt::Write as _;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use super::{authenticate, open, quit, Core, Session, Worker};
use crate::conn::OpError;

pub const SENT_HEADER: &str = "X-Tern-Loadgen-Sent";
const LINE: usize = 78; // 76 characters and CRLF

/// The filler from which message bodies are cut: `LINE`-byte lines.
pub fn filler(size: usize) -> Vec<u8> {
    let mut line = [b'x'; LINE];
    line[LINE - 2] = b'\r';
    line[LINE - 1] = b'\n';
    line.iter()
        .copied()
        .cycle()
        .take(size.div_ceil(LINE) * LINE)
        .collect()
}

pub fn unix_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// A message of exactly `size` bytes where possible (never less than its headers), ending
/// in CRLF, with no line starting with a dot (so no dot-stuffing is needed), and its
/// Message-ID.
fn build_message(core: &Core) -> (Vec<u8>, String) {
    let cfg = &core.cfg.relay;
    let seq = core.seq.get();
    core.seq.set(seq + 1);
    let nanos = unix_nanos();
    // The process id keeps two generators started at the same time (one per machine or
    // namespace, merged later) from ever sharing an id: the sink's duplicate count and
    // `--ids` diffs rely on one id per message.
    let id = format!(
        "<{nanos}.{}.{}.{seq}@tern-loadgen>",
        std::process::id(),
        core.index
    );
    let mut head = String::with_capacity(256);
    let _ = write!(
        head,
        "From: <{}>\r\nTo: <{}>\r\nSubject: tern-loadgen {}-{seq}\r\n\
         Message-ID: {id}\r\n{SENT_HEADER}: {nanos}\r\n\r\n",
        cfg.from,
        cfg.to.replace("{n}", "1"),
        core.index,
    );
    let mut msg = Vec::with_capacity(cfg.size.max(head.len()) + 8);
    msg.extend_from_slice(head.as_bytes());
    let rest = cfg.size.saturating_sub(msg.len());
    let full = rest / LINE * LINE;
    msg.extend_from_slice(&core.body[..full]);
    let part = rest - full;
    if part >= 3 {
        msg.extend(std::iter::repeat_n(b'y', part - 2));
        msg.extend_from_slice(b"\r\n");
    }
    (msg, id)
}

pub async fn op(
    core: &Core,
    w: &mut Worker,
    origin: Instant,
    measured: bool,
) -> Result<(), OpError> {
    let mut s = match w.session.take() {
        Some(s) => s,
        None => {
            let t = Instant::now();
            let mut s = open(core, w, measured).await?;
            if let Some(mech) = core.cfg.mech {
                let d = authenticate(core, &mut s, mech).await?;
                core.record(measured, "auth", d);
            }
            core.record(measured, "session_setup", t.elapsed());
            s
        }
    };
    let start = Instant::now();
    match transaction(core, &mut s, measured).await {
        Ok(()) => {
            core.record(measured, "accept", origin.elapsed());
            if core.cfg.open_loop {
                core.record(measured, "accept_service", start.elapsed());
            }
            s.msgs += 1;
            if s.msgs >= core.cfg.relay.msgs_per_conn {
                quit(s).await;
            } else {
                w.session = Some(s);
            }
            Ok(())
        }
        Err(e) => {
            if e.connection_usable() {
                w.session = Some(s);
            }
            Err(e)
        }
    }
}

async fn transaction(core: &Core, s: &mut Session, measured: bool) -> Result<(), OpError> {
    let cfg = &core.cfg.relay;
    let (mut msg, id) = build_message(core);
    let mut cmds = format!("MAIL FROM:<{}>\r\n", cfg.from);
    for n in 1..=cfg.rcpts {
        let _ = write!(
            cmds,
            "RCPT TO:<{}>\r\n",
            cfg.to.replace("{n}", &n.to_string())
        );
    }
    let c = &mut s.conn;
    if measured {
        core.stats.borrow_mut().bytes += msg.len() as u64;
    }
    if cfg.bdat {
        let mut chunk = format!("BDAT {} LAST\r\n", msg.len()).into_bytes();
        chunk.append(&mut msg);
        msg = chunk;
    } else {
        msg.extend_from_slice(b".\r\n");
    }

    // Envelope: MAIL, RCPT... (and DATA), pipelined or lock-step. `first_err` is the
    // first rejection; the transaction fails with it.
    let mut first_err: Option<u16> = None;
    if cfg.pipeline {
        let mut rcpt_ok = 0usize;
        if !cfg.bdat {
            cmds.push_str("DATA\r\n");
        }
        c.write_all(cmds.as_bytes()).await?;
        let r = c.read_reply().await?;
        if r.code != 250 {
            first_err = Some(r.code);
        }
        for _ in 0..cfg.rcpts {
            let r = c.read_reply().await?;
            if r.code == 250 || r.code == 251 {
                rcpt_ok += 1;
            } else {
                first_err.get_or_insert(r.code);
            }
        }
        if !cfg.bdat {
            let r = c.read_reply().await?;
            if r.code != 354 {
                return Err(OpError::Reply(first_err.unwrap_or(r.code)));
            }
            if first_err.is_some() || rcpt_ok == 0 {
                // DATA was accepted despite a rejection: end it empty.
                c.cmd(b".\r\n").await?;
                return Err(OpError::Reply(first_err.unwrap_or(554)));
            }
        }
    } else {
        let mut lines = cmds.split_inclusive("\r\n");
        let mail = lines.next().unwrap_or_default();
        c.cmd(mail.as_bytes()).await?.expect(250)?;
        for rcpt in lines {
            let r = c.cmd(rcpt.as_bytes()).await?;
            if r.code != 250 && r.code != 251 {
                first_err.get_or_insert(r.code);
            }
        }
        if first_err.is_none() && !cfg.bdat {
            let r = c.cmd(b"DATA\r\n").await?;
            if r.code != 354 {
                first_err = Some(r.code);
            }
        }
    }
    if let Some(code) = first_err {
        c.cmd(b"RSET\r\n").await?;
        return Err(OpError::Reply(code));
    }
    c.write_all(&msg).await?;
    // Noted before the reply is awaited: a timeout drops this future mid-read, and
    // such a message (outcome 0, unknown) is exactly the one a diff must show.
    let slot = cfg.ids.is_some().then(|| {
        let mut st = core.stats.borrow_mut();
        st.ids.push((0, id));
        st.ids.len() - 1
    });
    let reply = c.read_reply().await?;
    if let Some(i) = slot {
        core.stats.borrow_mut().ids[i].0 = reply.code;
    }
    reply.expect(250)?;
    Ok(())
}
