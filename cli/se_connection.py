"""The SE a device-side command works on, and one line for any error on the way to it.

`fleetid se` and `fleetid agent boot-check` open the SE the same way: bus URI -> bus ->
T=1' link -> ApduProtocol -> SeSession (fleetid.device.stack.open_se), on first use, closed
when the command ends (SeConnection).  describe_error turns any fleetid error into the
one short line those commands print (never a traceback, never key material); the status
words are named by the library's ApduError classes (fleetid.common.errors).
"""

import click

from fleetid.common.errors import (
    AlreadyExists,
    ApduError,
    BusError,
    ConditionsNotSatisfied,
    LinkError,
    ReferenceNotFound,
    SecureChannelError,
    SecurityStatusNotSatisfied,
)
from fleetid.device.bus import BusUriError

# What a refusal usually means for the fleetid applet (common/se_consts.py), beside the
# status word's name: the hint a user needs to act on it.
_SW_HINTS = {
    SecurityStatusNotSatisfied: "needs SCP03",
    ConditionsNotSatisfied: "life cycle or key policy",
    ReferenceNotFound: "empty slot or object",
    AlreadyExists: "slot in use",
}


def _words(class_name):
    # "ReferenceNotFound" -> "reference not found"
    out = []
    for ch in class_name:
        if ch.isupper() and out:
            out.append(" ")
        out.append(ch.lower())
    return "".join(out)


def describe_error(exc):
    """One short line for a fleetid error (no key material, no traceback).

    Params: exc: a FleetidError.
    Returns: str.  A refused APDU reads "the SE refused the command: SW 6A88, reference
        not found (empty slot or object)"; a status word with no ApduError subclass is
        shown by its value only.
    """
    if isinstance(exc, ApduError):
        cls = type(exc)
        if cls is ApduError:
            return "the SE refused the command: SW %04X" % exc.sw
        hint = _SW_HINTS.get(cls)
        return "the SE refused the command: SW %04X, %s%s" % (
            exc.sw, _words(cls.__name__), " (%s)" % hint if hint else "")
    if isinstance(exc, LinkError):
        return "T=1' link failed (%s)%s" % (exc.reason, ": " + exc.detail if exc.detail else "")
    if isinstance(exc, SecureChannelError):
        return "SCP03 failed (%s)" % exc.reason
    if isinstance(exc, BusError):
        return "bus error: %s" % exc
    if isinstance(exc, BusUriError):
        return str(exc)  # "bad bus URI ..." names itself
    return "%s: %s" % (type(exc).__name__, exc)


# The options that say what a device-side command worked on; an error line names them
# ("se pubkey --slot 7: the SE refused the command: SW 6A88, ...").
_NAMED_PARAMS = (("slot", "--slot"), ("counter_id", "--id"), ("object_id", "--id"),
                 ("target", "--to"))


def where(ctx=None, exc=None):
    """The prefix of a device-side error line: the command, the slot / object / counter it
    addressed and, for a link or bus failure, the bus ("se pubkey --slot 7: ").

    Params: ctx: the command's click context (default: the current one).  exc: the error.
    Returns: str ("" outside a command).
    """
    ctx = ctx or click.get_current_context(silent=True)
    if ctx is None:
        return ""
    named = [ctx.command_path.split(" ", 1)[-1]]
    named += ["%s %s" % (flag, ctx.params[name]) for name, flag in _NAMED_PARAMS
              if ctx.params.get(name) is not None]
    if isinstance(exc, (LinkError, BusError)):
        scope = ctx
        while scope is not None:
            bus = scope.params.get("bus") or scope.params.get("bus_uri")
            if bus:
                named.append("--bus %s" % bus)
                break
            scope = scope.parent
    return " ".join(named) + ": "


class SeConnection:
    """Opens bus, link and session on first use; closes them when the command ends.

    Params: bus_uri: a bus URI (device/bus.py); None raises click.UsageError on first use.
        t1_profile: "gp" or "se05x".  timeout_ms: bound on each bus wait.
    Attributes (None until opened): stack (device.stack.SeStack), link, protocol.
    """

    def __init__(self, bus_uri, t1_profile, timeout_ms):
        self.bus_uri = bus_uri
        self.t1_profile = t1_profile
        self.timeout_ms = timeout_ms
        self.stack = None
        self.link = None
        self.protocol = None
        self._session = None

    def open_stack(self, select=False):
        """The SeStack, opened on first use.  Params: select: SELECT the applet while
        opening (a failed SELECT closes the stack again; see device.stack.open_se).
        Raises: click.UsageError (no bus), click.ClickException (SE unreachable),
        BusUriError, FleetidError from the link or the SE."""
        from fleetid.device.stack import open_se

        if self.stack is None:
            if not self.bus_uri:
                raise click.UsageError("--bus URI (or FLEETID_BUS) is required")
            try:
                self.stack = open_se(self.bus_uri, profile=self.t1_profile,
                                     timeout_ms=self.timeout_ms, select=select)
            except BusError as exc:
                raise click.ClickException(
                    "cannot reach the SE on %s: %s" % (self.bus_uri, exc)) from None
            self.link = self.stack.link
            self.protocol = self.stack.protocol
        return self.stack

    def session(self):
        """The SeSession, with the applet selected.  Raises: click.UsageError (no bus),
        click.ClickException (SE unreachable), FleetidError from the SE."""
        if self._session is None:
            self._session = self.open_stack().se
            self._session.select()
        return self._session

    def close(self):
        """Close whatever was opened (safe to call twice)."""
        opened = self.stack
        self.stack = self.link = self.protocol = self._session = None
        if opened is not None:
            opened.close()
