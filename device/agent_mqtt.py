# The device agent on MQTT: the channel (device/mqtt.py) feeds the agent (device/agent.py)
# through its injected collaborators, and reports back.  Portable: CPython and MicroPython.
#
#     link = AgentMqtt(agent, channel)
#     channel.start()
#     while running:
#         report = link.cycle(timeout)      # MQTT in; a "rotate" command runs the agent
#
# What goes where:
#   retained CRL on fleet/crl/<label>  -> agent.revocation.refresh(fetch, now): the CRL
#       cache verifies it through the SE and keeps the highest cRLNumber (a replayed or
#       older CRL is refused there); the outcome is counted, never raised
#   command "rotate"                   -> agent.run_once(command="rotate") at the next
#       cycle (not inside the MQTT callback: a rotation talks to EST and may take seconds);
#       the report's summary goes out as telemetry
#   command "apdu"                     -> relayed by the channel itself (SCP03, verbatim)
#   agent.run_once() reports           -> telemetry {"agent": {...}}
# The agent never builds APDUs for the relay and never sees the relayed plaintext.


_REVSET_LABEL = "revset"  # fleet/crl/revset carries the compact set, not a CRL


class AgentMqtt:
    """Joins a DeviceChannel and an Agent.

    Params: agent: device.agent.Agent.  channel: device.mqtt.DeviceChannel (its on_crl and
        on_rotate are set here).
    Attributes: crl_results: list of "updated" / "unchanged" / "refused: <reason>".
    """

    def __init__(self, agent, channel):
        self.agent = agent
        self.channel = channel
        self.pending = None
        self.crl_results = []
        channel.on_crl = self._crl
        channel.on_rotate = self._rotate

    def _crl(self, label, der):
        cache = self.agent.revocation
        if cache is None or label == _REVSET_LABEL:  # the compact set: device/revset_mqtt.py
            return
        from fleetid.device.anchored_store import RevocationCacheError

        # Anything else (the SE's LinkError / ApduError) reaches DeviceChannel.step(), the
        # network-callback boundary that counts it and keeps the loop alive.
        try:
            result = cache.refresh(lambda: der, self.agent.clock.now())
        except RevocationCacheError as exc:  # CrlError: the cache keeps what it had
            result = "refused: %s" % (getattr(exc, "reason", None) or type(exc).__name__)
        self.crl_results.append(result)

    def _rotate(self):
        self.pending = "rotate"

    def cycle(self, timeout):
        """Handle what MQTT brought within `timeout` s; run the agent if a command asked.
        Returns: the agent's report, or None when it did not run."""
        self.channel.step(timeout)
        command = self.pending
        if command is None:
            return None
        self.pending = None
        return self.run(command)

    def run(self, command=None):
        """One agent cycle, its summary published as telemetry.  Returns: the report."""
        report = self.agent.run_once(command=command)
        self.channel.send_telemetry({"agent": summary(report)})
        return report


def summary(report):
    """The telemetry view of an agent report (no key material: slots, states, reasons)."""
    out = {}
    for name in ("slot", "journal", "resumed", "revocation", "refused", "retries"):
        value = getattr(report, name, None)
        if value is not None:
            out[name] = value if isinstance(value, (int, str)) else str(value)
    return out
