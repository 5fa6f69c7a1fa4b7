#!/usr/bin/env python3
"""floods.py: the long versions of tests/tests/e2e_13_floods.rs, run on demand.

    tests/scripts/floods.py [--tern target/release/tern] [--only NAME ...]
                            [--connections 10000] [--pipeline-mb 100] [--slowloris 1000]

Starts its own `tern demo` (2 shards, loopback, next hop down so mail stays queued) in
a temporary directory for each scenario, measures the server's VmRSS from /proc, and
prints one line of figures per scenario (and a JSON summary at the end). Stdlib only.

Scenarios:
  idle       N idle connections (greeted, EHLO'd, then silent): memory per connection,
             tern_sessions_active, and a full transaction by another client meanwhile.
             RLIMIT_NOFILE is raised to the hard limit for this process and the server.
  pipeline   (a) 8 clients pipelining `BDAT 1` chunks and never reading: octets sent
             before TCP flow control stalls them, server memory, and that they are closed
             at the write timeout (limits.idle_timeout=10s here);
             (b) one client pipelining --pipeline-mb MB of `BDAT 1` chunks while a thread
             drains the replies: peak server memory over the whole run (the message
             itself, 1 octet per chunk, is held in memory: about MB/9 of it).
  slowloris  N connections each trickling a command one byte every 100 ms (default
             min_data_rate, idle_timeout=10s): how many are cut off with 421 4.4.2, peak
             memory, and a full transaction meanwhile.

Every process it starts is stopped at exit.
"""
import argparse
import json
import os
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rss_kib(pid, field="VmRSS"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError("no " + field)


class Tern:
    def __init__(self, binary, sets):
        self.dir = tempfile.mkdtemp(prefix="tern-floods-")
        args = [binary, "demo", "--dir", self.dir]
        base = [
            "shards=2",
            "executor.ring_depth=256",
            "limits.connections_per_ip=1000000",
            "limits.connections_per_shard=100000",
            'queue.routes={"*"="smtp:[127.0.0.1]:9"}',
            'listeners.smtp=["127.0.0.1:0"]',
            'listeners.submission=["127.0.0.1:0"]',
            'listeners.smtps=["127.0.0.1:0"]',
            "log.level=warn",
        ]
        for s in base + sets:
            args += ["--set", s]
        self.p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.smtp = self.metrics = None
        for line in self.p.stdout:
            if line.startswith("listening: smtp "):
                h, port = line.split()[2].rsplit(":", 1)
                self.smtp = (h, int(port))
            elif line.startswith("listening: metrics "):
                h, port = line.split()[2].rsplit(":", 1)
                self.metrics = (h, int(port))
            elif line.startswith("ready:"):
                break
        threading.Thread(target=lambda: [None for _ in self.p.stdout], daemon=True).start()
        assert self.smtp, "tern did not print its smtp address"

    def rss(self, field="VmRSS"):
        return rss_kib(self.p.pid, field)

    def sessions(self):
        s = socket.create_connection(self.metrics)
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        data = b""
        while True:
            b = s.recv(65536)
            if not b:
                break
            data += b
        s.close()
        for line in data.decode().splitlines():
            if line.startswith('tern_sessions_active{shard="total"} '):
                return int(float(line.split()[-1]))
        return -1

    def stop(self):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGKILL)
            self.p.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def read_reply(f):
    while True:
        line = f.readline()
        if not line or line[3:4] != b"-":
            return line


def transaction(addr, subject="served"):
    """One complete transaction on a fresh connection; returns the reply to the dot."""
    s = socket.create_connection(addr, timeout=30)
    f = s.makefile("rb")
    read_reply(f)
    for cmd in [b"EHLO good.test", b"MAIL FROM:<g@demo.test>", b"RCPT TO:<postmaster@localhost>", b"DATA"]:
        s.sendall(cmd + b"\r\n")
        read_reply(f)
    s.sendall(b"Subject: " + subject.encode() + b"\r\n\r\nhello\r\n.\r\n")
    r = read_reply(f).decode().strip()
    s.sendall(b"QUIT\r\n")
    s.close()
    return r


def scenario_idle(binary, n):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    t = Tern(binary, [])
    try:
        transaction(t.smtp, "warm-up")
        before = t.rss()
        socks = []
        started = time.time()
        for i in range(n):
            s = socket.create_connection(t.smtp, timeout=60)
            socks.append(s)
        # Greeting, then EHLO, on all of them (pipelined across connections).
        files = []
        for s in socks:
            f = s.makefile("rb")
            read_reply(f)
            s.sendall(b"EHLO idle.test\r\n")
            files.append(f)
        for f in files:
            read_reply(f)
        opened = time.time() - started
        time.sleep(1)
        after = t.rss()
        sessions = t.sessions()
        served = transaction(t.smtp, "among idle ones")
        per = (after - before) * 1024 / n
        res = {
            "connections": n,
            "rss_before_kib": before,
            "rss_after_kib": after,
            "bytes_per_connection": round(per),
            "sessions_active": sessions,
            "other_client": served,
            "open_seconds": round(opened, 1),
        }
        print(f"idle: {n} connections, VmRSS {before} -> {after} KiB = {per / 1024:.1f} KiB each; "
              f"sessions_active {sessions}; other client: {served}")
        for s in socks:
            s.close()
        return res
    finally:
        t.stop()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def never_reading(addr, limit):
    s = socket.create_connection(addr)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.sendall(b"EHLO flood.test\r\nMAIL FROM:<f@demo.test>\r\nRCPT TO:<postmaster@localhost>\r\n")
    s.setblocking(False)
    chunk = b"BDAT 1\r\nx" * 7282
    sent, pos, stalled = 0, 0, None
    while sent < limit:
        try:
            n = s.send(chunk[pos:])
            sent += n
            pos = (pos + n) % len(chunk)
            stalled = None
        except BlockingIOError:
            stalled = stalled or time.time()
            if time.time() - stalled > 2:
                break
            time.sleep(0.01)
    return s, sent


def scenario_pipeline(binary, mb):
    out = {}
    t = Tern(binary, ["limits.idle_timeout=10s"])
    try:
        transaction(t.smtp, "warm-up")
        before = t.rss()
        socks = [never_reading(t.smtp, 1 << 30) for _ in range(8)]
        after = t.rss()
        served = transaction(t.smtp, "past the pipeliners")
        sent = sum(n for _, n in socks)
        t0 = time.time()
        while t.sessions() > 0 and time.time() - t0 < 60:
            time.sleep(0.5)
        closed_after = time.time() - t0
        left = t.sessions()
        out["never_reading"] = {
            "clients": 8,
            "sent_before_stall_bytes": sent,
            "rss_before_kib": before,
            "rss_after_kib": after,
            "other_client": served,
            "sessions_left_after_timeout": left,
        }
        print(f"pipeline (never reading): 8 clients sent {sent / 1e6:.1f} MB before stalling; "
              f"VmRSS {before} -> {after} KiB; other client: {served}; "
              f"sessions left after the 10 s write timeout: {left} (waited {closed_after:.1f} s)")
        for s, _ in socks:
            s.close()
    finally:
        t.stop()

    t = Tern(binary, [])
    try:
        transaction(t.smtp, "warm-up")
        before = t.rss()
        s = socket.create_connection(t.smtp)
        f = s.makefile("rb")
        read_reply(f)
        s.sendall(b"EHLO flood.test\r\nMAIL FROM:<f@demo.test>\r\nRCPT TO:<postmaster@localhost>\r\n")
        for _ in range(3):
            read_reply(f)
        total = mb * 1000 * 1000
        chunk = b"BDAT 1\r\nx" * 7282
        replies = [0]
        peak = [before]

        def drain():
            tail = b""
            while True:
                b = s.recv(1 << 16)
                if not b:
                    return
                replies[0] += b.count(b"\n")
                tail = (tail + b)[-256:]
                if b"queued as" in tail and tail.endswith(b"\r\n"):
                    return

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], t.rss())
                time.sleep(0.2)

        done = threading.Event()
        th = threading.Thread(target=drain)
        sm = threading.Thread(target=sample)
        th.start()
        sm.start()
        started = time.time()
        sent = 0
        while sent < total:
            s.sendall(chunk)
            sent += len(chunk)
        s.sendall(b"BDAT 0 LAST\r\n")
        th.join(timeout=300)
        secs = time.time() - started
        done.set()
        sm.join()
        chunks = sent // 9
        out["reading"] = {
            "sent_bytes": sent,
            "chunks": chunks,
            "replies": replies[0],
            "rss_before_kib": before,
            "rss_peak_kib": peak[0],
            "seconds": round(secs, 1),
        }
        print(f"pipeline (reading): {sent / 1e6:.0f} MB = {chunks} BDAT commands, {replies[0]} replies read; "
              f"VmRSS {before} KiB -> peak {peak[0]} KiB (the message body itself is {chunks / 1e6:.1f} MB)")
        s.close()
    finally:
        t.stop()
    return out


def scenario_slowloris(binary, n):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    t = Tern(binary, ["limits.idle_timeout=10s"])
    try:
        transaction(t.smtp, "warm-up")
        before = t.rss()
        socks = []
        for _ in range(n):
            s = socket.create_connection(t.smtp)
            f = s.makefile("rb")
            read_reply(f)
            s.sendall(b"EHLO slow.test\r\n")
            read_reply(f)
            s.setblocking(False)
            socks.append(s)
        open_ = {s: b"" for s in socks}
        cut = {}
        peak = before
        started = time.time()
        served = None
        while open_ and time.time() - started < 120:
            for s in list(open_):
                try:
                    s.send(b"x")
                except OSError:
                    cut[s] = open_.pop(s)
            time.sleep(0.1)
            r, _, _ = select.select(list(open_), [], [], 0)
            for s in r:
                try:
                    b = s.recv(512)
                except OSError:
                    b = b""
                open_[s] += b
                if not b or b.endswith(b"\r\n"):
                    cut[s] = open_.pop(s)
            peak = max(peak, t.rss())
            if served is None and time.time() - started > 3:
                served = transaction(t.smtp, "during slowloris")
        secs = time.time() - started
        with_421 = sum(1 for v in cut.values() if v.startswith(b"421 4.4.2"))
        res = {
            "connections": n,
            "cut_off": len(cut),
            "with_421_4_4_2": with_421,
            "still_open_after_120s": len(open_),
            "seconds_until_all_cut": round(secs, 1),
            "rss_before_kib": before,
            "rss_peak_kib": peak,
            "other_client": served,
        }
        print(f"slowloris: {n} connections trickling a byte every 100 ms: {len(cut)} cut off "
              f"({with_421} with 421 4.4.2) within {secs:.1f} s, {len(open_)} left; "
              f"VmRSS {before} -> peak {peak} KiB; other client: {served}")
        for s in socks:
            s.close()
        return res
    finally:
        t.stop()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tern", default=os.path.join(ROOT, "target", "release", "tern"))
    ap.add_argument("--only", nargs="*", default=["idle", "pipeline", "slowloris"])
    ap.add_argument("--connections", type=int, default=10000)
    ap.add_argument("--pipeline-mb", type=int, default=100)
    ap.add_argument("--slowloris", type=int, default=1000)
    a = ap.parse_args()
    if not os.path.exists(a.tern):
        sys.exit(f"{a.tern} not found: cargo build --release -p tern-engine --bin tern")
    results = {"date": time.strftime("%Y-%m-%d"), "tern": a.tern, "cores": os.cpu_count()}
    if "idle" in a.only:
        results["idle"] = scenario_idle(a.tern, a.connections)
    if "pipeline" in a.only:
        results["pipeline"] = scenario_pipeline(a.tern, a.pipeline_mb)
    if "slowloris" in a.only:
        results["slowloris"] = scenario_slowloris(a.tern, a.slowloris)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
