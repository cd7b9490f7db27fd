"""Hypothesis state machine over a file-backed chip: counters, data objects and the GP life
cycle against a model, with power losses and NVM power cuts (before and after the atomic
point) interleaved.  Invariants: counters never decrease and match the model, data objects
are whole old or whole new values, the life cycle only takes the allowed transitions."""

import atexit
import shutil
import struct
import tempfile

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from fleetid.common import se_consts as C
from fleetid.common.errors import ApduError
from fleetid.sim.chip import Chip
from fleetid.sim.nvm import Nvm, PowerLoss
from tests.sim.chip_support import (
    counting_rng,
    fab_test_chip,
    open_scp,
    select_applet,
    send,
    send_secure,
)

_TEMPLATE = {}

# GP CS 2.3 5.1.1 transitions the applet allows through SET STATUS.
ALLOWED = {
    C.LC_OP_READY: (C.LC_INITIALIZED, C.LC_SECURED, C.LC_TERMINATED),
    C.LC_INITIALIZED: (C.LC_SECURED, C.LC_TERMINATED),
    C.LC_SECURED: (C.LC_CARD_LOCKED, C.LC_TERMINATED),
    C.LC_CARD_LOCKED: (C.LC_SECURED, C.LC_TERMINATED),
    C.LC_TERMINATED: (),
}


def _template():
    if not _TEMPLATE:
        folder = tempfile.mkdtemp(prefix="fleetid-sm-")
        atexit.register(shutil.rmtree, folder, True)
        _, record = fab_test_chip(folder, rng=counting_rng(21), select=False)
        _TEMPLATE["record"] = record
    return _TEMPLATE["record"]


class ChipMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.record = _template()
        self.folder = tempfile.mkdtemp(prefix="fleetid-sm-run-")
        self.path = self.folder + "/chip.nvm"
        shutil.copy(self.record.nvm_path, self.path)
        self.life_cycle = C.LC_OP_READY
        self.counters = [0] * C.COUNTER_COUNT
        self.objects = {}
        self._boot()

    def teardown(self):
        shutil.rmtree(self.folder, ignore_errors=True)

    def _boot(self):
        self.chip = Chip(Nvm(self.path), rng=counting_rng(22))
        if self.life_cycle != C.LC_TERMINATED:
            select_applet(self.chip)

    def _usable(self):
        return self.life_cycle not in (C.LC_CARD_LOCKED, C.LC_TERMINATED)

    @rule(counter=st.integers(0, C.COUNTER_COUNT - 1))
    def increment(self, counter):
        data, sw = send(self.chip, C.INS_COUNTER, counter, C.COUNTER_INCREMENT, le=4)
        if not self._usable():
            assert sw == C.SW_CONDITIONS
            return
        assert sw == C.SW_OK
        self.counters[counter] += 1
        assert struct.unpack(">I", data)[0] == self.counters[counter]

    @rule(counter=st.integers(0, C.COUNTER_COUNT - 1), goal=st.integers(0, 50))
    def advance(self, counter, goal):
        data, sw = send(self.chip, C.INS_COUNTER, counter, C.COUNTER_ADVANCE,
                        struct.pack(">I", goal), 4)
        if not self._usable():
            assert sw == C.SW_CONDITIONS
        elif goal < self.counters[counter]:
            assert sw == C.SW_WRONG_DATA
        else:
            assert sw == C.SW_OK
            self.counters[counter] = goal

    @rule(obj=st.integers(0, 3), fill=st.integers(0, 255), size=st.integers(1, 600))
    def write_object(self, obj, fill, size):
        value = bytes((fill,)) * size
        _, sw = send(self.chip, C.INS_WRITE_DATA_OBJECT, obj, 0, value)
        if not self._usable():
            assert sw == C.SW_CONDITIONS
            return
        assert sw == C.SW_OK
        self.objects[obj] = value

    @rule(new_state=st.sampled_from(sorted(C.LC_NAMES)))
    def set_status(self, new_state):
        if self.life_cycle == C.LC_TERMINATED:
            try:
                open_scp(self.chip, self.record.static_keys())
            except ApduError as err:
                assert err.sw == C.SW_CONDITIONS
            else:
                raise AssertionError("SCP03 opened on a TERMINATED chip")
            return
        host = open_scp(self.chip, self.record.static_keys(), level=0x01)
        _, sw = send_secure(host, C.INS_SET_STATUS, 0x80, new_state)
        if new_state in ALLOWED[self.life_cycle]:
            assert sw == C.SW_OK
            self.life_cycle = new_state
        else:
            assert sw == C.SW_CONDITIONS

    @rule()
    def power_loss(self):
        self.chip.power_loss()
        if self.life_cycle != C.LC_TERMINATED:
            select_applet(self.chip)

    @precondition(lambda self: self.life_cycle not in (C.LC_CARD_LOCKED, C.LC_TERMINATED))
    @rule(counter=st.integers(0, C.COUNTER_COUNT - 1), after=st.booleans())
    def power_cut_during_increment(self, counter, after):
        self.chip.nvm.cut_power_at(1, after_atomic=after)
        try:
            send(self.chip, C.INS_COUNTER, counter, C.COUNTER_INCREMENT, le=4)
        except PowerLoss:
            pass
        else:
            raise AssertionError("the armed cut did not fire")
        if after:
            self.counters[counter] += 1
        self._boot()

    @precondition(lambda self: self.life_cycle not in (C.LC_CARD_LOCKED, C.LC_TERMINATED))
    @rule(obj=st.integers(0, 3), after=st.booleans())
    def power_cut_during_write(self, obj, after):
        value = b"\xee" * 777
        self.chip.nvm.cut_power_at(1, after_atomic=after)
        try:
            send(self.chip, C.INS_WRITE_DATA_OBJECT, obj, 0, value)
        except PowerLoss:
            pass
        else:
            raise AssertionError("the armed cut did not fire")
        if after:
            self.objects[obj] = value
        self._boot()

    @invariant()
    def life_cycle_matches(self):
        assert send(self.chip, C.INS_GET_DATA, 0x01, 0x03, le=1) == (
            bytes((self.life_cycle,)), C.SW_OK)

    @invariant()
    def counters_and_objects_match(self):
        if not self._usable():
            return
        for counter, expected in enumerate(self.counters):
            data, sw = send(self.chip, C.INS_COUNTER, counter, C.COUNTER_READ, le=4)
            assert sw == C.SW_OK and struct.unpack(">I", data)[0] == expected
        for obj in range(4):
            data, sw = send(self.chip, C.INS_READ_DATA_OBJECT, obj, 0, le=65536, extended=True)
            if obj in self.objects:
                assert (data, sw) == (self.objects[obj], C.SW_OK)
            else:
                assert sw == C.SW_REF_NOT_FOUND


ChipMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=25, deadline=None, database=None
)
test_chip_state_machine = ChipMachine.TestCase
