//! `tern queue ...`: the queue tools (offline, on a spool directory).
//!
//! Reads the spool through `tern_queue::scan_spool`, which never modifies it, so it is safe
//! to run next to a live server. Must never write to the spool.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;

#[derive(Subcommand)]
pub enum QueueCmd {
    /// List queued messages (like mailq): id, size, age, sender, recipients.
    List {
        /// The spool directory.
        #[arg(long, default_value = "spool")]
        spool: PathBuf,
        /// One JSON object per line instead of columns.
        #[arg(long)]
        json: bool,
        /// Also list messages that are completely delivered or bounced (until their
        /// segment is recycled), with every recipient's state.
        #[arg(long)]
        all: bool,
    },
}

pub fn run(cmd: QueueCmd) -> ExitCode {
    match cmd {
        QueueCmd::List { spool, json, all } => list(&spool, json, all),
    }
}

fn list(spool: &std::path::Path, json: bool, all: bool) -> ExitCode {
    use tern_queue::RcptState;
    let msgs = match tern_queue::scan_spool_with_state(spool) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("tern queue list: {}: {e}", spool.display());
            return ExitCode::from(66); // EX_NOINPUT
        }
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    if !json {
        println!(
            "{:<16} {:>9} {:>8}  {:<30} RECIPIENTS",
            "ID", "SIZE", "AGE", "SENDER"
        );
    }
    let mut shown = 0;
    for (m, states) in &msgs {
        let e = &m.envelope;
        let pending = states.iter().filter(|s| **s == RcptState::Pending).count();
        if pending == 0 && !all {
            continue;
        }
        shown += 1;
        let age = now.saturating_sub(e.arrival_unix_micros) / 1_000_000;
        let rcpts: Vec<String> = e
            .recipients
            .iter()
            .zip(states)
            .filter(|(_, s)| all || **s == RcptState::Pending)
            .map(|(r, s)| match (all, s) {
                (true, RcptState::Delivered) => format!("{} (delivered)", r.addr),
                (true, RcptState::Failed) => format!("{} (failed)", r.addr),
                _ => r.addr.clone(),
            })
            .collect();
        let sender = if e.sender.is_empty() {
            "<>"
        } else {
            e.sender.as_str()
        };
        if json {
            println!(
                "{{\"id\":{},\"size\":{},\"age_secs\":{},\"sender\":{},\"recipients\":[{}]}}",
                json_str(&e.id),
                e.size,
                age,
                json_str(sender),
                rcpts
                    .iter()
                    .map(|r| json_str(r))
                    .collect::<Vec<_>>()
                    .join(",")
            );
        } else {
            println!(
                "{:<16} {:>9} {:>8}  {:<30} {}",
                e.id,
                e.size,
                human_age(age),
                sender,
                rcpts.join(", ")
            );
        }
    }
    if !json {
        println!("-- {shown} message(s)");
    }
    ExitCode::SUCCESS
}

fn human_age(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 86400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

/// Minimal JSON string encoding (quotes, backslashes, control characters).
fn json_str(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}
