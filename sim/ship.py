"""Shipping a lot: the SE vendor delivers the chips' SCP03 transport keys to a factory line
wrapped for the line's HSM, never in plaintext (what chip vendors do with key blocks).

    line_key = load_pem_public_key(open("<line>/pki/transport-wrap.pub.pem", "rb").read())
    doc = ship.ship_keys(vendor_ca, "lot-7", [(uid, (enc, mac, dek)), ...], line_key)
    ship.ship_fab_records(vendor_dir, records, line_key, "lot-7")  # chips from sim.fab

Wrapping (constants in fleetid.cloud.hsm.interface; the line unwraps inside its HSM):

    KEK          32 random bytes, one per shipment
    kek.wrapped  RSAES-OAEP(SHA-1, MGF1-SHA-1) of the KEK under the line's RSA-3072
                 transport wrapping key (RFC 8017 7.1)
    enc|mac|dek  AES key wrap (RFC 3394) of each 16-byte transport key under the KEK
                 (24 bytes each: the 8-byte integrity check value makes a changed blob fail
                 to unwrap)
    kcv          GP Amd D 7.2 key check values of the plaintext keys (public): the line
                 checks them after unwrapping, so a blob moved to another component or chip
                 is refused
    signature    ECDSA-SHA256 by the vendor's root key over the canonical JSON of
                 [format, lot, recipient, kek.wrapped, the chip entry without signature]:
                 the line verifies it against the vendor root it trusts, per chip
    kek.signature  the same over [format, lot, vendor, recipient, kek.wrapped]: the line
                 checks it before it lets the KEK into its HSM

Shipment document (JSON, "fleetid-transport-shipment/1"):

    {"format": ..., "lot": "<lot>", "vendor": "<vendor root subject, RFC 4514>",
     "recipient": "<SHA-256 hex of the line wrapping key's SubjectPublicKeyInfo DER>",
     "kek": {"alg": "rsaes-oaep-sha1", "wrapped": hex, "signature": hex},
     "chips": [{"uid": hex, "kvn": n, "wrap": "aes-kw-rfc3394", "enc": hex, "mac": hex,
                "dek": hex, "kcv": [hex, hex, hex], "signature": hex}, ...]}

It holds no plaintext key: it may travel and be stored with the line's inputs.  The
line side (parsing, signature and recipient checks) is fleetid.cloud.line.shipment.
"""

import hashlib
import json
import os

from cryptography.hazmat.primitives import hashes, keywrap, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fleetid.common import se_consts as C

FORMAT = "fleetid-transport-shipment/1"
KEK_ALG = "rsaes-oaep-sha1"
WRAP_ALG = "aes-kw-rfc3394"
_OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)


def recipient_id(public_key):
    """The id a shipment names its recipient by: SHA-256 hex of the SPKI DER."""
    return hashlib.sha256(public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).hexdigest()


def signed_bytes(doc, chip):
    """The bytes a chip entry's signature covers (the line recomputes the same)."""
    body = dict((k, v) for k, v in chip.items() if k != "signature")
    return json.dumps([doc["format"], doc["lot"], doc["recipient"], doc["kek"]["wrapped"], body],
                      sort_keys=True, separators=(",", ":")).encode()


def signed_header(doc):
    """The bytes the shipment's kek.signature covers (the line recomputes the same)."""
    return json.dumps([doc["format"], doc["lot"], doc["vendor"], doc["recipient"],
                       doc["kek"]["wrapped"]], sort_keys=True, separators=(",", ":")).encode()


def _kcv(key):
    encryptor = Cipher(algorithms.AES(bytes(key)), modes.ECB()).encryptor()
    return (encryptor.update(b"\x01" * 16) + encryptor.finalize())[:3]


def ship_keys(vendor_ca, lot, chips, line_public_key, kvn=C.SCP03_KVN_TRANSPORT, rng=os.urandom):
    """Wrap the transport keys of `chips` for the line whose wrapping key is
    `line_public_key` (an RSAPublicKey, from the line's pki/transport-wrap.pub.pem).

    Params: vendor_ca: sim.fab.VendorCa (signs).  lot: the lot name (1..128 chars).
        chips: [(se_uid bytes, (enc, mac, dek))], 16-byte keys.
    Returns: the shipment document (dict; json.dump it).
    Raises: ValueError for a bad lot name, key size or a non-RSA line key.
    """
    if not isinstance(lot, str) or not 0 < len(lot) <= 128:
        raise ValueError("lot name must be 1..128 characters")
    if not hasattr(line_public_key, "encrypt") or not hasattr(line_public_key, "key_size"):
        raise ValueError("the line's transport wrapping key must be an RSA public key")
    kek = bytearray(rng(32))
    try:
        doc = {"format": FORMAT, "lot": lot, "vendor": vendor_ca.cert.subject.rfc4514_string(),
               "recipient": recipient_id(line_public_key),
               "kek": {"alg": KEK_ALG, "wrapped": line_public_key.encrypt(bytes(kek), _OAEP).hex()},
               "chips": []}
        doc["kek"]["signature"] = vendor_ca.key.sign(signed_header(doc),
                                                     ec.ECDSA(hashes.SHA256())).hex()
        for se_uid, keys in chips:
            if len(keys) != 3 or any(len(k) != 16 for k in keys):
                raise ValueError("transport keys of %s: three 16-byte keys" % bytes(se_uid).hex())
            entry = {"uid": bytes(se_uid).hex(), "kvn": kvn, "wrap": WRAP_ALG}
            for name, key in zip(("enc", "mac", "dek"), keys):
                entry[name] = keywrap.aes_key_wrap(bytes(kek), bytes(key)).hex()
            entry["kcv"] = [_kcv(k).hex() for k in keys]
            entry["signature"] = vendor_ca.key.sign(
                signed_bytes(doc, entry), ec.ECDSA(hashes.SHA256())).hex()
            doc["chips"].append(entry)
        return doc
    finally:
        kek[:] = bytes(len(kek))


def ship_fab_records(vendor_dir, records, line_public_key, lot):
    """Ship chips made by sim.fab: their transport keys come from the vendor's own store
    (<vendor_dir>/transport-keys/).  Returns the shipment document."""
    from fleetid.sim import fab

    vendor_ca = fab.load_or_create_vendor_ca(vendor_dir)
    chips = []
    for record in records:
        keys = fab.load_transport_keys(vendor_dir, record.se_uid)
        if keys["kvn"] != record.kvn:
            raise ValueError("chip %s: the vendor's key set has another KVN" % record.uid_hex)
        chips.append((record.se_uid, (keys["enc"], keys["mac"], keys["dek"])))
    return ship_keys(vendor_ca, lot, chips, line_public_key, kvn=records[0].kvn if records
                     else C.SCP03_KVN_TRANSPORT)


def write_shipment(path, doc):
    """Write a shipment document (no secrets in it: mode 0644)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
