"""Bus fault injection for the emulator's bus endpoint (sim/endpoint.py).  CPython only.

A FaultPlan decides, from its own seeded ``random.Random``, what goes wrong on the bus;
the same seed and the same traffic give the same faults, so a failing property-test
example replays exactly.  Faults:

* ``ber``: bit error rate, per bit, in both directions (host frames before the SE sees
  them, SE frames before the host reads them);
* ``drop``: probability that a frame vanishes (host write ignored / SE reply lost);
* ``truncate``: probability that a frame is cut short (the rest of a read then returns
  0xFF, as an idle I2C data line would);
* NACK storms: ``schedule_nack_storm(k)`` or probability ``nack_storm`` per read of a storm
  of ``nack_storm_len`` NACKed reads;
* WTX storms: ``schedule_wtx_storm(k)`` or probability ``wtx_storm`` per executed APDU of
  ``wtx_storm_len`` extra S(WTX) requests before the response;
* power loss: at the k-th bus transaction (``power_loss_at``, counted from 1), or with
  probability ``power_loss`` per transaction.

``counters`` records what was injected (bit_flips, corrupted_frames, drops, truncations,
nack_storms, nacks, wtx_storms, wtx_requests, power_losses, transactions).
"""

import math
import random

_COUNTERS = ("bit_flips", "corrupted_frames", "drops", "truncations", "nack_storms", "nacks",
             "wtx_storms", "wtx_requests", "power_losses", "transactions")


class FaultPlan:
    """What goes wrong on the bus, reproducibly.

    Params: seed: for random.Random.  ber, drop, truncate, nack_storm, wtx_storm,
        power_loss: probabilities (see the module docstring).  nack_storm_len,
        wtx_storm_len: (min, max) storm lengths.  power_loss_at: transaction numbers.
    """

    def __init__(self, seed=0, ber=0.0, drop=0.0, truncate=0.0, nack_storm=0.0,
                 nack_storm_len=(1, 50), wtx_storm=0.0, wtx_storm_len=(1, 8),
                 power_loss=0.0, power_loss_at=()):
        for name, p in (("ber", ber), ("drop", drop), ("truncate", truncate),
                        ("nack_storm", nack_storm), ("wtx_storm", wtx_storm),
                        ("power_loss", power_loss)):
            if not 0.0 <= p < 1.0:
                raise ValueError("%s must be in [0, 1)" % name)
        self.rng = random.Random(seed)
        self.ber = ber
        self.drop = drop
        self.truncate = truncate
        self.nack_storm = nack_storm
        self.nack_storm_len = nack_storm_len
        self.wtx_storm = wtx_storm
        self.wtx_storm_len = wtx_storm_len
        self.power_loss = power_loss
        self.power_loss_at = set(power_loss_at)
        self._nacks_pending = 0
        self._wtx_pending = 0
        self.counters = dict.fromkeys(_COUNTERS, 0)

    @property
    def active(self):
        """True when any fault can still happen."""
        return bool(self.ber or self.drop or self.truncate or self.nack_storm or
                    self.wtx_storm or self.power_loss or self.power_loss_at or
                    self._nacks_pending or self._wtx_pending)

    def disable(self):
        """Stop injecting anything (pending storms and scheduled power cuts included)."""
        self.ber = self.drop = self.truncate = 0.0
        self.nack_storm = self.wtx_storm = self.power_loss = 0.0
        self.power_loss_at = set()
        self._nacks_pending = 0
        self._wtx_pending = 0

    def schedule_nack_storm(self, k):
        """NACK the next `k` reads."""
        self._nacks_pending += k
        self.counters["nack_storms"] += 1

    def schedule_wtx_storm(self, k):
        """Send `k` extra S(WTX) requests before the next APDU's response."""
        self._wtx_pending += k
        self.counters["wtx_storms"] += 1

    def schedule_power_loss(self, transactions_from_now=1):
        """Cut power at the n-th bus transaction from now (1 = the next one)."""
        self.power_loss_at.add(self.counters["transactions"] + transactions_from_now)

    # ---- hooks for the endpoint ------------------------------------------------------

    def on_transaction(self):
        """Count one bus transaction; return True when power is lost during it."""
        self.counters["transactions"] += 1
        n = self.counters["transactions"]
        cut = n in self.power_loss_at
        if cut:
            self.power_loss_at.discard(n)
        elif self.power_loss and self.rng.random() < self.power_loss:
            cut = True
        if cut:
            self.counters["power_losses"] += 1
        return cut

    def nack_read(self):
        """Return True when this read must be NACKed by a NACK storm."""
        if not self._nacks_pending and self.nack_storm and self.rng.random() < self.nack_storm:
            self._nacks_pending = self.rng.randint(*self.nack_storm_len)
            self.counters["nack_storms"] += 1
        if self._nacks_pending:
            self._nacks_pending -= 1
            self.counters["nacks"] += 1
            return True
        return False

    def wtx_extra(self):
        """Return how many extra S(WTX) requests to send for the APDU just executed."""
        k = self._wtx_pending
        self._wtx_pending = 0
        if self.wtx_storm and self.rng.random() < self.wtx_storm:
            k += self.rng.randint(*self.wtx_storm_len)
            self.counters["wtx_storms"] += 1
        self.counters["wtx_requests"] += k
        return k

    def frame(self, frame):
        """Apply drop / truncation / bit errors to one frame; None when it is dropped."""
        rng = self.rng
        if self.drop and rng.random() < self.drop:
            self.counters["drops"] += 1
            return None
        if self.truncate and len(frame) > 1 and rng.random() < self.truncate:
            self.counters["truncations"] += 1
            frame = frame[: rng.randrange(1, len(frame))]
        return self.flip_bits(frame)

    def flip_bits(self, data):
        """Flip each bit of `data` with probability `ber`; return the (new) bytes."""
        p = self.ber
        if not p or not data:
            return data
        nbits = len(data) * 8
        log_q = math.log(1.0 - p)
        rng = self.rng
        out = None
        pos = -1
        while True:
            # Geometric skip to the next flipped bit: one draw per error, not per bit.
            pos += 1 + int(math.log(1.0 - rng.random()) / log_q)
            if pos >= nbits:
                break
            if out is None:
                out = bytearray(data)
            out[pos >> 3] ^= 1 << (pos & 7)
            self.counters["bit_flips"] += 1
        if out is None:
            return data
        self.counters["corrupted_frames"] += 1
        return bytes(out)
