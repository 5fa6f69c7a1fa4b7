//! Arbitrary client messages through every SASL mechanism's server steps: never a panic.
#![no_main]
use std::time::{Duration, Instant};

use tern_engine::sasl::nonces::NonceCache;
use tern_engine::sasl::{AuthContext, Exchange, Mechanism, Step};
use tern_engine::users::UserDb;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else { return };
    let mech = Mechanism::ALL[sel as usize % Mechanism::ALL.len()];
    let users = UserDb::empty();
    let mut nonces = NonceCache::new(64, Duration::from_secs(60));
    let mut ctx = AuthContext {
        users: &users,
        nonces: &mut nonces,
        hostname: "mx.test",
        realm: "mx.test",
        allow_authzid: sel & 0x80 != 0,
        now: Instant::now(),
    };
    // The input is split into client messages at 0xff bytes.
    let mut parts = rest.split(|&b| b == 0xff);
    let initial = if sel & 0x40 != 0 { parts.next() } else { None };
    let (mut ex, mut step) = Exchange::start(mech, initial, &mut ctx);
    for p in parts {
        if !matches!(step, Step::Challenge(_)) {
            break;
        }
        step = ex.step(p, &mut ctx);
    }
});
