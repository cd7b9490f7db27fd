"""The emulated secure element's non-volatile memory (NVM).

The state is a flat mapping of str keys to bytes values.  It changes only through whole
transactions: `commit(changes)` or `with nvm.transaction() as tx: ...`.  A transaction is
applied completely or not at all, also across a power cut:

    file-backed:  write "<path>.tmp" -> fsync -> os.replace(tmp, path)  <- the atomic point
                  -> fsync(directory)
    in-memory:    the dict is swapped in one step.

File layout (all integers big-endian):

    magic "FIDNVM01" (8) | body length u32 | body | SHA-256(body) (32)
    body = records sorted by key, each:  key length u16 | key (UTF-8) |
                                         value length u32 | value

A file whose magic, length or digest does not check out raises NvmCorrupt: the emulator
never guesses at half-written state.

Fault injection, MCUboot-simulator style: `write_count` counts the commits of a run;
`cut_power_at(k, after_atomic)` makes the k-th commit from then on raise PowerLoss, either
before the atomic point (the state stays old; a torn temp file is left behind, which the
next power-up discards) or just after it (the state is new, but the caller never hears
back).

Stale temp files: "<path>.tmp" of a commit that never reached its atomic point (a power
cut, a killed process) is never valid state, and it holds key scalars like the image
itself.  Power-up (opening an Nvm, reload()) deletes it, and `remove_stale_temp_files`
clears a folder of chips whose NVM nobody opens again (a killed fab or line run).

Private keys live in this state (the SE boundary): repr() and errors never show values.
"""

import contextlib
import hashlib
import os
import struct

from fleetid.common.errors import FleetidError

_MAGIC = b"FIDNVM01"
_HEADER = struct.Struct(">8sI")  # magic, body length
_KEY_LEN = struct.Struct(">H")
_VALUE_LEN = struct.Struct(">I")
_DIGEST_LEN = 32  # SHA-256


class NvmError(FleetidError):
    """The NVM file could not be read or written."""


class NvmCorrupt(NvmError):
    """The NVM file is not a complete, intact NVM image (`reason` says which check failed)."""

    def __init__(self, reason):
        super().__init__("NVM image corrupt: " + reason)
        self.reason = reason


class PowerLoss(Exception):
    """Simulated power cut during an NVM commit (fault injection only).

    `applied` is True when the cut came after the atomic point (the commit took effect)."""

    def __init__(self, commit_number, applied):
        super().__init__(
            "power lost at commit %d (%s the atomic point)"
            % (commit_number, "after" if applied else "before")
        )
        self.commit_number = commit_number
        self.applied = applied


def encode_image(state):
    """Serialise a state mapping (str -> bytes) to the file layout above."""
    body = bytearray()
    for key in sorted(state):
        value = state[key]
        raw_key = key.encode("utf-8")
        body += _KEY_LEN.pack(len(raw_key)) + raw_key
        body += _VALUE_LEN.pack(len(value)) + bytes(value)
    return _HEADER.pack(_MAGIC, len(body)) + bytes(body) + hashlib.sha256(body).digest()


def decode_image(image):
    """Parse a file image.  Returns: dict str -> bytes.  Raises: NvmCorrupt."""
    if len(image) < _HEADER.size + _DIGEST_LEN:
        raise NvmCorrupt("truncated header")
    magic, body_len = _HEADER.unpack_from(image, 0)
    if magic != _MAGIC:
        raise NvmCorrupt("magic")
    if len(image) != _HEADER.size + body_len + _DIGEST_LEN:
        raise NvmCorrupt("length")
    body = image[_HEADER.size : _HEADER.size + body_len]
    if hashlib.sha256(body).digest() != image[_HEADER.size + body_len :]:
        raise NvmCorrupt("digest")
    state = {}
    pos = 0
    try:
        while pos < body_len:
            (klen,) = _KEY_LEN.unpack_from(body, pos)
            pos += _KEY_LEN.size
            key = body[pos : pos + klen].decode("utf-8")
            pos += klen
            (vlen,) = _VALUE_LEN.unpack_from(body, pos)
            pos += _VALUE_LEN.size
            if pos + vlen > body_len or key in state:
                raise NvmCorrupt("record")
            state[key] = bytes(body[pos : pos + vlen])
            pos += vlen
    except (struct.error, UnicodeDecodeError):
        raise NvmCorrupt("record") from None
    if pos != body_len:
        raise NvmCorrupt("record")
    return state


def _check_changes(changes):
    checked = {}
    for key, value in changes.items():
        if not isinstance(key, str) or not key:
            raise TypeError("NVM keys are non-empty str")
        if value is not None and not isinstance(value, (bytes, bytearray, memoryview)):
            raise TypeError("NVM values are bytes (or None to delete)")
        checked[key] = None if value is None else bytes(value)
    return checked


class Transaction:
    """Pending changes over an Nvm: reads see the pending writes first.

    Use `tx[key] = value`, `del tx[key]` (or `tx.delete(key)`), `tx.get(key)`.  Nothing
    reaches the NVM until the owning `Nvm.transaction()` block ends without an exception
    (or the caller passes `tx.changes` to `Nvm.commit`)."""

    def __init__(self, nvm):
        self._nvm = nvm
        self.changes = {}

    def get(self, key, default=None):
        if key in self.changes:
            value = self.changes[key]
            return default if value is None else value
        return self._nvm.get(key, default)

    def __contains__(self, key):
        return self.get(key) is not None

    def __getitem__(self, key):
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def __setitem__(self, key, value):
        if value is None or not isinstance(value, (bytes, bytearray, memoryview)):
            raise TypeError("NVM values are bytes")
        self.changes[key] = bytes(value)

    def __delitem__(self, key):
        self.changes[key] = None

    def delete(self, key):
        """Remove `key` (no error if it is absent)."""
        self.changes[key] = None

    def keys(self):
        """Keys visible through the transaction (committed plus pending, minus deleted)."""
        names = set(self._nvm.keys())
        for key, value in self.changes.items():
            if value is None:
                names.discard(key)
            else:
                names.add(key)
        return sorted(names)


TEMP_SUFFIX = ".tmp"


def discard_stale_temp(path):
    """Delete "<path>.tmp", the temp file of a commit that never reached its atomic point
    (module docstring).  Returns True if there was one.  Raises NvmError on I/O errors."""
    try:
        os.unlink(os.fspath(path) + TEMP_SUFFIX)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise NvmError("cannot remove a stale NVM temp file: %s" % exc.strerror) from None
    return True


def remove_stale_temp_files(directory, suffixes=(".nvm",)):
    """Delete every "<name><suffix>.tmp" in `directory` (not recursive): what a killed fab
    or line run leaves of chips whose NVM is never opened again.  A missing folder is
    empty.  Returns the removed paths.  Raises NvmError on I/O errors."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise NvmError("cannot list %s: %s" % (directory, exc.strerror)) from None
    removed = []
    for name in sorted(names):
        for suffix in suffixes:
            if name.endswith(suffix + TEMP_SUFFIX):
                path = os.path.join(directory, name)
                if discard_stale_temp(path[:-len(TEMP_SUFFIX)]):
                    removed.append(path)
    return removed


class Nvm:
    """Non-volatile memory of one emulated SE.

    Params: path: file to persist to (created on the first commit if absent), or None for
        an in-memory NVM (lost with the object, still transactional).
    Raises: NvmCorrupt if `path` exists and is not an intact image; NvmError on I/O errors.
    """

    def __init__(self, path=None):
        self.path = None if path is None else os.fspath(path)
        self.write_count = 0  # commits started since creation (fault-injection counter)
        self.bytes_written = 0  # size of the images written (latency models)
        self._cut_at = None  # absolute commit number to cut at
        self._cut_after = False
        self._state = {}
        if self.path is not None:
            discard_stale_temp(self.path)
            if os.path.exists(self.path):
                self._state = self._load(self.path)

    @staticmethod
    def _load(path):
        try:
            with open(path, "rb") as f:
                image = f.read()
        except OSError as exc:
            raise NvmError("cannot read NVM file: %s" % exc.strerror) from None
        return decode_image(image)

    def __repr__(self):
        return "Nvm(path=%r, keys=%d, commits=%d)" % (self.path, len(self._state), self.write_count)

    # -- reads ----------------------------------------------------------------------------

    def get(self, key, default=None):
        """The committed value of `key`, or `default`."""
        return self._state.get(key, default)

    def __getitem__(self, key):
        return self._state[key]

    def __contains__(self, key):
        return key in self._state

    def keys(self):
        """Committed keys, sorted."""
        return sorted(self._state)

    def snapshot(self):
        """A copy of the committed state (dict str -> bytes), e.g. to compare before/after."""
        return dict(self._state)

    # -- writes ---------------------------------------------------------------------------

    def commit(self, changes):
        """Apply `changes` (dict key -> bytes, or None to delete) as one atomic transaction.

        An empty mapping is a no-op and is not counted.
        Returns: the number of bytes written to the medium (0 when in memory or no-op).
        Raises: PowerLoss when a cut is armed for this commit; NvmError on I/O errors;
            TypeError for keys/values of the wrong type (before anything is written).
        """
        changes = _check_changes(changes)
        if not changes:
            return 0
        new_state = dict(self._state)
        for key, value in changes.items():
            if value is None:
                new_state.pop(key, None)
            else:
                new_state[key] = value
        self.write_count += 1
        number = self.write_count
        cut = self._cut_at == number
        if cut:
            self._cut_at = None
        image = encode_image(new_state)
        if cut and not self._cut_after:
            self._torn_write(image)
            raise PowerLoss(number, False)
        written = 0
        if self.path is not None:
            self._write_atomic(image, sync_dir=not cut)
            written = len(image)
        self._state = new_state
        self.bytes_written += len(image)
        if cut:
            raise PowerLoss(number, True)
        return written

    @contextlib.contextmanager
    def transaction(self):
        """Context manager yielding a Transaction; commits it when the block ends normally,
        discards it if the block raises."""
        tx = Transaction(self)
        yield tx
        self.commit(tx.changes)

    def _torn_write(self, image):
        # What a cut before os.replace leaves on a real disk: part of the temp file.
        if self.path is None:
            return
        with open(self.path + TEMP_SUFFIX, "wb") as f:
            f.write(image[: len(image) // 2])

    def _write_atomic(self, image, sync_dir=True):
        tmp = self.path + TEMP_SUFFIX
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(image)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)  # the atomic point (POSIX rename)
            if sync_dir:
                dir_fd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
        except OSError as exc:
            raise NvmError("cannot write NVM file: %s" % exc.strerror) from None

    # -- fault injection ------------------------------------------------------------------

    def cut_power_at(self, k, after_atomic=False):
        """Arm a power cut at the k-th commit from now (k >= 1).

        after_atomic: False cuts before the atomic point (commit lost), True just after it
        (commit kept, PowerLoss still raised).  The cut fires once, then disarms.
        """
        if not isinstance(k, int) or k < 1:
            raise ValueError("k must be an int >= 1")
        self._cut_at = self.write_count + k
        self._cut_after = bool(after_atomic)

    def disarm(self):
        """Cancel an armed power cut."""
        self._cut_at = None

    def reload(self):
        """Re-read the file, as a chip does at power-up (in-memory NVM: no-op).

        Raises: NvmCorrupt, NvmError."""
        if self.path is not None:
            discard_stale_temp(self.path)
            self._state = self._load(self.path) if os.path.exists(self.path) else {}
