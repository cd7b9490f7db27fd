# Cached compact revocation set for offline and constrained verifiers: keep the last
# verified set (common/revset.py), replace it with a newer one or apply a delta when one
# arrives (HTTP, MQTT retained message, broadcast, a file), and check peers against it.
# Portable: CPython and MicroPython.  Shares device/crl_cache.py's mechanism
# (device/anchored_store.py: load, refresh, store-then-mark): the SE verifies the
# signature (the revocation signer's point, certified by the fleet root: see
# cloud/revocation/revset_publisher.py), and the high-water mark lives in an SE data object.
#
# Decisions (policy injected: RevsetPolicy):
#   * refresh(fetch, now) / apply_delta(fetch, now): new data replaces the cache only if
#     it parses, names this fleet (fleet_id), is signed by the revocation signer (VERIFY
#     in the SE), decodes consistently (index == body), is not stale (now <= next_update
#     + grace), not from the future (this_update <= now + clock_skew_s) and not older
#     (number >= the mark; equal only with identical bytes).  On any refusal the old set
#     stays and RevsetCacheError says why (`reason`).  A verified set older than the
#     cached one is no refusal: the cached one stays, refresh() returns RESULT_OLDER.
#   * check(facts, now) (a peer's certinfo.CertFacts; check_device(serial, ca_key_id,
#     now) underneath): its device serial in the set or its issuing CA's key id (AKI)
#     among the revoked CAs -> RevokedError, even on a stale set; no set or a stale one ->
#     StaleRevocationError when failing closed, None when failing open.  Both errors are
#     anchored_store.py's, shared with the CRL cache.
#   * A delta carries the new set's header, its additions and the new set's signature;
#     the merge produces the new set's exact bytes, which are then verified as a whole.
#     They are streamed into a staged copy (common/revset_merge.py; a FileStore's goes
#     to its temporary file, a store with begin / append / staged / commit / discard
#     stages it itself), the old set read in place; then the old set leaves the heap (the
#     store still holds it), the staged copy is loaded and verified (every refresh()
#     check), and only then commit() replaces the stored set.  A refusal, a failure or a
#     cut before commit() leaves the old set in the store, and the cache loads it again
#     (verified, as at start-up).  While the new set is checked the cache holds none: like
#     its SE session, a cache belongs to one task (no check() during apply_delta()).
#
# SE object (policy.object_id, default se_consts.DATA_OBJECT_REVSET_NUMBER = 3):
#   version u8 (1) | fleet_id (8) | number u64 big-endian
# Write order: the store first, then the mark (as crl_cache.py, same reasoning).
#
# Heap: the set is kept once, as bytes; lookups decode at most `stride` codes in place.
# A delta needs the old set and a 256-byte chunk while merging, then the new set alone:
# never both sets at once.  Another store with only load() and store() gets the merged
# set gathered in the heap beside the old one (_HeapStaging).

import hashlib
import struct

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


from fleetid.common import revset, revset_merge
from fleetid.device.anchored_store import (  # noqa: F401 - errors and store re-exported
    DEFAULT_CLOCK_SKEW_S,
    RESULT_OLDER,
    AnchoredStore,
    AnchorPolicy,
    FileStore,
    RevocationCacheError,
    RevokedError,
    StaleRevocationError,
    publish,
    synced,
)

REASON_FETCH = "fetch"
REASON_TOO_LARGE = "too_large"
REASON_TRUNCATED = "truncated"
REASON_MALFORMED = "malformed"
REASON_FLEET = "fleet"  # another fleet's set
REASON_SIGNATURE = "signature"
REASON_STALE = "stale"
REASON_ROLLBACK = "rollback"
REASON_FUTURE = "future"  # this_update beyond now + policy.clock_skew_s
REASON_BASE = "base"  # a delta for a set this cache does not hold
REASON_STATE = "state"
REASON_STORE = "store"
REASON_NO_SET = "no_set"
REASON_REVOKED = "revoked"
REASON_SERIAL = "serial"  # a peer certificate naming no device serial of the fleet

# Longest decimal device serial (a registry serial is a positive signed 64-bit integer).
_MAX_SERIAL_DIGITS = const(19)

_STATE_VERSION = const(1)
_STATE_LEN = const(17)


class RevsetCacheError(RevocationCacheError):
    """Refused set or delta (the cache kept what it had), or a peer certificate naming no
    device serial; `reason` is a REASON_* string.  RevokedError and StaleRevocationError
    (anchored_store.py, shared with the CRL cache) answer check()."""


def _refusal(exc):
    # A revset.RevsetError as the cache's refusal.
    return RevsetCacheError(REASON_TRUNCATED if exc.reason == revset.REASON_TRUNCATED
                            else REASON_MALFORMED, exc.detail)


class RevsetPolicy(AnchorPolicy):
    """grace_s: seconds a set stays usable past next_update (default 7 days: offline
    devices hear from the cloud rarely).  fail_open: answer "not known revoked" without a
    fresh set.  object_id: SE data object of the mark.  max_size: largest set accepted.
    clock_skew_s: how far this_update may be ahead of the device's clock (default 300 s,
    anchored_store.DEFAULT_CLOCK_SKEW_S); beyond it: RevsetCacheError(REASON_FUTURE)."""

    def __init__(self, grace_s=7 * 86400, fail_open=False, object_id=3, max_size=1 << 20,
                 clock_skew_s=DEFAULT_CLOCK_SKEW_S):
        AnchorPolicy.__init__(self, grace_s, fail_open, object_id, max_size, clock_skew_s)


def device_number(serial_number):
    """The registry device serial that a fleet certificate's subject serialNumber names:
    what the compact set holds (cloud/revocation/revset_publisher.py keys devices by the
    registry's device serial).

    The line writes PREFIX-NNNNNNNNN (cloud/line/resources.py LineConfig.device_serial:
    "%s-%09d", prefix "FID" by default, configurable per line) in the subject's
    serialNumber and CN, and EST re-enrolment keeps the subject, so every certificate a
    device ever holds names the same number.  A bare decimal is the number itself.

    Params: serial_number: str (the subject serialNumber, or the CN when it has none).
    Returns: int >= 1.
    Raises: RevsetCacheError(REASON_SERIAL) when the text is neither form (a prefix that
        is empty, digits that are not ASCII 0-9, no digits, more than 19 of them).
    """
    if not isinstance(serial_number, str):
        raise RevsetCacheError(REASON_SERIAL, "not text")
    dash = serial_number.rfind("-")
    digits = serial_number[dash + 1:]
    if dash == 0 or not 1 <= len(digits) <= _MAX_SERIAL_DIGITS:
        raise RevsetCacheError(REASON_SERIAL, "not PREFIX-<digits>: %r" % serial_number[:64])
    for c in digits:
        if c < "0" or c > "9":
            raise RevsetCacheError(REASON_SERIAL, "not PREFIX-<digits>: %r"
                                   % serial_number[:64])
    number = int(digits)
    if number < 1:
        raise RevsetCacheError(REASON_SERIAL, "device serial 0: %r" % serial_number[:64])
    return number


def peer_device(facts):
    """The device serial a peer certificate names (device_number of its subject's
    serialNumber, else its CN).  Params: facts: certinfo.CertFacts.
    Raises: RevsetCacheError(REASON_SERIAL)."""
    name = facts.serial_number if facts.serial_number is not None else facts.common_name
    if name is None:
        raise RevsetCacheError(REASON_SERIAL, "the subject has no serialNumber or CN")
    return device_number(name)


def _staging(store):
    # Where a merged set is staged: the store itself when it stages (begin / append /
    # staged / commit / discard), a file beside a FileStore's, else the heap.
    if hasattr(store, "begin"):
        return store
    if isinstance(store, FileStore):
        return _FileStaging(store.path)
    return _HeapStaging(store)


class _FileStaging:
    # A FileStore's set written in pieces: the temporary file and rename its store()
    # uses, so until commit() the stored set stays as it was.
    def __init__(self, path):
        self.path = path
        self.tmp = path + ".tmp"
        self.out = None

    def begin(self):
        self.out = open(self.tmp, "wb")

    def append(self, chunk):
        self.out.write(chunk)

    def staged(self):
        import os

        synced(self.out)
        self.out.close()
        self.out = None
        with open(self.tmp, "rb") as f:
            # one buffer of the file's size: MicroPython's read() of a whole file grows
            # its buffer in steps, each a copy beside the data
            return f.read(os.stat(self.tmp)[6])

    def commit(self):
        publish(self.tmp, self.path)

    def discard(self):
        import os

        out = self.out
        self.out = None
        try:
            if out is not None:
                out.close()
            os.remove(self.tmp)
        except OSError:
            pass  # nothing staged: nothing to remove


class _HeapStaging:
    # A store with only load() and store(bytes): the merged set gathered in the heap
    # (beside the old one) and stored whole on commit.
    def __init__(self, store):
        self.store = store
        self.data = None

    def begin(self):
        self.data = bytearray()

    def append(self, chunk):
        self.data.extend(chunk)

    def staged(self):
        return self.data

    def commit(self):
        self.store.store(self.data)

    def discard(self):
        self.data = None


class RevsetCache(AnchoredStore):
    """The last verified compact set of one fleet.

    Params: se: SeSession.  store: load() -> bytes or None, store(bytes) (FileStore
        fits: a delta is staged in a file beside its own; another store stages it with
        begin(), append(chunk), staged() -> bytes, commit(), discard() if it has them,
        else the merge is gathered in the heap; see the module header).
        signer_point: the revocation signer's 65-byte point (provisioned
        with the fleet root; its certificate chains to the root).  fleet: the 8-byte
        fleet_id (revset.fleet_id(root point)).  policy: RevsetPolicy.
    The load / refresh / mark mechanism is device/anchored_store.py's.
    """

    _ERROR = RevsetCacheError
    _NO_DOC = (REASON_NO_SET, "no verified set cached")
    _NEXT_UPDATE = "next_update"
    _THIS_UPDATE = "this_update"
    _ROLLBACK_FMT = "set %d <= %d"

    def __init__(self, se, store, signer_point, fleet, policy=None):
        if len(signer_point) != 65 or len(fleet) != 8:
            raise ValueError("signer_point / fleet")
        self.se = se
        self.store = store
        self.signer_point = bytes(signer_point)
        self.fleet = bytes(fleet)
        self.policy = policy if policy is not None else RevsetPolicy()
        self._init_anchor()

    def _mark_number(self, record):
        if len(record) != _STATE_LEN or record[0] != _STATE_VERSION \
                or bytes(record[1:9]) != self.fleet:
            return None
        return struct.unpack(">Q", bytes(record[9:]))[0]

    def _mark_record(self, number):
        return bytes((_STATE_VERSION,)) + self.fleet + struct.pack(">Q", number)

    def _verify(self, data):
        try:
            info = revset.parse(data)
        except revset.RevsetError as exc:
            raise _refusal(exc) from None
        if info.fleet_id != self.fleet:
            raise RevsetCacheError(REASON_FLEET, "another fleet's set")
        self._se_verify(info.signed_digest(), info.signature, self.signer_point)
        try:
            info.check_consistent()
        except revset.RevsetError as exc:
            raise RevsetCacheError(REASON_MALFORMED, exc.detail) from None
        return info

    def refresh(self, fetch, now):
        """Fetch a whole set and cache it if it passes every check.
        Returns "updated" / "unchanged" / RESULT_OLDER (a verified set older than the
        cached one, which stays).  Raises RevsetCacheError (old state kept)."""
        self._load()
        return self._accept(self._fetch(fetch), now)

    def apply_delta(self, fetch, now):
        """Fetch a delta, merge it with the cached set and cache the result if the result
        passes every check.  Returns "updated" / "unchanged".
        Raises RevsetCacheError (REASON_BASE when no set or another base: fetch the whole
        set instead; every refresh() reason); the old state is kept."""
        self._load()
        staging, digest = self._merge(self._fetch(fetch))
        number = self._doc.number
        self._doc = None  # the old set leaves the heap (the store keeps it) for the new one
        result = None
        try:
            doc = self._verified(self._stored(staging.staged))
            result = self._admit(doc, now, number,
                                 lambda: hashlib.sha256(doc.data).digest() == digest,
                                 lambda new: self._commit(staging, new))
        finally:
            if self._doc is None:  # not committed: refused, unused, or a failure before
                self._abandon(staging)  # (after a commit the staged copy is the store's)
        return result

    def _merge(self, data):
        # The delta merged with the cached set into a staged copy in the store, chunk by
        # chunk: the old set read in place, the new one never held.  Returns (staging,
        # SHA-256 of the old set's bytes: a delta of the same number must give them).
        # Raises RevsetCacheError (nothing staged, the old set cached).
        base = self._doc
        if base is None:
            raise RevsetCacheError(REASON_BASE, "no set to apply a delta to")
        try:
            delta = revset.RevDelta(data)
        except revset.RevsetError as exc:
            raise _refusal(exc) from None
        if delta.base_number != base.number:
            raise RevsetCacheError(REASON_BASE, "delta for another set")
        staging = _staging(self.store)
        try:
            self._stored(staging.begin)
            revset_merge.write_delta_merge(
                base, delta, lambda chunk: self._stored(staging.append, chunk),
                self.policy.max_size)
        except BaseException as exc:  # noqa: B036 - a cut too: the staged copy goes
            self._abandon(staging)
            if isinstance(exc, revset.RevsetError):
                raise _refusal(exc) from None
            if isinstance(exc, ValueError):
                raise RevsetCacheError(REASON_MALFORMED, str(exc)) from None
            raise
        return staging, hashlib.sha256(base.data).digest()

    def _stored(self, step, *args):
        # A step of the store's; its failure (flash, file system) is REASON_STORE.
        try:
            return step(*args)
        except Exception as exc:  # noqa: BLE001 - flash / file system failure
            raise RevsetCacheError(REASON_STORE, type(exc).__name__) from None

    def _commit(self, staging, doc):
        self._stored(staging.commit)
        self._doc = doc

    def _abandon(self, staging):
        # A merge failed, or its set refused or left unused ("unchanged", older): the
        # staged copy goes and, once the old set has left the heap, it comes back from the
        # store, verified again as at start-up.  A failure here leaves the cache to load
        # it on its next use.
        try:
            staging.discard()
        except Exception:  # noqa: BLE001, S110 - a copy left staged: the next begin() clears it
            pass
        if self._doc is None:
            self._loaded = False
            try:
                self._load()
            except Exception:  # noqa: BLE001 - the SE unreachable: retried on next use
                self._loaded = False

    def number(self):
        """The cached set's number, or None."""
        self._load()
        return None if self._doc is None else self._doc.number

    def check(self, facts, now):
        """Check a peer's certificate: its device serial (device_number of its subject's
        serialNumber, else its CN) and its issuing CA's key id (its AKI).
        Params: facts: certinfo.CertFacts of the peer's certificate.  now: epoch seconds.
        Returns None when not known revoked.  Raises RevsetCacheError(REASON_SERIAL) when
        the subject names no device serial; otherwise as check_device."""
        return self.check_device(peer_device(facts), facts.authority_key_id, now)

    def receive(self, data, now):
        """A set (.frs) or a delta (.frd) just received, by whatever channel: refresh or
        apply_delta by its magic.  Returns and raises as those."""
        if bytes(data[:4]) == revset.DELTA_MAGIC:
            return self.apply_delta(lambda: data, now)
        return self.refresh(lambda: data, now)

    def check_device(self, serial, ca_key_id, now):
        """Check a peer: its device serial and its issuing CA's key id (the AKI of its
        certificate; None to skip).  Returns None when not known revoked.
        Raises RevokedError; StaleRevocationError when failing closed without a fresh set."""
        info = self._current()
        if info is None:
            return None
        if ca_key_id is not None and info.ca_revoked(ca_key_id):
            raise RevokedError(serial, info.number, "issuing CA of %d" % serial, batch=True)
        if info.contains(serial):
            raise RevokedError(serial, info.number, "serial %d" % serial)
        self._check_fresh(info, now)
        return None

    def status(self, now):
        """number, this_update, next_update, revoked, revoked_cas, bytes, state, high_water."""
        info, fresh, out = self._status(now)
        out["revoked"] = 0 if info is None else info.count
        out["revoked_cas"] = 0 if info is None else info.ca_count
        out["bytes"] = 0 if info is None else len(info.data)
        out["state"] = "none" if info is None else ("fresh" if fresh else "stale")
        out["high_water"] = self._mark
        return out
