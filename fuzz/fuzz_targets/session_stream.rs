//! Arbitrary bytes, split into arbitrary reads, through the whole session state machine
//! (commands, DATA, BDAT, AUTH framing): never a panic, and the same replies whatever the
//! split (the first byte chooses the split points).
#![no_main]
use std::rc::Rc;

use bytes::BytesMut;
use tern_engine::policy::RelayPolicy;
use tern_engine::session::{discard_input, Event, ListenerKind, Session, SessionConfig, SessionLimits};

fn run(input: &[u8], step: usize) -> Vec<u8> {
    let cfg = Rc::new(SessionConfig {
        hostname: "mx.test".into(),
        kind: ListenerKind::Smtp,
        limits: SessionLimits {
            command_line: 512,
            text_line: 1000,
            message_size: 4096,
            recipients: 5,
            errors: 50,
        },
        tls_available: true,
        policy: RelayPolicy::new(&["local.test".into()], &[]),
        auth: None,
        metrics: Default::default(),
    });
    let mut s = Session::new(cfg, "192.0.2.1:1000".parse().unwrap(), false);
    let mut inbuf = BytesMut::new();
    let mut out = BytesMut::new();
    for piece in input.chunks(step.max(1)) {
        inbuf.extend_from_slice(piece);
        loop {
            match s.process(&mut inbuf, &mut out) {
                Event::NeedInput | Event::Close => break,
                Event::StartTls => {
                    discard_input(&mut inbuf);
                    s.tls_started();
                    break;
                }
                Event::Etrn(node) => s.etrn_started(&node, 0, &mut out),
                Event::Message(mut m) => {
                    m.finish("mx.test", "ID");
                    s.stored(Ok("ID"), &mut out);
                }
            }
        }
    }
    out.to_vec()
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else { return };
    // STARTTLS discards pipelined input by design, so splits may differ after it.
    let has_starttls = rest.windows(8).any(|w| w.eq_ignore_ascii_case(b"STARTTLS"));
    let whole = run(rest, rest.len());
    let split = run(rest, 1 + first as usize % 17);
    if !has_starttls {
        assert_eq!(whole, split);
    }
});
