//! The runner against scripted next hops: per-destination rate limits, per-route TLS
//! policies (with real TLS), and DELIVERBY (RFC 2852) passed on or refused.

mod common;

use std::time::{Duration, Instant};

use common::{body, config, empty, envelope, maildir, run, run_script, tls_pair, Sink, SinkOpts};
use tern_queue::client::StarttlsPolicy;
use tern_queue::ratelimit::RateLimit;
use tern_queue::route::Router;
use tern_queue::{DeliverBy, DeliverByMode, NOTIFY_FAILURE};

fn router(routes: &[(&str, &str)]) -> Router {
    Router::from_config(None, routes.iter().copied()).unwrap()
}

/// The most arrivals in any window of length `w` (windows starting at an arrival).
fn max_in_window(at: &[Instant], w: Duration) -> usize {
    let mut at = at.to_vec();
    at.sort();
    (0..at.len())
        .map(|i| at[i..].iter().take_while(|&&t| t < at[i] + w).count())
        .max()
        .unwrap_or(0)
}

// ------------------------------------------------------------------ rate limits

/// 12 messages to one destination with `queue.destination_rate` 4/s, burst 2: every one
/// arrives, no 1 s window holds more than rate + burst = 6 of them, and waiting for the
/// limiter is neither a deferral nor a bounce.
#[test]
fn destination_rate_spreads_arrivals_without_counting_failures() {
    let sink = Sink::start(SinkOpts::plain(&["PIPELINING"]));
    let mut cfg = config(router(&[("*", &sink.route(""))]));
    cfg.destination_rate = RateLimit::per_second(4.0, 2);
    let msgs = (0..12)
        .map(|i| {
            (
                envelope("s@sender.test", &[("a@far.test", 0, None)]),
                body(&format!("r{i}")),
            )
        })
        .collect();
    let r = run(cfg, msgs, empty, Duration::from_secs(30));
    assert_eq!(r.left, 0, "{r:?}");
    assert_eq!(
        (r.counts.sent, r.counts.deferred, r.counts.bounced),
        (12, 0, 0)
    );
    let at: Vec<Instant> = sink.txns().iter().map(|t| t.at).collect();
    assert_eq!(at.len(), 12);
    let most = max_in_window(&at, Duration::from_secs(1));
    assert!(most <= 6, "{most} arrivals within one second");
    // Unlimited, the same twelve would come in one burst: the limiter did something.
    assert!(most < 12);
}

/// A route's own `rate=` wins over the global one (here: none), per destination: the
/// limited route is paced while another destination of the same message is not.
#[test]
fn route_rate_overrides_and_applies_per_destination() {
    let slow = Sink::start(SinkOpts::plain(&[]));
    let fast = Sink::start(SinkOpts::plain(&[]));
    let cfg = config(router(&[
        ("slow.test", &slow.route("rate=2 burst=1")),
        ("fast.test", &fast.route("")),
    ]));
    let msgs = (0..6)
        .map(|i| {
            (
                envelope(
                    "s@sender.test",
                    &[("a@slow.test", 0, None), ("b@fast.test", 0, None)],
                ),
                body(&format!("m{i}")),
            )
        })
        .collect();
    let r = run(cfg, msgs, empty, Duration::from_secs(30));
    assert_eq!(r.left, 0, "{r:?}");
    assert_eq!((r.counts.sent, r.counts.deferred), (12, 0));
    let slow_at: Vec<Instant> = slow.txns().iter().map(|t| t.at).collect();
    assert_eq!(slow_at.len(), 6);
    let most = max_in_window(&slow_at, Duration::from_secs(1));
    assert!(
        most <= 3,
        "{most} arrivals at the 2/s route within one second"
    );
    assert_eq!(fast.txns().len(), 6);
}

// ------------------------------------------------------------------ log lines

/// Sent, deferred and bounced recipients are logged in one form, `host[addr] said: reply`,
/// so a bounce can be traced to the next hop that refused it like any other outcome.
#[test]
fn a_bounce_names_the_next_hop_that_refused_it_like_a_delivery() {
    let mut opts = SinkOpts::plain(&["PIPELINING"]);
    opts.refuse = vec!["nobody@".into()];
    let sink = Sink::start(opts);
    let cfg = config(router(&[("*", &sink.route(""))]));
    let msg = envelope(
        "s@sender.test",
        &[("a@far.test", 0, None), ("nobody@far.test", 0, None)],
    );
    let r = run(cfg, vec![(msg, body("b"))], empty, Duration::from_secs(20));
    assert_eq!(r.left, 0, "{r:?}");
    // The recipient that was taken, and the bounce to the sender.
    assert_eq!((r.counts.sent, r.counts.bounced), (2, 1), "{r:?}");
    let hop = format!("127.0.0.1[{}] said: ", sink.addr);
    let (_, bounced) = r.counts.recent.back().unwrap();
    assert!(
        bounced.contains(&format!(
            "nobody@far.test: bounced: {hop}550 5.1.1 no such user"
        )),
        "{bounced}"
    );
}

// ------------------------------------------------------------------ TLS policies

/// Waits until the first attempt was deferred.
fn deferred(r: &tern_queue::runner::Runner) -> bool {
    r.delivery_counts().deferred >= 1
}

#[test]
fn verify_fails_against_a_self_signed_cert_without_its_ca_and_the_mail_stays() {
    let (server, _) = tls_pair(&["127.0.0.1", "localhost"]);
    let sink = Sink::start(SinkOpts::starttls(&["PIPELINING"], server));
    // Trust anchors that do not include the sink's certificate.
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("other-ca.pem");
    std::fs::write(&other, tls_pair(&["127.0.0.1"]).1).unwrap();
    let route = sink.route(&format!("tls=verify ca={}", other.display()));
    let cfg = config(router(&[("*", &route)]));
    let r = run(
        cfg,
        vec![(
            envelope("s@sender.test", &[("a@far.test", 0, None)]),
            body("v"),
        )],
        deferred,
        Duration::from_secs(20),
    );
    assert_eq!(r.left, 1, "deferred, still queued: {r:?}");
    assert_eq!((r.counts.sent, r.counts.bounced), (0, 0));
    let why = &r.counts.recent.back().unwrap().1;
    assert!(why.contains("TLS handshake failed"), "{why}");
    assert!(sink.txns().is_empty(), "nothing may go out unverified");
}

#[test]
fn verify_succeeds_with_the_ca_file() {
    let (server, pem) = tls_pair(&["127.0.0.1", "localhost"]);
    let sink = Sink::start(SinkOpts::starttls(&["PIPELINING"], server));
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, pem).unwrap();
    let cfg = config(router(&[(
        "*",
        &sink.route(&format!("tls=verify ca={}", ca.display())),
    )]));
    let r = run(
        cfg,
        vec![(
            envelope("s@sender.test", &[("a@far.test", 0, None)]),
            body("v"),
        )],
        empty,
        Duration::from_secs(20),
    );
    assert_eq!((r.left, r.counts.sent), (0, 1), "{r:?}");
    let t = sink.txns();
    assert_eq!(t.len(), 1);
    assert!(t[0].tls, "delivered inside TLS");
}

/// Two messages to a `tls=verify` hop that closes each connection after its message: the
/// second connection resumes the TLS session of the first, because the shard keeps one
/// client configuration (and session store) per trust policy.
#[test]
fn the_second_connection_to_a_hop_resumes_the_tls_session() {
    let (server, pem) = tls_pair(&["127.0.0.1", "localhost"]);
    let mut opts = SinkOpts::starttls(&["PIPELINING"], server);
    opts.close_after_message = true;
    let sink = Sink::start(opts);
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, pem).unwrap();
    let route = sink.route(&format!("tls=verify ca={}", ca.display()));
    let cfg = config(router(&[("*", &route)]));
    let r = run_script(cfg, |h| async move {
        for subject in ["one", "two"] {
            h.queue(
                envelope("s@sender.test", &[("a@far.test", 0, None)]),
                body(subject),
            )
            .await;
            assert!(h.until(empty, Duration::from_secs(20)).await);
        }
        // The global policy's (`may`: no verification) and the route's, built at start.
        assert_eq!(h.runner.client_tls_configs(), 2);
    });
    assert_eq!((r.left, r.counts.sent), (0, 2), "{r:?}");
    assert_eq!(sink.connections(), 2, "the hop closed the first connection");
    let t = sink.txns();
    assert!(t.iter().all(|t| t.tls));
    let resumed: Vec<bool> = t.iter().map(|t| t.resumed).collect();
    assert_eq!(resumed, [false, true], "full handshake, then resumed");
}

/// A reload rebuilds the configurations: a CA file changed on disk is not read per
/// connection (the cached configuration still delivers), but after
/// `reload_client_tls` the new trust anchors apply and the hop no longer verifies.
#[test]
fn a_changed_ca_file_takes_effect_on_reload() {
    let (server, pem) = tls_pair(&["127.0.0.1", "localhost"]);
    // A new connection per message: each one is set up with the configuration in use.
    let mut opts = SinkOpts::starttls(&["PIPELINING"], server);
    opts.close_after_message = true;
    let sink = Sink::start(opts);
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, pem).unwrap();
    let route = sink.route(&format!("tls=verify ca={}", ca.display()));
    let cfg = config(router(&[("*", &route)]));
    let ca2 = ca.clone();
    let r = run_script(cfg, move |h| async move {
        let msg = |s| {
            (
                envelope("s@sender.test", &[("a@far.test", 0, None)]),
                body(s),
            )
        };
        let (e, b) = msg("before");
        h.queue(e, b).await;
        assert!(h.until(empty, Duration::from_secs(20)).await);
        // Another CA in the file: nothing changes until the reload.
        std::fs::write(&ca2, tls_pair(&["127.0.0.1"]).1).unwrap();
        let (e, b) = msg("changed, not reloaded");
        h.queue(e, b).await;
        assert!(h.until(empty, Duration::from_secs(20)).await);
        assert!(h.runner.reload_client_tls().await.is_empty());
        let (e, b) = msg("reloaded");
        h.queue(e, b).await;
        assert!(h.until(deferred, Duration::from_secs(20)).await);
    });
    assert_eq!(
        (r.left, r.counts.sent, r.counts.deferred),
        (1, 2, 1),
        "{r:?}"
    );
    let why = &r.counts.recent.back().unwrap().1;
    assert!(why.contains("TLS handshake failed"), "{why}");
    assert_eq!(sink.txns().len(), 2, "nothing went out unverified");
    assert_eq!(sink.connections(), 3);
}

/// A CA file that cannot be read defers the mail with that error before any connection.
#[test]
fn an_unreadable_ca_file_defers_without_connecting() {
    let sink = Sink::start(SinkOpts::plain(&["PIPELINING"]));
    let route = sink.route("tls=verify ca=/nonexistent/tern-test-ca.pem");
    let cfg = config(router(&[("*", &route)]));
    let r = run(
        cfg,
        vec![(
            envelope("s@sender.test", &[("a@far.test", 0, None)]),
            body("x"),
        )],
        deferred,
        Duration::from_secs(20),
    );
    assert_eq!(
        (r.left, r.counts.sent, r.counts.bounced),
        (1, 0, 0),
        "{r:?}"
    );
    let why = &r.counts.recent.back().unwrap().1;
    assert!(
        why.contains("cannot read CA file /nonexistent/tern-test-ca.pem"),
        "{why}"
    );
    assert_eq!(
        sink.connections(),
        0,
        "a local fault: the hop is not bothered"
    );
}

/// The global default is "STARTTLS required"; the route says `may`, and its hop has no
/// STARTTLS: plaintext.
#[test]
fn may_falls_back_to_plaintext_when_the_hop_lacks_starttls() {
    let sink = Sink::start(SinkOpts::plain(&["PIPELINING"]));
    let mut cfg = config(router(&[("*", &sink.route("tls=may"))]));
    cfg.client.starttls = StarttlsPolicy::Required;
    let r = run(
        cfg,
        vec![(
            envelope("s@sender.test", &[("a@far.test", 0, None)]),
            body("m"),
        )],
        empty,
        Duration::from_secs(20),
    );
    assert_eq!((r.left, r.counts.sent), (0, 1), "{r:?}");
    assert!(!sink.txns()[0].tls);
}

#[test]
fn encrypt_defers_when_the_hop_lacks_starttls() {
    let sink = Sink::start(SinkOpts::plain(&["PIPELINING"]));
    let cfg = config(router(&[("*", &sink.route("tls=encrypt"))]));
    let r = run(
        cfg,
        vec![(
            envelope("s@sender.test", &[("a@far.test", 0, None)]),
            body("e"),
        )],
        deferred,
        Duration::from_secs(20),
    );
    assert_eq!(r.left, 1, "{r:?}");
    assert_eq!((r.counts.sent, r.counts.bounced), (0, 0));
    let why = &r.counts.recent.back().unwrap().1;
    assert!(why.contains("does not offer STARTTLS"), "{why}");
    assert!(sink.txns().is_empty());
    // It connected (and asked), then gave up before MAIL.
    assert!(sink.connections() >= 1);
}

/// `encrypt` accepts any certificate (no verification), but insists on TLS.
#[test]
fn encrypt_takes_a_self_signed_cert() {
    let (server, _) = tls_pair(&["elsewhere.example"]);
    let sink = Sink::start(SinkOpts::starttls(&[], server));
    let cfg = config(router(&[("*", &sink.route("tls=encrypt"))]));
    let r = run(
        cfg,
        vec![(
            envelope("s@sender.test", &[("a@far.test", 0, None)]),
            body("e"),
        )],
        empty,
        Duration::from_secs(20),
    );
    assert_eq!((r.left, r.counts.sent), (0, 1), "{r:?}");
    assert!(sink.txns()[0].tls);
}

/// Two routes to the same address, `none` and `verify`: the plaintext connection cached
/// after the first is not reused for the second (the pool keys by security settings).
#[test]
fn a_plaintext_connection_is_not_reused_for_a_verify_route() {
    let (server, pem) = tls_pair(&["127.0.0.1"]);
    let sink = Sink::start(SinkOpts::starttls(&["PIPELINING"], server));
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, pem).unwrap();
    let mut cfg = config(router(&[
        ("plain.test", &sink.route("tls=none")),
        (
            "strict.test",
            &sink.route(&format!("tls=verify ca={}", ca.display())),
        ),
    ]));
    // One delivery at a time, so the second finds the first's idle connection.
    cfg.concurrency = 1;
    let r = run(
        cfg,
        vec![
            (
                envelope("s@sender.test", &[("a@plain.test", 0, None)]),
                body("1"),
            ),
            (
                envelope("s@sender.test", &[("b@strict.test", 0, None)]),
                body("2"),
            ),
        ],
        empty,
        Duration::from_secs(20),
    );
    assert_eq!((r.left, r.counts.sent), (0, 2), "{r:?}");
    let t = sink.txns();
    let tls_of = |rcpt: &str| t.iter().find(|x| x.rcpts[0].contains(rcpt)).unwrap().tls;
    assert!(!tls_of("a@plain.test"));
    assert!(tls_of("b@strict.test"));
    assert_eq!(sink.connections(), 2);
}

// ------------------------------------------------------------------ DELIVERBY

fn by(seconds: i64, mode: DeliverByMode, trace: bool) -> Option<DeliverBy> {
    Some(DeliverBy {
        seconds,
        mode,
        trace,
    })
}

/// RFC 2852 §4: the by-time goes on less the time the message spent here.
#[test]
fn deliverby_goes_on_with_the_remaining_time() {
    let sink = Sink::start(SinkOpts::plain(&["PIPELINING", "DELIVERBY 60"]));
    let cfg = config(router(&[("*", &sink.route(""))]));
    let mut r_env = envelope("s@sender.test", &[("a@far.test", 0, None)]);
    r_env.arrival_unix_micros -= 100_000_000; // arrived 100 s ago
    r_env.deliver_by = by(1000, DeliverByMode::Return, true);
    let mut n_env = envelope("s@sender.test", &[("b@far.test", 0, None)]);
    n_env.arrival_unix_micros -= 100_000_000;
    n_env.deliver_by = by(30, DeliverByMode::Notify, false);
    let r = run(
        cfg,
        vec![(r_env, body("r")), (n_env, body("n"))],
        empty,
        Duration::from_secs(20),
    );
    assert_eq!((r.left, r.counts.sent), (0, 2), "{r:?}");
    let t = sink.txns();
    let mail_of = |rcpt: &str| {
        t.iter()
            .find(|x| x.rcpts[0].contains(rcpt))
            .unwrap()
            .mail
            .clone()
    };
    let by_of = |mail: &str| -> (i64, String) {
        let v = mail.split(" BY=").nth(1).expect("BY= passed on");
        let (n, m) = v.split_once(';').unwrap();
        (n.parse().unwrap(), m.trim().to_string())
    };
    let (n, mode) = by_of(&mail_of("a@far.test"));
    assert!((890..=900).contains(&n), "{n}");
    assert_eq!(mode, "RT");
    // N mode: already late, so the remaining time is negative (and still sent).
    let (n, mode) = by_of(&mail_of("b@far.test"));
    assert!((-80..=-70).contains(&n), "{n}");
    assert_eq!(mode, "N");
}

/// RFC 2852 §4.1.4.2: a BY=;R message is not relayed to a hop without DELIVERBY; it
/// is returned (5.4.7). The relay's own bounce goes to the sender's maildir.
#[test]
fn deliverby_return_mode_is_not_relayed_to_a_hop_without_deliverby() {
    let sink = Sink::start(SinkOpts::plain(&["PIPELINING", "DSN"]));
    let dir = tempfile::tempdir().unwrap();
    let mbox = format!("maildir:{}", dir.path().display());
    let cfg = config(router(&[("sender.test", &mbox), ("*", &sink.route(""))]));
    let mut env = envelope("s@sender.test", &[("a@far.test", NOTIFY_FAILURE, None)]);
    env.deliver_by = by(600, DeliverByMode::Return, false);
    let r = run(cfg, vec![(env, body("r"))], empty, Duration::from_secs(20));
    assert_eq!(r.left, 0, "{r:?}");
    assert_eq!(r.counts.bounced, 1);
    assert!(sink.txns().is_empty(), "relayed although R mode");
    let got = maildir(dir.path());
    assert_eq!(got.len(), 1);
    let dsn = String::from_utf8_lossy(&got[0]);
    assert!(dsn.contains("Action: failed"), "{dsn}");
    assert!(dsn.contains("Status: 5.4.7"), "{dsn}");
    assert!(dsn.contains("does not support DELIVERBY"), "{dsn}");
}

/// N mode to a hop with DSN but without DELIVERBY: relayed without BY=, and NOTIFY gets
/// DELAY so the next hop still reports lateness (the sendmail reading of §4.1.4.2).
#[test]
fn deliverby_notify_mode_adds_notify_delay_at_a_dsn_hop() {
    let sink = Sink::start(SinkOpts::plain(&["PIPELINING", "DSN"]));
    let cfg = config(router(&[("*", &sink.route(""))]));
    let mut env = envelope(
        "s@sender.test",
        &[
            ("a@far.test", 0, None),
            ("b@far.test", tern_queue::NOTIFY_SUCCESS, None),
            ("c@far.test", tern_queue::NOTIFY_NEVER, None),
        ],
    );
    env.deliver_by = by(600, DeliverByMode::Notify, false);
    let r = run(cfg, vec![(env, body("n"))], empty, Duration::from_secs(20));
    assert_eq!((r.left, r.counts.sent), (0, 3), "{r:?}");
    let t = sink.txns();
    assert_eq!(t.len(), 1);
    assert!(!t[0].mail.contains("BY="), "{}", t[0].mail);
    assert_eq!(
        t[0].rcpts,
        [
            "RCPT TO:<a@far.test> NOTIFY=FAILURE,DELAY",
            "RCPT TO:<b@far.test> NOTIFY=SUCCESS,DELAY",
            "RCPT TO:<c@far.test> NOTIFY=NEVER",
        ]
    );
}
