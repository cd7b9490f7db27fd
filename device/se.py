# SeSession: the fleetid applet's commands as domain verbs.  Portable: CPython and
# MicroPython.  No crypto here: the SE does it; this layer builds each command from the
# table in common/se_consts.py, checks the shape of each answer, and returns plain values.
#
# It sits on `send_apdu(cla, ins, p1, p2, data=b"", le=None, extended=None) -> data`
# (common/apdu.py ApduProtocol.send_apdu, possibly over an SCP03 host's transceive), which
# is the only place a status word becomes an exception (an ApduError subclass with `.sw`:
# VerificationFailed for a signature that does not verify, ReferenceNotFound for an empty
# slot, ConditionsNotSatisfied for a life-cycle or policy refusal, ...).  An answer with
# the wrong shape for its command raises ApduFormatError.
#
# Heap: the wire constants are private const() copies of common/se_consts.py (folded into
# the bytecode at compile time, so a device does not load the whole table;
# tests/device/test_se_session.py checks every copy against se_consts).  Helpers are
# shared so that each verb stays a few bytecodes: on the MicroPython unix port, every
# function costs about 110 bytes of heap before its body.

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


from fleetid.common.errors import ApduFormatError

# Copies of common/se_consts.py (see the header).
_CLA_ISO = const(0x00)
_CLA_PROPRIETARY = const(0x80)
_INS_SELECT = const(0xA4)
_INS_GET_DATA = const(0xCA)
_INS_GENERATE_KEY = const(0x46)
_INS_GET_PUBLIC_KEY = const(0x48)
_INS_DELETE_KEY = const(0x4A)
_INS_SIGN = const(0x2A)
_INS_VERIFY = const(0x2C)
_INS_ECDH = const(0x86)
_INS_ATTEST = const(0x3A)
_INS_PUT_CERT = const(0xDA)
_INS_GET_CERT = const(0xCB)
_INS_COUNTER = const(0x32)
_INS_READ_DATA_OBJECT = const(0xB0)
_INS_WRITE_DATA_OBJECT = const(0xD6)
_INS_GET_RANDOM = const(0x84)
_INS_PUT_KEY = const(0xD8)
_INS_STORE_DATA = const(0xE2)
_INS_SET_STATUS = const(0xF0)
_DATA_SE_UID = const(0x0101)
_DATA_FIRMWARE_VERSION = const(0x0102)
_DATA_LIFE_CYCLE = const(0x0103)
_DATA_ATTESTATION_CHAIN = const(0x0104)
_DATA_FREE_SLOTS = const(0x0105)
_SLOT_LAST = const(15)  # SLOT_COUNT - 1
_CURVE_P256 = const(0x03)
_SLOT_TRANSIENT = const(0x80)
_POLICY_ECDH = const(0x02)
_VERIFY_WITH_POINT = const(0xFF)
_TAG_POINT = const(0x41)
_TAG_DIGEST = const(0x42)
_TAG_SIG_DER = const(0x43)
_TAG_SIG_RAW = const(0x44)
_COUNTER_READ = const(0x00)
_COUNTER_INCREMENT = const(0x01)
_COUNTER_ADVANCE = const(0x02)
_COUNTER_LAST = const(3)  # COUNTER_COUNT - 1
_OBJECT_LAST = const(15)  # DATA_OBJECT_COUNT - 1
_DATA_OBJECT_MAX = const(1024)
_ATTEST_NONCE_MAX = const(64)
_CERT_MAX = const(2048)
_GET_RANDOM_MAX = const(1024)
AID = b"\xf0fleetid\x01"

# Le choices: short 256 (Le byte 00) for answers that always fit, extended 65536 (Le
# 0000) for answers that may not (certificate chains, certificates, attestations; the
# applet's table says responses over 256 bytes need an extended Le).
_LE_SHORT = const(256)
_LE_LONG = const(65536)

_POINT_LEN = const(65)  # uncompressed P-256 point 04 || X || Y (SEC 1 2.3.3)
_DIGEST_LEN = const(32)

# ISO/IEC 7816-4 SELECT by DF name (P1 04, first or only occurrence P2 00); its answer is
# the FCI template 6F { 84 AID, 85 applet version u16 } (se_consts header).
_P1_SELECT_BY_NAME = const(0x04)
_TAG_FCI = const(0x6F)
_TAG_DF_NAME = const(0x84)
_TAG_APPLET_VERSION = const(0x85)
# PUT KEY P2 (GP CS 2.3 11.8.2.2): b8 = more than one key, key identifier 1.
_PUT_KEY_P2 = const(0x81)
# STORE DATA P1 (GP CS 2.3 11.11.2.1): b8 = last block; b5-b4 = 01: data in DGI format.
_STORE_DATA_LAST = const(0x80)
_STORE_DATA_DGI_FORMAT = const(0x08)
# SET STATUS P1 (GP CS 2.3 11.10.2.1): 0x80 = the card (Issuer Security Domain).
_SET_STATUS_CARD = const(0x80)


def _bad(ins):
    return ApduFormatError("malformed answer to INS %02X" % ins)


def _range(name, value, low, high):
    if not isinstance(value, int) or isinstance(value, bool) or value < low or value > high:
        raise ValueError("%s must be %d..%d" % (name, low, high))
    return value


def _bytes(name, value, low, high):
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise ValueError(name + " must be bytes")
    _range(name + " length", len(value), low, high)
    return bytes(value)


def _fci_value(fci, tag):
    # One level of BER-TLV with 1-byte tags and short lengths (the FCI is tiny).
    i = 0
    while i + 2 <= len(fci):
        end = i + 2 + fci[i + 1]
        if fci[i + 1] > 0x7F or end > len(fci):
            break
        if fci[i] == tag:
            return fci[i + 2 : end]
        i = end
    raise _bad(_INS_SELECT)


def split_der_sequence(data):
    """Split concatenated DER SEQUENCEs (a certificate chain) into a list of bytes.

    Params: data: bytes, each element a complete DER SEQUENCE (tag 30, definite length,
        at most 3 length octets).
    Returns: list of bytes.
    Raises: ApduFormatError when an element is not a SEQUENCE or runs past the end.
    """
    out = []
    i = 0
    n = len(data)
    while i < n:
        if data[i] != 0x30 or i + 2 > n:
            raise _bad(_INS_GET_DATA)
        length = data[i + 1]
        hdr = 2
        if length > 0x7F:
            count = length & 0x7F
            if count < 1 or count > 3 or i + 2 + count > n:
                raise _bad(_INS_GET_DATA)
            length = 0
            for k in range(count):
                length = (length << 8) | data[i + 2 + k]
            hdr += count
        end = i + hdr + length
        if end > n:
            raise _bad(_INS_GET_DATA)
        out.append(bytes(data[i:end]))
        i = end
    return out


class SeInfo:
    """What GET DATA says about the SE.

    Attributes: uid (16 B), firmware_version (3 B: major, minor, patch), life_cycle (int,
    se_consts.LC_*), free_slots (int), attestation_chain (list of DER certificates: the
    MAK certificate first, then up to the SE vendor root).
    """

    def __init__(self, uid, firmware_version, life_cycle, free_slots, attestation_chain):
        self.uid = uid
        self.firmware_version = firmware_version
        self.life_cycle = life_cycle
        self.free_slots = free_slots
        self.attestation_chain = attestation_chain

    def firmware_string(self):
        """Firmware version as "major.minor.patch"."""
        return "%d.%d.%d" % tuple(self.firmware_version)

    def life_cycle_name(self):
        """GlobalPlatform name of the life-cycle state (GP CS 2.3 Table 11-3), else hex."""
        names = {0x01: "OP_READY", 0x07: "INITIALIZED", 0x0F: "SECURED",
                 0x7F: "CARD_LOCKED", 0xFF: "TERMINATED"}
        return names.get(self.life_cycle, "0x%02X" % self.life_cycle)


class SeSession:
    """The fleetid applet, one method per command.

    Params: send_apdu: callable `send_apdu(cla, ins, p1, p2, data=b"", le=None,
        extended=None) -> bytes`, or an object with that method (ApduProtocol).
    Every method raises: ApduError subclasses for refusals (from send_apdu),
        ApduFormatError for an answer of the wrong shape, LinkError from the link below,
        ValueError for arguments out of range (before anything is sent).
    """

    def __init__(self, send_apdu):
        if not callable(send_apdu):
            send_apdu = send_apdu.send_apdu
        self._send = send_apdu

    def _cmd(self, ins, p1=0, p2=0, data=b"", le=None, size=-1):
        # One proprietary command; `size` >= 0 requires an answer of exactly that length.
        answer = self._send(_CLA_PROPRIETARY, ins, p1, p2, data, le)
        if size >= 0 and len(answer) != size:
            raise _bad(ins)
        return answer

    def _slot(self, ins, slot, data=b"", le=_LE_SHORT, size=-1, first=0):
        return self._cmd(ins, _range("slot", slot, first, _SLOT_LAST), 0, data, le, size)

    # -- selection and identity -------------------------------------------------------

    def select(self):
        """SELECT the applet by AID (ISO/IEC 7816-4 11.1.1).

        Returns: the applet version (int, e.g. 0x0100).
        Raises: ReferenceNotFound when the SE has no such applet; ApduFormatError.
        """
        fci = self._send(_CLA_ISO, _INS_SELECT, _P1_SELECT_BY_NAME, 0, AID, _LE_SHORT)
        fci = _fci_value(fci, _TAG_FCI)
        version = _fci_value(fci, _TAG_APPLET_VERSION)
        if _fci_value(fci, _TAG_DF_NAME) != AID or len(version) != 2:
            raise _bad(_INS_SELECT)
        return (version[0] << 8) | version[1]

    def get_data(self, tag, size=-1, le=_LE_SHORT):
        """GET DATA of one se_consts.DATA_* tag.

        Params: size: required answer length (-1: any).  le: expected length.
        Returns: the raw value (bytes).
        """
        _range("tag", tag, 0, 0xFFFF)
        return self._cmd(_INS_GET_DATA, tag >> 8, tag & 0xFF, b"", le, size)

    def uid(self):
        """Returns: the 16-byte SE unique id."""
        return self.get_data(_DATA_SE_UID, 16)

    def firmware_version(self):
        """Returns: 3 bytes (major, minor, patch)."""
        return self.get_data(_DATA_FIRMWARE_VERSION, 3)

    def life_cycle(self):
        """Returns: the GlobalPlatform card life-cycle state (se_consts.LC_*)."""
        return self.get_data(_DATA_LIFE_CYCLE, 1)[0]

    def free_slots(self):
        """Returns: the number of free key slots."""
        return self.get_data(_DATA_FREE_SLOTS, 1)[0]

    def attestation_chain(self):
        """Returns: list of DER certificates, the MAK certificate first."""
        return split_der_sequence(self.get_data(_DATA_ATTESTATION_CHAIN, -1, _LE_LONG))

    def info(self):
        """Returns: SeInfo (UID, firmware, life cycle, free slots, attestation chain)."""
        return SeInfo(self.uid(), self.firmware_version(), self.life_cycle(),
                      self.free_slots(), self.attestation_chain())

    # -- keys ---------------------------------------------------------------------------

    def generate_key(self, slot, policy):
        """GENERATE KEY: a P-256 key pair made inside the SE.

        Params: slot: 1..15 (slot 0 is the MAK).  policy: se_consts.POLICY_* usage flags;
            the SE adds NON_EXPORTABLE and GENERATED_ON_CHIP itself.
        Returns: the 65-byte uncompressed public point.
        Raises: AlreadyExists (slot in use), ConditionsNotSatisfied, ...
        """
        _range("slot", slot, 1, _SLOT_LAST)
        point = self._cmd(_INS_GENERATE_KEY, slot, _CURVE_P256,
                          bytes((_range("policy", policy, 0, 0xFF),)), _LE_SHORT, _POINT_LEN)
        if point[0] != 0x04:
            raise _bad(_INS_GENERATE_KEY)
        return point

    def public_key(self, slot):
        """GET PUBLIC KEY.  Returns: (policy int, 65-byte point).

        Raises: ReferenceNotFound for an empty slot.
        """
        data = self._slot(_INS_GET_PUBLIC_KEY, slot, b"", _LE_SHORT, 1 + _POINT_LEN)
        if data[1] != 0x04:
            raise _bad(_INS_GET_PUBLIC_KEY)
        return data[0], data[1:]

    def delete_key(self, slot):
        """DELETE KEY.  Raises: ReferenceNotFound for an empty slot."""
        self._slot(_INS_DELETE_KEY, slot, b"", None, 0, 1)

    def sign(self, slot, digest):
        """SIGN a 32-byte digest with the key in `slot`.

        Returns: the DER ECDSA-Sig-Value.
        Raises: ConditionsNotSatisfied when the key's policy has no SIGN.
        """
        digest = _bytes("digest", digest, _DIGEST_LEN, _DIGEST_LEN)
        sig = self._slot(_INS_SIGN, slot, digest)
        if len(sig) < 8 or sig[0] != 0x30:
            raise _bad(_INS_SIGN)
        return sig

    def verify(self, digest, signature, slot=None, point=None, raw=False):
        """VERIFY a signature inside the SE, with the key in `slot` or a given `point`.

        Params: digest: 32 bytes.  signature: DER (or 64-byte r||s when raw=True).
            Exactly one of slot / point (65-byte uncompressed P-256 point).
        Returns: None when the signature verifies.
        Raises: VerificationFailed (SW 6300) when it does not; WrongData when malformed.
        """
        digest = _bytes("digest", digest, _DIGEST_LEN, _DIGEST_LEN)
        signature = _bytes("signature", signature, 64 if raw else 8, 64 if raw else 72)
        if (slot is None) == (point is None):
            raise ValueError("give exactly one of slot, point")
        data = bytearray()
        if point is None:
            p1 = _range("slot", slot, 0, _SLOT_LAST)
        else:
            p1 = _VERIFY_WITH_POINT
            data.extend(bytes((_TAG_POINT, _POINT_LEN)))
            data.extend(_bytes("point", point, _POINT_LEN, _POINT_LEN))
        data.extend(bytes((_TAG_DIGEST, _DIGEST_LEN)))
        data.extend(digest)
        data.extend(bytes((_TAG_SIG_RAW if raw else _TAG_SIG_DER, len(signature))))
        data.extend(signature)
        self._cmd(_INS_VERIFY, p1, 0, bytes(data), None, 0)

    def ecdh(self, slot, peer_point):
        """ECDH with the key in `slot` and a peer's 65-byte point.

        Returns: the 32-byte shared X coordinate.
        """
        peer_point = _bytes("peer point", peer_point, _POINT_LEN, _POINT_LEN)
        return self._slot(_INS_ECDH, slot, peer_point, _LE_SHORT, 32)

    def generate_transient_key(self):
        """GENERATE KEY into the transient (RAM-only) key object: an ECDH-only P-256 key
        that replaces the previous one and is lost on power loss (se_consts.SLOT_TRANSIENT).
        Writes no NVM: the TLS 1.3 ECDHE share.

        Returns: the 65-byte uncompressed public point.
        """
        point = self._cmd(_INS_GENERATE_KEY, _SLOT_TRANSIENT, _CURVE_P256,
                          bytes((_POLICY_ECDH,)), _LE_SHORT, _POINT_LEN)
        if point[0] != 0x04:
            raise _bad(_INS_GENERATE_KEY)
        return point

    def ecdh_transient(self, peer_point):
        """ECDH with the transient key and a peer's 65-byte point.

        Returns: the 32-byte shared X coordinate.
        Raises: ReferenceNotFound (no transient key since power-up), WrongData (the point
            is not on P-256).
        """
        peer_point = _bytes("peer point", peer_point, _POINT_LEN, _POINT_LEN)
        return self._cmd(_INS_ECDH, _SLOT_TRANSIENT, 0, peer_point, _LE_SHORT, 32)

    def attest(self, slot, nonce):
        """ATTEST the key in `slot` with the manufacturer attestation key.

        Params: nonce: 1..64 bytes (the verifier's challenge).
        Returns: DER SignedAttestation (decode with fleetid.common.attestation).
        """
        nonce = _bytes("nonce", nonce, 1, _ATTEST_NONCE_MAX)
        signed = self._slot(_INS_ATTEST, slot, nonce, _LE_LONG)
        if len(signed) < 2 or signed[0] != 0x30:
            raise _bad(_INS_ATTEST)
        return signed

    def put_cert(self, slot, cert_der):
        """PUT CERT: store a DER certificate beside the key in `slot`."""
        self._slot(_INS_PUT_CERT, slot, _bytes("certificate", cert_der, 1, _CERT_MAX), None, 0)

    def get_cert(self, slot):
        """GET CERT.  Returns: DER certificate.  Raises: ReferenceNotFound if none."""
        return self._slot(_INS_GET_CERT, slot, b"", _LE_LONG)

    # -- counters, data objects, random --------------------------------------------------

    def _counter(self, counter_id, op, data=b""):
        _range("counter id", counter_id, 0, _COUNTER_LAST)
        value = self._cmd(_INS_COUNTER, counter_id, op, data, _LE_SHORT, 4)
        return (value[0] << 24) | (value[1] << 16) | (value[2] << 8) | value[3]

    def counter_read(self, counter_id):
        """Returns: the monotonic counter's value (u32)."""
        return self._counter(counter_id, _COUNTER_READ)

    def counter_increment(self, counter_id):
        """Increment by one.  Returns: the value after."""
        return self._counter(counter_id, _COUNTER_INCREMENT)

    def counter_advance(self, counter_id, target):
        """Advance to max(current, target).  Returns: the value after.

        Raises: WrongData when target is below the current value.
        """
        _range("target", target, 0, 0xFFFFFFFF)
        data = bytes((target >> 24, (target >> 16) & 0xFF, (target >> 8) & 0xFF, target & 0xFF))
        return self._counter(counter_id, _COUNTER_ADVANCE, data)

    def read_object(self, object_id):
        """READ DATA OBJECT.  Returns: bytes.  Raises: ReferenceNotFound if never written."""
        _range("object id", object_id, 0, _OBJECT_LAST)
        return self._cmd(_INS_READ_DATA_OBJECT, object_id, 0, b"", _LE_LONG)

    def write_object(self, object_id, data):
        """WRITE DATA OBJECT (atomic in the SE).  data: 1..1024 bytes."""
        _range("object id", object_id, 0, _OBJECT_LAST)
        data = _bytes("data", data, 1, _DATA_OBJECT_MAX)
        self._cmd(_INS_WRITE_DATA_OBJECT, object_id, 0, data, None, 0)

    def get_random(self, n):
        """GET RANDOM.  n: 1..1024.  Returns: n bytes from the SE's RNG."""
        _range("n", n, 1, _GET_RANDOM_MAX)
        return self._cmd(_INS_GET_RANDOM, 0, 0, b"", n, n)

    # -- personalisation (inside SCP03 only; the SE refuses them otherwise) -------------

    def put_key(self, payload, old_kvn=0):
        """PUT KEY (GP CS 2.3 11.8): replace or add an SCP03 key set.

        Params: payload: new KVN || 3 key components (see se_consts; built by the HSM).
            old_kvn: key set to replace, 0 to add.
        Returns: the SE's answer: new KVN || 3 key check values.
        """
        _range("old kvn", old_kvn, 0, 0xFF)
        payload = _bytes("payload", payload, 1, 255)
        return self._cmd(_INS_PUT_KEY, old_kvn, _PUT_KEY_P2, payload, _LE_SHORT)

    def store_data(self, dgi, value, last=True, block=0, more=()):
        """STORE DATA one DGI, or several in one command (GP CS 2.3 11.11): trust anchors
        before SECURED.

        Params: dgi: se_consts.DGI_*.  value: bytes.  last / block: P1 b8 and P2 block
            number.  more: further (dgi, value) pairs for the same command (the data field
            is a sequence of DGIs, GP CS 2.3 11.11.3.2; the applet stores all or none).
            The DGI length is one byte below 255, else FF || u16 (GP CS 2.3 11.11.3.2).
        """
        _range("block", block, 0, 0xFF)
        data = bytearray()
        for tag, val in ((dgi, value),) + tuple(more):
            _range("dgi", tag, 0, 0xFFFF)
            n = len(_bytes("value", val, 0, 0xFFFE))
            data.extend(bytes((tag >> 8, tag & 0xFF)))
            data.extend(bytes((n,)) if n < 0xFF else bytes((0xFF, n >> 8, n & 0xFF)))
            data.extend(val)
        p1 = _STORE_DATA_DGI_FORMAT | (_STORE_DATA_LAST if last else 0)
        self._cmd(_INS_STORE_DATA, p1, block, bytes(data), None, 0)

    def set_status(self, state):
        """SET STATUS of the card (GP CS 2.3 11.10): move the life cycle to `state`."""
        self._cmd(_INS_SET_STATUS, _SET_STATUS_CARD, _range("state", state, 0, 0xFF), b"",
                  None, 0)
