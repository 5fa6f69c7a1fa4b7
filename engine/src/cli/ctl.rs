//! `tern ctl`: status, reload, stop, log level (and, later, drain) against a running server.
//!
//! Owns: the `ctl` command line and printing its answers. Must never: reach into the
//! server: it speaks the admin protocol (`tern_engine::admin::proto`) like any client.

use std::path::PathBuf;

use serde_json::Value;
use tern_engine::admin::proto::{call, Request};
use tern_engine::config::Config;

/// Where `tern ctl` goes: `--socket`, or the admin socket of `--config` (or defaults).
#[derive(clap::Args, Clone, Debug)]
pub struct CtlTarget {
    /// The server's admin socket.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Configuration file naming admin.socket (default: built-in defaults).
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
}

#[derive(clap::Subcommand)]
pub enum CtlCmd {
    /// Shards, connections and queue sizes per shard.
    Status {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: CtlTarget,
    },
    /// Reload the user store (what SIGHUP does).
    Reload {
        #[command(flatten)]
        target: CtlTarget,
    },
    /// Stop gracefully (what SIGTERM does): no new connections, sessions drain.
    Stop {
        #[command(flatten)]
        target: CtlTarget,
    },
    /// Stop taking new connections (421 4.3.2, /healthz 503) while open sessions finish
    /// and the queue keeps delivering: before a rolling restart behind a balancer.
    Drain {
        #[command(flatten)]
        target: CtlTarget,
    },
    /// Take new connections again after `drain`.
    Undrain {
        #[command(flatten)]
        target: CtlTarget,
    },
    /// Per-login messages and recipients counted in the current rate windows
    /// (auth.user_message_rate, auth.user_recipient_rate), across all shards.
    Limits {
        /// Only this login.
        user: Option<String>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: CtlTarget,
    },
    /// Change the log filter at run time, e.g. debug, info, "info,tern_queue=debug".
    LogLevel {
        level: String,
        #[command(flatten)]
        target: CtlTarget,
    },
}

/// `tern ctl ...`.
pub fn run(cmd: CtlCmd) -> std::process::ExitCode {
    let (target, req, json) = match cmd {
        CtlCmd::Status { json, target } => (target, Request::Status, json),
        CtlCmd::Reload { target } => (target, Request::Reload, false),
        CtlCmd::Stop { target } => (target, Request::Stop, false),
        CtlCmd::Drain { target } => (target, Request::Drain, false),
        CtlCmd::Undrain { target } => (target, Request::Undrain, false),
        CtlCmd::Limits { user, json, target } => (target, Request::Limits { user }, json),
        CtlCmd::LogLevel { level, target } => (target, Request::LogLevel { level }, false),
    };
    let path = match target.socket {
        Some(p) => p,
        None => match Config::load(target.config.as_deref(), &[]) {
            Ok(c) => c.admin_socket(),
            Err(e) => {
                eprintln!("tern ctl: {e}");
                return std::process::ExitCode::from(78); // EX_CONFIG
            }
        },
    };
    let v = match call(&path, &req) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("tern ctl: {e}");
            return std::process::ExitCode::from(e.exit_code());
        }
    };
    let n = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    match req {
        _ if json => println!("{v}"),
        Request::Status => {
            let shards = v["shards"].as_array().cloned().unwrap_or_default();
            let draining = shards.iter().any(|s| s["draining"].as_bool() == Some(true));
            println!(
                "tern {} pid {} up {}s, {} shards, log level {}{}",
                v["version"].as_str().unwrap_or("?"),
                n(&v, "pid"),
                n(&v, "uptime_secs"),
                shards.len(),
                v["log_level"].as_str().unwrap_or("(as configured)"),
                if draining { ", DRAINING" } else { "" }
            );
            if let Some(c) = v.get("cluster").filter(|c| c.is_object()) {
                println!(
                    "cluster: redis {} {} ({} fallback(s), {} round trip(s), {} counted, {} counted locally only)",
                    c["redis"].as_str().unwrap_or("?"),
                    if c["up"].as_bool() == Some(true) {
                        "up"
                    } else {
                        "DOWN: counting locally"
                    },
                    n(c, "fallbacks"),
                    n(c, "round_trips"),
                    n(c, "ops"),
                    n(c, "dropped")
                );
            }
            let u = &v["userstore"];
            if u.is_object() {
                let age = u["snapshot_age_secs"]
                    .as_f64()
                    .map_or("none".to_string(), |a| format!("{a:.1}s old"));
                let state = if u["fallback"].as_bool() == Some(true) {
                    if u["loaded"].as_bool() == Some(true) {
                        "FALLBACK: database unreachable, AUTH from the last snapshot"
                    } else {
                        "FALLBACK: database unreachable and no snapshot yet, AUTH answers 454"
                    }
                } else {
                    "up"
                };
                println!(
                    "user store {} ({}): {state}; {} user(s), snapshot {age}",
                    u["source"].as_str().unwrap_or("?"),
                    u["kind"].as_str().unwrap_or("?"),
                    n(u, "users"),
                );
            }
            println!(
                "{:>5} {:>11} {:>9} {:>9}",
                "SHARD", "CONNECTIONS", "QUEUED", "SENDING"
            );
            for s in &shards {
                println!(
                    "{:>5} {:>11} {:>9} {:>9}",
                    n(s, "shard"),
                    n(s, "connections"),
                    n(s, "queued"),
                    n(s, "in_flight")
                );
            }
        }
        Request::Reload => println!("user store reloaded: {} user(s)", n(&v, "users")),
        Request::Stop => println!("stopping: no new connections, sessions draining"),
        Request::Drain => println!(
            "draining: new connections refused, {} open session(s) finishing, delivery goes on",
            n(&v, "sessions")
        ),
        Request::Undrain => println!("undrained: taking new connections"),
        Request::Limits { .. } => {
            let rate = |k: &str| v[k].as_str().unwrap_or("unlimited").to_string();
            println!(
                "message rate {}, recipient rate {}",
                rate("message_rate"),
                rate("recipient_rate")
            );
            if let Some(e) = v["cluster_error"].as_str() {
                println!("cluster counts unavailable (counting locally): {e}");
            }
            println!(
                "{:<40} {:>9} {:>11}  CLUSTER (MESSAGES/RECIPIENTS IN REDIS)",
                "USER", "MESSAGES", "RECIPIENTS"
            );
            for u in v["users"].as_array().into_iter().flatten() {
                let over = |k: &str| u[k].as_bool() == Some(true);
                let cluster = match (u.get("cluster_messages"), u.get("cluster_recipients")) {
                    (Some(m), Some(r)) => {
                        format!("{}/{} ", m.as_u64().unwrap_or(0), r.as_u64().unwrap_or(0))
                    }
                    _ => String::new(),
                };
                println!(
                    "{:<40} {:>9} {:>11}  {cluster}{}",
                    u["user"].as_str().unwrap_or("?"),
                    u["messages"].as_f64().unwrap_or(0.0),
                    u["recipients"].as_f64().unwrap_or(0.0),
                    match (
                        over("cluster_over_messages"),
                        over("cluster_over_recipients")
                    ) {
                        (true, true) => "over message and recipient rates",
                        (true, false) => "over message rate",
                        (false, true) => "over recipient rate",
                        (false, false) => "-",
                    }
                );
            }
        }
        Request::LogLevel { .. } => {
            println!("log level: {}", v["level"].as_str().unwrap_or("?"))
        }
        _ => println!("{v}"),
    }
    std::process::ExitCode::SUCCESS
}
