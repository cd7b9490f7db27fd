"""What every `fleetid agent` command opens: the device's SE stack and its anchors, a
certificate file, and the one-line error for a failure of any layer.  Shared by cli/agent.py
and the commands it attaches (cli/agent_boot.py, cli/agent_revset.py), which import this
module and never cli/agent.py (tests/test_layers.py: no module import cycle)."""

import click

from fleetid.common.errors import FleetidError
from fleetid.device.bus import BusUriError


def fail(exc):
    """Raise the one-line error for `exc`, naming the command, its slot and, for a link or
    bus failure, the bus."""
    from fleetid.cli.se_connection import describe_error, where

    raise click.ClickException(where(exc=exc) + describe_error(exc)) from None


class Device:
    """The SE stack, its fleet root anchor and the network adapter, opened on demand."""

    def __init__(self, bus, t1_profile, timeout_ms):
        from fleetid.cli.se_connection import SeConnection

        try:
            # Opened (and the applet selected) the way `fleetid se` opens it.
            self.stack = SeConnection(bus, t1_profile, timeout_ms).open_stack(select=True)
        except BusUriError as exc:  # a usage error, as before it became a FleetidError
            raise click.UsageError(str(exc)) from None
        except FleetidError as exc:
            fail(exc)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
        self.se = self.stack.se

    def root_der(self):
        from fleetid.common import se_consts as C

        return bytes(self.se.get_data(C.DATA_TRUST_FLEET_ROOT, -1, 65536))

    def net(self, cloud, est, label=None, tickets=None, revocation=None, root_crl_url=None):
        from fleetid.device.host.agent_net import HostNetwork

        try:
            return HostNetwork(self.se, cloud or est, est or cloud, [self.root_der()],
                               label=label, tickets=tickets, revocation=revocation,
                               root_crl_url=root_crl_url)
        except ValueError as exc:
            raise click.UsageError("--cloud %s / --est %s: %s" % (cloud, est, exc)) from None

    def close(self):
        self.stack.close()


def load_cert(path, param_hint=None):
    """A certificate from a PEM or DER file; a usage error naming the file (and the option,
    given `param_hint`) otherwise."""
    from cryptography import x509

    with open(path, "rb") as f:
        data = f.read()
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError:
        if param_hint:
            raise click.BadParameter("%s is not a certificate" % path,
                                     param_hint=param_hint) from None
        raise click.UsageError("%s is not a certificate" % path) from None
