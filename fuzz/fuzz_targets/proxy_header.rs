//! Arbitrary bytes as the start of a connection behind a load balancer: the PROXY header
//! parser must never panic, must claim no more bytes than it was given, and must decide
//! the same way whatever the split: once a prefix is Done (or an error), the whole input
//! gives the same Done (or error).
#![no_main]
use tern_smtp::proxy::{parse, Parse};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let whole = parse(data);
    if let Ok(Parse::Done { len, .. }) = whole {
        assert!(len > 0 && len <= data.len());
    }
    // Headers are at most 536 bytes: past that, every prefix decides like the whole.
    for k in 0..=data.len().min(600) {
        let prefix = parse(&data[..k]);
        if let Ok(Parse::Done { len, .. }) = prefix {
            assert!(len <= k);
        }
        if prefix != Ok(Parse::Incomplete) {
            assert_eq!(prefix, whole, "prefix of {k} bytes decided differently");
        }
    }
});
