"""A software "SE vendor" for the CA tests and the cloud benchmarks: a vendor root, chips
with a manufacturer attestation key (MAK) and its certificate, attestation statements,
evidence bundles and CSRs built exactly as a device builds them (fleetid.common.attestation
/ fleetid.common.der), plus the variants an attacker would try.

The device's private keys are software keys here: they stand in for keys inside the SE.
The end of this file has the fleet-side set-up the PKI and CA tests share (a root and an
issuing CA, an HSM wrapper that counts signatures).

It imports fleetid and `cryptography` only (never tests/, pytest or hypothesis), so the
benchmarks run from `bash scripts/setup.sh` alone; tests/cloud/attestation_support.py
re-exports it and keeps the pytest-side part (open_backend: throwaway SoftHSM2 tokens).
"""

import datetime
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fleetid.cloud.pki import init_root, new_ca
from fleetid.common import attestation, csr, der, se_consts

# The policy GENERATE KEY gives a signing key (se_consts): all the CA requires.
DEFAULT_POLICY = (
    se_consts.POLICY_SIGN | se_consts.POLICY_NON_EXPORTABLE | se_consts.POLICY_GENERATED_ON_CHIP
)
FIRMWARE_VERSION = b"\x01\x02\x00"
T0 = datetime.datetime(2026, 11, 23, 12, 0, 0, tzinfo=datetime.timezone.utc)


def new_key():
    return ec.generate_private_key(ec.SECP256R1())


def point(public_key):
    """65-byte uncompressed point of a cryptography EC public key."""
    return public_key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def _der(certificate):
    return certificate.public_bytes(serialization.Encoding.DER)


class SoftChip:
    """One chip as it leaves the vendor's fab: SE UID, MAK and MAK certificate chain."""

    def __init__(self, vendor, se_uid, mak_key, mak_cert):
        self.vendor = vendor
        self.se_uid = se_uid
        self.mak_key = mak_key
        self.mak_cert = mak_cert

    @property
    def chain(self):
        """DER certificates as the chip's GET DATA returns them: MAK first, up to the root."""
        return [_der(self.mak_cert)] + [_der(c) for c in self.vendor.intermediates] + [
            _der(self.vendor.root)
        ]

    def statement(self, public_key, nonce, policy=DEFAULT_POLICY, slot=se_consts.SLOT_IDENTITY,
                  life_cycle=se_consts.LC_INITIALIZED, se_uid=None):
        """DER AttestationStatement for `public_key` (what ATTEST signs)."""
        return attestation.encode_statement(
            self.se_uid if se_uid is None else se_uid, slot, point(public_key), policy,
            life_cycle, FIRMWARE_VERSION, nonce,
        )

    def sign_statement(self, statement_der, mak_key=None):
        """DER SignedAttestation: `statement_der` signed with this chip's MAK."""
        signature = (mak_key or self.mak_key).sign(statement_der, ec.ECDSA(hashes.SHA256()))
        return attestation.encode_signed_attestation(statement_der, signature)

    def attest(self, public_key, nonce, **fields):
        """What ATTEST returns for a key: DER SignedAttestation."""
        return self.sign_statement(self.statement(public_key, nonce, **fields))

    def evidence(self, public_key, nonce, chain=None, **fields):
        """DER EvidenceBundle with one statement and the chip's chain (or `chain`)."""
        return attestation.encode_evidence_bundle(
            [self.attest(public_key, nonce, **fields)], self.chain if chain is None else chain
        )


class SoftVendor:
    """An SE vendor: root CA (optionally one intermediate) that certifies chip MAKs."""

    def __init__(self, name="Test SE Vendor", intermediate=False, not_before=None):
        self.name = name
        self.not_before = not_before or T0 - datetime.timedelta(days=365)
        self.root_key = new_key()
        self.root = self._ca_cert(name + " Root CA", self.root_key, None, None)
        self.intermediates = []
        self.issuer_key, self.issuer_cert = self.root_key, self.root
        if intermediate:
            key = new_key()
            cert = self._ca_cert(name + " Batch CA", key, self.root_key, self.root)
            self.intermediates.append(cert)
            self.issuer_key, self.issuer_cert = key, cert

    def _ca_cert(self, common_name, key, issuer_key, issuer_cert):
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, self.name),
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            ]
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer_cert.subject if issuer_cert else subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self.not_before)
            .not_valid_after(self.not_before + datetime.timedelta(days=40 * 365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        )
        if issuer_cert is not None:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False
            )
        return builder.sign(issuer_key or key, hashes.SHA256())

    def make_chip(self, se_uid=None, not_after=None, ca=False):
        """A chip with a fresh MAK; its certificate is a typical SE-vendor end-entity
        certificate: no SAN, no EKU, keyUsage digitalSignature, CA:false.  `ca=True`
        makes a (wrongly) CA-flagged MAK certificate for attack tests."""
        se_uid = se_uid or os.urandom(16)
        mak_key = new_key()
        mak_cert = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, self.name),
                        x509.NameAttribute(NameOID.SERIAL_NUMBER, se_uid.hex()),
                        x509.NameAttribute(NameOID.COMMON_NAME, "SE " + se_uid.hex()),
                    ]
                )
            )
            .issuer_name(self.issuer_cert.subject)
            .public_key(mak_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self.not_before)
            .not_valid_after(not_after or self.not_before + datetime.timedelta(days=30 * 365))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, False, False, False, ca, False, False, False),
                critical=True,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.issuer_key.public_key()),
                False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(mak_key.public_key()), False)
            .sign(self.issuer_key, hashes.SHA256())
        )
        return SoftChip(self, se_uid, mak_key, mak_cert)


def make_csr(signing_key, serial, bundle_der=None, public_key=None, uri=True, extra_attributes=()):
    """A DER CSR as the device builds it (common/csr.py): CN and serialNumber = serial,
    the evidence bundle as a PKCS#10 attribute (if given), a URI SAN extensionRequest,
    signed by `signing_key` over the info that names `public_key` (default: the signing
    key's own public key; a different one makes a CSR without proof of possession)."""
    public_key = public_key or signing_key.public_key()
    attributes = list(extra_attributes)
    if bundle_der is not None:
        attributes.append(attestation.build_evidence_attribute(bundle_der))
    if uri:
        attributes.append(csr.uri_san_extension_request("urn:fleetid:device:" + serial))
    info = csr.info_parts(serial, serial, der.encode_p256_spki(point(public_key)), attributes)
    signature = signing_key.sign(b"".join(info), ec.ECDSA(hashes.SHA256()))
    return csr.finish(info, signature)


def enrolment(chip, nonce, serial, **fields):
    """The honest device: key generated "in the SE", attested with `nonce`, CSR signed with
    it.  Returns (device private key, CSR DER)."""
    key = new_key()
    return key, make_csr(key, serial, chip.evidence(key.public_key(), nonce, **fields))


# -- fleet side: root and issuing CA --------------------------------------------------


SCOPE = {"product": "widget", "batch": "b42", "region": "eu"}
ROOT_SUBJECT = "CN=Acme Fleet Root,O=Acme"
CRL_URL = "http://pki.example/crl/widget-b42-eu.crl"


def make_pki(hsm, directory):
    """Root (ceremony in `directory`/ceremony) and one issuing CA, both in `hsm`.
    Returns (root certificate, CA certificate)."""
    root, _record = init_root(hsm, "fleet-root", ROOT_SUBJECT, 30, str(directory / "ceremony"),
                              ["alice", "bob"], now=T0 - datetime.timedelta(days=30))
    ca = new_ca(hsm, "fleet-root", root, "ca-widget-b42-eu", SCOPE,
                now=T0 - datetime.timedelta(days=1))
    return root, ca


class CountingHsm:
    """Wraps an HsmBackend and counts signatures: a refusal must sign nothing."""

    def __init__(self, hsm):
        self._hsm = hsm
        self.signatures = 0

    def sign(self, label, data):
        self.signatures += 1
        return self._hsm.sign(label, data)

    def sign_digest(self, label, digest):
        self.signatures += 1
        return self._hsm.sign_digest(label, digest)

    def __new__(cls, hsm):
        # A backend that signs certificates itself (SoftBackend.sign_certificate) gets
        # the wrapper that counts those signatures too; CertificateSigner looks for that
        # method on the class (fleetid.cloud.pki.signing, "Native signing").
        if cls is CountingHsm and callable(getattr(type(hsm), "sign_certificate", None)):
            cls = _NativeCountingHsm
        return object.__new__(cls)

    def __getattr__(self, name):
        return getattr(self._hsm, name)


class _NativeCountingHsm(CountingHsm):
    def sign_certificate(self, label, builder):
        self.signatures += 1
        return self._hsm.sign_certificate(label, builder)
