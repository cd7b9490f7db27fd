# Object identifiers fleetid defines.  Portable.
#
# Until draft-ietf-lamps-csr-attestation assigns final OIDs, fleetid uses a private arc
# under 2.25 (ITU-T X.667: an OID from a UUID, no registration needed).
# Arc: 2.25.168410979964568330477192807744436045893 ("fleetid").

FLEETID_ARC = "2.25.168410979964568330477192807744436045893"
# The SE attestation statement content type (what the MAK signs).
OID_ATTESTATION_STATEMENT = FLEETID_ARC + ".1"
# PKCS#10 attribute carrying the evidence bundle (shaped after the draft's
# id-aa-evidence: statements + the certificates that validate them).
OID_ATTR_EVIDENCE = FLEETID_ARC + ".2"
# Non-critical certificate extension carrying the evidence into the issued certificate.
OID_EXT_ATTESTATION = FLEETID_ARC + ".3"

# Standard OIDs the portable DER code needs.
OID_EC_PUBLIC_KEY = "1.2.840.10045.2.1"
OID_PRIME256V1 = "1.2.840.10045.3.1.7"
OID_ECDSA_WITH_SHA256 = "1.2.840.10045.4.3.2"
OID_COMMON_NAME = "2.5.4.3"
OID_SERIAL_NUMBER = "2.5.4.5"
OID_EXTENSION_REQUEST = "1.2.840.113549.1.9.14"
OID_SUBJECT_ALT_NAME = "2.5.29.17"

# Extended key usage of the compact revocation set's signer (cloud/revocation/revset_publisher.py
# certifies it; devices check it before trusting a set: device/host/revset_signer.py).
OID_KP_REVOCATION_SET = FLEETID_ARC + ".4"
