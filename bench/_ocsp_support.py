"""OCSP responders for a test fleet (bench/_cloud_support.Fleet), and a loopback HTTP
server for any aiohttp app.  No tests/ imports: bench/revocation.py uses it from `bash
scripts/setup.sh` alone; tests/cloud/ocsp_support.py re-exports it."""

import asyncio
import threading

from aiohttp import web

from fleetid.cloud.http.ocsp_fast import OcspFastSite
from fleetid.cloud.revocation.ocsp import OcspResponder, OcspSigner, new_ocsp_signer
from bench._cloud_support import NOW


def ocsp_signers(fleet):
    """One delegated responder per issuing CA (made in the fleet's HSM on first use)."""
    signers = getattr(fleet, "_ocsp_signers", None)
    if signers is None:
        signers = []
        for batch, ca in sorted(fleet.ca_certs.items()):
            label = "ocsp-" + batch
            cert = new_ocsp_signer(fleet.hsm, "ca-widget-" + batch, ca, label, now=NOW)
            signers.append(OcspSigner(ca, fleet.hsm, label, cert))
        fleet._ocsp_signers = signers
    return signers


def ocsp_responder(fleet, revoked_cas=None, **kwargs):
    return OcspResponder(fleet.registry, ocsp_signers(fleet), revoked_cas=revoked_cas,
                         clock=fleet.clock, **kwargs)


class LoopbackServer:
    """Serve an aiohttp Application on 127.0.0.1:<free port> in a thread.  `url`.
    fast: an OcspFastPath (cloud/http/ocsp_fast.py) to serve OCSP as `fleetid cloud
    serve` does (its connections start in the fast path), or None (the app alone)."""

    def __init__(self, app, fast=None):
        self.fast = fast
        self.app = app
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.runner = web.AppRunner(self.app, access_log=None)
        self.loop.run_until_complete(self.runner.setup())
        if self.fast is not None:
            site = OcspFastSite(self.runner, "127.0.0.1", 0, self.fast)
        else:
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self.url = "http://127.0.0.1:%d" % self.port
        self._ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.runner.cleanup())
        self.loop.close()

    def __enter__(self):
        self.thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
