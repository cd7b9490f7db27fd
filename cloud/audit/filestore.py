"""The file form of the audit log: one JSON-lines file, fsync per append (AuditFile), an
atomic export of a registry's chain, and reading a file back.

The file form serves lines that run without a registry, the export that goes to an
auditor or a witness (`export_lines`), and offline verification (`fleetid audit verify
--log`).  It holds lines byte-identical to the registry's chain; the registry's table is
the record and a file beside the database is a mirror (the package docstring says why).
"""

import json
import os
import threading

from fleetid.cloud.audit.codec import CHECKPOINT, GENESIS_PREV, MAX_ENTRY_BYTES, parse_entry, seal
from fleetid.cloud.audit.errors import AuditChainBroken, AuditError


def read_log_file(path):
    """Yield the lines of a JSON-lines audit file (bytes, with newlines), in order.

    A final line without its newline is yielded as is (verification then reports it).
    """
    with open(path, "rb") as f:
        for line in f:
            yield line


def fsync_dir(path):
    fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _reverse_lines(f, size, block=65536):
    """Yield complete lines of an open binary file from the end backwards."""
    pos = size
    tail = b""
    while pos > 0:
        step = min(block, pos)
        pos -= step
        f.seek(pos)
        chunk = f.read(step) + tail
        parts = chunk.split(b"\n")
        tail = parts[0]
        for part in reversed(parts[1:]):
            if part:
                yield part + b"\n"
    if tail:
        yield tail + b"\n"


class AuditFile:
    """An append-only JSON-lines audit log in one file; every append is fsync'd.

    Opening reads only the tail (the last entry gives the head).  A file that ends in a
    partial line (a crash mid-append: that append never returned) is refused with
    AuditError(TORN_TAIL) unless `repair_torn_tail=True`, which cuts the partial line.
    Thread-safe within one process; one writer process per file.
    """

    def __init__(self, path, repair_torn_tail=False):
        self.path = os.fspath(path)
        self._lock = threading.Lock()
        self._failed = False
        created = not os.path.exists(self.path)
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
        except OSError as exc:
            raise AuditError(AuditError.IO, exc.strerror or "open failed") from None
        try:
            if created:
                fsync_dir(self.path)
            self._count, self._head = self._read_head(repair_torn_tail)
        except BaseException:
            os.close(self._fd)
            self._fd = None
            raise

    def _read_head(self, repair):
        size = os.fstat(self._fd).st_size
        if size == 0:
            return 0, GENESIS_PREV
        with open(self.path, "rb") as f:
            f.seek(size - 1)
            if f.read(1) != b"\n":
                # Everything after the last newline is an append that never returned.
                f.seek(max(0, size - MAX_ENTRY_BYTES - 1))
                window = f.read()
                cut = window.rfind(b"\n")
                if cut < 0 and len(window) < size:
                    # A "partial line" longer than any entry is not a torn append.
                    raise AuditError(AuditError.STATE, "no entry boundary near the end")
                keep = (size - len(window) + cut + 1) if cut >= 0 else 0
                if not repair:
                    raise AuditError(AuditError.TORN_TAIL, "%d bytes after the last entry"
                                     % (size - keep))
                os.ftruncate(self._fd, keep)
                os.fsync(self._fd)
                size = keep
                if size == 0:
                    return 0, GENESIS_PREV
            last = next(_reverse_lines(f, size))
        try:
            seq = json.loads(last)["seq"]
            entry = parse_entry(last, seq)
        except (ValueError, KeyError, TypeError, AuditChainBroken) as exc:
            raise AuditError(AuditError.STATE, "last entry unreadable: %s" % exc) from None
        return entry.seq + 1, entry.hash_hex

    def head(self):
        """(entry count, hash of the last entry in hex)."""
        with self._lock:
            return self._count, self._head

    def append_audit(self, fields):
        """Seal `fields` as the next entry, write it and fsync.  Returns the AuditEntry.

        Raises: AuditError(BAD_FIELDS), AuditError(IO).
        """
        with self._lock:
            entry = seal(fields, self._count, self._head)
            self._write(entry.line)
            self._count += 1
            self._head = entry.hash_hex
            return entry

    append = append_audit

    def append_lines(self, lines):
        """Append already-sealed lines (an export from the registry), checking that each
        continues this file's chain.  Raises AuditChainBroken, AuditError(IO)."""
        with self._lock:
            for line in lines:
                entry = parse_entry(line, self._count)
                if entry.fields["prev"] != self._head:
                    raise AuditChainBroken(self._count, AuditChainBroken.LINK)
                self._write(entry.line)
                self._count += 1
                self._head = entry.hash_hex

    def _write(self, data):
        # After a failed write the file may end in part of a line: refuse further appends
        # (they would follow garbage) until a reopen repairs the tail.
        if self._fd is None or self._failed:
            raise AuditError(AuditError.STATE, "closed, or a previous append failed: reopen")
        try:
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            os.fsync(self._fd)
        except OSError as exc:
            self._failed = True
            raise AuditError(AuditError.IO, exc.strerror or "write failed") from None

    def last_checkpoint(self):
        """The last checkpoint entry in the file, or None (reads backwards from the end)."""
        with self._lock:
            size = os.fstat(self._fd).st_size
            with open(self.path, "rb") as f:
                for line in _reverse_lines(f, size):
                    if b'"type":"checkpoint"' not in line:
                        continue
                    try:
                        entry = parse_entry(line, json.loads(line)["seq"])
                    except (ValueError, KeyError, TypeError, AuditChainBroken):
                        raise AuditError(AuditError.STATE, "unreadable entry near the end") \
                            from None
                    if entry.type == CHECKPOINT:
                        return entry
        return None

    def lines(self):
        """Iterate the stored lines from the start."""
        return read_log_file(self.path)

    def close(self):
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def write_atomically(path, chunks):
    """Write the byte strings `chunks` to `path` atomically: a temp file beside it, fsync,
    rename over `path`, directory fsync.  Returns the number of chunks written."""
    tmp = "%s.tmp-%d" % (path, os.getpid())
    count = 0
    with open(tmp, "wb") as f:
        for chunk in chunks:
            f.write(chunk)
            count += 1
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path)
    return count


def export_lines(lines, path):
    """Write lines (e.g. Registry.iter_audit_lines()) to a new file atomically (temp file,
    fsync, rename, directory fsync).  Returns the number of lines written."""
    return write_atomically(path, lines)
