"""The PKCS#11 backend against a throwaway SoftHSM2 token: object attributes (what the
token lets the host do with each key), login, URI, object lifetime."""

import logging

import pytest
from pkcs11 import Attribute, KeyType, ObjectClass
from pkcs11 import exceptions as p11e

from fleetid.cloud.hsm import HsmError, KeyNotFound, open_hsm
from tests.cloud.hsm_support import (
    MASTER_KEY,
    SOFTHSM_MODULE,
    TOKEN_LABEL,
    TRANSPORT_DEK,
    TRANSPORT_ENC,
    TRANSPORT_MAC,
    UID_A,
    USER_PIN,
    init_softhsm_token,
)

URI = "pkcs11:module=%s;token=%s;pin-env=FLEETID_HSM_PIN" % (SOFTHSM_MODULE, TOKEN_LABEL)
USAGE = ("ENCRYPT", "DECRYPT", "SIGN", "VERIFY", "WRAP", "UNWRAP", "DERIVE")


@pytest.fixture
def token(tmp_path, monkeypatch):
    return init_softhsm_token(tmp_path, monkeypatch)


@pytest.fixture
def hsm(token):
    backend = open_hsm(URI, environ={"FLEETID_HSM_PIN": USER_PIN})
    yield backend
    backend.close()


@pytest.fixture
def provisioned(hsm):
    hsm.import_master_key("scp03-master", bytearray(MASTER_KEY))
    transport = hsm.import_transport_keys("batch-7", bytearray(TRANSPORT_ENC),
                                          bytearray(TRANSPORT_MAC), bytearray(TRANSPORT_DEK))
    return hsm, transport


def _usage(key):
    return {name.lower() for name in USAGE if key[getattr(Attribute, name)]}


def _secret(raw, **search):
    return raw.get_key(object_class=ObjectClass.SECRET_KEY, key_type=KeyType.AES, **search)


def test_master_and_transport_keys_are_sensitive_non_extractable_single_purpose(provisioned):
    hsm, _transport = provisioned
    with hsm.session() as pooled:
        master = _secret(pooled.raw, label="scp03-master")
        enc = _secret(pooled.raw, label="scp03-transport:batch-7:enc")
        mac = _secret(pooled.raw, label="scp03-transport:batch-7:mac")
        dek = _secret(pooled.raw, label="scp03-transport:batch-7:dek")
        for key in (master, enc, mac, dek):
            assert key[Attribute.TOKEN] and key[Attribute.PRIVATE]
            assert key[Attribute.SENSITIVE] and not key[Attribute.EXTRACTABLE]
            assert not key[Attribute.MODIFIABLE]
            with pytest.raises(p11e.AttributeSensitive):
                key[Attribute.VALUE]
        assert _usage(master) == {"derive"}
        assert _usage(enc) == _usage(mac) == {"sign"}
        assert _usage(dek) == {"wrap"}


def test_device_keys_are_sensitive_session_objects_usable_only_to_wrap_and_mac(provisioned):
    hsm, _transport = provisioned
    with hsm.session() as pooled, hsm.diversify("scp03-master", UID_A) as device_keys:
        keys = [_secret(pooled.raw, label="scp03-device:%s:%s" % (UID_A.hex(), name))
                for name in ("enc", "mac", "dek")]
        for key in keys:
            assert not key[Attribute.TOKEN]
            assert key[Attribute.SENSITIVE] and key[Attribute.EXTRACTABLE]
            with pytest.raises(p11e.AttributeSensitive):
                key[Attribute.VALUE]
        assert _usage(keys[0]) == _usage(keys[1]) == {"sign"}
        assert _usage(keys[2]) == {"wrap"}
        assert device_keys.kcvs is not None
    with hsm.session() as pooled:  # released: the objects are gone
        assert list(pooled.raw.get_objects({Attribute.LABEL: "scp03-device:%s:enc"
                                            % UID_A.hex()})) == []


def test_ca_private_keys_are_sign_only_and_never_leave_the_token(hsm):
    hsm.generate_signing_key("issuing-ca")
    with hsm.session() as pooled:
        private = pooled.raw.get_key(object_class=ObjectClass.PRIVATE_KEY, label="issuing-ca")
        assert private[Attribute.TOKEN] and private[Attribute.SENSITIVE]
        assert not private[Attribute.EXTRACTABLE]
        assert private[Attribute.SIGN] and not private[Attribute.DERIVE]
        with pytest.raises(p11e.AttributeSensitive):
            private[Attribute.VALUE]


# python-pkcs11's search iterator raises from __del__ on a dead session (expected noise).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_device_keys_die_with_the_session_that_made_them(provisioned):
    hsm, transport = provisioned
    with hsm.session() as pooled:
        device_keys = hsm.diversify("scp03-master", UID_A)
        pooled.raw.close()
    with pytest.raises(KeyNotFound):
        hsm.put_key_payload(device_keys, transport, 0x31)


def test_the_pin_never_reaches_logs_reprs_or_errors(token, caplog):
    caplog.set_level(logging.DEBUG)
    with open_hsm(URI, environ={"FLEETID_HSM_PIN": USER_PIN}) as hsm:
        hsm.generate_signing_key("ca")
        assert USER_PIN not in repr(hsm)
    with pytest.raises(HsmError) as info:
        open_hsm(URI, environ={"FLEETID_HSM_PIN": "0000-wrong"})
    assert info.value.reason == HsmError.LOGIN
    assert "0000-wrong" not in str(info.value)
    assert USER_PIN not in caplog.text and "0000-wrong" not in caplog.text


def test_an_unknown_token_or_module_is_a_token_error(token):
    with pytest.raises(HsmError) as info:
        open_hsm("pkcs11:module=%s;token=nope;pin-env=P" % SOFTHSM_MODULE, environ={"P": "1"})
    assert info.value.reason == HsmError.TOKEN
    with pytest.raises(HsmError) as info:
        open_hsm("pkcs11:module=/nonexistent/lib.so;token=t;pin-env=P", environ={"P": "1"})
    assert info.value.reason == HsmError.TOKEN


def test_a_second_backend_on_a_logged_in_token_is_refused(hsm):
    with pytest.raises(HsmError) as info:
        open_hsm(URI, environ={"FLEETID_HSM_PIN": USER_PIN})
    assert info.value.reason == HsmError.CONFIG
    hsm.generate_signing_key("still-works")


def test_close_is_idempotent_and_the_token_reopens(token):
    hsm = open_hsm(URI + ";max-sessions=2", environ={"FLEETID_HSM_PIN": USER_PIN})
    hsm.create_master_key("generated-master", bits=128)
    hsm.close()
    hsm.close()
    with pytest.raises(HsmError) as info:
        hsm.diversify("generated-master", UID_A)
    assert info.value.reason == HsmError.CLOSED
    with open_hsm(URI, environ={"FLEETID_HSM_PIN": USER_PIN}) as again:
        with again.diversify("generated-master", UID_A) as device_keys:
            assert len(device_keys.kcvs) == 3
