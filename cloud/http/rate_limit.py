"""Per-client rate limits: a token bucket per client address, in a bounded table.

    limits = ClientRateLimits(rate=100.0, burst=200, max_clients=10000)
    wait = limits.take(request.remote)     # 0.0: go ahead; else seconds until a token

Each client (its IP address as the listener sees it) has a bucket of `burst` tokens
refilled at `rate` per second; a request takes one.  The table keeps at most
`max_clients` buckets, least recently used evicted first: a flood of addresses costs
memory bounded by that, and an evicted client starts again with a full bucket (the
bound is on memory, not a guarantee against a botnet: that is the network's job).
"""

import collections
import math
import time


class ClientRateLimits:
    """Token buckets per client.  Params: rate (tokens per second, > 0), burst (bucket
    size, >= 1), max_clients (table bound), clock (() -> seconds, monotonic)."""

    def __init__(self, rate, burst, max_clients=10000, clock=time.monotonic):
        if rate <= 0 or burst < 1 or max_clients < 1:
            raise ValueError("rate > 0, burst >= 1 and max_clients >= 1 are required")
        self.rate = float(rate)
        self.burst = float(burst)
        self.max_clients = int(max_clients)
        self.clock = clock
        self._buckets = collections.OrderedDict()  # client -> [tokens, last refill]

    def take(self, client):
        """Take a token for `client`.  Returns 0.0 when allowed, else the seconds until
        the next token (what Retry-After says, rounded up)."""
        now = self.clock()
        bucket = self._buckets.pop(client, None)
        if bucket is None:
            bucket = [self.burst, now]
            if len(self._buckets) >= self.max_clients:
                self._buckets.popitem(last=False)
        else:
            bucket[0] = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
            bucket[1] = now
        self._buckets[client] = bucket
        if bucket[0] >= 1.0:
            bucket[0] -= 1.0
            return 0.0
        return (1.0 - bucket[0]) / self.rate

    @staticmethod
    def retry_after(wait):
        """Retry-After (RFC 9110 10.2.3: whole seconds) for a wait."""
        return max(1, int(math.ceil(wait)))

    def __len__(self):
        return len(self._buckets)
