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
    /// listen_addresses when TCP is on.
    listen: String,
    log: PathBuf,
    running: bool,
    /// The server's certificate and key once [`Postgres::enable_tls`] ran.
    tls: Option<(PathBuf, PathBuf)>,
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
        Postgres::start_listening("127.0.0.1", crate::free_port())
    }

    /// [`Postgres::start`] listening on `addr:port` (e.g. a test network's address and
    /// the standard 5432), its Unix socket still in its temporary directory.
    pub fn start_on(addr: &str, port: u16) -> Postgres {
        Postgres::start_listening(addr, port)
    }

    fn start_listening(listen: &str, port: u16) -> Postgres {
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
            port,
            listen: listen.to_string(),
            log,
            running: false,
            tls: None,
        };
        pg.start_again();
        pg.psql(&format!("CREATE ROLE tern LOGIN PASSWORD '{PASSWORD}'"));
        pg.psql("CREATE DATABASE tern OWNER tern");
        pg
    }

    fn pg_ctl_start(&mut self, tcp: bool) {
        let mut opts = format!(
            "-p {} -k {} -c listen_addresses={} -c fsync=off",
            self.port,
            self.sock.display(),
            if tcp { self.listen.as_str() } else { "''" }
        );
        if let Some((cert, key)) = &self.tls {
            opts.push_str(&format!(
                " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                cert.display(),
                key.display()
            ));
        }
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

    /// Restarts the server with TLS on, with a new certificate for 127.0.0.1 signed by a
    /// new CA (made with openssl); returns the CA's certificate (what to trust).
    pub fn enable_tls(&mut self) -> PathBuf {
        let dir = self.data.parent().unwrap().to_path_buf();
        let (ca, cert, key) = ca_and_cert(&dir, "server");
        let st = Command::new("chown")
            .arg("postgres:postgres")
            .arg(&key)
            .status()
            .unwrap();
        assert!(st.success());
        self.stop();
        self.tls = Some((cert, key));
        self.start_again();
        ca
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
        self.psql_in("postgres", sql)
    }

    /// [`Postgres::psql`] in database `db`.
    pub fn psql_in(&self, db: &str, sql: &str) -> String {
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
                    db,
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

    /// Runs SQL as `role` (trusted on the Unix socket) in database `db`.
    pub fn psql_as(&self, db: &str, role: &str, sql: &str) -> String {
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
                    role,
                    "-d",
                    db,
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

    /// A URL over the Unix socket as `user` in database `db` (trusted: no password).
    pub fn socket_url_as(&self, db: &str, user: &str) -> String {
        format!(
            "postgresql:///{db}?host={}&port={}&user={user}",
            self.sock.display(),
            self.port
        )
    }

    /// Puts `lines` at the top of pg_hba.conf (first match wins) and reloads.
    pub fn prepend_hba(&self, lines: &str) {
        let path = self.data.join("pg_hba.conf");
        let old = std::fs::read_to_string(&path).expect("pg_hba.conf");
        std::fs::write(&path, format!("{lines}\n{old}")).expect("write pg_hba.conf");
        self.psql("SELECT pg_reload_conf()");
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

/// A CA and a certificate it signed for IP 127.0.0.1, in `dir`: returns (the CA's
/// certificate, the certificate, its key), files `NAME-ca.pem`, `NAME.pem`, `NAME.key`
/// (keys mode 0600). Made with openssl.
pub fn ca_and_cert(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let p = |s: &str| dir.join(s);
    let (ca, ca_key) = (p(&format!("{name}-ca.pem")), p(&format!("{name}-ca.key")));
    let (cert, key, csr) = (
        p(&format!("{name}.pem")),
        p(&format!("{name}.key")),
        p(&format!("{name}.csr")),
    );
    let ext = p(&format!("{name}.ext"));
    std::fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    let run = |what: &str, args: &[&std::ffi::OsStr]| {
        check(
            what,
            Command::new("openssl")
                .args(args)
                .output()
                .expect("openssl"),
        );
    };
    let s = |x: &str| std::ffi::OsStr::new(x).to_owned();
    let o = |x: &Path| x.as_os_str().to_owned();
    let v: Vec<std::ffi::OsString> = vec![
        s("req"),
        s("-x509"),
        s("-newkey"),
        s("ec"),
        s("-pkeyopt"),
        s("ec_paramgen_curve:P-256"),
        s("-nodes"),
        s("-days"),
        s("2"),
        s("-subj"),
        s(&format!("/CN={name} test CA")),
        s("-keyout"),
        o(&ca_key),
        s("-out"),
        o(&ca),
    ];
    run(
        "openssl req (CA)",
        &v.iter().map(|x| x.as_os_str()).collect::<Vec<_>>(),
    );
    let v: Vec<std::ffi::OsString> = vec![
        s("req"),
        s("-new"),
        s("-newkey"),
        s("ec"),
        s("-pkeyopt"),
        s("ec_paramgen_curve:P-256"),
        s("-nodes"),
        s("-subj"),
        s("/CN=127.0.0.1"),
        s("-keyout"),
        o(&key),
        s("-out"),
        o(&csr),
    ];
    run(
        "openssl req (leaf)",
        &v.iter().map(|x| x.as_os_str()).collect::<Vec<_>>(),
    );
    let v: Vec<std::ffi::OsString> = vec![
        s("x509"),
        s("-req"),
        s("-in"),
        o(&csr),
        s("-CA"),
        o(&ca),
        s("-CAkey"),
        o(&ca_key),
        s("-CAcreateserial"),
        s("-days"),
        s("2"),
        s("-extfile"),
        o(&ext),
        s("-out"),
        o(&cert),
    ];
    run(
        "openssl x509 (sign)",
        &v.iter().map(|x| x.as_os_str()).collect::<Vec<_>>(),
    );
    for k in [&key, &ca_key] {
        std::fs::set_permissions(k, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    for c in [&cert, &ca] {
        std::fs::set_permissions(c, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    (ca, cert, key)
}
