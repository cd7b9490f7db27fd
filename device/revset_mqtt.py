# Retained compact sets from MQTT into the device's compact-set cache.  Portable.
#
# DeviceChannel (device/mqtt.py) hands every retained fleet/crl/<label> message to one
# on_crl(label, payload) callable; RevsetDispatch takes the "revset" label (the compact
# set: cloud/revocation/mqtt_delivery.py) into a RevsetCache and passes every other label
# to the previous handler (the CRL caches).  The payload is untrusted until the cache has
# verified it through the SE; a refused one leaves the old set in place.

REVSET_LABEL = "revset"


class RevsetDispatch:
    """on_crl handler: cache: RevsetCache.  clock: () -> epoch seconds.  on_crl: the
    handler for other labels, or None.  results: "updated" / "unchanged" /
    "refused: <reason>" per compact set received."""

    def __init__(self, cache, clock, on_crl=None):
        self.cache = cache
        self.clock = clock
        self.on_crl = on_crl
        self.results = []

    def __call__(self, label, payload):
        if label != REVSET_LABEL:
            if self.on_crl is not None:
                self.on_crl(label, payload)
            return
        from fleetid.device.revset_cache import RevsetCacheError

        try:
            result = self.cache.refresh(lambda: payload, self.clock())
        except RevsetCacheError as exc:
            result = "refused: " + exc.reason
        except Exception as exc:  # anything else the bytes provoke: the old set stays
            result = "refused: " + type(exc).__name__
        self.results.append(result)
