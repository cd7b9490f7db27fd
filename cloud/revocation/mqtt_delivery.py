"""Retained-MQTT delivery of the compact revocation set (the offline tier's push channel).

Each new set the RevsetPublisher builds is published retained on fleet/crl/revset
(common/mqttmsg.crl_topic("revset")): the broker's ACL already lets every device read
fleet/crl/#, and a device that was offline when it was published gets it on its next
subscription.  The set is signed by the revocation key under the fleet root, so the
channel adds no trust: the device verifies it through its SE (device/revset_mqtt.py ->
device/revset_cache.py) and keeps the highest number it verified.

    publisher.subscribers.append(retained_publisher(cloud_mqtt))
"""

import logging

REVSET_LABEL = "revset"
_log = logging.getLogger("fleetid.cloud.revocation")


def retained_publisher(cloud_mqtt, label=REVSET_LABEL):
    """A RevsetPublisher subscriber that publishes each new set retained through a
    connected fleetid.cloud.mqtt CloudMqtt (its publish_crl: QoS 1, retained)."""

    def publish(number, wire):
        cloud_mqtt.publish_crl(label, wire)
        _log.info("compact set %d published retained on MQTT (%d bytes)", number, len(wire))

    return publish
