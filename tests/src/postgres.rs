//! A real PostgreSQL for end-to-end tests: Debian's server binaries
//! (`/usr/lib/postgresql/N/bin`), run as the `postgres` user (it refuses root) in a
//! temporary data directory, on a free loopback port with its Unix socket in the same
//! temporary directory. Stopped (immediate mode) on drop: no test leaves one running.
//!
//! `Postgres::start()` makes a cluster whose TCP connections need a password
//! (scram-sha-256) and whose Unix socket trusts local users, with a role `tern`
//! (password [`PASSWORD`]) owning a database `tern`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `tern` role's password (tests check it never shows).
pub const PASSWORD: &str = "pg-s3cret-Xq7";

/// The newest installed server's bin directory, if any.
pub fn bin_dir() -> Option<PathBuf> {
    let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((v, bin))
        })
        .collect();
    dirs.sort();
    dirs.pop().map(|(_, b)| b)
}

/// Whether this machine can run one: the binaries, the `postgres` user, runuser, root.
pub fn available() -> bool {
    // SAFETY: geteuid(2) cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    root && bin_dir().is_some()
        && crate::tool_found("runuser")
        && Command::new("id")
            .arg("postgres")
            .output()
            .is_ok_and(|o| o.status.success())
}

pub struct Postgres {
    _tmp: tempfile::TempDir,
    bin: PathBuf,
    data: PathBuf,
    /// The Unix socket directory.
    pub sock: PathBuf,
    pub port: u16,
    log: PathBuf,
    running: bool,
}

fn as_postgres(bin: &Path, tool: &str, args: &[&str]) -> Output {
    Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(bin.join(tool))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("runuser {tool}: {e}"))
}

fn check(what: &str, o: Output) -> Output {
    assert!(
        o.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

impl Postgres {
    /// initdb, start, create the `tern` role and database.
    pub fn start() -> Postgres {
        let bin = bin_dir().expect("PostgreSQL binaries");
        let tmp = tempfile::Builder::new()
            .prefix("tern-pg-")
            .tempdir()
            .expect("tempdir");
        // postgres must traverse the directory; the data directory is its own.
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let data = tmp.path().join("data");
        let sock = tmp.path().join("sock");
        let log = tmp.path().join("postgres.log");
        for d in [&data, &sock] {
            std::fs::create_dir(d).unwrap();
        }
        let st = Command::new("chown")
            .arg("postgres:postgres")
            .arg(&data)
            .arg(&sock)
            .status()
            .unwrap();
        assert!(st.success());
        std::fs::write(&log, b"").unwrap();
        let st = Command::new("chown")
            .arg("postgres:postgres")
            .arg(&log)
            .status()
            .unwrap();
        assert!(st.success());
        let pwfile = tmp.path().join("pw");
        std::fs::write(&pwfile, "superuser-pw\n").unwrap();
        std::fs::set_permissions(&pwfile, std::fs::Permissions::from_mode(0o644)).unwrap();
        check(
            "initdb",
            as_postgres(
                &bin,
                "initdb",
                &[
                    "-D",
                    data.to_str().unwrap(),
                    "-U",
                    "postgres",
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    "--pwfile",
                    pwfile.to_str().unwrap(),
                    "-E",
                    "UTF8",
                    "--no-sync",
                ],
            ),
        );
        let mut pg = Postgres {
            _tmp: tmp,
            bin,
            data,
            sock,
            port: crate::free_port(),
            log,
            running: false,
        };
        pg.start_again();
        pg.psql(&format!("CREATE ROLE tern LOGIN PASSWORD '{PASSWORD}'"));
        pg.psql("CREATE DATABASE tern OWNER tern");
        pg
    }

    fn pg_ctl_start(&mut self, tcp: bool) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses={} -c fsync=off",
            self.port,
            self.sock.display(),
            if tcp { "127.0.0.1" } else { "''" }
        );
        check(
            "pg_ctl start",
            as_postgres(
                &self.bin,
                "pg_ctl",
                &[
                    "-D",
                    self.data.to_str().unwrap(),
                    "-l",
                    self.log.to_str().unwrap(),
                    "-o",
                    &opts,
                    "-w",
                    "start",
                ],
            ),
        );
        self.running = true;
    }

    /// Starts the server (again), on the same port.
    pub fn start_again(&mut self) {
        self.pg_ctl_start(true);
    }

    /// Starts it reachable only on its Unix socket: the nodes (on TCP) cannot reach it,
    /// an administrator on the machine can.
    pub fn start_socket_only(&mut self) {
        self.pg_ctl_start(false);
    }

    /// Stops it (fast mode: sessions are ended, as when the database goes away).
    pub fn stop(&mut self) {
        check(
            "pg_ctl stop",
            as_postgres(
                &self.bin,
                "pg_ctl",
                &[
                    "-D",
                    self.data.to_str().unwrap(),
                    "-m",
                    "fast",
                    "-w",
                    "stop",
                ],
            ),
        );
        self.running = false;
    }

    /// The URL the nodes use: TCP with the `tern` role's password.
    pub fn url(&self) -> String {
        format!("postgresql://tern:{PASSWORD}@127.0.0.1:{}/tern", self.port)
    }

    /// A URL over the Unix socket (local connections are trusted): no password.
    pub fn socket_url(&self) -> String {
        format!(
            "postgresql:///tern?host={}&port={}&user=tern",
            self.sock.display(),
            self.port
        )
    }

    /// Runs SQL as the superuser over the Unix socket; returns psql's output.
    pub fn psql(&self, sql: &str) -> String {
        let o = check(
            "psql",
            as_postgres(
                &self.bin,
                "psql",
                &[
                    "-h",
                    self.sock.to_str().unwrap(),
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    "postgres",
                    "-d",
                    "postgres",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-At",
                    "-c",
                    sql,
                ],
            ),
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.running {
            let _ = as_postgres(
                &self.bin,
                "pg_ctl",
                &[
                    "-D",
                    self.data.to_str().unwrap_or(""),
                    "-m",
                    "immediate",
                    "-w",
                    "stop",
                ],
            );
        }
    }
}
