//! RFC 3464 delivery status notifications, checked by parsing what `bounce` builds.

use std::time::{Duration, UNIX_EPOCH};

use tern_queue::dsn::{bounce, DsnKind, DsnStatus};
use tern_queue::{
    BodyType, Envelope, Recipient, Ret, NOTIFY_DELAY, NOTIFY_FAILURE, NOTIFY_NEVER, NOTIFY_SUCCESS,
};

const ORIGINAL: &[u8] =
    b"Received: by tern\r\nSubject: hello\r\nFrom: a@example.org\r\n\r\nthe body\r\n";

fn env(rcpts: &[(&str, u8, Option<&str>)]) -> Envelope {
    Envelope {
        id: "Q123".into(),
        sender: "a@example.org".into(),
        recipients: rcpts
            .iter()
            .map(|(a, n, o)| Recipient {
                addr: (*a).into(),
                notify: *n,
                orcpt: o.map(Into::into),
            })
            .collect(),
        arrival_unix_micros: 1_700_000_000_000_000,
        size: ORIGINAL.len() as u64,
        body_type: BodyType::SevenBit,
        smtputf8: false,
        ret: None,
        envid: Some("env 1".into()),
        deliver_by: None,
        auth: None,
        client_helo: "c".into(),
        client_addr: "192.0.2.1:1".into(),
    }
}

fn status(code: u16, e: Option<(u8, u16, u16)>, text: &str, mta: Option<&str>) -> DsnStatus {
    DsnStatus {
        code,
        enhanced: e,
        text: text.into(),
        remote_mta: mta.map(Into::into),
    }
}

type Headers = Vec<(String, String)>;

/// A minimal MIME reader: top headers, then the parts of a multipart body.
struct Parsed {
    headers: Headers,
    parts: Vec<(Headers, Vec<u8>)>,
}

fn split_headers(b: &[u8]) -> (Vec<(String, String)>, Vec<u8>) {
    let i = b
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("no header end");
    let text = std::str::from_utf8(&b[..i]).unwrap();
    let mut headers: Vec<(String, String)> = Vec::new();
    for line in text.split("\r\n") {
        if line.starts_with([' ', '\t']) {
            headers.last_mut().unwrap().1.push_str(line.trim_start());
        } else {
            let (k, v) = line.split_once(':').expect("header without colon");
            headers.push((k.to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    (headers, b[i + 4..].to_vec())
}

fn get<'a>(h: &'a [(String, String)], k: &str) -> Option<&'a str> {
    h.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
}

fn parse(msg: &[u8]) -> Parsed {
    assert!(msg.iter().all(|&b| b != 0));
    // Every line ends in CRLF and is short.
    for line in msg.split(|&b| b == b'\n') {
        assert!(line.len() < 998);
    }
    let (headers, body) = split_headers(msg);
    let ct = get(&headers, "content-type").unwrap();
    assert!(
        ct.starts_with("multipart/report; report-type=delivery-status;"),
        "{ct}"
    );
    let boundary = ct
        .split("boundary=\"")
        .nth(1)
        .unwrap()
        .trim_end_matches('"');
    let delim = format!("\r\n--{boundary}");
    let body = [b"\r\n".as_slice(), &body].concat();
    let text = body.as_slice();
    let mut parts = Vec::new();
    let mut pieces: Vec<&[u8]> = Vec::new();
    let mut rest = text;
    while let Some(i) = rest
        .windows(delim.len())
        .position(|w| w == delim.as_bytes())
    {
        pieces.push(&rest[..i]);
        rest = &rest[i + delim.len()..];
    }
    assert!(rest.starts_with(b"--"), "no close delimiter");
    for p in pieces.into_iter().skip(1) {
        let p = p.strip_prefix(b"\r\n").unwrap();
        let (h, b) = split_headers(p);
        parts.push((h, b));
    }
    Parsed { headers, parts }
}

/// message/delivery-status: groups of fields separated by blank lines.
fn status_groups(b: &[u8]) -> Vec<Vec<(String, String)>> {
    std::str::from_utf8(b)
        .unwrap()
        .split("\r\n\r\n")
        .filter(|g| !g.trim().is_empty())
        .map(|g| {
            g.split("\r\n")
                .filter(|l| !l.is_empty())
                .map(|l| {
                    let (k, v) = l.split_once(':').unwrap();
                    (k.to_ascii_lowercase(), v.trim().to_string())
                })
                .collect()
        })
        .collect()
}

#[test]
fn failure_report_has_every_field() {
    let mut e = env(&[
        ("b@x.test", 0, Some("rfc822;B@x.test")),
        ("c@y.test", NOTIFY_FAILURE, None),
    ]);
    e.ret = Some(Ret::Full);
    let date = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let dsn = bounce(
        "mx.tern.test",
        &e,
        &[
            (
                0,
                status(
                    550,
                    Some((5, 1, 1)),
                    "no such user\nreally",
                    Some("mx.x.test"),
                ),
            ),
            (
                1,
                status(554, Some((5, 6, 3)), "binary not supported", None),
            ),
        ],
        DsnKind::Failure,
        ORIGINAL,
        date,
    )
    .unwrap();
    let p = parse(&dsn);
    assert_eq!(
        get(&p.headers, "from"),
        Some("Mail Delivery System <MAILER-DAEMON@mx.tern.test>")
    );
    assert_eq!(get(&p.headers, "to"), Some("<a@example.org>"));
    assert_eq!(
        get(&p.headers, "subject"),
        Some("Undelivered Mail Returned to Sender")
    );
    assert_eq!(
        get(&p.headers, "date"),
        Some("Fri, 15 Jan 2027 08:00:00 +0000")
    );
    assert_eq!(get(&p.headers, "auto-submitted"), Some("auto-replied"));
    assert_eq!(p.parts.len(), 3);

    let (h, human) = &p.parts[0];
    assert!(get(h, "content-type").unwrap().starts_with("text/plain"));
    let human = String::from_utf8(human.clone()).unwrap();
    assert!(
        human.contains("<b@x.test>: 550 5.1.1 no such user really"),
        "{human}"
    );

    let (h, ds) = &p.parts[1];
    assert_eq!(get(h, "content-type"), Some("message/delivery-status"));
    let groups = status_groups(ds);
    assert_eq!(groups.len(), 3);
    let msg = &groups[0];
    assert_eq!(get(msg, "reporting-mta"), Some("dns; mx.tern.test"));
    assert_eq!(get(msg, "original-envelope-id"), Some("env+201"));
    assert_eq!(
        get(msg, "arrival-date"),
        Some("Tue, 14 Nov 2023 22:13:20 +0000")
    );
    let r0 = &groups[1];
    assert_eq!(get(r0, "original-recipient"), Some("rfc822; B@x.test"));
    assert_eq!(get(r0, "final-recipient"), Some("rfc822; b@x.test"));
    assert_eq!(get(r0, "action"), Some("failed"));
    assert_eq!(get(r0, "status"), Some("5.1.1"));
    assert_eq!(get(r0, "remote-mta"), Some("dns; mx.x.test"));
    assert_eq!(
        get(r0, "diagnostic-code"),
        Some("smtp; 550 5.1.1 no such user really")
    );
    let r1 = &groups[2];
    assert_eq!(get(r1, "original-recipient"), None);
    assert_eq!(get(r1, "status"), Some("5.6.3"));
    assert_eq!(get(r1, "remote-mta"), None);
    assert_eq!(
        get(r1, "diagnostic-code"),
        Some("X-tern; 554 5.6.3 binary not supported")
    );

    let (h, orig) = &p.parts[2];
    assert_eq!(get(h, "content-type"), Some("message/rfc822"));
    assert_eq!(orig, ORIGINAL);
}

#[test]
fn notify_filters_recipients() {
    let e = env(&[
        ("never@x", NOTIFY_NEVER, None),
        ("default@x", 0, None),
        ("delay@x", NOTIFY_DELAY | NOTIFY_FAILURE, None),
        ("success@x", NOTIFY_SUCCESS, None),
    ]);
    let all: Vec<(usize, DsnStatus)> = (0..4)
        .map(|i| (i, status(450, None, "later", Some("mx"))))
        .collect();
    let finals = |dsn: Option<Vec<u8>>| -> Vec<String> {
        let Some(dsn) = dsn else { return vec![] };
        let p = parse(&dsn);
        status_groups(&p.parts[1].1)
            .iter()
            .skip(1)
            .map(|g| get(g, "final-recipient").unwrap().to_string())
            .collect()
    };
    let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    assert_eq!(
        finals(bounce("h", &e, &all, DsnKind::Failure, ORIGINAL, now)),
        ["rfc822; default@x", "rfc822; delay@x"]
    );
    let delay = bounce("h", &e, &all, DsnKind::Delay, ORIGINAL, now);
    let p = parse(delay.as_ref().unwrap());
    assert_eq!(
        get(&p.headers, "subject"),
        Some("Delayed Mail (still being retried)")
    );
    let g = status_groups(&p.parts[1].1);
    assert_eq!(get(&g[1], "action"), Some("delayed"));
    assert_eq!(get(&g[1], "status"), Some("4.0.0"));
    // RET absent on a delay: headers only.
    assert_eq!(
        get(&p.parts[2].0, "content-type"),
        Some("text/rfc822-headers")
    );
    assert_eq!(finals(delay), ["rfc822; delay@x"]);
    let success = bounce("h", &e, &all[3..], DsnKind::Success, ORIGINAL, now);
    assert_eq!(finals(success), ["rfc822; success@x"]);
    // Nobody asked: no DSN.
    assert!(bounce("h", &e, &all[..1], DsnKind::Failure, ORIGINAL, now).is_none());
    assert!(bounce("h", &e, &all[1..2], DsnKind::Success, ORIGINAL, now).is_none());
}

#[test]
fn never_bounce_a_bounce() {
    let mut e = env(&[("b@x", 0, None)]);
    e.sender = String::new();
    let s = [(0, status(550, None, "no", None))];
    assert!(bounce("h", &e, &s, DsnKind::Failure, ORIGINAL, UNIX_EPOCH).is_none());
}

#[test]
fn ret_hdrs_returns_only_headers_and_hostile_text_stays_in_its_field() {
    let mut e = env(&[("b@x", 0, None)]);
    e.ret = Some(Ret::Hdrs);
    e.envid = None;
    // The original contains what would be our default boundary.
    let original = b"Subject: x\r\n\r\n--Q123.0/tern\r\nbody\r\n";
    let s = [(
        0,
        status(
            550,
            None,
            "bad\r\nInjected: yes\r\n\r\n--x",
            Some("mx\r\nEvil: 1"),
        ),
    )];
    let dsn = bounce("h", &e, &s, DsnKind::Failure, original, UNIX_EPOCH).unwrap();
    let p = parse(&dsn);
    let g = status_groups(&p.parts[1].1);
    assert_eq!(get(&g[0], "original-envelope-id"), None);
    assert_eq!(get(&g[1], "status"), Some("5.0.0"));
    assert!(get(&g[1], "injected").is_none() && get(&g[1], "evil").is_none());
    assert!(get(&g[1], "diagnostic-code")
        .unwrap()
        .starts_with("smtp; 550 bad"));
    assert_eq!(
        get(&p.parts[2].0, "content-type"),
        Some("text/rfc822-headers")
    );
    assert_eq!(p.parts[2].1, b"Subject: x\r\n");
}

#[test]
fn eight_bit_original_is_marked() {
    let mut e = env(&[("b@x", 0, None)]);
    e.body_type = BodyType::EightBitMime;
    let original = "Subject: caf\u{e9}\r\n\r\nna\u{ef}ve\r\n".as_bytes();
    let s = [(0, status(550, Some((5, 1, 1)), "no", None))];
    let dsn = bounce("h", &e, &s, DsnKind::Failure, original, UNIX_EPOCH).unwrap();
    let p = parse(&dsn);
    assert_eq!(
        get(&p.parts[2].0, "content-transfer-encoding"),
        Some("8bit")
    );
    assert_eq!(p.parts[2].1, original);
}

#[test]
fn relayed_and_delivered_reports_name_their_action() {
    let e = env(&[
        ("r@x.test", NOTIFY_SUCCESS, Some("rfc822;R@x.test")),
        ("plain@x.test", 0, None),
    ]);
    let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let relayed = [
        (
            0,
            status(250, Some((2, 0, 0)), "queued as 7", Some("mx.x.test")),
        ),
        (
            1,
            status(250, Some((2, 0, 0)), "queued as 7", Some("mx.x.test")),
        ),
    ];
    let dsn = bounce("h", &e, &relayed, DsnKind::Relayed, ORIGINAL, now).unwrap();
    let p = parse(&dsn);
    assert_eq!(get(&p.headers, "subject"), Some("Relayed Mail Report"));
    let g = status_groups(&p.parts[1].1);
    // Only the recipient that asked (NOTIFY=SUCCESS).
    assert_eq!(g.len(), 2);
    assert_eq!(get(&g[1], "final-recipient"), Some("rfc822; r@x.test"));
    assert_eq!(get(&g[1], "original-recipient"), Some("rfc822; R@x.test"));
    assert_eq!(get(&g[1], "action"), Some("relayed"));
    assert_eq!(get(&g[1], "status"), Some("2.0.0"));
    assert_eq!(get(&g[1], "remote-mta"), Some("dns; mx.x.test"));
    assert_eq!(
        get(&g[1], "diagnostic-code"),
        Some("smtp; 250 2.0.0 queued as 7")
    );
    // RET absent: headers only, and not called "undelivered".
    assert_eq!(
        get(&p.parts[2].0, "content-type"),
        Some("text/rfc822-headers")
    );
    assert_eq!(
        get(&p.parts[2].0, "content-description"),
        Some("Message Headers")
    );

    // BY=;N (RFC 2852 §4.1.4.2): every recipient but NOTIFY=NEVER gets "relayed".
    let mut e = env(&[("r@x.test", 0, None), ("never@x.test", NOTIFY_NEVER, None)]);
    e.deliver_by = Some(tern_queue::DeliverBy {
        seconds: 60,
        mode: tern_queue::DeliverByMode::Notify,
        trace: false,
    });
    let dsn = bounce("h", &e, &relayed, DsnKind::Relayed, ORIGINAL, now).unwrap();
    let g = status_groups(&parse(&dsn).parts[1].1);
    assert_eq!(g.len(), 2);
    assert_eq!(get(&g[1], "final-recipient"), Some("rfc822; r@x.test"));

    let local = [(
        0,
        status(250, Some((2, 0, 0)), "delivered to mailbox", None),
    )];
    let e = env(&[("r@x.test", NOTIFY_SUCCESS, None)]);
    let dsn = bounce("h", &e, &local, DsnKind::Success, ORIGINAL, now).unwrap();
    let g = status_groups(&parse(&dsn).parts[1].1);
    assert_eq!(get(&g[1], "action"), Some("delivered"));
    assert_eq!(get(&g[1], "remote-mta"), None);
}

// ------------------------------------------------------------------ through the runner

mod common;

use common::{body, config, empty, envelope, maildir, run, Sink, SinkOpts};
use tern_queue::route::Router;

/// The sender's domain is delivered into `mbox` (so DSNs land there); everything else
/// goes to `sink`.
fn relay_router(sink: &Sink, mbox: &std::path::Path, local: Option<&std::path::Path>) -> Router {
    let sender = format!("maildir:{}", mbox.display());
    let far = sink.route("");
    let mut routes = vec![("sender.test", sender), ("*", far)];
    if let Some(l) = local {
        routes.push(("local.test", format!("maildir:{}", l.display())));
    }
    Router::from_config(None, routes.iter().map(|(k, v)| (*k, v.as_str()))).unwrap()
}

fn only_dsn(mbox: &std::path::Path) -> Parsed {
    let got = maildir(mbox);
    assert_eq!(got.len(), 1, "expected one DSN, got {}", got.len());
    // A maildir file ends its lines in LF (maildir(5)); the DSN as it was queued is the
    // same with CRLF (the report has no lone CR or LF of its own).
    assert!(
        !got[0].windows(2).any(|w| w == b"\r\n"),
        "CRLF in a maildir file"
    );
    let wire: Vec<u8> = got[0]
        .iter()
        .flat_map(|&b| {
            if b == b'\n' {
                vec![b'\r', b'\n']
            } else {
                vec![b]
            }
        })
        .collect();
    let (h, _) = split_headers(&wire);
    assert_eq!(get(&h, "return-path"), Some("<>"));
    assert_eq!(get(&h, "delivered-to"), Some("s@sender.test"));
    parse(&wire)
}

/// RFC 3461 §5.2.2: NOTIFY=SUCCESS relayed to a hop without DSN gets a "relayed" DSN;
/// the other recipients (FAILURE only, no NOTIFY) get nothing, and nothing DSN-ish goes
/// on the wire to that hop.
#[test]
fn notify_success_to_a_hop_without_dsn_gets_a_relayed_report() {
    let sink = Sink::start(SinkOpts::plain(&["PIPELINING"]));
    let mbox = tempfile::tempdir().unwrap();
    let cfg = config(relay_router(&sink, mbox.path(), None));
    let mut e = envelope(
        "s@sender.test",
        &[
            ("a@far.test", NOTIFY_SUCCESS, Some("rfc822;A@far.test")),
            ("b@far.test", NOTIFY_FAILURE, None),
            ("c@far.test", 0, None),
        ],
    );
    e.envid = Some("E-1".into());
    let r = run(
        cfg,
        vec![(e, body("relayed"))],
        empty,
        Duration::from_secs(20),
    );
    assert_eq!(
        (r.left, r.counts.sent, r.counts.bounced),
        (0, 4, 0),
        "{r:?}"
    );
    let t = sink.txns();
    assert_eq!(t.len(), 1);
    assert!(t[0].rcpts.iter().all(|l| !l.contains("NOTIFY")), "{t:?}");
    assert!(!t[0].mail.contains("ENVID"));

    let p = only_dsn(mbox.path());
    assert_eq!(get(&p.headers, "to"), Some("<s@sender.test>"));
    assert_eq!(get(&p.headers, "subject"), Some("Relayed Mail Report"));
    let g = status_groups(&p.parts[1].1);
    assert_eq!(g.len(), 2, "one recipient group: {g:?}");
    assert_eq!(get(&g[0], "reporting-mta"), Some("dns; relay.test"));
    assert_eq!(get(&g[0], "original-envelope-id"), Some("E-1"));
    assert_eq!(get(&g[1], "final-recipient"), Some("rfc822; a@far.test"));
    assert_eq!(get(&g[1], "original-recipient"), Some("rfc822; A@far.test"));
    assert_eq!(get(&g[1], "action"), Some("relayed"));
    assert_eq!(get(&g[1], "status"), Some("2.0.0"));
    assert_eq!(get(&g[1], "remote-mta"), Some("dns; 127.0.0.1"));
    assert_eq!(
        get(&g[1], "diagnostic-code"),
        Some("smtp; 250 2.0.0 queued as 1")
    );
    let (h, orig) = &p.parts[2];
    assert_eq!(get(h, "content-type"), Some("text/rfc822-headers"));
    assert!(String::from_utf8_lossy(orig).contains("Subject: relayed"));
}

/// A hop that offers DSN is handed NOTIFY and ORCPT and reports itself: nothing from us.
#[test]
fn notify_success_to_a_dsn_hop_is_passed_on_and_no_report_is_sent() {
    let sink = Sink::start(SinkOpts::plain(&["PIPELINING", "DSN"]));
    let mbox = tempfile::tempdir().unwrap();
    let cfg = config(relay_router(&sink, mbox.path(), None));
    let mut e = envelope(
        "s@sender.test",
        &[(
            "a@far.test",
            NOTIFY_SUCCESS | NOTIFY_DELAY,
            Some("rfc822;A@far.test"),
        )],
    );
    e.envid = Some("E-2".into());
    e.ret = Some(Ret::Hdrs);
    let r = run(
        cfg,
        vec![(e, body("passed"))],
        empty,
        Duration::from_secs(20),
    );
    assert_eq!((r.left, r.counts.sent), (0, 1), "{r:?}");
    let t = sink.txns();
    assert_eq!(
        t[0].rcpts,
        ["RCPT TO:<a@far.test> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;A@far.test"]
    );
    assert!(t[0].mail.ends_with("RET=HDRS ENVID=E-2"), "{}", t[0].mail);
    assert!(maildir(mbox.path()).is_empty(), "a DSN was sent");
}

/// NOTIFY=SUCCESS delivered into a maildir here: "delivered", without file names.
#[test]
fn local_delivery_with_notify_success_gets_a_delivered_report() {
    let sink = Sink::start(SinkOpts::plain(&[]));
    let mbox = tempfile::tempdir().unwrap();
    let local = tempfile::tempdir().unwrap();
    let cfg = config(relay_router(&sink, mbox.path(), Some(local.path())));
    let e = envelope(
        "s@sender.test",
        &[
            ("u@local.test", NOTIFY_SUCCESS, None),
            ("v@local.test", NOTIFY_FAILURE, None),
        ],
    );
    let r = run(
        cfg,
        vec![(e, body("local"))],
        empty,
        Duration::from_secs(20),
    );
    assert_eq!((r.left, r.counts.sent), (0, 3), "{r:?}");
    assert_eq!(maildir(local.path()).len(), 2);
    let p = only_dsn(mbox.path());
    assert_eq!(
        get(&p.headers, "subject"),
        Some("Successful Mail Delivery Report")
    );
    let g = status_groups(&p.parts[1].1);
    assert_eq!(g.len(), 2);
    assert_eq!(get(&g[1], "final-recipient"), Some("rfc822; u@local.test"));
    assert_eq!(get(&g[1], "action"), Some("delivered"));
    assert_eq!(get(&g[1], "status"), Some("2.0.0"));
    assert_eq!(get(&g[1], "remote-mta"), None);
    assert_eq!(
        get(&g[1], "diagnostic-code"),
        Some("X-tern; 250 2.0.0 delivered to mailbox")
    );
    assert!(!String::from_utf8_lossy(&maildir(mbox.path())[0])
        .contains(&local.path().display().to_string()));
}

/// Never a DSN to `<>`: the relayed message is the only one the runner sends.
#[test]
fn null_sender_gets_no_success_report() {
    let sink = Sink::start(SinkOpts::plain(&[]));
    let mbox = tempfile::tempdir().unwrap();
    let cfg = config(relay_router(&sink, mbox.path(), None));
    let e = envelope("", &[("a@far.test", NOTIFY_SUCCESS, None)]);
    let r = run(cfg, vec![(e, body("null"))], empty, Duration::from_secs(20));
    assert_eq!((r.left, r.counts.sent), (0, 1), "{r:?}");
    assert_eq!(sink.txns().len(), 1);
    assert!(maildir(mbox.path()).is_empty());
}

/// BY=;N relayed to a hop with neither DSN nor DELIVERBY: a "relayed" report for every
/// recipient but NOTIFY=NEVER (RFC 2852 §4.1.4.2).
#[test]
fn deliverby_notify_to_a_bare_hop_gets_a_relayed_report() {
    let sink = Sink::start(SinkOpts::plain(&["PIPELINING"]));
    let mbox = tempfile::tempdir().unwrap();
    let cfg = config(relay_router(&sink, mbox.path(), None));
    let mut e = envelope(
        "s@sender.test",
        &[("a@far.test", 0, None), ("n@far.test", NOTIFY_NEVER, None)],
    );
    e.deliver_by = Some(tern_queue::DeliverBy {
        seconds: 600,
        mode: tern_queue::DeliverByMode::Notify,
        trace: false,
    });
    let r = run(cfg, vec![(e, body("byn"))], empty, Duration::from_secs(20));
    assert_eq!((r.left, r.counts.sent), (0, 3), "{r:?}");
    let g = status_groups(&only_dsn(mbox.path()).parts[1].1);
    assert_eq!(g.len(), 2);
    assert_eq!(get(&g[1], "final-recipient"), Some("rfc822; a@far.test"));
    assert_eq!(get(&g[1], "action"), Some("relayed"));
}
