"""`fleetid ota`: over-the-air SE administration and commands to one connected device,
over the fleet's MQTT broker: a thin shell over fleetid.cloud.mqtt.ota (SCP03 from
HSM-held keys, relayed verbatim by the device's agent) and CloudMqtt.request.

The device must be online: its agent runs `fleetid agent run --mqtt ...`.  Every wait is
bounded (--timeout per exchange).  Exit status: 0 done, 1 refused / timed out (the reason
is printed), 2 usage.
"""

import os

import click

from fleetid.cli.agent_device import load_cert
from fleetid.cli.hsm_secret import pass_file_option
from fleetid.cli.mqtt import (broker_option, cloud_client, connect, device_serial, fail,
                              files_option, line_option, open_line, parse_broker)
from fleetid.common.errors import FleetidError


def _ota_options(function):
    function = click.option("--timeout", default=30.0, show_default=True,
                            type=click.FloatRange(1.0, 600.0),
                            help="Seconds to wait for each answer of the device.")(function)
    function = click.option("--device", required=True, metavar="SERIAL",
                            help="The device's name (its certificate CN, e.g. "
                                 "FID-000000001).")(function)
    function = files_option(function)
    function = broker_option(function)
    function = line_option(function)
    return pass_file_option(function)


class _Session:
    """The line, the cloud's MQTT client (its own client id, so a running `fleetid mqtt
    cloud` keeps its session) and the device's SE UID from the registry."""

    def __init__(self, line_dir, files_dir, broker_url, device, timeout, pass_file):
        parse_broker(broker_url)
        self.device = device
        self.timeout = timeout
        self.line = open_line(line_dir, pass_file)
        try:
            self.se_uid = self._se_uid(device)
            self.client = cloud_client(line_dir, files_dir, broker_url,
                                       "fleet-cloud-ota-%d" % os.getpid())
            connect(self.client, min(timeout, 30.0))
        except BaseException:
            self.line.close()
            raise

    def _se_uid(self, device):
        try:
            record = self.line.registry.get_device(device_serial(self.line)(device))
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--device") from None
        except FleetidError:
            raise click.ClickException("--device %s: not in the line's registry"
                                       % device) from None
        if record.status != "committed":
            raise click.ClickException("--device %s: %s in the registry" % (device,
                                                                            record.status))
        return bytes(record.se_uid)

    def request(self, kind, **fields):
        """One command, its reply.  Raises: click.ClickException on refusal / timeout."""
        from fleetid.cloud.mqtt.service import MqttError

        try:
            return self.client.request(self.device, kind, self.timeout, **fields)
        except MqttError as exc:
            raise self.error(exc) from None

    def error(self, exc):
        from fleetid.cloud.mqtt.service import MqttError

        if isinstance(exc, MqttError) and exc.reason == MqttError.TIMEOUT:
            return click.ClickException(
                "device %s: no answer within %.0f s (is its agent running with --mqtt?)"
                % (self.device, self.timeout))
        if isinstance(exc, MqttError) and exc.reason == MqttError.REFUSED:
            return click.ClickException("device %s refused: %s" % (self.device, exc.detail))
        from fleetid.cloud.mqtt.ota import OtaError

        if isinstance(exc, OtaError) and exc.reason == OtaError.NO_KEY_SET:
            return click.ClickException(
                "device %s: its SE holds none of the key sets tried (%s); name the set it "
                "holds with --master and --kvn" % (self.device, exc.detail))
        return fail(exc)

    def ping(self):
        self.request("ping")
        click.echo("device %s: online (ping answered); SE UID %s (registry)"
                   % (self.device, self.se_uid.hex()))

    def relay(self):
        """The device's APDU channel, printing each exchange (INS and status word)."""
        from fleetid.common import se_consts as C

        channel = self.client.apdu_channel(self.device, self.timeout)
        names = {C.INS_INITIALIZE_UPDATE: "INITIALIZE UPDATE",
                 C.INS_EXTERNAL_AUTHENTICATE: "EXTERNAL AUTHENTICATE",
                 C.INS_PUT_KEY: "PUT KEY", C.INS_STORE_DATA: "STORE DATA"}

        def transceive(apdu):
            response = channel(apdu)
            click.echo("  relayed %s (%d bytes) -> SW %s" % (
                names.get(apdu[1], "INS %02X" % apdu[1]), len(apdu), response[-2:].hex()))
            return response

        return transceive

    def close(self):
        self.client.close()
        self.line.close()


def _kvn(value, option):
    try:
        number = int(value, 0)
    except ValueError:
        raise click.BadParameter("%r is not a number" % value, param_hint=option) from None
    if not 1 <= number <= 0x7F:
        raise click.BadParameter("%r is not a key version 0x01..0x7F" % value,
                                 param_hint=option)
    return number


@click.group()
def ota():
    """Over-the-air SE administration and device commands, over the MQTT broker.

    \b
    The cloud opens SCP03 at level 0x33 with keys diversified in the line's HSM; the
    device's agent (`fleetid agent run --mqtt ...`) relays each wrapped APDU to its SE
    verbatim: it holds no key and sees no plaintext.
    \b
    Examples:
      fleetid ota rotate-scp03 --line var/line --broker mqtts://127.0.0.1:8884 \\
          --device FID-000000001 --new-master scp03-master-2 --create-master
      fleetid ota install-fw-key --line var/line --broker mqtts://127.0.0.1:8884 \\
          --device FID-000000001 --fw-cert fw-2027.pem --master scp03-master-2 --kvn 0x32
      fleetid ota rotate --line var/line --broker mqtts://127.0.0.1:8884 \\
          --device FID-000000001
      fleetid ota sign-image --line var/line --key-label fw-2027 --version 1.4.0+7 \\
          --security-counter 5 app.bin app.signed.bin
      fleetid ota certify-fw-key --line var/line --public-key build-key.pub.pem \\
          --name "Acme build server 2027" --out fw-build.pem
    """


@ota.command("rotate-scp03")
@_ota_options
@click.option("--new-master", required=True, help="HSM label of the new SCP03 master.")
@click.option("--create-master", is_flag=True,
              help="Generate --new-master in the HSM first (unless it is there already).")
@click.option("--master", default=None,
              help="HSM label of the master of the set the SE holds now (default: the "
                   "line's).")
@click.option("--kvn", "kvn_text", default="0x31", show_default=True,
              help="Key version of the set the SE holds now.")
@click.option("--new-kvn", "new_kvn_text", default=None,
              help="Key version of the new set (default: --kvn + 1).")
def rotate_scp03_cmd(line_dir, broker_url, files_dir, device, timeout, pass_file,
                     new_master, create_master, master, kvn_text, new_kvn_text):
    """Rotate a device's SCP03 keys (PUT KEY at level 0x33, relayed by its agent), prove
    the new set, and check the old set no longer opens a session.  Run again after an
    interruption: it finishes the job.

    \b
    Example:
      fleetid ota rotate-scp03 --line var/line --broker mqtts://127.0.0.1:8884 \\
          --device FID-000000001 --new-master scp03-master-2 --create-master
    """
    from fleetid.cloud.mqtt.ota import KeySet, OtaError, open_admin, rotate_scp03_keys
    from fleetid.common.host.hostcrypto import CryptographyPrimitives

    kvn = _kvn(kvn_text, "--kvn")
    new_kvn = _kvn(new_kvn_text, "--new-kvn") if new_kvn_text else kvn + 1
    if new_kvn == kvn:
        raise click.BadParameter("must differ from --kvn", param_hint="--new-kvn")
    session = _Session(line_dir, files_dir, broker_url, device, timeout, pass_file)
    try:
        current = KeySet(master or session.line.labels["master"], kvn)
        new = KeySet(new_master, new_kvn)
        _ensure_master(session.line.hsm, new_master, create_master)
        session.ping()
        prims = CryptographyPrimitives()
        click.echo("rotating SCP03 keys %r -> %r" % (current, new))
        result = rotate_scp03_keys(session.line.hsm, session.relay(), prims, session.se_uid,
                                   current, new)
        click.echo("SCP03 keys: %s; the new set opens a session (card cryptogram checked)"
                   % result)
        try:
            open_admin(session.line.hsm, session.relay(), prims, session.se_uid,
                       [current]).close()
        except OtaError:
            click.echo("the old set %r no longer opens a session" % (current,))
        else:
            raise click.ClickException("the old set %r still opens a session" % (current,))
    except (FleetidError, OSError) as exc:
        raise session.error(exc) from None
    finally:
        session.close()


def _ensure_master(hsm, label, create):
    from fleetid.cloud.hsm import HsmError

    if not create:
        return
    try:
        hsm.create_master_key(label)
        click.echo("new SCP03 master %s generated in the HSM" % label)
    except HsmError as exc:
        if exc.reason != HsmError.EXISTS:
            raise
        click.echo("SCP03 master %s already in the HSM" % label)


@ota.command("install-fw-key")
@_ota_options
@click.option("--fw-cert", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The firmware certificate (PEM or DER, from `fleetid pki new-fw-key`).")
@click.option("--slot", "fw_slot", default="a", show_default=True,
              type=click.Choice(["a", "b"]),
              help="Which of the SE's two firmware certificate places (keep the other for "
                   "the key in use until its images are replaced).")
@click.option("--master", default=None,
              help="HSM label of the SCP03 master of the set the SE holds (default: the "
                   "line's).")
@click.option("--kvn", "kvn_text", default="0x31", show_default=True,
              help="Key version of the set the SE holds.")
def install_fw_key_cmd(line_dir, broker_url, files_dir, device, timeout, pass_file, fw_cert,
                       fw_slot, master, kvn_text):
    """Install a firmware-signing certificate in a device's SE (STORE DATA at level 0x33,
    relayed by its agent).  Signed boot then accepts images signed by its key.

    \b
    Example:
      fleetid ota install-fw-key --line var/line --broker mqtts://127.0.0.1:8884 \\
          --device FID-000000001 --fw-cert fw-2027.pem --slot b
    """
    from cryptography.hazmat.primitives import serialization

    from fleetid.cloud.mqtt.ota import KeySet, install_trust_anchor
    from fleetid.common import se_consts as C
    from fleetid.common.host.hostcrypto import CryptographyPrimitives

    kvn = _kvn(kvn_text, "--kvn")
    certificate = load_cert(fw_cert, param_hint="--fw-cert")
    session = _Session(line_dir, files_dir, broker_url, device, timeout, pass_file)
    try:
        try:
            certificate.verify_directly_issued_by(session.line.root_cert)
        except (ValueError, TypeError):
            raise click.ClickException("--fw-cert %s: not issued by the line's fleet root "
                                       "(the SE would refuse it)" % fw_cert) from None
        session.ping()
        dgi = C.DGI_FIRMWARE_CERT_A if fw_slot == "a" else C.DGI_FIRMWARE_CERT_B
        key_set = KeySet(master or session.line.labels["master"], kvn)
        click.echo("installing firmware certificate serial %x in place %s with %r"
                   % (certificate.serial_number, fw_slot.upper(), key_set))
        install_trust_anchor(session.line.hsm, session.relay(), CryptographyPrimitives(),
                             session.se_uid, key_set, dgi,
                             certificate.public_bytes(serialization.Encoding.DER))
        click.echo("firmware certificate installed (DGI %04X)" % dgi)
    except (FleetidError, OSError) as exc:
        raise session.error(exc) from None
    finally:
        session.close()


@ota.command("rotate")
@_ota_options
def rotate_cmd(line_dir, broker_url, files_dir, device, timeout, pass_file):
    """Ask a device's agent to renew its operational credential now (the `rotate`
    command); the agent runs the rotation at once and reports it as telemetry.

    \b
    Example:
      fleetid ota rotate --line var/line --broker mqtts://127.0.0.1:8884 \\
          --device FID-000000001
    """
    from fleetid.common import mqttmsg

    session = _Session(line_dir, files_dir, broker_url, device, timeout, pass_file)
    try:
        session.request(mqttmsg.KIND_ROTATE)
        click.echo("device %s: rotation accepted; it runs at the agent's next step and "
                   "reports as telemetry" % device)
    finally:
        session.close()


def _write_atomically(path, data):
    """Write `data` to `path` through a temporary file beside it (no half-written file)."""
    temporary = "%s.tmp-%d" % (path, os.getpid())
    try:
        with open(temporary, "wb") as writer:
            writer.write(data)
        os.replace(temporary, path)
    except OSError as exc:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise fail(exc) from None


def _number(value, option, limit):
    try:
        number = int(value, 0)
    except ValueError:
        raise click.BadParameter("%r is not a number" % value, param_hint=option) from None
    if not 0 <= number <= limit:
        raise click.BadParameter("%r is not 0..%d" % (value, limit), param_hint=option)
    return number


@ota.command("sign-image")
@line_option
@pass_file_option
@click.option("--key-label", required=True,
              help="HSM label of the firmware-signing key (ECDSA P-256), e.g. the one "
                   "`fleetid pki new-fw-key --label` made, or the line's factory key "
                   "`firmware-signing`.")
@click.option("--version", "version_text", required=True, metavar="MAJ.MIN.REV+BUILD",
              help="The image version, as imgtool writes it (e.g. 1.4.0+7).")
@click.option("--security-counter", required=True, type=click.IntRange(0, 0xFFFFFFFF),
              help="The anti-rollback counter (SEC_CNT, protected): the device's signed "
                   "boot refuses images below its SE's counter.")
@click.option("--header-size", "header_text", default="0x200", show_default=True,
              help="Bytes reserved for the header before the payload (imgtool -H).")
@click.option("--load-addr", "load_text", default="0", show_default=True,
              help="Load address (0: execute in place).")
@click.option("--max-size", default=0x100000, show_default=True, type=click.IntRange(32),
              help="Slot size in bytes: a larger image is refused.")
@click.option("--fw-cert", type=click.Path(exists=True, dir_okay=False), default=None,
              help="The key's firmware certificate (PEM/DER): refuse to sign unless the "
                   "HSM key is its key.")
@click.argument("payload", type=click.Path(exists=True, dir_okay=False))
@click.argument("output", type=click.Path(dir_okay=False))
def sign_image_cmd(line_dir, pass_file, key_label, version_text, security_counter,
                   header_text, load_text, max_size, fw_cert, payload, output):
    """Wrap the raw binary PAYLOAD into a signed MCUboot image OUTPUT (what `imgtool sign
    --pad-header` writes), signed inside the line's HSM by the firmware-signing key
    --key-label: the key never leaves it.  `imgtool verify -k PUBLIC-KEY OUTPUT` accepts
    the result; devices boot it once the key's certificate is installed (`fleetid ota
    install-fw-key`).

    \b
    Example:
      fleetid ota sign-image --line var/line --key-label fw-2027 --version 1.4.0+7 \\
          --security-counter 5 app.bin app.signed.bin
    """
    import hashlib

    from fleetid.cloud.pki.firmware import ImageError, parse_version, sign_firmware_image

    header_size = _number(header_text, "--header-size", 0xFFFF)
    load_addr = _number(load_text, "--load-addr", 0xFFFFFFFF)
    try:
        version = parse_version(version_text)
    except ImageError as exc:
        raise click.BadParameter(exc.detail, param_hint="--version") from None
    size = os.path.getsize(payload)
    if size + header_size > max_size:
        raise click.ClickException("%s: %d B payload + %d B header > slot %d B (--max-size)"
                                   % (payload, size, header_size, max_size))
    certificate = load_cert(fw_cert, param_hint="--fw-cert") if fw_cert else None
    with open(payload, "rb") as reader:
        data = reader.read()
    line = open_line(line_dir, pass_file)
    try:
        image = sign_firmware_image(line.hsm, key_label, data, version, security_counter,
                                    header_size=header_size, load_addr=load_addr,
                                    max_size=max_size, fw_cert=certificate)
    except ImageError as exc:
        raise click.ClickException("%s: %s" % (payload, exc)) from None
    except FleetidError as exc:
        raise fail(exc) from None
    finally:
        line.close()
    _write_atomically(output, image)
    click.echo("%s: MCUboot image %d B, version %s, security counter %d, signed in the HSM "
               "by %r; sha256 %s" % (output, len(image), "%d.%d.%d+%d" % version,
                                     security_counter, key_label,
                                     hashlib.sha256(image).hexdigest()))


@ota.command("certify-fw-key")
@line_option
@pass_file_option
@click.option("--public-key", "public_key_path", required=True,
              type=click.Path(exists=True, dir_okay=False),
              help="The firmware-signing public key: `imgtool getpub -e pem` (PEM), "
                   "`-e raw` (DER) or its default C / Rust array.  Not the private key.")
@click.option("--name", required=True, help="The certificate's CN (the key's name).")
@click.option("--validity-days", default=1826, show_default=True,
              type=click.IntRange(1, 20 * 366), help="Validity of the certificate.")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False),
              help="Where to write the firmware certificate (PEM).")
def certify_fw_key_cmd(line_dir, pass_file, public_key_path, name, validity_days,
                       out_path):
    """Certify an external firmware-signing key (an imgtool ecdsa-p256 key on a build
    server, say) under the fleet root, signed in the line's HSM.  Only the public half
    is read.  Install the certificate with `fleetid ota install-fw-key`; the devices'
    signed boot then accepts images `imgtool sign -k KEY` makes with it.

    \b
    Example:
      imgtool getpub -k build-key.pem -e pem -o build-key.pub.pem
      fleetid ota certify-fw-key --line var/line --public-key build-key.pub.pem \\
          --name "Acme build server 2027" --out fw-build.pem
    """
    import datetime
    import hashlib

    from cryptography.hazmat.primitives import serialization

    from fleetid.cloud.pki.firmware import certify_public_key, load_firmware_public_key

    with open(public_key_path, "rb") as reader:
        data = reader.read(64 * 1024)
    try:
        public_key = load_firmware_public_key(data, public_key_path)
    except FleetidError as exc:
        raise click.BadParameter(exc.detail, param_hint="--public-key") from None
    line = open_line(line_dir, pass_file)
    try:
        certificate = certify_public_key(line.hsm, line.labels["root"], line.root_cert,
                                         public_key, name,
                                         validity=datetime.timedelta(days=validity_days))
    except FleetidError as exc:
        raise fail(exc) from None
    finally:
        line.close()
    _write_atomically(out_path, certificate.public_bytes(serialization.Encoding.PEM))
    spki = public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    click.echo("%s: firmware certificate serial %x, CN %s, under the fleet root; key hash "
               "(MCUboot KEYHASH) %s" % (out_path, certificate.serial_number, name,
                                         hashlib.sha256(spki).hexdigest()))
