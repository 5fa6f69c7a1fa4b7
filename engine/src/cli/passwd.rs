//! `tern passwd`: manage the user store, like saslpasswd2 / sasldblistusers2.
//!
//! Owns: the command line (`tern passwd [-f FILE|URL] [-u REALM] [-c|-d] [-p] USER[@REALM]`,
//! `tern passwd --list [-f FILE|URL]`, `tern passwd --import-sasldb SASLDB [--overwrite]
//! [-f FILE|URL]`, `tern passwd --init -f FILE|URL`), reading the password (stdin with
//! `-p`, or twice from the terminal with echo off), and exit codes from sysexits.h.
//! `-f postgresql://...` works on the database store (`pgusers`) exactly as on the file:
//! the same commands, the same checks, the same exit codes.
//!
//! Must never: print a secret, the password or a database password (URLs are shown
//! redacted), write the file other than through `userstore::save` (atomic, 0600) or
//! the database other than through `pgusers::save` (one transaction, changed rows
//! only), or leave the terminal with echo off on a normal exit.
//!
//! Defaults: the file is `tern-users.db` in the current directory; the realm
//! is this machine's host name ([`default_realm`]) — the server must use the
//! same realm (DIGEST-MD5's stored hash covers it), so set both explicitly
//! on hosts whose name may change.

use std::io::{self, BufRead, IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use tern_engine::config::UserStore;
use tern_engine::pgusers::{self, PgError};
use tern_engine::userstore::{self, UserDb, UserDbError};
use tern_smtp::sasl::saslprep::saslprep;
use tern_smtp::users::secrets::{
    Secrets, DEFAULT_SCRAM_ITERATIONS, MAX_SCRAM_ITERATIONS, SCRAM_SALT_LEN,
};
use tern_smtp::users::{check_realm, check_user};

/// sysexits.h codes.
pub mod exit {
    pub const OK: u8 = 0;
    pub const USAGE: u8 = 64;
    pub const DATAERR: u8 = 65;
    pub const NOINPUT: u8 = 66;
    pub const NOUSER: u8 = 67;
    pub const UNAVAILABLE: u8 = 69;
    pub const IOERR: u8 = 74;
    pub const CANTCREAT: u8 = 73;
    pub const NOPERM: u8 = 77;
}

/// Longest password accepted (same bound as PLAIN/LOGIN accept on the wire).
const MAX_PASSWORD: usize = 1024;

/// Arguments of `tern passwd`.
#[derive(clap::Args, Debug, Clone)]
#[command(about = "Set, delete or list users of the tern user store (like saslpasswd2)")]
pub struct PasswdArgs {
    /// User store: a file, or a PostgreSQL URL (postgresql://user@host/db).
    #[arg(short = 'f', long = "file", default_value = "tern-users.db")]
    pub file: PathBuf,
    /// Create the store: an empty 0600 file if there is none, or the database schema
    /// (table tern_users and its NOTIFY trigger; safe to run again).
    #[arg(long = "init", conflicts_with_all = ["list", "create", "delete", "pipe", "user", "import_sasldb"])]
    pub init: bool,
    /// Realm (default: this machine's host name).
    #[arg(short = 'u', long = "realm")]
    pub realm: Option<String>,
    /// Create the user (and the file) if absent; without -c the user must exist.
    #[arg(short = 'c', long = "create", conflicts_with = "delete")]
    pub create: bool,
    /// Delete the user.
    #[arg(short = 'd', long = "delete")]
    pub delete: bool,
    /// Read the password from standard input (first line) without prompting.
    #[arg(short = 'p', long = "pipe")]
    pub pipe: bool,
    /// SCRAM-SHA-256 iteration count.
    #[arg(long = "iterations", default_value_t = DEFAULT_SCRAM_ITERATIONS)]
    pub iterations: u32,
    /// List users as `user@realm: userPassword` (never the secrets).
    #[arg(long = "list", conflicts_with_all = ["create", "delete", "pipe", "user"])]
    pub list: bool,
    /// Import every user (its userPassword) of a Cyrus sasldb2 into the store, with the
    /// realm each has there. Needs Berkeley DB's db_dump (Debian: db-util).
    #[arg(
        long = "import-sasldb",
        value_name = "SASLDB",
        conflicts_with_all = ["list", "create", "delete", "pipe", "user", "realm"]
    )]
    pub import_sasldb: Option<PathBuf>,
    /// With --import-sasldb: replace users already in the store (default: keep them).
    #[arg(long = "overwrite", requires = "import_sasldb")]
    pub overwrite: bool,
    /// The user's own message rate, e.g. "500/1m" (overrides auth.user_message_rate; ""
    /// removes it). On an existing user without -c, only the rates change (no password).
    #[arg(long = "message-rate", value_name = "RATE")]
    pub message_rate: Option<String>,
    /// The user's own recipient rate, e.g. "5000/1d" (overrides auth.user_recipient_rate).
    #[arg(long = "recipient-rate", value_name = "RATE")]
    pub recipient_rate: Option<String>,
    /// The user name; `user@realm` (split at the first '@', as saslpasswd2 does)
    /// gives the realm instead of -u.
    #[arg(required_unless_present_any = ["list", "import_sasldb", "init"])]
    pub user: Option<String>,
}

/// Run `tern passwd`.
pub fn run(args: PasswdArgs) -> ExitCode {
    let pipe = args.pipe;
    let code = run_with(
        &args,
        || read_password(pipe),
        &mut io::stdout().lock(),
        &mut io::stderr().lock(),
    );
    ExitCode::from(code)
}

/// This machine's host name, the default realm (`gethostname(2)`).
pub fn default_realm() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: buf is writable for buf.len() bytes; gethostname writes at most
    // that many and we only read up to the first NUL within the buffer.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = std::str::from_utf8(&buf[..len]).ok()?;
    (!name.is_empty()).then(|| name.to_owned())
}

/// Exit code for a load error.
fn load_code(e: &UserDbError) -> u8 {
    match e {
        UserDbError::NotFound { .. } | UserDbError::NotRegular { .. } => exit::NOINPUT,
        UserDbError::Permissions { .. } => exit::NOPERM,
        UserDbError::Io { source, .. } if source.kind() == io::ErrorKind::PermissionDenied => {
            exit::NOPERM
        }
        UserDbError::Io { .. } => exit::IOERR,
        UserDbError::Malformed { .. } => exit::DATAERR,
        UserDbError::InvalidName { .. } => exit::USAGE,
    }
}

/// The store `-f` names, opened: the file, or a database connection and the rows as
/// loaded (so a save writes only what changed).
enum Store {
    File(PathBuf),
    Database {
        url: pgusers::PgUrl,
        client: Box<postgres::Client>,
        loaded: Option<UserDb>,
    },
}

/// A store error with its exit code already chosen.
struct Failed(u8, String);

fn pg_code(e: &PgError) -> u8 {
    match e {
        PgError::Connect { .. } => exit::UNAVAILABLE,
        PgError::NoSchema { .. } => exit::NOINPUT,
        PgError::Query { .. } => exit::IOERR,
        PgError::Data(d) => load_code(d),
    }
}

impl Store {
    fn open(path: &std::path::Path) -> Result<Store, Failed> {
        match UserStore::from_path(path) {
            UserStore::File(p) => Ok(Store::File(p)),
            UserStore::Postgres(url) => {
                let client =
                    pgusers::connect(&url).map_err(|e| Failed(pg_code(&e), e.to_string()))?;
                Ok(Store::Database {
                    url,
                    client: Box::new(client),
                    loaded: None,
                })
            }
        }
    }

    /// The file's path or the redacted URL.
    fn name(&self) -> String {
        match self {
            Store::File(p) => p.display().to_string(),
            Store::Database { url, .. } => url.to_string(),
        }
    }

    /// Loads the users. `Ok(None)`: a file that does not exist yet.
    fn load(&mut self) -> Result<Option<UserDb>, Failed> {
        match self {
            Store::File(p) => match userstore::load(p) {
                Ok(db) => Ok(Some(db)),
                Err(UserDbError::NotFound { .. }) => Ok(None),
                Err(e) => Err(Failed(load_code(&e), e.to_string())),
            },
            Store::Database {
                url,
                client,
                loaded,
            } => {
                let fail = |e: PgError| Failed(pg_code(&e), e.to_string());
                // One copy to change, one to diff against at save.
                let db = pgusers::load(client, url).map_err(fail)?;
                *loaded = Some(db.clone());
                Ok(Some(db))
            }
        }
    }

    fn save(&mut self, db: &UserDb) -> Result<(), Failed> {
        match self {
            Store::File(p) => {
                userstore::save(db, p).map_err(|e| Failed(save_code(&e), e.to_string()))
            }
            Store::Database {
                url,
                client,
                loaded,
            } => {
                let empty = UserDb::empty();
                let old = loaded.as_ref().unwrap_or(&empty);
                pgusers::save(client, url, old, db)
                    .map(|_| ())
                    .map_err(|e| Failed(pg_code(&e), e.to_string()))
            }
        }
    }
}

/// `--init`: an empty store file (kept if it exists and loads), or the schema.
fn init(args: &PasswdArgs, out: &mut dyn Write) -> Result<(), Failed> {
    let mut store = Store::open(&args.file)?;
    match &mut store {
        Store::File(_) => {
            if store.load()?.is_none() {
                store.save(&UserDb::empty())?;
            }
        }
        Store::Database { url, client, .. } => {
            pgusers::init(client, url).map_err(|e| Failed(pg_code(&e), e.to_string()))?;
        }
    }
    let _ = writeln!(out, "user store ready: {}", store.name());
    Ok(())
}

/// Exit code for a save error.
fn save_code(e: &UserDbError) -> u8 {
    match e {
        UserDbError::Io { source, .. } if source.kind() == io::ErrorKind::PermissionDenied => {
            exit::NOPERM
        }
        _ => exit::CANTCREAT,
    }
}

/// The testable core: `password` supplies the password when one is needed.
pub fn run_with(
    args: &PasswdArgs,
    password: impl FnOnce() -> Result<String, String>,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> u8 {
    let mut fail = |code: u8, msg: &dyn std::fmt::Display| {
        let _ = writeln!(err, "tern passwd: {msg}");
        code
    };
    if args.init {
        return match init(args, out) {
            Ok(()) => exit::OK,
            Err(Failed(code, msg)) => fail(code, &msg),
        };
    }
    if args.list {
        let db = match Store::open(&args.file).and_then(|mut s| s.load()) {
            Ok(Some(db)) => db,
            Ok(None) => {
                return fail(
                    exit::NOINPUT,
                    &format_args!("{}: no such file", args.file.display()),
                )
            }
            Err(Failed(code, msg)) => return fail(code, &msg),
        };
        for (user, realm) in db.entries() {
            if writeln!(out, "{user}@{realm}: userPassword").is_err() {
                return exit::IOERR;
            }
        }
        return exit::OK;
    }
    if let Some(sasldb) = &args.import_sasldb {
        return import_sasldb(args, sasldb, out, err);
    }
    let Some(login) = args.user.as_deref() else {
        return fail(exit::USAGE, &"a user name is required");
    };
    // `user@realm` names the realm, split at the first '@' as saslpasswd2 (and
    // every login) does; `-u` then must not name another one.
    let (user, realm) = match (login.split_once('@'), &args.realm) {
        (Some((_, r)), Some(u)) if r != u => {
            return fail(
                exit::USAGE,
                &format_args!("{login} names realm {r:?} but -u says {u:?}; give the realm once"),
            )
        }
        (Some((user, r)), _) => (user, r.to_owned()),
        (None, _) => match args.realm.clone().or_else(default_realm) {
            Some(r) => (login, r),
            None => {
                return fail(
                    exit::USAGE,
                    &"cannot determine the host name; give a realm with -u",
                )
            }
        },
    };
    if let Err(e) = check_user(user).and_then(|()| check_realm(&realm)) {
        return fail(exit::USAGE, &e);
    }
    if !(1..=MAX_SCRAM_ITERATIONS).contains(&args.iterations) {
        return fail(
            exit::USAGE,
            &format_args!("--iterations must be 1..={MAX_SCRAM_ITERATIONS}"),
        );
    }

    let mut store = match Store::open(&args.file) {
        Ok(s) => s,
        Err(Failed(code, msg)) => return fail(code, &msg),
    };
    let mut db = match store.load() {
        Ok(Some(db)) => db,
        Ok(None) if args.create => UserDb::empty(),
        Ok(None) => {
            return fail(
                exit::NOINPUT,
                &format_args!("{}: no such file", args.file.display()),
            )
        }
        Err(Failed(code, msg)) => return fail(code, &msg),
    };
    let exists = db.lookup(user, &realm).is_some();
    // The user's own sending rates, as given (a flag not given keeps what is stored).
    let rates_given = args.message_rate.is_some() || args.recipient_rate.is_some();
    let rates = {
        let cur = db.rates(user, &realm).unwrap_or_default();
        let pick = |flag: &Option<String>, cur| match flag {
            None => Ok(cur),
            Some(v) => tern_smtp::users::Rate::parse(v),
        };
        match (
            pick(&args.message_rate, cur.messages),
            pick(&args.recipient_rate, cur.recipients),
        ) {
            (Ok(messages), Ok(recipients)) => tern_smtp::users::UserRates {
                messages,
                recipients,
            },
            (Err(e), _) | (_, Err(e)) => return fail(exit::USAGE, &e),
        }
    };

    if args.delete {
        if !db.remove(user, &realm) {
            return fail(exit::NOUSER, &format_args!("{user}@{realm}: no such user"));
        }
    } else if rates_given && exists && !args.create {
        db.set_rates(user, &realm, rates);
    } else {
        if !exists && !args.create {
            return fail(
                exit::NOUSER,
                &format_args!("{user}@{realm}: no such user (use -c to create)"),
            );
        }
        let password = match password() {
            Ok(p) => p,
            Err(msg) => return fail(exit::DATAERR, &msg),
        };
        let secrets = match derive(user, &realm, &password, args.iterations) {
            Ok(s) => s,
            Err(why) => return fail(exit::DATAERR, &why),
        };
        if let Err(e) = db.insert(user, &realm, secrets) {
            return fail(exit::USAGE, &e);
        }
        db.set_rates(user, &realm, rates);
    }
    match store.save(&db) {
        Ok(()) => exit::OK,
        Err(Failed(code, msg)) => fail(code, &msg),
    }
}

/// Check a password as `tern passwd` does and derive its secrets (`None` and why
/// not when it cannot be used).
fn derive(
    user: &str,
    realm: &str,
    password: &str,
    iterations: u32,
) -> Result<Secrets, &'static str> {
    if password.is_empty() {
        return Err("empty password refused");
    }
    if password.len() > MAX_PASSWORD {
        return Err("password longer than 1024 octets");
    }
    let Ok(prepared) = saslprep(password) else {
        return Err("password contains a character SASLprep prohibits (RFC 4013 §2.3)");
    };
    let mut salt = [0u8; SCRAM_SALT_LEN];
    rand::Rng::fill(&mut rand::rng(), &mut salt[..]);
    Ok(Secrets::derive(
        user, realm, password, &prepared, &salt, iterations,
    ))
}

/// `--import-sasldb`: every `userPassword` of a Cyrus sasldb2 becomes a user of the
/// store, in the realm it has there. Notes per user go to `err` (names only, never a
/// password), one summary line to `out`. Exit 0 when every user with a password is in
/// the store afterwards; 65 when some could not be imported (the others are saved).
fn import_sasldb(
    args: &PasswdArgs,
    sasldb: &std::path::Path,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> u8 {
    use super::sasldb::{self, DumpError, SecretBytes};
    use std::collections::BTreeMap;

    let mut note = |msg: &dyn std::fmt::Display| {
        let _ = writeln!(err, "tern passwd: {msg}");
    };
    if !(1..=MAX_SCRAM_ITERATIONS).contains(&args.iterations) {
        note(&format_args!(
            "--iterations must be 1..={MAX_SCRAM_ITERATIONS}"
        ));
        return exit::USAGE;
    }
    match std::fs::metadata(sasldb) {
        Ok(m) if m.is_file() => {}
        Ok(_) => {
            note(&format_args!("{}: not a regular file", sasldb.display()));
            return exit::NOINPUT;
        }
        Err(e) => {
            note(&format_args!("{}: {e}", sasldb.display()));
            return if e.kind() == io::ErrorKind::PermissionDenied {
                exit::NOPERM
            } else {
                exit::NOINPUT
            };
        }
    }
    let entries = match sasldb::read(sasldb) {
        Ok(e) => e,
        Err(e) => {
            note(&format_args!("{}: {e}", sasldb.display()));
            return match e {
                DumpError::NoTool => exit::UNAVAILABLE,
                DumpError::Spawn(_) => exit::IOERR,
                DumpError::Failed(_) | DumpError::Format(_) => exit::DATAERR,
            };
        }
    };
    let mut store = match Store::open(&args.file) {
        Ok(s) => s,
        Err(Failed(code, msg)) => {
            note(&msg);
            return code;
        }
    };
    let mut db = match store.load() {
        Ok(Some(db)) => db,
        Ok(None) => UserDb::empty(),
        Err(Failed(code, msg)) => {
            note(&msg);
            return code;
        }
    };

    // (user, realm) → (userPassword, other properties), in a stable order.
    type Props = (Option<SecretBytes>, Vec<String>);
    let mut users: BTreeMap<(Vec<u8>, Vec<u8>), Props> = BTreeMap::new();
    for e in entries {
        let slot = users.entry((e.user, e.realm)).or_default();
        if e.property == b"userPassword" {
            slot.0 = Some(e.value);
        } else {
            slot.1
                .push(String::from_utf8_lossy(&e.property).into_owned());
        }
    }

    let (mut imported, mut replaced, mut kept, mut skipped, mut ignored) = (0, 0, 0, 0, 0);
    for ((user, realm), (password, others)) in users {
        let name = format!(
            "{}@{}",
            String::from_utf8_lossy(&user),
            String::from_utf8_lossy(&realm)
        );
        if password.is_some() && !others.is_empty() {
            note(&format_args!(
                "{name}: ignored {} (tern keeps only secrets derived from userPassword)",
                others.join(", ")
            ));
            ignored += others.len();
        }
        match import_one(&mut db, &user, &realm, password, &others, args) {
            Ok(Imported::New) => imported += 1,
            Ok(Imported::Replaced) => {
                imported += 1;
                replaced += 1;
            }
            Ok(Imported::Kept) => kept += 1,
            Err(why) => {
                note(&format_args!("skipped {name}: {why}"));
                skipped += 1;
            }
        }
    }
    if imported > 0 {
        if let Err(Failed(code, msg)) = store.save(&db) {
            note(&msg);
            return code;
        }
    }
    let _ = writeln!(
        out,
        "imported {imported} users from {} into {} ({replaced} replaced); \
         {kept} already present and kept{}; {skipped} skipped; {ignored} other properties ignored",
        sasldb.display(),
        store.name(),
        if kept > 0 && !args.overwrite {
            " (--overwrite replaces them)"
        } else {
            ""
        },
    );
    if skipped > 0 {
        exit::DATAERR
    } else {
        exit::OK
    }
}

enum Imported {
    New,
    Replaced,
    Kept,
}

/// One sasldb user into `db`; `Err` says why it was skipped (never the password).
fn import_one(
    db: &mut UserDb,
    user: &[u8],
    realm: &[u8],
    password: Option<super::sasldb::SecretBytes>,
    others: &[String],
    args: &PasswdArgs,
) -> Result<Imported, String> {
    let Some(password) = password else {
        return Err(format!(
            "no userPassword (only {}); nothing tern can derive secrets from",
            others.join(", ")
        ));
    };
    let (Ok(user), Ok(realm)) = (std::str::from_utf8(user), std::str::from_utf8(realm)) else {
        return Err("user or realm is not UTF-8".into());
    };
    check_user(user)
        .and_then(|()| check_realm(realm))
        .map_err(|e| e.to_string())?;
    if user.contains('@') {
        return Err(
            "the user name contains '@', which no login can reach (logins split at the first '@')"
                .into(),
        );
    }
    let Ok(password) = std::str::from_utf8(&password.0) else {
        return Err("the password is not UTF-8".into());
    };
    let exists = db.lookup(user, realm).is_some();
    if exists && !args.overwrite {
        return Ok(Imported::Kept);
    }
    let secrets = derive(user, realm, password, args.iterations)?;
    db.insert(user, realm, secrets).map_err(|e| e.to_string())?;
    Ok(if exists {
        Imported::Replaced
    } else {
        Imported::New
    })
}

/// First line of `r`, without its line ending; bounded.
fn first_line(r: &mut dyn BufRead) -> Result<String, String> {
    let mut line = Vec::new();
    r.take(MAX_PASSWORD as u64 + 2)
        .read_until(b'\n', &mut line)
        .map_err(|e| format!("reading the password: {e}"))?;
    if line.last() == Some(&b'\n') {
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
    } else if line.len() > MAX_PASSWORD {
        return Err("password longer than 1024 octets".into());
    }
    String::from_utf8(line).map_err(|_| "the password is not UTF-8".to_string())
}

/// `-p`, or stdin not a terminal: the first line of stdin. Otherwise prompt
/// twice on the terminal with echo off.
fn read_password(pipe: bool) -> Result<String, String> {
    let stdin = io::stdin();
    if pipe || !stdin.is_terminal() {
        return first_line(&mut stdin.lock());
    }
    let first = tty::prompt("Password: ").map_err(|e| format!("reading the password: {e}"))?;
    let again = tty::prompt("Again (for verification): ")
        .map_err(|e| format!("reading the password: {e}"))?;
    if first != again {
        return Err("passwords do not match".into());
    }
    Ok(first)
}

mod tty {
    //! Echo-off password prompt on /dev/tty (termios), restored on drop.
    use std::fs::OpenOptions;
    use std::io::{self, BufReader, Write};
    use std::os::fd::AsRawFd;

    struct Restore {
        fd: i32,
        saved: libc::termios,
    }

    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: fd is open for the lifetime of the guard (the File
            // outlives it); saved came from tcgetattr on the same fd.
            unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
        }
    }

    pub(super) fn prompt(prompt: &str) -> io::Result<String> {
        let tty = OpenOptions::new().read(true).write(true).open("/dev/tty")?;
        let fd = tty.as_raw_fd();
        // SAFETY: termios is plain old data; tcgetattr fills it.
        let mut term: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd is an open terminal descriptor; term is a valid pointer.
        if unsafe { libc::tcgetattr(fd, &mut term) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let guard = Restore { fd, saved: term };
        term.c_lflag &= !libc::ECHO;
        term.c_lflag |= libc::ECHONL;
        // SAFETY: as above.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &term) } != 0 {
            return Err(io::Error::last_os_error());
        }
        (&tty).write_all(prompt.as_bytes())?;
        let line = super::first_line(&mut BufReader::new(&tty)).map_err(io::Error::other);
        drop(guard);
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn args(file: &std::path::Path, user: Option<&str>) -> PasswdArgs {
        PasswdArgs {
            file: file.to_owned(),
            init: false,
            realm: Some("example.org".into()),
            create: false,
            delete: false,
            pipe: true,
            iterations: 16,
            list: false,
            import_sasldb: None,
            overwrite: false,
            message_rate: None,
            recipient_rate: None,
            user: user.map(str::to_owned),
        }
    }

    #[test]
    fn per_user_rates_are_stored_changed_and_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("users.db");
        let mut a = args(&file, Some("alice"));
        a.create = true;
        a.message_rate = Some("500/1m".into());
        assert_eq!(run_ok(&a, "pw").0, exit::OK);
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(text.contains("alice@example.org cram-md5="), "{text}");
        assert!(text.contains(" message-rate=500/1m\n"), "{text}");
        // Rates only (no -c): no password is asked, the secrets stay.
        let before = userstore::load(&file).unwrap();
        let mut b = args(&file, Some("alice"));
        b.recipient_rate = Some("5000/1d".into());
        let (code, _, err) = run_ok(&b, "");
        assert_eq!(code, exit::OK, "{err}");
        let db = userstore::load(&file).unwrap();
        let r = db.rates("alice", "example.org").unwrap();
        assert_eq!(r.messages.unwrap().to_text(), "500/1m");
        assert_eq!(r.recipients.unwrap().to_text(), "5000/1d");
        assert_eq!(
            db.lookup("alice", "example.org"),
            before.lookup("alice", "example.org")
        );
        // "" clears one; a bad rate is a usage error and changes nothing.
        let mut c = args(&file, Some("alice"));
        c.message_rate = Some(String::new());
        assert_eq!(run_ok(&c, "").0, exit::OK);
        let mut d = args(&file, Some("alice"));
        d.message_rate = Some("lots".into());
        assert_eq!(run_ok(&d, "").0, exit::USAGE);
        let db = userstore::load(&file).unwrap();
        let r = db.rates("alice", "example.org").unwrap();
        assert_eq!(
            (r.messages, r.recipients.map(|x| x.count)),
            (None, Some(5000))
        );
    }

    fn run_ok(a: &PasswdArgs, pw: &str) -> (u8, String, String) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let pw = pw.to_owned();
        let code = run_with(a, move || Ok(pw), &mut out, &mut err);
        (
            code,
            String::from_utf8_lossy(&out).into_owned(),
            String::from_utf8_lossy(&err).into_owned(),
        )
    }

    #[test]
    fn create_update_delete_list_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("users.db");

        // Update without -c on a missing file: no input.
        assert_eq!(run_ok(&args(&file, Some("alice")), "pw").0, exit::NOINPUT);

        let mut create = args(&file, Some("alice"));
        create.create = true;
        assert_eq!(run_ok(&create, "secret1").0, exit::OK);
        let mode = std::fs::metadata(&file).expect("file").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // `user@realm` names the realm; a different -u is a usage error.
        create.user = Some("bob@corp".into());
        assert_eq!(run_ok(&create, "secret2").0, exit::USAGE);
        create.realm = None;
        assert_eq!(run_ok(&create, "secret2").0, exit::OK);
        create.user = Some("bob@example.org".into());
        create.realm = Some("example.org".into());
        assert_eq!(run_ok(&create, "secret4").0, exit::OK);

        // Update of an existing user without -c.
        assert_eq!(run_ok(&args(&file, Some("alice")), "secret3").0, exit::OK);
        // Update of a missing user without -c.
        assert_eq!(run_ok(&args(&file, Some("carol")), "x").0, exit::NOUSER);
        // Empty password refused.
        assert_eq!(run_ok(&create, "").0, exit::DATAERR);

        let mut list = args(&file, None);
        list.list = true;
        let (code, out, _) = run_ok(&list, "");
        assert_eq!(code, exit::OK);
        assert_eq!(
            out,
            "bob@corp: userPassword\nalice@example.org: userPassword\nbob@example.org: userPassword\n"
        );
        let text = std::fs::read_to_string(&file).expect("read");
        for pw in ["secret1", "secret2", "secret3", "secret4"] {
            assert!(!text.contains(pw), "no password in the file");
        }

        let db = userstore::load(&file).expect("load");
        let s = db.lookup("alice", "example.org").expect("alice");
        assert_eq!(
            s.digest_ha1,
            tern_smtp::users::secrets::digest_ha1("alice", "example.org", b"secret3")
        );
        // `bob@corp` is user bob in realm corp: the hash covers that name and realm.
        let s = db.lookup("bob", "corp").expect("bob@corp");
        assert_eq!(
            s.digest_ha1,
            tern_smtp::users::secrets::digest_ha1("bob", "corp", b"secret2")
        );

        let mut del = args(&file, Some("alice"));
        del.delete = true;
        assert_eq!(run_ok(&del, "").0, exit::OK);
        assert_eq!(run_ok(&del, "").0, exit::NOUSER);
        let (_, out, _) = run_ok(&list, "");
        assert_eq!(
            out,
            "bob@corp: userPassword\nbob@example.org: userPassword\n"
        );
    }

    #[test]
    fn list_refuses_open_file_and_missing_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("users.db");
        let mut list = args(&file, None);
        list.list = true;
        assert_eq!(run_ok(&list, "").0, exit::NOINPUT);
        std::fs::write(&file, "").expect("write");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let (code, _, err) = run_ok(&list, "");
        assert_eq!(code, exit::NOPERM);
        assert!(err.contains("chmod 600"), "{err}");
    }

    #[test]
    fn bad_names_are_usage_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut a = args(&dir.path().join("u.db"), Some("has space"));
        a.create = true;
        assert_eq!(run_ok(&a, "pw").0, exit::USAGE);
        a.user = Some("ok".into());
        a.realm = Some("bad@realm".into());
        assert_eq!(run_ok(&a, "pw").0, exit::USAGE);
    }

    #[test]
    fn import_one_rules() {
        use super::super::sasldb::SecretBytes;
        let dir = tempfile::tempdir().expect("tempdir");
        let mut a = args(&dir.path().join("u.db"), None);
        let pw = |p: &[u8]| Some(SecretBytes(p.to_vec()));
        let mut db = UserDb::empty();
        let one = |db: &mut UserDb, u: &[u8], r: &[u8], p, a: &PasswdArgs| {
            import_one(db, u, r, p, &["cmusaslsecretOTP".into()], a)
        };
        assert!(matches!(
            one(&mut db, b"alice", b"example.org", pw(b"pw"), &a),
            Ok(Imported::New)
        ));
        assert!(matches!(
            one(&mut db, b"alice", b"example.org", pw(b"new"), &a),
            Ok(Imported::Kept)
        ));
        let s = db.lookup("alice", "example.org").expect("alice");
        assert_eq!(
            s.digest_ha1,
            tern_smtp::users::secrets::digest_ha1("alice", "example.org", b"pw")
        );
        a.overwrite = true;
        assert!(matches!(
            one(&mut db, b"alice", b"example.org", pw(b"new"), &a),
            Ok(Imported::Replaced)
        ));
        let s = db.lookup("alice", "example.org").expect("alice");
        assert_eq!(
            s.digest_ha1,
            tern_smtp::users::secrets::digest_ha1("alice", "example.org", b"new")
        );
        for (u, r, p, why) in [
            (&b"otp"[..], &b"r"[..], None, "only cmusaslsecretOTP"),
            (b"a@b", b"r", pw(b"x"), "contains '@'"),
            (b"a", b"b@c", pw(b"x"), "realm cannot contain"),
            (b"a", b"", pw(b"x"), "empty"),
            (b"a b", b"r", pw(b"x"), "white space"),
            (b"a", b"r", pw(b"\xff"), "not UTF-8"),
            (b"\xff", b"r", pw(b"x"), "not UTF-8"),
            (b"a", b"r", pw(b""), "empty password"),
        ] {
            let err = one(&mut db, u, r, p, &a).err().expect("skipped");
            assert!(err.contains(why), "{err}");
        }
        assert_eq!(db.len(), 1);
    }

    #[test]
    fn first_line_strips_line_ending_only() {
        let mut r = io::Cursor::new(b" pass word \r\nsecond\n".to_vec());
        assert_eq!(first_line(&mut r).as_deref(), Ok(" pass word "));
        let mut r = io::Cursor::new(b"no newline".to_vec());
        assert_eq!(first_line(&mut r).as_deref(), Ok("no newline"));
        let mut r = io::Cursor::new(vec![b'a'; 2000]);
        assert!(first_line(&mut r).is_err());
    }

    #[test]
    fn clap_parses_saslpasswd2_style() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            a: PasswdArgs,
        }
        let c = Cli::try_parse_from(["passwd", "-f", "x.db", "-u", "r", "-c", "-p", "bob"])
            .expect("parse");
        assert!(c.a.create && c.a.pipe && c.a.user.as_deref() == Some("bob"));
        assert!(Cli::try_parse_from(["passwd", "-c", "-d", "bob"]).is_err());
        assert!(Cli::try_parse_from(["passwd"]).is_err());
        assert!(Cli::try_parse_from(["passwd", "--list", "-f", "x"]).is_ok());
    }
}
