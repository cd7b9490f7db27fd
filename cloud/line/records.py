"""What the line writes about a device: the identity record and injection audit entry
of a commit, and the revocation of a certificate that
was never committed.  (The text of a hold or reconcile reason: audit.free_text.)"""

from cryptography import x509

from fleetid.cloud import audit
from fleetid.cloud.registry.errors import RegistryError
from fleetid.cloud.registry.interface import IdentityRecord
from fleetid.common import attestation
from fleetid.common import se_consts as C

REVOCATION_REASON = "cessationOfOperation"  # RFC 5280 5.3.1 CRLReason: never shipped


def statement_from_certificate(cert):
    """The DER attestation statement carried in an issued certificate's extension."""
    from fleetid.cloud.ca.evidence import ATTESTATION_EXTENSION_OID

    value = cert.extensions.get_extension_for_oid(ATTESTATION_EXTENSION_OID).value.value
    bundle = attestation.decode_evidence_bundle(value)
    return bundle.statements[0].statement_der


def build_commit(resources, station_name, serial, se_uid, cert_der, attestation_hash,
                 hsm_session, operator=None, batch=None, cert=None):
    """(IdentityRecord, unsealed injection audit entry) for one confirmed device.

    cert: the parsed certificate of cert_der, if the caller has it (saves a parse)."""
    config = resources.config
    operator = operator or config.operator
    batch = batch or config.batch
    record = IdentityRecord(
        serial=serial, se_uid=bytes(se_uid), identity_cert_der=bytes(cert_der),
        slot=config.slot, aid=C.AID, batch=batch, station=station_name,
        operator=operator, hsm_session=hsm_session, attestation_hash=attestation_hash)
    facts = audit.certificate_facts(cert_der, cert)
    entry = audit.injection_entry(
        serial=serial, se_uid=se_uid, slot=config.slot, aid=C.AID,
        cert_serial=facts["cert_serial"], cert_fingerprint=facts["cert_fingerprint"],
        issuing_ca=facts["issuing_ca"], batch=batch, station=station_name,
        operator=operator, hsm_session=hsm_session, attestation_hash=attestation_hash,
        when=resources.registry.wall_clock())
    return record, entry


def revoke_uncommitted(registry, serial, cert_der, operator, reason=REVOCATION_REASON):
    """Record `cert_der` in device `serial`'s history and mark it revoked.  Tolerates a
    certificate already recorded or already revoked.  Raises RegistryError otherwise."""
    cert = x509.load_der_x509_certificate(bytes(cert_der))
    try:
        registry.add_certificate(serial, cert_der, "identity", operation="line-uncommitted",
                                 operator=operator)
    except RegistryError as exc:
        if exc.reason != RegistryError.DUPLICATE_CERTIFICATE:
            raise
    try:
        registry.mark_revoked(cert.serial_number, reason, operator=operator,
                              issuer=cert.issuer.rfc4514_string())
    except RegistryError as exc:
        if exc.reason != RegistryError.STATE:  # already revoked
            raise
