//! Cost of one PROXY header parse (the bytes HAProxy's send-proxy-v2 / send-proxy write
//! for a TCP4 client), for docs/benchmarks.md:
//! `cargo run --release -p tern-smtp --example proxy_parse_cost`.
use std::hint::black_box;
use std::time::Instant;
use tern_smtp::proxy::{parse, Parse};

fn main() {
    let mut v2 = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    v2.extend_from_slice(&[198, 51, 100, 7, 127, 0, 0, 1, 0xd4, 0x31, 0x02, 0x4b]);
    let v1 = b"PROXY TCP4 198.51.100.7 127.0.0.1 54321 587\r\n".to_vec();
    for (name, hdr) in [("v2 TCP4", &v2), ("v1 TCP4", &v1)] {
        let n = 5_000_000u32;
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            for _ in 0..n {
                let r = parse(black_box(hdr));
                assert!(matches!(r, Ok(Parse::Done { .. })));
                black_box(r.ok());
            }
            best = best.min(t.elapsed().as_secs_f64() / n as f64 * 1e9);
        }
        println!("{name}: {best:.1} ns per parse (best of 5 x {n})");
    }
}
