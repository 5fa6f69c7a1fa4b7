//! The `tern` command: `serve`, `demo`, `queue`, `ctl`, `check-config`, `stdio`, `dkim`,
//! `sendmail` (also when invoked as `sendmail`).
//!
//! Parses the command line, sets up logging, and hands over to the library. This file must
//! stay thin: anything with logic lives in a module of its own.

mod cli;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use tern_engine::admin::server::LogLevelFn;
use tern_engine::config::Config;
use tern_engine::server::{self, Ready};
use tern_engine::tls::Identity;

#[derive(Parser)]
#[command(
    name = "tern",
    version,
    about = "tern: a thread-per-core SMTP relay and submission server"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the server with a configuration file.
    Serve {
        /// The TOML configuration file.
        #[arg(long, short = 'c')]
        config: PathBuf,
        /// Override any configuration key, e.g. --set limits.recipients=500
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Log format: text or json (same as --set log.format=...).
        #[arg(long = "log-format", value_name = "FORMAT")]
        log_format: Option<String>,
    },
    /// Run a ready-to-try relay on embedded defaults (loopback ports 2525, 2587, 2465).
    Demo {
        /// Directory for the demo's certificate and spool.
        #[arg(long, default_value = "tern-demo")]
        dir: PathBuf,
        /// Override any configuration key.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Log format: text or json (same as --set log.format=...).
        #[arg(long = "log-format", value_name = "FORMAT")]
        log_format: Option<String>,
    },
    /// Inspect and manage the queue (live over the admin socket, or offline on a spool).
    Queue {
        #[command(subcommand)]
        command: cli::queue::QueueCmd,
    },
    /// Control a running server over its admin socket: status, reload, stop, log-level.
    Ctl {
        #[command(subcommand)]
        command: cli::ctl::CtlCmd,
    },
    /// Create, update, delete or list users of the AUTH user store (like saslpasswd2).
    Passwd(crate::cli::passwd::PasswdArgs),
    /// DKIM keys: `tern dkim keygen --domain D --selector S [--algorithm rsa|ed25519]`.
    Dkim {
        #[command(subcommand)]
        command: cli::dkim::DkimCmd,
    },
    /// Print version, compiled-in features, mechanisms, TLS provider, shards and limits
    /// (like sendmail -d0).
    Features {
        #[arg(long, short = 'c')]
        config: Option<PathBuf>,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// One SMTP session on stdin/stdout (like sendmail -bs; for inetd, ssh and tests).
    Stdio {
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// The sendmail(8) interface: read a message on stdin and queue it
    /// ([-t] [-i|-oi] [-f SENDER] [-F NAME] [RECIPIENTS...]).
    Sendmail {
        #[command(flatten)]
        config: ConfigArgs,
        /// sendmail's own options and the recipients.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Validate a configuration file and print the effective configuration.
    CheckConfig {
        #[arg(long, short = 'c')]
        config: Option<PathBuf>,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
}

/// Which configuration `stdio` and `sendmail` use: a file, a demo directory, or defaults.
#[derive(clap::Args)]
struct ConfigArgs {
    /// The TOML configuration file.
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// Use the configuration of a `tern demo --dir DIR`.
    #[arg(long = "demo-dir", value_name = "DIR", conflicts_with = "config")]
    demo_dir: Option<PathBuf>,
    /// Override any configuration key.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

impl ConfigArgs {
    fn load(&self) -> Result<Config, String> {
        match &self.demo_dir {
            Some(d) => cli::demo::prepare(d, &self.set)
                .map(|p| p.config)
                .map_err(|e| e.to_string()),
            None => Config::load(self.config.as_deref(), &self.set).map_err(|e| e.to_string()),
        }
    }
}

/// Logging for the one-shot commands: stderr only, warnings unless TERN_LOG says more.
fn init_quiet_logging() {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TERN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .try_init();
}

/// `tern sendmail ARGS`, also reached as `sendmail ARGS` (argv[0]), where every argument
/// is sendmail's: the configuration then comes from $TERN_CONFIG or the defaults.
fn sendmail(config: &ConfigArgs, args: &[String]) -> ExitCode {
    init_quiet_logging();
    match config.load() {
        Ok(cfg) => crate::cli::sendmail::run(&cfg, args),
        Err(e) => {
            eprintln!("sendmail: {e}");
            ExitCode::from(78)
        }
    }
}

/// Many clients (and balancers' health checks) send an IP address as TLS SNI, which rustls
/// ignores with a WARN on every connection. That is debug-level news: below `debug` the
/// filter drops rustls' handshake-message warnings (a filter that names `rustls` itself,
/// or a debug/trace level, keeps them).
fn quiet_sni(level: &str) -> String {
    let verbose = level.contains("rustls") || level.contains("debug") || level.contains("trace");
    if verbose {
        level.to_string()
    } else {
        format!("{level},rustls::msgs::handshake=error")
    }
}

/// Installs the log subscriber; returns the handle `tern ctl log-level` uses to swap
/// its filter at run time (a `reload` layer around the `EnvFilter`).
fn init_logging(log: &tern_engine::config::LogConfig) -> Option<LogLevelFn> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("TERN_LOG")
        .or_else(|_| EnvFilter::try_new(quiet_sni(&log.level)))
        .unwrap_or_else(|_| EnvFilter::new(quiet_sni("info")));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let json = log.format == "json";
    let json_layer = json.then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_target(false)
    });
    let text_layer = (!json).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_target(false)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(json_layer)
        .with(text_layer)
        .try_init()
        .ok()?;
    Some(Arc::new(move |level: &str| {
        let f = EnvFilter::try_new(quiet_sni(level))
            .map_err(|e| format!("bad log level {level:?}: {e}"))?;
        handle.reload(f).map_err(|e| e.to_string())
    }))
}

fn print_ready(r: &Ready) {
    let mut out = std::io::stdout().lock();
    for (kind, addr) in &r.listeners {
        let _ = writeln!(out, "listening: {} {}", kind.name(), addr);
    }
    if let Some(addr) = r.metrics {
        let _ = writeln!(out, "listening: metrics {addr}");
    }
    let _ = writeln!(out, "ready: {} shards", r.shards);
    let _ = out.flush();
}

fn serve(
    cfg: Config,
    identity: Identity,
    log_level: Option<LogLevelFn>,
    reload_config: server::ConfigLoader,
    after_ready: impl FnOnce(&Ready),
) -> ExitCode {
    let hooks = server::Hooks {
        log_level,
        reload_config: Some(reload_config),
    };
    match server::run_with(cfg, identity, hooks, |r| {
        print_ready(r);
        after_ready(r);
    }) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tern: {e}");
            ExitCode::from(71) // EX_OSERR
        }
    }
}

fn main() -> ExitCode {
    let argv0 = std::env::args_os().next().map(PathBuf::from);
    if argv0.as_deref().and_then(|p| p.file_name()) == Some("sendmail".as_ref()) {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let config = ConfigArgs {
            config: std::env::var_os("TERN_CONFIG")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
            demo_dir: None,
            set: Vec::new(),
        };
        return sendmail(&config, &args);
    }
    let cli = Cli::parse();
    match cli.command {
        Cmd::Serve {
            config,
            mut set,
            log_format,
        } => {
            set.extend(log_format.map(|f| format!("log.format={f}")));
            let cfg = match Config::load(Some(&config), &set) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("tern: {e}");
                    return ExitCode::from(78); // EX_CONFIG
                }
            };
            let log_level = init_logging(&cfg.log);
            let identity = match (&cfg.tls.cert, &cfg.tls.key) {
                (Some(c), Some(k)) => Identity::from_pem_files(c, k),
                _ => {
                    tracing::warn!(
                        "no tls.cert/tls.key configured: using a generated self-signed certificate"
                    );
                    Identity::self_signed(&cfg.hostname).map(|(i, _, _)| i)
                }
            };
            let identity = match identity {
                Ok(i) => i,
                Err(e) => {
                    eprintln!("tern: {e}");
                    return ExitCode::from(78);
                }
            };
            // SIGHUP reads the same file with the same --set overrides again.
            let loader: server::ConfigLoader = std::sync::Arc::new(move || {
                Config::load(Some(&config), &set).map_err(|e| e.to_string())
            });
            serve(cfg, identity, log_level, loader, |_| {})
        }
        Cmd::Demo {
            dir,
            mut set,
            log_format,
        } => {
            set.extend(log_format.map(|f| format!("log.format={f}")));
            let prepared = match cli::demo::prepare(&dir, &set) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("tern demo: {e}");
                    return ExitCode::from(78);
                }
            };
            let log_level = init_logging(&prepared.config.log);
            let dir2 = dir.clone();
            let queue = prepared.config.queue.clone();
            let loader: server::ConfigLoader = std::sync::Arc::new(move || {
                cli::demo::prepare(&dir, &set)
                    .map(|p| p.config)
                    .map_err(|e| e.to_string())
            });
            serve(
                prepared.config,
                prepared.identity,
                log_level,
                loader,
                move |r| cli::demo::print_banner(&dir2, &queue, r),
            )
        }
        Cmd::Stdio { config } => {
            init_quiet_logging();
            match config.load() {
                Ok(cfg) => crate::cli::stdio::run(&cfg),
                Err(e) => {
                    eprintln!("tern stdio: {e}");
                    ExitCode::from(78)
                }
            }
        }
        Cmd::Sendmail { config, args } => sendmail(&config, &args),
        Cmd::Queue { command } => cli::queue::run(command),
        Cmd::Ctl { command } => cli::ctl::run(command),
        Cmd::Passwd(args) => crate::cli::passwd::run(args),
        Cmd::Dkim { command } => cli::dkim::run(command),
        Cmd::Features { config, set } => match Config::load(config.as_deref(), &set) {
            Ok(cfg) => {
                print!("{}", crate::cli::features::report(&cfg));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("tern: {e}");
                ExitCode::from(78)
            }
        },
        Cmd::CheckConfig { config, set } => match Config::load(config.as_deref(), &set) {
            Ok(cfg) => match toml::to_string_pretty(&cfg) {
                Ok(s) => {
                    print!("{s}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("tern: {e}");
                    ExitCode::from(70)
                }
            },
            Err(e) => {
                eprintln!("tern: {e}");
                ExitCode::from(78)
            }
        },
    }
}
