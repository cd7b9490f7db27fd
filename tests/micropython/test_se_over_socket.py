"""The device side under the real MicroPython interpreter, talking to the emulator.

The emulator runs in this process: a fabbed chip behind a BusEndpoint (zero latency),
served on a Unix socket in tmp by sim/server.py from a thread.  common/ and device/ are
staged as fleetid/common and fleetid/device (the firmware's import names), compiled with
mpy-cross -O3 (as the freeze manifests do), and scripts run under the real interpreter:

* `micropython` at the run_se budget: open the sim socket bus, the T=1' link (IFSD 64),
  ApduProtocol and SeSession; SELECT, info (UID, firmware, life cycle, free slots, the
  ~1.1 KB attestation chain), GENERATE KEY, SIGN, ATTEST, COUNTER increment, data object
  write/read;
* `micropython` at the run_info budget: SeSession.info() in one call, with the attestation
  chain, at the default IFSD 254 and over loopback TCP (the other socket path of bus_sim).

Everything printed is checked on the CPython side: the signature and the attestation
verify with `cryptography`, and every value equals what CPython's SeSession reads from the
same chip afterwards.

Heap (figures printed with pytest -s; budgets and measured minimums in
tests/micropython/budgets.py, measured by bench/micropython.py): only the modules a device
task needs are imported (errors, crc16, clock, t1, t1link, apdu, bus_sim, se), one at a
time with a collection in between.  On the unix port (64-bit) their bytecode lives in the
heap, about 48 KB of it, whereas firmware keeps frozen bytecode in flash.  The ~1.1 KB
chain arrives as one chained T=1' response (17 I-blocks at IFSD 64, 5 at IFSD 254), and the
response, its data without SW and then each certificate are contiguous copies, two alive
at a time.  Both runs pass at about 63-64 KB and are run at 80 KB: a 64 KB budget once
left so little that an interpreter patch release (1.28.0.2) broke run_info.
"""

import hashlib
import os

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from fleetid.common import attestation, t1
from fleetid.device.stack import open_se
from tests.micropython.budgets import heap_for
from tests.micropython.support import PRELUDE as HEX_PRELUDE
from tests.micropython.support import Stage, parse

# The run_se run announces a small IFSD (S(IFS), GPC_SPE_172 4): INF of at most 64 bytes
# per block keeps every frame buffer and bus read small, as a RAM-starved host would.
IFSD = 64

pytestmark = pytest.mark.micropython


PRELUDE = HEX_PRELUDE + r"""
gc.collect()
BASE = gc.mem_alloc()
LOW = [1 << 30]


def heap(label):
    # Free bytes before collecting (what the step left behind), then after.
    before = gc.mem_free()
    gc.collect()
    LOW[0] = min(LOW[0], before)
    print("heap", label, gc.mem_alloc(), gc.mem_free(), before)


# One module at a time, collecting in between: loading a .mpy leaves transient garbage
# that would otherwise pile up into a peak well above what the modules keep.
for name in ("fleetid.common.errors", "fleetid.common.crc16", "fleetid.common.clock",
             "fleetid.common.t1", "fleetid.common.t1link", "fleetid.common.apdu_wire",
             "fleetid.common.apdu",
             "fleetid.device.bus_sim", "fleetid.device.se"):
    __import__(name)
    gc.collect()
from fleetid.common import t1
from fleetid.common.apdu import ApduProtocol
from fleetid.common.t1link import T1Link
from fleetid.device.bus_sim import connect_unix
from fleetid.device.se import SeSession

heap("imports")
"""

SCRIPT = r"""
bus = connect_unix(SOCK, 10000)
link = T1Link(bus, t1.PROFILE_GP, None, IFSD)
link.open()
se = SeSession(ApduProtocol(link))
print("select", se.select())
heap("open")
show("uid", se.uid())
print("firmware", "%d.%d.%d" % tuple(se.firmware_version()), "lc", se.life_cycle(),
      "free", se.free_slots())
for cert in se.attestation_chain():
    show("chain", cert)
heap("info")
point = se.generate_key(2, 1)
show("point", point)
heap("genkey")
show("sig", se.sign(2, unhexlify(DIGEST)))
heap("sign")
show("attest", se.attest(2, unhexlify(NONCE)))
heap("attest")
print("counter", se.counter_increment(0))
se.write_object(1, unhexlify(OBJECT))
show("object", se.read_object(1))
heap("counter+object")
link.close()
bus.close()
print("done", gc.mem_free(), LOW[0], BASE)
"""

INFO_SCRIPT = r"""
from fleetid.device.bus_sim import connect_tcp

bus = connect_tcp("127.0.0.1", TCP_PORT, 10000)
link = T1Link(bus, t1.PROFILE_GP)  # default IFSD 254
link.open()
se = SeSession(ApduProtocol(link))
se.select()
info = se.info()
show("uid", info.uid)
print("info", info.firmware_string(), info.life_cycle_name(), info.free_slots)
for cert in info.attestation_chain:
    show("chain", cert)
info = None
heap("info+chain")
link.close()
bus.close()
print("done", gc.mem_free(), LOW[0], BASE)
"""


def _run(stage, name, header, script):
    heap = heap_for(name)
    out = parse(stage.run(name, header + PRELUDE + script))
    # Heap figures: label -> (allocated after gc, free after gc, free before gc).
    figures = dict((line.split()[0], [int(v) for v in line.split()[1:]]) for line in out["heap"])
    done_free, lowest_before_gc, base = (int(v) for v in out["done"][0].split())
    print("\nMicroPython -X heapsize=%s (%s): %d B allocated before imports, %d B after;"
          " free at end %d B" % (heap, name, base, figures["imports"][0], done_free))
    for label, (alloc, free, before) in figures.items():
        print("  %-15s allocated %6d  free %6d  (free before collect %6d)"
              % (label, alloc, free, before))
    # Every step ends with the heap collected back below the budget; the headroom itself
    # is the budget rule (tests/micropython/budgets.py), not a number asserted here.
    assert min(free for _, free, _ in figures.values()) > 0
    return out


@pytest.fixture
def vendor_dir(tmp_path):
    return str(tmp_path / "vendor")


def test_se_session_under_micropython_over_the_emulator_socket(tmp_path, vendor_dir):
    stage = Stage(tmp_path / "mp", opt=3)

    from fleetid.sim import profiles
    from fleetid.sim.chip import Chip
    from fleetid.sim.endpoint import BusEndpoint
    from fleetid.sim.fab import fab_chip
    from fleetid.sim.nvm import Nvm
    from fleetid.sim.server import serve_in_thread

    nvm_path = str(tmp_path / "chip.nvm")
    record = fab_chip(vendor_dir, nvm_path)
    endpoint = BusEndpoint(Chip(Nvm(nvm_path)), profile=t1.PROFILE_GP,
                           latency=profiles.get("none"))
    sock = str(tmp_path / "se.sock")

    digest = hashlib.sha256(b"fleetid on micropython").digest()
    nonce = os.urandom(24)
    obj = b"rotation-journal-v1:" + bytes(range(40))
    header = "SOCK = %r\nDIGEST = %r\nNONCE = %r\nOBJECT = %r\nIFSD = %d\n" % (
        sock, digest.hex(), nonce.hex(), obj.hex(), IFSD)

    server = serve_in_thread(endpoint, "unix:" + sock, idle_timeout_s=30)
    tcp_server = serve_in_thread(endpoint, "tcp:127.0.0.1:0", idle_timeout_s=30)
    try:
        out = _run(stage, "run_se", header, SCRIPT)
        tcp_port = int(tcp_server.bus_uri.rsplit(":", 1)[1])
        full = _run(stage, "run_info", header + "TCP_PORT = %d\n" % tcp_port, INFO_SCRIPT)

        # What CPython's session reads from the same chip after the MicroPython runs.
        with open_se(server.bus_uri) as opened:
            se = opened.se
            cpython_info = se.info()
            policy, cpython_point = se.public_key(2)
            cpython_counter = se.counter_read(0)
            cpython_object = se.read_object(1)
    finally:
        tcp_server.stop()
        server.stop()

    assert out["select"] == ["256"]
    assert out["uid"] == [record.se_uid.hex()] == [cpython_info.uid.hex()]
    assert out["firmware"] == ["1.0.0 lc 1 free 15"]
    assert out["chain"] == [c.hex() for c in record.chain_der]
    assert full["uid"] == out["uid"]
    assert full["info"] == ["1.0.0 OP_READY 14"]  # slot 2 now holds a key
    assert full["chain"] == [c.hex() for c in record.chain_der]
    assert cpython_info.attestation_chain == record.chain_der

    point = bytes.fromhex(out["point"][0])
    assert point == cpython_point and policy & 0x01
    public_key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    public_key.verify(bytes.fromhex(out["sig"][0]), digest, ec.ECDSA(Prehashed(hashes.SHA256())))

    signed = attestation.decode_signed_attestation(bytes.fromhex(out["attest"][0]))
    st = signed.statement
    assert (st.se_uid, st.slot, st.public_point, st.nonce) == (record.se_uid, 2, point, nonce)
    mak = x509.load_der_x509_certificate(record.chain_der[0]).public_key()
    mak.verify(signed.signature_der, st.statement_der, ec.ECDSA(hashes.SHA256()))

    assert out["counter"] == [str(cpython_counter)] == ["1"]
    assert out["object"] == [obj.hex()] == [cpython_object.hex()]

