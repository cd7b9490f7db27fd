# A signed, versioned revocation document kept in untrusted host storage, anchored by a
# high-water mark in an SE data object.  The mechanism device/crl_cache.py (CRLs) and
# device/revset_cache.py (compact revocation sets) share.  Portable: CPython and
# MicroPython (no typing / dataclasses / abc; no allocation beyond the document itself).
#
#   * The mark (the highest document number verified so far) is read from the SE on
#     first use; the stored document is then re-verified through the SE (storage is not
#     trusted), ignored when below the mark, and the mark raised when the document is
#     above it (a refresh cut between store and mark).
#   * Refresh: verify, refuse a document dated beyond the allowed clock skew (its
#     this_update more than policy.clock_skew_s ahead of `now`), stale documents and, with
#     nothing newer cached, older ones (equal number: only the same bytes); store first,
#     then the mark (only when it grows: NVM wear).  On any refusal the old state stays
#     and the subclass's error class says why.
#   * A verified document older than the cached one is not a refusal: it is what a second
#     channel delivers late (a retained MQTT message after an HTTP fetch, a CDN copy), the
#     newer one is kept, and refresh() returns RESULT_OLDER ("older than cached, kept
#     cached") for the caller's log.  The same number with other bytes stays a refusal
#     (REASON_ROLLBACK: two documents under one number is not a harmless delay).
#
# Clock skew (DEFAULT_CLOCK_SKEW_S, 5 minutes; AnchorPolicy clock_skew_s): a signed
# document from the future is refused (REASON_FUTURE).  Why: its number (milliseconds of
# its thisUpdate, cloud/revocation) would become the mark in the SE, and every honest
# document after it would be refused as a rollback until that date; and a device whose
# clock is that far behind cannot judge freshness anyway.  5 minutes covers RTC drift
# between NTP/connectivity events; a fleet with worse clocks raises it.
#
# The errors both caches raise (RevocationCacheError, RevokedError,
# StaleRevocationError) and the file store (FileStore) live here too.
#
# A subclass (CrlCache, RevsetCache) sets self.se, self.store, self.policy (grace_s,
# fail_open, object_id, max_size) and calls _init_anchor(); it provides:
#   _ERROR          exception class of refusals (a RevocationCacheError):
#                   _ERROR(reason, detail)
#   _NO_DOC         (reason, detail) of StaleRevocationError when nothing is cached
#   _NEXT_UPDATE    name of the next-update field in stale details ("... passed")
#   _THIS_UPDATE    name of the this-update field in future details
#   _ROLLBACK_FMT   "%d <= %d" detail format of a rollback refusal
#   _verify(data)   parse + check + self._se_verify(); returns the document (attributes
#                   data, number, this_update, next_update) or raises _ERROR
#   _mark_record(number) -> bytes, _mark_number(record) -> int or None (another record)

from fleetid.common.errors import FleetidError, ReferenceNotFound, VerificationFailed, WrongData

# Reason strings both caches use (their modules re-export them under the same names).
REASON_FETCH = "fetch"  # fetch() raised or did not give bytes
REASON_TOO_LARGE = "too_large"  # over policy.max_size
REASON_SIGNATURE = "signature"  # the SE says the signature does not verify
REASON_STALE = "stale"  # past next update + grace
REASON_ROLLBACK = "rollback"  # number below (or equal to, with other contents) the mark
REASON_STATE = "state"  # the SE object holds another record (misconfiguration)
REASON_STORE = "store"  # the store could not keep the new document
REASON_FUTURE = "future"  # this_update beyond now + policy.clock_skew_s

# refresh() results besides "updated" / "unchanged".
RESULT_OLDER = "older than cached, kept cached"

# Seconds a document's this_update may lie ahead of the device's clock (see the header).
DEFAULT_CLOCK_SKEW_S = 300


class RevocationCacheError(FleetidError):
    """Base of the revocation caches' errors (CRL and compact set); `reason` is a REASON_*
    string of the cache's module, `detail` a short text."""

    def __init__(self, reason, detail=""):
        super().__init__(reason if not detail else reason + ": " + detail)
        self.reason = reason
        self.detail = detail


class RevokedError(RevocationCacheError):
    """The peer is on the cached, verified document (fresh or stale).  `serial` (int: the
    certificate serial for a CRL, the device serial for a compact set), `number` (the
    document's), `batch` (True when its issuing CA is what is revoked),
    `revocation_date` (epoch seconds, or None when the document does not say)."""

    def __init__(self, serial, number, detail, batch=False, revocation_date=None):
        RevocationCacheError.__init__(self, "revoked", detail)
        self.serial = serial
        self.number = number
        self.batch = batch
        self.revocation_date = revocation_date


class StaleRevocationError(RevocationCacheError):
    """No document fresh enough to answer and the policy fails closed (`reason`: the
    cache's "no document" reason, or "stale")."""


def synced(f):
    # The file's bytes on the medium before the rename that publishes them: on CPython
    # (Linux ext4, XFS, ...) a power cut could otherwise leave the new name with no data.
    # MicroPython's file systems (littlefs, FAT) commit at close; its os has no fsync.
    import os

    f.flush()
    if hasattr(os, "fsync"):
        os.fsync(f.fileno())


def publish(tmp, path):
    # rename(tmp, path), and on CPython the directory synced after it: the mark is
    # written to the SE once this returns, and a rename lost to a power cut would leave
    # the older document below that mark, refused as a rollback until the next fetch.
    # Best effort: a file system that cannot sync a directory (some FUSE, 9p) keeps the
    # rename's own guarantees rather than failing a document already published.
    import os

    os.rename(tmp, path)
    if hasattr(os, "fsync") and hasattr(os, "open"):
        try:
            folder = os.open(path.rpartition("/")[0] or ".", os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)
        except OSError:
            pass


class FileStore:
    """A cache's document on a file system: load() the last stored bytes (None when
    absent), store(bytes) atomically and durably (temporary file synced, then renamed,
    then the directory synced)."""

    def __init__(self, path):
        self.path = path

    def load(self):
        try:
            with open(self.path, "rb") as f:
                return f.read()
        except OSError:
            return None

    def store(self, data):
        tmp = self.path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            synced(f)
        publish(tmp, self.path)


class AnchorPolicy:
    """The knobs the mechanism reads (CrlPolicy, RevsetPolicy give the defaults).

    Params: grace_s: seconds a document stays usable past its next update.  fail_open:
        True answers "not known revoked" without a fresh document.  object_id: SE data
        object of the mark.  max_size: largest document accepted (bytes).
        clock_skew_s: seconds a document's this_update may be ahead of `now` (default
        DEFAULT_CLOCK_SKEW_S); beyond it the document is refused (REASON_FUTURE).
    Raises: ValueError (grace_s < 0, max_size < 64 or clock_skew_s < 0).
    """

    def __init__(self, grace_s, fail_open, object_id, max_size,
                 clock_skew_s=DEFAULT_CLOCK_SKEW_S):
        if grace_s < 0 or max_size < 64 or clock_skew_s < 0:
            raise ValueError("grace_s >= 0, max_size >= 64 and clock_skew_s >= 0")
        self.clock_skew_s = clock_skew_s
        self.grace_s = grace_s
        self.fail_open = fail_open
        self.object_id = object_id
        self.max_size = max_size


class AnchoredStore:
    """Base of the SE-anchored caches (see the module header for what a subclass sets)."""

    def _init_anchor(self):
        self._doc = None  # the verified document, or None
        self._mark = None  # highest number verified (from the SE object), or None
        self._loaded = False

    # -- SE high-water mark --------------------------------------------------------------

    def _read_mark(self):
        try:
            record = self.se.read_object(self.policy.object_id)
        except ReferenceNotFound:
            return None
        number = self._mark_number(record)
        if number is None:
            raise self._ERROR(REASON_STATE, "SE object %d holds another record"
                              % self.policy.object_id)
        return number

    def _write_mark(self, number):
        self.se.write_object(self.policy.object_id, self._mark_record(number))
        self._mark = number

    # -- verification ----------------------------------------------------------------------

    def _se_verify(self, digest, signature, point):
        try:
            self.se.verify(digest, signature, point=point)
        except VerificationFailed:
            raise self._ERROR(REASON_SIGNATURE, "does not verify") from None
        except (WrongData, ValueError):
            raise self._ERROR(REASON_SIGNATURE, "malformed") from None

    def _verified(self, data):
        if len(data) > self.policy.max_size:
            raise self._ERROR(REASON_TOO_LARGE, "%d bytes" % len(data))
        return self._verify(data)

    def _load(self):
        if self._loaded:
            return
        self._mark = self._read_mark()
        self._loaded = True
        data = self.store.load()
        if not data:
            return
        try:
            doc = self._verified(data)
        except self._ERROR:
            return  # an unusable cache file counts as none; the next refresh replaces it
        if self._mark is not None and doc.number < self._mark:
            return  # an older document put back in the store: refused
        if self._mark is None or doc.number > self._mark:
            self._write_mark(doc.number)  # a refresh cut between store and mark
        self._doc = doc

    # -- replacing the document ------------------------------------------------------------

    def _fetch(self, fetch):
        try:
            data = fetch()
        except Exception as exc:  # noqa: BLE001 - any transport failure is a fetch failure
            raise self._ERROR(REASON_FETCH, type(exc).__name__) from None
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise self._ERROR(REASON_FETCH, "not bytes")
        return bytes(data)

    def _accept(self, data, now):
        # data: bytes.  Returns "updated" / "unchanged" / RESULT_OLDER; raises _ERROR
        # (old state kept).
        doc = self._verified(data)
        current = self._doc
        return self._admit(doc, now, None if current is None else current.number,
                           lambda: _same(current.data, data), self._store)

    def _admit(self, doc, now, number, same, keep):
        # The decisions on a verified document.  number: the cached document's (None:
        # none cached); same(): True when doc's bytes are the cached document's;
        # keep(doc): stores doc and makes it the cached one.
        ahead = doc.this_update - now
        if ahead > self.policy.clock_skew_s:
            raise self._ERROR(REASON_FUTURE, "%s %d s ahead of this device's clock (%d s "
                              "allowed)" % (self._THIS_UPDATE, ahead,
                                            self.policy.clock_skew_s))
        if number is not None and doc.number < number:
            return RESULT_OLDER  # a late copy from another channel: the newer one stays
        if now > doc.next_update + self.policy.grace_s:
            raise self._ERROR(REASON_STALE, self._NEXT_UPDATE + " passed")
        mark = self._mark
        if mark is not None and doc.number <= mark:
            if doc.number == mark and (number is None or same()):
                if number is None:
                    keep(doc)
                    return "updated"  # the document the mark names, back in the cache
                return "unchanged"
            raise self._ERROR(REASON_ROLLBACK, self._ROLLBACK_FMT % (doc.number, mark))
        keep(doc)
        self._write_mark(doc.number)
        return "updated"

    def _store(self, doc):
        try:
            self.store.store(doc.data)
        except Exception as exc:  # noqa: BLE001 - flash / file system failure
            raise self._ERROR(REASON_STORE, type(exc).__name__) from None
        self._doc = doc

    # -- answering -------------------------------------------------------------------------

    def fresh(self, now):
        """True when a document is cached and now <= its next update + grace."""
        self._load()
        return self._doc is not None and now <= self._doc.next_update + self.policy.grace_s

    def _current(self):
        # The cached document, or None when failing open without one; raises StaleRevocationError
        # (the _NO_DOC reason) when failing closed without one.
        self._load()
        doc = self._doc
        if doc is None and not self.policy.fail_open:
            raise StaleRevocationError(self._NO_DOC[0], self._NO_DOC[1])
        return doc

    def _check_fresh(self, doc, now):
        # After the revocation lookups: a stale document fails closed.
        if now > doc.next_update + self.policy.grace_s and not self.policy.fail_open:
            raise StaleRevocationError(REASON_STALE, self._NEXT_UPDATE + " + grace passed")

    def _status(self, now):
        # (document or None, fresh, dict with number, this_update, next_update).
        self._load()
        doc = self._doc
        fresh = self.fresh(now)
        if doc is None:
            return doc, fresh, {"number": None, "this_update": None, "next_update": None}
        return doc, fresh, {"number": doc.number, "this_update": doc.this_update,
                            "next_update": doc.next_update}


def _same(stored, data):
    # stored: the cached document's bytes (bytes, or a buffer); data: bytes.
    if not isinstance(stored, bytes):
        stored = bytes(stored)
    return stored == data
