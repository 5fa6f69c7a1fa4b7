#!/usr/bin/env python3
# Usage: bench/redis_propagation.py NODE_A_SUBMISSION NODE_B_SUBMISSION ROUNDS
# Two nodes sharing [cluster] redis, with auth.ip_failure_limit=4, PLAIN allowed without
# TLS, no tarpit; client addresses 127.0.1.N (loopback, no setup needed).
# Cross-node block propagation: 3 failures on node A, the 4th on node B (B trips the
# cluster block), then A is probed with the right password until it answers 454.
import smtplib, sys, time, base64
a, b = sys.argv[1], sys.argv[2]
def auth(addr, pw, src):
    h, p = addr.rsplit(":", 1)
    s = smtplib.SMTP(h, int(p), source_address=(src, 0), timeout=10)
    s.ehlo("probe.test")
    code, _ = s.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0demo\0" + pw).decode())
    try: s.quit()
    except Exception: pass
    return code
res = []
for i in range(int(sys.argv[3])):
    src = "127.0.1.%d" % (i + 1)
    for node in (a, a, a):
        assert auth(node, b"wrong", src) == 535
    assert auth(b, b"wrong", src) == 535
    t0 = time.monotonic()
    while auth(a, b"demo", src) != 454:
        pass
    res.append((time.monotonic() - t0) * 1000)
res.sort()
print("n=%d min=%.0f ms median=%.0f ms max=%.0f ms" % (len(res), res[0], res[len(res)//2], res[-1]))
