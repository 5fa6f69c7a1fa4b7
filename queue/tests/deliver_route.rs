//! Route strings and the lookup order.

use std::path::PathBuf;

use tern_queue::client::{ClientOptions, StarttlsPolicy, TlsLevel, TlsPolicy};
use tern_queue::ratelimit::RateLimit;
use tern_queue::route::{domain_of, resolve, Destination, RouteError, Router};

fn smtp(host: &str, port: u16, mx: bool) -> Destination {
    Destination::Smtp {
        host: host.into(),
        port,
        mx,
        options_name: None,
        tls: None,
        rate: None,
    }
}

#[test]
fn parse_route_strings() {
    assert_eq!(
        Destination::parse("maildir:/var/mail/x").unwrap(),
        Destination::Maildir(PathBuf::from("/var/mail/x"))
    );
    assert_eq!(
        Destination::parse("smtp:[Relay.Example]:587").unwrap(),
        smtp("relay.example", 587, false)
    );
    assert_eq!(
        Destination::parse("smtp:[relay.example]").unwrap(),
        smtp("relay.example", 25, false)
    );
    assert_eq!(
        Destination::parse("smtp:mx.example").unwrap(),
        smtp("mx.example", 25, true)
    );
    assert_eq!(
        Destination::parse("smtp:mx.example:2525").unwrap(),
        smtp("mx.example", 2525, true)
    );
    assert_eq!(
        Destination::parse("smtp:[ipv6:2001:db8::1]:26").unwrap(),
        smtp("2001:db8::1", 26, false)
    );
    assert_eq!(
        Destination::parse("smtp:[relay]:587 options=submission").unwrap(),
        Destination::Smtp {
            host: "relay".into(),
            port: 587,
            mx: false,
            options_name: Some("submission".into()),
            tls: None,
            rate: None,
        }
    );
    for bad in [
        "",
        "lmtp:x",
        "maildir:relative/path",
        "smtp:",
        "smtp:[]:25",
        "smtp:[x]:0",
        "smtp:[x]:99999",
        "smtp:x:port",
        "smtp:[x]junk",
        "smtp:x colour=blue",
        "maildir:/x options=a",
        "smtp:[x",
    ] {
        assert!(Destination::parse(bad).is_err(), "{bad:?} parsed");
    }
}

#[test]
fn lookup_order() {
    let r = Router::from_config(
        Some("[smarthost.example]:587"),
        [
            ("Example.ORG", "maildir:/m/example"),
            (".example.org", "smtp:[inner.example]:25"),
            (".deep.example.org", "smtp:[deep.example]"),
        ],
    )
    .unwrap();
    assert_eq!(
        r.route("example.org"),
        Destination::Maildir("/m/example".into())
    );
    assert_eq!(
        r.route("EXAMPLE.org."),
        Destination::Maildir("/m/example".into())
    );
    assert_eq!(r.route("a.example.org"), smtp("inner.example", 25, false));
    assert_eq!(
        r.route("x.deep.example.org"),
        smtp("deep.example", 25, false)
    );
    assert_eq!(
        r.route("deep.example.org"),
        smtp("inner.example", 25, false)
    );
    // Not a parent-domain match: "notexample.org".
    assert_eq!(
        r.route("notexample.org"),
        smtp("smarthost.example", 587, false)
    );

    let r = Router::from_config(None, [("*", "smtp:[fallback]")]).unwrap();
    assert_eq!(r.route("any.test"), smtp("fallback", 25, false));

    let r = Router::from_config(None, []).unwrap();
    assert_eq!(r.route("Gmail.COM"), Destination::Mx("gmail.com".into()));

    assert!(matches!(
        Router::from_config(None, [("bad key", "smtp:x")]),
        Err(RouteError::BadKey(_))
    ));
    assert_eq!(domain_of("a@b.example"), "b.example");
    assert_eq!(domain_of("a@b@c"), "c");
}

#[test]
fn route_attributes_tls_and_rate() {
    let d = Destination::parse(
        "smtp:[relay.example]:587 tls=verify ca=/etc/tern/ca.pem rate=2.5 burst=4",
    )
    .unwrap();
    let Destination::Smtp { tls, rate, .. } = &d else {
        panic!("{d:?}")
    };
    assert_eq!(
        tls.as_ref().unwrap(),
        &TlsPolicy {
            level: TlsLevel::Verify,
            ca_file: Some("/etc/tern/ca.pem".into())
        }
    );
    assert_eq!(
        *rate,
        Some(RateLimit {
            milli_per_sec: 2500,
            burst: 4
        })
    );
    for (word, level) in [
        ("none", TlsLevel::None),
        ("MAY", TlsLevel::May),
        ("encrypt", TlsLevel::Encrypt),
    ] {
        let d = Destination::parse(&format!("smtp:mx.example tls={word}")).unwrap();
        assert!(
            matches!(&d, Destination::Smtp { tls: Some(t), .. } if t.level == level && t.ca_file.is_none()),
            "{d:?}"
        );
    }
    for bad in [
        "smtp:x tls=sometimes",
        "smtp:x ca=/a.pem",         // ca without tls=verify
        "smtp:x tls=may ca=/a.pem", // ca only with verify
        "smtp:x tls=verify ca=relative.pem",
        "smtp:x tls=may tls=verify", // twice
        "smtp:x rate=0",
        "smtp:x rate=-1",
        "smtp:x rate=fast",
        "smtp:x burst=3", // burst without rate
        "smtp:x rate=1 burst=0",
        "smtp:x tls=",
        "maildir:/m rate=1",
        "maildir:/m tls=verify",
    ] {
        assert!(
            matches!(Destination::parse(bad), Err(RouteError::BadAttribute(_))),
            "{bad:?} parsed"
        );
    }

    // Levels onto client options; a policy's CA file replaces the global one, none keeps it.
    let mut o = ClientOptions::new("h");
    o.ca_file = Some("/global.pem".into());
    TlsPolicy::parse("encrypt").unwrap().apply(&mut o);
    assert_eq!(
        (o.starttls, o.verify_certs),
        (StarttlsPolicy::Required, false)
    );
    TlsPolicy::parse("verify").unwrap().apply(&mut o);
    assert_eq!(
        (o.starttls, o.verify_certs),
        (StarttlsPolicy::Required, true)
    );
    assert_eq!(
        o.ca_file.as_deref(),
        Some(std::path::Path::new("/global.pem"))
    );
    TlsPolicy::parse("verify ca=/hop.pem")
        .unwrap()
        .apply(&mut o);
    assert_eq!(o.ca_file.as_deref(), Some(std::path::Path::new("/hop.pem")));
    TlsPolicy::parse("may").unwrap().apply(&mut o);
    assert_eq!(
        (o.starttls, o.verify_certs),
        (StarttlsPolicy::Opportunistic, false)
    );
    TlsPolicy::parse("none").unwrap().apply(&mut o);
    assert_eq!(o.starttls, StarttlsPolicy::Never);
}

#[test]
fn relayhost_attributes_mx_tls_table_and_rate_shares() {
    let r = Router::from_config(
        Some("[smart.example]:587 tls=verify rate=10"),
        [("slow.example", "smtp:[slow.example] rate=3 burst=5")],
    )
    .unwrap()
    .with_mx_tls_policies([
        ("bank.example", "verify"),
        (".bank.example", "verify ca=/etc/tern/bank-ca.pem"),
        ("legacy.example", "none"),
    ])
    .unwrap()
    .share_rates(2);
    let relay = r.route("elsewhere.example");
    assert!(
        matches!(&relay, Destination::Smtp { host, port: 587, mx: false, tls: Some(t), rate: Some(RateLimit { milli_per_sec: 5000, burst: 5 }), .. }
            if host == "smart.example" && t.level == TlsLevel::Verify),
        "{relay:?}"
    );
    assert!(matches!(
        r.route("slow.example"),
        Destination::Smtp {
            rate: Some(RateLimit {
                milli_per_sec: 1500,
                burst: 2
            }),
            ..
        }
    ));
    assert_eq!(
        r.mx_tls_policy("Bank.Example.").map(|p| p.level),
        Some(TlsLevel::Verify)
    );
    assert_eq!(
        r.mx_tls_policy("mx.bank.example")
            .and_then(|p| p.ca_file.clone()),
        Some("/etc/tern/bank-ca.pem".into())
    );
    assert_eq!(
        r.mx_tls_policy("legacy.example").map(|p| p.level),
        Some(TlsLevel::None)
    );
    assert_eq!(r.mx_tls_policy("other.example"), None);
    assert!(matches!(
        Router::from_config(None, [])
            .unwrap()
            .with_mx_tls_policies([("x.example", "strict")]),
        Err(RouteError::BadPolicy(_))
    ));
    assert!(matches!(
        Router::from_config(None, [])
            .unwrap()
            .with_mx_tls_policies([("bad key", "may")]),
        Err(RouteError::BadKey(_))
    ));
}

#[test]
fn resolve_on_a_blocking_thread() {
    let ex = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .ring_depth(64)
        .io_memory(128 << 10)
        .make()
        .unwrap();
    ex.run(async {
        let a = resolve("127.0.0.1", 25).await.unwrap();
        assert_eq!(a, ["127.0.0.1:25".parse::<std::net::SocketAddr>().unwrap()]);
        let a = resolve("localhost", 2525).await.unwrap();
        assert!(a.iter().all(|a| a.port() == 2525 && a.ip().is_loopback()));
        assert!(resolve("no-such-host.invalid", 25).await.is_err());
    });
}
