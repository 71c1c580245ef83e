"""Sends one batch of four calls through Segment's official Python SDK, the second from a user
whose only identifier the default identity rules block ("null", a common template bug).

Usage: send_with_blocked.py HOST WRITE_KEY. Exits non-zero if the SDK reports any error: the
SDK does not send a batch again after a 400, so a refused batch loses its other calls.
"""
import atexit
import sys

from segment.analytics import Client

host, write_key = sys.argv[1], sys.argv[2]
errors = []
# Four calls, one upload: the consumer sends once it holds upload_size items.
client = Client(write_key, host=host, max_retries=0, upload_size=4, upload_interval=60,
                on_error=lambda error, items: errors.append(repr(error)))
client.track("user-a", "Viewed", {"n": 1})
client.track("null", "Viewed", {"n": 2})
client.track("user-b", "Viewed", {"n": 3})
client.identify("user-c", {"plan": "pro"})
# flush() returns once the batch is answered (on_error has run by then). Not shutdown(), nor
# the join() the client registers to run at exit: they wait for the consumer thread, which
# waits upload_interval for more calls (its thread is a daemon: exiting ends it).
client.flush()
atexit.unregister(client.join)
if errors:
    print("SDK errors:", errors, file=sys.stderr)
    sys.exit(1)
print("sent 4 calls")
