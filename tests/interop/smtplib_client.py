#!/usr/bin/env python3
"""Drive a running tern with Python's smtplib (run by tests/tests/e2e_04_interop.rs).

usage: smtplib_client.py HOST SMTP_PORT SMTPS_PORT CAFILE

Each case prints "ok <case>" on success; any failure raises (non-zero exit, traceback on
stderr). Senders are distinct per case so the Rust side can find each message in the
queue: plain@, starttls@, smtps@, eightbit@, utf8 (SMTPUTF8 recipient).
"""
import smtplib
import ssl
import sys
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY

host, port, sport, cafile = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]


def ctx():
    c = ssl.create_default_context(cafile=cafile)
    c.check_hostname = True
    return c


def check_ehlo(s, want_starttls):
    code, _ = s.ehlo("client.test")
    assert code == 250, code
    for k in ("pipelining", "8bitmime", "smtputf8", "size", "chunking"):
        assert s.has_extn(k), (k, s.esmtp_features)
    assert s.has_extn("starttls") == want_starttls, s.esmtp_features


# 1. plain transaction; one recipient refused (relay), one accepted
with smtplib.SMTP(host, port, local_hostname="client.test", timeout=20) as s:
    check_ehlo(s, True)
    refused = s.sendmail(
        "plain@example.com",
        ["ok@demo.test", "nobody@example.org"],
        b"Subject: plain\r\n\r\nhello from smtplib\r\n.dot line\r\n",
    )
    assert list(refused) == ["nobody@example.org"], refused
    code, msg = refused["nobody@example.org"]
    assert code == 554 and b"5.7.1" in msg, (code, msg)
    assert s.noop()[0] == 250
    assert s.vrfy("postmaster")[0] == 252
print("ok plain")

# 2. STARTTLS
with smtplib.SMTP(host, port, local_hostname="client.test", timeout=20) as s:
    check_ehlo(s, True)
    code, _ = s.starttls(context=ctx())
    assert code == 220, code
    check_ehlo(s, False)
    assert s.sendmail("starttls@example.com", ["ok@demo.test"], b"Subject: tls\r\n\r\nx\r\n") == {}
print("ok starttls")

# 3. implicit TLS
with smtplib.SMTP_SSL(host, sport, local_hostname="client.test", context=ctx(), timeout=20) as s:
    check_ehlo(s, False)
    # smtps is submission (RFC 8314): without AUTH, MAIL is refused with 530.
    code, _ = s.mail("smtps@example.com")
    assert code in (250, 530), code
print("ok smtps")

# 4. send_message with an 8-bit body (BODY=8BITMIME)
m = EmailMessage(policy=SMTP_POLICY)
m["From"] = "eightbit@example.com"
m["To"] = "ok@demo.test"
m["Subject"] = "8bit"
m.set_content("Grüße aus Zürich — żółw\n", cte="8bit")
with smtplib.SMTP(host, port, local_hostname="client.test", timeout=20) as s:
    assert s.send_message(m, mail_options=["BODY=8BITMIME"]) == {}
print("ok eightbit")

# 5. SMTPUTF8: a non-ASCII recipient makes smtplib use SMTPUTF8 on its own
m = EmailMessage()
m["From"] = "utf8@example.com"
m["To"] = "jösé@demo.test"
m["Subject"] = "utf8"
m.set_content("ünïcødé\n")
with smtplib.SMTP(host, port, local_hostname="client.test", timeout=20) as s:
    assert s.send_message(m) == {}
print("ok smtputf8")
