#!/usr/bin/env python3
"""Baseline for tern-loadgen's 5x requirement: the `auth` scenario with CRAM-MD5 in a
single-threaded Python asyncio client.

Each connection: greeting, EHLO, AUTH CRAM-MD5, 235, QUIT (221), close; `--concurrency`
connections in flight (closed loop) for `--duration` seconds. Prints the rate of
successful handshakes and p50/p99 handshake latency. Standard library only.

    taskset -c 1 python3 loadgen/scripts/py_auth_baseline.py --target 127.0.0.1:2587 \
        --concurrency 32 --duration 10
"""

import argparse
import asyncio
import base64
import hashlib
import hmac
import socket
import sys
import time


async def read_reply(reader):
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("closed")
        if len(line) < 4 or line[3:4] != b"-":
            return int(line[:3]), line[4:].strip()


async def handshake(host, port, user, password):
    reader, writer = await asyncio.open_connection(host, port)
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        code, _ = await read_reply(reader)
        if code != 220:
            raise RuntimeError(f"greeting {code}")
        writer.write(b"EHLO py.test\r\n")
        code, _ = await read_reply(reader)
        if code != 250:
            raise RuntimeError(f"EHLO {code}")
        writer.write(b"AUTH CRAM-MD5\r\n")
        code, text = await read_reply(reader)
        if code != 334:
            raise RuntimeError(f"AUTH {code}")
        challenge = base64.b64decode(text)
        digest = hmac.new(password.encode(), challenge, hashlib.md5).hexdigest()
        writer.write(base64.b64encode(f"{user} {digest}".encode()) + b"\r\n")
        code, _ = await read_reply(reader)
        if code != 235:
            raise RuntimeError(f"response {code}")
        done = time.perf_counter()
        writer.write(b"QUIT\r\n")
        await read_reply(reader)
        return done
    finally:
        writer.close()


async def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", required=True, help="host:port (submission)")
    ap.add_argument("--user", default="demo")
    ap.add_argument("--password", default="demo")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--duration", type=float, default=10.0)
    a = ap.parse_args()
    host, port = a.target.rsplit(":", 1)
    if host not in ("127.0.0.1", "::1", "localhost"):
        sys.exit("loopback targets only")
    port = int(port)
    start = time.perf_counter()
    deadline = start + a.duration
    ok, errors, lat = 0, 0, []

    async def worker():
        nonlocal ok, errors
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            try:
                done = await asyncio.wait_for(handshake(host, port, a.user, a.password), 10)
                ok += 1
                lat.append(done - t)
            except Exception:
                errors += 1

    await asyncio.gather(*(worker() for _ in range(a.concurrency)))
    elapsed = time.perf_counter() - start
    lat.sort()
    pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000 if lat else 0.0
    print(
        f"python asyncio CRAM-MD5 auth: {ok / elapsed:.0f} handshakes/s "
        f"({ok} ok, {errors} errors in {elapsed:.2f} s, concurrency {a.concurrency}); "
        f"p50 {pct(0.5):.2f} ms p99 {pct(0.99):.2f} ms"
    )


if __name__ == "__main__":
    asyncio.run(main())
