"""Every `fleetid` command on a table of bad inputs (issue 9, defect 5).

Missing, unreadable, corrupt, out-of-range and wrong-type inputs, for every command.  Each
must end with exit status 1 (a refusal) or 2 (a usage error), one clear `Error:` line that
names the thing that is wrong, and no traceback.  Commands run in-process (click's
CliRunner): an exception other than SystemExit is what would have been a traceback.
"""

import logging
import os
import sqlite3

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization

from fleetid.cli.main import cli
from fleetid.cloud import audit
from fleetid.cloud.registry.sqlite_backend import SqliteRegistry
from fleetid.sim.fab import fab_chip
from tests.cloud.hsm_support import KEYSTORE_PASS
from tests.cloud.test_registry import LINE, T0, WITNESS, make_cert, provision

HUGE = "99999999999999999999999"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Paths of good and bad inputs, by name."""
    d = tmp_path_factory.mktemp("bad")
    out = {"dir": str(d)}

    def write(name, data, mode=0o644):
        path = d / name
        path.write_bytes(data)
        os.chmod(path, mode)
        out[name] = str(path)

    write("garbage.pem", b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n"
                         b"-----END CERTIFICATE-----\n")
    write("garbage.bin", b"\x00\xffgarbage")
    write("empty", b"")
    write("not.toml", b"[cloud\nstate_dir = ")
    write("bad-key.toml", b"[cloud]\nverifier_prot = 1\n")
    write("device.pem", b"")
    (d / "device.pem").write_bytes(
        b"-----BEGIN CERTIFICATE-----\n" + __import__("base64").encodebytes(make_cert(5))
        + b"-----END CERTIFICATE-----\n")
    for name, signer in (("line.pub.pem", LINE), ("witness.pub.pem", WITNESS)):
        write(name, signer.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    # A registry with a short, good chain.
    db = d / "registry.db"
    with SqliteRegistry(db, wall_clock=lambda: T0) as reg:
        provision(reg)
        audit.Checkpointer(reg, LINE, WITNESS, wall_clock=lambda: T0).checkpoint()
    out["registry"] = "sqlite:%s" % db
    # A database that is not a registry, and a file that is not a database.
    conn = sqlite3.connect(d / "other.db")
    conn.execute("CREATE TABLE audit_log (x INTEGER)")
    conn.commit()
    conn.close()
    out["other.db"] = str(d / "other.db")
    # A line directory whose line.json is corrupt, and one with a line.json of another kind.
    for name, text in (("corrupt-line", b"{not json"), ("alien-line", b'{"format": "x"}')):
        (d / name).mkdir()
        (d / name / "line.json").write_bytes(text)
        out[name] = str(d / name)
    out["a-dir"] = str(d)
    fab_chip(d / "vendor-good", d / "good.nvm")
    out["good.nvm"] = str(d / "good.nvm")
    # The cloud configuration naming a TLS key that holds garbage.
    state = d / "state"
    (state / "tls").mkdir(parents=True)
    (state / "tls" / "server.pem").write_bytes((d / "device.pem").read_bytes())
    write("garbage-tls.toml", (
        '[cloud]\nstate_dir = "%s"\ntls_cert = "%s"\ntls_key = "%s"\nverifier_port = 0\n'
        'est_port = 0\nmetrics_port = 0\n' % (state, state / "tls" / "server.pem",
                                              d / "garbage.bin")).encode())
    return out


# (argument list with {name} placeholders from `files`, text the Error line must contain)
CASES = [
    # -- sim ------------------------------------------------------------------------------
    (["sim", "fab", "--vendor-dir", "{garbage.bin}", "--out", "{dir}/c.nvm"], "vendor-dir"),
    (["sim", "fab", "--vendor-dir", "/proc/fleetid-vendor", "--out", "{dir}/c.nvm"],
     "/proc/fleetid-vendor"),
    (["sim", "fab", "--vendor-dir", "{dir}/vendor", "--out", "{dir}/c.nvm", "--count", "0"],
     "--count"),
    (["sim", "fab", "--vendor-dir", "{dir}/vendor", "--out", "{dir}/c.nvm", "--count", "x"],
     "--count"),
    (["sim", "serve", "--nvm", "{garbage.bin}", "--listen", "unix:{dir}/s.sock"],
     "garbage.bin"),
    (["sim", "serve", "--nvm", "{dir}/missing.nvm", "--listen", "unix:{dir}/s.sock"],
     "missing.nvm"),
    (["sim", "serve", "--nvm", "{empty}", "--listen", "bogus:1"], "empty"),
    (["sim", "serve", "--nvm", "{good.nvm}", "--listen", "bogus:1"], "bogus"),
    (["sim", "serve", "--nvm", "{empty}", "--listen", "unix:{dir}/s.sock", "--ber", "2"],
     "--ber"),
    (["sim", "serve", "--nvm", "{empty}", "--listen", "unix:{dir}/s.sock", "--latency",
      "warp"], "--latency"),
    # -- se -------------------------------------------------------------------------------
    (["se", "--bus", "bogus:x", "info"], "bogus"),
    (["se", "--bus", "sim:unix:{dir}/no.sock", "info"], "no.sock"),
    (["se", "--bus", "sim:tcp:127.0.0.1:99999", "info"], "99999"),
    (["se", "--bus", "sim:unix:{dir}/no.sock", "genkey", "--slot", "999"], "--slot"),
    (["se", "--bus", "sim:unix:{dir}/no.sock", "genkey", "--slot", "x"], "--slot"),
    (["se", "--bus", "sim:unix:{dir}/no.sock", "genkey", "--slot", "2", "--usage", "fly"],
     "--usage"),
    (["se", "--bus", "sim:unix:{dir}/no.sock", "sign", "--slot", "2", "--digest", "zz"],
     "--digest"),
    (["se", "--bus", "sim:unix:{dir}/no.sock", "attest", "--slot", "2", "--nonce", "xyz"],
     "--nonce"),
    (["se", "--bus", "sim:unix:{dir}/no.sock", "data", "read", "--object-id", HUGE],
     "--object-id"),
    (["se", "--bus", "sim:unix:{dir}/no.sock", "random", "--count", "-1"], "--count"),
    (["se", "--bus", "sim:unix:{dir}/no.sock", "counter", "advance", "--target", HUGE],
     "--target"),
    (["se", "--bus", "sim:unix:{dir}/no.sock", "scp03-check", "--fab-record",
      "{garbage.bin}", "--vendor-dir", "{dir}"], "garbage.bin"),
    (["se", "--bus", "sim:unix:{dir}/no.sock", "scp03-check", "--fab-record",
      "{dir}/missing.json", "--vendor-dir", "{dir}"], "missing.json"),
    (["se", "--bus", "sim:unix:{dir}/no.sock", "scp03-check", "--fab-record",
      "{empty}", "--vendor-dir", "{dir}/no-vendor"], "no-vendor"),
    # -- pki ------------------------------------------------------------------------------
    (["pki", "init-root", "--hsm", "bogus:x", "--label", "r", "--subject", "CN=r",
      "--ceremony-dir", "{dir}/cer", "--operator", "a"], "bogus"),
    (["pki", "init-root", "--hsm", "soft:{dir}/ks.json;pass-env=FLEETID_NO_SUCH_VAR",
      "--label", "r", "--subject", "CN=r", "--ceremony-dir", "{dir}/cer", "--operator",
      "a"], "FLEETID_NO_SUCH_VAR"),
    (["pki", "init-root", "--hsm", "soft:{dir}/ks.json", "--label", "r", "--subject",
      "CN=r", "--ceremony-dir", "{dir}/cer", "--operator", "a", "--validity-years", "0"],
     "--validity-years"),
    (["pki", "new-ca", "--hsm", "soft:{dir}/ks.json", "--root-label", "r", "--root-cert",
      "{garbage.pem}", "--label", "c", "--product", "p", "--batch", "b", "--region", "r",
      "--out", "{dir}/ca.pem"], "garbage.pem"),
    (["pki", "new-ca", "--hsm", "soft:{dir}/ks.json", "--root-label", "r", "--root-cert",
      "{dir}/missing.pem", "--label", "c", "--product", "p", "--batch", "b", "--region",
      "r", "--out", "{dir}/ca.pem"], "missing.pem"),
    (["pki", "show-ceremony", "{dir}/missing-ceremony"], "missing-ceremony"),
    (["pki", "show-ceremony", "{corrupt-line}"], "ceremony.json"),
    # -- audit ----------------------------------------------------------------------------
    (["audit", "verify", "--registry", "{registry}", "--line-pub", "{garbage.pem}",
      "--witness-pub", "{witness.pub.pem}"], "garbage.pem"),
    (["audit", "verify", "--registry", "{registry}", "--line-pub", "{dir}/missing.pem",
      "--witness-pub", "{witness.pub.pem}"], "missing.pem"),
    (["audit", "verify", "--registry", "bogus:x", "--line-pub", "{line.pub.pem}",
      "--witness-pub", "{witness.pub.pem}"], "bogus"),
    (["audit", "verify", "--registry", "sqlite:{dir}/missing.db", "--line-pub",
      "{line.pub.pem}", "--witness-pub", "{witness.pub.pem}"], "missing.db"),
    (["audit", "verify", "--registry", "sqlite:{garbage.bin}", "--line-pub",
      "{line.pub.pem}", "--witness-pub", "{witness.pub.pem}"], "garbage.bin"),
    (["audit", "verify", "--registry", "sqlite:{other.db}", "--line-pub",
      "{line.pub.pem}", "--witness-pub", "{witness.pub.pem}"], "other.db"),
    (["audit", "verify", "--log", "{garbage.bin}", "--line-pub", "{line.pub.pem}",
      "--witness-pub", "{witness.pub.pem}"], "garbage.bin: first bad entry 0"),
    (["audit", "verify", "--log", "{a-dir}", "--line-pub", "{line.pub.pem}",
      "--witness-pub", "{witness.pub.pem}"], "--log"),
    (["audit", "verify", "--registry", "{registry}", "--line-pub", "{line.pub.pem}",
      "--witness-pub", "{witness.pub.pem}", "--witness-anchor", "{garbage.bin}"],
     "garbage.bin"),
    (["audit", "verify", "--registry", "{registry}", "--line-pub", "{line.pub.pem}",
      "--witness-pub", "{witness.pub.pem}", "--witness-anchor", "5:zz"],
     "--witness-anchor"),
    (["audit", "verify", "--log", "{empty}", "--line-pub", "{line.pub.pem}",
      "--witness-pub", "{witness.pub.pem}", "--expect-count", HUGE], "--expect-count"),
    (["audit", "verify", "--log", "{empty}", "--line-pub", "{line.pub.pem}",
      "--witness-pub", "{witness.pub.pem}", "--expect-count", "-1"], "--expect-count"),
    (["audit", "show", "--serial", HUGE, "--registry", "{registry}"], "--serial"),
    (["audit", "show", "--serial", "0", "--registry", "{registry}"], "--serial"),
    (["audit", "show", "--serial", "abc", "--registry", "{registry}"], "--serial"),
    (["audit", "show", "--serial", "1", "--registry", "sqlite:{garbage.bin}"], "garbage.bin"),
    (["audit", "show", "--serial", "1", "--registry", "sqlite:{other.db}"], "other.db"),
    (["audit", "show", "--serial", "1", "--log", "{garbage.bin}"], "garbage.bin"),
    (["audit", "show", "--serial", "1", "--log", "{dir}/missing.jsonl"], "missing.jsonl"),
    (["audit", "show", "--serial", "1"], "--log"),
    # -- line -----------------------------------------------------------------------------
    (["line", "init", "/proc/fleetid-line"], "/proc/fleetid-line"),
    (["line", "init", "{garbage.bin}"], "garbage.bin"),
    (["line", "init", "{dir}/l1", "--hsm", "bogus:x"], "bogus"),
    (["line", "init", "{dir}/l2", "--registry", "bogus:x"], "bogus"),
    (["line", "run", "--devices", "1", "--out", "/proc/fleetid-line"], "/proc/fleetid-line"),
    (["line", "run", "--devices", "1", "--out", "{corrupt-line}"], "line.json"),
    (["line", "run", "--devices", "1", "--out", "{alien-line}"], "line.json"),
    (["line", "run", "--devices", "0", "--out", "{dir}/l3"], "--devices"),
    (["line", "run", "--devices", HUGE, "--out", "{dir}/l3"], "--devices"),
    (["line", "run", "--devices", "1", "--stations", "1,,2", "--out", "{dir}/l3"],
     "--stations"),
    (["line", "run", "--devices", "1", "--stations", "0", "--out", "{dir}/l3"], "--stations"),
    (["line", "run", "--devices", "1", "--stations", "two", "--out", "{dir}/l3"],
     "--stations"),
    (["line", "run", "--devices", "1", "--se-profile", "fast", "--out", "{dir}/l3"],
     "--se-profile"),
    (["line", "run", "--devices", "1", "--max-sessions", "0", "--out", "{dir}/l3"],
     "--max-sessions"),
    (["line", "reconcile", "--out", "{corrupt-line}"], "line.json"),
    (["line", "reconcile", "--out", "{dir}/missing-line"], "missing-line"),
    (["line", "reconcile", "--out", "{alien-line}"], "line.json"),
    # -- cloud ----------------------------------------------------------------------------
    (["cloud", "serve", "--config", "{garbage-tls.toml}"], "garbage.bin"),
    (["cloud", "serve", "--config", "{not.toml}"], "not.toml"),
    (["cloud", "serve", "--config", "{bad-key.toml}"], "verifier_prot"),
    (["cloud", "serve", "--config", "{dir}/missing.toml"], "missing.toml"),
    (["cloud", "serve", "--verifier-port", "70000"], "--verifier-port"),
    (["cloud", "check-cert", "{garbage.pem}"], "garbage.pem"),
    (["cloud", "check-cert", "{garbage.bin}"], "garbage.bin"),
    (["cloud", "check-cert", "{empty}"], "empty"),
    (["cloud", "check-cert", "{dir}/missing.pem"], "missing.pem"),
    (["cloud", "check-cert", "{device.pem}", "--chain", "{garbage.pem}"], "--chain"),
    (["cloud", "check-cert", "{device.pem}", "--registry", "bogus:x"], "registry bogus:x"),
    (["cloud", "check-cert", "{device.pem}", "--registry", "{registry}", "--at", "yesterday"],
     "--at"),
    (["cloud", "check-cert", "{device.pem}", "--config", "{not.toml}"], "not.toml"),
    (["cloud", "revoke", "--serial", "xyz", "--registry", "{registry}"], "--serial"),
    (["cloud", "revoke", "--cert", "{garbage.pem}", "--registry", "{registry}"],
     "garbage.pem"),
    (["cloud", "revoke", "--serial", "ab", "--registry", "bogus:x"], "bogus"),
    (["cloud", "revoke", "--serial", "ab", "--registry", "{registry}"], "ab"),
    (["cloud", "revoke", "--serial", "ab", "--reason", "boredom", "--registry",
      "{registry}"], "--reason"),
    (["cloud", "revoke-ca", "--cert", "{garbage.pem}"], "garbage.pem"),
    (["cloud", "revoke-ca", "--cert", "{device.pem}", "--registry", "{registry}"],
     "not a CA certificate"),
    (["cloud", "revoke-ca", "--cert", "{dir}/missing.pem"], "missing.pem"),
    # fleetid agent: the device side.
    (["agent", "run", "--bus", "bogus:x", "--cloud", "https://127.0.0.1:1", "--once"], "bogus"),
    (["agent", "run", "--bus", "sim:unix:{dir}/no.sock", "--cloud", "https://127.0.0.1:1",
      "--once"], "no.sock"),
    (["agent", "run", "--bus", "sim:unix:{dir}/no.sock", "--once", "--renew-fraction", "2"],
     "--renew-fraction"),
    (["agent", "run", "--bus", "sim:unix:{dir}/no.sock", "--once", "--boot-image",
      "{dir}/missing.img"], "missing.img"),
    (["agent", "status", "--bus", "sim:unix:{dir}/no.sock"], "no.sock"),
    (["agent", "status", "--bus", "sim:tcp:127.0.0.1:99999"], "99999"),
    (["agent", "boot-check", "{dir}/missing.img", "--bus", "sim:unix:{dir}/no.sock"],
     "missing.img"),
    (["agent", "boot-check", "{garbage.bin}", "--bus", "sim:unix:{dir}/no.sock"], "no.sock"),
    (["agent", "get-cert", "--bus", "sim:unix:{dir}/no.sock", "--slot", "99", "--out",
      "{dir}/c.pem"], "--slot"),
    (["agent", "whoami", "--bus", "sim:unix:{dir}/no.sock", "--cloud", "https://127.0.0.1:1"],
     "no.sock"),
    (["agent", "check-peer", "{garbage.pem}", "--bus", "sim:unix:{dir}/no.sock",
      "--crl-issuer", "{device.pem}", "--crl-cache", "{dir}/crl.der"], "garbage.pem"),
    (["agent", "check-peer", "{device.pem}", "--bus", "sim:unix:{dir}/no.sock",
      "--crl-issuer", "{garbage.pem}", "--crl-cache", "{dir}/crl.der"], "garbage.pem"),
    (["agent", "check-peer", "{device.pem}", "--bus", "sim:unix:{dir}/no.sock"],
     "--crl-issuer"),
    (["agent", "check-peer", "{dir}/missing.pem", "--bus", "sim:unix:{dir}/no.sock"],
     "missing.pem"),
    # fleetid revoke / revocation (issue 13).
    (["revoke", "--reason", "keyCompromise"], "--serial"),
    (["revoke", "--serial", "1", "--batch", "b42"], "--serial"),
    (["revoke", "--serial", "x"], "--serial"),
    (["revoke", "--serial", "1", "--reason", "bogus"], "--reason"),
    (["revoke", "--batch", "nope", "--state-dir", "{dir}/rs"], "trust configuration"),
    (["revocation", "status", "--config", "{dir}/missing.toml"], "missing.toml"),
    (["revocation", "init", "--config", "{dir}/missing.toml"], "missing.toml"),
    (["agent", "check-peer-offline", "{dir}/missing.pem", "--root", "{device.pem}",
      "--signer", "{device.pem}", "--cache", "{dir}/c.frs"], "missing.pem"),
    (["agent", "check-peer-offline", "{device.pem}", "--root", "{device.pem}",
      "--signer", "{garbage.pem}", "--cache", "{dir}/c.frs"], "garbage.pem"),
    (["agent", "check-peer-offline", "{device.pem}", "--root", "{device.pem}",
      "--signer", "{device.pem}", "--cache", "{dir}/c.frs"], "device.pem"),
    (["agent", "run", "--bus", "sim:unix:{dir}/no.sock", "--cloud", "https://127.0.0.1:1",
      "--once", "--mqtt", "http://127.0.0.1:1883"], "--mqtt"),
    (["agent", "run", "--bus", "sim:unix:{dir}/no.sock", "--cloud", "https://127.0.0.1:1",
      "--once", "--mqtt", "mqtts://127.0.0.1:99999"], "--mqtt"),
    (["agent", "run", "--bus", "sim:unix:{dir}/no.sock", "--cloud", "https://127.0.0.1:1",
      "--once", "--mqtt", "mqtts://127.0.0.1:1"], "no.sock"),
    (["agent", "run", "--bus", "sim:unix:{dir}/no.sock", "--cloud", "https://127.0.0.1:1",
      "--once", "--mqtt", "mqtts://127.0.0.1:1", "--mqtt-ca", "{garbage.bin}"], "garbage.bin"),
    (["agent", "run", "--bus", "sim:unix:{dir}/no.sock", "--cloud", "https://127.0.0.1:1",
      "--once", "--mqtt", "mqtts://127.0.0.1:1", "--mqtt-chain", "{dir}/missing.pem"],
     "missing.pem"),
    # fleetid mqtt: the broker and the cloud's MQTT side.
    (["mqtt", "broker", "--line", "{dir}/missing-line"], "missing-line"),
    (["mqtt", "broker", "--line", "{a-dir}"], "no line there"),
    (["mqtt", "broker", "--line", "{corrupt-line}"], "line.json"),
    (["mqtt", "broker", "--line", "{a-dir}", "--port", "70000"], "--port"),
    (["mqtt", "broker", "--line", "{a-dir}", "--start-timeout", "0"], "--start-timeout"),
    (["mqtt", "cloud", "--line", "{a-dir}", "--broker", "tcp://127.0.0.1:1883"], "--broker"),
    (["mqtt", "cloud", "--line", "{a-dir}", "--broker", "mqtts://127.0.0.1:0"], "--broker"),
    (["mqtt", "cloud", "--line", "{a-dir}"], "--broker"),
    # fleetid ota: over-the-air administration.
    (["ota", "rotate-scp03", "--line", "{a-dir}", "--broker", "mqtts://127.0.0.1:1",
      "--device", "FID-000000001", "--new-master", "m2", "--kvn", "0x99"], "--kvn"),
    (["ota", "rotate-scp03", "--line", "{a-dir}", "--broker", "mqtts://127.0.0.1:1",
      "--device", "FID-000000001", "--new-master", "m2", "--new-kvn", "0x31"], "--new-kvn"),
    (["ota", "rotate-scp03", "--line", "{a-dir}", "--broker", "mqtts://127.0.0.1:1",
      "--device", "FID-000000001"], "--new-master"),
    (["ota", "install-fw-key", "--line", "{a-dir}", "--broker", "mqtts://127.0.0.1:1",
      "--device", "FID-000000001", "--fw-cert", "{garbage.pem}"], "garbage.pem"),
    (["ota", "install-fw-key", "--line", "{a-dir}", "--broker", "mqtts://127.0.0.1:1",
      "--device", "FID-000000001", "--fw-cert", "{dir}/missing.pem"], "missing.pem"),
    (["ota", "install-fw-key", "--line", "{a-dir}", "--broker", "mqtts://127.0.0.1:1",
      "--device", "FID-000000001", "--fw-cert", "{device.pem}", "--slot", "c"], "--slot"),
    (["ota", "rotate", "--line", "{a-dir}", "--broker", "mqtts:/x", "--device", "X"],
     "--broker"),
    (["ota", "rotate", "--line", "{a-dir}", "--broker", "mqtts://127.0.0.1:1", "--device",
      "FID-1", "--timeout", "0"], "--timeout"),
    (["ota", "rotate", "--line", "{a-dir}", "--broker", "mqtts://127.0.0.1:1", "--device",
      "FID-1"], "no line there"),
]


def _fill(text, files):
    for name, value in files.items():
        text = text.replace("{%s}" % name, value)
    return text


@pytest.fixture
def quiet_logging():
    """`cloud serve` sets the process's logging up for JSON: restore it afterwards."""
    root = logging.getLogger()
    cloud = logging.getLogger("fleetid.cloud")
    saved = (root.handlers[:], root.level, cloud.handlers[:], cloud.level, cloud.propagate)
    yield
    root.handlers[:], root.level = saved[0], saved[1]
    cloud.handlers[:], cloud.level, cloud.propagate = saved[2], saved[3], saved[4]


@pytest.mark.parametrize("args,names", CASES, ids=[" ".join(c[0][:3]) + " #%d" % i
                                                    for i, c in enumerate(CASES)])
def test_a_bad_input_gets_one_clear_error_line_and_no_traceback(files, args, names,
                                                                quiet_logging, monkeypatch):
    monkeypatch.setenv("FLEETID_KEYSTORE_PASS", KEYSTORE_PASS)
    monkeypatch.chdir(files["dir"])
    argv = [_fill(a, files) for a in args]
    result = CliRunner().invoke(cli, argv)
    output = result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        "traceback: %r\n%s" % (result.exception, output))
    assert result.exit_code in (1, 2), (result.exit_code, output)
    assert "Traceback" not in output
    # "Error: ..." (click), or the verdict line of a verification that failed ("FAIL ...").
    errors = [line for line in output.splitlines() if line.startswith(("Error", "FAIL "))]
    assert len(errors) == 1, output
    assert _fill(names, files) in errors[0], output


# -- the input is named: errors from a live SE, the link, and values the CLI parses ----------
# (issue 16 item 13: "SW 6A88" without the slot, "not hex" without the value).  The chip is
# a fresh `fleetid sim fab` chip served in-process on the GP profile: slot 7, object 3 and
# slot 9 are empty, slot 4 holds an attestable key, counter 2 stands at 5.

NAMED_CASES = [
    (["se", "--bus", "{bus}", "pubkey", "--slot", "7"], ["se pubkey --slot 7", "SW 6A88"]),
    (["se", "--bus", "{bus}", "delkey", "--slot", "9"], ["se delkey --slot 9", "SW 6A88"]),
    (["se", "--bus", "{bus}", "data", "read", "--id", "3"], ["se data read --id 3", "SW 6A88"]),
    (["se", "--bus", "{bus}", "attest", "--slot", "4", "--out", "/proc/fleetid/a.der"],
     ["--out /proc/fleetid/a.der"]),
    (["se", "--bus", "{bus}", "counter", "advance", "--id", "2", "--to", "3"],
     ["se counter advance --id 2 --to 3", "SW 6A80"]),
    (["se", "--bus", "{bus}", "sign", "--slot", "2", "--digest", "zz"],
     ["--digest", "'zz' is not hex"]),
    (["se", "--bus", "{bus}", "sign", "--slot", "2", "--digest", "0011"],
     ["--digest", "got 2 bytes"]),
    (["se", "--bus", "{bus}", "attest", "--slot", "2", "--nonce", "xyz"],
     ["--nonce", "'xyz' is not hex"]),
    (["se", "--bus", "{bus}", "ecdh", "--slot", "2", "--peer", "04zz"],
     ["--peer", "'04zz' is not hex"]),
    (["se", "--bus", "{bus}", "data", "write", "--id", "1", "--hex", "q"],
     ["--hex", "'q' is not hex"]),
    (["se", "--bus", "{bus}", "scp03-check", "--fab-record", "{good.json}", "--vendor-dir",
      "{dir}", "--level", "0x99"], ["--level", "0x99 is not one of"]),
    (["se", "--bus", "{bus}", "scp03-check", "--fab-record", "{good.json}", "--vendor-dir",
      "{dir}", "--level", "high"], ["--level", "'high' is not an integer"]),
    (["se", "--bus", "{bus}", "--t1-profile", "se05x", "info"],
     ["se info --bus {bus}", "try --t1-profile gp"]),
    (["agent", "get-cert", "--bus", "{bus}", "--slot", "5", "--out", "{dir}/c5.pem"],
     ["agent get-cert --slot 5", "SW 6A88"]),
    (["agent", "status", "--bus", "{bus}", "--t1-profile", "se05x"],
     ["agent status --bus {bus}", "try --t1-profile gp"]),
    (["agent", "submit-csr", "--bus", "{bus}", "--est", "https://127.0.0.1:1", "--csr",
      "{garbage.pem}"], ["--csr", "garbage.pem"]),
    (["agent", "whoami", "--bus", "{bus}", "--slot", "6", "--cloud", "https://127.0.0.1:1"],
     ["agent whoami --slot 6", "SW 6A88"]),
    (["line", "run", "--devices", "1", "--stations", "1,0", "--out", "{dir}/l4"],
     ["--stations", "'1,0'"]),
    (["pki", "init-root", "--hsm", "soft:{dir}/ks-named.json", "--label", "r", "--subject",
      "not-a-dn", "--ceremony-dir", "{dir}/cer-named", "--operator", "a"],
     ["--subject not-a-dn"]),
]


@pytest.fixture(scope="module")
def served(files, tmp_path_factory):
    """A fresh fabbed chip served in-process; `files` plus {bus} and {good.json}."""
    from fleetid.common import t1
    from fleetid.sim.chip import Chip
    from fleetid.sim.endpoint import BusEndpoint
    from fleetid.sim.nvm import Nvm
    from fleetid.sim.server import serve_in_thread

    d = tmp_path_factory.mktemp("served")
    fab_chip(d / "vendor", d / "chip.nvm")
    server = serve_in_thread(BusEndpoint(Chip(Nvm(str(d / "chip.nvm"))), profile=t1.PROFILE_GP),
                             "unix:%s" % (d / "se.sock"))
    try:
        for args in (["genkey", "--slot", "4", "--usage", "sign"],
                     ["counter", "advance", "--id", "2", "--to", "5"]):
            result = CliRunner().invoke(cli, ["se", "--bus", server.bus_uri] + args)
            assert result.exit_code == 0, result.output
        yield dict(files, bus=server.bus_uri, **{"good.json": str(d / "chip.json")})
    finally:
        server.stop()


@pytest.mark.parametrize("args,names", NAMED_CASES,
                         ids=[" ".join(c[0][2:5]) + " #%d" % i for i, c in enumerate(NAMED_CASES)])
def test_an_error_names_the_option_and_the_value_it_is_about(served, args, names,
                                                            monkeypatch):
    monkeypatch.setenv("FLEETID_KEYSTORE_PASS", KEYSTORE_PASS)
    monkeypatch.chdir(served["dir"])
    result = CliRunner().invoke(cli, [_fill(a, served) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        "traceback: %r\n%s" % (result.exception, result.output))
    assert result.exit_code in (1, 2), result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, result.output
    for name in names:
        assert _fill(name, served) in errors[0], result.output


def test_agent_get_cert_names_an_out_file_it_cannot_write(tmp_path):
    """A chip the line personalised (its identity certificate in slot 1), served in-process:
    `agent get-cert --out` into a folder that cannot exist is named, not a traceback."""
    from fleetid.common import t1
    from fleetid.sim.endpoint import BusEndpoint
    from fleetid.sim.server import serve_in_thread
    from tests.device.device_cloud_support import LineAndCloud

    cloud = LineAndCloud(tmp_path, devices=1)
    server = serve_in_thread(BusEndpoint(cloud.chips[0].chip, profile=t1.PROFILE_GP),
                             "unix:%s" % (tmp_path / "se.sock"))
    try:
        runner = CliRunner()
        ok = runner.invoke(cli, ["agent", "get-cert", "--bus", server.bus_uri, "--slot", "1",
                                 "--out", str(tmp_path / "id.pem")])
        assert ok.exit_code == 0, ok.output
        bad = runner.invoke(cli, ["agent", "get-cert", "--bus", server.bus_uri, "--slot", "1",
                                  "--out", "/proc/fleetid/id.pem"])
        assert bad.exit_code == 1, bad.output
        assert bad.exception is None or isinstance(bad.exception, SystemExit), bad.exception
        assert "Error: --out /proc/fleetid/id.pem" in bad.output, bad.output
    finally:
        server.stop()
        cloud.close()
