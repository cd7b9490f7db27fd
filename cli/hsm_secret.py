"""Where the CLI gets an HSM secret (soft keystore passphrase, PKCS#11 PIN) from.

The HSM URI names an environment variable (`pass-env=` / `pin-env=`); the library reads
the secret from there and nowhere else.  The CLI fills that variable, in this order:

1. the environment, when the variable is already set (production: a service manager or
   a secrets agent sets it);
2. a file the user names with --keystore-pass-file (never a file found by convention
   beside the keystore it unlocks);
3. a prompt, when standard input is a terminal (hidden input; asked twice when a new
   keystore is being created).

Otherwise the command stops with one line saying how to supply it.
"""

import os
import sys

import click


def pass_file_option(function):
    """The --keystore-pass-file option (decorator)."""
    return click.option(
        "--keystore-pass-file", "pass_file", type=click.Path(dir_okay=False), default=None,
        help="Read the HSM secret (soft keystore passphrase / PKCS#11 PIN) from this file "
             "when its environment variable (FLEETID_KEYSTORE_PASS by default) is unset. "
             "Without either, a terminal is prompted.")(function)


def environ_with_secret(variable, pass_file=None, creating=False, environ=None):
    """A copy of the environment in which `variable` holds the HSM secret.

    Params: variable: the name from the HSM URI (hsm.secret_variable), or None (nothing
        to supply: the environment is returned as is).  pass_file: a file the user named.
        creating: a new keystore is made with this secret (the prompt asks twice).
    Returns: dict.  Raises: click.ClickException when no source gives a secret.
    """
    environ = dict(os.environ if environ is None else environ)
    if variable is None or environ.get(variable):
        return environ
    if pass_file is not None:
        try:
            with open(pass_file, "rb") as f:
                secret = f.read().decode("utf-8").strip()
        except OSError as exc:
            raise click.ClickException("--keystore-pass-file %s: %s"
                                       % (pass_file, exc.strerror)) from None
        except UnicodeDecodeError:
            raise click.ClickException("--keystore-pass-file %s: not UTF-8 text"
                                       % pass_file) from None
        if not secret:
            raise click.ClickException("--keystore-pass-file %s is empty" % pass_file)
        environ[variable] = secret
        return environ
    if sys.stdin is not None and sys.stdin.isatty():
        secret = click.prompt("HSM secret for %s" % variable, hide_input=True,
                              confirmation_prompt=creating, err=True)
        if not secret:
            raise click.ClickException("an empty secret is not accepted")
        environ[variable] = secret
        return environ
    raise click.ClickException(
        "the HSM needs its secret: set %s, or name a file with --keystore-pass-file, or "
        "run on a terminal to be prompted" % variable)
