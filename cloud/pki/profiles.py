"""Certificate profiles of the fleet PKI (ECDSA P-256 throughout).

    root CA        self-signed; basicConstraints CA, no path length limit (critical);
                   keyUsage keyCertSign + cRLSign (critical); SKI.  Offline, in the HSM.
    issuing CA     one per product / batch / region: subject carries the scope (below);
                   basicConstraints CA, pathLen 0 by default (critical); keyUsage
                   keyCertSign + cRLSign + digitalSignature (critical: it also signs OCSP
                   responses / CRLs directly); SKI; AKI; CRL DP of the root's CRL if given.
    device         sized for constrained devices (RFC 5280 4.2):
                   subject CN = device serial, serialNumber = device serial;
                   SAN URI urn:fleetid:device:<serial> (non-critical);
                   basicConstraints CA:false (critical); keyUsage digitalSignature
                   (critical); EKU clientAuth; SKI; AKI; CRL distribution point of the
                   issuing CA; the attestation extension (added by the issuing CA);
                   explicit, short validity per profile: "identity" (factory line, years)
                   and "operational" (EST, days).

Scope of an issuing CA in its subject, one organizationalUnitName RDN each (RFC 4514 form):
    CN=fleetid issuing CA <product>/<batch>/<region>, OU=product:<p>, OU=batch:<b>,
    OU=region:<r>[, O=<root's O>]
(Name constraints are not used: the scope names the population, the device names are
 URNs no relying party constrains.)
"""

import datetime
import functools
import ipaddress
import re

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleetid.cloud.pki.errors import PkiError

DEVICE_URN_PREFIX = "urn:fleetid:device:"
# Device serials go into a PrintableString (serialNumber, X.520) and a URN NSS (RFC 8141):
# keep to a repertoire valid in both.
_SERIAL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,63}$")
# The service name space (the broker's, the cloud's and operators' identities: CN
# "fleet-cloud" ...): a device serial may never fall into it, whatever CA path issues it
# (line, EST, re-enrolment), so no device certificate is ever named like a service.  The
# broker does not rely on names alone (service identities come from their own CA on
# their own listener, cloud/mqtt/broker.py); this keeps names unambiguous everywhere else
# (logs, registry, MQTT user names).
RESERVED_NAME_PREFIX = "fleet-"
_SCOPE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$")
SCOPE_KEYS = ("product", "batch", "region")

# Small backdate so a device whose clock runs a little behind the CA still accepts a
# brand-new certificate (and the verifier the other way round).
NOT_BEFORE_BACKDATE = datetime.timedelta(minutes=5)


class CertificateProfile:
    """A device certificate profile: a name and an explicit validity."""

    __slots__ = ("name", "validity")

    def __init__(self, name, validity):
        if not isinstance(validity, datetime.timedelta) or validity <= datetime.timedelta(0):
            raise PkiError(PkiError.BAD_INPUT, "validity must be a positive timedelta")
        self.name = name
        self.validity = validity

    def __repr__(self):
        return "CertificateProfile(%s, %s)" % (self.name, self.validity)


# Identity certificates: issued once at the line, live with the device (years).
IDENTITY = CertificateProfile("identity", datetime.timedelta(days=10 * 365 + 2))
# Operational certificates: issued through EST, rotated with overlap (days).
OPERATIONAL = CertificateProfile("operational", datetime.timedelta(days=30))
# Short-lived operational certificates (policy option, per EST label: `profile =
# "operational-short"`): revocation by expiry for always-connected devices, which renew
# at the agent's threshold (AgentPolicy.renew_margin_s) long before notAfter.
OPERATIONAL_SHORT = CertificateProfile("operational-short", datetime.timedelta(hours=24))
PROFILES = {IDENTITY.name: IDENTITY, OPERATIONAL.name: OPERATIONAL,
            OPERATIONAL_SHORT.name: OPERATIONAL_SHORT}


def get_profile(profile):
    """A CertificateProfile from a profile or its name.  Raises PkiError(BAD_INPUT)."""
    if isinstance(profile, CertificateProfile):
        return profile
    try:
        return PROFILES[profile]
    except (KeyError, TypeError):
        raise PkiError(PkiError.BAD_INPUT, "unknown certificate profile %r" % (profile,)) from None


def utc_now():
    """The current UTC time, to the second (X.509 times have no fractions)."""
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)


def to_utc_seconds(moment):
    """`moment` (aware datetime) in UTC, to the second.  Raises PkiError(BAD_INPUT)."""
    if not isinstance(moment, datetime.datetime) or moment.tzinfo is None:
        raise PkiError(PkiError.BAD_INPUT, "times must be timezone-aware datetimes")
    return moment.astimezone(datetime.timezone.utc).replace(microsecond=0)


def check_device_serial(serial):
    """Return `serial` if it is 1..64 of [A-Za-z0-9.-] (starting alphanumeric) and not in
    the reserved service name space (is_reserved_name: "fleet-...", any case).

    Raises: PkiError(BAD_INPUT)."""
    if not isinstance(serial, str) or not _SERIAL_RE.match(serial):
        raise PkiError(PkiError.BAD_INPUT, "device serial must be 1..64 of [A-Za-z0-9.-]")
    if is_reserved_name(serial):
        raise PkiError(PkiError.BAD_INPUT, "device serial %r is in the reserved service name "
                                           "space (%s...)" % (serial, RESERVED_NAME_PREFIX))
    return serial


def is_reserved_name(name):
    """True for a name in the service name space (RESERVED_NAME_PREFIX, any case)."""
    return isinstance(name, str) and name.lower().startswith(RESERVED_NAME_PREFIX)


def device_urn(serial):
    """The URI SAN naming a device: urn:fleetid:device:<serial>."""
    return DEVICE_URN_PREFIX + check_device_serial(serial)


def check_scope(scope):
    """Return the scope dict {product, batch, region} with each value checked.

    Raises: PkiError(BAD_INPUT) for missing keys, extra keys or bad values."""
    if not isinstance(scope, dict) or set(scope) != set(SCOPE_KEYS):
        raise PkiError(PkiError.BAD_INPUT, "scope needs exactly product, batch, region")
    for key in SCOPE_KEYS:
        if not isinstance(scope[key], str) or not _SCOPE_RE.match(scope[key]):
            raise PkiError(PkiError.BAD_INPUT, "scope %s must be 1..32 of [A-Za-z0-9._-]" % key)
    return {key: scope[key] for key in SCOPE_KEYS}


def scope_name(scope, organization=None):
    """The subject Name of an issuing CA for `scope` (see module docstring)."""
    scope = check_scope(scope)
    rdns = []
    if organization:
        rdns.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    for key in SCOPE_KEYS:
        value = "%s:%s" % (key, scope[key])
        rdns.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, value))
    rdns.append(
        x509.NameAttribute(
            NameOID.COMMON_NAME,
            "fleetid issuing CA %s/%s/%s" % (scope["product"], scope["batch"], scope["region"]),
        )
    )
    return x509.Name([x509.RelativeDistinguishedName([attr]) for attr in rdns])


def ca_scope(certificate):
    """The {product, batch, region} scope of an issuing CA certificate, or None if its
    subject carries no (complete) scope."""
    found = {}
    for attr in certificate.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME):
        key, sep, value = attr.value.partition(":")
        if sep and key in SCOPE_KEYS and key not in found:
            found[key] = value
    return found if set(found) == set(SCOPE_KEYS) else None


def _ski(public_key):
    return x509.SubjectKeyIdentifier.from_public_key(public_key)


@functools.lru_cache(maxsize=64)
def _aki(issuer_certificate):
    # Memoised per issuer certificate (hashable, immutable): an issuing CA certifies
    # thousands of keys with the same AKI.
    ski = issuer_certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski.value)


@functools.lru_cache(maxsize=64)
def _crl_dp(url):
    # Memoised per URL (str): every certificate of a CA names the same CRL.
    return x509.CRLDistributionPoints(
        [x509.DistributionPoint([x509.UniformResourceIdentifier(url)], None, None, None)]
    )


# keyUsage of every end-entity certificate (device and server): digitalSignature only.
_LEAF_KEY_USAGE = x509.KeyUsage(
    digital_signature=True, content_commitment=False, key_encipherment=False,
    data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
    encipher_only=False, decipher_only=False,
)


@functools.lru_cache(maxsize=64)
def _device_template(issuer_certificate):
    """What every device certificate of one issuer shares: the issuer name and the
    profile's first three extensions (basicConstraints, keyUsage, EKU clientAuth), in
    profile order.  Memoised per issuer certificate like _aki: builders are immutable
    (each call returns a new one), so one template serves every certificate."""
    return (
        x509.CertificateBuilder()
        .issuer_name(issuer_certificate.subject)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_LEAF_KEY_USAGE, critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )


def root_builder(subject, public_key, not_before, not_after):
    """CertificateBuilder of a self-signed root CA (see module docstring)."""
    return _ca_builder(subject, subject, public_key, not_before, not_after,
                       path_length=None, digital_signature=False)


def _ca_builder(subject, issuer_name, public_key, not_before, not_after, path_length,
                digital_signature):
    """What every CA certificate of the fleet carries: critical basicConstraints and
    keyUsage (certificate and CRL signing), and the subject key identifier."""
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_ca_key_usage(digital_signature=digital_signature), critical=True)
        .add_extension(_ski(public_key), critical=False)
    )


def _ca_key_usage(digital_signature):
    return x509.KeyUsage(
        digital_signature=digital_signature, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
        encipher_only=False, decipher_only=False,
    )


def issuing_ca_builder(subject, public_key, issuer_certificate, not_before, not_after,
                       path_len=0, crl_url=None):
    """CertificateBuilder of an intermediate (issuing) CA under `issuer_certificate`."""
    builder = _ca_builder(
        subject, issuer_certificate.subject, public_key, not_before, not_after,
        path_length=path_len, digital_signature=True,
    ).add_extension(_aki(issuer_certificate), critical=False)
    if crl_url:
        builder = builder.add_extension(_crl_dp(crl_url), critical=False)
    return builder


def device_builder(profile, serial, public_key, issuer_certificate, not_before, crl_url=None,
                   extra_extensions=()):
    """CertificateBuilder of a device certificate.

    Params: profile: CertificateProfile or its name.  serial: device serial (str).
        public_key: the device key (cryptography EC public key).  issuer_certificate: the
        issuing CA's certificate.  not_before: aware datetime.  crl_url: the issuing CA's
        CRL distribution point (str) or None.  extra_extensions: (ExtensionType, critical)
        pairs (the issuing CA adds the attestation extension this way).
    Returns: x509.CertificateBuilder (unsigned).
    Raises: PkiError(BAD_INPUT) for a bad serial or profile, PkiError(VALIDITY) if the
        certificate would outlive its issuer.
    """
    profile = get_profile(profile)
    serial = check_device_serial(serial)
    not_before = to_utc_seconds(not_before)
    not_after = not_before + profile.validity
    if not_after > issuer_certificate.not_valid_after_utc:
        raise PkiError(PkiError.VALIDITY, "%s certificate would outlive its issuer" % profile.name)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, serial),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, serial),
        ]
    )
    builder = (
        _device_template(issuer_certificate)
        .subject_name(subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before - NOT_BEFORE_BACKDATE)
        .not_valid_after(not_after)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(device_urn(serial))]),
            critical=False,
        )
        .add_extension(_ski(public_key), critical=False)
        .add_extension(_aki(issuer_certificate), critical=False)
    )
    if crl_url:
        builder = builder.add_extension(_crl_dp(crl_url), critical=False)
    for extension, critical in extra_extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder


def server_certificate_builder(public_key, issuer_cert, hosts, now, days=365):
    """CertificateBuilder of a TLS server certificate (serverAuth, SANs for `hosts`:
    DNS names or IP addresses; CN = the first host)."""
    return tls_certificate_builder(public_key, issuer_cert, hosts[0], now,
                                   server_hosts=hosts, days=days)


def tls_certificate_builder(public_key, issuer_cert, common_name, now, server_hosts=None,
                            days=365):
    """CertificateBuilder of a TLS certificate under `issuer_cert`: serverAuth with SANs
    for `server_hosts` (DNS names or IP addresses), else clientAuth."""
    ski = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(issuer_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_LEAF_KEY_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                       critical=False)
    )
    if server_hosts:
        names = []
        for host in server_hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        return (builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                               critical=False))
    return builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                                 critical=False)