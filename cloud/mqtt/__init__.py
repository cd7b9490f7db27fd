"""MQTT for the fleet cloud: the broker set-up (mosquitto), the cloud's own client
(retained per-CA CRLs, per-device commands, telemetry in), and the SCP03 relay channel the
cloud drives over-the-air SE administration through.  Topic layout and message formats:
fleetid.common.mqttmsg (shared with the device side)."""
