//! DKIM signing cost per message: what `Signer::sign_body` (canonicalisation, body hash,
//! header hash, signature) adds for a 2 KiB message with Ed25519, RSA-2048 and both, next
//! to the bare AWS-LC signature of the same key (the floor). The difference is what DKIM
//! costs beyond the signature itself.

use std::hint::black_box;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use tern_engine::dkim::{Algorithm, DkimConfig, KeyConfig, SignWhen, Signer};

fn pem(der: &[u8]) -> String {
    use base64::Engine;
    let b = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap_or_default())
        .collect();
    format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
        lines.join("\n")
    )
}

fn write_key(dir: &Path, name: &str, der: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, pem(der)).expect("write key");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    p
}

fn signer(keys: Vec<(Algorithm, &Path)>, domain: &str) -> Signer {
    Signer::load(&DkimConfig {
        sign: vec![SignWhen::Authenticated],
        keys: keys
            .into_iter()
            .enumerate()
            .map(|(i, (algorithm, key))| KeyConfig {
                domain: domain.into(),
                selector: format!("s{i}"),
                algorithm,
                key: key.to_path_buf(),
            })
            .collect(),
        ..Default::default()
    })
    .expect("keys load")
}

/// A 2 KiB message as the receive path holds it: a few slices.
fn message() -> Vec<Bytes> {
    let head = "From: Sender <sender@example.org>\r\nTo: rcpt@example.net\r\nSubject: a message of two kilobytes\r\nDate: Thu, 3 Dec 2026 10:00:00 +0000\r\nMessage-ID: <bench.1@example.org>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n";
    let mut body = String::new();
    while head.len() + body.len() < 2048 - 80 {
        body.push_str("The quick brown fox jumps over the lazy dog; again and  again.\r\n");
    }
    let whole = format!("{head}{body}");
    let b = Bytes::from(whole);
    let mid = b.len() / 2;
    vec![b.slice(..mid), b.slice(mid..)]
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let ed_der = aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8v1(&rng).expect("ed25519");
    let ed_path = write_key(dir.path(), "ed.pem", ed_der.as_ref());
    let rsa = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).expect("rsa");
    let rsa_der = {
        aws_lc_rs::encoding::AsDer::<aws_lc_rs::encoding::Pkcs8V1Der>::as_der(&rsa)
            .expect("pkcs8")
            .as_ref()
            .to_vec()
    };
    let rsa_path = write_key(dir.path(), "rsa.pem", &rsa_der);

    let msg = message();
    let ed = signer(vec![(Algorithm::Ed25519, &ed_path)], "example.org");
    let rs = signer(vec![(Algorithm::Rsa, &rsa_path)], "example.org");
    let dual = signer(
        vec![(Algorithm::Rsa, &rsa_path), (Algorithm::Ed25519, &ed_path)],
        "example.org",
    );
    let none = signer(vec![(Algorithm::Ed25519, &ed_path)], "other.example");

    let mut g = c.benchmark_group("dkim_2k");
    g.bench_function("not_signed_lookup_only", |b| {
        b.iter(|| black_box(none.sign_body(black_box(&msg)).expect("sign")))
    });
    g.bench_function("ed25519", |b| {
        b.iter(|| black_box(ed.sign_body(black_box(&msg)).expect("sign")))
    });
    g.bench_function("rsa2048", |b| {
        b.iter(|| black_box(rs.sign_body(black_box(&msg)).expect("sign")))
    });
    g.bench_function("dual", |b| {
        b.iter(|| black_box(dual.sign_body(black_box(&msg)).expect("sign")))
    });
    // The floor: the bare signatures over a DKIM-sized input (SHA-256 of the header
    // block for Ed25519 per RFC 8463; ~600 bytes hashed inside for RSA).
    let ed_key = aws_lc_rs::signature::Ed25519KeyPair::from_pkcs8(ed_der.as_ref()).expect("ed");
    let data = [0x5au8; 600];
    g.bench_function("bare_ed25519_signature", |b| {
        b.iter(|| {
            let h = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, black_box(&data));
            black_box(ed_key.sign(h.as_ref()))
        })
    });
    let rsa_key = aws_lc_rs::signature::RsaKeyPair::from_pkcs8(&rsa_der).expect("rsa");
    let mut sig = vec![0u8; rsa_key.public_modulus_len()];
    g.bench_function("bare_rsa2048_signature", |b| {
        b.iter(|| {
            rsa_key
                .sign(
                    &aws_lc_rs::signature::RSA_PKCS1_SHA256,
                    &rng,
                    black_box(&data),
                    &mut sig,
                )
                .expect("sign");
            black_box(&sig);
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
