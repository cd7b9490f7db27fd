# Which firmware-signing keys signed boot accepts: certificates under the fleet root, kept
# in the SE, checked through the SE.  Portable: CPython and MicroPython (no crypto of its
# own: the SE verifies each certificate's signature with the fleet root's point).
#
#     keys = FirmwareKeys(se, revoked=lambda serial: ..., now=None)
#     report = boot.check_image(se, reader, firmware_keys=keys)
#
# Decision table (what `points()` returns):
#
#   SE holds DGI_FIRMWARE_CERT_A / _B?   accepted keys
#   -----------------------------------  ----------------------------------------------
#   neither                              the bare DATA_TRUST_FIRMWARE_KEY point (factory
#                                        line devices before their first rotation)
#   one or both                          each certificate that (1) parses, with a P-256
#                                        key, (2) is signed by the fleet root trust anchor
#                                        DATA_TRUST_FLEET_ROOT (VERIFY in the SE), (3) is
#                                        within its validity when `now` is given, and
#                                        (4) is not revoked (`revoked(serial)` false);
#                                        the bare point is no longer accepted
#
# Rotation (cloud/pki/firmware.py, cloud/mqtt/ota.py): install the new key's certificate
# in the free place (old and new images both boot), ship images signed with the new key,
# revoke the old certificate (the root's CRL; the device's CRL cache makes `revoked` true
# for it), then overwrite its place with the next key when the time comes.

import hashlib

from fleetid.common import der
from fleetid.common.errors import DerError, ReferenceNotFound, VerificationFailed, WrongData

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


_DATA_TRUST_FLEET_ROOT = const(0x0111)  # se_consts.DATA_TRUST_FLEET_ROOT
_DATA_TRUST_FIRMWARE_KEY = const(0x0112)  # se_consts.DATA_TRUST_FIRMWARE_KEY
_DATA_TRUST_FIRMWARE_CERTS = (0x0114, 0x0115)  # se_consts.DATA_TRUST_FIRMWARE_CERT_A/_B
_LE_LONG = const(65536)
_POINT_LEN = const(65)


class FirmwareKey:
    """One accepted key: point (65 bytes), serial (certificate serial, None for the bare
    point), source ("certificate" or "bare"), name (the certificate's CN, None for the
    bare point)."""

    def __init__(self, point, serial, source, name=None):
        self.point = point
        self.serial = serial
        self.source = source
        self.name = name


def _signed_parts(cert_der):
    # Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signatureValue }
    outer = der.DerReader(cert_der).read_sequence()
    start = outer.span()[0]
    outer.read_raw(der.TAG_SEQUENCE)
    end = outer.span()[0]
    der.read_ecdsa_with_sha256_algorithm(outer)
    signature = outer.read_bit_string()
    outer.finish()
    return start, end, signature


class FirmwareKeys:
    """The firmware-signing keys the SE's trust anchors allow (decision table above).

    Params: se: SeSession.  revoked: optional fn(serial int) -> bool.  now: optional
        seconds since 1970 UTC (validity checked only when given: a device without a
        trusted clock at boot relies on revocation instead).
    Attributes after points(): refused: list of (serial or None, reason) skipped.
    """

    def __init__(self, se, revoked=None, now=None):
        self.se = se
        self.revoked = revoked
        self.now = now
        self.refused = []

    def points(self):
        """Returns: list of FirmwareKey (possibly empty).  Raises: link / SE errors."""
        from fleetid.device.certinfo import certificate_facts

        self.refused = []
        certs = []
        for tag in _DATA_TRUST_FIRMWARE_CERTS:
            try:
                certs.append(self.se.get_data(tag, -1, _LE_LONG))
            except ReferenceNotFound:
                pass
        if not certs:
            try:
                point = self.se.get_data(_DATA_TRUST_FIRMWARE_KEY, _POINT_LEN)
            except ReferenceNotFound:
                return []
            return [FirmwareKey(point, None, "bare")]
        try:
            root_point = certificate_facts(self.se.get_data(_DATA_TRUST_FLEET_ROOT, -1,
                                                            _LE_LONG)).point
        except (ReferenceNotFound, DerError):
            self.refused.append((None, "no fleet root"))
            return []
        out = []
        for cert in certs:
            try:
                facts = certificate_facts(cert)
                start, end, signature = _signed_parts(cert)
            except DerError:
                self.refused.append((None, "malformed"))
                continue
            digest = hashlib.sha256(cert[start:end]).digest()
            try:
                self.se.verify(digest, signature, point=root_point)
            except (VerificationFailed, WrongData):
                self.refused.append((facts.serial, "not signed by the fleet root"))
                continue
            if self.now is not None and not facts.not_before <= self.now <= facts.not_after:
                self.refused.append((facts.serial, "outside its validity"))
                continue
            if self.revoked is not None and self.revoked(facts.serial):
                self.refused.append((facts.serial, "revoked"))
                continue
            out.append(FirmwareKey(facts.point, facts.serial, "certificate",
                                   facts.common_name))
        return out
