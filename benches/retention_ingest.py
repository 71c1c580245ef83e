#!/usr/bin/env python3
"""Ingest while a retention pass runs, against a release build of the engine (SQLite store).

    cargo build --release
    python3 benches/retention_ingest.py [target/release/profiles-sync] [old events, default 500000]

Imports that many events received ten days ago into a fresh store (`profiles-sync import`),
starts the engine with `--event-retention 1d`, sends 100-event batches from 4 client threads
(Python's urllib: small, frequent commits), asks for a pass (`POST /v1/retention`) 3 s in, and
prints the batches completed per second and their latency for the 3 s before the pass, while
it runs, and the 3 s after it. Standard library only.
"""
import base64, json, os, subprocess, sys, tempfile, threading, time, urllib.request, uuid

BIN = sys.argv[1] if len(sys.argv) > 1 else "target/release/profiles-sync"
OLD = int(sys.argv[2]) if len(sys.argv) > 2 else 500_000
PORT = 18_081
BASE = f"http://127.0.0.1:{PORT}"
TOKEN = "bench-feed-token"

work = tempfile.mkdtemp(prefix="retention-ingest-")
events = os.path.join(work, "events.jsonl")
with open(events, "w") as f:
    for i in range(OLD):
        f.write(json.dumps({"type": "track", "messageId": str(uuid.uuid4()),
                            "anonymousId": f"a{i % 5000}", "event": "Order Completed",
                            "properties": {"total": i % 100, "currency": "EUR"},
                            "receivedAt": "2000-01-01T00:00:00Z"}) + "\n")
store = f"sqlite://{work}/store.db"
subprocess.run([BIN, "import", "--store", store, events], check=True, stdout=subprocess.DEVNULL)
with open(os.path.join(work, "sources.yaml"), "w") as f:
    f.write("sources:\n  - {id: src, name: Site, slug: site, writeKey: wk_bench}\n")
with open(os.path.join(work, "token"), "w") as f:
    f.write(TOKEN + "\n")
engine = subprocess.Popen([BIN, "engine", "--store", store, "--listen", f"127.0.0.1:{PORT}",
                           "--sources", os.path.join(work, "sources.yaml"),
                           "--feed-token-file", os.path.join(work, "token"),
                           "--event-retention", "1d", "--retention-interval-secs", "86400"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
try:
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(BASE + "/readyz", timeout=1).read()
            break
        except Exception:
            if time.time() > deadline:
                raise SystemExit("the engine did not become ready")
            time.sleep(0.05)
    auth = "Basic " + base64.b64encode(b"wk_bench:").decode()
    done, stop = [], False

    def client():
        i = 0
        while not stop:
            batch = {"batch": [{"type": "track", "userId": f"u{i % 1000}", "event": "Clicked",
                                "properties": {"n": i}} for _ in range(100)]}
            i += 1
            req = urllib.request.Request(BASE + "/v1/batch", data=json.dumps(batch).encode(),
                                         headers={"Content-Type": "application/json",
                                                  "Authorization": auth})
            t = time.time()
            urllib.request.urlopen(req, timeout=120).read()
            done.append((time.time(), time.time() - t))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(3)
    req = urllib.request.Request(BASE + "/v1/retention", method="POST",
                                 headers={"Authorization": "Bearer " + TOKEN})
    p0 = time.time()
    answer = json.loads(urllib.request.urlopen(req, timeout=600).read())
    p1 = time.time()
    time.sleep(3)
    stop = True
    for t in threads:
        t.join()

    def window(a, b):
        xs = sorted(l for (at, l) in done if a <= at < b)
        if not xs:
            return {"batches_per_sec": 0}
        return {"batches_per_sec": round(len(xs) / (b - a)), "p50_ms": round(xs[len(xs) // 2] * 1000, 1),
                "max_ms": round(xs[-1] * 1000, 1)}

    print(json.dumps({"old_events": OLD, "deleted": answer["deleted"], "pass_seconds": round(p1 - p0, 2),
                      "before": window(p0 - 3, p0), "during": window(p0, p1), "after": window(p1, p1 + 3)}))
finally:
    engine.terminate()
    engine.wait()
