use super::*;
use tern_smtp::sender::header_section;

fn msg_body(pieces: &[&[u8]]) -> Vec<Bytes> {
    pieces.iter().map(|p| Bytes::copy_from_slice(p)).collect()
}

#[test]
fn header_section_across_slices() {
    let b = msg_body(&[b"From: a@b.example\r", b"\n\r", b"\nbody\r\n"]);
    assert_eq!(header_section(&b).unwrap(), b"From: a@b.example\r\n");
    let b = msg_body(&[b"\r\nbody\r\n"]);
    assert!(header_section(&b).is_none());
    let b = msg_body(&[b"From: a@b.example\r\n"]);
    assert_eq!(header_section(&b).unwrap(), b"From: a@b.example\r\n");
}

#[test]
fn fields_present_and_from_oversigned() {
    let h = b"from: x@Example.ORG\r\nSubject: hi\r\n\tfolded: not a field\r\nX-Other: 1\r\nDATE: now\r\n";
    assert_eq!(signed_fields(h), vec!["From", "Subject", "Date", "From"]);
    assert_eq!(from_domain(h).as_deref(), Some("example.org"));
}

#[test]
fn spki_of_a_known_key() {
    // The SPKI prefix of any 2048-bit RSA key.
    let modulus_and_exp = vec![0u8; 270];
    let spki = spki_rsa(&modulus_and_exp);
    assert_eq!(&spki[..4], &[0x30, 0x82, 0x01, 0x22]);
    assert_eq!(spki.len(), 4 + 15 + 5 + 270);
}

#[test]
fn bad_configurations_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = |alg: Algorithm, key: &Path| DkimConfig {
        sign: vec![SignWhen::Authenticated],
        keys: vec![KeyConfig {
            domain: "example.org".into(),
            selector: "s1".into(),
            algorithm: alg,
            key: key.to_path_buf(),
        }],
        ..Default::default()
    };
    // Missing file.
    let e = Signer::load(&cfg(Algorithm::Rsa, &dir.path().join("nope.pem"))).unwrap_err();
    assert!(e.contains("nope.pem"), "{e}");
    // An Ed25519 key, group-readable, then as the wrong algorithm.
    let der =
        ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
    use base64::Engine;
    let pem = format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
        base64::engine::general_purpose::STANDARD.encode(der.as_ref())
    );
    let p = dir.path().join("ed.pem");
    std::fs::write(&p, pem).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
    let e = Signer::load(&cfg(Algorithm::Ed25519, &p)).unwrap_err();
    assert!(e.contains("readable by group or others"), "{e}");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    let e = Signer::load(&cfg(Algorithm::Rsa, &p)).unwrap_err();
    assert!(e.contains("RSA"), "{e}");
    let s = Signer::load(&cfg(Algorithm::Ed25519, &p)).unwrap();
    assert_eq!(s.keys().count(), 1);
    // Empty key path, bad selector, duplicate selector.
    let e = Signer::load(&cfg(Algorithm::Ed25519, Path::new(""))).unwrap_err();
    assert!(e.contains("no key file"), "{e}");
    let mut c = cfg(Algorithm::Ed25519, &p);
    c.keys[0].selector = "bad selector".into();
    assert!(Signer::load(&c).unwrap_err().contains("selector"));
    let mut c = cfg(Algorithm::Ed25519, &p);
    c.keys.push(c.keys[0].clone());
    assert!(Signer::load(&c).unwrap_err().contains("twice"));
}

#[test]
fn unknown_algorithm_and_missing_key_do_not_parse() {
    let e = toml::from_str::<DkimConfig>(
        "[[keys]]\ndomain = \"example.org\"\nselector = \"s\"\nalgorithm = \"dsa\"\nkey = \"/k\"\n",
    )
    .unwrap_err();
    assert!(e.to_string().contains("dsa"), "{e}");
    let e = toml::from_str::<DkimConfig>(
        "[[keys]]\ndomain = \"example.org\"\nselector = \"s\"\nalgorithm = \"rsa\"\n",
    )
    .unwrap_err();
    assert!(e.to_string().contains("key"), "{e}");
}

#[test]
fn small_rsa_keys_are_refused() {
    // A 1024-bit RSA key (PKCS#1), from `openssl genrsa 1024`.
    let pem = include_str!("../testdata/dkim-rsa1024.pem");
    let e = SigningKeyPair::from_pem(pem.as_bytes(), Algorithm::Rsa)
        .err()
        .expect("refused");
    assert!(e.contains("RSA"), "{e}");
}

fn ed25519_signer(dir: &Path) -> Signer {
    let der =
        ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
    use base64::Engine;
    let pem = format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
        base64::engine::general_purpose::STANDARD.encode(der.as_ref())
    );
    let p = dir.join("ed.pem");
    std::fs::write(&p, pem).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    Signer::load(&DkimConfig {
        sign: vec![SignWhen::Authenticated],
        keys: vec![KeyConfig {
            domain: "Example.org".into(),
            selector: "s1".into(),
            algorithm: Algorithm::Ed25519,
            key: p,
        }],
        ..Default::default()
    })
    .unwrap()
}

fn tag<'a>(field: &'a str, name: &str) -> &'a str {
    let unfolded: &str = field;
    let start = unfolded
        .find(&format!(" {name}="))
        .or_else(|| unfolded.find(&format!("\t{name}=")))
        .unwrap_or_else(|| panic!("no {name}= in {field}"))
        + name.len()
        + 2;
    let end = unfolded[start..]
        .find(';')
        .map_or(unfolded.len(), |e| start + e);
    &unfolded[start..end]
}

#[test]
fn signs_any_slicing_alike_and_only_its_domains() {
    let dir = tempfile::tempdir().unwrap();
    let s = ed25519_signer(dir.path());
    let msg: &[u8] = b"From: Someone <someone@EXAMPLE.org>\r\nTo: x@y.example\r\nSubject: t  \r\n\r\nline with trailing space \r\n\r\n\tindented\r\n\r\n\r\n";
    let whole = s.sign_body(&msg_body(&[msg])).unwrap();
    assert_eq!(whole.len(), 1);
    let field = String::from_utf8(whole[0].1.to_vec()).unwrap();
    assert!(field.starts_with("DKIM-Signature: "), "{field}");
    assert!(field.ends_with("\r\n"), "{field}");
    assert!(field.contains("a=ed25519-sha256"), "{field}");
    assert!(field.contains("c=relaxed/relaxed"), "{field}");
    assert!(field.contains("d=example.org"), "{field}");
    let unfolded = field.replace("\r\n", "").replace(['\t', ' '], " ");
    let bh = tag(&unfolded, "bh").replace(' ', "");
    let h = tag(&unfolded, "h").replace(' ', "");
    assert_eq!(h.to_ascii_lowercase(), "subject:to:from:from", "{h}");
    // Every split point in two, and in single bytes: the same body hash.
    for cut in 1..msg.len() {
        let split = s.sign_body(&msg_body(&[&msg[..cut], &msg[cut..]])).unwrap();
        let f = String::from_utf8(split[0].1.to_vec()).unwrap();
        let u = f.replace("\r\n", "").replace(['\t', ' '], " ");
        assert_eq!(tag(&u, "bh").replace(' ', ""), bh, "cut at {cut}");
    }
    let bytes: Vec<&[u8]> = msg.chunks(1).collect();
    let f = String::from_utf8(s.sign_body(&msg_body(&bytes)).unwrap()[0].1.to_vec()).unwrap();
    let u = f.replace("\r\n", "").replace(['\t', ' '], " ");
    assert_eq!(tag(&u, "bh").replace(' ', ""), bh);
    // Another From: domain, no From:, no header section: not signed.
    for other in [
        &b"From: a@example.com\r\n\r\nx\r\n"[..],
        b"Subject: x\r\n\r\nx\r\n",
        b"\r\nx\r\n",
    ] {
        assert!(s.sign_body(&msg_body(&[other])).unwrap().is_empty());
    }
}
