//! Arbitrary bytes from a milter filter: tern's decoder must never panic, must consume
//! only whole packets, and must decode the same whatever the split into reads; every
//! reply a filter's text becomes is one printable 4xx/5xx line; every header a filter
//! adds stays one folded field.
#![no_main]
use bytes::BytesMut;
use tern_milter::edit::Field;
use tern_milter::{Response, MAX_PACKET};

fn decode_all(chunks: &[&[u8]]) -> (Vec<Response>, bool) {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for c in chunks {
        buf.extend_from_slice(c);
        loop {
            match Response::decode(&mut buf) {
                Ok(Some(r)) => out.push(r),
                Ok(None) => break,
                Err(_) => return (out, true),
            }
        }
    }
    (out, false)
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let split = data[0] as usize % data.len().max(1);
    let body = &data[1..];
    let split = split.min(body.len());
    let whole = decode_all(&[body]);
    let parts = decode_all(&[&body[..split], &body[split..]]);
    assert_eq!(whole, parts, "the split changed the decoding");
    for r in &whole.0 {
        match r {
            Response::ReplyCode(r) => {
                assert!((400..600).contains(&r.code));
                assert!(r.text.bytes().all(|b| (b' '..=b'~').contains(&b)));
            }
            Response::AddHeader { name, value }
            | Response::InsertHeader { name, value, .. }
            | Response::ChangeHeader { name, value, .. } => {
                let f = Field::new(name, value);
                let raw = f.raw();
                assert!(raw.ends_with(b"\r\n"));
                let inner = &raw[..raw.len() - 2];
                for (i, line) in inner.split(|&b| b == b'\n').enumerate() {
                    let line = line.strip_suffix(b"\r").unwrap_or(line);
                    assert!(!line.contains(&b'\r') && !line.contains(&0));
                    if i > 0 {
                        assert!(matches!(line.first(), Some(b' ' | b'\t')));
                    }
                }
            }
            Response::ReplaceBody(b) => assert!(b.len() <= MAX_PACKET),
            _ => {}
        }
    }
});
