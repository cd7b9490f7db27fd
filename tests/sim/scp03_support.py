"""The chip's SCP03 dispatch in miniature, shared by tests/sim/test_scp03_card.py (fleetid's
host) and tests/sim/test_scp03_card_yubikit.py (yubikit's host)."""

from fleetid.common import scp03
from fleetid.common.command_apdu import decode_command
from fleetid.sim.scp03_card import Scp03CardError


class CardDispatch:
    """INITIALIZE UPDATE and EXTERNAL AUTHENTICATE to the Scp03Card, every other command
    unwrapped and handed to `app(plain) -> response bytes`; failures counted like the chip.

    Attributes: card, sequence_counter (passed to INITIALIZE UPDATE, then incremented),
        failures (refusals that count), plain_seen (the unwrapped commands).
    """

    def __init__(self, card, sequence_counter):
        self.card = card
        self.sequence_counter = sequence_counter
        self.failures = 0
        self.plain_seen = []

    def process(self, apdu):
        """One command APDU in, one response APDU (data || SW) out."""
        try:
            if apdu[1] == scp03.INS_INITIALIZE_UPDATE and not apdu[0] & 0x04:
                cmd = decode_command(apdu)
                data = self.card.initialize_update(cmd.p1, cmd.p2, cmd.data,
                                                   self.sequence_counter)
                self.sequence_counter += 1
                return data + b"\x90\x00"
            if apdu[1] == scp03.INS_EXTERNAL_AUTHENTICATE:
                self.card.external_authenticate(apdu)
                return b"\x90\x00"
            plain = self.card.unwrap_command(apdu)
        except Scp03CardError as err:
            if err.counts_as_failure:
                self.failures += 1
            return bytes((err.sw >> 8, err.sw & 0xFF))
        self.plain_seen.append(plain)
        return self.app(plain)

    def app(self, plain):
        raise NotImplementedError
