"""Builders of the unsealed audit entries, one per entry type but checkpoints
(checkpoints.checkpoint_entry), and the facts they record about a certificate or an
attestation.  Each returns a dict of fields that a store seals (codec.seal) when it
appends it.  Field kinds: codec's docstring."""

import hashlib

from cryptography import x509

from fleetid.cloud.audit.codec import (
    CA_REVOKE,
    HOLD,
    INJECTION,
    ISSUANCE,
    RECONCILE,
    REVOKE,
    ROTATION_ACK,
    cert_serial_hex,
    checked_fields,
    new_fields,
    to_hex,
)
from fleetid.common import der
from fleetid.common.errors import DerError

# issuer Name DER -> its RFC 4514 string: every certificate of a CA has the same issuer,
# and cryptography builds the Name and its string anew on each access (~0.1 ms, more
# than the rest of a registry write).  Bounded: a fleet has few issuing CAs.
_ISSUER_NAMES = {}
_ISSUER_NAMES_MAX = 256


def issuer_der(cert_der):
    """The DER of a certificate's issuer Name, or None if unreadable.

    Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL,
    serialNumber, signature AlgorithmIdentifier, issuer Name, ... } ... } (RFC 5280 4.1).
    """
    try:
        tbs = der.DerReader(bytes(cert_der)).read_sequence().read_sequence()
        if tbs.peek_tag() == 0xA0:
            tbs.read_tlv(0xA0)
        tbs.read_tlv(der.TAG_INTEGER)
        tbs.read_raw(der.TAG_SEQUENCE)
        return tbs.read_raw(der.TAG_SEQUENCE)
    except DerError:
        return None


def issuer_name(cert_der, cert):
    """cert.issuer.rfc4514_string() of `cert` (parsed from `cert_der`), cached by the
    issuer's DER encoding (the same bytes always give the same string)."""
    key = issuer_der(cert_der)
    text = _ISSUER_NAMES.get(key) if key is not None else None
    if text is None:
        text = cert.issuer.rfc4514_string()
        if key is not None and len(_ISSUER_NAMES) < _ISSUER_NAMES_MAX:
            _ISSUER_NAMES[key] = text
    return text


def certificate_facts(cert_der, cert=None):
    """What the log records about a certificate, from its DER (and `cert`, the parsed
    certificate, when the caller has it: no second parse).

    Returns dict: cert_serial (hex), cert_fingerprint (SHA-256 of the DER, hex),
    issuing_ca (the issuer name, RFC 4514 string).
    """
    if cert is None:
        cert = x509.load_der_x509_certificate(bytes(cert_der))
    return {
        "cert_serial": cert_serial_hex(cert.serial_number),
        "cert_fingerprint": hashlib.sha256(bytes(cert_der)).hexdigest(),
        "issuing_ca": issuer_name(cert_der, cert),
    }


def attestation_hash(statement_der):
    """SHA-256 (hex) of an attestation statement as the SE produced it (DER bytes)."""
    return hashlib.sha256(bytes(statement_der)).hexdigest()


def injection_entry(*, serial, se_uid, slot, aid, cert_serial, cert_fingerprint, issuing_ca,
                    batch, station, operator, hsm_session, attestation_hash, when):
    """Build the (unsealed) audit entry of one injection.

    Params: serial int; se_uid bytes or hex; slot int; aid bytes or hex (the applet AID);
    cert_serial int or hex; cert_fingerprint bytes or hex (SHA-256 of the cert DER);
    issuing_ca str; batch, station, operator, hsm_session str; attestation_hash bytes or
    hex (SHA-256 of the statement DER); when epoch seconds, aware datetime or a formatted
    time string.  `certificate_facts(der)` gives the three certificate fields.
    Returns: dict of fields; hand it to Registry.commit_identity (or AuditFile.append).
    Raises: AuditError(BAD_FIELDS).
    """
    fields = new_fields(INJECTION, when)
    fields.update(
        serial=serial, se_uid=to_hex(se_uid), slot=slot, aid=to_hex(aid),
        cert_serial=cert_serial_hex(cert_serial) if isinstance(cert_serial, int)
        else to_hex(cert_serial),
        cert_fingerprint=to_hex(cert_fingerprint), issuing_ca=issuing_ca, batch=batch,
        station=station, operator=operator, hsm_session=hsm_session,
        attestation_hash=to_hex(attestation_hash),
    )
    return checked_fields(fields)


def hold_entry(*, serial, reason, station, operator, when, se_uid=None):
    """Build a hold / quarantine entry (a device that must not ship).  Raises AuditError."""
    fields = new_fields(HOLD, when)
    fields.update(serial=serial, reason=reason, station=station, operator=operator)
    if se_uid is not None:
        fields["se_uid"] = to_hex(se_uid)
    return checked_fields(fields)


def revoke_entry(*, serial, cert_serial, cert_fingerprint, reason, operator, when):
    """Build a certificate revocation entry.  Raises AuditError."""
    fields = new_fields(REVOKE, when)
    fields.update(serial=serial, cert_fingerprint=to_hex(cert_fingerprint), reason=reason,
                  operator=operator,
                  cert_serial=cert_serial_hex(cert_serial) if isinstance(cert_serial, int)
                  else to_hex(cert_serial))
    return checked_fields(fields)


def reconcile_entry(*, serial, outcome, reason, station, operator, when, se_uid=None,
                    cert_serial=None, cert_fingerprint=None):
    """Build a reconciliation entry (an intent record resolved after a crash)."""
    fields = new_fields(RECONCILE, when)
    fields.update(serial=serial, outcome=outcome, reason=reason, station=station,
                  operator=operator)
    if se_uid is not None:
        fields["se_uid"] = to_hex(se_uid)
    if cert_serial is not None:
        fields["cert_serial"] = (cert_serial_hex(cert_serial) if isinstance(cert_serial, int)
                                 else to_hex(cert_serial))
    if cert_fingerprint is not None:
        fields["cert_fingerprint"] = to_hex(cert_fingerprint)
    return checked_fields(fields)


def issuance_entry(*, serial, kind, operation, facts, operator, when):
    """Build the entry of a certificate issued outside the line's injection (EST
    simpleenroll / simplereenroll, or a certificate recorded by any other path).

    Params: serial int (device); kind "identity" / "operational"; operation name (e.g.
    "simpleenroll"); facts: certificate_facts of the certificate (its serial,
    fingerprint and issuer are recorded; a registry has them from the certificate's row,
    so the DER is not parsed and hashed twice); operator str; when as for
    injection_entry.
    Raises AuditError(BAD_FIELDS).
    """
    fields = new_fields(ISSUANCE, when)
    fields.update(serial=serial, kind=kind, operation=operation, operator=operator, **facts)
    return checked_fields(fields)


def rotation_ack_entry(*, serial, cert_fingerprint, previous_fingerprint, when):
    """Build the entry of a rotation acknowledgement: device `serial` switched to
    `cert_fingerprint`; `previous_fingerprint`'s overlap window closed.  Raises AuditError."""
    fields = new_fields(ROTATION_ACK, when)
    fields.update(serial=serial, cert_fingerprint=to_hex(cert_fingerprint),
                  previous_fingerprint=to_hex(previous_fingerprint))
    return checked_fields(fields)


def ca_revoke_entry(*, ca_fingerprint, subject, reason, operator, when):
    """Build the entry of a revoked issuing (batch) CA: every device under it is refused.
    Params: ca_fingerprint SHA-256 of the CA certificate DER (bytes or hex); subject its
    RFC 4514 name.  Raises AuditError."""
    fields = new_fields(CA_REVOKE, when)
    fields.update(ca_fingerprint=to_hex(ca_fingerprint), subject=subject, reason=reason,
                  operator=operator)
    return checked_fields(fields)
