"""Behaviour every HSM backend must show, run against both (SoftHSM2 via PKCS#11, and the
soft keystore).  The line depends on these, not on a backend."""

import threading
import time

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils

from fleetid.cloud.hsm import HsmBusy, HsmError, KeyNotFound
from fleetid.cloud.hsm.interface import put_key_response_expected
from fleetid.cloud.hsm.soft_backend import SoftBackend
from tests.cloud.hsm_support import (
    KEYSTORE_PASS,
    MASTER_KEY,
    SOFTHSM_MODULE,
    TEST_SCRYPT_N,
    TOKEN_LABEL,
    TRANSPORT_DEK,
    TRANSPORT_ENC,
    TRANSPORT_MAC,
    UID_A,
    UID_B,
    USER_PIN,
    decode_put_key,
    files_bytes,
    init_softhsm_token,
    kcv,
    reference_device_keys,
    reference_kdf,
    reference_session_keys,
)
from tests.conftest import load_vectors

HOST_CHALLENGE = bytes.fromhex("0102030405060708")
CARD_CHALLENGE = bytes.fromhex("a1a2a3a4a5a6a7a8")


class BackendEnv:
    """Opens backends of one kind over one store (a SoftHSM2 token or a keystore file)."""

    def __init__(self, kind, tmp_path, monkeypatch):
        self.kind = kind
        self.opened = []
        if kind == "pkcs11":
            self.store_path = init_softhsm_token(tmp_path, monkeypatch)
        else:
            self.store_path = tmp_path / "keystore.json"

    def open(self, max_sessions=4, acquire_timeout=2.0, secret=None):
        if self.kind == "pkcs11":
            from fleetid.cloud.hsm.pkcs11_backend import Pkcs11Backend

            backend = Pkcs11Backend(SOFTHSM_MODULE, TOKEN_LABEL, secret or USER_PIN,
                                    max_sessions=max_sessions, acquire_timeout=acquire_timeout)
        else:
            backend = SoftBackend(self.store_path, secret or KEYSTORE_PASS,
                                  max_sessions=max_sessions, acquire_timeout=acquire_timeout,
                                  scrypt_n=TEST_SCRYPT_N)
        self.opened.append(backend)
        return backend

    def close_all(self):
        for backend in self.opened:
            backend.close()


@pytest.fixture(params=["soft", "pkcs11"])
def env(request, tmp_path, monkeypatch):
    backend_env = BackendEnv(request.param, tmp_path, monkeypatch)
    yield backend_env
    backend_env.close_all()


@pytest.fixture
def hsm(env):
    return env.open()


@pytest.fixture
def provisioned(hsm):
    """A backend holding the known master and transport key set."""
    hsm.import_master_key("scp03-master", bytearray(MASTER_KEY))
    transport = hsm.import_transport_keys("batch-7", bytearray(TRANSPORT_ENC),
                                          bytearray(TRANSPORT_MAC), bytearray(TRANSPORT_DEK))
    return hsm, transport


# -- CA signing keys ------------------------------------------------------------------------


def test_signatures_verify_under_the_generated_public_key(hsm):
    public = hsm.generate_signing_key("issuing-ca")
    assert public.public_numbers() == hsm.public_key("issuing-ca").public_numbers()
    assert isinstance(public.curve, ec.SECP256R1)
    signature = hsm.sign("issuing-ca", b"tbsCertificate bytes")
    public.verify(signature, b"tbsCertificate bytes", ec.ECDSA(hashes.SHA256()))
    digest = bytes(range(32))
    public.verify(hsm.sign_digest("issuing-ca", digest), digest,
                  ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    with pytest.raises(InvalidSignature):
        public.verify(signature, b"other bytes", ec.ECDSA(hashes.SHA256()))


def test_generating_an_existing_label_is_refused(hsm):
    hsm.generate_signing_key("root-ca")
    with pytest.raises(HsmError) as info:
        hsm.generate_signing_key("root-ca")
    assert info.value.reason == HsmError.EXISTS


def test_unknown_labels_raise_key_not_found(provisioned):
    hsm, _transport = provisioned
    with pytest.raises(KeyNotFound):
        hsm.public_key("no-such-ca")
    with pytest.raises(KeyNotFound):
        hsm.sign_digest("no-such-ca", bytes(32))
    with pytest.raises(KeyNotFound):
        hsm.diversify("no-such-master", UID_A)
    with pytest.raises(KeyNotFound) as info:
        hsm.transport_keys("batch-0")
    assert info.value.reason == HsmError.KEY_NOT_FOUND


def test_a_digest_that_is_not_32_bytes_is_refused(hsm):
    hsm.generate_signing_key("ca")
    with pytest.raises(HsmError) as info:
        hsm.sign_digest("ca", bytes(20))
    assert info.value.reason == HsmError.BAD_INPUT


# -- diversification and PUT KEY ------------------------------------------------------------


def test_diversification_is_deterministic_per_uid_and_distinct_across_uids(provisioned):
    hsm, transport = provisioned
    with hsm.diversify("scp03-master", UID_A) as first, \
            hsm.diversify("scp03-master", UID_A) as again, \
            hsm.diversify("scp03-master", UID_B) as other:
        assert first.kcvs == again.kcvs
        assert hsm.put_key_payload(first, transport, 0x31) == \
            hsm.put_key_payload(again, transport, 0x31)
        assert first.kcvs != other.kcvs
        assert len(set(first.kcvs)) == 3  # ENC, MAC and DEK differ too
        ctx = (HOST_CHALLENGE, CARD_CHALLENGE)
        assert hsm.scp03_session_keys(first, *ctx) == hsm.scp03_session_keys(again, *ctx)
        assert hsm.scp03_session_keys(first, *ctx) != hsm.scp03_session_keys(other, *ctx)


def test_put_key_payload_decrypts_to_the_documented_diversified_keys(provisioned):
    hsm, transport = provisioned
    with hsm.diversify("scp03-master", UID_A) as device_keys:
        payload = hsm.put_key_payload(device_keys, transport, 0x31)
    kvn, components = decode_put_key(payload, TRANSPORT_DEK)
    assert kvn == 0x31
    expected = reference_device_keys(MASTER_KEY, UID_A)
    assert [key for key, _ in components] == list(expected)
    assert [check for _, check in components] == [kcv(key) for key in expected]
    assert device_keys.kcvs == tuple(kcv(key) for key in expected)
    assert put_key_response_expected(payload) == bytes((0x31,)) + b"".join(device_keys.kcvs)
    for key in expected:  # the host got ciphertext only
        assert key not in payload


def test_a_device_key_set_can_wrap_its_successor_for_rotation(provisioned):
    hsm, _transport = provisioned
    with hsm.diversify("scp03-master", UID_A, kvn=0x31) as current, \
            hsm.diversify("scp03-master", UID_B, kvn=0x32) as successor:
        payload = hsm.put_key_payload(successor, current, 0x32)
    current_dek = reference_device_keys(MASTER_KEY, UID_A)[2]
    kvn, components = decode_put_key(payload, current_dek)
    assert kvn == 0x32
    assert [key for key, _ in components] == list(reference_device_keys(MASTER_KEY, UID_B))


def test_transport_keys_cannot_be_wrapped_out(provisioned):
    hsm, transport = provisioned
    with pytest.raises(HsmError) as info:
        hsm.put_key_payload(transport, transport, 0x31)
    assert info.value.reason == HsmError.BAD_HANDLE


def test_released_device_keys_are_refused_and_counted_down(provisioned):
    hsm, transport = provisioned
    device_keys = hsm.diversify("scp03-master", UID_A)
    assert hsm.pool_stats()["device_key_sets"] == 1
    hsm.release(device_keys)
    hsm.release(device_keys)  # idempotent
    assert hsm.pool_stats()["device_key_sets"] == 0
    with pytest.raises(HsmError) as info:
        hsm.put_key_payload(device_keys, transport, 0x31)
    assert info.value.reason == HsmError.BAD_HANDLE


def test_a_handle_from_another_backend_is_refused(provisioned, tmp_path):
    hsm, transport = provisioned
    with SoftBackend(tmp_path / "other.json", "other pass", scrypt_n=TEST_SCRYPT_N) as other:
        other.import_master_key("m", bytearray(MASTER_KEY))
        with other.diversify("m", UID_A) as foreign:
            with pytest.raises(HsmError) as info:
                hsm.put_key_payload(foreign, transport, 0x31)
    assert info.value.reason == HsmError.BAD_HANDLE


@pytest.mark.parametrize("bad", [
    {"se_uid": b"\x01\x02"},
    {"se_uid": bytes(65)},
    {"se_uid": "0490a1"},
    {"kvn": 0},
    {"kvn": 0x80},
])
def test_out_of_range_inputs_are_refused(provisioned, bad):
    hsm, _transport = provisioned
    kwargs = {"se_uid": UID_A, "kvn": 0x31}
    kwargs.update(bad)
    with pytest.raises(HsmError) as info:
        hsm.diversify("scp03-master", kwargs["se_uid"], kvn=kwargs["kvn"])
    assert info.value.reason == HsmError.BAD_INPUT


def test_transport_import_wipes_its_inputs_and_checks_the_fab_kcvs(hsm):
    enc, mac, dek = bytearray(TRANSPORT_ENC), bytearray(TRANSPORT_MAC), bytearray(TRANSPORT_DEK)
    good_kcvs = (kcv(TRANSPORT_ENC), kcv(TRANSPORT_MAC), kcv(TRANSPORT_DEK))
    handle = hsm.import_transport_keys("lot-1", enc, mac, dek, kvn=0x30, expected_kcvs=good_kcvs)
    assert enc == mac == dek == bytearray(16)
    assert (handle.kind, handle.name, handle.kvn) == ("transport", "lot-1", 0x30)
    looked_up = hsm.transport_keys("lot-1")
    assert (looked_up.kind, looked_up.kvn) == ("transport", 0x30)

    with pytest.raises(HsmError) as info:
        hsm.import_transport_keys("lot-2", bytearray(TRANSPORT_ENC), bytearray(TRANSPORT_MAC),
                                  bytearray(TRANSPORT_DEK), expected_kcvs=good_kcvs[::-1])
    assert info.value.reason == HsmError.KCV_MISMATCH
    with pytest.raises(KeyNotFound):
        hsm.transport_keys("lot-2")
    with pytest.raises(HsmError) as info:
        hsm.import_transport_keys("lot-1", bytearray(16), bytearray(16), bytearray(16))
    assert info.value.reason == HsmError.EXISTS


# -- SCP03 session keys ---------------------------------------------------------------------


@pytest.mark.parametrize("challenge_len", [8, 16])
def test_session_keys_match_the_sp800_108_reference(provisioned, challenge_len):
    hsm, transport = provisioned
    host, card = bytes(range(challenge_len)), bytes(range(100, 100 + challenge_len))
    got = hsm.scp03_session_keys(transport, host, card)
    assert tuple(got) == reference_session_keys(TRANSPORT_ENC, TRANSPORT_MAC, host, card)
    assert got.s_enc.hex() not in repr(got)  # session keys are secrets: never in a repr
    enc, mac, _dek = reference_device_keys(MASTER_KEY, UID_A)
    with hsm.diversify("scp03-master", UID_A) as device_keys:
        got = hsm.scp03_session_keys(device_keys, host, card)
    assert (got.s_enc, got.s_mac, got.s_rmac) == reference_session_keys(enc, mac, host, card)


def test_session_keys_reproduce_the_openscp_card_and_host_cryptograms(hsm):
    vector = load_vectors("scp03/openscp-aes128-s8.json")
    handle = hsm.import_transport_keys(
        "openscp", bytearray.fromhex(vector["static_keys"]["enc"]),
        bytearray.fromhex(vector["static_keys"]["mac"]), bytearray(16))
    response = bytes.fromhex(vector["initialize_update_response_data"])
    card_challenge, card_cryptogram = response[13:21], response[21:29]
    host_challenge = bytes.fromhex(vector["host_challenge"])
    keys = hsm.scp03_session_keys(handle, host_challenge, card_challenge)
    ctx = host_challenge + card_challenge
    assert reference_kdf(keys.s_mac, 0x00, ctx, 64) == card_cryptogram
    ext_auth = bytes.fromhex(vector["external_authenticate_command"])
    assert reference_kdf(keys.s_mac, 0x01, ctx, 64) == ext_auth[5:13]


def test_session_keys_match_fleetid_common_scp03(provisioned):
    scp03 = pytest.importorskip("fleetid.common.scp03")
    hostcrypto = pytest.importorskip("fleetid.common.host.hostcrypto")
    hsm, transport = provisioned
    prims = hostcrypto.CryptographyPrimitives()
    static = scp03.StaticKeys(TRANSPORT_ENC, TRANSPORT_MAC, TRANSPORT_DEK, 0x30)
    want = scp03.derive_session_keys(prims, static, HOST_CHALLENGE, CARD_CHALLENGE)
    got = hsm.scp03_session_keys(transport, HOST_CHALLENGE, CARD_CHALLENGE)
    assert (got.s_enc, got.s_mac, got.s_rmac) == (want.s_enc, want.s_mac, want.s_rmac)
    enc, mac, dek = reference_device_keys(MASTER_KEY, UID_B)
    want = scp03.derive_session_keys(prims, scp03.StaticKeys(enc, mac, dek, 0x31),
                                     HOST_CHALLENGE, CARD_CHALLENGE)
    with hsm.diversify("scp03-master", UID_B) as device_keys:
        got = hsm.scp03_session_keys(device_keys, HOST_CHALLENGE, CARD_CHALLENGE)
    assert (got.s_enc, got.s_mac, got.s_rmac) == (want.s_enc, want.s_mac, want.s_rmac)


@pytest.mark.parametrize("host,card", [(bytes(8), bytes(16)), (bytes(7), bytes(7)), (b"", b"")])
def test_mismatched_challenges_are_refused(provisioned, host, card):
    hsm, transport = provisioned
    with pytest.raises(HsmError) as info:
        hsm.scp03_session_keys(transport, host, card)
    assert info.value.reason == HsmError.BAD_INPUT


# -- session pool ---------------------------------------------------------------------------


def _hold_sessions(hsm, count):
    """Pin `count` sessions from other threads; returns (release_event, threads)."""
    held, release = threading.Barrier(count + 1), threading.Event()

    def holder():
        with hsm.session():
            held.wait()
            release.wait(10)

    threads = [threading.Thread(target=holder) for _ in range(count)]
    for thread in threads:
        thread.start()
    held.wait(10)
    return release, threads


def test_the_session_bound_is_enforced_with_a_typed_timeout(env):
    hsm = env.open(max_sessions=2, acquire_timeout=0.2)
    hsm.generate_signing_key("ca")
    release, threads = _hold_sessions(hsm, 2)
    try:
        started = time.monotonic()
        with pytest.raises(HsmBusy) as info:
            hsm.sign("ca", b"data")
        assert time.monotonic() - started >= 0.2
        assert info.value.reason == HsmError.BUSY and info.value.max_sessions == 2
        assert hsm.pool_stats()["busy_timeouts"] == 1
        assert hsm.pool_stats()["open"] == 2
    finally:
        release.set()
        for thread in threads:
            thread.join()
    hsm.sign("ca", b"data")  # a freed session serves the next caller


def test_concurrent_callers_share_the_bounded_pool(provisioned):
    hsm, transport = provisioned
    errors, peak = [], [0]

    def station(n):
        try:
            for _ in range(5):
                hsm.scp03_session_keys(transport, bytes((n,)) * 8, CARD_CHALLENGE)
                peak[0] = max(peak[0], hsm.pool_stats()["open"])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=station, args=(n,)) for n in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert peak[0] <= hsm.pool_stats()["max_sessions"] == 4


# python-pkcs11's object search iterator raises from __del__ when its session is already
# dead; pytest reports that as an unraisable-exception warning, which is expected here.
_DEAD_SESSION_NOISE = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning")


@_DEAD_SESSION_NOISE
def test_a_broken_session_is_discarded_and_replaced(provisioned):
    hsm, transport = provisioned
    hsm.scp03_session_keys(transport, HOST_CHALLENGE, CARD_CHALLENGE)
    with hsm.session() as pooled:
        pooled.raw.close()  # the session dies under the pool (HSM failover, reset)
    before = hsm.pool_stats()
    keys = hsm.scp03_session_keys(transport, HOST_CHALLENGE, CARD_CHALLENGE)
    assert tuple(keys) == reference_session_keys(TRANSPORT_ENC, TRANSPORT_MAC,
                                                 HOST_CHALLENGE, CARD_CHALLENGE)
    after = hsm.pool_stats()
    assert after["discarded"] == before["discarded"] + 1
    assert after["created"] == before["created"] + 1
    assert after["in_use"] == 0


@_DEAD_SESSION_NOISE
def test_a_pinned_session_that_breaks_is_replaced_inside_the_block(provisioned):
    hsm, transport = provisioned
    with hsm.session() as pooled:
        pooled.raw.close()
        keys = hsm.scp03_session_keys(transport, HOST_CHALLENGE, CARD_CHALLENGE)
        assert hsm.pool_stats()["discarded"] == 1
    assert keys.s_mac == reference_session_keys(TRANSPORT_ENC, TRANSPORT_MAC,
                                                HOST_CHALLENGE, CARD_CHALLENGE)[1]
    assert hsm.pool_stats()["in_use"] == 0


# -- credentials and data at rest -----------------------------------------------------------


def test_a_wrong_pin_or_passphrase_raises_a_typed_login_error(env):
    env.open().close()  # the store exists
    with pytest.raises(HsmError) as info:
        env.open(secret="not the secret")
    assert info.value.reason == HsmError.LOGIN
    assert "not the secret" not in str(info.value)
    env.open().close()  # the right secret still works


def test_the_store_at_rest_holds_no_plaintext_key_bytes(env):
    with env.open() as hsm:
        hsm.import_master_key("scp03-master", bytearray(MASTER_KEY))
        transport = hsm.import_transport_keys("batch-7", bytearray(TRANSPORT_ENC),
                                              bytearray(TRANSPORT_MAC), bytearray(TRANSPORT_DEK))
        with hsm.diversify("scp03-master", UID_A) as device_keys:
            hsm.put_key_payload(device_keys, transport, 0x31)
    stored = files_bytes(env.store_path)
    assert len(stored) > 0
    secrets = [MASTER_KEY, MASTER_KEY[:16], MASTER_KEY[16:], TRANSPORT_ENC, TRANSPORT_MAC,
               TRANSPORT_DEK]
    secrets += list(reference_device_keys(MASTER_KEY, UID_A))
    for secret in secrets:
        for form in (secret, secret.hex().encode(), secret.hex().upper().encode()):
            assert form not in stored


def test_both_backends_give_the_same_bytes_for_the_same_key_material(tmp_path, monkeypatch):
    envs = [BackendEnv("soft", tmp_path, monkeypatch), BackendEnv("pkcs11", tmp_path, monkeypatch)]
    outputs = []
    try:
        for backend_env in envs:
            hsm = backend_env.open()
            hsm.import_master_key("m", bytearray(MASTER_KEY[:16]))  # AES-128 master as well
            transport = hsm.import_transport_keys("b", bytearray(TRANSPORT_ENC),
                                                  bytearray(TRANSPORT_MAC),
                                                  bytearray(TRANSPORT_DEK))
            result = []
            for uid in (UID_A, UID_B, bytes(range(4)), bytes(range(64))):
                with hsm.diversify("m", uid) as device_keys:
                    result.append(device_keys.kcvs)
                    result.append(hsm.put_key_payload(device_keys, transport, 0x31))
                    result.append(hsm.scp03_session_keys(device_keys, bytes(16), bytes(16)))
            result.append(hsm.scp03_session_keys(transport, HOST_CHALLENGE, CARD_CHALLENGE))
            outputs.append(result)
    finally:
        for backend_env in envs:
            backend_env.close_all()
    assert outputs[0] == outputs[1]
    kvn, components = decode_put_key(outputs[0][1], TRANSPORT_DEK)
    assert [key for key, _ in components] == list(reference_device_keys(MASTER_KEY[:16], UID_A))
