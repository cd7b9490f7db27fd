"""The issuance journal: every certificate the line received from the CA, on disk before
the certificate goes to the SE.

Why: the registry stores a certificate only together with a state change (commit, or
revoke after add_certificate), so between "the CA signed" and "the registry committed"
something durable must remember the certificate, or a crash in that window would leave a
valid certificate nobody can revoke.  `fleetid line reconcile` (reconcile.py) reads it.
"""

import json
import os
import threading
import time

from fleetid.cloud import audit
from fleetid.cloud.registry.errors import RegistryError


# fdatasync where the OS has it: an O_APPEND write's data and the file size (what reading
# the line back needs) are flushed, the modification time is not (one metadata write less
# per record).  fsync elsewhere.
_sync = getattr(os, "fdatasync", os.fsync)


class IssuanceJournal:
    """Durable record of every certificate the line received from the CA, written before
    the certificate goes to the SE.  JSON lines, thread-safe;
    certificates are public, nothing secret is written.

    Durability with group commit: `record` returns only once an fsync (fdatasync, _sync)
    that started after its line was written has completed.  Stations appending at the same moment share one
    fsync (the first becomes the syncer, the others wait for it), so K stations do not
    queue K fsyncs one behind the other.

    Line format: {"serial": int, "se_uid": hex, "cert": hex DER, "time": RFC 3339}.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        self._cond = threading.Condition()
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._written = 0  # lines appended (in the file, maybe not on disk yet)
        self._synced = 0  # lines known to be on disk
        self._syncing = False
        self.fsyncs = 0

    def record(self, serial, se_uid, cert_der, when=None):
        """Append one issued certificate and return once it is on disk (fsync)."""
        # The JSON object json.dumps(sort_keys=True, separators=(",", ":")) would write:
        # hex strings, an int and an RFC 3339 time need no escaping.
        line = ('{"cert":"%s","se_uid":"%s","serial":%d,"time":"%s"}\n' % (
            bytes(cert_der).hex(), bytes(se_uid).hex(), serial,
            audit.format_time(time.time() if when is None else when))).encode()
        with self._cond:
            if self._fd is None:
                raise RegistryError(RegistryError.CLOSED, "issuance journal closed")
            os.write(self._fd, line)  # O_APPEND: one write, one whole line
            self._written += 1
            mine = self._written
            while self._synced < mine:
                if self._syncing:
                    self._cond.wait()
                    continue
                self._syncing = True
                target = self._written
                fd = self._fd
                self._cond.release()
                try:
                    _sync(fd)
                    ok = True
                finally:
                    self._cond.acquire()
                    self._syncing = False
                    self._cond.notify_all()
                if ok:
                    self.fsyncs += 1
                    self._synced = max(self._synced, target)

    def entries(self):
        """Every journaled certificate: list of (serial, se_uid bytes, cert DER).  A torn
        last line (crash during the write) is ignored: its certificate never left."""
        out = []
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return out
        for raw in data.split(b"\n"):
            if not raw.strip():
                continue
            try:
                item = json.loads(raw)
                out.append((int(item["serial"]), bytes.fromhex(item["se_uid"]),
                            bytes.fromhex(item["cert"])))
            except (ValueError, KeyError, TypeError):
                continue
        return out

    def certificates_for(self, serial):
        """DER certificates journaled for registry serial `serial`, oldest first."""
        return [cert for s, _uid, cert in self.entries() if s == serial]

    def close(self):
        with self._cond:
            while self._syncing:
                self._cond.wait()
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
