"""An HSM session lost under a running service (issue 19 item 6): C_CloseAllSessions on
the SoftHSM2 token through the module the backend loaded ends every session of the
process and, with the last one, the login.  The backend logs in again and retries once
(bounded), so the service recovers by itself; when it cannot log in, the request fails
typed (503 at EST) and issues nothing, and the next one after the cause is gone succeeds."""

import base64

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils

from bench._fault_support import close_all_sessions
from fleetid.cloud.hsm.errors import HsmError
from tests.cloud.attestation_support import enrolment
from tests.cloud.cloud_support import Fleet, RunningCloud
from tests.cloud.hsm_support import SOFTHSM_MODULE, TOKEN_LABEL, USER_PIN, init_softhsm_token

DIGEST = bytes(range(32))


@pytest.fixture
def token_backend(tmp_path, monkeypatch):
    init_softhsm_token(tmp_path, monkeypatch)
    from fleetid.cloud.hsm.pkcs11_backend import Pkcs11Backend

    backend = Pkcs11Backend(SOFTHSM_MODULE, TOKEN_LABEL, USER_PIN, max_sessions=4)
    yield backend
    backend.close()


def _verify(backend, label, signature):
    public = backend.public_key(label)
    public.verify(signature, DIGEST, ec.ECDSA(utils.Prehashed(hashes.SHA256())))


def test_all_sessions_closed_under_the_backend_it_logs_in_again_and_signs(token_backend):
    token_backend.generate_signing_key("k")
    with token_backend.session(), token_backend.session():  # warm: idle sessions exist
        pass
    _verify(token_backend, "k", token_backend.sign_digest("k", DIGEST))
    assert close_all_sessions(token_backend) == 0
    signature = token_backend.sign_digest("k", DIGEST)  # one retry, after the re-login
    _verify(token_backend, "k", signature)
    assert token_backend.relogins == 1
    stats = token_backend.pool_stats()
    assert stats["discarded"] >= 1 and stats["in_use"] == 0
    assert close_all_sessions(token_backend) == 0  # again: recovers again
    _verify(token_backend, "k", token_backend.sign_digest("k", DIGEST))
    assert token_backend.relogins == 2


def test_a_refused_re_login_is_a_typed_error_and_the_next_call_recovers(token_backend):
    token_backend.generate_signing_key("k")
    token_backend._pin = "not-the-pin"  # the token refuses the login while the fault lasts
    assert close_all_sessions(token_backend) == 0
    with pytest.raises(HsmError) as info:
        token_backend.sign_digest("k", DIGEST)
    assert info.value.reason == HsmError.LOGIN
    token_backend._pin = USER_PIN
    _verify(token_backend, "k", token_backend.sign_digest("k", DIGEST))


def _enrol(cloud, fleet, device):
    status, _, nonce_b64 = cloud.request("est", "GET", "/.well-known/est/nonce",
                                         files=device.files())
    assert status == 200
    _key, csr = enrolment(device.chip, base64.b64decode(nonce_b64), device.name)
    return cloud.request("est", "POST", "/.well-known/est/simpleenroll",
                         files=device.files(), body=base64.b64encode(csr),
                         headers={"Content-Type": "application/pkcs10"})


def test_est_on_a_token_whose_sessions_are_closed_answers_503_or_issues_with_its_record(
        tmp_path, monkeypatch):
    init_softhsm_token(tmp_path, monkeypatch)
    from fleetid.cloud.hsm.pkcs11_backend import Pkcs11Backend

    backend = Pkcs11Backend(SOFTHSM_MODULE, TOKEN_LABEL, USER_PIN, max_sessions=4)
    fleet = Fleet(tmp_path / "fleet", hsm=backend)
    try:
        with RunningCloud(fleet) as cloud:
            first, second, third = (fleet.provision() for _ in range(3))
            assert _enrol(cloud, fleet, first)[0] == 200
            # Lost, and the login refused while the fault lasts: 503, nothing issued.
            backend._pin = "not-the-pin"
            assert close_all_sessions(backend) == 0
            status, _, body = _enrol(cloud, fleet, second)
            assert status == 503 and b"signing service unavailable" in body, body
            assert [c.kind for c in fleet.registry.certificates(second.serial)] == ["identity"]
            # The cause gone: the service recovers by itself (re-login, fresh sessions).
            backend._pin = USER_PIN
            assert _enrol(cloud, fleet, second)[0] == 200
            # Lost again, login possible: the request itself is served.
            assert close_all_sessions(backend) == 0
            assert _enrol(cloud, fleet, third)[0] == 200
            for device in (first, second, third):
                kinds = [c.kind for c in fleet.registry.certificates(device.serial)]
                assert kinds == ["identity", "operational"]  # one record each, no fork
            assert backend.relogins == 2
    finally:
        fleet.close()
        backend.close()
