"""sim/nvm.py: atomic transactions, persistence, corruption detection, power cuts."""

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetid.sim.nvm import Nvm, NvmCorrupt, PowerLoss, decode_image, encode_image


def test_in_memory_commit_get_delete():
    nvm = Nvm(None)
    assert nvm.commit({"a": b"1", "b": b"2"}) == 0
    assert nvm.get("a") == b"1" and nvm["b"] == b"2" and "a" in nvm
    nvm.commit({"a": None, "c": bytearray(b"3")})
    assert nvm.keys() == ["b", "c"]
    assert nvm.get("a", b"default") == b"default"
    assert nvm.write_count == 2


def test_empty_commit_is_not_counted():
    nvm = Nvm(None)
    nvm.commit({})
    with nvm.transaction():
        pass
    assert nvm.write_count == 0


def test_transaction_reads_its_own_writes_and_commits_once():
    nvm = Nvm(None)
    nvm.commit({"x": b"old", "gone": b"1"})
    with nvm.transaction() as tx:
        tx["x"] = b"new"
        del tx["gone"]
        tx["y"] = b"2"
        assert tx.get("x") == b"new" and "gone" not in tx and tx["y"] == b"2"
        assert tx.keys() == ["x", "y"]
        assert nvm.get("x") == b"old"  # nothing visible before the commit
    assert nvm.snapshot() == {"x": b"new", "y": b"2"}
    assert nvm.write_count == 2  # the setup commit and the transaction


def test_transaction_discarded_when_the_block_raises():
    nvm = Nvm(None)
    nvm.commit({"x": b"old"})
    with pytest.raises(RuntimeError):
        with nvm.transaction() as tx:
            tx["x"] = b"new"
            raise RuntimeError("abort")
    assert nvm.snapshot() == {"x": b"old"}


def test_bad_types_are_refused_before_writing():
    nvm = Nvm(None)
    with pytest.raises(TypeError):
        nvm.commit({"x": "text"})
    with pytest.raises(TypeError):
        nvm.commit({1: b"x"})
    with pytest.raises(TypeError):
        with nvm.transaction() as tx:
            tx["x"] = None
    assert nvm.snapshot() == {} and nvm.write_count == 0


def test_file_persistence_and_mode(tmp_path):
    path = tmp_path / "se.nvm"
    nvm = Nvm(path)
    assert not path.exists()
    written = nvm.commit({"secret": b"\x01" * 32, "obj/0": b"hello"})
    assert written == path.stat().st_size
    assert path.stat().st_mode & 0o777 == 0o600
    assert Nvm(path).snapshot() == nvm.snapshot()
    assert not (tmp_path / "se.nvm.tmp").exists()


def test_repr_never_shows_values(tmp_path):
    nvm = Nvm(None)
    nvm.commit({"key/1": b"\xaa" * 32})
    assert "aa" not in repr(nvm).lower() and "\\xaa" not in repr(nvm)


def _corrupt(path, mutate):
    image = bytearray(path.read_bytes())
    path.write_bytes(bytes(mutate(image)))


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda b: b[:-1], "length"),
        (lambda b: b[:10], "truncated header"),
        (lambda b: b"X" + b[1:], "magic"),
        (lambda b: b[:20] + bytes((b[20] ^ 1,)) + b[21:], "digest"),
        (lambda b: b + b"\x00", "length"),
        (lambda b: b"", "truncated header"),
    ],
)
def test_corrupt_file_raises_typed_error(tmp_path, mutate, reason):
    path = tmp_path / "se.nvm"
    Nvm(path).commit({"a": b"1", "b": b"22"})
    _corrupt(path, mutate)
    with pytest.raises(NvmCorrupt) as err:
        Nvm(path)
    assert err.value.reason == reason


def test_intact_digest_over_malformed_records_is_corrupt():
    import hashlib

    body = struct.pack(">H", 1) + b"k" + struct.pack(">I", 99) + b"short"
    image = b"FIDNVM01" + struct.pack(">I", len(body)) + body + hashlib.sha256(body).digest()
    with pytest.raises(NvmCorrupt) as err:
        decode_image(image)
    assert err.value.reason == "record"


@given(st.dictionaries(st.text(min_size=1, max_size=20), st.binary(max_size=64), max_size=8))
@settings(max_examples=100, deadline=None, database=None)
def test_image_round_trip(state):
    assert decode_image(encode_image(state)) == state


@given(st.binary(max_size=200))
@settings(max_examples=200, deadline=None, database=None)
def test_decode_image_never_raises_anything_but_nvmcorrupt(blob):
    try:
        decode_image(blob)
    except NvmCorrupt:
        pass


@pytest.mark.parametrize("file_backed", [False, True])
def test_power_cut_before_the_atomic_point_keeps_the_old_state(tmp_path, file_backed):
    path = tmp_path / "se.nvm" if file_backed else None
    nvm = Nvm(path)
    nvm.commit({"v": b"old"})
    nvm.cut_power_at(1, after_atomic=False)
    with pytest.raises(PowerLoss) as err:
        nvm.commit({"v": b"new", "w": b"2"})
    assert not err.value.applied and err.value.commit_number == 2
    assert nvm.snapshot() == {"v": b"old"}
    if file_backed:
        assert (tmp_path / "se.nvm.tmp").exists()  # the torn temp file...
        assert Nvm(path).snapshot() == {"v": b"old"}  # ...is not state at power-up...
        assert not (tmp_path / "se.nvm.tmp").exists()  # ...and is deleted (key bytes)
    nvm.commit({"v": b"after"})  # the cut fired once; power is back
    assert nvm.get("v") == b"after"


@pytest.mark.parametrize("file_backed", [False, True])
def test_power_cut_after_the_atomic_point_keeps_the_new_state(tmp_path, file_backed):
    path = tmp_path / "se.nvm" if file_backed else None
    nvm = Nvm(path)
    nvm.commit({"v": b"old"})
    nvm.cut_power_at(2, after_atomic=True)
    nvm.commit({"v": b"mid"})
    with pytest.raises(PowerLoss) as err:
        nvm.commit({"v": b"new"})
    assert err.value.applied
    assert nvm.get("v") == b"new"
    if file_backed:
        assert Nvm(path).get("v") == b"new"


def test_disarm_and_argument_checks():
    nvm = Nvm(None)
    nvm.cut_power_at(1)
    nvm.disarm()
    nvm.commit({"a": b"1"})
    with pytest.raises(ValueError):
        nvm.cut_power_at(0)


def test_reload_reads_the_file_again(tmp_path):
    path = tmp_path / "se.nvm"
    a = Nvm(path)
    a.commit({"x": b"1"})
    b = Nvm(path)
    b.commit({"x": b"2"})
    a.reload()
    assert a.get("x") == b"2"
    os.remove(path)
    a.reload()
    assert a.snapshot() == {}
