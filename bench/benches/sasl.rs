//! Server-side SASL handshake cost: ns per complete server-side exchange.
//!
//! Each measured iteration runs every server step of one exchange (challenge
//! generation, nonce registration/consumption, verification, server-final).
//! Client responses are computed once outside the loop; CRAM-MD5, DIGEST-MD5
//! and SCRAM use the fixed-nonce hook (`Exchange::start_with_nonce`) so one
//! precomputed response stays valid. `*_random_challenge` measures the
//! challenge step alone with a real random nonce, to show that cost.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use tern_smtp::sasl::{client, AuthContext, Exchange, Mechanism, NonceCache, Step};
use tern_smtp::users::secrets::{scram_hi, Secrets};
use tern_smtp::users::UserDb;

const HOST: &str = "mx.example.org";
const REALM: &str = "example.org";
const USER: &str = "bench";
const PASSWORD: &str = "correct horse battery staple";

struct Fixture {
    db: UserDb,
    nonces: NonceCache,
}

impl Fixture {
    fn new() -> Fixture {
        let mut db = UserDb::empty();
        let secrets = Secrets::derive(USER, REALM, PASSWORD, PASSWORD, b"0123456789abcdef", 4096);
        db.insert(USER, REALM, secrets).expect("insert");
        Fixture {
            db,
            nonces: NonceCache::new(4096, Duration::from_secs(300)),
        }
    }

    fn ctx(&mut self) -> AuthContext<'_> {
        AuthContext {
            users: &self.db,
            nonces: &mut self.nonces,
            hostname: HOST,
            realm: REALM,
            allow_authzid: false,
            now: Instant::now(),
            unix_secs: 1_796_281_560,
            login: None,
        }
    }
}

fn is_success(step: &Step) -> bool {
    matches!(step, Step::Success { .. })
}

fn bench(c: &mut Criterion) {
    let mut f = Fixture::new();
    let mut g = c.benchmark_group("sasl_server_handshake");
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50);

    // CRAM-MD5
    let token = "4711.1700000000";
    let challenge = format!("<{token}@{HOST}>");
    let cram = client::cram_md5(USER, PASSWORD, challenge.as_bytes());
    let run_cram = |f: &mut Fixture| {
        let (mut ex, _) = Exchange::start_with_nonce(Mechanism::CramMd5, None, &mut f.ctx(), token);
        ex.step(black_box(&cram), &mut f.ctx())
    };
    assert!(is_success(&run_cram(&mut f)));
    g.bench_function("cram_md5", |b| b.iter(|| run_cram(&mut f)));

    // DIGEST-MD5
    let nonce = "QmVuY2hOb25jZTEyMzQ1Njc4";
    let (digest, _) = client::digest_md5(
        USER,
        REALM,
        PASSWORD,
        nonce,
        "cnonce42",
        &format!("smtp/{HOST}"),
    );
    let run_digest = |f: &mut Fixture| {
        let (mut ex, _) =
            Exchange::start_with_nonce(Mechanism::DigestMd5, None, &mut f.ctx(), nonce);
        ex.step(black_box(&digest), &mut f.ctx())
    };
    assert!(is_success(&run_digest(&mut f)));
    g.bench_function("digest_md5", |b| b.iter(|| run_digest(&mut f)));

    // SCRAM-SHA-256, 4096 iterations stored (the server never iterates).
    let first = "n,,n=bench,r=fyko+d2lbbFgONRv9qkxdawL";
    let snonce = "3rfcNHYJY1ZVvWVs7j";
    let server_first = {
        let (_, step) = Exchange::start_with_nonce(
            Mechanism::ScramSha256,
            Some(first.as_bytes()),
            &mut f.ctx(),
            snonce,
        );
        match step {
            Step::Challenge(c) => c,
            other => panic!("{other:?}"),
        }
    };
    let scram_final =
        client::scram_client_final(first, &server_first, PASSWORD).expect("client-final");
    let run_scram = |f: &mut Fixture| {
        let (mut ex, _) = Exchange::start_with_nonce(
            Mechanism::ScramSha256,
            Some(black_box(first.as_bytes())),
            &mut f.ctx(),
            snonce,
        );
        ex.step(black_box(&scram_final), &mut f.ctx())
    };
    assert!(is_success(&run_scram(&mut f)));
    g.bench_function("scram_sha256_4096", |b| b.iter(|| run_scram(&mut f)));

    // PLAIN (verified against the DIGEST-MD5 H(user:realm:password)).
    let plain = client::plain("", USER, PASSWORD);
    let run_plain =
        |f: &mut Fixture, msg: &[u8]| Exchange::start(Mechanism::Plain, Some(msg), &mut f.ctx()).1;
    assert!(is_success(&run_plain(&mut f, &plain)));
    g.bench_function("plain", |b| b.iter(|| run_plain(&mut f, black_box(&plain))));
    let plain_unknown = client::plain("", "nobody", PASSWORD);
    assert!(!is_success(&run_plain(&mut f, &plain_unknown)));
    g.bench_function("plain_unknown_user", |b| {
        b.iter(|| run_plain(&mut f, black_box(&plain_unknown)))
    });

    // LOGIN
    let run_login = |f: &mut Fixture| {
        let (mut ex, _) = Exchange::start(Mechanism::Login, None, &mut f.ctx());
        ex.step(black_box(USER.as_bytes()), &mut f.ctx());
        ex.step(black_box(PASSWORD.as_bytes()), &mut f.ctx())
    };
    assert!(is_success(&run_login(&mut f)));
    g.bench_function("login", |b| b.iter(|| run_login(&mut f)));

    // Challenge generation with real random nonces (no verification).
    g.bench_function("digest_md5_random_challenge", |b| {
        b.iter(|| Exchange::start(Mechanism::DigestMd5, None, &mut f.ctx()).1)
    });
    g.bench_function("cram_md5_random_challenge", |b| {
        b.iter(|| Exchange::start(Mechanism::CramMd5, None, &mut f.ctx()).1)
    });
    g.finish();

    // For context: what a SCRAM client (and `tern passwd`) pays per password.
    let mut g = c.benchmark_group("scram_client_cost");
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .sample_size(10);
    g.bench_function("hi_4096", |b| {
        b.iter(|| scram_hi(black_box(PASSWORD.as_bytes()), b"0123456789abcdef", 4096))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
