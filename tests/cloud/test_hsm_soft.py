"""The soft keystore backend: encryption at rest, file handling, URI, properties."""

import json
import os
import stat

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetid.cloud.hsm import HsmError, KeyNotFound, open_hsm
from fleetid.cloud.hsm.interface import diversification_block
from fleetid.cloud.hsm.soft_backend import SoftBackend
from tests.cloud.hsm_support import (
    KEYSTORE_PASS,
    MASTER_KEY,
    TEST_SCRYPT_N,
    TRANSPORT_DEK,
    TRANSPORT_ENC,
    TRANSPORT_MAC,
    UID_A,
    decode_put_key,
    reference_device_keys,
)


def _open(path, passphrase=KEYSTORE_PASS, **kwargs):
    return SoftBackend(path, passphrase, scrypt_n=TEST_SCRYPT_N, **kwargs)


@pytest.fixture
def keystore(tmp_path):
    return tmp_path / "keystore.json"


def test_keystore_file_is_mode_0600_and_written_atomically(keystore):
    with _open(keystore) as hsm:
        hsm.generate_signing_key("ca")
        hsm.import_master_key("m", bytearray(MASTER_KEY))
    assert stat.S_IMODE(os.stat(keystore).st_mode) == 0o600
    assert sorted(os.listdir(keystore.parent)) == ["keystore.json"]  # no temp files left


def test_keys_survive_a_reopen(keystore):
    with _open(keystore) as hsm:
        public = hsm.generate_signing_key("ca")
    with _open(keystore) as hsm:
        public.verify(hsm.sign("ca", b"after reopen"), b"after reopen", ec.ECDSA(hashes.SHA256()))


def test_the_ec_private_scalar_is_not_in_the_file(keystore):
    with _open(keystore) as hsm:
        hsm.generate_signing_key("ca")
        scalar = hsm._private_key("ca").private_numbers().private_value.to_bytes(32, "big")
    stored = keystore.read_bytes()
    assert scalar not in stored and scalar.hex().encode() not in stored


def test_a_group_readable_keystore_is_refused(keystore):
    _open(keystore).close()
    os.chmod(keystore, 0o640)
    with pytest.raises(HsmError) as info:
        _open(keystore)
    assert info.value.reason == HsmError.KEYSTORE


@pytest.mark.parametrize("content", [b"", b"{}", b"[1, 2]", b"\xff\xfe", b'{"format": "x"}'])
def test_a_corrupt_keystore_raises_a_keystore_error(keystore, content):
    keystore.write_bytes(content)
    os.chmod(keystore, 0o600)
    with pytest.raises(HsmError) as info:
        _open(keystore)
    assert info.value.reason == HsmError.KEYSTORE


def test_an_entry_moved_to_another_label_does_not_authenticate(keystore):
    with _open(keystore) as hsm:
        hsm.import_master_key("master-a", bytearray(MASTER_KEY))
        hsm.import_master_key("master-b", bytearray(bytes(32)))
    doc = json.loads(keystore.read_bytes())
    doc["keys"]["master-b"] = doc["keys"]["master-a"]  # relabel a's ciphertext as b
    keystore.write_text(json.dumps(doc))
    with _open(keystore) as hsm:
        with pytest.raises(HsmError) as info:
            hsm.diversify("master-b", UID_A)
    assert info.value.reason == HsmError.KEYSTORE


def test_a_missing_keystore_is_refused_without_create(keystore):
    with pytest.raises(HsmError) as info:
        _open(keystore, create=False)
    assert info.value.reason == HsmError.KEYSTORE


def test_a_weak_scrypt_cost_is_refused(keystore):
    with pytest.raises(HsmError) as info:
        SoftBackend(keystore, KEYSTORE_PASS, scrypt_n=2**10)
    assert info.value.reason == HsmError.CONFIG


def test_device_keys_die_with_the_session_that_made_them(keystore):
    with _open(keystore) as hsm:
        hsm.import_master_key("m", bytearray(MASTER_KEY))
        transport = hsm.import_transport_keys("b", bytearray(TRANSPORT_ENC),
                                              bytearray(TRANSPORT_MAC), bytearray(TRANSPORT_DEK))
        with hsm.session() as pooled:
            device_keys = hsm.diversify("m", UID_A)
            pooled.raw.close()
        with pytest.raises(KeyNotFound):
            hsm.put_key_payload(device_keys, transport, 0x31)


def test_open_hsm_opens_a_soft_keystore_from_a_uri(keystore):
    environ = {"FLEETID_KEYSTORE_PASS": KEYSTORE_PASS}
    _open(keystore).close()  # created with the test scrypt cost
    uri = "soft:%s;pass-env=FLEETID_KEYSTORE_PASS;max-sessions=3;acquire-timeout=0.5" % keystore
    with open_hsm(uri, environ=environ) as hsm:
        assert isinstance(hsm, SoftBackend)
        assert hsm.pool_stats()["max_sessions"] == 3
    with pytest.raises(HsmError) as info:
        open_hsm(uri, environ={"FLEETID_KEYSTORE_PASS": "wrong"})
    assert info.value.reason == HsmError.LOGIN


@pytest.mark.parametrize("uri", [
    "soft:/tmp/x.json",  # no pass-env
    "soft:/tmp/x.json;pass-env=UNSET_VARIABLE",
    "soft:;pass-env=P",
    "soft:/tmp/x.json;pass-env=P;colour=blue",
    "soft:/tmp/x.json;pass-env=P;max-sessions=many",
    "pkcs11:module=/x.so;pin-env=P",  # no token
    "pkcs11:token=t;pin-env=P",  # no module
    "hsm:whatever",
    "no scheme",
])
def test_malformed_uris_raise_config_errors(uri):
    with pytest.raises(HsmError) as info:
        open_hsm(uri, environ={"P": "secret"})
    assert info.value.reason == HsmError.CONFIG


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_any_uri_without_its_secret_variable_fails_with_a_config_error(uri):
    # With an empty environment nothing is opened or loaded: the parser must refuse
    # every string with HsmError(CONFIG), never with another exception.
    with pytest.raises(HsmError) as info:
        open_hsm(uri, environ={})
    assert info.value.reason == HsmError.CONFIG


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=4, max_size=64), st.binary(min_size=4, max_size=64))
def test_diversification_blocks_differ_for_different_uids_and_components(uid1, uid2):
    blocks1 = [diversification_block(uid1, c) for c in (1, 2, 3)]
    blocks2 = [diversification_block(uid2, c) for c in (1, 2, 3)]
    assert len(set(blocks1)) == 3
    assert (blocks1 == blocks2) == (uid1 == uid2)


@pytest.fixture(scope="module")
def provisioned_soft(tmp_path_factory):
    path = tmp_path_factory.mktemp("ks") / "keystore.json"
    with _open(path) as hsm:
        hsm.import_master_key("m", bytearray(MASTER_KEY))
        transport = hsm.import_transport_keys("b", bytearray(TRANSPORT_ENC),
                                              bytearray(TRANSPORT_MAC), bytearray(TRANSPORT_DEK))
        yield hsm, transport


@settings(max_examples=60, deadline=None)
@given(uid=st.binary(min_size=4, max_size=64), kvn=st.integers(1, 0x7F))
def test_put_key_payload_decrypts_for_any_uid_and_kvn(provisioned_soft, uid, kvn):
    hsm, transport = provisioned_soft
    with hsm.diversify("m", uid) as device_keys:
        payload = hsm.put_key_payload(device_keys, transport, kvn)
    got_kvn, components = decode_put_key(payload, TRANSPORT_DEK)
    assert got_kvn == kvn
    assert [key for key, _ in components] == list(reference_device_keys(MASTER_KEY, uid))
