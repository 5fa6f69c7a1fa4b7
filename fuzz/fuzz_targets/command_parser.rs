//! Arbitrary bytes as one SMTP command line: the parser must never panic.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = tern_smtp::session::command::parse(data);
});
