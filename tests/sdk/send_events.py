"""Sends one call of each type through Segment's official Python SDK (segment-analytics-python).

Usage: send_events.py HOST WRITE_KEY GZIP(0|1). Exits non-zero if the SDK reports any error.
"""
import datetime
import sys

import segment.analytics as analytics

host, write_key, use_gzip = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
errors = []
analytics.write_key = write_key
analytics.host = host
analytics.gzip = use_gzip
analytics.max_retries = 0
analytics.on_error = lambda error, items: errors.append(repr(error))

# An anonymous visit, then a sign-up that identifies the visitor.
analytics.page(anonymous_id="anon-1", category="Docs", name="Getting Started", properties={"url": "https://example.com/docs"})
analytics.identify("user-1", {"email": "ada@example.com", "name": "Ada", "plan": "pro"}, anonymous_id="anon-1")
analytics.track("user-1", "Order Completed", {"total": 42.5, "currency": "EUR", "coupon": None},
                timestamp=datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc))
analytics.screen("user-1", "App", "Home", {"variant": "b"})
analytics.group("user-1", "group-1", {"name": "Acme", "employees": 42})
# The same person on a second device, linked with alias.
analytics.page(anonymous_id="anon-2", name="Pricing")
analytics.alias("anon-2", "user-1")
analytics.flush()
analytics.shutdown()
if errors:
    print("SDK errors:", errors, file=sys.stderr)
    sys.exit(1)
print("sent 7 calls")
