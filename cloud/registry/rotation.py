"""The credential-rotation state of a device: THE one description of it (the registry
stores it as text in `devices.rotation_state`; the EST service writes it with each
operational certificate; the verifier reads it on every request; the registry's
`acknowledge_rotation` moves it from overlap to acked in one transaction).

    (no state)                               no operational certificate issued yet
    "active:<fp>"                            one operational certificate, nothing pending
    "overlap:<old fp>:<new fp>:<deadline>"   the old certificate is still accepted until
                                             the deadline or the device's acknowledgement
    "acked:<old fp>:<new fp>"                the device switched: the old one is refused

Fingerprints are SHA-256 of the certificate DER, lower-case hex; the deadline is UTC,
"YYYY-MM-DDTHH:MM:SSZ" (RFC 3339).  Text in none of these forms parses as kind "unknown"
(the verifier then accepts only the current certificate).
"""

import dataclasses
import datetime

ACTIVE = "active"
OVERLAP = "overlap"
ACKED = "acked"
UNKNOWN = "unknown"


def format_deadline(moment):
    """An aware datetime as "YYYY-MM-DDTHH:MM:SSZ" (UTC)."""
    moment = moment.astimezone(datetime.timezone.utc)
    # Formatted by hand, as audit.format_time: strftime goes through the C library's
    # time zone state (a stat of /etc/localtime per call on glibc without TZ).
    return "%04d-%02d-%02dT%02d:%02d:%02dZ" % (
        moment.year, moment.month, moment.day, moment.hour, moment.minute, moment.second)


def parse_deadline(text):
    """Inverse of format_deadline ("YYYY-MM-DDTHH:MM:SSZ").  Raises ValueError."""
    if len(text) != 20 or text[10] != "T" or text[19] != "Z":
        raise ValueError("deadline %r" % (text,))
    # fromisoformat is ~20x cheaper than strptime; the shape check above keeps it strict.
    return datetime.datetime.fromisoformat(text[:19]).replace(tzinfo=datetime.timezone.utc)


@dataclasses.dataclass(frozen=True, slots=True)
class RotationState:
    """A parsed rotation state (module docstring).  kind in (None, ACTIVE, OVERLAP, ACKED,
    UNKNOWN); old / new fingerprints (hex); deadline (aware datetime, OVERLAP only)."""

    kind: str = None
    old: str = None
    new: str = None
    deadline: datetime.datetime = None

    @classmethod
    def active(cls, new):
        return cls(ACTIVE, new=new)

    @classmethod
    def overlap(cls, old, new, deadline):
        return cls(OVERLAP, old, new, deadline)

    @classmethod
    def parse(cls, text):
        """The state stored as `text` (None or "" = no state)."""
        if not text:
            return cls()
        parts = text.split(":", 3)
        try:
            if parts[0] == ACTIVE and len(parts) == 2:
                return cls(ACTIVE, new=parts[1])
            if parts[0] == OVERLAP and len(parts) == 4:
                return cls(OVERLAP, parts[1], parts[2], parse_deadline(parts[3]))
            if parts[0] == ACKED and len(parts) == 3:
                return cls(ACKED, parts[1], parts[2])
        except ValueError:
            pass
        return cls(UNKNOWN)

    def format(self):
        """The stored text.  Raises ValueError for no state or an unknown one."""
        if self.kind == ACTIVE:
            return "%s:%s" % (ACTIVE, self.new)
        if self.kind == OVERLAP:
            return "%s:%s:%s:%s" % (OVERLAP, self.old, self.new,
                                    format_deadline(self.deadline))
        if self.kind == ACKED:
            return "%s:%s:%s" % (ACKED, self.old, self.new)
        raise ValueError("cannot format rotation state %r" % (self.kind,))

    def acknowledged(self, fingerprint):
        """The state after the device holding certificate `fingerprint` acknowledges it:
        ACKED if this is the overlap that `fingerprint` opened, else None (nothing to
        acknowledge; the state stays as it is)."""
        if self.kind == OVERLAP and self.new == fingerprint:
            return RotationState(ACKED, self.old, self.new)
        return None
