"""device/board_mqtt.py, the MQTT session device/board.run opens itself, over a recording
transport and a recording agent: each cycle reported as telemetry (a failed one too), a
`rotate` command from the cloud runs a rotation at once and is answered, a broker that
cannot be reached does not stop the cycles, and a lost session is opened again before
the next cycle.  The real transport (umqtt.simple over the SE-keyed TLS 1.3 client) is
run against mosquitto under MicroPython by tests/cli/test_agent_micropython_processes.py."""

from fleetid.common import mqttmsg
from fleetid.common.errors import LinkError
from fleetid.device.board_mqtt import BoardMqtt, run_on_mqtt
from fleetid.device.mqtt import TransportError

NAME = "FID-000000001"


class _Transport:
    """device/mqtt transport: records what was published; `inbox` batches come out of
    poll() one per call, once the first telemetry went out when `after_telemetry`;
    `refuse` makes connect() fail; `lose` makes poll() fail after the first telemetry."""

    def __init__(self, inbox=(), refuse=False, lose=False, after_telemetry=True):
        self.inbox = list(inbox)
        self.refuse = refuse
        self.lose = lose
        self.after_telemetry = after_telemetry
        self.published = []
        self.subscribed = []
        self.connects = 0
        self.closed = 0

    def connect(self):
        self.connects += 1
        if self.refuse:
            raise TransportError(TransportError.CONNECT, "refused")

    def subscribe(self, topic, qos=1):
        self.subscribed.append(topic)
        return qos

    def publish(self, topic, payload, retain=False, qos=1):
        self.published.append((topic, mqttmsg.decode(payload)))

    def poll(self, timeout):
        if self.after_telemetry and not self.published:
            return []
        if self.lose:
            raise TransportError(TransportError.CLOSED, "gone")
        return self.inbox.pop(0) if self.inbox else []

    def close(self):
        self.closed += 1

    def telemetry(self):
        return [m["m"] for t, m in self.published if t == mqttmsg.topic(NAME, "telemetry")]


class _Report:
    slot, journal, resumed, revocation, refused, retries = 2, "BASE", None, None, None, 0
    renew_at = None


class _Agent:
    revocation = None

    def __init__(self, failures=0):
        self.commands = []
        self.failures = failures

    def run_once(self, command=None):
        self.commands.append(command)
        if self.failures:
            self.failures -= 1
            raise LinkError(LinkError.TIMEOUT, "the SE did not answer")
        return _Report()


class _Clock:
    def now(self):
        return 1796000000

    def sleep(self, seconds):
        pass


class _Stack:
    se = None

    class protocol:  # noqa: N801 - the stack's attribute
        @staticmethod
        def transceive_raw(apdu):
            raise AssertionError("no relay in these tests")


def _session(transports, agent, log):
    made = iter(transports)
    return BoardMqtt(_Stack(), agent, lambda name: next(made), ("+",), _Clock(), log.append,
                     name=NAME)


def _rotate_command(seq):
    return (mqttmsg.topic(NAME, mqttmsg.COMMAND),
            mqttmsg.encode({"seq": seq, "kind": mqttmsg.KIND_ROTATE}))


def test_each_cycle_is_reported_and_a_rotate_command_runs_one_at_once():
    transport = _Transport(inbox=[[], [_rotate_command(7)]])
    agent, log = _Agent(), []
    report = run_on_mqtt(_session([transport], agent, log), 60, log.append, cycles=2)
    assert report.slot == 2
    # The second cycle came from the command, not from the hour-long interval.
    assert agent.commands == [None, "rotate"]
    assert transport.telemetry() == [{"agent": {"slot": 2, "journal": "BASE", "retries": 0}}] * 2
    replies = [m for t, m in transport.published if t == mqttmsg.topic(NAME, mqttmsg.REPLY)]
    assert [(r["re"], r["ok"]) for r in replies] == [(7, True)]
    assert transport.subscribed == [mqttmsg.topic(NAME, mqttmsg.COMMAND), "fleet/crl/+"]
    assert "mqtt: rotate command from the cloud" in log
    assert transport.connects == 1 and transport.closed == 0


def test_a_failed_cycle_is_reported_with_its_reason():
    transport = _Transport()
    log = []
    assert run_on_mqtt(_session([transport], _Agent(failures=1), log), 60, log.append,
                       cycles=1) is None
    assert transport.telemetry() == [{"agent": {"failed": "timeout"}}]
    assert any(line.startswith("cycle failed: ") for line in log), log


def test_the_cycles_go_on_without_the_broker_and_a_lost_session_is_reopened():
    agent, log = _Agent(), []
    unreachable = _Transport(refuse=True)
    assert run_on_mqtt(_session([unreachable], agent, log), 60, log.append,
                       cycles=1).slot == 2
    assert agent.commands == [None] and unreachable.published == []
    assert any(line.startswith("mqtt: cannot connect") for line in log), log

    lost = _Transport(lose=True)
    fresh = _Transport(inbox=[[], [_rotate_command(1)]], after_telemetry=False)
    agent, log = _Agent(), []
    run_on_mqtt(_session([lost, fresh], agent, log), 60, log.append, cycles=2)
    assert agent.commands == [None, "rotate"]  # the command came over the new session
    assert len(lost.telemetry()) == 1 and len(fresh.telemetry()) == 1
    assert lost.closed == 1 and any(line.startswith("mqtt: session lost") for line in log)
