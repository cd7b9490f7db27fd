"""Sizing of the audit log: bytes per sealed injection entry and per checkpoint, from
sample entries of production-like widths."""

import os

from fleetid.cloud.audit.codec import CHECKPOINT, GENESIS_PREV, new_fields, seal
from fleetid.cloud.audit.entries import injection_entry


def sample_injection_entry(serial, rng=os.urandom, when=1795000000.0):
    """A realistic injection entry for sizing: production-like field widths (16-byte UID,
    20-byte certificate serial, a batch CA's distinguished name)."""
    return injection_entry(
        serial=serial, se_uid=rng(16), slot=2, aid=bytes.fromhex("a000000620466c656574"),
        cert_serial=rng(20), cert_fingerprint=rng(32),
        issuing_ca="CN=fleetid batch CA 2026-11 line-3,OU=batch 2026-11-23-A,O=fleetid",
        batch="2026-11-23-A", station="line-3/station-17", operator="op-4711",
        hsm_session="hsm-pool-3/session-211", attestation_hash=rng(32), when=when)


def entry_size_stats(count=1000, rng=os.urandom):
    """Bytes per sealed injection entry over `count` sample entries, and per checkpoint
    (estimated from 72-byte DER signatures, the P-256 maximum).

    Returns dict: injection_min, injection_max, injection_mean, checkpoint_bytes.
    The sizes of sample entries: tests check them against the per-injection budget (the
    bench measures the bytes per device of a real run instead).
    """
    sizes = []
    prev = GENESIS_PREV
    for seq in range(count):
        entry = seal(sample_injection_entry(seq + 1, rng), seq, prev)
        prev = entry.hash_hex
        sizes.append(len(entry.line))
    checkpoint = new_fields(CHECKPOINT, 1795000000.0)
    checkpoint.update(covers=count, head=prev, line_key="a" * 64, witness_key="b" * 64,
                      line_sig="30" * 72, witness_sig="30" * 72)
    return {
        "injection_min": min(sizes),
        "injection_max": max(sizes),
        "injection_mean": sum(sizes) / len(sizes),
        "checkpoint_bytes": len(seal(checkpoint, count, prev).line),
    }
