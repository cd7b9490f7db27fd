"""Intermediate (issuing) CAs under the offline root, one per product / batch / region.

Revoking a batch means revoking its issuing CA at the root: devices of other batches
chain through other intermediates and are untouched.
"""

import datetime

from cryptography.x509.oid import NameOID

from fleetid.cloud.pki.errors import PkiError
from fleetid.cloud.pki.profiles import issuing_ca_builder, scope_name, to_utc_seconds, utc_now
from fleetid.cloud.pki.signing import sign_certificate

DEFAULT_CA_VALIDITY = datetime.timedelta(days=15 * 365 + 4)


def new_ca(hsm, root_label, root_cert, ca_label, scope, path_len=0,
           validity=DEFAULT_CA_VALIDITY, crl_url=None, now=None):
    """Create an issuing CA: key generated in the HSM, certificate signed by the root.

    Params: hsm: HsmBackend holding the root key.  root_label: the root key's label.
        root_cert: the root's x509.Certificate (its key must be the HSM key under
        root_label).  ca_label: label of the new CA key (must not exist).
        scope: {"product", "batch", "region"} (values 1..32 of [A-Za-z0-9._-]).
        path_len: basicConstraints pathLenConstraint (0: issues end-entity certs only).
        validity: timedelta; the CA may not outlive the root.  crl_url: the root's CRL
        distribution point (str) or None.  now: aware datetime (default: now, UTC).
    Returns: x509.Certificate of the new CA.
    Raises: PkiError(BAD_INPUT / KEY_MISMATCH / VALIDITY / BAD_SIGNATURE), HsmError(EXISTS)
        if ca_label is taken, KeyNotFound if root_label is not in the HSM.
    """
    if not isinstance(path_len, int) or isinstance(path_len, bool) or path_len < 0:
        raise PkiError(PkiError.BAD_INPUT, "path_len must be an int >= 0")
    if not isinstance(validity, datetime.timedelta) or validity <= datetime.timedelta(0):
        raise PkiError(PkiError.BAD_INPUT, "validity must be a positive timedelta")
    organization = root_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    subject = scope_name(scope, organization[0].value if organization else None)
    root_key = root_cert.public_key()
    # Check the root label before creating anything in the HSM.
    if hsm.public_key(root_label).public_numbers() != root_key.public_numbers():
        raise PkiError(PkiError.KEY_MISMATCH, "HSM key %r is not the root's key" % root_label)
    not_before = to_utc_seconds(now) if now is not None else utc_now()
    not_after = not_before + validity
    if not_after > root_cert.not_valid_after_utc:
        raise PkiError(PkiError.VALIDITY, "the CA would outlive the root")
    if not_before < root_cert.not_valid_before_utc:
        raise PkiError(PkiError.VALIDITY, "the root is not valid yet")
    public_key = hsm.generate_signing_key(ca_label)
    builder = issuing_ca_builder(subject, public_key, root_cert, not_before, not_after,
                                 path_len=path_len, crl_url=crl_url)
    return sign_certificate(hsm, root_label, builder, root_key)
