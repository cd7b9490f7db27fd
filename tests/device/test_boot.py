"""Signed boot (device/boot.py) with images signed by MCUboot's own `imgtool sign`,
checked against an emulated SE that holds the firmware-signing key: good images pass,
every kind of bad image is refused with its own reason, the counter only moves on
confirm, and a power cut around confirm leaves it consistent."""

import hashlib
import io
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetid.common import der
from fleetid.common import se_consts as C
from fleetid.device.boot import BootError
from fleetid.device import boot
from fleetid.sim.nvm import PowerLoss
from tests.device.boot_support import (
    ImgtoolKeys,
    join_image,
    provisioned_se,
    sign_image,
    split_image,
)

PAYLOAD = bytes(range(256)) * 12 + b"fleetid application"


class _Images:
    pass


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Every image the tests need, each made once by the real imgtool."""
    folder = tmp_path_factory.mktemp("images")
    keys = ImgtoolKeys(folder)
    im = _Images()
    im.keys = keys
    im.good = sign_image(folder, keys.a, PAYLOAD, "good", "1.2.3+4", 5)
    im.newer = sign_image(folder, keys.a, PAYLOAD + b"v2", "newer", "1.3.0", 7)
    im.older = sign_image(folder, keys.a, PAYLOAD[:-1], "older", "1.1.0", 3)
    im.other_key = sign_image(folder, keys.b, PAYLOAD, "other", "1.2.3+4", 5)
    im.unsigned = sign_image(folder, None, PAYLOAD, "unsigned", "1.2.3+4", 5)
    im.no_counter = sign_image(folder, keys.a, PAYLOAD, "nocnt", "1.2.3+4", None)
    im.full_key = sign_image(folder, keys.a, PAYLOAD, "full", "1.2.3+4", 5,
                             ["--public-key-format", "full"])
    im.large = sign_image(folder, keys.a, os.urandom(200 * 1024), "large", "2.0.0", 9)
    return im


@pytest.fixture
def se(vendor_dir, tmp_path, images):
    session, chip, _ = provisioned_se(vendor_dir, tmp_path, images.keys.a_point)
    session.chip = chip
    return session


def _refused(se, image, reason, **kwargs):
    with pytest.raises(BootError) as info:
        boot.check_image(se, image, **kwargs)
    assert info.value.reason == reason, info.value
    checks = info.value.report.checks
    assert checks[-1][1] == boot.VERDICT_REFUSED
    assert all(verdict == boot.VERDICT_OK for _, verdict, _ in checks[:-1])
    return info.value


def test_spki_prefix_is_the_der_of_a_p256_public_key(images):
    assert (boot._SPKI_P256_PREFIX + images.keys.a_point
            == der.encode_p256_spki(images.keys.a_point))


def test_imgtool_signed_image_passes_every_check(se, images):
    report = boot.check_image(se, images.good, max_size=0x10000, now=1234)
    assert report.ok
    assert [name for name, _, _ in report.checks] == [
        "header", "size", "tlv", "hash", "key", "signature", "security_counter"]
    assert all(verdict == "ok" for _, verdict, _ in report.checks)
    assert report.version == (1, 2, 3, 4) and report.version_string() == "1.2.3+4"
    assert report.security_counter == 5 and report.se_counter == 0
    assert report.checked_at == 1234
    signed_part, tlvs = split_image(images.good)
    assert report.image_hash == hashlib.sha256(signed_part).digest() == dict(tlvs)[0x10]
    assert report.hdr_size == 0x200 and report.img_size == len(PAYLOAD)
    assert report.total_size == len(images.good)


def test_image_streams_from_file_objects_and_read_only_readers(se, images, tmp_path):
    path = tmp_path / "slot.bin"
    path.write_bytes(images.large + b"\xff" * 4096)  # erased flash after the image
    with open(path, "rb") as f:
        assert boot.check_image(se, f, max_size=0x40000).ok

    class ReadOnly:  # read(n) only, returning short reads
        def __init__(self, data):
            self.data = io.BytesIO(data)

        def read(self, n):
            return self.data.read(min(n, 100))

    assert boot.check_image(se, ReadOnly(images.good)).security_counter == 5


def test_public_key_format_full_is_accepted(se, images):
    assert boot.check_image(se, images.full_key).ok


def test_tampered_payload_is_refused_as_hash(se, images):
    image = bytearray(images.good)
    image[0x200 + 100] ^= 0x01
    _refused(se, bytes(image), boot.REASON_HASH)


def test_tampered_security_counter_is_refused_as_hash(se, images):
    # The protected SEC_CNT is covered by the hash: raising it breaks the image.
    image = bytearray(images.older)
    hdr_size, prot_size, img_size = struct.unpack_from("<HHI", image, 8)
    pos = hdr_size + img_size + 8  # protected info (4) + TLV header (4)
    image[pos] = 9
    _refused(se, bytes(image), boot.REASON_HASH)


def test_unsigned_image_is_refused(se, images):
    _refused(se, images.unsigned, boot.REASON_UNSIGNED)


def test_image_signed_with_another_key_is_refused_as_key_mismatch(se, images):
    _refused(se, images.other_key, boot.REASON_KEY)


def test_forged_keyhash_with_another_keys_signature_is_refused_by_the_se(se, images):
    # The other key's signature over the same digest, under our key's KEYHASH: only the
    # SE's VERIFY can catch it.
    signed_part, good_tlvs = split_image(images.good)
    other_part, other_tlvs = split_image(images.other_key)
    assert other_part == signed_part
    forged = [(t, dict(other_tlvs)[0x22] if t == 0x22 else v) for t, v in good_tlvs]
    _refused(se, join_image(signed_part, forged), boot.REASON_SIGNATURE)


def test_malformed_signature_is_refused(se, images):
    signed_part, tlvs = split_image(images.good)
    bad = [(t, b"\x30\x06\x02\x01\x00\x02\x01\x01" if t == 0x22 else v) for t, v in tlvs]
    _refused(se, join_image(signed_part, bad), boot.REASON_SIGNATURE)


@pytest.mark.parametrize("cut", [0, 10, 31, 32, 0x200, 0x200 + 500, -151, -40, -1])
def test_truncated_image_is_refused(se, images, cut):
    image = images.good[:cut] if cut >= 0 else images.good[:cut]
    _refused(se, image, boot.REASON_TRUNCATED)


class _Stream(io.BytesIO):
    """A reader that cannot tell its length (a pipe, a flash reader without seek), counting
    the bytes read."""

    total = 0

    def readinto(self, b):
        n = super().readinto(b)
        self.total += n
        return n

    def tell(self):
        raise io.UnsupportedOperation("not seekable")


def test_oversized_image_is_refused_before_its_payload_is_read(se, images):
    reader = _Stream(images.large)
    error = _refused(se, reader, boot.REASON_OVERSIZED, max_size=128 * 1024)
    assert reader.total == 32  # the header only
    assert "slot" in error.detail
    # An image that fits only without its TLVs is refused when the TLV area is read.
    signed_len = len(split_image(images.good)[0])
    _refused(se, _Stream(images.good), boot.REASON_OVERSIZED, max_size=signed_len + 8)
    assert boot.check_image(se, images.good, max_size=len(images.good)).ok


def test_a_file_longer_than_the_slot_is_refused_even_when_its_image_fits(se, images,
                                                                        tmp_path):
    slot = len(images.good) + 100
    path = tmp_path / "padded.bin"
    path.write_bytes(images.good + b"\xff" * 101)  # the image fits; the file does not
    with open(path, "rb") as reader:
        error = _refused(se, reader, boot.REASON_OVERSIZED, max_size=slot)
        assert reader.tell() == 0  # refused before anything was read
    assert error.detail == "file %d B > slot %d B" % (slot + 1, slot)
    assert error.report.file_size == slot + 1
    _refused(se, images.good + b"\xff" * 101, boot.REASON_OVERSIZED, max_size=slot)
    # Trailing bytes inside the slot (erased flash after the image) are allowed.
    path.write_bytes(images.good + b"\xff" * 100)
    with open(path, "rb") as reader:
        assert boot.check_image(se, reader, max_size=slot).file_size == slot


def test_rollback_is_refused_and_the_counter_moves_only_on_confirm(se, images):
    first = boot.check_image(se, images.good)
    assert se.counter_read(C.COUNTER_FIRMWARE) == 0  # checking never writes
    assert boot.check_image(se, images.older).ok  # 3 >= 0: still allowed
    assert boot.confirm_boot(se, first) == 5
    assert boot.confirm_boot(se, first) == 5  # idempotent
    error = _refused(se, images.older, boot.REASON_ROLLBACK)
    assert error.report.security_counter == 3 and error.report.se_counter == 5
    assert boot.check_image(se, images.good).ok  # the same counter still boots
    newer = boot.check_image(se, images.newer)
    assert boot.confirm_boot(se, newer) == 7
    # Confirming an older report after a newer one never lowers the counter.
    assert boot.confirm_boot(se, first) == 7
    _refused(se, images.good, boot.REASON_ROLLBACK)


def test_confirm_refuses_a_report_that_did_not_pass(se, images):
    error = _refused(se, images.other_key, boot.REASON_KEY)
    with pytest.raises(BootError) as info:
        boot.confirm_boot(se, error.report)
    assert info.value.reason == boot.REASON_NOT_CHECKED
    assert se.counter_read(C.COUNTER_FIRMWARE) == 0


def test_missing_security_counter_is_refused(se, images):
    _refused(se, images.no_counter, boot.REASON_NO_COUNTER)


def test_se_without_a_firmware_key_refuses_every_image(vendor_dir, tmp_path, images):
    bare, _, _ = provisioned_se(vendor_dir, tmp_path, None, name="bare")
    _refused(bare, images.good, boot.REASON_NO_TRUST_ANCHOR)


def test_wrong_magic_and_bad_flags_are_refused(se, images):
    image = bytearray(images.good)
    image[0] ^= 0xFF
    _refused(se, bytes(image), boot.REASON_MAGIC)
    image = bytearray(images.good)
    struct.pack_into("<I", image, 16, 0x10)  # NON_BOOTABLE
    _refused(se, bytes(image), boot.REASON_FLAGS)


def test_counter_tlv_outside_the_protected_area_is_refused(se, images):
    signed_part, tlvs = split_image(images.no_counter)
    _refused(se, join_image(signed_part, tlvs + [(0x50, b"\x63\x00\x00\x00")]), boot.REASON_TLV)


def test_duplicated_tlv_is_refused(se, images):
    signed_part, tlvs = split_image(images.good)
    _refused(se, join_image(signed_part, tlvs + [tlvs[0]]), boot.REASON_TLV)


@pytest.mark.parametrize("after_atomic", [False, True])
def test_power_cut_during_confirm_leaves_the_counter_consistent(se, images, after_atomic):
    report = boot.check_image(se, images.good)
    se.chip.nvm.cut_power_at(1, after_atomic=after_atomic)
    with pytest.raises(PowerLoss):
        boot.confirm_boot(se, report)
    se.chip.power_loss()
    se.select()
    assert se.counter_read(C.COUNTER_FIRMWARE) == (5 if after_atomic else 0)
    # After the restart, the same image checks again and confirm completes.
    again = boot.check_image(se, images.good)
    assert boot.confirm_boot(se, again) == 5
    assert se.counter_read(C.COUNTER_FIRMWARE) == 5


def test_power_cut_between_check_and_confirm_keeps_the_old_counter(se, images):
    boot.check_image(se, images.newer)  # checked, then power lost before confirm
    se.chip.power_loss()
    se.select()
    assert se.counter_read(C.COUNTER_FIRMWARE) == 0
    assert boot.check_image(se, images.older).ok  # the previous image still boots


@settings(max_examples=300, deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_parser_fuzz_gives_a_report_or_a_boot_error(se, images, data):
    base = data.draw(st.sampled_from([images.good, images.unsigned, images.no_counter]))
    image = bytearray(base)
    for _ in range(data.draw(st.integers(0, 4))):
        pos = data.draw(st.integers(0, len(image) - 1))
        image[pos] = data.draw(st.integers(0, 255))
    image = bytes(image[: data.draw(st.integers(0, len(image)))])
    if data.draw(st.booleans()):
        image = data.draw(st.binary(max_size=300))
    try:
        report = boot.check_image(se, image)
    except BootError as exc:
        assert exc.reason in (
            boot.REASON_TRUNCATED, boot.REASON_OVERSIZED, boot.REASON_MAGIC,
            boot.REASON_HEADER, boot.REASON_FLAGS, boot.REASON_TLV, boot.REASON_HASH,
            boot.REASON_UNSIGNED, boot.REASON_KEY, boot.REASON_SIGNATURE,
            boot.REASON_NO_COUNTER, boot.REASON_ROLLBACK)
    else:
        assert report.ok and report.image_hash == hashlib.sha256(
            split_image(image)[0]).digest()


@settings(max_examples=40, deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(steps=st.lists(st.tuples(st.sampled_from(["older", "good", "newer", "large"]),
                                st.booleans()), max_size=8))
def test_any_boot_sequence_keeps_the_counter_at_the_highest_confirmed(se, images, steps):
    # Model: an image boots iff its SEC_CNT >= the highest confirmed so far; confirming
    # never lowers the counter; nothing but confirm moves it.
    se.chip.nvm.commit({"ctr/%d" % C.COUNTER_FIRMWARE: None})  # TEST-ONLY reset
    counters = {"older": 3, "good": 5, "newer": 7, "large": 9}
    highest = 0
    for name, confirm in steps:
        try:
            report = boot.check_image(se, getattr(images, name), max_size=0x40000)
        except BootError as exc:
            assert exc.reason == boot.REASON_ROLLBACK and counters[name] < highest
            continue
        assert counters[name] >= highest
        if confirm:
            highest = max(highest, counters[name])
            assert boot.confirm_boot(se, report) == highest
        assert se.counter_read(C.COUNTER_FIRMWARE) == highest
