"""`fleetid se`: run SE commands over any bus (emulator socket, Linux i2c-dev, spidev).

A thin shell over fleetid.device.stack.open_se (bus URI -> bus -> T=1' link -> ApduProtocol
-> SeSession, SCP03 on demand).  Errors from any layer become one short
line (click.ClickException), never a traceback.
"""

import hashlib
import os

import click

from fleetid.cli.options import bus_options
from fleetid.cli.se_connection import SeConnection, describe_error, where
from fleetid.common.errors import FleetidError

_POLICY_NAMES = (
    (0x01, "sign"),
    (0x02, "ecdh"),
    (0x04, "attest"),
    (0x40, "non-exportable"),
    (0x80, "generated-on-chip"),
)


class _SeCommand(click.Command):
    """An `se` sub-command: a library error becomes one line that names the command and
    the slot / object / counter it addressed, then what the SE or the link said."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except FleetidError as exc:
            raise click.ClickException(where(ctx, exc) + describe_error(exc)) from None
        except ValueError as exc:  # BusUriError, argument ranges, malformed files
            raise click.ClickException(where(ctx) + str(exc)) from None


class _SeGroup(click.Group):
    """Turns library errors raised by any sub-command into one-line ClickExceptions."""

    command_class = _SeCommand
    group_class = type  # sub-groups (counter, data) are _SeGroups too

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except FleetidError as exc:
            raise click.ClickException(describe_error(exc)) from None
        except ValueError as exc:  # BusUriError, argument ranges, malformed files
            raise click.ClickException(str(exc)) from None


def _clip(value, limit=80):
    """A user's value for an error line, cut to `limit` characters."""
    return value if len(value) <= limit else value[:limit] + "..."


def _hex(name, value, length=None, low=None, high=None):
    try:
        data = bytes.fromhex(value.replace(":", "").replace(" ", ""))
    except ValueError:
        raise click.BadParameter("%r is not hex" % _clip(value), param_hint=name) from None
    if length is not None and len(data) != length:
        raise click.BadParameter("must be %d bytes (%d hex digits), got %d bytes"
                                 % (length, 2 * length, len(data)), param_hint=name)
    if low is not None and not low <= len(data) <= high:
        raise click.BadParameter("must be %d..%d bytes, got %d" % (low, high, len(data)),
                                 param_hint=name)
    return data


def _policy_text(policy):
    names = [name for bit, name in _POLICY_NAMES if policy & bit]
    return "0x%02X (%s)" % (policy, ", ".join(names) or "none")


def _session(ctx):
    return ctx.find_object(SeConnection).session()


_SLOT = click.IntRange(0, 15)


@click.group(cls=_SeGroup)
@bus_options("bus_uri")
@click.pass_context
def se(ctx, bus_uri, t1_profile, timeout_ms):
    """Run SE commands over a bus: the emulator's socket or a real chip.

    \b
    Examples:
      fleetid se --bus sim:unix:/tmp/se.sock info
      fleetid se --bus sim:unix:/tmp/se.sock genkey --slot 2 --usage sign
      fleetid se --bus sim:unix:/tmp/se.sock sign --slot 2 --digest <64 hex digits>
      fleetid se --bus linux:i2c:/dev/i2c-1:0x48 --t1-profile se05x info
    """
    conn = SeConnection(bus_uri, t1_profile, timeout_ms)
    ctx.obj = conn
    ctx.call_on_close(conn.close)


@se.command()
@click.pass_context
def info(ctx):
    """Print UID, firmware, life cycle, free slots and the attestation chain.

    \b
    Example:
      fleetid se --bus sim:unix:/tmp/se.sock info
    """
    from cryptography import x509

    details = _session(ctx).info()
    click.echo("UID:          %s" % details.uid.hex())
    click.echo("firmware:     %s" % details.firmware_string())
    click.echo("life cycle:   %s (0x%02X)" % (details.life_cycle_name(), details.life_cycle))
    click.echo("free slots:   %d" % details.free_slots)
    click.echo("attestation chain (%d certificates, MAK first):" % len(details.attestation_chain))
    for i, der_cert in enumerate(details.attestation_chain):
        try:
            subject = x509.load_der_x509_certificate(der_cert).subject.rfc4514_string()
        except ValueError:
            subject = "(unparsable certificate, %d bytes)" % len(der_cert)
        click.echo("  [%d] %s" % (i, subject))


@se.command()
@click.option("--slot", required=True, type=click.IntRange(1, 15), help="Key slot (1..15).")
@click.option("--usage", default="sign", show_default=True,
              type=click.Choice(["sign", "ecdh", "sign,ecdh"]), help="Key policy.")
@click.pass_context
def genkey(ctx, slot, usage):
    """Generate a P-256 key pair inside the SE; print the public point (hex).

    \b
    Examples:
      fleetid se --bus sim:unix:/tmp/se.sock genkey --slot 2 --usage sign
      fleetid se --bus sim:unix:/tmp/se.sock genkey --slot 3 --usage sign,ecdh
    """
    from fleetid.common import se_consts as C

    policy = 0
    if "sign" in usage:
        policy |= C.POLICY_SIGN
    if "ecdh" in usage:
        policy |= C.POLICY_ECDH
    click.echo(_session(ctx).generate_key(slot, policy).hex())


@se.command()
@click.option("--slot", required=True, type=_SLOT, help="Key slot (0 = the MAK).")
@click.option("--pem", is_flag=True, help="Print a SubjectPublicKeyInfo PEM instead of hex.")
@click.pass_context
def pubkey(ctx, slot, pem):
    """Print the public key of a slot and its policy.

    \b
    Examples:
      fleetid se --bus sim:unix:/tmp/se.sock pubkey --slot 2
      fleetid se --bus sim:unix:/tmp/se.sock pubkey --slot 2 --pem > key.pem
    """
    policy, point = _session(ctx).public_key(slot)
    if pem:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
        click.echo(key.public_bytes(serialization.Encoding.PEM,
                                    serialization.PublicFormat.SubjectPublicKeyInfo).decode(),
                   nl=False)
        return
    click.echo("policy: %s" % _policy_text(policy))
    click.echo("point:  %s" % point.hex())


@se.command()
@click.option("--slot", required=True, type=click.IntRange(1, 15), help="Key slot (1..15).")
@click.pass_context
def delkey(ctx, slot):
    """Delete the key in a slot.

    \b
    Example:
      fleetid se --bus sim:unix:/tmp/se.sock delkey --slot 2
    """
    _session(ctx).delete_key(slot)
    click.echo("slot %d deleted" % slot)


def _digest_option(f):
    f = click.option("--data-file", type=click.File("rb"),
                     help="Hash this file with SHA-256 instead of giving --digest.")(f)
    return click.option("--digest", help="32-byte SHA-256 digest, hex.")(f)


def _get_digest(digest, data_file):
    if (digest is None) == (data_file is None):
        raise click.UsageError("give exactly one of --digest, --data-file")
    if data_file is not None:
        return hashlib.sha256(data_file.read()).digest()
    return _hex("--digest", digest, 32)


@se.command()
@click.option("--slot", required=True, type=click.IntRange(1, 15), help="Key slot.")
@_digest_option
@click.pass_context
def sign(ctx, slot, digest, data_file):
    """Sign a digest inside the SE; print the DER ECDSA signature (hex).

    \b
    Examples:
      fleetid se --bus sim:unix:/tmp/se.sock sign --slot 2 --digest $(sha256sum f | cut -c1-64)
      fleetid se --bus sim:unix:/tmp/se.sock sign --slot 2 --data-file firmware.bin
    """
    digest = _get_digest(digest, data_file)
    click.echo(_session(ctx).sign(slot, digest).hex())


@se.command()
@click.option("--slot", type=_SLOT, help="Verify with the key in this slot ...")
@click.option("--pubkey", "point_hex", help="... or with this 65-byte point (hex).")
@_digest_option
@click.option("--signature", required=True, help="Signature, hex (DER unless --raw).")
@click.option("--raw", is_flag=True, help="The signature is 64-byte r||s.")
@click.pass_context
def verify(ctx, slot, point_hex, digest, data_file, signature, raw):
    """Have the SE verify a signature; exit 1 if it does not verify.

    \b
    Examples:
      fleetid se --bus sim:unix:/tmp/se.sock verify --slot 2 --digest <hex> --signature <hex>
      fleetid se --bus sim:unix:/tmp/se.sock verify --pubkey 04... --data-file f --signature <hex>
    """
    from fleetid.common.errors import VerificationFailed

    if (slot is None) == (point_hex is None):
        raise click.UsageError("give exactly one of --slot, --pubkey")
    point = _hex("--pubkey", point_hex, 65) if point_hex is not None else None
    sig = _hex("--signature", signature, 64) if raw else _hex("--signature", signature, None, 8, 72)
    digest = _get_digest(digest, data_file)
    try:
        _session(ctx).verify(digest, sig, slot=slot, point=point, raw=raw)
    except VerificationFailed:
        raise click.ClickException("signature does NOT verify") from None
    click.echo("signature valid")


@se.command()
@click.option("--slot", required=True, type=click.IntRange(1, 15), help="Key slot (ECDH policy).")
@click.option("--peer", required=True, help="Peer public point, 65 bytes hex (04||X||Y).")
@click.pass_context
def ecdh(ctx, slot, peer):
    """ECDH inside the SE; print the 32-byte shared secret X coordinate (hex).

    \b
    Example:
      fleetid se --bus sim:unix:/tmp/se.sock ecdh --slot 3 --peer 04...
    """
    peer_point = _hex("--peer", peer, 65)
    click.echo(_session(ctx).ecdh(slot, peer_point).hex())


@se.command()
@click.option("--slot", required=True, type=_SLOT, help="Key slot to attest.")
@click.option("--nonce", help="1..64 bytes hex (the verifier's challenge; default random 16).")
@click.option("--out", type=click.Path(dir_okay=False), help="Write the DER SignedAttestation.")
@click.pass_context
def attest(ctx, slot, nonce, out):
    """Attest a key with the manufacturer attestation key; check and print the statement.

    The statement and the SE's attestation chain are checked the way the issuing CA
    checks evidence (fleetid.cloud.ca.evidence.EvidenceVerifier: path validation with
    cryptography.x509.verification, then the MAK signature), trusting the vendor root at
    the end of the chain: this proves the chain is consistent, not that the vendor is one
    the fleet trusts.

    \b
    Examples:
      fleetid se --bus sim:unix:/tmp/se.sock attest --slot 2 --nonce 00112233
      fleetid se --bus sim:unix:/tmp/se.sock attest --slot 2 --out slot2.att.der
    """
    from fleetid.common import attestation

    nonce_bytes = _hex("--nonce", nonce, None, 1, 64) if nonce else os.urandom(16)
    session = _session(ctx)
    signed_der = session.attest(slot, nonce_bytes)
    chain = session.attestation_chain()
    signed = attestation.decode_signed_attestation(signed_der)
    st = signed.statement
    if st.nonce != nonce_bytes:
        raise click.ClickException("attestation carries another nonce: replayed or broken")
    if st.slot != slot or st.public_point != session.public_key(slot)[1]:
        raise click.ClickException("attestation is for another key than the one in slot %d" % slot)
    certs = _authenticate_evidence(signed_der, chain)
    if out:
        try:
            with open(out, "wb") as f:
                f.write(signed_der)
        except OSError as exc:
            raise click.ClickException("--out %s: %s" % (out, exc.strerror or exc)) from None
    click.echo("slot:         %d" % st.slot)
    click.echo("SE UID:       %s" % st.se_uid.hex())
    click.echo("public key:   %s" % st.public_point.hex())
    click.echo("key policy:   %s" % _policy_text(st.key_policy))
    click.echo("life cycle:   0x%02X" % st.life_cycle)
    click.echo("firmware:     %d.%d.%d" % tuple(st.firmware_version))
    click.echo("nonce:        %s" % st.nonce.hex())
    click.echo("signed by:    %s" % certs[0].subject.rfc4514_string())
    click.echo("chain:        verified up to %s" % certs[-1].subject.rfc4514_string())
    if out:
        click.echo("written:      %s" % out)


def _authenticate_evidence(signed_der, chain):
    """Check a SignedAttestation and the SE's chain as the issuing CA does, trusting the
    chain's own last certificate; returns the chain's certificates (leaf first)."""
    import datetime

    from cryptography import x509

    from fleetid.cloud.ca.errors import AttestationError
    from fleetid.cloud.ca.evidence import EvidenceVerifier
    from fleetid.common import attestation

    if not chain:
        raise click.ClickException("the SE has no attestation chain")
    try:
        certs = [x509.load_der_x509_certificate(c) for c in chain]
    except ValueError as exc:
        raise click.ClickException("attestation chain does NOT parse: %s" % exc) from None
    bundle = attestation.encode_evidence_bundle([signed_der], chain)
    try:
        EvidenceVerifier([certs[-1]]).authenticate(
            bundle, datetime.datetime.now(datetime.timezone.utc))
    except AttestationError as exc:
        raise click.ClickException("attestation does NOT verify: %s" % exc) from None
    return certs


@se.group()
def counter():
    """Monotonic counters (anti-rollback): read, increment, advance.

    \b
    Examples:
      fleetid se --bus sim:unix:/tmp/se.sock counter read --id 0
      fleetid se --bus sim:unix:/tmp/se.sock counter increment --id 0
      fleetid se --bus sim:unix:/tmp/se.sock counter advance --id 0 --to 42
    """


_COUNTER_ID = click.option("--id", "counter_id", default=0, show_default=True,
                           type=click.IntRange(0, 3), help="Counter (0 = firmware).")


@counter.command("read")
@_COUNTER_ID
@click.pass_context
def counter_read(ctx, counter_id):
    """Print a counter's value.

    \b
    Example:
      fleetid se --bus sim:unix:/tmp/se.sock counter read --id 0
    """
    click.echo(_session(ctx).counter_read(counter_id))


@counter.command("increment")
@_COUNTER_ID
@click.pass_context
def counter_increment(ctx, counter_id):
    """Increment a counter by one; print the new value.

    \b
    Example:
      fleetid se --bus sim:unix:/tmp/se.sock counter increment --id 0
    """
    click.echo(_session(ctx).counter_increment(counter_id))


@counter.command("advance")
@_COUNTER_ID
@click.option("--to", "target", required=True, type=click.IntRange(0, 0xFFFFFFFF),
              help="Target value (refused if below the current value).")
@click.pass_context
def counter_advance(ctx, counter_id, target):
    """Advance a counter to a target value; print the new value.

    \b
    Example:
      fleetid se --bus sim:unix:/tmp/se.sock counter advance --id 0 --to 42
    """
    click.echo(_session(ctx).counter_advance(counter_id, target))


@se.group()
def data():
    """Data objects: small NVM records, each write atomic.

    \b
    Examples:
      fleetid se --bus sim:unix:/tmp/se.sock data write --id 1 --hex 00112233
      fleetid se --bus sim:unix:/tmp/se.sock data read --id 1
    """


_OBJECT_ID = click.option("--id", "object_id", required=True, type=click.IntRange(0, 15),
                          help="Object id (0 = the rotation journal).")


@data.command("read")
@_OBJECT_ID
@click.option("--out", type=click.File("wb"), help="Write the bytes to a file instead of hex.")
@click.pass_context
def data_read(ctx, object_id, out):
    """Print a data object (hex) or write it to a file.

    \b
    Example:
      fleetid se --bus sim:unix:/tmp/se.sock data read --id 1
    """
    value = _session(ctx).read_object(object_id)
    if out is not None:
        out.write(value)
    else:
        click.echo(value.hex())


@data.command("write")
@_OBJECT_ID
@click.option("--hex", "hex_value", help="The bytes, hex.")
@click.option("--file", "in_file", type=click.File("rb"), help="... or the bytes of a file.")
@click.pass_context
def data_write(ctx, object_id, hex_value, in_file):
    """Write a data object (1..1024 bytes, atomic).

    \b
    Examples:
      fleetid se --bus sim:unix:/tmp/se.sock data write --id 1 --hex 00112233
      fleetid se --bus sim:unix:/tmp/se.sock data write --id 1 --file journal.bin
    """
    if (hex_value is None) == (in_file is None):
        raise click.UsageError("give exactly one of --hex, --file")
    value = _hex("--hex", hex_value, None, 1, 1024) if hex_value else in_file.read()
    _session(ctx).write_object(object_id, value)
    click.echo("object %d: %d bytes written" % (object_id, len(value)))


@se.command()
@click.option("--count", default=32, show_default=True, type=click.IntRange(1, 1024),
              help="How many bytes.")
@click.pass_context
def random(ctx, count):
    """Print random bytes from the SE's RNG (hex).

    \b
    Example:
      fleetid se --bus sim:unix:/tmp/se.sock random --count 16
    """
    click.echo(_session(ctx).get_random(count).hex())


def _level(ctx, param, value):
    try:
        level = int(value, 0)
    except ValueError:
        raise click.BadParameter("%r is not an integer such as 0x33" % _clip(value)) from None
    if level not in (0x01, 0x03, 0x11, 0x13, 0x33):
        raise click.BadParameter("%s is not one of 0x01, 0x03, 0x11, 0x13, 0x33" % value)
    return level


@se.command("scp03-check")
@click.option("--fab-record", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The chip's JSON fab record (UID, key set; no keys).")
@click.option("--vendor-dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="The SE vendor's folder: its transport-keys/ store holds the chip's SCP03 "
                   "transport keys (they never travel with the fab record).")
@click.option("--level", default="0x33", show_default=True, callback=_level,
              help="Security level: 0x01 C-MAC, 0x03 +C-DEC, 0x11 +R-MAC, 0x13, 0x33 all.")
@click.pass_context
def scp03_check(ctx, fab_record, vendor_dir, level):
    """Open SCP03 with a chip's transport keys (from the SE vendor's key store) and run a
    wrapped command.  A vendor-side check: the factory line never holds these keys.

    Runs INITIALIZE UPDATE and EXTERNAL AUTHENTICATE at the given level (the card
    cryptogram is checked), then a GET DATA (UID) through the secure channel, and checks
    the answer against the plain one and the fab record.

    \b
    Examples:
      fleetid se --bus sim:unix:/tmp/se.sock scp03-check --fab-record var/chip.json \\
          --vendor-dir var/vendor
      fleetid se --bus sim:unix:/tmp/se.sock scp03-check --fab-record var/chip.json \\
          --vendor-dir var/vendor --level 0x03
    """
    from fleetid.common.host.hostcrypto import CryptographyPrimitives
    from fleetid.common.scp03 import static_session_keys_fn
    from fleetid.sim.fab import load_fab_record

    try:
        record = load_fab_record(fab_record, vendor_dir)
    except OSError as exc:
        raise click.ClickException("cannot read the fab record %s or its keys in %s: %s"
                                   % (fab_record, vendor_dir, exc.strerror or exc)) from None
    except ValueError as exc:
        raise click.ClickException("cannot read the fab record %s: %s"
                                   % (fab_record, exc)) from None
    conn = ctx.find_object(SeConnection)
    plain_uid = conn.session().uid()
    if plain_uid != record.se_uid:
        raise click.ClickException("this fab record is for SE %s, the bus has SE %s"
                                   % (record.uid_hex, plain_uid.hex()))
    prims = CryptographyPrimitives()
    keys = record.static_keys()
    opened = conn.open_stack()
    wrapped_uid = opened.secure(prims, static_session_keys_fn(prims, keys), level=level,
                                kvn=keys.kvn).uid()
    host = opened.scp
    if wrapped_uid != plain_uid:
        raise click.ClickException("wrapped GET DATA returned another UID")
    click.echo("SCP03 open: KVN 0x%02X, security level 0x%02X, sequence counter %s"
               % (host.key_info[0], level, host.sequence_counter))
    click.echo("wrapped GET DATA (UID) ok: %s" % wrapped_uid.hex())
    opened.close_secure()
