# Cached revocation for intermittent links: keep the last verified CRL of one issuing CA,
# refresh it on every connectivity event, and check certificate serials against it.
# Portable: CPython and MicroPython (common/der.py's strict reader, hashlib; no crypto of
# its own: the SE verifies the CRL's signature with the issuing CA's public point).
#
# CRL layout (RFC 5280 5.1), what parse_crl() accepts:
#
#   CertificateList ::= SEQUENCE {
#     tbsCertList          SEQUENCE {                      <- SHA-256 of these bytes is
#       version            INTEGER v2(1) OPTIONAL             what the SE verifies
#       signature          AlgorithmIdentifier  ecdsa-with-SHA256, no parameters
#       issuer             Name                 byte-equal to issuer_name_der
#       thisUpdate         Time                 UTCTime 17 "YYMMDDHHMMSSZ" or
#       nextUpdate         Time                 GeneralizedTime 18 "YYYYMMDDHHMMSSZ";
#                                               required here (RFC 5280 5.1.2.5 MUST)
#       revokedCertificates SEQUENCE OF SEQUENCE {  OPTIONAL
#         userCertificate  INTEGER (serial)
#         revocationDate   Time
#         crlEntryExtensions Extensions OPTIONAL }  (no critical ones: 5.3)
#       crlExtensions  [0] EXPLICIT Extensions      cRLNumber 2.5.29.20 required (5.2.3
#     }                                             MUST); any other critical one (delta
#     signatureAlgorithm   AlgorithmIdentifier      CRL indicator, issuing distribution
#     signatureValue       BIT STRING               point) refused (5.2: "MUST NOT use")
#   }                      (DER ECDSA-Sig-Value)
#
# Decisions (policy injected: CrlPolicy):
#   * refresh(fetch, now): a fetched CRL replaces the cache only if it is well-formed DER,
#     from this issuer, signed by it (VERIFY in the SE), not from the future (thisUpdate <=
#     now + clock_skew_s, 5 minutes by default), not stale (now <= nextUpdate + grace) and
#     not older (cRLNumber >= the high-water mark); on any refusal the old cache stays,
#     and CrlError says why (`reason`, REASON_* below).  A signed CRL older than the
#     cached one (a late copy from a second channel) is no refusal: the cached one stays
#     and refresh() returns RESULT_OLDER ("older than cached, kept cached").
#   * check(facts, now) / check_serial(serial, now): revoked on the cached CRL ->
#     RevokedError, even when that CRL is stale; no CRL, or a stale one (now >
#     nextUpdate + grace) -> StaleRevocationError when the policy fails closed, None (not
#     known revoked) when it fails open.
#   * Times are seconds since 1970-01-01 UTC (ints), injected by the caller.
#
# Where the high-water mark lives: in an SE data object (policy.object_id, default 1;
# se_consts.DATA_OBJECT_CRL_NUMBER), not beside the cached CRL.  The cache itself sits in
# the injected store (a file on Linux, flash on an MCU); whoever can swap that file could
# put back an older, validly signed CRL that still lists fewer revocations.  The SE object
# holds the highest cRLNumber verified so far, so a cached CRL below it is refused at load
# time.  (The number is a CRL's 1..20-octet integer: the SE's u32 monotonic counters are
# too small for it; cloud/revocation numbers are milliseconds since the epoch.)  Record:
#   version u8 (1) | SHA-256(issuer_name_der)[:8] | cRLNumber, big-endian, minimal
# Write order on refresh: the store first, then the SE object (only when the number grows:
# NVM wear).  A power cut between the two leaves a cached CRL above the mark, which load
# accepts (it is signed) and then raises the mark to; the other order would leave the
# cache below the mark, i.e. no usable CRL until the next refresh.
#
# The load / refresh / mark mechanism lives in device/anchored_store.py (shared with
# device/revset_cache.py); this module keeps the CRL format, the mark record and checks.
#
# Heap: the CRL is kept once, as bytes; its entries are walked when checked, never copied
# into a list (check() is per connection, not per packet).

import hashlib

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


from fleetid.common import asn1time, der
from fleetid.common.errors import DerError
from fleetid.device.anchored_store import (  # noqa: F401 - errors and store re-exported
    DEFAULT_CLOCK_SKEW_S,
    RESULT_OLDER,
    AnchoredStore,
    AnchorPolicy,
    FileStore,
    RevocationCacheError,
    RevokedError,
    StaleRevocationError,
)

# CrlError / RevocationCacheError.reason values.
REASON_FETCH = "fetch"  # fetch() raised
REASON_TOO_LARGE = "too_large"  # over policy.max_size
REASON_TRUNCATED = "truncated"  # the DER ends inside an element
REASON_MALFORMED = "malformed"  # not the strict DER of a CRL (or no nextUpdate / number)
REASON_ALGORITHM = "algorithm"  # not ecdsa-with-SHA256
REASON_ISSUER = "issuer"  # signed by / naming another CA
REASON_SIGNATURE = "signature"  # the SE says the signature does not verify
REASON_UNSUPPORTED = "unsupported"  # a critical extension this cache cannot honour
REASON_STALE = "stale"  # past nextUpdate + grace
REASON_ROLLBACK = "rollback"  # cRLNumber below the mark with nothing newer cached, or
#                               equal to it with other contents
REASON_FUTURE = "future"  # thisUpdate beyond now + policy.clock_skew_s
REASON_STATE = "state"  # the SE object holds another issuer's mark (misconfiguration)
REASON_STORE = "store"  # the store could not keep the new CRL
REASON_NO_CRL = "no_crl"  # nothing cached (StaleRevocationError)
REASON_REVOKED = "revoked"  # RevokedError

_TAG_CONTEXT_0 = const(0xA0)
# OID contents octets (X.690 8.19) of the extensions this cache knows.
_OID_CRL_NUMBER = b"\x55\x1d\x14"  # 2.5.29.20
_OID_REASON_CODE = b"\x55\x1d\x15"  # 2.5.29.21 (entry, non-critical)
_OID_INVALIDITY_DATE = b"\x55\x1d\x18"  # 2.5.29.24 (entry, non-critical)
_OID_AKI = b"\x55\x1d\x23"  # 2.5.29.35
_STATE_VERSION = const(1)
_ISSUER_TAG_LEN = const(8)
_CRL_NUMBER_MAX_OCTETS = const(20)  # RFC 5280 5.2.3


class CrlError(RevocationCacheError):
    """A fetched or cached CRL was refused; the cache kept what it had."""


class CrlPolicy(AnchorPolicy):
    """How the cache decides.

    Params: grace_s: seconds a CRL stays usable past its nextUpdate (default 1 day: a
        device offline over a weekend still works when the cloud re-publishes at half
        validity).  fail_open: True answers "not known revoked" without a fresh CRL
        (availability first); False (default) refuses (security first).  object_id: SE
        data object for the high-water mark (default 1, se_consts.DATA_OBJECT_CRL_NUMBER;
        one object per cached issuer).  max_size: largest CRL accepted (bytes; default
        64 KiB).  clock_skew_s: how far a CRL's thisUpdate may be ahead of the device's
        clock (default DEFAULT_CLOCK_SKEW_S = 300 s); beyond it: CrlError(REASON_FUTURE).
    """

    def __init__(self, grace_s=86400, fail_open=False, object_id=1, max_size=65536,
                 clock_skew_s=DEFAULT_CLOCK_SKEW_S):
        AnchorPolicy.__init__(self, grace_s, fail_open, object_id, max_size, clock_skew_s)


# -- time: RFC 5280 4.1.2.5 -> seconds since the epoch ------------------------------------


def _read_time(reader):
    # An RFC 5280 Time (UTCTime or GeneralizedTime) -> epoch seconds (common/asn1time.py).
    tag = reader.peek_tag()
    if tag != asn1time.TAG_UTC_TIME and tag != asn1time.TAG_GENERALIZED_TIME:
        raise DerError(der.REASON_TAG, "not a Time")
    return asn1time.parse_time(tag, reader.read_tlv(tag)[1])


# -- parsing -------------------------------------------------------------------------------


class CrlInfo:
    """What parse_crl() found.  Attributes: issuer_der (raw Name), this_update,
    next_update (epoch seconds), number (int), revoked_count, signature_der, tbs_start,
    tbs_end (offsets of tbsCertList in the CRL), and the CRL bytes (`data`)."""

    def __init__(self):
        self.data = None
        self.issuer_der = None
        self.this_update = None
        self.next_update = None
        self.number = None
        self.revoked_count = 0
        self.signature_der = None
        self.tbs_start = 0
        self.tbs_end = 0
        self._entries = None  # (start, end) of revokedCertificates' contents, or None


def _extensions(reader, known_noncritical, known):
    # Walk Extensions; returns {oid contents: extnValue} for the `known` OIDs; refuses
    # a critical extension not in `known` and a `known_noncritical` one marked critical.
    found = {}
    seq = reader.read_sequence()
    while not seq.at_end():
        ext = seq.read_sequence()
        oid = ext.read_tlv(der.TAG_OID)[1]
        critical = False
        if ext.peek_tag() == der.TAG_BOOLEAN:
            critical = ext.read_boolean()
            if not critical:
                raise DerError(der.REASON_VALUE, "DEFAULT FALSE encoded")  # X.690 11.5
        value = ext.read_octet_string()
        ext.finish()
        if oid in found:
            raise DerError(der.REASON_VALUE, "duplicate extension")  # RFC 5280 4.2
        if critical and (oid not in known or oid in known_noncritical):
            raise CrlError(REASON_UNSUPPORTED, "critical extension")
        if oid in known:
            found[oid] = value
    return found


def _read_entry(entries):
    # One revokedCertificates entry: (serial, revocation date).
    entry = entries.read_sequence()
    serial = entry.read_integer()
    when = _read_time(entry)
    if not entry.at_end():
        _extensions(entry, (_OID_REASON_CODE, _OID_INVALIDITY_DATE),
                    (_OID_REASON_CODE, _OID_INVALIDITY_DATE))
    entry.finish()
    return serial, when


def parse_crl(data):
    """Parse a DER CRL strictly (the layout in the module header).

    Params: data: bytes.
    Returns: CrlInfo (the signature is NOT checked here: CrlCache does that in the SE).
    Raises: CrlError (REASON_TRUNCATED, REASON_MALFORMED, REASON_ALGORITHM,
        REASON_UNSUPPORTED).
    """
    if not isinstance(data, bytes):
        data = bytes(data)
    try:
        return _parse(data)
    except DerError as exc:
        if exc.reason == der.REASON_TRUNCATED:
            raise CrlError(REASON_TRUNCATED, exc.detail) from None
        if exc.reason == der.REASON_ALGORITHM:
            raise CrlError(REASON_ALGORITHM, exc.detail) from None
        raise CrlError(REASON_MALFORMED, exc.reason + " " + exc.detail) from None


def _parse(data):
    info = CrlInfo()
    info.data = data
    outer = der.DerReader(data)
    cert_list = outer.read_sequence()
    outer.finish()
    info.tbs_start = cert_list.span()[0]
    tbs = cert_list.read_sequence()
    info.tbs_end = cert_list.span()[0]
    der.read_ecdsa_with_sha256_algorithm(cert_list)
    info.signature_der = cert_list.read_bit_string()
    cert_list.finish()
    der.ecdsa_der_to_raw(info.signature_der)  # strict ECDSA-Sig-Value (REASON_RANGE...)

    if tbs.peek_tag() == der.TAG_INTEGER:
        if tbs.read_integer() != 1:  # v2; v1 CRLs have no extensions, so no number
            raise DerError(der.REASON_VALUE, "version")
    der.read_ecdsa_with_sha256_algorithm(tbs)
    info.issuer_der = tbs.read_raw(der.TAG_SEQUENCE)
    info.this_update = _read_time(tbs)
    if tbs.peek_tag() not in (asn1time.TAG_UTC_TIME, asn1time.TAG_GENERALIZED_TIME):
        raise DerError(der.REASON_VALUE, "no nextUpdate")  # RFC 5280 5.1.2.5
    info.next_update = _read_time(tbs)
    if tbs.peek_tag() == der.TAG_SEQUENCE:
        entries = tbs.read_sequence()
        info._entries = entries.span()
        if entries.at_end():
            raise DerError(der.REASON_VALUE, "empty revokedCertificates")  # 5.1.2.6
        while not entries.at_end():
            serial, _ = _read_entry(entries)
            if serial < 1:
                raise DerError(der.REASON_RANGE, "serial")  # RFC 5280 4.1.2.2: positive
            info.revoked_count += 1
    extensions = tbs.read_optional_context(0)
    tbs.finish()
    if extensions is None:
        raise DerError(der.REASON_VALUE, "no crlExtensions")
    found = _extensions(extensions, (_OID_CRL_NUMBER, _OID_AKI), (_OID_CRL_NUMBER, _OID_AKI))
    extensions.finish()
    number = found.get(_OID_CRL_NUMBER)
    if number is None:
        raise DerError(der.REASON_VALUE, "no cRLNumber")  # RFC 5280 5.2.3 MUST
    _, contents = der.read_single(number, der.TAG_INTEGER)
    info.number = der.decode_integer(contents)
    if info.number < 0 or len(contents) > _CRL_NUMBER_MAX_OCTETS:
        raise DerError(der.REASON_RANGE, "cRLNumber")
    if info.next_update < info.this_update:
        raise DerError(der.REASON_RANGE, "nextUpdate before thisUpdate")
    return info


def find_revoked(info, serial):
    """Look `serial` up in a parsed CRL.  Returns: revocation date (epoch seconds) or
    None."""
    if info._entries is None:
        return None
    entries = der.DerReader(info.data, info._entries[0], info._entries[1])
    while not entries.at_end():
        listed, when = _read_entry(entries)
        if listed == serial:
            return when
    return None


# -- the cache -----------------------------------------------------------------------------


class CrlCache(AnchoredStore):
    """The last verified CRL of one issuing CA, refreshed on connectivity, checked per
    connection.

    Params: se: SeSession (VERIFY with a point; READ/WRITE DATA OBJECT for the mark).
        store: object with load() -> bytes or None and store(bytes) (FileStore, flash).
        issuer_point: the issuing CA's 65-byte uncompressed P-256 public point.
        issuer_name_der: the CA's subject Name, DER (the CRL issuer must be byte-equal).
        policy: CrlPolicy (None: the defaults).
    Nothing is read until the first refresh / check / status (then the stored CRL is
    re-verified through the SE: storage is not trusted).  The load / refresh / mark
    mechanism is device/anchored_store.py's.
    """

    _ERROR = CrlError
    _NO_DOC = (REASON_NO_CRL, "no verified CRL cached")
    _NEXT_UPDATE = "nextUpdate"
    _THIS_UPDATE = "thisUpdate"
    _ROLLBACK_FMT = "cRLNumber %d <= %d"

    def __init__(self, se, store, issuer_point, issuer_name_der, policy=None):
        self.se = se
        self.store = store
        self.issuer_point = der.check_p256_point(issuer_point)
        self.issuer_name_der = bytes(issuer_name_der)
        self.policy = policy if policy is not None else CrlPolicy()
        self._issuer_tag = hashlib.sha256(self.issuer_name_der).digest()[:_ISSUER_TAG_LEN]
        self._init_anchor()

    # -- SE high-water mark record (see the header) ----------------------------------------

    def _mark_number(self, record):
        if (len(record) < 2 + _ISSUER_TAG_LEN or record[0] != _STATE_VERSION
                or record[1 : 1 + _ISSUER_TAG_LEN] != self._issuer_tag):
            return None
        return int.from_bytes(record[1 + _ISSUER_TAG_LEN :], "big")

    def _mark_record(self, number):
        size = 1
        while number >> (8 * size):
            size += 1
        return bytes((_STATE_VERSION,)) + self._issuer_tag + number.to_bytes(size, "big")

    # -- verification ---------------------------------------------------------------------

    def _verify(self, data):
        # Everything but size, freshness and rollback: parse, issuer, signature in the SE.
        info = parse_crl(data)
        if info.issuer_der != self.issuer_name_der:
            raise CrlError(REASON_ISSUER, "another issuer")
        digest = hashlib.sha256(memoryview(info.data)[info.tbs_start : info.tbs_end]).digest()
        self._se_verify(digest, info.signature_der, self.issuer_point)
        return info

    # -- public calls ---------------------------------------------------------------------

    def refresh(self, fetch, now):
        """Fetch a CRL and, if it passes every check, make it the cached one.

        Params: fetch: callable () -> CRL DER bytes (raises on network failure).
            now: seconds since the epoch (UTC).
        Returns: "updated" (a newer CRL is cached), "unchanged" (the same CRL again) or
            RESULT_OLDER (a verified CRL older than the cached one: the cached one stays).
        Raises: CrlError(reason) (REASON_FETCH, _TOO_LARGE, _TRUNCATED, _MALFORMED,
            _ALGORITHM, _ISSUER, _SIGNATURE, _UNSUPPORTED, _FUTURE, _STALE, _ROLLBACK,
            _STATE, _STORE); the cache is then what it was before.  LinkError / ApduError when
            the SE cannot be reached.
        """
        self._load()
        return self._accept(self._fetch(fetch), now)

    def check(self, facts, now):
        """Check a peer's certificate against the cached CRL: check_serial(facts.serial).

        Params: facts: certinfo.CertFacts of the peer's certificate (or anything with its
            `serial`).  now: epoch seconds.
        Returns, raises: as check_serial."""
        return self.check_serial(facts.serial, now)

    def check_serial(self, serial, now):
        """Check a certificate serial against the cached CRL.

        Params: serial: int (the certificate's serialNumber).  now: epoch seconds.
        Returns: None when the serial is not on a usable CRL (or, failing open, when there
            is no fresh CRL to say).
        Raises: RevokedError when the cached CRL lists it (fresh or stale);
            StaleRevocationError(REASON_NO_CRL / REASON_STALE) when the policy fails closed
            and no fresh CRL is cached; on the first call (the stored CRL is loaded and
            re-verified): CrlError(REASON_STATE), LinkError / ApduError.
        """
        info = self._current()
        if info is None:
            return None
        when = find_revoked(info, serial)
        if when is not None:
            raise RevokedError(serial, info.number, "serial %x" % serial,
                               revocation_date=when)
        self._check_fresh(info, now)
        return None

    def status(self, now):
        """For `fleetid agent status`.  Returns: dict with number, this_update,
        next_update (epoch seconds or None), revoked (count), fresh (bool), state ("fresh",
        "stale" or "none"), policy ("fail-open" / "fail-closed"), grace_s, high_water."""
        info, fresh, out = self._status(now)
        out["revoked"] = 0 if info is None else info.revoked_count
        out["fresh"] = fresh
        out["state"] = "none" if info is None else ("fresh" if fresh else "stale")
        out["policy"] = "fail-open" if self.policy.fail_open else "fail-closed"
        out["grace_s"] = self.policy.grace_s
        out["high_water"] = self._mark
        return out
