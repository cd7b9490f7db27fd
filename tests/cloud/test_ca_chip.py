"""End to end with the emulated SE: a fabbed chip generates and attests its identity key
with a CA nonce, signs its own CSR, and the issuing CA certifies it (factory line step
4-5); the chip's vendor root from sim/fab.py is the trusted SE vendor root."""

import pytest
from cryptography import x509
from cryptography.x509 import verification

from fleetid.cloud.ca import IssuanceRefused, IssuingCa, verify_attestation_extension
from fleetid.common import attestation, csr, der
from fleetid.common import se_consts as C
from fleetid.common.apdu import ApduProtocol
from fleetid.device.se import SeSession
from tests.cloud.attestation_support import T0, make_pki, open_backend
from tests.sim.chip_support import fab_test_chip

SERIAL = "WX-100001"


@pytest.fixture
def line(tmp_path):
    hsm = open_backend("soft", tmp_path, None)
    root, ca_cert = make_pki(hsm, tmp_path)
    chip, record = fab_test_chip(tmp_path, now=T0)
    se = SeSession(ApduProtocol(chip.process))
    vendor_root = x509.load_der_x509_certificate(record.chain_der[-1])
    ca = IssuingCa(hsm, "ca-widget-b42-eu", ca_cert, [vendor_root], clock=lambda: T0)
    yield ca, se, root, ca_cert, vendor_root
    hsm.close()


def _attested_csr(se, nonce, slot=C.SLOT_IDENTITY):
    point = se.generate_key(slot, C.POLICY_SIGN)
    evidence = attestation.encode_evidence_bundle([se.attest(slot, nonce)], se.attestation_chain())
    info = csr.info_parts(SERIAL, SERIAL, der.encode_p256_spki(point),
                          [attestation.build_evidence_attribute(evidence),
                           csr.uri_san_extension_request("urn:fleetid:device:" + SERIAL)])
    return csr.finish(info, se.sign(slot, csr.signing_digest(info)))


def test_emulated_chip_gets_an_identity_certificate_that_validates(line):
    ca, se, root, ca_cert, vendor_root = line
    uid = se.uid()
    cert = ca.issue(_attested_csr(se, ca.issue_nonce()), uid, SERIAL, "identity")
    verifier = (verification.PolicyBuilder().store(verification.Store([root])).time(T0)
                .build_client_verifier())
    assert verifier.verify(cert, [ca_cert]).chain[0] == cert
    statement = verify_attestation_extension(cert, [vendor_root], expected_se_uid=uid)
    assert statement.slot == C.SLOT_IDENTITY


def test_emulated_chip_attesting_with_a_foreign_nonce_is_refused(line):
    ca, se, _root, _ca_cert, _vendor_root = line
    with pytest.raises(IssuanceRefused) as info:
        ca.issue(_attested_csr(se, b"\x00" * 32), se.uid(), SERIAL, "identity")
    assert info.value.reason == "nonce_unknown"
