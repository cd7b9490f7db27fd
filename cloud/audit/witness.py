"""The witness side of checkpoints: it co-signs checkpoint statements and keeps an anchor
(its latest signed checkpoint) that a truncated log cannot fake."""

import binascii
import json
import os
import threading

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from fleetid.cloud.audit.checkpoints import checkpoint_statement
from fleetid.cloud.audit.codec import CHECKPOINT_DOMAIN, canonical_json, to_hex, valid_value
from fleetid.cloud.audit.errors import AuditError
from fleetid.cloud.audit.filestore import write_atomically
from fleetid.cloud.audit.signers import key_id, trusted_keys


class AnchoringWitness:
    """The witness side of checkpoints: signs with `signer` (HsmSigner / KeySigner) and
    keeps, in `anchor_path`, the latest checkpoint it signed (the anchor).

    Why: a log can be cut after any entry and its tail rewritten together with the
    registry's head row; the result is a valid, shorter chain.  What the cut cannot change
    is the witness's own record of how far the log went.  `audit verify --witness-anchor
    FILE` compares the log against it (read_witness_anchor).  The witness also refuses to
    sign a checkpoint that covers fewer entries than its anchor, or the same number with
    another head (AuditError(STATE)): it never vouches for a rolled-back log.

    Anchor file (JSON, written atomically): {"covers", "head", "time", "witness_key",
    "witness_sig"}: the signed checkpoint statement's fields and the witness's signature
    over it, so a reader can check the anchor came from the witness.  In production the
    witness is another party and the file lives with it; the embedded line keeps it in
    <line>/witness/anchor.json.
    """

    def __init__(self, signer, anchor_path):
        self.signer = signer
        self.anchor_path = os.fspath(anchor_path)
        self._lock = threading.Lock()

    def public_key(self):
        return self.signer.public_key()

    def sign(self, statement):
        statement = bytes(statement)
        if not statement.startswith(CHECKPOINT_DOMAIN):
            raise AuditError(AuditError.SIGNER, "the witness signs checkpoint statements only")
        try:
            signed = json.loads(statement[len(CHECKPOINT_DOMAIN):].decode("ascii"))
            covers, head, when = signed["covers"], signed["head"], signed["time"]
        except (ValueError, KeyError, TypeError):
            raise AuditError(AuditError.SIGNER, "not a checkpoint statement") from None
        if checkpoint_statement(covers, head, when) != statement:
            raise AuditError(AuditError.SIGNER, "not a canonical checkpoint statement")
        with self._lock:
            anchor = _read_anchor_file(self.anchor_path)
            if anchor is not None:
                if covers < anchor["covers"]:
                    raise AuditError(AuditError.STATE, "the witness signed %d entries "
                                     "already; refuses %d" % (anchor["covers"], covers))
                if covers == anchor["covers"] and head != anchor["head"]:
                    raise AuditError(AuditError.STATE, "the witness signed another head "
                                     "for %d entries" % covers)
            signature = bytes(self.signer.sign(statement))
            record = {"covers": covers, "head": head, "time": when,
                      "witness_key": key_id(self.signer.public_key()),
                      "witness_sig": to_hex(signature)}
            directory = os.path.dirname(os.path.abspath(self.anchor_path))
            os.makedirs(directory, exist_ok=True)
            write_atomically(self.anchor_path, [canonical_json(record) + b"\n"])
        return signature


def _read_anchor_file(path):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise AuditError(AuditError.IO, "witness anchor: %s" % (exc.strerror or exc)) \
            from None
    try:
        anchor = json.loads(data.decode("ascii"))
        problem = not isinstance(anchor, dict) or set(anchor) != {
            "covers", "head", "time", "witness_key", "witness_sig"}
        if not problem:
            problem = not (valid_value("int", anchor["covers"]) and anchor["covers"] >= 1
                           and valid_value("hex32", anchor["head"])
                           and valid_value("time", anchor["time"])
                           and valid_value("hex32", anchor["witness_key"])
                           and valid_value("hex", anchor["witness_sig"]))
    except (ValueError, UnicodeDecodeError):
        problem = True
    if problem:
        raise AuditError(AuditError.STATE, "witness anchor %s is not an anchor file" % path)
    return anchor


def read_witness_anchor(path, witness_public_key):
    """The (covers, head hex) a witness anchor file records, after checking its signature
    under one of the witness's public keys (same forms as verify_log takes).

    Raises AuditError(IO) unreadable, AuditError(STATE) not an anchor file or missing,
    AuditError(SIGNER) not signed by the witness.
    """
    anchor = _read_anchor_file(path)
    if anchor is None:
        raise AuditError(AuditError.STATE, "no witness anchor at %s" % path)
    public = trusted_keys(witness_public_key, "witness").get(anchor["witness_key"])
    if public is None:
        raise AuditError(AuditError.SIGNER, "the anchor is signed by another witness key")
    statement = checkpoint_statement(anchor["covers"], anchor["head"], anchor["time"])
    try:
        public.verify(binascii.unhexlify(anchor["witness_sig"]), statement,
                      ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        raise AuditError(AuditError.SIGNER, "the anchor's signature does not verify") \
            from None
    return anchor["covers"], anchor["head"]
