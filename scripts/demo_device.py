#!/usr/bin/env python3
"""Device-side (and two operator-side) steps of the lifecycle demo, scripts/demo.sh.

Device steps talk to a personalised, emulated SE over its bus (`fleetid sim serve`) and to
the fleet cloud over mTLS whose client key is in that SE (fleetid.device.host.se_tls):

    whoami     GET /v1/whoami at the verifier; prints the JSON identity, or the refusal
    enrol      EST simpleenroll (identity cert) / --reenroll simplereenroll (operational
               cert): new key in a spare SE slot, attested, CSR signed in the SE, cert stored
    ack        POST /v1/rotation/ack with the new certificate (closes the overlap window)
    submit-csr POST a CSR file (e.g. from `openssl req`) over the device's mTLS channel
    get-cert   write the certificate of an SE slot as PEM

Operator steps (until the CLI has them):

    cloud-config  a `fleetid cloud serve` configuration on a factory line's PKI, registry
                  and HSM, with a TLS server certificate the fleet root signs in that HSM
    revoke        revoke every certificate of a device in the registry (audited)

Exit status: 0 success, 1 refused / failed (the reason is printed), 2 usage.
"""

import argparse
import base64
import datetime
import json
import os
import sys

from fleetid.common import se_consts as C
from fleetid.common.errors import FleetidError


def _open_se(bus_uri):
    from fleetid.common import t1
    from fleetid.common.apdu import ApduProtocol
    from fleetid.common.t1link import T1Link
    from fleetid.device.bus import open_bus
    from fleetid.device.se import SeSession

    bus = open_bus(bus_uri)
    link = T1Link(bus, profile=t1.PROFILE_GP)
    link.open()
    se = SeSession(ApduProtocol(link))
    se.select()
    return se, link, bus


class Device:
    """The SE session plus the device's trust anchor (fleet root, from the SE)."""

    def __init__(self, bus_uri):
        self.se, self.link, self.bus = _open_se(bus_uri)
        self.root_der = self.se.get_data(C.DATA_TRUST_FLEET_ROOT, -1, 65536)

    def tls(self, slot):
        from fleetid.device.host.se_tls import SeTlsClient

        return SeTlsClient(self.se, slot, [self.se.get_cert(slot)], [self.root_der],
                           connect_timeout=10, io_timeout=30)

    def close(self):
        try:
            self.link.close()
        except FleetidError:
            pass
        self.bus.close()


def _refusal(response):
    return response.body.decode("utf-8", "replace").strip()


def cmd_whoami(args, device):
    client = device.tls(args.slot)
    response = client.request(args.host, args.port, "GET", "/v1/whoami")
    cipher = client.last_cipher[0] if client.last_cipher else "?"
    print("TLS 1.2 %s, client key in SE slot %d (%d signature(s) by the SE)"
          % (cipher, args.slot, client.key.signatures))
    if response.status != 200:
        print("REFUSED %d %s" % (response.status, _refusal(response)))
        return 1
    identity = json.loads(response.body)
    print(json.dumps(identity, indent=1))
    if args.save:
        with open(args.save, "w") as f:
            json.dump(identity, f)
    return 0


def cmd_enrol(args, device):
    from fleetid.device.host.est_client import EstClient

    est = EstClient(device.se, args.host, args.port, [device.root_der], label=args.label,
                    max_wait_s=args.max_wait, connect_timeout=10, io_timeout=30)
    result = est.enroll(args.from_slot, args.slot, reenroll=args.reenroll)
    cert = result.certificate
    print("%s authenticated by the certificate in slot %d: new key generated in SE slot %d,"
          " attested with a fresh CA nonce, CSR signed in the SE"
          % (result.operation, args.from_slot, result.slot))
    print("issued: serial %x, subject %s, valid until %s, issuer %s"
          % (cert.serial_number, cert.subject.rfc4514_string(),
             cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
             cert.issuer.rfc4514_string()))
    print("stored beside its key in SE slot %d (PUT CERT)" % result.slot)
    return 0


def cmd_ack(args, device):
    response = device.tls(args.slot).request(args.host, args.port, "POST",
                                             "/v1/rotation/ack")
    if response.status != 200:
        print("REFUSED %d %s" % (response.status, _refusal(response)))
        return 1
    print(response.body.decode().strip())
    return 0


def cmd_submit_csr(args, device):
    with open(args.csr, "rb") as f:
        data = f.read()
    if b"-----BEGIN" in data:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        data = x509.load_pem_x509_csr(data).public_bytes(serialization.Encoding.DER)
    path = "/.well-known/est/%s%s" % (args.label + "/" if args.label else "", args.op)
    response = device.tls(args.slot).request(
        args.host, args.port, "POST", path, base64.encodebytes(data),
        {"Content-Type": "application/pkcs10"})
    if response.status == 200:
        print("ACCEPTED (unexpected for a CSR without attestation)")
        return 1
    print("REFUSED %d %s" % (response.status, _refusal(response)))
    return 0 if response.status == args.expect_status else 1


def cmd_get_cert(args, device):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_der_x509_certificate(bytes(device.se.get_cert(args.slot)))
    with open(args.out, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    print("slot %d certificate -> %s" % (args.slot, args.out))
    return 0


# -- operator steps ---------------------------------------------------------------------------


def _write(path, data, mode=0o644):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def cmd_cloud_config(args):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from fleetid.cloud.line import runner
    from fleetid.cloud.pki.signing import sign_certificate
    from fleetid.cloud.verifier.server import server_certificate_builder
    from fleetid.sim.fab import VENDOR_CERT_FILE

    line_dir = os.path.abspath(args.line)
    out = os.path.abspath(args.out)
    os.makedirs(os.path.join(out, "tls"), exist_ok=True)
    line = runner.open_line(line_dir)
    try:
        # The TLS server key is the cloud host's (a file, as for any web server); its
        # certificate is signed by the fleet root inside the line's HSM, so devices
        # validate the server with the fleet root anchor in their SE.
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = server_certificate_builder(key.public_key(), line.root_cert,
                                             ["localhost", "127.0.0.1"], now, days=30)
        cert = sign_certificate(line.hsm, line.labels["root"], builder,
                                line.root_cert.public_key())
        config = line.config
        labels = line.labels
    finally:
        line.close()
    pem = serialization.Encoding.PEM
    tls_cert = os.path.join(out, "tls", "server.pem")
    tls_key = os.path.join(out, "tls", "server.key.pem")
    _write(tls_key, key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()), 0o600)
    _write(tls_cert, cert.public_bytes(pem))

    def q(path):
        return json.dumps(path)  # a TOML basic string is JSON-compatible for paths

    toml = "\n".join([
        "# fleetid cloud on the factory line's PKI (written by scripts/demo_device.py)",
        "[cloud]",
        "state_dir = %s" % q(out),
        "host = \"127.0.0.1\"",
        "verifier_port = %d" % args.verifier_port,
        "est_port = %d" % args.est_port,
        "metrics_port = 0",
        "registry = %s" % q(config["registry"]),
        "hsm = %s" % q(config["hsm"]),
        "roots = [%s]" % q(os.path.join(line_dir, config["root_cert"])),
        "vendor_roots = [%s]" % q(os.path.join(line_dir, config["vendor_dir"],
                                               VENDOR_CERT_FILE)),
        "tls_cert = %s" % q(tls_cert),
        "tls_key = %s" % q(tls_key),
        "",
        "[[cloud.labels]]",
        "name = %s" % q(args.label),
        "ca_key = %s" % q(labels["ca"]),
        "ca_cert = %s" % q(os.path.join(line_dir, config["ca_cert"])),
        "default = true",
        "",
    ])
    path = os.path.join(out, "cloud.toml")
    with open(path, "w") as f:
        f.write(toml)
    print("cloud configuration: %s (label %s -> the line's issuing CA; server certificate"
          " signed by the fleet root in the HSM)" % (path, args.label))
    return 0


def cmd_revoke(args):
    from fleetid.cloud.registry import open_registry

    registry = open_registry(args.registry)
    try:
        revoked = 0
        # Newest first: the identity certificate last, since revoking it also marks the
        # device itself revoked.
        for record in reversed(registry.certificates(args.serial)):
            if record.revoked:
                continue
            registry.mark_revoked(record.cert_serial, args.reason, operator=args.operator,
                                  issuer=record.issuer)
            revoked += 1
            print("revoked %s certificate %s (%s)" % (record.kind, record.cert_serial,
                                                      args.reason))
        device = registry.get_device(args.serial)
        print("device %d: status %s (%d certificate(s) revoked, audit entries written)"
              % (device.serial, device.status, revoked))
    finally:
        registry.close()
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def device_cmd(name, help_text, port_help="server port"):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--bus", required=True, help="SE bus URI, e.g. sim:unix:/path/se.sock")
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, help=port_help)
        return p

    p = device_cmd("whoami", "who-am-I at the verifier over SE-keyed mTLS", "verifier port")
    p.add_argument("--slot", type=int, default=C.SLOT_IDENTITY)
    p.add_argument("--save", help="write the identity JSON here")
    p = device_cmd("enrol", "EST (re-)enrolment with a new SE key", "EST port")
    p.add_argument("--from-slot", type=int, default=C.SLOT_IDENTITY,
                   help="slot of the authenticating key/certificate")
    p.add_argument("--slot", type=int, default=None, help="spare slot for the new key")
    p.add_argument("--reenroll", action="store_true", help="simplereenroll")
    p.add_argument("--label", default=None)
    p.add_argument("--max-wait", type=float, default=60.0,
                   help="bound on the total 202 Retry-After wait (s)")
    p = device_cmd("ack", "acknowledge the rotation with the new certificate",
                   "verifier port")
    p.add_argument("--slot", type=int, required=True)
    p = device_cmd("submit-csr", "POST a CSR file over the device's mTLS channel", "EST port")
    p.add_argument("--csr", required=True)
    p.add_argument("--slot", type=int, default=C.SLOT_IDENTITY)
    p.add_argument("--op", default="simpleenroll",
                   choices=["simpleenroll", "simplereenroll"])
    p.add_argument("--label", default=None)
    p.add_argument("--expect-status", type=int, default=403)
    p = device_cmd("get-cert", "write an SE slot's certificate as PEM")
    p.add_argument("--slot", type=int, required=True)
    p.add_argument("--out", required=True)

    p = sub.add_parser("cloud-config", help="cloud configuration on a line's PKI")
    p.add_argument("--line", required=True, help="the line work directory")
    p.add_argument("--out", required=True, help="the cloud's state directory")
    p.add_argument("--label", default="widget")
    p.add_argument("--verifier-port", type=int, default=0, help="0: any free port")
    p.add_argument("--est-port", type=int, default=0)
    p = sub.add_parser("revoke", help="revoke a device's certificates in the registry")
    p.add_argument("--registry", required=True, help="registry URI, e.g. sqlite:PATH")
    p.add_argument("--serial", type=int, required=True, help="registry serial")
    p.add_argument("--reason", default="keyCompromise")
    p.add_argument("--operator", default="demo-operator")

    args = parser.parse_args(argv)
    try:
        if args.command == "cloud-config":
            return cmd_cloud_config(args)
        if args.command == "revoke":
            return cmd_revoke(args)
        if args.command != "get-cert" and not args.port:
            parser.error("--port is required")
        device = Device(args.bus)
        try:
            handler = {"whoami": cmd_whoami, "enrol": cmd_enrol, "ack": cmd_ack,
                       "submit-csr": cmd_submit_csr, "get-cert": cmd_get_cert}[args.command]
            return handler(args, device)
        finally:
            device.close()
    except FleetidError as exc:
        print("FAILED %s: %s" % (type(exc).__name__, exc), file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print("FAILED %s: %s" % (type(exc).__name__, exc), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
