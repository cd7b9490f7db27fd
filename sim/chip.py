"""The emulated secure element: the fleetid applet over its NVM.

`Chip.process(apdu) -> response` runs one command APDU (the command set and status words
are specified in common/se_consts.py's header) and never raises on bad input.  The chip
is the SE boundary: private keys exist only in its NVM and in the local variables of the
command using them; no response, log line or error message carries one.

Execution model (why malformed or refused commands change nothing):

    decode header/lengths -> life-cycle gate -> SELECT gate -> SM unwrap (SCP03)
      -> handler(cmd, tx): reads through `tx`, stages NVM writes in `tx`, or raises
         _Refusal(sw[, persist])
      -> Le check (data longer than Ne: 6Cxx / 6700, nothing committed)
      -> one atomic NVM commit of `tx`  -> SM wrap -> data || SW

A refusal commits nothing, except the few that must be remembered (a refused SCP03
authentication increments DATA_SCP_FAILURES).  Every command does at most one NVM commit,
so a power cut during a command leaves the old or the new state, never a mix.

NVM layout (keys of sim.nvm.Nvm; integers big-endian):

    "uid"        16 B SE unique id                "fw"        3 B firmware version
    "lc"         1 B GP life cycle (absent: OP_READY)
    "chain"      DER certificates concatenated (MAK certificate first)
    (RAM only, never NVM: the transient key object of se_consts.SLOT_TRANSIENT, lost on
    power loss)
    "key/<n>"    slot n: policy(1) || private scalar(32) || public point(65)
    "cert/<n>"   DER certificate beside the key in slot n
    "ctr/<n>"    u32 monotonic counter n       "obj/<n>"   data object n
    "scp/<kvn>"  SCP03 static key set (kvn as 2 hex digits): ENC(16) || MAC(16) || DEK(16)
    "scp/fail"   u16 refused SCP03 authentications    "scp/seq"  u24 SCP03 sequence counter
    "ta/<dgi>"   trust anchor stored by STORE DATA (dgi as 4 hex digits)
"""

import os
import struct

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization as _serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fleetid.common import se_consts as C
from fleetid.common.command_apdu import decode_command
from fleetid.common.attestation import encode_signed_attestation, encode_statement
from fleetid.common.der import (
    P256_N,
    TAG_SEQUENCE,
    check_p256_point,
    check_single,
    ecdsa_der_to_raw,
    ecdsa_raw_to_der,
)
from fleetid.common.errors import ApduFormatError, DerError, FleetidError
from fleetid.sim.nvm import PowerLoss, Transaction

# ISO/IEC 7816-4 5.1.3 Table 6: SELECT of an unknown application.
SW_FILE_NOT_FOUND = 0x6A82
# ISO/IEC 7816-4 5.1.3: SW1 6C = wrong Le, SW2 = the exact length available.
_SW1_WRONG_LE = 0x6C

_SELECT_P1_BY_NAME = 0x04  # ISO/IEC 7816-4 7.1.1 Table 39: select by DF name (AID)
_SELECT_P2_FCI = 0x00  # first or only occurrence, return FCI
_SELECT_P2_NO_DATA = 0x0C  # first or only occurrence, no response data
_FCI_TAG = 0x6F  # ISO/IEC 7816-4 5.3.3 Table 10: FCI template
_FCI_AID_TAG = 0x84  # DF name
_FCI_VERSION_TAG = 0x85  # proprietary: applet version u16

_KEY_RECORD = struct.Struct(">B32s65s")  # policy, private scalar, public point
_HOST_POLICY_BITS = (
    C.POLICY_SIGN | C.POLICY_ECDH | C.POLICY_NON_EXPORTABLE | C.POLICY_GENERATED_ON_CHIP
)

# PUT KEY (GP CS 2.3 11.8.2.3, Amd D 7.2): key type AES 0x88, key data block length 0x11
# = key length byte (0x10) + 16 encrypted key bytes, then KCV length 3 + KCV.
_KEY_TYPE_AES = 0x88
_PUT_KEY_P2 = 0x81  # b8 = more than one key in the command, key identifier 1
_PUT_KEY_COMPONENT = struct.Struct(">BBB16sB3s")
_PUT_KEY_LEN = 1 + 3 * _PUT_KEY_COMPONENT.size
_KCV_INPUT = b"\x01" * 16  # GP Amd D 7.2: KCV = first 3 bytes of AES(key, 16 x 01)
_MAX_KEY_SETS = 4
_KVN_MAX = 0x7F  # GP CS 2.3 11.8.2.1: key version numbers 01..7F

_SET_STATUS_P1_CARD = 0x80  # GP CS 2.3 11.10.2.1: status type "issuer security domain"
# Allowed SET STATUS transitions (GP CS 2.3 5.1.1: the card life cycle only moves forward,
# except CARD_LOCKED <-> SECURED; TERMINATED is final).
_TRANSITIONS = {
    C.LC_OP_READY: (C.LC_INITIALIZED, C.LC_SECURED, C.LC_TERMINATED),
    C.LC_INITIALIZED: (C.LC_SECURED, C.LC_TERMINATED),
    C.LC_SECURED: (C.LC_CARD_LOCKED, C.LC_TERMINATED),
    C.LC_CARD_LOCKED: (C.LC_SECURED, C.LC_TERMINATED),
}
# Commands the applet still answers while CARD_LOCKED (GP CS 2.3 5.1.1.4: only the issuer
# security domain's management functions remain available).
_LOCKED_ALLOWED = (
    C.INS_GET_DATA,
    C.INS_INITIALIZE_UPDATE,
    C.INS_EXTERNAL_AUTHENTICATE,
    C.INS_SET_STATUS,
)
_PERSONALISATION = (C.INS_PUT_KEY, C.INS_STORE_DATA, C.INS_SET_STATUS)

# STORE DATA (GP CS 2.3 11.11.2.1): P1 b8 = last block; b4 = DGI format (optional here).
_STORE_LAST_BLOCK = 0x80
_STORE_DGI_FORMAT = 0x08
_DGI_LONG_LENGTH = 0xFF  # GP CS 2.3 11.11.3.2: length FF || u16 for 255 bytes and more
_TRUST_DGIS = {
    C.DGI_FLEET_ROOT: C.DATA_TRUST_FLEET_ROOT,
    C.DGI_FIRMWARE_KEY: C.DATA_TRUST_FIRMWARE_KEY,
    C.DGI_SERVER_ROOT: C.DATA_TRUST_SERVER_ROOT,
    C.DGI_FIRMWARE_CERT_A: C.DATA_TRUST_FIRMWARE_CERT_A,
    C.DGI_FIRMWARE_CERT_B: C.DATA_TRUST_FIRMWARE_CERT_B,
}
_TRUST_TAGS = dict((tag, dgi) for dgi, tag in _TRUST_DGIS.items())

# Refused SCP03 authentications counted in DATA_SCP_FAILURES: a wrong host cryptogram
# (GP Amd D 7.1.2.4: 6300) or a wrong C-MAC (6982).
_COUNTED_SCP_SW = (C.SW_VERIFY_FAILED, C.SW_SECURITY_STATUS)

_SEQ_MAX = 0xFFFFFF  # u24 sequence counter (GP Amd D 6.2.2.1)
_COUNTER_MAX = 0xFFFFFFFF


class _Refusal(FleetidError):
    """A handler refuses the command with `sw`; `persist` is committed anyway (or None)."""

    def __init__(self, sw, persist=None):
        super().__init__("SW %04X" % sw)
        self.sw = sw
        self.persist = persist


def _sw_bytes(sw):
    return bytes(((sw >> 8) & 0xFF, sw & 0xFF))


# ---------------------------------------------------------------------------------------
# NVM layout helpers (used by the fab step and by tests that plant state)


def key_nvm_name(slot):
    """NVM key of key slot `slot`."""
    return "key/%d" % slot


def scp_nvm_name(kvn):
    """NVM key of the SCP03 key set with version `kvn`."""
    return "scp/%02x" % kvn


def encode_key_record(policy, private_scalar):
    """The NVM value of a key slot: policy || scalar || public point.

    Params: policy: POLICY_* flags.  private_scalar: int in [1, n-1] or 32 bytes.
    Returns: (record bytes, 65-byte public point).
    Raises: ValueError if the scalar is out of range.
    """
    if isinstance(private_scalar, (bytes, bytearray)):
        private_scalar = int.from_bytes(private_scalar, "big")
    if not 1 <= private_scalar < P256_N:
        raise ValueError("private scalar out of range")
    key = ec.derive_private_key(private_scalar, ec.SECP256R1())
    point = key.public_key().public_bytes(
        _serialization.Encoding.X962, _serialization.PublicFormat.UncompressedPoint
    )
    record = _KEY_RECORD.pack(policy, private_scalar.to_bytes(32, "big"), point)
    return record, point


def _decode_key_record(record):
    policy, scalar, point = _KEY_RECORD.unpack(record)
    return policy, scalar, point


def _private_key(scalar):
    return ec.derive_private_key(int.from_bytes(scalar, "big"), ec.SECP256R1())


def generate_scalar(rng):
    """A uniformly random P-256 private scalar from `rng(n) -> bytes` (rejection sampling,
    FIPS 186-4 B.4.2).  Returns: int in [1, n-1]."""
    while True:
        candidate = int.from_bytes(rng(32), "big")
        if 1 <= candidate < P256_N:
            return candidate


def fab_initialise(
    nvm, se_uid, firmware_version, transport_keys, life_cycle=C.LC_OP_READY, rng=None
):
    """Chip fab, first step: personalise an empty NVM and generate the MAK inside.

    Params: nvm: sim.nvm.Nvm (empty).  se_uid: 16 bytes.  firmware_version: 3 bytes.
        transport_keys: (enc, mac, dek, kvn), AES-128 keys.  life_cycle: LC_*.
        rng: `rng(n) -> bytes` (default os.urandom).
    Returns: the MAK public point (65 bytes) to certify.
    Raises: ValueError for bad parameters or a non-empty NVM.
    """
    rng = rng or os.urandom
    if nvm.keys():
        raise ValueError("NVM already personalised")
    if len(se_uid) != 16 or len(firmware_version) != 3:
        raise ValueError("UID is 16 bytes, firmware version 3 bytes")
    enc, mac, dek, kvn = transport_keys
    if len(enc) != 16 or len(mac) != 16 or len(dek) != 16 or not 1 <= kvn <= _KVN_MAX:
        raise ValueError("transport keys: three AES-128 keys and a KVN 1..7F")
    policy = C.POLICY_ATTEST | C.POLICY_NON_EXPORTABLE | C.POLICY_GENERATED_ON_CHIP
    record, point = encode_key_record(policy, generate_scalar(rng))
    nvm.commit(
        {
            "uid": bytes(se_uid),
            "fw": bytes(firmware_version),
            "lc": bytes((life_cycle,)),
            key_nvm_name(C.SLOT_MAK): record,
            scp_nvm_name(kvn): bytes(enc) + bytes(mac) + bytes(dek),
            "scp/fail": b"\x00\x00",
            "scp/seq": b"\x00\x00\x00",
        }
    )
    return point


def fab_store_attestation_chain(nvm, certificates):
    """Chip fab, second step: store the MAK certificate chain (list of DER, MAK first)."""
    nvm.commit({"chain": b"".join(bytes(c) for c in certificates)})


# ---------------------------------------------------------------------------------------


class Chip:
    """The fleetid SE applet.

    Params: nvm: sim.nvm.Nvm holding the chip's state (see the module docstring).
        rng: `rng(n) -> bytes` for key generation, GET RANDOM and SCP03 challenges
            (default os.urandom).
        clock: optional common.clock-style clock (kept for the endpoint; the applet itself
            does not wait).
        prims: SCP03 primitives (default fleetid.common.host.hostcrypto
            .CryptographyPrimitives()).
    Attributes: last_nvm_write_bytes: bytes written by the last process() (latency models).
    """

    def __init__(self, nvm, rng=None, clock=None, prims=None):
        self.nvm = nvm
        self.clock = clock
        self._rng = rng or os.urandom
        self._prims = prims
        self._scp = None
        self._selected = False
        self._store_block = 0
        self._transient = None  # RAM-only key record (se_consts.SLOT_TRANSIENT)
        self.last_nvm_write_bytes = 0

    def __repr__(self):
        return "Chip(nvm=%r)" % (self.nvm,)

    # -- RAM state ------------------------------------------------------------------------

    def power_loss(self):
        """Power cut: RAM state (selection, SCP03 session, STORE DATA block count) lost;
        NVM kept (re-read from the file when there is one)."""
        self._selected = False
        self._store_block = 0
        self._transient = None
        if self._scp is not None:
            self._scp.reset()
        self.nvm.reload()

    @property
    def selected(self):
        """True once the applet has been selected (since the last power loss)."""
        return self._selected

    def _scp_card(self):
        if self._scp is None:
            # Imported here: the SCP03 card side is only needed once SCP03 is used.
            from fleetid.sim.scp03_card import Scp03Card

            if self._prims is None:
                from fleetid.common.host.hostcrypto import CryptographyPrimitives

                self._prims = CryptographyPrimitives()
            # Key diversification data (Amd D 7.1.1.6): the first 10 bytes of the SE UID;
            # the SD AID makes card challenges pseudo-random over the persisted sequence
            # counter (Amd D 6.2.2.1).
            se_uid = self.nvm.get("uid", bytes(16))
            self._scp = Scp03Card(
                self._prims, self._keyset_lookup, self._rng,
                diversification_data=se_uid[:10], sd_aid=C.AID,
            )
        return self._scp

    def _scp_active(self):
        return self._scp is not None and self._scp.active

    def _keyset_lookup(self, kvn):
        from fleetid.common.scp03 import StaticKeys

        kvns = self._kvns(self.nvm)
        if kvn == 0:
            if not kvns:
                return None
            kvn = kvns[0]  # KVN 0 = the default key set: the lowest loaded version
        value = self.nvm.get(scp_nvm_name(kvn))
        if value is None:
            return None
        return StaticKeys(value[:16], value[16:32], value[32:48], kvn)

    # -- entry point ----------------------------------------------------------------------

    def process(self, apdu):
        """Run one command APDU.

        Params: apdu: bytes-like command APDU (short or extended).
        Returns: response bytes, data || SW1 SW2 (wrapped per the SCP03 level when the
            command came in secure messaging).
        Raises: sim.nvm.PowerLoss only when fault injection cuts power during the NVM
            commit (the chip's RAM state is then lost, as after power_loss()).  Never
            raises on bad input: anything unexpected answers 6F00.
        """
        self.last_nvm_write_bytes = 0
        try:
            return self._process(apdu)
        except PowerLoss:
            self._selected = False
            self._store_block = 0
            self._transient = None
            if self._scp is not None:
                self._scp.reset()
            raise
        except Exception:  # a bug must not take the emulated SE down; 6F00 = no diagnosis
            return _sw_bytes(C.SW_UNKNOWN)

    def _process(self, apdu):
        if not isinstance(apdu, (bytes, bytearray, memoryview)):
            return _sw_bytes(C.SW_WRONG_LENGTH)
        apdu = bytes(apdu)
        if len(apdu) < 4:
            return _sw_bytes(C.SW_WRONG_LENGTH)
        cla = apdu[0]
        ins = apdu[1]
        if cla == 0xFF:
            return _sw_bytes(C.SW_CLA_NOT_SUPPORTED)  # ISO/IEC 7816-4 5.1.1: CLA FF invalid
        if ins & 0xF0 in (0x60, 0x90):
            return _sw_bytes(C.SW_INS_NOT_SUPPORTED)  # ISO/IEC 7816-3 12.1.2: INS 6X/9X invalid
        try:
            cmd = decode_command(apdu)
        except ApduFormatError:
            return _sw_bytes(C.SW_WRONG_LENGTH)
        cmd.raw = apdu

        life_cycle = self._life_cycle(self.nvm)
        if life_cycle == C.LC_TERMINATED:
            # se_consts: everything but GET DATA of the life cycle answers 6985.
            if (
                cla == C.CLA_PROPRIETARY
                and ins == C.INS_GET_DATA
                and (cmd.p1 << 8 | cmd.p2) == C.DATA_LIFE_CYCLE
                and not cmd.data
            ):
                return bytes((life_cycle,)) + _sw_bytes(C.SW_OK)
            return _sw_bytes(C.SW_CONDITIONS)

        if cla == C.CLA_ISO:
            if ins != C.INS_SELECT:
                return _sw_bytes(C.SW_CLA_NOT_SUPPORTED)
            data, sw = self._run(self._select, cmd, secured=False)
            return data + _sw_bytes(sw)
        if cla == C.CLA_PROPRIETARY:
            if ins == C.INS_SELECT:
                return _sw_bytes(C.SW_CLA_NOT_SUPPORTED)
            data, sw = self._dispatch(cmd, secured=False, life_cycle=life_cycle)
            return data + _sw_bytes(sw)
        if cla == C.CLA_PROPRIETARY | C.CLA_SECURE_MESSAGING:
            return self._process_secured(cmd, life_cycle)
        return _sw_bytes(C.SW_CLA_NOT_SUPPORTED)

    def _process_secured(self, cmd, life_cycle):
        if not self._selected:
            return _sw_bytes(C.SW_CONDITIONS)
        if cmd.ins == C.INS_EXTERNAL_AUTHENTICATE:
            data, sw = self._run(self._external_authenticate, cmd, secured=False)
            return data + _sw_bytes(sw)
        if not self._scp_active():
            return _sw_bytes(C.SW_SECURITY_STATUS)  # GP Amd D 6.2.4: no session, no SM
        card = self._scp
        try:
            plain = card.unwrap_command(cmd.raw)
        except _scp_error_class() as exc:
            if _counts_as_failure(exc):
                self._commit(self._failure_increment(self.nvm))
            return _sw_bytes(exc.sw)
        try:
            plain_cmd = decode_command(plain)
        except ApduFormatError:
            return card.wrap_response(b"", C.SW_WRONG_LENGTH)
        plain_cmd.raw = bytes(plain)
        if plain_cmd.ins in (C.INS_SELECT, C.INS_INITIALIZE_UPDATE, C.INS_EXTERNAL_AUTHENTICATE):
            return card.wrap_response(b"", C.SW_CONDITIONS)
        data, sw = self._dispatch(plain_cmd, secured=True, life_cycle=life_cycle)
        return card.wrap_response(data, sw)

    def _dispatch(self, cmd, secured, life_cycle):
        if not self._selected:
            return b"", C.SW_CONDITIONS
        name = self._HANDLERS.get(cmd.ins)
        if name is None:
            return b"", C.SW_INS_NOT_SUPPORTED
        if life_cycle == C.LC_CARD_LOCKED and cmd.ins not in _LOCKED_ALLOWED:
            return b"", C.SW_CONDITIONS
        if cmd.ins in _PERSONALISATION and not (
            secured and self._scp_active() and self._scp.level & C.SCP_LEVEL_CMAC
        ):
            return b"", C.SW_SECURITY_STATUS  # personalisation only inside SCP03 (C-MAC)
        return self._run(getattr(self, name), cmd, secured)

    def _run(self, handler, cmd, secured):
        tx = Transaction(self.nvm)
        try:
            data = handler(cmd, tx)
        except _Refusal as refusal:
            if refusal.persist:
                self._commit(refusal.persist)
            return b"", refusal.sw
        if cmd.le is not None and len(data) > cmd.le:
            # ISO/IEC 7816-4 5.1.3: 6Cxx gives the exact length; beyond a short Le's 256
            # the client must use an extended Le.  Nothing is committed.
            if len(data) <= 256:
                return b"", (_SW1_WRONG_LE << 8) | (len(data) & 0xFF)
            return b"", C.SW_WRONG_LENGTH
        self._commit(tx.changes)
        return data, C.SW_OK

    def _commit(self, changes):
        # Latency models charge what a real SE would program: the changed records, not
        # the emulator's whole image file.
        self.nvm.commit(changes)
        self.last_nvm_write_bytes += sum(len(v) for v in changes.values() if v is not None)

    # -- shared checks --------------------------------------------------------------------

    @staticmethod
    def _life_cycle(store):
        value = store.get("lc")
        return value[0] if value else C.LC_OP_READY

    @staticmethod
    def _kvns(store):
        return sorted(int(k[4:], 16) for k in store.keys() if _is_kvn_name(k))

    @staticmethod
    def _failure_increment(store):
        count = struct.unpack(">H", store.get("scp/fail", b"\x00\x00"))[0]
        return {"scp/fail": struct.pack(">H", min(count + 1, 0xFFFF))}

    @staticmethod
    def _no_data(cmd):
        if cmd.data:
            raise _Refusal(C.SW_WRONG_LENGTH)

    @staticmethod
    def _p2_zero(cmd):
        if cmd.p2 != 0:
            raise _Refusal(C.SW_INCORRECT_P1P2)

    @staticmethod
    def _slot(cmd, allow_mak):
        slot = cmd.p1
        if slot >= C.SLOT_COUNT:
            raise _Refusal(C.SW_INCORRECT_P1P2)
        if slot == C.SLOT_MAK and not allow_mak:
            raise _Refusal(C.SW_CONDITIONS)  # the MAK is fab-made and ATTEST-only
        return slot

    @staticmethod
    def _key(tx, slot):
        record = tx.get(key_nvm_name(slot))
        if record is None:
            raise _Refusal(C.SW_REF_NOT_FOUND)
        return _decode_key_record(record)

    def _admin_allowed(self, tx, replaced_kvn=None):
        # Before SECURED: personalisation (the dispatcher already asked for an SCP03
        # session with C-MAC).  Once SECURED, over-the-air administration only: the session
        # must be at the full level 0x33 (C-MAC, C-DEC, R-MAC, R-ENC: the relaying agent
        # sees neither the keys nor the trust anchors nor the answers in clear) and opened
        # with the card's current key set (the highest loaded KVN); PUT KEY may only
        # replace that very set (P1 = its KVN), in one NVM commit, so a power cut leaves
        # the old set or the new one, never neither.  Replay and reordering are the SCP03
        # session's to refuse (C-MAC chaining, the sequence counter behind the challenge).
        life_cycle = self._life_cycle(tx)
        if life_cycle in (C.LC_OP_READY, C.LC_INITIALIZED):
            return
        if life_cycle != C.LC_SECURED:
            raise _Refusal(C.SW_CONDITIONS)
        card = self._scp
        if card is None or not card.active or card.level != C.SCP_LEVEL_OTA:
            raise _Refusal(C.SW_SECURITY_STATUS)
        kvns = self._kvns(tx)
        if not kvns or card.kvn != kvns[-1]:
            raise _Refusal(C.SW_SECURITY_STATUS)
        if replaced_kvn is not None and replaced_kvn != card.kvn:
            raise _Refusal(C.SW_CONDITIONS)

    # -- handlers: handler(cmd, tx) -> response data, or raise _Refusal -------------

    def _select(self, cmd, tx):
        if cmd.p1 != _SELECT_P1_BY_NAME or cmd.p2 not in (_SELECT_P2_FCI, _SELECT_P2_NO_DATA):
            raise _Refusal(C.SW_INCORRECT_P1P2)
        if cmd.data != C.AID:
            raise _Refusal(SW_FILE_NOT_FOUND)  # the current selection stays (7816-4 7.1.1)
        self._selected = True
        self._store_block = 0
        if self._scp is not None:
            self._scp.reset()  # GP CS 2.3 10.2.3: selection ends the secure channel session
        if cmd.p2 == _SELECT_P2_NO_DATA:
            return b""
        body = (
            bytes((_FCI_AID_TAG, len(C.AID)))
            + C.AID
            + bytes((_FCI_VERSION_TAG, 2))
            + struct.pack(">H", C.APPLET_VERSION)
        )
        return bytes((_FCI_TAG, len(body))) + body

    def _get_data(self, cmd, tx):
        self._no_data(cmd)
        tag = cmd.p1 << 8 | cmd.p2
        if tag == C.DATA_LIFE_CYCLE:
            return bytes((self._life_cycle(tx),))
        if tag == C.DATA_FREE_SLOTS:
            used = sum(1 for slot in range(1, C.SLOT_COUNT) if key_nvm_name(slot) in tx)
            return bytes((C.SLOT_COUNT - 1 - used,))
        if tag == C.DATA_SCP_INFO:
            return bytes(self._kvns(tx))
        if tag == C.DATA_SCP_FAILURES:
            return tx.get("scp/fail", b"\x00\x00")
        if tag == C.DATA_SEQUENCE_COUNTER:
            return tx.get("scp/seq", b"\x00\x00\x00")
        names = {
            C.DATA_SE_UID: "uid",
            C.DATA_FIRMWARE_VERSION: "fw",
            C.DATA_ATTESTATION_CHAIN: "chain",
        }
        if tag in names:
            value = tx.get(names[tag])
        elif tag in _TRUST_TAGS:
            value = tx.get("ta/%04x" % _TRUST_TAGS[tag])
        else:
            raise _Refusal(C.SW_REF_NOT_FOUND)
        if value is None:
            raise _Refusal(C.SW_REF_NOT_FOUND)
        return value

    def _generate_key(self, cmd, tx):
        if cmd.p1 == C.SLOT_TRANSIENT:
            return self._generate_transient(cmd)
        slot = self._slot(cmd, allow_mak=False)
        if cmd.p2 != C.CURVE_P256:
            raise _Refusal(C.SW_INCORRECT_P1P2)
        if len(cmd.data) != 1:
            raise _Refusal(C.SW_WRONG_LENGTH)
        requested = cmd.data[0]
        usage = requested & (C.POLICY_SIGN | C.POLICY_ECDH)
        if requested & ~_HOST_POLICY_BITS or not usage:
            raise _Refusal(C.SW_WRONG_DATA)  # unknown bits, ATTEST, or no usage at all
        if key_nvm_name(slot) in tx:
            raise _Refusal(C.SW_ALREADY_EXISTS)  # DELETE KEY first: no silent overwrite
        policy = usage | C.POLICY_NON_EXPORTABLE | C.POLICY_GENERATED_ON_CHIP
        record, point = encode_key_record(policy, generate_scalar(self._rng))
        tx[key_nvm_name(slot)] = record
        return point

    # The transient key object (se_consts.SLOT_TRANSIENT): RAM only, never staged in `tx`.

    def _generate_transient(self, cmd):
        if cmd.p2 != C.CURVE_P256:
            raise _Refusal(C.SW_INCORRECT_P1P2)
        if len(cmd.data) != 1:
            raise _Refusal(C.SW_WRONG_LENGTH)
        if cmd.data[0] != C.POLICY_ECDH:
            raise _Refusal(C.SW_WRONG_DATA)  # an ephemeral key agreement key, nothing else
        policy = C.POLICY_ECDH | C.POLICY_NON_EXPORTABLE | C.POLICY_GENERATED_ON_CHIP
        record, point = encode_key_record(policy, generate_scalar(self._rng))
        self._transient = record
        return point

    def _transient_key(self):
        if self._transient is None:
            raise _Refusal(C.SW_REF_NOT_FOUND)
        return _decode_key_record(self._transient)

    def _get_public_key(self, cmd, tx):
        self._no_data(cmd)
        self._p2_zero(cmd)
        if cmd.p1 == C.SLOT_TRANSIENT:
            policy, _, point = self._transient_key()
            return bytes((policy,)) + point
        policy, _, point = self._key(tx, self._slot(cmd, allow_mak=True))
        return bytes((policy,)) + point

    def _delete_key(self, cmd, tx):
        self._no_data(cmd)
        self._p2_zero(cmd)
        if cmd.p1 == C.SLOT_TRANSIENT:
            self._transient_key()
            self._transient = None
            return b""
        slot = self._slot(cmd, allow_mak=False)
        self._key(tx, slot)
        tx.delete(key_nvm_name(slot))
        tx.delete("cert/%d" % slot)  # the certificate goes with its key
        return b""

    def _sign(self, cmd, tx):
        self._p2_zero(cmd)
        slot = self._slot(cmd, allow_mak=False)
        if len(cmd.data) != 32:
            raise _Refusal(C.SW_WRONG_LENGTH)
        policy, scalar, _ = self._key(tx, slot)
        if not policy & C.POLICY_SIGN:
            raise _Refusal(C.SW_CONDITIONS)
        return _private_key(scalar).sign(cmd.data, ec.ECDSA(Prehashed(hashes.SHA256())))

    def _verify(self, cmd, tx):
        self._p2_zero(cmd)
        fields = _parse_tlvs(cmd.data)
        if fields is None:
            raise _Refusal(C.SW_WRONG_DATA)
        if cmd.p1 == C.VERIFY_WITH_POINT:
            point = fields.get(C.TAG_POINT)
            if point is None:
                raise _Refusal(C.SW_WRONG_DATA)
            try:
                point = check_p256_point(point)
            except DerError:
                raise _Refusal(C.SW_WRONG_DATA) from None
        else:
            slot = self._slot(cmd, allow_mak=True)
            if C.TAG_POINT in fields:
                raise _Refusal(C.SW_WRONG_DATA)
            point = self._key(tx, slot)[2]
        digest = fields.get(C.TAG_DIGEST)
        if digest is None or len(digest) != 32:
            raise _Refusal(C.SW_WRONG_DATA)
        sig_der = fields.get(C.TAG_SIG_DER)
        sig_raw = fields.get(C.TAG_SIG_RAW)
        if (sig_der is None) == (sig_raw is None):
            raise _Refusal(C.SW_WRONG_DATA)  # exactly one signature encoding
        try:
            if sig_der is not None:
                ecdsa_der_to_raw(sig_der)  # strict DER, r and s in [1, n-1]
                canonical = sig_der
            else:
                canonical = ecdsa_raw_to_der(sig_raw)  # 64 bytes, r and s in [1, n-1]
        except DerError:
            raise _Refusal(C.SW_WRONG_DATA) from None
        public_key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
        try:
            public_key.verify(canonical, digest, ec.ECDSA(Prehashed(hashes.SHA256())))
        except InvalidSignature:
            raise _Refusal(C.SW_VERIFY_FAILED) from None
        return b""

    def _ecdh(self, cmd, tx):
        self._p2_zero(cmd)
        if cmd.p1 == C.SLOT_TRANSIENT:
            if len(cmd.data) != 65:
                raise _Refusal(C.SW_WRONG_LENGTH)
            policy, scalar, _ = self._transient_key()
        else:
            slot = self._slot(cmd, allow_mak=False)
            if len(cmd.data) != 65:
                raise _Refusal(C.SW_WRONG_LENGTH)
            policy, scalar, _ = self._key(tx, slot)
        if not policy & C.POLICY_ECDH:
            raise _Refusal(C.SW_CONDITIONS)
        try:
            # Invalid-curve defence: the peer point must be on P-256 (SEC 1 3.2.2.1).
            point = check_p256_point(cmd.data)
            peer = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
            return _private_key(scalar).exchange(ec.ECDH(), peer)
        except (DerError, ValueError):
            raise _Refusal(C.SW_WRONG_DATA) from None

    def _attest(self, cmd, tx):
        self._p2_zero(cmd)
        slot = self._slot(cmd, allow_mak=True)
        nonce = cmd.data
        if not 1 <= len(nonce) <= C.ATTEST_NONCE_MAX:
            raise _Refusal(C.SW_WRONG_LENGTH)
        policy, _, point = self._key(tx, slot)
        mak = tx.get(key_nvm_name(C.SLOT_MAK))
        se_uid = tx.get("uid")
        firmware = tx.get("fw")
        if mak is None or se_uid is None or firmware is None:
            raise _Refusal(C.SW_CONDITIONS)  # a chip that never went through fab
        statement = encode_statement(
            se_uid, slot, point, policy, self._life_cycle(tx), firmware, nonce
        )
        signature = _private_key(_decode_key_record(mak)[1]).sign(
            statement, ec.ECDSA(hashes.SHA256())
        )
        return encode_signed_attestation(statement, signature)

    def _put_cert(self, cmd, tx):
        self._p2_zero(cmd)
        slot = self._slot(cmd, allow_mak=False)
        if not cmd.data:
            raise _Refusal(C.SW_WRONG_LENGTH)
        if len(cmd.data) > C.CERT_MAX:
            raise _Refusal(C.SW_NOT_ENOUGH_MEMORY)
        try:
            check_single(cmd.data, TAG_SEQUENCE)
        except DerError:
            raise _Refusal(C.SW_WRONG_DATA) from None
        self._key(tx, slot)
        tx["cert/%d" % slot] = cmd.data
        return b""

    def _get_cert(self, cmd, tx):
        self._no_data(cmd)
        self._p2_zero(cmd)
        slot = self._slot(cmd, allow_mak=True)
        cert = tx.get("cert/%d" % slot)
        if cert is None:
            raise _Refusal(C.SW_REF_NOT_FOUND)
        return cert

    def _counter(self, cmd, tx):
        counter_id = cmd.p1
        if counter_id >= C.COUNTER_COUNT:
            raise _Refusal(C.SW_INCORRECT_P1P2)
        op = cmd.p2
        name = "ctr/%d" % counter_id
        value = struct.unpack(">I", tx.get(name, b"\x00\x00\x00\x00"))[0]
        if op == C.COUNTER_READ:
            self._no_data(cmd)
            return struct.pack(">I", value)
        if op == C.COUNTER_INCREMENT:
            self._no_data(cmd)
            if value >= _COUNTER_MAX:
                raise _Refusal(C.SW_CONDITIONS)  # saturated: never wraps
            value += 1
        elif op == C.COUNTER_ADVANCE:
            if len(cmd.data) != 4:
                raise _Refusal(C.SW_WRONG_LENGTH)
            target = struct.unpack(">I", cmd.data)[0]
            if target < value:
                raise _Refusal(C.SW_WRONG_DATA)
            if target == value:
                return struct.pack(">I", value)
            value = target
        else:
            raise _Refusal(C.SW_INCORRECT_P1P2)
        tx[name] = struct.pack(">I", value)
        return struct.pack(">I", value)

    @staticmethod
    def _object_name(cmd):
        if cmd.p1 >= C.DATA_OBJECT_COUNT or cmd.p2 != 0:
            raise _Refusal(C.SW_INCORRECT_P1P2)
        return "obj/%d" % cmd.p1

    def _read_data_object(self, cmd, tx):
        self._no_data(cmd)
        value = tx.get(self._object_name(cmd))
        if value is None:
            raise _Refusal(C.SW_REF_NOT_FOUND)
        return value

    def _write_data_object(self, cmd, tx):
        name = self._object_name(cmd)
        if not cmd.data or len(cmd.data) > C.DATA_OBJECT_MAX:
            raise _Refusal(C.SW_WRONG_LENGTH)
        tx[name] = cmd.data
        return b""

    def _get_random(self, cmd, tx):
        if cmd.p1 or cmd.p2:
            raise _Refusal(C.SW_INCORRECT_P1P2)
        self._no_data(cmd)
        if cmd.le is None or cmd.le > C.GET_RANDOM_MAX:
            raise _Refusal(C.SW_WRONG_LENGTH)
        return bytes(self._rng(cmd.le))

    # -- SCP03 ----------------------------------------------------------------------------

    def _initialize_update(self, cmd, tx):
        if cmd.p2 != 0:
            raise _Refusal(C.SW_INCORRECT_P1P2)
        if len(cmd.data) != 8:
            raise _Refusal(C.SW_WRONG_LENGTH)
        failures = struct.unpack(">H", tx.get("scp/fail", b"\x00\x00"))[0]
        if failures >= C.SCP03_FAILURE_LIMIT:
            raise _Refusal(C.SW_AUTH_BLOCKED)
        kvn = cmd.p1
        if kvn != 0 and kvn not in self._kvns(tx):
            raise _Refusal(C.SW_REF_NOT_FOUND)
        if not self._kvns(tx):
            raise _Refusal(C.SW_REF_NOT_FOUND)
        counter = int.from_bytes(tx.get("scp/seq", b"\x00\x00\x00"), "big")
        if counter >= _SEQ_MAX:
            raise _Refusal(C.SW_CONDITIONS)  # GP Amd D 6.2.2.1: counter exhausted
        counter += 1  # each INITIALIZE UPDATE consumes one value, persisted before use
        card = self._scp_card()
        self._store_block = 0
        try:
            response = card.initialize_update(kvn, cmd.p2, cmd.data, counter)
        except _scp_error_class() as exc:
            raise _Refusal(exc.sw) from None
        tx["scp/seq"] = counter.to_bytes(3, "big")
        return bytes(response)

    def _external_authenticate(self, cmd, tx):
        card = self._scp_card()
        try:
            card.external_authenticate(cmd.raw)
        except _scp_error_class() as exc:
            persist = self._failure_increment(tx) if _counts_as_failure(exc) else None
            raise _Refusal(exc.sw, persist) from None
        self._store_block = 0
        return b""

    def _put_key(self, cmd, tx):
        self._admin_allowed(tx, replaced_kvn=cmd.p1)
        if cmd.p2 != _PUT_KEY_P2:
            raise _Refusal(C.SW_INCORRECT_P1P2)
        if len(cmd.data) != _PUT_KEY_LEN:
            raise _Refusal(C.SW_WRONG_LENGTH)
        new_kvn = cmd.data[0]
        if not 1 <= new_kvn <= _KVN_MAX:
            raise _Refusal(C.SW_WRONG_DATA)
        dek = bytes(self._scp.dek)
        keys = []
        kcvs = b""
        for i in range(3):
            key_type, block_len, key_len, encrypted, kcv_len, kcv = _PUT_KEY_COMPONENT.unpack_from(
                cmd.data, 1 + i * _PUT_KEY_COMPONENT.size
            )
            if key_type != _KEY_TYPE_AES or block_len != 0x11 or key_len != 0x10 or kcv_len != 3:
                raise _Refusal(C.SW_WRONG_DATA)
            key = _aes_cbc_decrypt_zero_iv(dek, encrypted)
            if _kcv(key) != kcv:  # not secret: a KCV is public by design
                raise _Refusal(C.SW_WRONG_DATA)
            keys.append(key)
            kcvs += kcv
        old_kvn = cmd.p1
        loaded = self._kvns(tx)
        if old_kvn == 0:
            if new_kvn in loaded:
                raise _Refusal(C.SW_ALREADY_EXISTS)
            if len(loaded) >= _MAX_KEY_SETS:
                raise _Refusal(C.SW_NOT_ENOUGH_MEMORY)
        else:
            if old_kvn not in loaded:
                raise _Refusal(C.SW_REF_NOT_FOUND)
            if new_kvn != old_kvn and new_kvn in loaded:
                raise _Refusal(C.SW_ALREADY_EXISTS)
            tx.delete(scp_nvm_name(old_kvn))
        tx[scp_nvm_name(new_kvn)] = b"".join(keys)
        # The running session keeps its session keys (GP CS 2.3 11.8.1).
        return bytes((new_kvn,)) + kcvs

    def _store_data(self, cmd, tx):
        self._admin_allowed(tx)
        if cmd.p1 & ~(_STORE_LAST_BLOCK | _STORE_DGI_FORMAT):
            raise _Refusal(C.SW_INCORRECT_P1P2)
        if cmd.p2 != self._store_block & 0xFF:
            raise _Refusal(C.SW_INCORRECT_P1P2)  # GP CS 2.3 11.11.2.2: blocks in sequence
        if not cmd.data:
            raise _Refusal(C.SW_WRONG_LENGTH)
        reader = memoryview(cmd.data)
        pos = 0
        staged = {}
        while pos < len(reader):
            if pos + 3 > len(reader):
                raise _Refusal(C.SW_WRONG_DATA)
            dgi = reader[pos] << 8 | reader[pos + 1]
            length = reader[pos + 2]
            pos += 3
            if length == _DGI_LONG_LENGTH:
                if pos + 2 > len(reader):
                    raise _Refusal(C.SW_WRONG_DATA)
                length = reader[pos] << 8 | reader[pos + 1]
                pos += 2
            if pos + length > len(reader):
                raise _Refusal(C.SW_WRONG_DATA)
            value = bytes(reader[pos : pos + length])
            pos += length
            if dgi not in _TRUST_DGIS:
                raise _Refusal(C.SW_REF_NOT_FOUND)
            try:
                if dgi == C.DGI_FIRMWARE_KEY:
                    check_p256_point(value)
                else:
                    check_single(value, TAG_SEQUENCE)
            except DerError:
                raise _Refusal(C.SW_WRONG_DATA) from None
            staged["ta/%04x" % dgi] = value
        for name, value in staged.items():
            tx[name] = value
        self._store_block = 0 if cmd.p1 & _STORE_LAST_BLOCK else self._store_block + 1
        return b""

    def _set_status(self, cmd, tx):
        self._no_data(cmd)
        if cmd.p1 != _SET_STATUS_P1_CARD:
            raise _Refusal(C.SW_INCORRECT_P1P2)
        new_state = cmd.p2
        if new_state not in C.LC_NAMES:
            raise _Refusal(C.SW_WRONG_DATA)
        if new_state not in _TRANSITIONS.get(self._life_cycle(tx), ()):
            raise _Refusal(C.SW_CONDITIONS)
        tx["lc"] = bytes((new_state,))
        return b""

    _HANDLERS = {
        C.INS_GET_DATA: "_get_data",
        C.INS_GENERATE_KEY: "_generate_key",
        C.INS_GET_PUBLIC_KEY: "_get_public_key",
        C.INS_DELETE_KEY: "_delete_key",
        C.INS_SIGN: "_sign",
        C.INS_VERIFY: "_verify",
        C.INS_ECDH: "_ecdh",
        C.INS_ATTEST: "_attest",
        C.INS_PUT_CERT: "_put_cert",
        C.INS_GET_CERT: "_get_cert",
        C.INS_COUNTER: "_counter",
        C.INS_READ_DATA_OBJECT: "_read_data_object",
        C.INS_WRITE_DATA_OBJECT: "_write_data_object",
        C.INS_GET_RANDOM: "_get_random",
        C.INS_INITIALIZE_UPDATE: "_initialize_update",
        C.INS_EXTERNAL_AUTHENTICATE: "_external_authenticate",
        C.INS_PUT_KEY: "_put_key",
        C.INS_STORE_DATA: "_store_data",
        C.INS_SET_STATUS: "_set_status",
    }


# ---------------------------------------------------------------------------------------


def _is_kvn_name(name):
    if not name.startswith("scp/") or len(name) != 6:
        return False
    try:
        int(name[4:], 16)
    except ValueError:
        return False
    return True


def _parse_tlvs(data):
    # VERIFY data: 1-byte tag, 1-byte length TLVs; each known tag at most once.
    fields = {}
    pos = 0
    while pos < len(data):
        if pos + 2 > len(data):
            return None
        tag = data[pos]
        length = data[pos + 1]
        pos += 2
        if pos + length > len(data) or tag in fields:
            return None
        if tag not in (C.TAG_POINT, C.TAG_DIGEST, C.TAG_SIG_DER, C.TAG_SIG_RAW):
            return None
        fields[tag] = bytes(data[pos : pos + length])
        pos += length
    return fields


def _aes_cbc_decrypt_zero_iv(key, data):
    decryptor = Cipher(algorithms.AES(key), modes.CBC(b"\x00" * 16)).decryptor()
    return decryptor.update(data) + decryptor.finalize()


def _kcv(key):
    encryptor = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    return (encryptor.update(_KCV_INPUT) + encryptor.finalize())[:3]


def _counts_as_failure(exc):
    # Scp03CardError marks refused cryptograms and C-MACs; fall back on the status word.
    return getattr(exc, "counts_as_failure", exc.sw in _COUNTED_SCP_SW)


def _scp_error_class():
    from fleetid.sim.scp03_card import Scp03CardError

    return Scp03CardError


__all__ = [
    "Chip",
    "SW_FILE_NOT_FOUND",
    "encode_key_record",
    "fab_initialise",
    "fab_store_attestation_chain",
    "generate_scalar",
    "key_nvm_name",
    "scp_nvm_name",
]
