# The device-half exception tree.  Portable: CPython and MicroPython.
#
# Short messages; the details live in fields (`reason`, `sw`, ...) so callers and tests
# branch on data, never on message text.  Security checks raise; nothing returns a bool
# to say "refused".


class FleetidError(Exception):
    """Root of every error fleetid raises on purpose."""


class LinkError(FleetidError):
    """The T=1' link could not deliver an APDU or its response.

    `reason` is one of the class attributes below (LinkError.TIMEOUT, ...).  After a
    LinkError the outcome of the APDU in flight is unknown (it may or may not have
    executed): the link itself has been resynchronised or reset when it could be, so the
    next transceive() may succeed.
    """

    TIMEOUT = "timeout"  # no valid block within the block waiting time, retries exhausted
    RETRIES = "retries"  # too many CRC / protocol errors on one block
    RESYNCH = "resynch"  # the exchange was abandoned and the link resynchronised
    RESET = "reset"  # the link needed a software / hardware reset
    PROTOCOL = "protocol"  # the peer broke the block protocol (unexpected block type, N(S), ...)
    ABORTED = "aborted"  # the SE aborted the chain (S(ABORT))
    BUS = "bus"  # the bus backend failed (socket closed, ioctl error)
    TOO_LONG = "too_long"  # APDU or response larger than the link allows

    def __init__(self, reason, detail=""):
        super().__init__(reason if not detail else reason + ": " + detail)
        self.reason = reason
        self.detail = detail


class FrameError(FleetidError):
    """A T=1' block could not be decoded (bad length, CRC, NAD, PCB)."""

    def __init__(self, reason, detail=""):
        super().__init__(reason if not detail else reason + ": " + detail)
        self.reason = reason
        self.detail = detail


class BusNack(FleetidError):
    """The device did not acknowledge its address: the SE is busy (poll again) or absent."""


class BusError(FleetidError):
    """The bus backend itself failed (I/O error, connection lost)."""


class ApduFormatError(FleetidError):
    """Bytes that are not a well-formed command or response APDU."""


class ApduError(FleetidError):
    """The SE answered with a status word other than 9000.

    `sw` is the 16-bit status word.  Subclasses name the common ones, each with its status
    word in `SW`; `apdu_error_for_sw()` picks the most specific class.
    """

    SW = None

    def __init__(self, sw, detail=""):
        super().__init__("SW %04X%s" % (sw, (" " + detail) if detail else ""))
        self.sw = sw
        self.detail = detail


class VerificationFailed(ApduError):
    SW = 0x6300  # the signature does not verify


class WrongLength(ApduError):
    SW = 0x6700


class SecurityStatusNotSatisfied(ApduError):
    SW = 0x6982  # also: SCP03 MAC refused (GP Amd D 6.2.4); the session is closed


class AuthenticationBlocked(ApduError):
    SW = 0x6983


class ConditionsNotSatisfied(ApduError):
    SW = 0x6985  # life cycle or key policy forbids the command


class WrongData(ApduError):
    SW = 0x6A80


class NotEnoughMemory(ApduError):
    SW = 0x6A84


class IncorrectP1P2(ApduError):
    SW = 0x6A86


class ReferenceNotFound(ApduError):
    SW = 0x6A88  # empty slot, unknown object, unknown key version


class AlreadyExists(ApduError):
    SW = 0x6A89


class InsNotSupported(ApduError):
    SW = 0x6D00


class ClaNotSupported(ApduError):
    SW = 0x6E00


_SW_CLASSES = (
    VerificationFailed,
    WrongLength,
    SecurityStatusNotSatisfied,
    AuthenticationBlocked,
    ConditionsNotSatisfied,
    WrongData,
    NotEnoughMemory,
    IncorrectP1P2,
    ReferenceNotFound,
    AlreadyExists,
    InsNotSupported,
    ClaNotSupported,
)


def apdu_error_for_sw(sw, detail=""):
    """Return (not raise) the most specific ApduError instance for a status word."""
    for cls in _SW_CLASSES:
        if cls.SW == sw:
            return cls(sw, detail)
    return ApduError(sw, detail)


class SecureChannelError(FleetidError):
    """SCP03: the card cryptogram, a response MAC or the padding did not check out.

    `reason`: "card_cryptogram", "response_mac", "padding", "state", "level".
    """

    def __init__(self, reason, detail=""):
        super().__init__(reason if not detail else reason + ": " + detail)
        self.reason = reason
        self.detail = detail


class DerError(FleetidError):
    """Bytes that are not the strict DER this structure requires."""

    def __init__(self, reason, detail=""):
        super().__init__(reason if not detail else reason + ": " + detail)
        self.reason = reason
        self.detail = detail


class TlsError(FleetidError):
    """The TLS 1.3 client (common/tls13.py) refused or lost the connection.

    `reason`: a short word naming what went wrong ("decode", "unexpected_message",
    "bad_finished", "server_certificate", "protocol_version", ...).  `alert`: the TLS alert
    number (RFC 8446 6) sent to the peer, or received from it (TlsAlertReceived); None when
    no alert applies (socket error "io", "timeout", "eof", use after close "closed").
    `detail`: short text, never key material.  Every failure of the client is a TlsError
    (or a subclass); the connection is closed after one.
    """

    def __init__(self, reason, alert, detail=""):
        super().__init__(reason if not detail else reason + ": " + detail)
        self.reason = reason
        self.alert = alert
        self.detail = detail


class TlsAlertReceived(TlsError):
    """The peer sent a fatal alert (`alert` is its number), or closed with close_notify
    before the handshake completed."""


class TlsCertificateError(TlsError):
    """The server's certificate chain failed a check.  `check` names it: "parse",
    "path", "signature", "validity", "basic_constraints", "key_usage", "eku", "name",
    "revocation", "algorithm"."""

    def __init__(self, check, alert, detail=""):
        super().__init__("server_certificate", alert, check + (": " + detail if detail else ""))
        self.check = check
