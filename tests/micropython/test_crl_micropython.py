"""The CRL cache (device/crl_cache.py) under the real MicroPython interpreter, against the
emulator over its Unix socket: a CRL made by the cloud publisher (cloud/revocation) is
fetched from a file, parsed with common/der.py, verified through the SE with the issuing
CA's point, stored (FileStore) with its number as the SE's high-water mark; a revoked
serial is found, an unrevoked one is not; a CRL with a flipped signature bit and an older
one are refused with their reasons.  CPython then reads the mark the run left in the SE.

Heap: the script runs at its budget from tests/micropython/budgets.py ("run_crl": the
minimum bench/micropython.py bisected, plus 25 %).  On the unix port imported bytecode
lives in the heap: after collection the SE session's modules hold about 51 KB,
common/der.py about 24 KB (its writer and CSR builder included; a reader-only split would
hold about 12 KB) and device/crl_cache.py about 10 KB, while the CRL itself is a few
hundred bytes.  Firmware keeps frozen bytecode in flash.
"""

import pytest
from cryptography import x509

from fleetid.common import se_consts as C
from fleetid.common import t1
from fleetid.common.apdu import ApduProtocol
from fleetid.common.t1link import T1Link
from fleetid.device.bus import open_bus
from fleetid.device.se import SeSession
from tests.cloud.cloud_support import Fleet
from tests.cloud.crl_support import b42_publisher
from tests.device.crl_support import epoch, make_crl, point_of
from tests.micropython.support import PRELUDE, Stage, open_se_script, parse, serve_chip

pytestmark = pytest.mark.micropython

SCRIPT = PRELUDE + open_se_script("fleetid.common.oids", "fleetid.common.der", "fleetid.common.asn1time", "fleetid.device.crl_cache") + r"""
from fleetid.device import crl_cache


def reader(path):
    def fetch():
        f = open(path, "rb")
        try:
            return f.read()
        finally:
            f.close()
    return fetch


cache = crl_cache.CrlCache(se, crl_cache.FileStore(STORE), unhexlify(POINT),
                           unhexlify(ISSUER), crl_cache.CrlPolicy())
print("refresh", cache.refresh(reader(CRL), NOW))
gc.collect()
try:
    cache.check_serial(REVOKED, NOW)
    print("check revoked none")
except crl_cache.RevokedError as exc:
    print("check revoked", exc.reason, exc.revocation_date)
print("check kept", cache.check_serial(KEPT, NOW))
for path in (FLIPPED, OLDER):
    try:
        print("again", cache.refresh(reader(path), NOW))
    except crl_cache.CrlError as exc:
        print("refused", exc.reason)
    gc.collect()
status = cache.status(NOW)
print("status", status["number"], status["state"], status["revoked"], status["high_water"])
link.close()
bus.close()
print("free", gc.mem_free())
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from fleetid.sim.chip import Chip
    from fleetid.sim.fab import fab_chip
    from fleetid.sim.nvm import Nvm

    folder = tmp_path_factory.mktemp("mpcrl")
    fleet = Fleet(folder / "fleet")
    devices = [fleet.provision("b42") for _ in range(3)]
    revoked = devices[0].identity_cert
    fleet.registry.mark_revoked(revoked.serial_number, "keyCompromise",
                                issuer=revoked.issuer.rfc4514_string())
    publisher = b42_publisher(fleet)
    crl = publisher.current("b42")
    (folder / "b42.crl").write_bytes(publisher.current_der("b42"))
    flipped = bytearray(publisher.current_der("b42"))
    flipped[-8] ^= 0x01
    (folder / "flipped.crl").write_bytes(bytes(flipped))
    (folder / "older.crl").write_bytes(make_crl(fleet, 1, crl.last_update_utc))
    ca = fleet.ca_certs["b42"]
    nvm_path = str(folder / "chip.nvm")
    fab_chip(str(folder / "vendor"), nvm_path)
    chip = Chip(Nvm(nvm_path))
    server, sock = serve_chip(chip, folder)
    now = epoch(crl.last_update_utc) + 60
    header = ("SOCK = %r\nCRL = %r\nFLIPPED = %r\nOLDER = %r\nSTORE = %r\nPOINT = %r\n"
              "ISSUER = %r\nNOW = %d\nREVOKED = %d\nKEPT = %d\n") % (
        sock, str(folder / "b42.crl"), str(folder / "flipped.crl"), str(folder / "older.crl"),
        str(folder / "cache.crl"), point_of(ca.public_key()).hex(),
        ca.subject.public_bytes().hex(), now, revoked.serial_number,
        devices[1].identity_cert.serial_number)
    stage = Stage(folder / "mp", opt=3)
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number

    try:
        yield stage, header, server, number, revoked
    finally:
        server.stop()
        fleet.close()


def test_crl_check_under_micropython_over_the_emulator_socket(setup):
    stage, header, server, number, revoked = setup
    out = parse(stage.run("run_crl", header + SCRIPT))
    assert out["refresh"] == ["updated"]
    assert out["check"][0].startswith("revoked revoked ")
    assert out["check"][1] == "kept None"
    assert out["refused"] == ["signature"]
    assert out["again"] == ["older than cached, kept cached"]  # the newer one stays
    assert out["status"] == ["%d fresh 1 %d" % (number, number)]
    bus = open_bus(server.bus_uri)
    link = T1Link(bus, profile=t1.PROFILE_GP)
    try:
        link.open()
        se = SeSession(ApduProtocol(link))
        se.select()
        record = se.read_object(C.DATA_OBJECT_CRL_NUMBER)
        assert int.from_bytes(record[9:], "big") == number
    finally:
        link.close()
        bus.close()
