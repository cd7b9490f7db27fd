"""The portable codecs (apdu, der, attestation) run unchanged under MicroPython.

The portable core is staged as fleetid/common/ and fleetid/device/ in a temporary folder
(the import names the device firmware uses), compiled to .mpy as firmware carries it
(tests/micropython/support.py), and three scripts (apdu, der, attestation) run under the
real `micropython` unix port, each at its heap budget (tests/micropython/budgets.py).  Each
prints one line per check; the bytes produced must equal CPython's.  The CSR builder
(common/csr.py) gets the same check on the device's own path: run_agent_csr in
tests/micropython/test_agent_micropython.py.

Why .mpy and one interpreter per area: the unix port loads bytecode into the heap (frozen
firmware keeps it in flash), and errors + der + attestation + apdu bytecode alone take
about 44 KB of it; compiling der.py from source on the target would need far more heap than its budget.  Each run imports
only the modules it exercises, like a device task would, leaving room for working data.
"""

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fleetid.common import attestation, der
from tests.micropython.support import PRELUDE, Stage, parse

pytestmark = pytest.mark.micropython


APDU_SCRIPT = r"""
from fleetid.common import apdu
from fleetid.common.apdu_wire import encode_command
from fleetid.common.command_apdu import decode_command
from fleetid.common.errors import ApduFormatError, ApduError, WrongData


def check_codec():
    # One command per ISO case, then malformed ones.
    for args in ((0x80, 0xCA, 1, 4, b"", None, None), (0x80, 0xCA, 1, 4, b"", 256, None),
                 (0x80, 0x2A, 1, 0, b"\x11" * 32, None, None),
                 (0x80, 0x2A, 1, 0, b"\x11" * 32, 72, None),
                 (0x80, 0xCA, 1, 4, b"", 1024, None),
                 (0x80, 0xDA, 1, 0, b"\x22" * 300, None, None),
                 (0x80, 0xDA, 1, 0, b"\x22" * 300, 65536, None)):
        enc = encode_command(*args)
        cmd = decode_command(enc)
        print("apdu", cmd.case, h(enc[:8]), len(enc), cmd.le, cmd.encode() == enc)
    for bad in ("80CA0102000000AA", "FFCA0102", "8060010201"):
        try:
            decode_command(u(bad))
            print("apdu-bad accepted", bad)
        except ApduFormatError:
            print("apdu-bad refused", bad)


class Card:
    def __init__(self, responses):
        self.responses = responses
        self.sent = []

    def transceive(self, cmd):
        self.sent.append(h(cmd))
        return u(self.responses.pop(0))


def check_protocol():
    # 61XX chaining, 6CXX correction, then a status word turned into its typed error.
    card = Card(["AA" * 4 + "6102", "BBBB9000", "6C03", "010203" + "9000", "6A80"])
    proto = apdu.ApduProtocol(card)
    print("chain", h(proto.send_apdu(0x80, 0xCA, 1, 4, le=4)), " ".join(card.sent))
    print("wrong-le", h(proto.send_apdu(0x80, 0x84, 0, 0, le=8)), " ".join(card.sent[2:]))
    try:
        proto.send_apdu(0x80, 0x2C, 0, 0, b"\x01")
    except WrongData as e:
        print("sw", "%04X" % e.sw, isinstance(e, ApduError))


check_codec()
gc.collect()
check_protocol()
gc.collect()
print("done", gc.mem_free())
"""

DER_SCRIPT = r"""
from fleetid.common import der
from fleetid.common.errors import DerError


def check_signatures():
    print("raw", h(der.ecdsa_der_to_raw(u(SIG_HEX))))
    print("der", h(der.ecdsa_raw_to_der(der.ecdsa_der_to_raw(u(SIG_HEX)))))
    for bad in ("3081060201010201" + "01", "3006020100020101", "300602010102010100",
                "3080020101020101" + "0000"):
        try:
            der.ecdsa_der_to_raw(u(bad))
            print("sig-bad accepted", bad)
        except DerError as e:
            print("sig-bad refused", e.reason)


def check_values():
    point = der.parse_p256_spki(u(SPKI_HEX))
    print("spki", h(der.encode_p256_spki(point)) == SPKI_HEX)
    try:
        der.check_p256_point(b"\x04" + point[1:33] + bytes(32))
    except DerError as e:
        print("point-bad refused", e.reason)
    print("oid", der.DerReader(der.encode_oid(OID)).read_oid() == OID)
    print("int", h(der.encode_integer(-129)),
          der.DerReader(der.encode_integer(1 << 200)).read_integer() == 1 << 200)
    try:
        der.DerReader(u("0C03EDA080")).read_utf8_string()
    except DerError as e:
        print("utf8-bad refused", e.reason)


check_signatures()
gc.collect()
check_values()
gc.collect()
print("done", gc.mem_free())
"""

ATTESTATION_SCRIPT = r"""
from fleetid.common import attestation, der


def check_attestation():
    point = der.parse_p256_spki(u(SPKI_HEX))
    st = attestation.encode_statement(bytes(range(16)), 1, point, 0xC1, 0x0F, b"\x01\x02\x03",
                                      b"\xa5" * 32)
    show("statement", st)
    signed = attestation.encode_signed_attestation(st, u(STMT_SIG_HEX))
    bundle = attestation.encode_evidence_bundle([signed], [])
    show("bundle", bundle)
    decoded = attestation.decode_evidence_bundle(bundle)
    s0 = decoded.statements[0]
    print("decoded", s0.statement.slot, s0.statement.key_policy, h(s0.statement.nonce[:4]),
          s0.statement_der == st, s0.signature_der == u(STMT_SIG_HEX))
    return bundle


check_attestation()
gc.collect()
print("done", gc.mem_free())
"""


def _run(stage, name, header, script):
    out = parse(stage.run(name, header + PRELUDE + script))
    # Every run ends with heap to spare after its last check.
    assert int(out["done"][0]) > 0
    return out


def test_portable_codecs_run_under_micropython(tmp_path):
    stage = Stage(tmp_path)

    key = ec.derive_private_key(0xC0FFEE, ec.SECP256R1())
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    point = der.parse_p256_spki(spki)
    sig = key.sign(b"anything", ec.ECDSA(hashes.SHA256()))
    statement = attestation.encode_statement(
        bytes(range(16)), 1, point, 0xC1, 0x0F, b"\x01\x02\x03", b"\xa5" * 32
    )
    statement_sig = key.sign(statement, ec.ECDSA(hashes.SHA256()))
    oid = "2.25.168410979964568330477192807744436045893.2"
    header = "SIG_HEX = %r\nSPKI_HEX = %r\nSTMT_SIG_HEX = %r\nOID = %r\n" % (
        sig.hex(),
        spki.hex(),
        statement_sig.hex(),
        oid,
    )

    # APDU: every case, canonical re-encoding, strict refusals, protocol handling.
    out = _run(stage, "run_apdu", header, APDU_SCRIPT)
    cases = [line.split()[0] for line in out["apdu"]]
    assert cases == ["1", "2S", "3S", "4S", "2E", "3E", "4E"]
    assert all(line.endswith("True") for line in out["apdu"])
    assert all(line.startswith("refused") for line in out["apdu-bad"])
    assert out["chain"] == ["aaaaaaaabbbb 80ca010404 00c0000002"]
    assert out["wrong-le"] == ["010203 8084000008 8084000003"]
    assert out["sw"] == ["6A80 True"]

    # DER: same bytes as CPython, same refusals.
    out = _run(stage, "run_der", header, DER_SCRIPT)
    assert out["raw"] == [der.ecdsa_der_to_raw(sig).hex()]
    assert out["der"] == [sig.hex()]
    assert out["sig-bad"] == [
        "refused length",
        "refused range",
        "refused trailing",
        "refused length",
    ]
    assert out["spki"] == ["True"]
    assert out["point-bad"] == ["refused point"]
    assert out["oid"] == ["True"]
    assert out["int"] == [der.encode_integer(-129).hex() + " True"]
    assert out["utf8-bad"] == ["refused value"]  # surrogates: refused on both interpreters

    # Attestation: byte-identical with the CPython run of the same code.
    out = _run(stage, "run_attestation", header, ATTESTATION_SCRIPT)
    assert out["statement"] == [statement.hex()]
    signed = attestation.encode_signed_attestation(statement, statement_sig)
    bundle = attestation.encode_evidence_bundle([signed], [])
    assert out["bundle"] == [bundle.hex()]
    assert out["decoded"] == ["1 193 a5a5a5a5 True True"]
