"""The compact revocation set under the real MicroPython interpreter.

run_revset_lookup (codec only): a set for 10^6 devices with 1 % revoked (about 10 KB),
made by CPython's encoder, is parsed and queried in place by common/revset.py: the
answers for revoked serials, their neighbours and random serials equal CPython's.  The
script prints the mean lookup time (bench/revocation.py reports it per size).
run_revset_merge: a delta (100 more revocations) merges into exactly the bytes CPython's
encoder makes, streamed into the destination file in 256-byte chunks
(common/revset_merge.py): the new set is never held beside the old one.

run_revset (device workflow, against the emulator over its Unix socket): the cache
(device/revset_cache.py) refreshes from a cloud-made set, verifies it through the SE with
the revocation signer's point, refuses a revoked device, keeps an unrevoked one, applies
a delta, refuses a flipped signature and an older set; CPython then reads the mark in the
SE.

Heap: both run at their budgets in tests/micropython/budgets.py (the minimum
bench/micropython.py bisected, plus 25 %).  The set is held once as bytes; a lookup
decodes at most `stride` codes in place; a streamed delta merge holds the old set and a
256-byte chunk.
"""

import random
import struct

import pytest

from fleetid.common import revset
from fleetid.common import se_consts as C
from fleetid.common import t1
from fleetid.common.apdu import ApduProtocol
from fleetid.common.t1link import T1Link
from fleetid.device.bus import open_bus
from fleetid.device.se import SeSession
from tests.cloud.cloud_support import Fleet
from tests.cloud.revset_support import revset_publisher, revocation_signer
from tests.micropython.support import PRELUDE, Stage, open_se_script, parse

pytestmark = pytest.mark.micropython

FLEET = bytes(range(8))
SIG = bytes.fromhex("3006020101020101")

LOOKUP = PRELUDE + r"""
import os
import struct
import time
from fleetid.common import revset
gc.collect()


def load(path):
    # One buffer of the file's size (readinto): no growing read buffer beside the set.
    buf = bytearray(os.stat(path)[6])
    f = open(path, "rb")
    try:
        f.readinto(buf)
    finally:
        f.close()
    return buf


info = revset.parse(load(SET))
queries = load(QUERIES)  # u32 big-endian serials
count = len(queries) // 4
gc.collect()
base_free = gc.mem_free()
hits = 0
t0 = time.ticks_us()
for i in range(count):
    if info.contains(struct.unpack_from(">I", queries, 4 * i)[0]):
        hits += 1
elapsed = time.ticks_diff(time.ticks_us(), t0)
print("hits", hits)
print("lookup_us", elapsed // count)
print("lookup_heap", base_free - gc.mem_free())
sys.stdout.write("answers ")
for i in range(count):
    sys.stdout.write("1" if info.contains(struct.unpack_from(">I", queries, 4 * i)[0])
                     else "0")
sys.stdout.write("\n")
print("free", gc.mem_free())
"""

MERGE = PRELUDE + r"""
import hashlib
import os
from fleetid.common import revset
gc.collect()
from fleetid.common import revset_merge
gc.collect()


def load(path):
    buf = bytearray(os.stat(path)[6])
    f = open(path, "rb")
    try:
        f.readinto(buf)
    finally:
        f.close()
    return buf


info = revset.parse(load(SET))
delta = revset.RevDelta(load(DELTA))
gc.collect()
# Streamed into the destination file (and hashed on the way): the new set is never held
# beside the old one.
digest = hashlib.sha256()
out = open(MERGED, "wb")


def write(chunk):
    digest.update(chunk)
    out.write(chunk)


try:
    size = revset_merge.write_delta_merge(info, delta, write)
finally:
    out.close()
info = None
gc.collect()
print("merged", size, hexlify(digest.digest()).decode())
print("free", gc.mem_free())
"""


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    """One staged core for both workflows (compiling it is most of the set-up time)."""
    return Stage(tmp_path_factory.mktemp("mprevsetstage") / "mp", opt=3)


@pytest.fixture(scope="module")
def lookup_setup(tmp_path_factory, stage):
    folder = tmp_path_factory.mktemp("mprevset")
    rng = random.Random(7)
    n = 10**6
    revoked = sorted(rng.sample(range(1, n + 1), n // 100))
    base = revset.sign_part(revset.encode(FLEET, 1, 0, 100, n, revoked), SIG)
    members = set(revoked)
    extra = set()
    while len(extra) < 100:
        s = rng.randint(1, n)
        if s not in members:
            extra.add(s)
    extra = sorted(extra)
    new_serials = sorted(revoked + extra)
    new = revset.sign_part(revset.encode(FLEET, 2, 0, 100, n, new_serials), SIG)
    (folder / "set.frs").write_bytes(base)
    (folder / "delta.frd").write_bytes(revset.encode_delta(1, new, extra))
    queries = revoked[::50] + [s + 1 for s in revoked[::50]] + [rng.randint(1, n)
                                                                  for _ in range(200)]
    (folder / "queries.bin").write_bytes(b"".join(struct.pack(">I", q) for q in queries))
    header = "SET = %r\nDELTA = %r\nQUERIES = %r\nMERGED = %r\n" % (
        str(folder / "set.frs"), str(folder / "delta.frd"), str(folder / "queries.bin"),
        str(folder / "merged.frs"))
    return stage, header, set(revoked), queries, new, folder


def test_revset_lookups_under_micropython(lookup_setup):
    stage, header, revoked, queries, new, _ = lookup_setup
    out = parse(stage.run("run_revset_lookup", header + LOOKUP))
    assert out["answers"] == ["".join("1" if s in revoked else "0" for s in queries)]
    assert int(out["lookup_us"][0]) > 0


def test_revset_delta_merge_under_micropython_gives_the_clouds_bytes(lookup_setup):
    import hashlib

    stage, header, revoked, queries, new, folder = lookup_setup
    merged = folder / "merged.frs"
    if merged.exists():
        merged.unlink()
    out = parse(stage.run("run_revset_merge", header + MERGE))
    assert out["merged"] == ["%d %s" % (len(new), hashlib.sha256(new).hexdigest())]
    assert merged.read_bytes() == new


DEVICE = PRELUDE + open_se_script("fleetid.common.revset", "fleetid.device.revset_cache") + r"""
from fleetid.device import revset_cache


class Store:
    def __init__(self, path):
        self.path = path

    def load(self):
        try:
            f = open(self.path, "rb")
        except OSError:
            return None
        try:
            return f.read()
        finally:
            f.close()

    def store(self, data):
        f = open(self.path, "wb")
        try:
            f.write(data)
        finally:
            f.close()


def reader(path):
    return lambda: Store(path).load()


cache = revset_cache.RevsetCache(se, Store(STORE), unhexlify(POINT), unhexlify(FLEETID))
print("refresh", cache.refresh(reader(FIRST), NOW))
gc.collect()
try:
    cache.check_device(REVOKED, None, NOW)
    print("check revoked none")
except revset_cache.RevokedError as exc:
    print("check revoked", exc.reason)
print("check kept", cache.check_device(KEPT, None, NOW))
print("delta", cache.apply_delta(reader(DELTA), NOW))
try:
    cache.check_device(LATER, None, NOW)
    print("check later none")
except revset_cache.RevokedError as exc:
    print("check later", exc.reason)
for path in (FLIPPED, FIRST):
    try:
        print("again", cache.refresh(reader(path), NOW))
    except revset_cache.RevsetCacheError as exc:
        print("refused", exc.reason)
    gc.collect()
status = cache.status(NOW)
print("status", status["number"], status["state"], status["revoked"], status["high_water"])
link.close()
bus.close()
print("free", gc.mem_free())
"""


@pytest.fixture(scope="module")
def device_setup(tmp_path_factory, stage):
    from fleetid.sim import profiles
    from fleetid.sim.chip import Chip
    from fleetid.sim.endpoint import BusEndpoint
    from fleetid.sim.fab import fab_chip
    from fleetid.sim.nvm import Nvm
    from fleetid.sim.server import serve_in_thread

    folder = tmp_path_factory.mktemp("mprevsetdev")
    fleet = Fleet(folder / "fleet")
    devices = [fleet.provision("b42") for _ in range(3)]
    for d in devices[:1]:
        fleet.registry.mark_revoked(d.identity_cert.serial_number, "keyCompromise",
                                    issuer=d.identity_cert.issuer.rfc4514_string())
    publisher = revset_publisher(fleet)
    first = publisher.current()
    fleet.registry.mark_revoked(devices[2].identity_cert.serial_number, "keyCompromise",
                                issuer=devices[2].identity_cert.issuer.rfc4514_string())
    publisher.invalidate()
    fleet.clock.advance(seconds=2)
    second = publisher.current()
    delta = publisher.delta(revset.parse(first).number)
    flipped = bytearray(second)
    flipped[-12] ^= 0x01
    for name, data in (("first.frs", first), ("delta.frd", delta),
                       ("flipped.frs", bytes(flipped))):
        (folder / name).write_bytes(data)
    signer = revocation_signer(fleet)
    nvm_path = str(folder / "chip.nvm")
    fab_chip(str(folder / "vendor"), nvm_path)
    chip = Chip(Nvm(nvm_path))
    sock = str(folder / "se.sock")
    server = serve_in_thread(BusEndpoint(chip, profile=t1.PROFILE_GP,
                                         latency=profiles.get("none")), "unix:" + sock,
                             idle_timeout_s=30)
    now = revset.parse(second).this_update + 60
    header = ("SOCK = %r\nFIRST = %r\nDELTA = %r\nFLIPPED = %r\nSTORE = %r\nPOINT = %r\n"
              "FLEETID = %r\nNOW = %d\nREVOKED = %d\nKEPT = %d\nLATER = %d\n") % (
        sock, str(folder / "first.frs"), str(folder / "delta.frd"),
        str(folder / "flipped.frs"), str(folder / "cache.frs"), signer.point.hex(),
        signer.fleet_id.hex(), now, devices[0].serial, devices[1].serial, devices[2].serial)
    try:
        yield stage, header, server, revset.parse(second).number
    finally:
        server.stop()
        fleet.close()


def test_offline_device_cache_under_micropython_over_the_emulator_socket(device_setup):
    stage, header, server, number = device_setup
    out = parse(stage.run("run_revset", header + DEVICE))
    assert out["refresh"] == ["updated"]
    assert out["check"] == ["revoked revoked", "kept None", "later revoked"]
    assert out["delta"] == ["updated"]
    assert out["refused"] == ["signature"]
    assert out["again"] == ["older than cached, kept cached"]  # the newer one stays
    assert out["status"] == ["%d fresh 2 %d" % (number, number)]
    bus = open_bus(server.bus_uri)
    link = T1Link(bus, profile=t1.PROFILE_GP)
    try:
        link.open()
        se = SeSession(ApduProtocol(link))
        se.select()
        record = se.read_object(C.DATA_OBJECT_REVSET_NUMBER)
        assert struct.unpack(">Q", record[9:])[0] == number
    finally:
        link.close()
        bus.close()
