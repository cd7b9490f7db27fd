#!/usr/bin/env python3
"""The fault table (issue 19 item 6): each fault injected into real parts on this machine
while requests keep coming, and what the requests made during the fault got.

    .venv/bin/python bench/faults.py [--only broker,hsm,postgres,slow] [--json FILE]

broker_restart   mosquitto (the fleet's configuration: mTLS, ACL, CRL file, no
                 persistence) SIGKILLed and started again on its ports, while a device
                 publishes QoS 1 telemetry every 50 ms to a running CloudMqtt that holds a
                 retained CRL.  ok = telemetry PUBACKed; typed = publish refused while the
                 broker is down (paho: not connected); wrong = a message accepted twice by
                 the cloud; lost = the retained CRL missing after the restart; recover =
                 kill -> first telemetry accepted after the restart (the retained CRL found
                 by a new subscriber, in the note).  Telemetry PUBACKed by mosquitto but
                 never delivered is counted in the note, not as a lost record: QoS 1 is at
                 least once only up to the broker, which runs without persistence, so what
                 it held when killed is gone, and so is what a device published after the
                 restart before the cloud had subscribed again (no subscriber yet).
hsm_session_lost SoftHSM2 under a running EST service (in-process CloudServer over a
                 Pkcs11Backend): C_CloseAllSessions on its token, once with the login
                 possible again and once with the login refused for 1 s.  ok = 200 with
                 its certificate recorded; typed = 503 with nothing recorded; wrong = any
                 other answer, or a 200 whose record is missing; lost/forked = records
                 that differ from the answers (a certificate without record, or two).
                 recover = fault -> first 200.

postgres_restart `fleetid cloud serve --workers 2` on a throwaway PostgreSQL cluster
postgres_pause   (bench/_pg_support.py, registry_timeout 3 s), enrolments of fresh devices
worker_killed    one after another (nonce, attested CSR, simpleenroll) while PostgreSQL is
                 stopped and started again, while every PostgreSQL process is SIGSTOPped,
                 and while one worker is SIGKILLed.  ok = 200 with exactly one certificate
                 recorded; typed = 503, or the connection dropped by the killed worker;
                 wrong = a 200 whose record is missing or doubled; lost/forked = a device
                 with two operational certificates; answers that are neither are counted
                 as "untyped" in the note (and fail the row).  recover = fault -> first 200
                 after the fault ended (for the worker: once the parent has restarted it).
                 Each figure stands beside one enrolment's time without a fault, same run.

Each row must read wrong 0, lost/forked 0, no untyped answer and a finite recover time;
the exit status is 1 otherwise.

slow_clients     18 hostile TLS clients on the in-process EST listener (ServerTimeouts of
                 1 s): bodies that stop, request heads dribbled a byte per 0.2 s, bodies
                 abandoned by a close; good enrolments run meanwhile.  ok = good
                 enrolments served with one record; typed = hostile connections the server
                 ended (408 or close); wrong = a hostile one answered 2xx; recover = the
                 longest a hostile connection held its slot.  The many-case version with
                 registry / audit / HSM snapshots is tests/cloud/test_slow_clients.py.

Runs in about a minute on 2 shared cores.
"""

import argparse
import base64
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench._fault_support import (FaultRow, SOFTHSM_MODULE, close_all_sessions,  # noqa: E402
                                  format_table, restart_broker)

SCENARIOS = ("broker", "hsm", "postgres", "slow")


# -- broker restarted -------------------------------------------------------------------


def _broker_parts(folder):
    from bench.mqtt import BenchPki
    from fleetid.cloud.mqtt.broker import Broker

    os.makedirs(folder, exist_ok=True)
    pki = BenchPki(folder)
    config, make_cloud = pki.broker_and_cloud()
    broker = Broker(config, os.path.join(folder, "broker")).start()
    cloud = make_cloud(broker)
    pki.issue("dev-1", key=pki.device_key)
    pki.issue("dev-2", key=pki.device_key)
    return pki, broker, cloud


class _Telemetry(threading.Thread):
    """A device publishing QoS 1 telemetry every `period` s (paho reconnects by itself,
    capped at 4 s as the cloud's)."""

    def __init__(self, pki, broker, name="dev-1", period=0.05):
        super().__init__(daemon=True)
        from bench.mqtt import _device_client

        self.client = _device_client(pki, name)
        self.client.reconnect_delay_set(1, 4)
        self.name, self.period = name, period
        self.stop = threading.Event()
        self.acked, self.refused = [], 0
        self.client.connect(broker.host, broker.port, keepalive=30)
        self.client.loop_start()

    def run(self):
        from fleetid.common import mqttmsg

        seq = int(time.time() * 1000)  # ~ wall-clock ms, as devices start theirs
        while not self.stop.wait(self.period):
            seq = max(seq + 1, int(time.time() * 1000))  # seq ~ wall-clock ms
            info = self.client.publish(mqttmsg.topic(self.name, mqttmsg.TELEMETRY),
                                       mqttmsg.encode({"seq": seq, "m": {"n": seq}}), qos=1)
            try:
                info.wait_for_publish(1.0)
            except (RuntimeError, ValueError):  # not connected: refused at once
                self.refused += 1
                continue
            if info.is_published():
                self.acked.append(seq)
            else:
                self.refused += 1

    def close(self):
        self.stop.set()
        self.join(5)
        self.client.disconnect()
        self.client.loop_stop()


def _retained_crl_found(pki, broker, timeout):
    """A new subscriber on fleet/crl/ca: True when the retained CRL reaches it."""
    from bench.mqtt import _device_client
    from fleetid.common import mqttmsg

    got = threading.Event()
    client = _device_client(pki, "dev-2", lambda c, u, m: got.set() if m.retain else None)
    client.on_connect = lambda c, u, f, rc, p: c.subscribe(mqttmsg.crl_topic("ca"), 1)
    try:
        client.connect(broker.host, broker.port, keepalive=30)
    except OSError:
        return False
    client.loop_start()
    try:
        return got.wait(timeout)
    finally:
        client.disconnect()
        client.loop_stop()


def _when(seqs, killed_at_ms):
    """Where the lost messages were published, relative to the kill (seq ~ wall ms)."""
    if not seqs:
        return "-"
    return "published %+d .. %+d ms from the kill" % (seqs[0] - killed_at_ms,
                                                     seqs[-1] - killed_at_ms)


def broker_restart(folder, down_s=1.0, bound_s=30.0):
    pki, broker, cloud = _broker_parts(folder)
    accepted = []
    cloud.sink.on_telemetry = lambda device, fields: accepted.append(fields["seq"])
    device = None
    try:
        cloud.connect()
        cloud.publish_crl("ca", pki.crl_der)
        device = _Telemetry(pki, broker)
        device.start()
        deadline = time.monotonic() + 10
        while not accepted and time.monotonic() < deadline:
            time.sleep(0.05)
        killed_at, killed_at_ms = time.monotonic(), int(time.time() * 1000)
        restart_broker(broker, down_s)
        listening_s = time.monotonic() - killed_at
        before = len(accepted)
        recover = None
        while time.monotonic() - killed_at < bound_s:
            if len(accepted) > before:
                recover = time.monotonic() - killed_at
                break
            time.sleep(0.02)
        crl_ok = recover is not None and _retained_crl_found(pki, broker, 10)
        crl_s = time.monotonic() - killed_at if crl_ok else None
        time.sleep(1.0)  # the last PUBACKed messages reach the cloud
        device.close()
        time.sleep(0.5)
        acked, seen = set(device.acked), set(accepted)
        in_crash = sorted(acked - seen)
        row = FaultRow("broker_restart", ok=len(device.acked), typed_error=device.refused,
                       wrong_accept=len(accepted) - len(seen),
                       lost_or_forked=0 if crl_ok else 1, recover_s=recover if crl_ok else None,
                       note="down %.1f s; retained CRL to a new subscriber %s; cloud "
                            "reconnections %d; replays refused %d; telemetry PUBACKed, never "
                            "delivered %d (%s)" % (
                                down_s, "after %.2f s" % crl_s if crl_ok else "NEVER",
                                cloud.connections - 1, cloud.sink.metrics()["replay"],
                                len(in_crash), _when(in_crash, killed_at_ms)))
        row.baseline = ("the broker listening again", listening_s)
    finally:
        if device is not None and device.is_alive():
            device.close()
        cloud.close()
        broker.stop()
    return row


# -- HSM session lost -------------------------------------------------------------------


def _softhsm_token(folder, pin):
    tokendir = os.path.join(folder, "tokens")
    os.makedirs(tokendir)
    conf = os.path.join(folder, "softhsm2.conf")
    with open(conf, "w") as f:
        f.write("directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n"
                % tokendir)
    os.environ["SOFTHSM2_CONF"] = conf  # read when this process loads the module
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "faults",
                    "--so-pin", "so-pin-faults", "--pin", pin], check=True,
                   capture_output=True)


def _enrol(cloud, device):
    from bench._attestation_support import enrolment

    status, _, nonce_b64 = cloud.request("est", "GET", "/.well-known/est/nonce",
                                         files=device.files())
    if status != 200:
        return status
    _key, csr = enrolment(device.chip, base64.b64decode(nonce_b64), device.name)
    return cloud.request("est", "POST", "/.well-known/est/simpleenroll",
                         files=device.files(), body=base64.b64encode(csr),
                         headers={"Content-Type": "application/pkcs10"})[0]


RETRY_PAUSE_S = 0.05


def _requests_until_served(cloud, fleet, devices, row, started, bound_s,
                           refused_until=None, pin=None):
    """Enrol `devices` (provisioned before the fault) until one is served (200) or
    `bound_s` passes; tally the row.  Until `refused_until` the token refuses the login;
    then the backend has its `pin` again.  After a refusal the next device tries
    RETRY_PAUSE_S later, as a device retries after a 503: without the pause an unloaded
    machine used every device within the 1 s refusal and the row read "never"."""
    backend = fleet.hsm._hsm
    for device in devices:
        if time.monotonic() - started > bound_s:
            return
        if refused_until is not None and time.monotonic() >= refused_until:
            backend._pin, refused_until = pin, None  # the login works again
        status = _enrol(cloud, device)
        kinds = [c.kind for c in fleet.registry.certificates(device.serial)]
        operational = kinds.count("operational")
        if status == 200 and operational == 1:
            row.ok += 1
            row.recover_s = time.monotonic() - started
            return
        if status == 503 and operational == 0:
            row.typed_error += 1
            time.sleep(RETRY_PAUSE_S)
        else:
            row.wrong_accept += 1
        row.lost_or_forked += operational > 1 or (status != 200 and operational)


def hsm_session_lost(folder, bound_s=20.0, devices_per_fault=60):
    from bench._cloud_support import Fleet, RunningCloud
    from fleetid.cloud.hsm.pkcs11_backend import Pkcs11Backend

    pin = "faults-user-pin"
    _softhsm_token(folder, pin)
    backend = Pkcs11Backend(SOFTHSM_MODULE, "faults", pin, max_sessions=4)
    fleet = Fleet(os.path.join(folder, "fleet"), hsm=backend)
    rows = []
    try:
        with RunningCloud(fleet) as cloud:
            warm = [fleet.provision() for _ in range(3)]
            started = time.monotonic()
            for device in warm:  # warm: sessions in the pool; the baseline latency
                _enrol(cloud, device)
            enrol_s = (time.monotonic() - started) / len(warm)
            for name, refused_s in (("hsm_session_lost", None),
                                    ("hsm_lost_login_refused", 1.0)):
                row = FaultRow(name)
                devices = [fleet.provision() for _ in range(devices_per_fault)]
                if refused_s is not None:
                    backend._pin = "refused-while-the-fault-lasts"
                started = time.monotonic()
                close_all_sessions(backend)
                _requests_until_served(cloud, fleet, devices, row, started, bound_s,
                                       started + refused_s if refused_s else None, pin)
                row.note = "C_CloseAllSessions%s; re-logins so far %d" % (
                    ", login refused %.0f s" % refused_s if refused_s else "",
                    backend.relogins)
                row.baseline = ("one enrolment, no fault", enrol_s)
                rows.append(row)
    finally:
        fleet.close()
        backend.close()
    return rows


# -- PostgreSQL restarted / paused, a worker killed ---------------------------------------


def _attempt(fleet, port, device):
    """One enrolment of a fresh device (nonce, attested CSR, simpleenroll) against
    `fleetid cloud serve`.  Returns: the HTTP status, or "reset" (connection dropped)."""
    import http.client

    from bench._attestation_support import enrolment
    from bench.workers import request

    try:
        status, body = request(fleet, port, device, "GET", "nonce")
        if status != 200:
            return status
        _key, csr = enrolment(device.chip, base64.b64decode(body), device.name)
        return request(fleet, port, device, "POST", "simpleenroll", base64.b64encode(csr))[0]
    except (OSError, http.client.HTTPException):
        return "reset"


def _certificates(fleet, device, attempts=3):
    """The device's certificates in the registry; this process's own connection may have
    been cut by the fault (it reconnects on the next call): bounded retries."""
    from fleetid.cloud.registry.errors import RegistryError

    for attempt in range(attempts):
        try:
            return fleet.registry.certificates(device.serial)
        except RegistryError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.5)


def _score(row, fleet, results):
    """Tally (device, status) pairs into `row`, reading the registry (after recovery)."""
    untyped = {}
    for device, status in results:
        kinds = [c.kind for c in _certificates(fleet, device)]
        operational = kinds.count("operational")
        if status == 200:
            row.ok += 1
            row.wrong_accept += operational != 1
        elif status in (503, "reset"):
            row.typed_error += 1
        else:
            untyped[status] = untyped.get(status, 0) + 1
        row.lost_or_forked += operational > 1
    row.untyped = sum(untyped.values())
    return ", untyped %r" % untyped if untyped else ""


def _fault_run(fleet, port, devices, fault_s, on, off, bound_s=30.0, ready=None):
    """Requests one after another from `on()` until the first 200 after `off()` (called
    at `fault_s`).  Returns: (results, seconds to recover or None)."""
    results, started, restored = [], time.monotonic(), False
    on()
    try:
        for device in devices:
            elapsed = time.monotonic() - started
            if not restored and elapsed >= fault_s:
                off()
                restored = True
            if elapsed > bound_s:
                break
            status = _attempt(fleet, port, device)
            results.append((device, status))
            if restored and status == 200 and (ready is None or ready()):
                return results, time.monotonic() - started
            time.sleep(0.05)
    finally:
        if not restored:
            off()
    return results, None


def _serve_config(fleet, folder, registry):
    from bench.workers import write_config

    path = write_config(fleet, folder, registry)
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:  # a paused registry: 503 after 3 s, not libpq's minutes
        f.write(text.replace('registry = "%s"\n' % registry,
                             'registry = "%s"\nregistry_timeout = 3\n' % registry, 1))
    return path


def postgres_and_workers(folder, per_fault=40):
    import signal

    from bench._cloud_support import Fleet
    from bench._fault_support import pg_signal_all, pg_start, pg_stop, worker_pids
    from bench._pg_support import ThrowawayPostgres
    from bench.workers import start_server, stop_server
    from fleetid.cloud.registry import open_registry

    rows = []
    with ThrowawayPostgres() as pg:
        fleet = Fleet(os.path.join(folder, "fleet"), registry_kind=open_registry(pg.uri),
                      verify_signatures="first")
        process, port = start_server(_serve_config(fleet, folder, pg.uri), folder, 2)
        try:
            baseline = _baseline(fleet, port)
            faults = [
                ("postgres_restart", 1.0, lambda: pg_stop(pg), lambda: pg_start(pg), None),
                ("postgres_pause", 4.0, lambda: pg_signal_all(pg, signal.SIGSTOP),
                 lambda: pg_signal_all(pg, signal.SIGCONT), None)]
            notes = {"postgres_restart": "pg_ctl stop -m fast, started again after 1 s",
                     "postgres_pause": "every PostgreSQL process SIGSTOPped 4 s "
                                       "(registry_timeout 3 s)",
                     "worker_killed": "SIGKILL of 1 of 2 workers 0.15 s into the requests; "
                                      "recovered = restarted by the parent and a 200"}
            killed = []

            def kill_worker():  # 0.15 s on: a request is in flight (one takes ~0.1 s)
                killed.append(worker_pids(process.pid)[0])
                os.kill(killed[0], signal.SIGKILL)

            def workers_back():
                pids = worker_pids(process.pid)
                return bool(killed) and len(pids) == 2 and killed[0] not in pids

            timer = threading.Timer(0.15, kill_worker)
            faults.append(("worker_killed", 0.0, timer.start, lambda: None, workers_back))
            pools = [[fleet.provision() for _ in range(per_fault)] for _ in faults]
            for (name, fault_s, on, off, ready), devices in zip(faults, pools):
                results, recover = _fault_run(fleet, port, devices, fault_s, on, off,
                                              ready=ready)
                row = FaultRow(name, recover_s=recover)
                row.note = notes[name] + _score(row, fleet, results)
                row.baseline = ("one enrolment, no fault", baseline)
                rows.append(row)
        finally:
            stop_server(process)
            fleet.close()
    return rows


def _baseline(fleet, port, count=3):
    devices = [fleet.provision() for _ in range(count)]
    started = time.monotonic()
    for device in devices:
        if _attempt(fleet, port, device) != 200:
            raise SystemExit("the server refuses enrolments before any fault")
    return (time.monotonic() - started) / count


# -- slow and abruptly closing clients --------------------------------------------------


def _hostile(cloud, files, kind, bound_s, outcome):
    """One hostile TLS client on the EST listener: "slow_body" (a POST whose body stops
    after 10 bytes), "slow_head" (a request head dribbled a byte per 0.2 s) or "abrupt"
    (a body abandoned by a close).  Appends (kind, ended by the server, seconds, first
    bytes of the answer) to `outcome`."""
    import socket
    import ssl

    head = (b"POST /.well-known/est/simpleenroll HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/pkcs10\r\nContent-Length: 1000\r\n\r\n")
    started = time.monotonic()
    raw = socket.create_connection(("127.0.0.1", cloud.ports["est"]), timeout=bound_s)
    sock = cloud.client_context(files).wrap_socket(raw, server_hostname="127.0.0.1")
    answer, ended = b"", False
    with sock:
        if kind == "abrupt":
            sock.sendall(head + b"A" * 10)
            outcome.append((kind, True, time.monotonic() - started, b""))
            return
        dribble = b"X-Slow: " + b"a" * 4000 if kind == "slow_head" else None
        sock.sendall(b"GET /.well-known/est/cacerts HTTP/1.1\r\n" if dribble
                     else head + b"A" * 10)
        sock.settimeout(0.2)
        while time.monotonic() - started < bound_s and not ended:
            try:
                data = sock.recv(65536)
                answer += data
                ended = not data
            except (socket.timeout, ssl.SSLWantReadError):
                if dribble:
                    try:
                        sock.sendall(dribble[:1])
                    except OSError:
                        ended = True
                    dribble = dribble[1:] or b"x"
            except OSError:
                ended = True
    outcome.append((kind, ended, time.monotonic() - started, answer[:12]))


def slow_clients(folder, hostile_each=6, bound_s=20.0):
    from bench._cloud_support import Fleet, RunningCloud
    from fleetid.cloud.http.middleware import ServerTimeouts

    fleet = Fleet(os.path.join(folder, "fleet"))
    timeouts = ServerTimeouts(handshake=1.0, idle=1.0, body=1.0, linger=0.5)
    holder = fleet.provision()
    devices = [fleet.provision() for _ in range(40)]
    try:
        with RunningCloud(fleet, timeouts=timeouts) as cloud:
            started = time.monotonic()
            for device in devices[:3]:
                _enrol(cloud, device)
            baseline = (time.monotonic() - started) / 3
            outcome, threads, files = [], [], holder.files()
            for kind in ("slow_body", "slow_head", "abrupt"):
                for _ in range(hostile_each):
                    thread = threading.Thread(target=_hostile, args=(
                        cloud, files, kind, bound_s, outcome), daemon=True)
                    thread.start()
                    threads.append(thread)
            results = []
            for device in devices[3:]:  # good clients while the hostile ones are held
                if not any(thread.is_alive() for thread in threads):
                    break
                results.append((device, _enrol(cloud, device)))
            for thread in threads:
                thread.join(bound_s + 5)
        row = FaultRow("slow_clients")
        row.ok = sum(1 for _d, status in results if status == 200)
        row.typed_error = sum(1 for _k, ended, _s, _a in outcome if ended)
        row.wrong_accept = sum(1 for _k, _e, _s, answer in outcome
                               if answer.startswith(b"HTTP/1.1 2"))
        row.untyped = sum(1 for _d, status in results if status != 200)
        row.lost_or_forked = sum(
            1 for device, status in results
            if [c.kind for c in fleet.registry.certificates(device.serial)].count(
                "operational") != (1 if status == 200 else 0))
        held = [seconds for _k, ended, seconds, _a in outcome if ended]
        row.recover_s = max(held) if len(held) == len(outcome) else None
        row.note = ("%d hostile EST connections (slow body, slow head, abrupt close), "
                    "timeouts 1 s; recover = the longest a hostile one was held; good "
                    "enrolments meanwhile %d" % (len(outcome), len(results)))
        row.baseline = ("one enrolment, no fault", baseline)
    finally:
        fleet.close()
    return [row]


# -- the table --------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(SCENARIOS),
                        help="comma-separated scenarios: %s" % ", ".join(SCENARIOS))
    parser.add_argument("--quick", action="store_true", help="the default (kept for report.py)")
    parser.add_argument("--json", dest="json_path", help="also write the table as JSON")
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(SCENARIOS))
    if unknown:
        parser.error("unknown scenario(s): %s" % ", ".join(unknown))
    print("machine: %s, %d cores, Python %s" % (platform.machine(), os.cpu_count(),
                                                platform.python_version()))
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        if "broker" in chosen:
            from fleetid.cloud.mqtt.broker import find_mosquitto

            if find_mosquitto() is None:
                sys.exit("mosquitto is not installed (apt-get install mosquitto)")
            rows.append(broker_restart(os.path.join(folder, "broker")))
        if "hsm" in chosen:
            if not os.path.exists(SOFTHSM_MODULE):
                sys.exit("SoftHSM2 is not installed (apt-get install softhsm2)")
            os.makedirs(os.path.join(folder, "hsm"))
            rows += hsm_session_lost(os.path.join(folder, "hsm"))
        if "postgres" in chosen:
            from bench._pg_support import missing

            if missing():
                sys.exit("PostgreSQL rows need: %s" % "; ".join(missing()))
            rows += postgres_and_workers(os.path.join(folder, "pg"))
        if "slow" in chosen:
            rows += slow_clients(os.path.join(folder, "slow"))
    for line in format_table(rows):
        print(line)
    if args.json_path:  # bench/report.py
        from bench._report_support import figure, write_json

        write_json(args.json_path, "faults", {"rows": [row.as_dict() for row in rows]}, [
            figure("%s: time to recover" % row.fault, row.recover_s, "s",
                   row.baseline[0], row.baseline[1], higher_is_better=False)
            for row in rows])
    failed = [row.fault for row in rows if not row.passed]
    if failed:
        print("FAILED: %s (wrong accepts, lost or forked records, or no recovery)"
              % ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
