"""The `fleetid` command: one CLI, a sub-command group per area.

A thin shell over library calls: each area's group lives in its own module of this
package (`cli/sim.py` -> `fleetid sim ...`), which this file registers.  Library code
never imports click.
"""

import importlib

import click

# (module under fleetid.cli, attribute holding the click group).  A group's module is
# imported only when `fleetid` starts, so an area's heavy imports stay inside its commands.
_GROUPS = (
    ("sim", "sim"),
    ("se", "se"),
    ("pki", "pki"),
    ("audit", "audit"),
    ("line", "line"),
    ("cloud", "cloud"),
    ("agent", "agent"),
    ("revocation", "revoke"),
    ("revocation", "revocation"),
    ("mqtt", "mqtt"),
    ("ota", "ota"),
    ("registry", "registry"),
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="fleetid")
def cli():
    """fleetid: device identity at manufacturing scale.

    \b
    Areas:
      sim    the secure-element emulator: make chips, serve them over a bus
      se     run SE commands over any bus (emulator socket, Linux i2c-dev, spidev)
      pki    the fleet PKI: root key ceremony, intermediate CAs
      audit  the factory line's hash-chained audit log: verify, show
      line   the factory personalisation line: run stations, reconcile after a crash
      cloud  the fleet cloud: EST CA + mTLS verifier, certificate diagnosis
      agent  the device agent: enrol, rotate without recall, status, diagnostics
      revoke / revocation  revoke a device or a batch in every tier; tier status
      mqtt   the fleet's MQTT broker (mosquitto on the fleet PKI), the cloud's MQTT side
      ota    over-the-air SE administration and device commands over MQTT
      registry  the device registry's schema: migrate before starting the workers

    Every command has --help with examples.
    """


def _register():
    for module_name, attr in _GROUPS:
        module = importlib.import_module("fleetid.cli." + module_name)
        cli.add_command(getattr(module, attr))


_register()


def main():
    cli(prog_name="fleetid")


if __name__ == "__main__":
    main()
