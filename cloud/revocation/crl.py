"""CRLs per issuing CA (RFC 5280 section 5), built from the registry's revocation state and
signed through the HSM interface (fleetid.cloud.pki.signing.sign_crl): the CA key never
leaves the HSM.

    issuer = CrlIssuer("b42", hsm, "ca-widget-b42-eu", ca_certificate)
    publisher = CrlPublisher(registry, [issuer], next_update=timedelta(hours=24))
    der = publisher.current_der("b42")          # what GET /crl/b42.crl serves

What each CRL holds (RFC 5280 5.1.2, 5.2, 5.3): version 2; issuer = the CA certificate's
subject; thisUpdate = when it was built; nextUpdate = thisUpdate + `next_update`; one
entry per revoked certificate of that CA (serial, revocation date from the registry, the
reasonCode extension when the registry's reason is an RFC 5280 CRLReason name); the
extensions cRLNumber (non-critical, 5.2.3) and authorityKeyIdentifier (from the CA's SKI,
5.2.1); signature ecdsa-with-SHA256.

When it is re-published (a new CRL with a higher number):
  * the revocation state of that CA changed: the publisher looks at the registry at most
    every `poll_interval` (5 s by default), so a revocation reaches the served CRL within
    that bound, whichever process wrote it (`fleetid cloud revoke` runs in its own);
  * half of the validity has passed (a device refreshing on reconnect always gets a CRL
    with plenty of time left before its nextUpdate);
  * `invalidate()` was called.
CRL numbers strictly increase (5.2.3: "monotonically increasing"): each is max(previous
+ 1, milliseconds since the epoch at thisUpdate), so they also keep increasing across a
restart of the process without stored state, as long as the clock does not step back.
Several stateless processes each publish increasing numbers; a device keeps the highest
it has verified (device/crl_cache.py), so one process's older CRL never replaces a newer.
"""

import datetime
import hashlib
import logging
import threading
import time

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fleetid.cloud.pki.signing import sign_crl
from fleetid.cloud.revocation.tier import Reply, Route, Tier
from fleetid.cloud.verifier.errors import NOT_FOUND, UNAVAILABLE, CloudError

DEFAULT_NEXT_UPDATE = datetime.timedelta(hours=24)
DEFAULT_POLL_INTERVAL = 5.0  # seconds between looks at the registry's revocation state
CRL_CONTENT_TYPE = "application/pkix-crl"  # RFC 2585 4.2
ROOT_CRL_NAME = "root"  # GET /crl/root.crl: the root's CRL of revoked issuing CAs (arl.py)
_log = logging.getLogger("fleetid.cloud.revocation")
_REASONS = {flag.value: flag for flag in x509.ReasonFlags
            if flag not in (x509.ReasonFlags.unspecified, x509.ReasonFlags.remove_from_crl)}


def crl_path(label):
    """The URL path a CA's CRL is served at: /crl/<label>.crl."""
    return "/crl/%s.crl" % label


def crl_url(base_url, label):
    """The CRL distribution point written into certificates: base_url + crl_path(label)."""
    return base_url.rstrip("/") + crl_path(label)


def _utc_now():
    return datetime.datetime.now(datetime.timezone.utc)


def _parse_time(text):
    # Registry times are RFC 3339 UTC ("...Z"); CRL times have second precision.
    when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return when.astimezone(datetime.timezone.utc).replace(microsecond=0)


class CrlIssuer:
    """One issuing CA whose CRL is published.

    Params: label: the name in the URL (the EST label).  hsm: HsmBackend.  key_label: the
        CA key's label in the HSM.  ca_certificate: x509.Certificate of the CA (its subject
        is the CRL issuer; its SKI becomes the CRL's AKI).
    """

    def __init__(self, label, hsm, key_label, ca_certificate):
        self.label = label
        self.hsm = hsm
        self.key_label = key_label
        self.ca_certificate = ca_certificate
        self.issuer_text = ca_certificate.subject.rfc4514_string()


class _Published:
    def __init__(self, crl, der, number, state, built_at):
        self.crl = crl
        self.der = der
        self.number = number
        self.state = state
        self.built_at = built_at


class CrlPublisher:
    """Builds, caches and re-publishes the CRL of each configured issuing CA.

    Params: registry: Registry (revoked_certificates(issuer)).  issuers: CrlIssuer list.
        next_update: timedelta from thisUpdate to nextUpdate.  poll_interval: seconds
        between looks at the registry.  clock: () -> aware datetime (wall clock).
        monotonic: () -> seconds (poll timing).
    Thread-safe: one lock around (re)building.
    """

    def __init__(self, registry, issuers, next_update=DEFAULT_NEXT_UPDATE,
                 poll_interval=DEFAULT_POLL_INTERVAL, clock=None, monotonic=None):
        if next_update <= datetime.timedelta(0):
            raise ValueError("next_update must be positive")
        self.registry = registry
        self.issuers = dict((issuer.label, issuer) for issuer in issuers)
        self.next_update = next_update
        self.poll_interval = poll_interval
        self.clock = clock or _utc_now
        self.monotonic = monotonic or time.monotonic
        self._lock = threading.Lock()
        self._published = {}  # label -> _Published
        self._polled_at = {}  # label -> monotonic seconds of the last registry look
        self._last_number = 0

    def labels(self):
        """The labels with a CRL (sorted)."""
        return sorted(self.issuers)

    def invalidate(self, label=None):
        """Force a rebuild on the next request (one label, or all)."""
        with self._lock:
            for name in ([label] if label is not None else list(self._published)):
                self._published.pop(name, None)

    def _state(self, issuer):
        revoked = self.registry.revoked_certificates(issuer.issuer_text)
        digest = hashlib.sha256()
        for record in revoked:
            digest.update(("%s|%s|%s\n" % (record.cert_serial, record.revoked_at,
                                           record.revocation_reason)).encode())
        return revoked, digest.digest()

    def _number(self, now):
        number = max(self._last_number + 1, int(now.timestamp() * 1000))
        self._last_number = number
        return number

    def _build(self, issuer, revoked, state, now):
        now = now.astimezone(datetime.timezone.utc).replace(microsecond=0)
        number = self._number(now)
        builder = (x509.CertificateRevocationListBuilder()
                   .issuer_name(issuer.ca_certificate.subject)
                   .last_update(now)
                   .next_update(now + self.next_update)
                   .add_extension(x509.CRLNumber(number), critical=False))
        try:
            ski = issuer.ca_certificate.extensions.get_extension_for_class(
                x509.SubjectKeyIdentifier).value
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                critical=False)
        except x509.ExtensionNotFound:
            pass
        for record in revoked:
            entry = (x509.RevokedCertificateBuilder()
                     .serial_number(int(record.cert_serial, 16))
                     .revocation_date(_parse_time(record.revoked_at)))
            reason = _REASONS.get(record.revocation_reason or "")
            if reason is not None:
                entry = entry.add_extension(x509.CRLReason(reason), critical=False)
            builder = builder.add_revoked_certificate(entry.build())
        crl = sign_crl(issuer.hsm, issuer.key_label, builder,
                       issuer.ca_certificate.public_key())
        return _Published(crl, crl.public_bytes(serialization.Encoding.DER), number, state,
                          now)

    def current(self, label):
        """The CRL to serve for `label`, rebuilt if revocation changed or it is due.

        Returns: x509.CertificateRevocationList (with .der on the publisher: current_der).
        Raises: KeyError for an unknown label; PkiError / HsmError / RegistryError when a
            rebuild fails (the previous CRL is not served past its refresh point).
        """
        return self._current(label).crl

    def current_der(self, label):
        """As current(), the DER bytes."""
        return self._current(label).der

    def _current(self, label):
        issuer = self.issuers[label]
        with self._lock:
            now = self.clock()
            tick = self.monotonic()
            published = self._published.get(label)
            due = (published is None
                   or now >= published.built_at + self.next_update / 2)
            polled = self._polled_at.get(label)
            if not due and (polled is None or tick - polled >= self.poll_interval):
                self._polled_at[label] = tick
                revoked, state = self._state(issuer)
                if state != published.state:
                    published = self._build(issuer, revoked, state, now)
                    self._published[label] = published
                return published
            if due:
                self._polled_at[label] = tick
                revoked, state = self._state(issuer)
                published = self._build(issuer, revoked, state, now)
                self._published[label] = published
            return published


class CrlTier(Tier):
    """The CRL tier (tier.py): GET /crl/<label>.crl -> the DER CRL of that issuing CA
    (`application/pkix-crl`, RFC 2585 4.2), at the distribution point URL the
    certificates name (crl_url).  Served over plain HTTP: a CRL is signed and public, and
    a device that checks revocation before it trusts a TLS server cannot need that TLS
    first (RFC 5280 4.2.1.13 uses http URIs for the same reason).

        GET /crl/<label>.crl   200 DER, Cache-Control max-age up to the next refresh;
                               not_found (404) for an unknown label; unavailable (503)
                               when the CRL cannot be built
    """

    name = "crl"
    per_label = True

    def __init__(self, publisher):
        self.publisher = publisher

    @classmethod
    def build(cls, setup):
        return cls(setup.crl_publisher) if setup.crl_publisher is not None else None

    def invalidate(self):
        self.publisher.invalidate()

    def routes(self):
        return [Route("GET", "/crl/{name}", self._get, blocking=True)]

    def _get(self, params, _body):
        publisher = self.publisher
        name = params["name"]
        if not name.endswith(".crl") or name[:-4] not in publisher.issuers:
            raise CloudError(NOT_FOUND, "no CRL here")
        label = name[:-4]
        try:
            crl = publisher.current(label)
            body = publisher.current_der(label)
        except Exception:  # noqa: BLE001 - HSM / registry trouble: no stale answer, no cause
            _log.exception("CRL for %s could not be built", label)
            raise CloudError(UNAVAILABLE, "CRL temporarily unavailable") from None
        now = datetime.datetime.now(datetime.timezone.utc)
        refresh = crl.last_update_utc + publisher.next_update / 2
        max_age = max(0, min(int((refresh - now).total_seconds()),
                             int(publisher.poll_interval)))
        return Reply(body, CRL_CONTENT_TYPE, {
            "Cache-Control": "public, max-age=%d" % max_age,
            "Last-Modified": crl.last_update_utc.strftime("%a, %d %b %Y %H:%M:%S GMT")})

    @staticmethod
    def status(base_url, facts, fetch, failed):
        """Per CA label (and the root's, when served): cRLNumber, thisUpdate,
        nextUpdate, entries, age."""
        out = {}
        for name in list(facts["labels"]) + [ROOT_CRL_NAME]:
            url = "%s%s" % (base_url, crl_path(name))
            try:
                crl = x509.load_der_x509_crl(fetch(url))
                number = crl.extensions.get_extension_for_class(x509.CRLNumber).value
                out[name] = {"number": number.crl_number,
                             "this_update": crl.last_update_utc.isoformat(),
                             "next_update": crl.next_update_utc.isoformat(),
                             "revoked": len(crl),
                             "age_s": facts["now"] - int(crl.last_update_utc.timestamp())}
            except Exception as exc:  # noqa: BLE001 - report per label, never a traceback
                if name == ROOT_CRL_NAME and getattr(exc, "code", None) == 404:
                    continue  # no root CRL on this cloud (offline root)
                out[name] = failed(url, exc)
        return out
