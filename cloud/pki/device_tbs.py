"""The TBSCertificate of a device certificate without a throwaway signature: the EST hot path.

`profiles.device_builder` + `signing.tbs_of` build the to-be-signed bytes with
`cryptography` by signing once with a throwaway key and cutting that signature off
(cryptography has no API for unsigned TBS bytes, and `CertificateBuilder.sign` takes only
its own private-key types).  Per re-enrolment that is ~0.4 ms of CPU, mostly Python
object building; asn1crypto's TbsCertificate is slower still (measured ~1.5 ms).

`DeviceTbsTemplate` keeps cryptography as the author of every byte that does not depend
on the request: at construction it asks device_builder for a probe certificate of the
same profile, issuer and CRL URL, and keeps that TBS's version, signature algorithm,
issuer Name and the constant extensions (basicConstraints, keyUsage, extKeyUsage,
authorityKeyIdentifier, cRLDistributionPoints) as the exact bytes cryptography wrote.
Per certificate it encodes only the parts that change, with fleetid.common.der:

    TBSCertificate ::= SEQUENCE {                         -- RFC 5280 4.1
        version         [0] EXPLICIT v3                   -- probe bytes
        serialNumber    INTEGER                           -- x509.random_serial_number()
        signature       ecdsa-with-SHA256                 -- probe bytes
        issuer          Name                              -- probe bytes
        validity        SEQUENCE { notBefore, notAfter }  -- UTCTime < 2050 <= GeneralizedTime
        subject         Name  CN (UTF8String), serialNumber (PrintableString)
        subjectPublicKeyInfo                              -- the CSR's key, cryptography's DER
        extensions      [3] EXPLICIT SEQUENCE OF Extension  -- in device_builder's order:
            basicConstraints, keyUsage, extKeyUsage       -- probe bytes
            subjectAltName  URI urn:fleetid:device:<serial>
            subjectKeyIdentifier  SHA-1 of the key's BIT STRING (RFC 5280 4.2.1.2 (1))
            authorityKeyIdentifier, cRLDistributionPoints -- probe bytes
            the extra extensions (the attestation extension: non-critical, raw value) }

The template then checks itself: it encodes a second probe (another key, serial, time and
extension value) both ways and refuses to exist (TemplateMismatch) unless the bytes are
equal; the issuing CA then falls back to the builder.  tests/cloud/test_device_tbs.py
proves byte equality with device_builder + tbs_of on certificates the EST service and
the line issue, and with hypothesis over serials, times, keys and extension values.
"""

import datetime
import hashlib

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fleetid.cloud.pki import profiles
from fleetid.cloud.pki.errors import PkiError
from fleetid.common import der

_OID_SAN = "2.5.29.17"
_OID_SKI = "2.5.29.14"
_TAG_UTC_TIME = 0x17
_TAG_GENERALIZED_TIME = 0x18
# SubjectPublicKeyInfo of a P-256 key up to its point (RFC 5480 2: id-ecPublicKey,
# prime256v1, BIT STRING of 66 bytes with 0 unused bits): cryptography's only encoding.
_P256_SPKI_HEAD = bytes.fromhex("3059301306072a8648ce3d020106082a8648ce3d030107034200")
_TAG_URI = 0x86  # GeneralName uniformResourceIdentifier [6] IMPLICIT IA5String


class TemplateMismatch(PkiError):
    """The template's bytes differ from cryptography's builder: not used."""

    def __init__(self, detail=""):
        super().__init__(PkiError.BAD_INPUT, "device TBS template: %s" % detail)


def _time(moment):
    # RFC 5280 4.1.2.5: UTCTime through 2049, GeneralizedTime from 2050; both in seconds, Z.
    if 1950 <= moment.year < 2050:
        return der.encode_tlv(_TAG_UTC_TIME, moment.strftime("%y%m%d%H%M%SZ").encode())
    return der.encode_tlv(_TAG_GENERALIZED_TIME, moment.strftime("%Y%m%d%H%M%SZ").encode())


def _extension(oid_tlv, value, critical=False):
    parts = [oid_tlv, der.encode_boolean(True)] if critical else [oid_tlv]
    return der.encode_sequence(parts + [der.encode_octet_string(value)])


def _tbs_parts(tbs_der):
    """(version, signature, issuer, [(extension OID TLV, extension TLV)]) of a TBS."""
    tbs = der.DerReader(tbs_der).read_sequence()
    version = tbs.read_raw(0xA0)
    tbs.read_raw(der.TAG_INTEGER)
    signature = tbs.read_raw(der.TAG_SEQUENCE)
    issuer = tbs.read_raw(der.TAG_SEQUENCE)
    for _ in range(3):  # validity, subject, subjectPublicKeyInfo
        tbs.read_raw(der.TAG_SEQUENCE)
    extensions = tbs.read_context(3).read_sequence()
    found = []
    while not extensions.at_end():
        raw = extensions.read_raw(der.TAG_SEQUENCE)
        found.append((der.DerReader(raw).read_sequence().read_raw(der.TAG_OID), raw))
    return version, signature, issuer, found


class DeviceTbsTemplate:
    """TBSCertificate bytes of device certificates of one profile under one issuer.

    DeviceTbsTemplate(profile, issuer_certificate, crl_url=None, extra_oids=())
    extra_oids: dotted OIDs of the extra (non-critical, raw-valued) extensions that
    `tbs` receives, in order (the issuing CA: the attestation extension).
    Raises: TemplateMismatch if it cannot reproduce device_builder's bytes; PkiError.
    Immutable after construction; thread-safe.
    """

    def __init__(self, profile, issuer_certificate, crl_url=None, extra_oids=()):
        self.profile = profiles.get_profile(profile)
        self.issuer_certificate = issuer_certificate
        self.issuer_not_after = issuer_certificate.not_valid_after_utc
        self.crl_url = crl_url
        self.extra_oids = tuple(extra_oids)
        self._extra_tlvs = tuple(der.encode_oid(oid) for oid in self.extra_oids)
        self._san_oid, self._ski_oid = der.encode_oid(_OID_SAN), der.encode_oid(_OID_SKI)
        moment = datetime.datetime(2030, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
        moment = min(moment, self.issuer_not_after - self.profile.validity
                     - datetime.timedelta(days=1))
        version, signature, issuer, extensions = _tbs_parts(
            self._reference("probe-1", moment))
        self._head = version
        self._signature, self._issuer = signature, issuer
        variable = (self._san_oid, self._ski_oid) + self._extra_tlvs
        # None marks where the per-certificate SAN / SKI / extra extensions go.
        self._extensions = [None if oid in variable else raw for oid, raw in extensions]
        if [oid for oid, _raw in extensions if oid in variable] != \
                [self._san_oid, self._ski_oid] + list(self._extra_tlvs):
            raise TemplateMismatch("unexpected extension order")
        check = moment - datetime.timedelta(days=3, seconds=7)
        key = ec.generate_private_key(ec.SECP256R1()).public_key()
        values = [b"\x04\x03abc" + bytes(range(200))] * len(self.extra_oids)
        if self.tbs("probe-2.X", _spki(key), check, values, serial_number=2**158 + 255) != \
                self._reference("probe-2.X", check, key, values, 2**158 + 255):
            raise TemplateMismatch("bytes differ from cryptography's builder")

    def _reference(self, serial, moment, key=None, values=None, serial_number=1):
        from fleetid.cloud.pki.signing import tbs_of

        key = key or ec.generate_private_key(ec.SECP256R1()).public_key()
        values = values if values is not None else [b"\x05\x00"] * len(self.extra_oids)
        extra = [(x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value), False)
                 for oid, value in zip(self.extra_oids, values)]
        return tbs_of(profiles.device_builder(
            self.profile, serial, key, self.issuer_certificate, moment, crl_url=self.crl_url,
            extra_extensions=extra, serial_number=serial_number))

    def tbs(self, serial, spki_der, not_before, extra_values, serial_number=None):
        """The TBSCertificate DER that device_builder(profile, serial, key, issuer,
        not_before, crl_url, extra extensions) + tbs_of would give.

        Params: serial: device serial (str).  spki_der: the key's DER
            SubjectPublicKeyInfo as cryptography encodes it (P-256: ParsedCsr.spki).
            not_before: aware datetime.  extra_values: bytes, one per extra_oids.
            serial_number: int (default x509.random_serial_number(), as the builder).
        Returns: bytes.
        Raises: PkiError(BAD_INPUT / VALIDITY) as device_builder.
        """
        serial = profiles.check_device_serial(serial)
        not_before = profiles.to_utc_seconds(not_before)
        not_after = not_before + self.profile.validity
        if not_after > self.issuer_not_after:
            raise PkiError(PkiError.VALIDITY, "%s certificate would outlive its issuer"
                           % self.profile.name)
        if len(extra_values) != len(self.extra_oids):
            raise PkiError(PkiError.BAD_INPUT, "one value per extra extension")
        if serial_number is None:
            serial_number = x509.random_serial_number()
        spki_der = bytes(spki_der)
        if len(spki_der) != len(_P256_SPKI_HEAD) + 65 or not spki_der.startswith(_P256_SPKI_HEAD):
            raise PkiError(PkiError.BAD_INPUT, "the key must be an uncompressed P-256 SPKI")
        point = spki_der[len(_P256_SPKI_HEAD):]  # the subjectPublicKey BIT STRING's bytes
        san = der.encode_sequence([der.encode_tlv(
            _TAG_URI, (profiles.DEVICE_URN_PREFIX + serial).encode("ascii"))])
        variable = iter([_extension(self._san_oid, san),
                         _extension(self._ski_oid, der.encode_octet_string(
                             hashlib.sha1(point).digest()))]
                        + [_extension(oid, bytes(value))
                           for oid, value in zip(self._extra_tlvs, extra_values)])
        extensions = [raw if raw is not None else next(variable) for raw in self._extensions]
        return der.encode_sequence([
            self._head, der.encode_integer(serial_number), self._signature, self._issuer,
            der.encode_sequence([_time(not_before - profiles.NOT_BEFORE_BACKDATE),
                                 _time(not_after)]),
            der.encode_name(serial, serial), spki_der,
            der.encode_context(3, der.encode_sequence(extensions)),
        ])


def _spki(public_key):
    return public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)
