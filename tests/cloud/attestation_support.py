"""The software SE vendor and the fleet-side set-up the PKI and CA tests share.

The vendor, its chips, CSRs and the counting HSM wrapper live in bench/_attestation_support.py
(the benchmarks use them without the test extras); this module re-exports them, so the
tests import them from here as before, and adds the pytest-side part: open_backend.
"""

from bench._attestation_support import (  # noqa: F401 (re-exported)
    CRL_URL,
    DEFAULT_POLICY,
    FIRMWARE_VERSION,
    ROOT_SUBJECT,
    SCOPE,
    T0,
    CountingHsm,
    SoftChip,
    SoftVendor,
    enrolment,
    make_csr,
    make_pki,
    new_key,
    point,
)
from fleetid.cloud.hsm.soft_backend import SoftBackend
from tests.cloud.hsm_support import (
    KEYSTORE_PASS,
    SOFTHSM_MODULE,
    TEST_SCRYPT_N,
    TOKEN_LABEL,
    USER_PIN,
    init_softhsm_token,
)


def open_backend(kind, tmp_path, monkeypatch):
    """A fresh HSM backend: "soft" (keystore file) or "pkcs11" (a throwaway SoftHSM2
    token; skips locally, fails under CI, when SoftHSM2 is missing)."""
    if kind == "pkcs11":
        from fleetid.cloud.hsm.pkcs11_backend import Pkcs11Backend

        init_softhsm_token(tmp_path, monkeypatch)
        return Pkcs11Backend(SOFTHSM_MODULE, TOKEN_LABEL, USER_PIN)
    return SoftBackend(tmp_path / "keystore.json", KEYSTORE_PASS, scrypt_n=TEST_SCRYPT_N)
