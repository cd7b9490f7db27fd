"""Pre-signed OCSP responses, as a production responder serves them (RFC 6960 2.4: a
responder may pre-produce responses; RFC 5019 2.2/6: the lightweight profile, answers
cacheable by HTTP).

    cache = OcspCache(responder, validity=timedelta(hours=1), refresh_fraction=0.5,
                      epoch=lambda: read_event(events_path))
    cache.start()                      # background: pre-sign, then refresh ahead of time
    answer = cache.prepare(request_der)
    if answer.query is not None:       # a nonce, a miss, an unknown serial: sign now
        answer = cache.sign(answer.query)      # (off the event loop: it signs)
    answer.der, answer.headers(now)

What is cached: one DER OCSPResponse per (issuing CA, CertID hash algorithm, serial),
with its status, thisUpdate (= producedAt) and nextUpdate (thisUpdate + `validity`).
The background thread signs one for every unexpired certificate the registry knows
(`Registry.certificate_serials`, SHA-1 CertIDs: RFC 5019 2.1.1) and re-signs each when
`refresh_fraction` of its validity has passed, well before nextUpdate; SHA-256 CertIDs
are cached on their first request.  Not cached (signed per request, Cache-Control
no-store): requests with a nonce (RFC 8954: the nonce is echoed, so the answer is that
request's alone), serials the registry does not know (status unknown: the certificate
may be issued a moment later), and the responder's `known` certificates outside the
registry (the verifier's server certificate).

Revocation: the cache is as fresh as the revocation epoch.  `epoch()` is read on every
request (it must be cheap: one stat of the event file, or a counter that PostgreSQL
notifications keep in memory) and `invalidate()` is what a tier's event hook calls.
When either says something changed, the next request first reconciles (one query per
issuing CA: `revoked_certificates`, and the revoked-CA map): the entries of every newly
revoked certificate (every entry of a newly revoked CA) are dropped and queued to be
re-signed at once.  Because the revocation is committed before its epoch is bumped
(RevocationService._announce), the reconciled set holds every revocation the epoch
announces.  Belt and braces: a GOOD entry is never served, nor stored by a signer that
read its status before the revocation, when the serial is in that set -- a revoked
certificate is never answered good from the cache once its epoch is seen.

Bounds: at most `max_entries` responses (full: new answers are still signed and served,
just not kept); the refresh heap holds at most one live item per entry.
"""

import datetime
import email.utils
import hashlib
import heapq
import itertools
import logging
import threading

from cryptography.hazmat.primitives import hashes
from cryptography.x509 import ocsp

from fleetid.cloud.revocation.ocsp import UNAUTHORIZED, read_request

log = logging.getLogger("fleetid.cloud.ocsp")

DEFAULT_CACHE_VALIDITY = datetime.timedelta(hours=1)
DEFAULT_REFRESH_FRACTION = 0.5
DEFAULT_MAX_ENTRIES = 250_000
PRESIGN_ALGORITHM = "sha1"  # RFC 5019 2.1.1: clients of the lightweight profile use SHA-1
_ALGORITHMS = {"sha1": hashes.SHA1(), "sha256": hashes.SHA256()}
_GOOD = ocsp.OCSPCertStatus.GOOD
_UNKNOWN = ocsp.OCSPCertStatus.UNKNOWN
_REVOKED = ocsp.OCSPCertStatus.REVOKED
NO_STORE = {"Cache-Control": "no-store"}


def _http_date(ts):
    return email.utils.formatdate(ts, usegmt=True)


class CachedResponse:
    """One signed response: der, status (OCSPCertStatus), this_update / next_update
    (epoch seconds), refresh_at (epoch seconds), and its RFC 5019 6.2 header values."""

    __slots__ = ("der", "status", "this_update", "next_update", "refresh_at", "etag",
                 "last_modified", "expires")

    def __init__(self, der, status, this_update, next_update, refresh_fraction):
        self.der = der
        self.status = status
        self.this_update = this_update.timestamp()
        self.next_update = next_update.timestamp()
        self.refresh_at = self.this_update + refresh_fraction * (
            self.next_update - self.this_update)
        self.etag = '"%s"' % hashlib.sha256(der).hexdigest()[:32]
        self.last_modified = _http_date(self.this_update)  # producedAt = thisUpdate
        self.expires = _http_date(self.next_update)


class OcspAnswer:
    """What prepare() / sign() give the listener: `der` and its `entry` (a
    CachedResponse when the answer may be cached by HTTP, else None), or `query` (a
    request that needs a signature: pass it to sign(), off the event loop)."""

    __slots__ = ("der", "entry", "query")

    def __init__(self, der=None, entry=None, query=None):
        self.der = der
        self.entry = entry
        self.query = query

    def headers(self, now_ts):
        """RFC 5019 6.2: max-age up to nextUpdate, ETag, Last-Modified (producedAt),
        Expires (nextUpdate); no-store for an answer that is not cacheable."""
        entry = self.entry
        if entry is None:
            return NO_STORE
        return {"Cache-Control": "max-age=%d, public, no-transform, must-revalidate"
                % max(0, int(entry.next_update - now_ts)),
                "ETag": entry.etag, "Last-Modified": entry.last_modified,
                "Expires": entry.expires}


class OcspQuery:
    """A parsed request waiting for a signature: signer index, algorithm, serial, nonce;
    or, while a revocation is still to be reconciled, the request's DER alone."""

    __slots__ = ("index", "algorithm", "serial", "nonce", "request_der")

    def __init__(self, index, algorithm, serial, nonce, request_der=None):
        self.index = index
        self.algorithm = algorithm
        self.serial = serial
        self.nonce = nonce
        self.request_der = request_der


class OcspCache:
    """Pre-signed responses of an OcspResponder (ocsp.py), refreshed ahead of nextUpdate
    and re-signed on revocation events.

    Params: responder: OcspResponder (its signers, registry, revoked_cas, clock).
        validity: nextUpdate - thisUpdate of cached responses.  refresh_fraction: the
        share of that validity after which an entry is re-signed (0 < f < 1).
        epoch: () -> any comparable value that changes when a revocation is committed
        (default: none; then only invalidate() announces one).  max_entries: bound on
        cached responses.
    """

    def __init__(self, responder, validity=DEFAULT_CACHE_VALIDITY,
                 refresh_fraction=DEFAULT_REFRESH_FRACTION, epoch=None,
                 max_entries=DEFAULT_MAX_ENTRIES):
        if not 0 < refresh_fraction < 1:
            raise ValueError("refresh_fraction must be between 0 and 1")
        self.responder = responder
        self.clock = responder.clock
        self.validity = validity
        self.refresh_fraction = refresh_fraction
        self.epoch = epoch or (lambda: 0)
        self.max_entries = max_entries
        self._index = {}  # (algorithm name, issuerNameHash, issuerKeyHash) -> signer index
        for index, signer in enumerate(responder.signers):
            for key in signer.ids:
                self._index[key] = index
        self._entries = {}  # (signer index, algorithm name, serial) -> CachedResponse
        # DER request without nonce -> its key: a client asks with the same bytes each
        # time, so those are parsed once (bounded like the entries).
        self._parsed = {}
        self._due = []  # heap of (refresh_at, sequence, key)
        self._sequence = itertools.count()
        self._revoked = set()  # (signer index, serial) revoked at the reconciled epoch
        self._revoked_cas = {}  # signer index -> revoked_at (batch revocation)
        self._seen_epoch = None
        # invalidate() counts up; a reconciliation catches up with the count it read
        # before its registry reads (one during the reads forces another pass).
        self._invalidated = 1
        self._reconciled = 0  # reconcile before the first answer
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._thread = None
        self.stats = {"hits": 0, "signed": 0, "fresh": 0, "dropped": 0}

    # -- the request path --------------------------------------------------------------------

    def prepare(self, request_der):
        """Answer from the cache when it can (non-blocking: one epoch() call and dict
        lookups).  Never raises for bad input: a request that does not parse gets
        malformedRequest, a foreign issuer unauthorized.  Returns OcspAnswer, with
        `query` set when a signature or a reconciliation is needed (sign() it)."""
        if type(request_der) is not bytes:
            request_der = bytes(request_der)
        if self._reconciled != self._invalidated or self.epoch() != self._seen_epoch:
            # A revocation to reconcile first (registry reads): in sign(), off the loop.
            return OcspAnswer(query=OcspQuery(None, None, None, None, request_der))
        key = self._parsed.get(request_der)  # the same bytes parse the same: skip it
        if key is None:
            request, nonce, refusal = read_request(request_der)
            if refusal is not None:
                return OcspAnswer(refusal)
            algorithm = request.hash_algorithm.name
            index = self._index.get((algorithm, request.issuer_name_hash,
                                     request.issuer_key_hash))
            if index is None:
                return OcspAnswer(UNAUTHORIZED)
            key = (index, algorithm, request.serial_number)
            if nonce is not None:
                return OcspAnswer(query=OcspQuery(index, algorithm, key[2], nonce))
            if len(self._parsed) < self.max_entries:
                self._parsed[request_der] = key
        entry = self._entries.get(key)
        if entry is not None and self._servable(entry, key[0], key[2]):
            self.stats["hits"] += 1
            return OcspAnswer(entry.der, entry)
        return OcspAnswer(query=OcspQuery(key[0], key[1], key[2], None))

    def _servable(self, entry, index, serial):
        if self.clock().timestamp() >= entry.next_update:
            return False  # the refresher fell behind: sign a new one
        return entry.status is not _GOOD or not (
            (index, serial) in self._revoked or index in self._revoked_cas)

    def sign(self, query):
        """Answer a query prepare() could not (blocking: the reconciliation's registry
        reads, a registry read and an HSM signature), keeping the answer when it is
        cacheable.  Returns OcspAnswer."""
        if query.request_der is not None:  # reconcile, then answer as prepare() would
            self.sync()
            answer = self.prepare(query.request_der)
            if answer.query is None or answer.query.request_der is not None:
                return answer if answer.query is None else self.sign(answer.query)
            query = answer.query
        signer = self.responder.signers[query.index]
        algorithm = _ALGORITHMS[query.algorithm]
        if query.nonce is not None or query.serial in self.responder.known:
            self.stats["fresh"] += 1
            return OcspAnswer(self.responder.sign_response(
                signer, algorithm, query.serial, query.nonce)[0])
        entry = self._sign_entry((query.index, query.algorithm, query.serial))
        return OcspAnswer(entry.der, entry if entry.status is not _UNKNOWN else None)

    def answer(self, request_der):
        """prepare() then sign() when needed, in the calling thread.  Returns OcspAnswer."""
        answer = self.prepare(request_der)
        return self.sign(answer.query) if answer.query is not None else answer

    # -- revocation events -------------------------------------------------------------------

    def invalidate(self):
        """A revocation was written (the event hook): reconcile before the next answer."""
        self._invalidated += 1

    def sync(self):
        """Reconcile with the revocation state when the epoch moved or invalidate() was
        called (one read of revoked certificates per issuing CA); else one epoch() call."""
        epoch = self.epoch()
        if epoch == self._seen_epoch and self._reconciled == self._invalidated:
            return
        with self._sync_lock:
            target = self._invalidated
            if epoch == self._seen_epoch and self._reconciled == target:
                return
            revoked, revoked_cas = self._read_revocations()
            with self._lock:
                self._apply(revoked, revoked_cas)
                self._seen_epoch = epoch
                self._reconciled = target

    def _read_revocations(self):
        revoked = set()
        registry = self.responder.registry
        for index, signer in enumerate(self.responder.signers):
            for record in registry.revoked_certificates(signer.issuer_text):
                revoked.add((index, int(record.cert_serial, 16)))
        cas = self.responder.revoked_cas()
        revoked_cas = dict((index, cas[signer.key_id])
                           for index, signer in enumerate(self.responder.signers)
                           if signer.key_id in cas)
        return revoked, revoked_cas

    def _apply(self, revoked, revoked_cas):
        # Under self._lock: drop what the new state changes and queue it to be re-signed.
        # A certificate whose revocation state changed: its entries saying otherwise
        # (an entry signed after the revocation already says "revoked").
        keys = []
        for index, serial in revoked.symmetric_difference(self._revoked):
            now_revoked = (index, serial) in revoked
            for algorithm in _ALGORITHMS:
                entry = self._entries.get((index, algorithm, serial))
                if entry is not None and (entry.status is _REVOKED) != now_revoked:
                    keys.append((index, algorithm, serial))
        # A CA revoked (or restored): every entry under it (cACompromise wins, ocsp.py).
        changed_cas = set(index for index in set(revoked_cas) | set(self._revoked_cas)
                          if revoked_cas.get(index) != self._revoked_cas.get(index))
        if changed_cas:
            keys += [key for key in self._entries if key[0] in changed_cas]
        self._revoked = revoked
        self._revoked_cas = revoked_cas
        for key in keys:
            if self._entries.pop(key, None) is not None:
                self.stats["dropped"] += 1
                heapq.heappush(self._due, (0.0, next(self._sequence), key))
        if keys:
            self._wake.notify_all()

    # -- signing and refreshing --------------------------------------------------------------

    def _sign_entry(self, key):
        index, algorithm, serial = key
        der, status, this_update, next_update = self.responder.sign_response(
            self.responder.signers[index], _ALGORITHMS[algorithm], serial,
            validity=self.validity)
        entry = CachedResponse(der, status, this_update, next_update, self.refresh_fraction)
        self.stats["signed"] += 1
        if status is not _UNKNOWN:
            self._store(key, entry)
        return entry

    def _store(self, key, entry):
        with self._lock:
            if entry.status is _GOOD and ((key[0], key[2]) in self._revoked
                                          or key[0] in self._revoked_cas):
                return  # its status was read before a revocation reconciled since
            if key not in self._entries and len(self._entries) >= self.max_entries:
                return
            self._entries[key] = entry
            heapq.heappush(self._due, (entry.refresh_at, next(self._sequence), key))

    def refresh_due(self, limit=1000):
        """Re-sign the entries whose refresh time has come and those a revocation
        dropped (at most `limit` per call).  Returns how many were signed."""
        now_ts = self.clock().timestamp()
        work = []
        with self._lock:
            while self._due and self._due[0][0] <= now_ts and len(work) < limit:
                refresh_at, _, key = heapq.heappop(self._due)
                entry = self._entries.get(key)
                if entry is None and refresh_at != 0.0:
                    continue  # dropped: its re-signing was queued with refresh_at 0
                if entry is not None and entry.refresh_at != refresh_at:
                    continue  # superseded by a newer signature
                work.append(key)
        for key in work:
            self._sign_entry(key)
        return len(work)

    def presign(self):
        """Sign a response for every unexpired certificate of every issuing CA the
        registry knows and that is not cached yet (SHA-1 CertIDs).  Returns the count."""
        self.sync()  # the revoked set the stored answers are checked against
        count = 0
        valid_at = self.clock().astimezone(datetime.timezone.utc).strftime(
            "%Y-%m-%dT%H:%M:%S.000Z")
        for index, signer in enumerate(self.responder.signers):
            for serial in self.responder.registry.certificate_serials(signer.issuer_text,
                                                                      valid_at):
                if self._stop.is_set() or len(self._entries) >= self.max_entries:
                    return count
                key = (index, PRESIGN_ALGORITHM, serial)
                if key not in self._entries:
                    self._sign_entry(key)
                    count += 1
        return count

    def __len__(self):
        return len(self._entries)

    # -- the background thread ---------------------------------------------------------------

    def start(self):
        """Start the background thread: pre-sign, then refresh due entries (waking at
        most every second, and at once when a revocation drops entries)."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="ocsp-cache", daemon=True)
            self._thread.start()

    def stop(self, timeout=10.0):
        """Stop the background thread (bounded wait)."""
        self._stop.set()
        with self._lock:
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self):
        try:
            self.sync()
            self.presign()
        except Exception:  # noqa: BLE001 - logged; misses are signed on request meanwhile
            log.error("OCSP pre-signing failed", exc_info=True)
        while not self._stop.is_set():
            failed = False
            try:
                self.sync()
                self.refresh_due()
            except Exception:  # noqa: BLE001 - logged, retried at the next wake-up
                log.error("OCSP refresh failed", exc_info=True)
                failed = True
            with self._lock:
                wait = 1.0
                if self._due and not failed:
                    wait = min(wait, max(0.0, self._due[0][0] - self.clock().timestamp()))
                if wait > 0 and not self._stop.is_set():
                    self._wake.wait(wait)
