"""EST benchmark: attested re-enrolments per second against the raw certificate-issuance
rate of `cryptography`, same machine, same run.

    .venv/bin/python bench/est.py [--quick] [--count N] [--devices D]

attested   EstService.enroll(..., reenroll=True) in-process: client certificate check
           (chain, attestation extension, registry, overlap), CSR proof of possession,
           evidence (SE vendor chain, MAK signature, key binding, policy, SE UID, nonce),
           certificate built and signed through the HSM interface (software keystore,
           verify_signatures="always" as `fleetid cloud serve` runs it), then recorded in
           the SQLite registry (synchronous=FULL) with the rotation state in the same
           transaction (add_certificate(rotation_state=...)).
https      the same over HTTPS to the running EST server (new TLS 1.3 connection per
           re-enrolment, client certificate, base64 bodies).  The client runs in this
           process, beside the server's thread (they share the GIL and 2 cores): this is
           wall-clock throughput of client + server, an upper bound on the server's cost.
raw        cryptography alone, what a CA that checks nothing would do: load the DER CSR,
           verify its signature, build the same device certificate profile and sign it
           with an in-memory P-256 key.
Device-side work (key generation, attestation, CSR signing) is prepared before timing.
Loops are bounded by --count; the server listens on 127.0.0.1 only.
"""

import argparse
import base64
import http.client
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def prepare(fleet, devices, count):
    """[(device, client cert DER, CSR DER)] for `count` re-enrolments over `devices`."""
    from bench._cloud_support import der

    work = []
    for n in range(count):
        device = devices[n % len(devices)]
        _, csr = device.csr()
        work.append((device, der(device.cert), csr))
    return work


def raw_issuance(csrs, ca_cert):
    """Seconds to issue one certificate per CSR with cryptography alone."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    from fleetid.cloud.pki import profiles

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    started = time.perf_counter()
    for csr_der in csrs:
        csr = x509.load_der_x509_csr(csr_der)
        if not csr.is_signature_valid:
            raise RuntimeError("bad CSR")
        serial = csr.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
        builder = profiles.device_builder("operational", serial, csr.public_key(), ca_cert, now)
        builder.sign(key, hashes.SHA256())
    return time.perf_counter() - started


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--count", type=int, default=None)
    parser.add_argument("--devices", type=int, default=None)
    parser.add_argument("--json", dest="json_path", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    count = args.count or (100 if args.quick else 1000)
    ndev = args.devices or (10 if args.quick else 50)

    from bench._cloud_support import Fleet, RunningCloud

    workdir = tempfile.mkdtemp(prefix="fleetid-bench-est-")
    try:
        fleet = Fleet(workdir, verify_signatures="always")  # as `cloud serve` runs
        devices = []
        for _ in range(ndev):
            device = fleet.provision()
            fleet.enrol(device)
            devices.append(device)
        print("fleetid EST bench: %d re-enrolments over %d devices" % (count, ndev))

        work = prepare(fleet, devices, count)
        started = time.perf_counter()
        for _device, cert_der, csr in work:
            fleet.est.enroll("b42", cert_der, csr, reenroll=True)
        attested = count / (time.perf_counter() - started)

        raw = count / raw_issuance([csr for _, _, csr in work], fleet.ca_certs["b42"])

        work = prepare(fleet, devices, count)
        files = {d.name: d.files() for d in devices}
        with RunningCloud(fleet) as cloud:
            # Client TLS contexts (CA file, device key) are built before timing: a device
            # loads its credentials once, not per request.
            contexts = {name: cloud.client_context(f) for name, f in files.items()}
            started = time.perf_counter()
            for device, _cert_der, csr in work:
                conn = http.client.HTTPSConnection("127.0.0.1", cloud.ports["est"],
                                                   timeout=20, context=contexts[device.name])
                try:
                    conn.request("POST", "/.well-known/est/b42/simplereenroll",
                                 body=base64.b64encode(csr),
                                 headers={"Content-Type": "application/pkcs10"})
                    response = conn.getresponse()
                    status, body = response.status, response.read()
                finally:
                    conn.close()
                if status != 200:
                    raise RuntimeError("re-enrolment failed: %d %r" % (status, body[:200]))
            https = count / (time.perf_counter() - started)
        fleet.close()
        print("attested re-enrolments (in-process) : %8.1f /s" % attested)
        print("attested re-enrolments (HTTPS, mTLS): %8.1f /s" % https)
        print("raw cryptography issuance           : %8.1f /s" % raw)
        print("ratio attested/raw: %.2fx in-process, %.2fx over HTTPS" % (attested / raw,
                                                                        https / raw))
        if args.json_path:  # bench/report.py
            from bench._report_support import figure, write_json

            write_json(args.json_path, "est", {"attested": attested, "https": https, "raw": raw}, [
                figure("attested re-enrolments, in-process", attested, "/s",
                       "raw cryptography issuance", raw),
                figure("attested re-enrolments, HTTPS + mTLS", https, "/s",
                       "raw cryptography issuance", raw)])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
