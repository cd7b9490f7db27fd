"""The quick-start demo (scripts/demo.sh) runs the whole lifecycle end to end and says
so: line with 2 stations and its report, audit verified, the cloud on the line's PKI, the
device's SE-keyed mTLS who-am-I, the device agent's EST enrolment and rotation, the independent clients'
moments, revocation refused with its reason; its servers are gone afterwards."""

import os
import re
import shutil
import subprocess
import sys

from tests.conftest import require

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_demo_script_runs_the_full_lifecycle(tmp_path):
    require(shutil.which("curl") and shutil.which("openssl"), "curl and openssl")
    work = tmp_path / "demo"
    env = dict(os.environ, FLEETID_DEMO_SKIP_SETUP="1", FLEETID_DEMO_DIR=str(work),
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    env.pop("FLEETID_KEYSTORE_PASS", None)
    done = subprocess.run(["bash", "scripts/demo.sh"], cwd=ROOT, env=env, timeout=240,
                          capture_output=True, text=True)
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-3000:]
    steps = [line for line in out.splitlines() if "== " in line]
    assert len(steps) == 15, steps
    # 11b: MQTT on the line's PKI, the SE-keyed device, the relayed SCP03 rotation.
    assert "mqtt: cloud received telemetry seq" in out
    assert "retained CRLs published while it was offline: ca, root" in out
    assert "mqtt: OTA SCP03 key rotation relayed by the device (level 0x33): rotated" in out
    assert "the old SCP03 key set no longer opens a session" in out
    # 1-2: the line and its audit log.
    assert "4/4 ok 4  held 0" in out and "100.00" in out
    assert any(p.startswith("report-") and p.endswith(".html")
               for p in os.listdir(work / "line"))
    assert "OK sqlite:" in out and "injection 4" in out
    # 5: who-am-I over TLS 1.3, key in the SE.
    assert "TLS 1.3 TLS_AES_128_GCM_SHA256, client key in SE slot 1 (1 signature(s) by the SE, " \
        "ECDHE in its transient key" in out
    assert '"kind": "identity"' in out
    # 6-8: the agent's EST enrolment, rotation, switch.
    assert "agent: BEGIN enrol: slot 1 -> 2" in out
    assert "agent: key generated in slot 2, attested, CSR signed in the SE" in out
    assert "agent: BEGIN command: slot 2 -> 3" in out
    assert "agent: ACKED by the verifier: slot 3" in out
    assert "agent: old key and certificate deleted from slot 2" in out
    assert "credential in use: slot 3 (settled)" in out and "slot 2: empty" in out
    assert '"kind": "operational"' in out
    assert "overlap        FAIL  superseded: replaced by a newer certificate" in out
    # 9-11: independent clients.
    assert "CN = fleetid Fleet Root" in out and "CN = fleetid issuing CA" in out
    assert "REFUSED 403 policy: attestation required" in out
    assert "attestation    PASS" in out and "verdict: ACCEPTED" in out
    # 12-13: revocation.
    # `fleetid revoke --serial`: every certificate of the device, one line of JSON.
    assert re.search(r'"revoked_certificates": \["[0-9a-f]+", "[0-9a-f]+", "[0-9a-f]+"\]',
                     out), out[-3000:]
    assert "REFUSED 403 revoked: revoked at" in out and "(keyCompromise)" in out
    assert "REFUSED by the verifier: revoked (nothing rotated)" in done.stderr
    assert "revocation     FAIL" in out and "verdict: REFUSED" in out
    # The servers were stopped on exit: nothing listens on the SE socket any more.
    assert not (work / "se.sock").exists() or _socket_dead(str(work / "se.sock"))


def _socket_dead(path):
    import socket

    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
    except OSError:
        return True
    finally:
        s.close()
    return False
