//! Maildir delivery.

use std::os::unix::fs::PermissionsExt;

use tern_queue::maildir::{deliver, MaildirError};
use tern_queue::{BodyType, Envelope, Recipient};

fn env(sender: &str, rcpts: &[&str]) -> Envelope {
    Envelope {
        id: "Q1".into(),
        sender: sender.into(),
        recipients: rcpts
            .iter()
            .map(|a| Recipient {
                addr: (*a).into(),
                notify: 0,
                orcpt: None,
            })
            .collect(),
        arrival_unix_micros: 0,
        size: 0,
        body_type: BodyType::SevenBit,
        smtputf8: false,
        ret: None,
        envid: None,
        deliver_by: None,
        auth: None,
        client_helo: "c".into(),
        client_addr: "192.0.2.1:1".into(),
    }
}

#[test]
fn creates_the_maildir_and_delivers_into_new() {
    let dir = tempfile::tempdir().unwrap();
    let md = dir.path().join("user").join("Maildir");
    let e = env("from@example.org", &["a@x.test", "b@x.test"]);
    let body = b"Received: by tern\r\nSubject: hi\r\n\r\nbody\r\n";
    let p1 = deliver(&md, &e, 1, body, "mx/host:1").unwrap();
    let p2 = deliver(&md, &e, 1, body, "mx/host:1").unwrap();
    assert_ne!(p1, p2);
    assert_eq!(p1.parent().unwrap(), md.join("new"));
    let name = p1.file_name().unwrap().to_str().unwrap();
    assert!(name.ends_with(".mx\\057host\\0721"), "{name}");
    assert!(!name.contains('/') && !name.contains(':'));
    for sub in ["tmp", "new", "cur"] {
        let m = std::fs::metadata(md.join(sub)).unwrap();
        assert!(m.is_dir());
        assert_eq!(m.permissions().mode() & 0o777, 0o700, "{sub}");
    }
    assert_eq!(std::fs::read_dir(md.join("tmp")).unwrap().count(), 0);
    assert_eq!(std::fs::read_dir(md.join("new")).unwrap().count(), 2);
    let content = std::fs::read(&p1).unwrap();
    // maildir(5) files end lines in LF: every CRLF of the message became LF.
    let expected =
        b"Return-Path: <from@example.org>\nDelivered-To: b@x.test\nReceived: by tern\nSubject: hi\n\nbody\n";
    assert_eq!(content, expected);
    assert_eq!(
        std::fs::metadata(&p1).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

#[test]
fn null_sender_and_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let e = env("", &["a@x.test"]);
    let p = deliver(dir.path(), &e, 0, b"x\r\n", "h").unwrap();
    assert!(std::fs::read(p).unwrap().starts_with(b"Return-Path: <>\n"));
    assert!(matches!(
        deliver(dir.path(), &e, 5, b"", "h"),
        Err(MaildirError::BadRecipient(5))
    ));
    let e = env("a@b\r\nX-Injected: 1", &["a@x.test"]);
    assert!(matches!(
        deliver(dir.path(), &e, 0, b"", "h"),
        Err(MaildirError::BadAddress(_))
    ));
}

#[test]
fn unwritable_maildir_is_an_error_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // A file where the maildir should be.
    let md = dir.path().join("file");
    std::fs::write(&md, b"x").unwrap();
    let e = env("a@b", &["c@d"]);
    assert!(matches!(
        deliver(&md, &e, 0, b"", "h"),
        Err(MaildirError::CreateDir { .. })
    ));
}
