"""The compact revocation set under the real MicroPython interpreter.

run_revset_lookup (codec only): a set for 10^6 devices with 1 % revoked (about 10 KB),
made by CPython's encoder, is parsed and queried in place by common/revset.py: the
answers for revoked serials, their neighbours and random serials equal CPython's.  The
script prints the mean lookup time (bench/revocation.py reports it per size).
run_revset_merge (the device's merge, against the emulator over its Unix socket): the
cache (device/revset_cache.py) holds a set for 10^6 devices with 4 % revoked (31 KB) in a
FileStore; a delta whose new signature is flipped is refused and the old set still
answers; the good delta (100 more revocations) is streamed into a staged file beside
the store's in 256-byte chunks (common/revset_merge.py), read back once the old set has
left the heap, verified through the SE and committed: the store then holds exactly the
bytes CPython's encoder made.  At its budget the old merge (the new set built beside the old
one) runs out of heap.

run_revset (device workflow, against the emulator over its Unix socket): the cache
(device/revset_cache.py) refreshes from a cloud-made set, verifies it through the SE with
the revocation signer's point, refuses a revoked device, keeps an unrevoked one, applies
a delta, refuses a flipped signature and an older set; CPython then reads the mark in the
SE.

Heap: each runs at its budget in tests/micropython/budgets.py (the minimum
bench/micropython.py bisected, plus 25 %).  The set is held once as bytes; a lookup
decodes at most `stride` codes in place; the cache's delta merge holds the old set and a
256-byte chunk, then the new set alone.
"""

import random
import struct

import pytest

from fleetid.common import revset, revset_merge
from fleetid.common import se_consts as C
from fleetid.common import t1
from fleetid.common.apdu import ApduProtocol
from fleetid.common.t1link import T1Link
from fleetid.device.bus import open_bus
from fleetid.device.se import SeSession
from tests.cloud.cloud_support import Fleet
from tests.cloud.revset_support import revset_publisher, revocation_signer
from tests.micropython.support import PRELUDE, Stage, open_se_script, parse, serve_chip

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

@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    """One staged core for every workflow (compiling it is most of the set-up time)."""
    return Stage(tmp_path_factory.mktemp("mprevsetstage") / "mp", opt=3)


@pytest.fixture(scope="module")
def lookup_setup(tmp_path_factory, stage):
    folder = tmp_path_factory.mktemp("mprevset")
    rng = random.Random(7)
    n = 10**6
    revoked = sorted(rng.sample(range(1, n + 1), n // 100))
    base = revset.sign_part(revset_merge.encode(FLEET, 1, 0, 100, n, revoked), SIG)
    (folder / "set.frs").write_bytes(base)
    queries = revoked[::50] + [s + 1 for s in revoked[::50]] + [rng.randint(1, n)
                                                                  for _ in range(200)]
    (folder / "queries.bin").write_bytes(b"".join(struct.pack(">I", q) for q in queries))
    header = "SET = %r\nQUERIES = %r\n" % (str(folder / "set.frs"),
                                           str(folder / "queries.bin"))
    return stage, header, set(revoked), queries


def test_revset_lookups_under_micropython(lookup_setup):
    stage, header, revoked, queries = lookup_setup
    out = parse(stage.run("run_revset_lookup", header + LOOKUP))
    assert out["answers"] == ["".join("1" if s in revoked else "0" for s in queries)]
    assert int(out["lookup_us"][0]) > 0


MERGE = PRELUDE + open_se_script("fleetid.common.revset", "fleetid.common.revset_merge",
                                 "fleetid.device.anchored_store",
                                 "fleetid.device.revset_cache") + r"""
import os
from fleetid.device import revset_cache


def reader(path):
    # The whole file as bytes, in one buffer of its size (as a fetch hands it over).
    def fetch():
        f = open(path, "rb")
        try:
            return f.read(os.stat(path)[6])
        finally:
            f.close()
    return fetch


def checks():
    for serial in (REVOKED, LATER):
        try:
            cache.check_device(serial, None, NOW)
            print("check", serial, "none")
        except revset_cache.RevokedError as exc:
            print("check", serial, exc.number)


cache = revset_cache.RevsetCache(se, revset_cache.FileStore(STORE), unhexlify(POINT),
                                 unhexlify(FLEETID))
print("refresh", cache.refresh(reader(FIRST), NOW))
gc.collect()
for path in (FLIPPED, DELTA):
    try:
        print("delta", cache.apply_delta(reader(path), NOW))
    except revset_cache.RevsetCacheError as exc:
        print("refused", exc.reason)
    gc.collect()
    checks()
print("status", cache.status(NOW)["number"], cache.status(NOW)["bytes"])
link.close()
bus.close()
print("free", gc.mem_free())
"""

# The merge workflow's set: 10^6 devices, 4 % revoked (about 31 KB), and a delta of 100
# more.  Big enough that the new set beside the old one (the merge before it was
# streamed into the store) does not fit the budget the streamed merge runs at.
MERGE_REVOKED = 40000


def _serve_se(folder):
    """A fresh emulated SE on a Unix socket in `folder`: (server, socket path)."""
    from fleetid.sim.chip import Chip
    from fleetid.sim.fab import fab_chip
    from fleetid.sim.nvm import Nvm

    nvm_path = str(folder / "chip.nvm")
    fab_chip(str(folder / "vendor"), nvm_path)
    chip = Chip(Nvm(nvm_path))
    server, sock = serve_chip(chip, folder)
    return server, sock


@pytest.fixture(scope="module")
def merge_setup(tmp_path_factory, stage):
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    from tests.device.crl_support import point_of

    folder = tmp_path_factory.mktemp("mprevsetmerge")
    key = ec.generate_private_key(ec.SECP256R1())

    def sign(signed):
        return revset.sign_part(signed, key.sign(signed, ec.ECDSA(hashes.SHA256())))

    rng = random.Random(11)
    n = 10**6
    revoked = sorted(rng.sample(range(1, n + 1), MERGE_REVOKED))
    members = set(revoked)
    extra = set()
    while len(extra) < 100:
        s = rng.randint(1, n)
        if s not in members:
            extra.add(s)
    extra = sorted(extra)
    this_update = 1_700_000_000
    first = sign(revset_merge.encode(FLEET, 1, this_update, this_update + 86400, n,
                                     revoked))
    second = sign(revset_merge.encode(FLEET, 2, this_update + 1, this_update + 86401, n,
                                      sorted(revoked + extra)))
    delta = revset.encode_delta(1, second, extra)
    flipped = bytearray(delta)
    flipped[-12] ^= 0x01  # inside the new set's signature
    for name, data in (("first.frs", first), ("delta.frd", delta),
                       ("flipped.frd", bytes(flipped))):
        (folder / name).write_bytes(data)
    server, sock = _serve_se(folder)
    header = ("SOCK = %r\nFIRST = %r\nDELTA = %r\nFLIPPED = %r\nSTORE = %r\nPOINT = %r\n"
              "FLEETID = %r\nNOW = %d\nREVOKED = %d\nLATER = %d\n") % (
        sock, str(folder / "first.frs"), str(folder / "delta.frd"),
        str(folder / "flipped.frd"), str(folder / "cache.frs"),
        point_of(key.public_key()).hex(), FLEET.hex(), this_update + 60, revoked[len(revoked) // 2],
        extra[-1])
    try:
        yield stage, header, folder, revoked[len(revoked) // 2], extra[-1], second
    finally:
        server.stop()


def test_revset_delta_merge_through_the_device_cache_under_micropython(merge_setup):
    # The device's own path (RevsetCache.apply_delta): a refused delta (its new signature
    # flipped) leaves the old set answering; the good one gives the cloud's exact bytes
    # in the store, and the lookups answer from the new set.
    stage, header, folder, revoked, later, second = merge_setup
    out = parse(stage.run("run_revset_merge", header + MERGE))
    assert out["refresh"] == ["updated"]
    assert out["refused"] == ["signature"]
    assert out["delta"] == ["updated"]
    assert out["check"] == ["%d 1" % revoked, "%d none" % later,
                            "%d 2" % revoked, "%d 2" % later]
    assert out["status"] == ["2 %d" % len(second)]
    assert (folder / "cache.frs").read_bytes() == second


DEVICE = PRELUDE + open_se_script("fleetid.common.revset", "fleetid.common.revset_merge",
                                  "fleetid.device.revset_cache") + r"""
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
    server, sock = _serve_se(folder)
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
