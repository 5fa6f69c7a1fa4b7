//! Route strings and the lookup order.

use std::path::PathBuf;

use tern_queue::route::{domain_of, resolve, Destination, RouteError, Router};

fn smtp(host: &str, port: u16, mx: bool) -> Destination {
    Destination::Smtp {
        host: host.into(),
        port,
        mx,
        options_name: None,
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
