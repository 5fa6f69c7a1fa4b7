//! Arbitrary bytes as a remote server's replies: the outbound parser must never panic and
//! must consume what it claims to.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some((_reply, used))) = tern_queue::client::parse_reply(rest) {
        assert!(used > 0 && used <= rest.len());
        rest = &rest[used..];
    }
});
