"""Over-the-air SE administration: SCP03 sessions between HSM-held keys and a fielded SE,
carried by any `transceive(apdu) -> response` (over MQTT: CloudMqtt.apdu_channel(device),
which the device's agent relays verbatim to its SE).

    key_sets = [KeySet("scp03-master", 0x31)]                 # what the device holds now
    rotate_scp03_keys(hsm, transceive, prims, se_uid,
                      current=KeySet("scp03-master", 0x31), new=KeySet("scp03-master-2", 0x32))
    install_trust_anchor(hsm, transceive, prims, se_uid, KeySet("scp03-master-2", 0x32),
                         se_consts.DGI_FIRMWARE_CERT, cert_der)

Who holds what: the per-device static keys are diversified inside the HSM from a master
(cloud/hsm); the PUT KEY payload is wrapped inside the HSM under the current DEK; the
session keys are computed with the HSM's AES-CMAC (ephemeral, they reach this process, as
on the factory line).  The agent relays bytes: every command is C-MAC'd and C-DEC'd, every
answer R-MAC'd and R-ENC'd (level 0x33, which the applet requires once SECURED), so it
sees neither key nor plaintext.  Replay: each session starts with the card's challenge,
derived from its persisted sequence counter, and every command's MAC chains on the last;
a captured relay replayed later fails the host cryptogram or finds no session (6982).

Power cuts: PUT KEY replaces the current set in one NVM commit, so the SE holds the old
set or the new one.  `open_admin` tries the candidate sets in order, so a rotation cut
short is finished by calling rotate_scp03_keys again: it opens with whichever set the SE
has, and does nothing more when that is already the new one.
"""

from fleetid.cloud.hsm import interface as hsm_interface
from fleetid.common import scp03
from fleetid.common.apdu import ApduProtocol
from fleetid.common.errors import FleetidError, ReferenceNotFound, SecureChannelError
from fleetid.common.se_consts import SCP_LEVEL_OTA
from fleetid.device.se import SeSession


class OtaError(FleetidError):
    """Over-the-air administration failed.  reason: NO_KEY_SET (none of the candidate key
    sets opens a session), KCV (the SE's key check values differ from the HSM's)."""

    NO_KEY_SET = "no_key_set"
    KCV = "kcv"

    def __init__(self, reason, detail=""):
        super().__init__(reason + (": " + detail if detail else ""))
        self.reason = reason
        self.detail = detail


class KeySet:
    """A per-device SCP03 key set as the cloud names it: the HSM master it is diversified
    from and its key version number on the card."""

    def __init__(self, master_label, kvn):
        self.master_label = master_label
        self.kvn = kvn

    def __eq__(self, other):
        return (isinstance(other, KeySet) and other.master_label == self.master_label
                and other.kvn == self.kvn)

    def __repr__(self):
        return "KeySet(%r, 0x%02X)" % (self.master_label, self.kvn)


class AdminSession:
    """An open SCP03 session at level 0x33: `se` (SeSession whose commands are wrapped),
    `key_set` (the KeySet that opened it), `handle` (its HSM handle).  close() releases
    the HSM objects and forgets the session keys."""

    def __init__(self, host, handle, key_set, hsm):
        self.host = host
        self.handle = handle
        self.key_set = key_set
        self._hsm = hsm
        self.se = SeSession(ApduProtocol(host.transceive))

    def close(self):
        self.host.close()
        self._hsm.release(self.handle)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_admin(hsm, transceive, prims, se_uid, candidates, level=SCP_LEVEL_OTA):
    """Open an SCP03 session with the first candidate key set the SE holds.

    A set the SE does not hold answers INITIALIZE UPDATE with 6A88 (its KVN is unknown)
    or, if the KVN exists with other keys, fails the card cryptogram; either way the next
    candidate is tried.
    Params: hsm: HsmBackend.  transceive: fn(apdu) -> response.  prims: SCP03 primitives.
        se_uid: 16 bytes.  candidates: KeySet list.  level: SCP03 security level.
    Returns: AdminSession.  Raises: OtaError(NO_KEY_SET), link / transport errors.
    """
    tried = []
    for key_set in candidates:
        handle = hsm.diversify(key_set.master_label, se_uid, kvn=key_set.kvn)
        host = scp03.Scp03Host(
            transceive, prims,
            lambda h, c, _ki, _handle=handle: hsm.scp03_session_keys(_handle, h, c),
            level=level, kvn=key_set.kvn)
        try:
            host.open()
        except (ReferenceNotFound, SecureChannelError) as exc:
            hsm.release(handle)
            tried.append("%r: %s" % (key_set, type(exc).__name__))
            continue
        except BaseException:
            hsm.release(handle)
            raise
        return AdminSession(host, handle, key_set, hsm)
    raise OtaError(OtaError.NO_KEY_SET, "; ".join(tried))


def rotate_scp03_keys(hsm, transceive, prims, se_uid, current, new):
    """Replace the SE's SCP03 key set `current` with `new` (PUT KEY inside SCP03 at 0x33),
    then prove it: a fresh session opens with `new` (the card cryptogram, checked in
    constant time, shows the SE holds those keys).

    Idempotent: if the SE already holds `new` (a rotation cut short after its PUT KEY),
    only the proof runs.
    Returns: "rotated" or "already".
    Raises: OtaError (NO_KEY_SET, KCV), ApduError (the SE refused), transport errors.
    """
    with open_admin(hsm, transceive, prims, se_uid, [current, new]) as session:
        if session.key_set == new:
            return "already"
        with hsm.diversify(new.master_label, se_uid, kvn=new.kvn) as new_keys:
            payload = hsm.put_key_payload(new_keys, session.handle, new.kvn)
            answer = session.se.put_key(payload, old_kvn=current.kvn)
            if answer != hsm_interface.put_key_response_expected(payload):
                raise OtaError(OtaError.KCV, "the SE's key check values differ")
    with open_admin(hsm, transceive, prims, se_uid, [new]):
        pass
    return "rotated"


def install_trust_anchor(hsm, transceive, prims, se_uid, key_set, dgi, value, more=()):
    """STORE DATA one trust anchor (or several in one command, `more` = (dgi, value)
    pairs: the applet stores all or none) inside SCP03 at 0x33 with `key_set`.
    Raises: OtaError(NO_KEY_SET), ApduError, transport errors."""
    with open_admin(hsm, transceive, prims, se_uid, [key_set]) as session:
        session.se.store_data(dgi, value, more=tuple(more))
