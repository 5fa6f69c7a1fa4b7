//! User store tests: format round trip, file-mode refusal, malformed lines.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::{load, save, UserDb, UserDbError};
use tern_smtp::users::Secrets;

fn secrets(user: &str, realm: &str, pw: &str) -> Secrets {
    Secrets::derive(user, realm, pw, pw, b"0123456789abcdef", 8)
}

fn write_mode(path: &Path, text: &str, mode: u32) {
    std::fs::write(path, text).expect("write");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

#[test]
fn save_load_round_trip() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("users.db");
    let mut db = UserDb::empty();
    db.insert("alice", "example.org", secrets("alice", "example.org", "a"))
        .expect("insert");
    db.insert("bob@x", "example.org", secrets("bob@x", "example.org", "b"))
        .expect("insert");
    db.insert("alice", "other.org", secrets("alice", "other.org", "c"))
        .expect("insert");
    save(&db, &path).expect("save");
    assert_eq!(
        std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777,
        0o600
    );
    let loaded = load(&path).expect("load");
    assert_eq!(loaded.len(), 3);
    for (user, realm) in db.entries() {
        assert_eq!(loaded.lookup(user, realm), db.lookup(user, realm));
    }
    assert_eq!(
        loaded.entries(),
        vec![
            ("alice", "example.org"),
            ("bob@x", "example.org"),
            ("alice", "other.org")
        ]
    );
    assert!(loaded.lookup("Alice", "example.org").is_none());
    // Saving again replaces atomically and leaves no temporary behind.
    save(&loaded, &path).expect("save again");
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .expect("readdir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(names.len(), 1);
}

#[test]
fn refuses_group_or_world_readable_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("users.db");
    for mode in [0o640, 0o604, 0o660, 0o601] {
        write_mode(&path, "", mode);
        match load(&path) {
            Err(UserDbError::Permissions { mode: m, .. }) => assert_eq!(m, mode),
            other => panic!("mode {mode:o}: {other:?}"),
        }
    }
    write_mode(&path, "", 0o400);
    assert!(load(&path).expect("0400 is fine").is_empty());
}

#[test]
fn missing_file_and_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    assert!(matches!(
        load(&dir.path().join("nope")),
        Err(UserDbError::NotFound { .. })
    ));
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).expect("chmod");
    assert!(matches!(
        load(dir.path()),
        Err(UserDbError::NotRegular { .. })
    ));
}

#[test]
fn malformed_file_names_the_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("users.db");
    let mut db = UserDb::empty();
    db.insert("alice", "r", secrets("alice", "r", "a"))
        .expect("insert");
    let good = db.to_text();
    let good_line = good.lines().find(|l| !l.starts_with('#')).expect("line");
    let cases: Vec<(String, usize, &str)> = vec![
        (
            format!("# c\n\n{good_line}\ngarbage\n"),
            4,
            "4 space-separated",
        ),
        (format!("{good_line}\n{good_line}\n"), 2, "duplicate"),
        (good_line.replacen("alice@r", "alice", 1), 1, "user@realm"),
        (
            good_line.replacen("cram-md5=", "cram-md5=zz", 1),
            1,
            "cram-md5",
        ),
        (
            good_line.replacen("digest-md5=", "digest-md5=0", 1),
            1,
            "digest-md5",
        ),
        (
            good_line.replacen("scram-sha-256=8:", "scram-sha-256=0:", 1),
            1,
            "iteration",
        ),
        (
            good_line.replacen("scram-sha-256=8:", "scram-sha-256=99999999999:", 1),
            1,
            "iteration",
        ),
        (good_line.replacen("alice@r", "@r", 1), 1, "empty"),
        ("x@r \u{0}\n".into(), 1, "4 space-separated"),
    ];
    for (text, line, needle) in cases {
        write_mode(&path, &text, 0o600);
        match load(&path) {
            Err(e @ UserDbError::Malformed { .. }) => {
                let UserDbError::Malformed { line: l, .. } = &e else {
                    unreachable!()
                };
                let msg = e.to_string();
                assert_eq!(*l, line, "{msg}");
                assert!(msg.contains(needle), "{msg}");
                assert!(msg.contains(&format!("users.db:{line}:")), "{msg}");
            }
            other => panic!("{text:?}: {other:?}"),
        }
    }
    // Not UTF-8.
    std::fs::write(&path, b"\xff\xfe\n").expect("write");
    assert!(matches!(
        load(&path),
        Err(UserDbError::Malformed { line: 1, .. })
    ));
}

#[test]
fn names_are_checked() {
    let mut db = UserDb::empty();
    let s = secrets("a", "r", "p");
    assert!(db.insert("", "r", s.clone()).is_err());
    assert!(db.insert("a b", "r", s.clone()).is_err());
    assert!(db.insert("a", "r@x", s.clone()).is_err());
    assert!(db.insert(&"x".repeat(256), "r", s.clone()).is_err());
    assert!(db.insert("a@b", "r", s.clone()).is_ok());
    assert!(db.remove("a@b", "r"));
    assert!(!db.remove("a@b", "r"));
    assert!(db.is_empty());
}

#[test]
fn fake_salt_is_stable_per_snapshot_and_user() {
    let db = UserDb::empty();
    assert_eq!(db.fake_salt("x", "r"), db.fake_salt("x", "r"));
    assert_ne!(db.fake_salt("x", "r"), db.fake_salt("y", "r"));
}

#[test]
fn debug_never_prints_secrets() {
    let s = secrets("alice", "r", "pw");
    let text = format!("{s:?} {:?}", s.scram);
    assert_eq!(text, "Secrets { .. } ScramSecrets { iterations: 8, .. }");
}
