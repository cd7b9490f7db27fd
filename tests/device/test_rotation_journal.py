"""The rotation journal's record format (device/rotation_journal.py), the decision table's
credential choice, the certificate facts the agent reads (device/certinfo.py), and the
agent's backoff against a scripted network, without a cloud."""

import datetime
import struct

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetid.common import asn1time
from fleetid.common.crc16 import crc16
from fleetid.common.errors import DerError, ReferenceNotFound
from fleetid.device import certinfo
from fleetid.device import rotation_journal as rj
from fleetid.device.agent import Agent, AgentPolicy, NetError, renew_at

# BASE(cur 2, t0 0x01020304, t1 0x05060708, seq 0x0009), CRC-16/X-25 of the first 14 bytes.
BASE_BODY = bytes.fromhex("01020000" "01020304" "05060708" "0009")
BASE_RECORD = BASE_BODY + struct.pack(">H", crc16(BASE_BODY))


def test_record_layout_is_the_documented_16_bytes_big_endian():
    record = rj.Record(rj.BASE, 2, 0, rj.CAUSE_NONE, 0x01020304, 0x05060708, 9)
    assert record.encode() == BASE_RECORD and len(BASE_RECORD) == rj.RECORD_SIZE
    assert rj.encode([record]) == b"FRJ\x01" + BASE_RECORD
    back = rj.decode(b"FRJ\x01" + BASE_RECORD)[0]
    assert (back.kind, back.cur, back.new, back.t0, back.t1, back.seq) == \
        (rj.BASE, 2, 0, 0x01020304, 0x05060708, 9)
    assert rj.MAX_RECORDS * rj.RECORD_SIZE + 4 <= 1024


@pytest.mark.parametrize("data, why", [
    (b"", "magic"),
    (b"FRJ\x02", "magic"),  # another version
    (b"FRJ\x01" + BASE_RECORD[:-1], "length"),
    (b"FRJ\x01" + BASE_RECORD[:-1] + bytes((BASE_RECORD[-1] ^ 1,)), "CRC"),
    (b"FRJ\x01" + rj.Record(rj.ISSUED, 2, 3).encode(), "ISSUED after start"),
    (b"FRJ\x01" + BASE_RECORD + BASE_RECORD, "BASE after BASE"),
    (b"FRJ\x01" + rj.encode([rj.Record(rj.BEGIN, 2, 3), rj.Record(rj.ISSUED, 2, 1)])[4:],
     "slots change"),
])
def test_a_damaged_or_disordered_journal_is_refused_not_guessed(data, why):
    with pytest.raises(rj.JournalError) as refused:
        rj.decode(data)
    assert refused.value.reason == rj.JournalError.CORRUPT and why in str(refused.value)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_decode_of_any_bytes_returns_records_or_raises_journal_error(data):
    try:
        records = rj.decode(b"FRJ\x01" + data)
    except rj.JournalError:
        return
    assert rj.encode(records) == b"FRJ\x01" + data


@pytest.mark.parametrize("records, slot, final", [
    ([], 1, True),
    ([rj.Record(rj.BASE, 2)], 2, True),
    ([rj.Record(rj.BEGIN, 1, 2)], 1, False),  # first enrolment, cut before ISSUED
    ([rj.Record(rj.BASE, 2), rj.Record(rj.BEGIN, 2, 3)], 2, False),
    ([rj.Record(rj.BASE, 2), rj.Record(rj.BEGIN, 2, 3), rj.Record(rj.ISSUED, 2, 3)], 3, False),
    ([rj.Record(rj.BEGIN, 2, 3), rj.Record(rj.ISSUED, 2, 3), rj.Record(rj.ACKED, 2, 3)], 3,
     False),
])
def test_decision_table_names_the_credential_to_connect_with(records, slot, final):
    last = rj.decode(rj.encode(records))[-1] if records else None
    assert rj.credential_slot(last) == slot and rj.is_final(last) == final


class FakeSe:
    """read_object / write_object of one data object, and empty key slots."""

    def __init__(self):
        self.objects = {}
        self.writes = 0

    def read_object(self, object_id):
        if object_id not in self.objects:
            raise ReferenceNotFound(0x6A88)
        return self.objects[object_id]

    def write_object(self, object_id, data):
        assert 1 <= len(data) <= 1024
        self.writes += 1
        self.objects[object_id] = bytes(data)


def test_appends_are_whole_object_writes_and_compaction_leaves_one_base():
    se = FakeSe()
    journal = rj.RotationJournal(se)
    assert journal.load() is None
    journal.append(rj.Record(rj.BEGIN, 1, 2, rj.CAUSE_ENROL, 100))
    journal.append(rj.Record(rj.ISSUED, 1, 2, rj.CAUSE_ENROL, 100, 200))
    journal.append(rj.Record(rj.ACKED, 1, 2, rj.CAUSE_ENROL, 100, 200))
    with pytest.raises(rj.JournalError):
        journal.append(rj.Record(rj.BEGIN, 2, 3))  # nothing may follow ACKED but BASE
    journal.compact(2, 100, 200)
    assert se.writes == 4
    again = rj.RotationJournal(se)
    last = again.load()
    assert (last.kind, last.cur, last.seq, len(again.records)) == (rj.BASE, 2, 3, 1)


# -- certificate facts ---------------------------------------------------------------------


def _certificate(not_before, not_after, cn="FID-000000007", serial_number="FID-000000007"):
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if serial_number:
        names.append(x509.NameAttribute(NameOID.SERIAL_NUMBER, serial_number))
    name = x509.Name(names)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(0x80FF00)
            .not_valid_before(not_before).not_valid_after(not_after)
            .sign(key, hashes.SHA256()))
    return cert, key


UTC = datetime.timezone.utc


@pytest.mark.parametrize("not_before, not_after", [
    (datetime.datetime(1970, 1, 1, tzinfo=UTC), datetime.datetime(2049, 12, 31, 23, 59, 59,
                                                                   tzinfo=UTC)),
    (datetime.datetime(2024, 2, 29, 12, 0, 1, tzinfo=UTC),  # leap day, UTCTime
     datetime.datetime(2050, 1, 1, tzinfo=UTC)),  # GeneralizedTime from 2050 (RFC 5280)
    (datetime.datetime(1999, 12, 31, 23, 59, 59, tzinfo=UTC),
     datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)),
])
def test_certificate_facts_match_cryptography(not_before, not_after):
    cert, key = _certificate(not_before, not_after)
    facts = certinfo.certificate_facts(cert.public_bytes(serialization.Encoding.DER))
    assert facts.serial == 0x80FF00
    assert facts.not_before == int(not_before.timestamp())
    assert facts.not_after == int(not_after.timestamp())
    assert (facts.common_name, facts.serial_number) == ("FID-000000007", "FID-000000007")
    assert facts.point == key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


@pytest.mark.parametrize("tag, text", [(0x17, b"2402301200Z0"), (0x17, b"240229120000"),
                                       (0x18, b"20241301000000Z"), (0x17, b"24022912000AZ")])
def test_malformed_times_are_refused(tag, text):
    with pytest.raises(DerError):
        asn1time.parse_time(tag, text)


# -- backoff against a scripted network (no cloud) ---------------------------------------------


class Clock:
    def __init__(self):
        self.t = 1000
        self.sleeps = []

    def now(self):
        return int(self.t)

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.t += seconds


class ScriptedNet:
    def __init__(self, failures):
        self.failures = list(failures)
        self.calls = 0

    def whoami(self, slot):
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return {}


def _agent(net, rand=0.0, **policy):
    return Agent(FakeSe(), net, Clock(), lambda: rand, policy=AgentPolicy(**policy))


def test_backoff_is_exponential_capped_and_jittered_by_the_injected_randomness():
    failures = [NetError(NetError.LINK)] * 5
    agent = _agent(ScriptedNet(failures), rand=0.0, max_attempts=6, base_delay=1,
                   max_delay=6, max_wait=1000)
    agent._call("whoami", agent.net.whoami, 2)
    assert agent.clock.sleeps == [0.5, 1.0, 2.0, 3.0, 3.0]  # U(0.5,1) x min(6, 2^n) at 0
    agent = _agent(ScriptedNet([NetError(NetError.LINK)] * 2), rand=0.999999,
                   max_attempts=3, base_delay=1, max_delay=6)
    agent._call("whoami", agent.net.whoami, 2)
    assert [round(s, 3) for s in agent.clock.sleeps] == [1.0, 2.0]


def test_refusals_are_not_retried_and_attempts_and_waits_are_bounded():
    net = ScriptedNet([NetError(NetError.REFUSED, status=403, server_reason="revoked")])
    with pytest.raises(NetError):
        _agent(net)._call("whoami", net.whoami, 2)
    assert net.calls == 1
    net = ScriptedNet([NetError(NetError.TIMEOUT)] * 10)
    with pytest.raises(NetError):
        _agent(net, max_attempts=3)._call("whoami", net.whoami, 2)
    assert net.calls == 3
    net = ScriptedNet([NetError(NetError.SERVER, retry_after=30)] * 10)
    agent = _agent(net, max_attempts=10, max_delay=60, max_wait=70)
    with pytest.raises(NetError):
        agent._call("whoami", net.whoami, 2)
    assert sum(agent.clock.sleeps) <= 70 and all(s >= 30 for s in agent.clock.sleeps)


def test_renewal_time_is_the_fraction_of_the_validity():
    assert renew_at(1000, 2000, 0.66) == 1660
    assert renew_at(1000, 2000, 1.0) == 2000
