# The device agent: boot check -> connect -> enrol, or renew (at a configurable fraction
# of the validity, or on a command) -> acknowledgement -> retire the old key -> revocation
# refresh -> report.  Portable and sans-I/O: runs unchanged on CPython and MicroPython.
#
#     agent = Agent(se, net, clock, rand, boot=None, revocation=None, policy=AgentPolicy())
#     report = agent.run_once()           # one cycle; every step resumable
#     agent.status()                      # no network: slots, journal, next renewal
#
# Layers (docs/ARCHITECTURE.md "Layers"): SE verbs (device/se.py) and workflows
# (device/enrol.py) below, the rotation journal (device/rotation_journal.py, whose header
# holds the record format and the DECISION TABLE for resuming after a cut) beside.  The agent never builds an APDU or
# a frame, and private keys never leave the SE: it only asks the SE to generate, attest,
# sign and delete.
#
# Injected collaborators (duck-typed; nothing here imports a network or a clock):
#
#   net         the network, authenticated by the key+certificate in an SE slot:
#                 whoami(slot) -> dict             GET /v1/whoami
#                 cacerts(slot) -> list of DER     GET /.well-known/est/<label>/cacerts
#                 nonce(slot) -> bytes             GET /.well-known/est/<label>/nonce
#                 enroll(slot, csr_der, reenroll) -> certificate DER
#                                                  simpleenroll / simplereenroll
#                 ack(slot) -> None                POST /v1/rotation/ack
#                 fetch_revocation(slot) -> bytes  GET the CRL of the certificate in
#                                                  `slot` (its distribution point URL)
#               Every call raises NetError (below) on failure, with `retryable` telling
#               a transient failure (link drop, timeout, 5xx, 202) from a refusal;
#               enroll raises device/certcheck.CertificateRefused when the answer is not
#               exactly one certificate (wrong content type, not PKCS#7, none, several).
#               CPython: device/host/agent_net.HostNetwork (se_https + EST).
#               MicroPython: device/board_net.BoardNetwork (device/https.py over the
#               SE-keyed TLS 1.3 client), or a board's own object with these methods.
#   clock       now() -> int seconds since 1970 UTC; sleep(seconds) (bounded by policy)
#   rand        () -> float in [0, 1): backoff jitter
#   boot        optional: check() -> report (raises on a bad image: the agent then does
#               not connect); confirm(report) after the first accepted connection
#               (MCUboot's "confirm after a healthy boot").  device/boot.py's functions
#               plug in through SignedBoot below.
#   revocation  optional: refresh(fetch, now) with fetch() -> CRL bytes (the agent's
#               fetch goes through net.fetch_revocation with the same bounded retries),
#               check(serial, now) (raises when revoked or stale), status(now) -> dict or
#               printable.  device/crl_cache.CrlCache fits as it is.
#   root_revocation  optional: the fleet root's CRL cache (device/board.root_crl_cache),
#               refreshed after `revocation` through net.fetch_root_revocation(slot) with
#               the same retries.  It lists the root-issued certificates the cloud
#               revoked (issuing CAs, the cloud's own server certificates); the agent's
#               TLS connections check the servers' chains against both caches
#               (device/board.server_revocation, which the network is given); a CRL
#               that changed makes the agent call net.forget_sessions() when the net
#               has it, so no session ticket resumes past a server's revocation.
#
# Intermittent links: each network step is retried at most policy.max_attempts times with
# exponential backoff and full jitter (delay = U(0.5, 1) x min(max_delay, base x 2^n)),
# or after the server's Retry-After (never earlier; a Retry-After beyond max_delay ends
# the cycle instead), within policy.max_wait seconds of sleeping per step.  A step that
# still fails ends the cycle with its NetError; the journal resumes it next cycle.
#
# Certificates are checked before they are stored (device/certcheck.py: chain to the
# fleet root in the SE through the EST cacerts, signatures verified by the SE, the new
# slot's key, validity on the agent's clock, clientAuth, the identity certificate's CN,
# serialNumber and URI SAN).  A refused certificate, or a new certificate the verifier
# refuses at the acknowledgement, is a REFUSED journal record: the new key is deleted,
# the old credential stays in use, and the rotation is tried again with a fresh key, at
# most policy.max_rotation_attempts times per rotation; then the journal goes back to
# BASE(old) and the cycle ends with AgentError(WRONG_CERTIFICATE) (the next cycle starts
# a new rotation when one is due).  No answer from the CA can leave a device on a
# credential the verifier refuses.

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


from fleetid.common.errors import FleetidError
from fleetid.device import enrol
from fleetid.device import rotation_journal as rj

# device/certinfo (and common/der under it) is imported where a certificate is read: a
# device resuming an acknowledged rotation does not load the DER reader (MicroPython heap).

SLOT_IDENTITY = const(0x01)  # se_consts.SLOT_IDENTITY
SLOT_OPERATIONAL_A = const(0x02)  # se_consts.SLOT_OPERATIONAL_A
SLOT_OPERATIONAL_B = const(0x03)  # se_consts.SLOT_OPERATIONAL_B
POLICY_SIGN = const(0x01)  # se_consts.POLICY_SIGN

# Server reason codes (cloud/verifier/errors.py) meaning "this credential is no longer
# good, but the device is": rotate from the identity certificate.
_REFUSED_CREDENTIAL = ("superseded", "expired", "not_yet_valid")
# NetError.server_reason of a server certificate the agent's CRL caches list (the
# network's `revocation` hook refused the handshake with alert 44, RFC 8446 6.2).
CERTIFICATE_REVOKED = "certificate_revoked"


class NetError(FleetidError):
    """A network step failed.

    reason: LINK (connection refused / dropped), HANDSHAKE (the TLS handshake failed: an
        alert or a close during it; a server refusing the client certificate looks like
        this), TIMEOUT (a bounded wait expired), SERVER (5xx), PENDING (202: come back
        after Retry-After), REFUSED (4xx: the server said no; `status` and
        `server_reason`, e.g. "revoked", "superseded", say why).
    retry_after: seconds the server asked to wait (None if it did not say).
    retryable: True for LINK, HANDSHAKE, TIMEOUT, SERVER, PENDING.
    """

    LINK = "link"
    HANDSHAKE = "handshake"
    TIMEOUT = "timeout"
    SERVER = "server"
    PENDING = "pending"
    REFUSED = "refused"

    def __init__(self, reason, detail="", status=None, retry_after=None, server_reason=None):
        text = reason
        if status is not None:
            text += " %d" % status
        if detail:
            text += ": " + detail
        super().__init__(text)
        self.reason = reason
        self.detail = detail
        self.status = status
        self.retry_after = retry_after
        self.server_reason = server_reason

    @property
    def retryable(self):
        return self.reason != NetError.REFUSED


class AgentError(FleetidError):
    """The cycle stopped.  reason: BOOT (the image check failed: no connection made),
    REFUSED (the verifier refused the device: `detail` has the server's reason),
    WRONG_CERTIFICATE (the rotation was abandoned after policy.max_rotation_attempts
    refused certificates: the agent's checks or the verifier's acknowledgement refused
    each; the old credential stays in use), JOURNAL (the journal is corrupt).  `cause`
    holds the underlying exception (the last refusal: CertificateRefused or NetError)."""

    BOOT = "boot"
    REFUSED = "refused"
    WRONG_CERTIFICATE = "wrong_certificate"
    JOURNAL = "journal"

    def __init__(self, reason, detail="", cause=None):
        super().__init__(reason + (": " + detail if detail else ""))
        self.reason = reason
        self.detail = detail
        self.cause = cause


class AgentPolicy:
    """Tunables (all bounded).

    renew_fraction: renew when this fraction of [notBefore, notAfter] has passed (0..1).
    renew_margin_s: also renew when fewer than this many seconds of validity are left
        (0: off).  The renewal threshold for short-lived operational certificates (the
        cloud's "operational-short" profile, 24 h): revocation by expiry only works if
        the device renews well before notAfter even when it connects rarely, e.g.
        renew_margin_s=8 h with hourly connections.
    max_attempts: tries per network step.  base_delay / max_delay: backoff seconds.
    max_wait: total seconds slept per network step.  slots: the two rotation slots.
    max_rotation_attempts: certificates a rotation may have refused (by the agent's checks
        or at the acknowledgement) before it is abandoned (1..8).
    clock_skew_s: seconds a new certificate's notBefore may lie ahead of the clock.
    """

    def __init__(self, renew_fraction=0.66, max_attempts=5, base_delay=1.0, max_delay=60.0,
                 max_wait=300.0, slots=(SLOT_OPERATIONAL_A, SLOT_OPERATIONAL_B),
                 renew_margin_s=0, max_rotation_attempts=3, clock_skew_s=300):
        if not 1 <= max_rotation_attempts <= 8:
            raise ValueError("max_rotation_attempts must be in 1..8")  # journal: 63 records
        if clock_skew_s < 0:
            raise ValueError("clock_skew_s must be >= 0")
        self.max_rotation_attempts = max_rotation_attempts
        self.clock_skew_s = clock_skew_s
        if not 0.0 < renew_fraction <= 1.0:
            raise ValueError("renew_fraction must be in (0, 1]")
        if renew_margin_s < 0:
            raise ValueError("renew_margin_s must be >= 0")
        self.renew_margin_s = renew_margin_s
        if max_attempts < 1 or base_delay <= 0 or max_delay < base_delay or max_wait < 0:
            raise ValueError("retry bounds")
        if len(slots) != 2 or slots[0] == slots[1] or SLOT_IDENTITY in slots or 0 in slots:
            raise ValueError("two distinct rotation slots, not the MAK or identity slot")
        self.renew_fraction = renew_fraction
        self.max_attempts = max_attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.max_wait = max_wait
        self.slots = tuple(slots)


class AgentReport:
    """What one cycle did.  Attributes: boot (the boot collaborator's report or None),
    resumed (the journal's last kind at start, "none" if empty), actions (list of str, in
    order), slot (the credential in use at the end), serial / not_after / renew_at (of
    its certificate), identity (whoami's answer, dict, or None), retries (int), slept
    (seconds), revocation (str or None), refused (server reason or None), journal (the
    last kind at the end)."""

    def __init__(self):
        self.boot = None
        self.resumed = "none"
        self.actions = []
        self.slot = None
        self.serial = None
        self.not_after = None
        self.renew_at = None
        self.identity = None
        self.retries = 0
        self.slept = 0.0
        self.revocation = None
        self.refused = None
        self.journal = "none"

    def as_dict(self):
        return {"resumed": self.resumed, "actions": list(self.actions), "slot": self.slot,
                "serial": self.serial, "not_after": self.not_after,
                "renew_at": self.renew_at, "retries": self.retries, "slept": self.slept,
                "revocation": self.revocation, "refused": self.refused,
                "journal": self.journal}


class SignedBoot:
    """Adapts device/boot.py's functions to the agent's `boot` collaborator.

    Params: check_image: fn(se, reader, max_size=...) -> BootReport (raises BootError).
        confirm_boot: fn(se, report).  se, reader, max_size: passed through (`se` may be
        replaced when the caller reopens the SE).
    The image is checked once (check() returns the same report afterwards) and confirmed
    once, so one SignedBoot can serve every cycle of a long-running agent.
    """

    def __init__(self, check_image, confirm_boot, se, reader, max_size=None):
        self._check = check_image
        self._confirm = confirm_boot
        self.se = se
        self.reader = reader
        self.max_size = max_size
        self.report = None
        self.confirmed = False

    def check(self):
        if self.report is None:
            if self.max_size is None:
                self.report = self._check(self.se, self.reader)
            else:
                self.report = self._check(self.se, self.reader, max_size=self.max_size)
        return self.report

    def confirm(self, report):
        if not self.confirmed:
            self._confirm(self.se, report)
            self.confirmed = True


def status_text(status):
    """One line for a revocation collaborator's status (CrlCache.status()'s dict, or any
    printable)."""
    if not isinstance(status, dict):
        return str(status)
    return "CRL #%s %s (%s; next update %s, %s revoked)" % (
        status.get("number"), status.get("state"), status.get("policy"),
        status.get("next_update"), status.get("revoked"))


def renew_at(not_before, not_after, fraction, margin=0):
    """The renewal time (int seconds) for a validity period: the fraction's point, or
    `margin` seconds before not_after when that is earlier (never before not_before)."""
    when = not_before + int((not_after - not_before) * fraction)
    if margin:
        when = max(not_before, min(when, not_after - int(margin)))
    return when


class Agent:
    """The device agent (module header).

    Params: se: SeSession (selected).  net, clock, rand, boot, revocation,
        root_revocation: the injected collaborators (module header).  policy: AgentPolicy.
        log: optional callable(str) for progress lines (never key material).
    """

    def __init__(self, se, net, clock, rand, boot=None, revocation=None, policy=None,
                 log=None, root_revocation=None):
        self.se = se
        self.net = net
        self.clock = clock
        self.rand = rand
        self.boot = boot
        self.revocation = revocation
        self.root_revocation = root_revocation
        self.policy = policy if policy is not None else AgentPolicy()
        self.log = log
        self.journal = rj.RotationJournal(se)
        self._chain = None
        self._checker = None  # certcheck.CertificateChecker, made on first use
        self._cas = None  # the EST cacerts that chain to the fleet root
        self._identity = None  # the identity certificate, parsed
        self._report = None
        self._booted = None  # the boot report awaiting confirm(), if any

    # -- helpers -------------------------------------------------------------------------

    def _note(self, action):
        if self._report is not None:
            self._report.actions.append(action)
        if self.log is not None:
            self.log(action)

    def _backoff(self, attempt, retry_after):
        policy = self.policy
        if retry_after is not None:
            # RFC 9110 10.2.3: not before the server's Retry-After; a little later spreads
            # a fleet that was told the same number.
            return retry_after + retry_after * 0.1 * self.rand()
        delay = policy.base_delay * (1 << min(attempt - 1, 16))
        if delay > policy.max_delay:
            delay = policy.max_delay
        return delay * (0.5 + 0.5 * self.rand())

    def _wait(self, name, exc, attempt, waited):
        """After a failed try: sleep before the next one and return the time slept, or
        re-raise `exc` when the bounds say stop."""
        policy = self.policy
        if not exc.retryable or attempt >= policy.max_attempts:
            raise exc
        if exc.retry_after is not None and exc.retry_after > policy.max_delay:
            raise exc
        delay = self._backoff(attempt, exc.retry_after)
        if waited + delay > policy.max_wait:
            raise exc
        if self.log is not None:
            self.log("%s: %s; retry %d in %.1f s" % (name, exc.reason, attempt, delay))
        self.clock.sleep(delay)
        if self._report is not None:
            self._report.retries += 1
            self._report.slept += delay
        return delay

    def _call(self, name, fn, *args):
        """One network step with bounded retries.  Raises the last NetError."""
        attempt = 0
        waited = 0.0
        while True:
            attempt += 1
            try:
                return fn(*args)
            except NetError as exc:
                waited += self._wait(name, exc, attempt, waited)

    def _enroll_pending(self, auth, csr):
        # RFC 7030 4.2.3: after 202 + Retry-After the SAME request is sent again.  Any
        # other failure may have consumed the CA's single-use nonce (the answer may be
        # what got lost), so the caller starts over with a fresh nonce and a fresh key.
        attempt = 0
        waited = 0.0
        while True:
            attempt += 1
            try:
                return self.net.enroll(auth, csr, auth != SLOT_IDENTITY)
            except NetError as exc:
                if exc.reason != NetError.PENDING:
                    raise
                waited += self._wait("enroll", exc, attempt, waited)

    def _spare(self, cur):
        a, b = self.policy.slots
        return b if cur == a else a

    def _facts(self, slot):
        from fleetid.device import certinfo

        return certinfo.certificate_facts(self.se.get_cert(slot))

    # -- the cycle -------------------------------------------------------------------------

    def run_once(self, command=None):
        """One agent cycle (module header).  Resumes whatever the journal says first.

        Params: command: None, or "rotate" (the cloud's or the operator's request).
        Returns: AgentReport.
        Raises: AgentError (boot refused, device refused, wrong certificate, journal
            corrupt), NetError (a network step failed after its retries: the journal
            keeps the progress), ApduError / LinkError (the SE failed).
        """
        report = self._report = AgentReport()
        try:
            self._run(report, command)
        finally:
            self._report = None
            last = self.journal.last()
            report.journal = rj.KIND_NAMES[last.kind] if last is not None else "none"
        return report

    def _run(self, report, command):
        if self.boot is not None and self._booted is None:
            try:
                report.boot = self._booted = self.boot.check()
            except (FleetidError, OSError) as exc:  # BootError, the SE, the image's read
                raise AgentError(AgentError.BOOT, "%s: %s" % (type(exc).__name__, exc), exc)
            self._note("boot checked")
        last = self._load()
        report.resumed = rj.KIND_NAMES[last.kind] if last is not None else "none"
        last = self.resume(last)
        slot = last.cur
        refused = None
        try:
            report.identity = self._call("whoami", self.net.whoami, slot)
            self._note("connected with slot %d" % slot)
        except NetError as exc:
            if exc.reason != NetError.REFUSED or exc.server_reason == CERTIFICATE_REVOKED:
                raise  # the device refused the server (a CRL lists it), not the other way
            if exc.server_reason not in _REFUSED_CREDENTIAL:
                report.refused = exc.server_reason or exc.detail
                raise AgentError(AgentError.REFUSED, report.refused, exc)
            refused = exc
            self._note("slot %d refused (%s)" % (slot, exc.server_reason))
        if self._booted is not None and refused is None:
            self.boot.confirm(self._booted)
            self._booted = None
            self._note("boot confirmed")
        if report.identity is not None and command is None:
            commands = report.identity.get("commands") or ()
            if "rotate" in commands:
                command = "rotate"
        now = self.clock.now()
        cause = rj.CAUSE_NONE
        if refused is not None:
            cause = rj.CAUSE_REFUSED
        elif command == "rotate":
            cause = rj.CAUSE_COMMAND
        elif now >= renew_at(last.t0, last.t1, self.policy.renew_fraction,
                           self.policy.renew_margin_s):
            cause = rj.CAUSE_DUE
        if cause != rj.CAUSE_NONE:
            last = self.rotate(cause)
        report.slot = last.cur
        report.serial = self._facts(last.cur).serial
        report.not_after = last.t1
        report.renew_at = renew_at(last.t0, last.t1, self.policy.renew_fraction,
                           self.policy.renew_margin_s)
        self._revocation(report)

    def _load(self):
        try:
            return self.journal.load()
        except rj.JournalError as exc:
            raise AgentError(AgentError.JOURNAL, exc.reason + ": " + exc.detail, exc)

    # -- the decision table (device/rotation_journal.py) ----------------------------------

    def resume(self, last):
        """Drive the journal to BASE by the decision table; enrol when it is empty.

        Returns: the BASE record.  Raises as run_once."""
        if last is None:
            return self.rotate(rj.CAUSE_ENROL)
        if last.kind == rj.BEGIN:
            self._note("resume BEGIN: redo the enrolment into slot %d" % last.new)
            return self._rotate_from(last)
        if last.kind == rj.ISSUED:
            self._note("resume ISSUED: acknowledge slot %d" % last.new)
            return self._acknowledge(last)
        if last.kind == rj.ACKED:
            self._note("resume ACKED: retire slot %d" % last.cur)
            return self._retire(last)
        if last.kind == rj.REFUSED:
            self._note("resume REFUSED: delete slot %d's key, retry or abandon" % last.new)
            return self._after_refusal(last, None)
        self._sweep(last.cur)
        return last

    def _sweep(self, cur):
        for slot in self.policy.slots:
            if slot != cur and enrol.clear_slot(self.se, slot):
                self._note("deleted a stray key in slot %d" % slot)

    def rotate(self, cause):
        """Start a rotation (or the first enrolment) from the journal's current state and
        take it to BASE.  Returns: the BASE record."""
        last = self.journal.last()
        if last is not None and last.kind != rj.BASE:
            return self.resume(last)
        cur = last.cur if last is not None else SLOT_IDENTITY
        begin = self.journal.append(rj.Record(rj.BEGIN, cur, self._spare(cur), cause,
                                              self.clock.now(), 0))
        self._note("BEGIN %s: slot %d -> %d" % (rj.CAUSE_NAMES[cause], cur, begin.new))
        return self._rotate_from(begin)

    def _certificates(self, auth):
        # The checker (fleet root from the SE), the identity certificate and the EST
        # cacerts that chain to the root, fetched once per agent (they change with a CA
        # rollover, not per rotation).
        from fleetid.device import certcheck

        if self._checker is None:
            self._checker = certcheck.CertificateChecker(self.se,
                                                         skew_s=self.policy.clock_skew_s)
        if self._identity is None:
            self._identity = certcheck.parse_certificate(self.se.get_cert(SLOT_IDENTITY))
        if not self._cas:
            cas = self._checker.verified_cas(self._call("cacerts", self.net.cacerts, auth),
                                             self.clock.now())
            if not cas:
                raise certcheck.CertificateRefused(certcheck.REASON_ISSUER,
                                                   "no CA from cacerts chains to the root")
            self._cas = cas
        return self._checker

    def _rotate_from(self, begin):
        from fleetid.device.certcheck import CertificateRefused

        se = self.se
        cur, new = begin.cur, begin.new
        current = self._facts(cur)
        if self._chain is None:
            self._chain = se.attestation_chain()
        auth = cur
        attempt = 0
        waited = 0.0
        while True:
            attempt += 1
            try:
                checker = self._certificates(auth)
                nonce = self._call("nonce", self.net.nonce, auth)
                point, _signed, csr = enrol.build_attested_csr(
                    se, new, nonce, current.common_name, current.serial_number,
                    self._chain, POLICY_SIGN, replace=True)
                self._note("key generated in slot %d, attested, CSR signed in the SE" % new)
                cert_der = self._enroll_pending(auth, csr)
                issued = checker.check_issued(cert_der, self._cas, point, self._identity,
                                              self.clock.now())
                break
            except CertificateRefused as exc:
                self._note("certificate for slot %d refused (%s)" % (new, exc))
                return self._refuse(begin, rj.REFUSAL_CHECK, exc)
            except NetError as exc:
                if exc.reason == NetError.REFUSED and auth != SLOT_IDENTITY and \
                        exc.server_reason in _REFUSED_CREDENTIAL:
                    # The current operational certificate is past its overlap window or
                    # expired: the factory identity certificate still authenticates the
                    # device (simpleenroll), and the new key still goes to `new`.
                    self._note("slot %d refused (%s): enrol with the identity certificate"
                               % (auth, exc.server_reason))
                    auth = SLOT_IDENTITY
                    continue
                waited += self._wait("enroll", exc, attempt, waited)
        se.put_cert(new, cert_der)
        record = self.journal.append(rj.Record(rj.ISSUED, cur, new, begin.cause,
                                               issued.not_before, issued.not_after))
        self._note("ISSUED: certificate %x checked and stored in slot %d"
                   % (issued.serial, new))
        return self._acknowledge(record)

    def _acknowledge(self, issued):
        try:
            self._call("ack", self.net.ack, issued.new)
        except NetError as exc:
            # A 4xx answer refuses the new certificate (superseded or expired before the
            # acknowledgement, unknown to the registry, ...): retrying the ack would
            # repeat forever, so the rotation falls back to the old credential and tries
            # again.  No answer (link, timeout, 5xx) is not a refusal: retried next
            # cycle.  A failed TLS handshake is a refusal only when the old credential's
            # handshake with the same verifier succeeds right after (_tls_refused).
            if exc.reason == NetError.HANDSHAKE and self._tls_refused(issued):
                self._note("slot %d refused by the verifier's TLS (%s), slot %d accepted"
                           % (issued.new, exc.detail, issued.cur))
                return self._refuse(issued, rj.REFUSAL_ACK, exc)
            if exc.reason != NetError.REFUSED or exc.status is None:
                raise
            self._note("slot %d refused at the acknowledgement (%s)"
                       % (issued.new, exc.server_reason or exc.detail))
            return self._refuse(issued, rj.REFUSAL_ACK, exc)
        record = self.journal.append(rj.Record(rj.ACKED, issued.cur, issued.new,
                                               issued.cause, issued.t0, issued.t1))
        self._note("ACKED by the verifier: slot %d" % issued.new)
        return self._retire(record)

    def _tls_refused(self, issued):
        # The new certificate's handshakes failed (after their retries): does the same
        # verifier complete a handshake with the old credential?  It does when it answers
        # whoami, or refuses it with an HTTP status (the old one superseded or expired:
        # the retry then enrols with the identity certificate).  Then the failure is the
        # new certificate's, not the link's.  Anything else: not a refusal.
        try:
            self._call("whoami", self.net.whoami, issued.cur)
        except NetError as exc:
            return exc.reason == NetError.REFUSED and exc.status is not None
        return True

    def _refuse(self, last, code, exc):
        # BEGIN or ISSUED -> REFUSED (one atomic write), then the REFUSED row of the
        # decision table.
        record = self.journal.append(rj.Record(rj.REFUSED, last.cur, last.new, last.cause,
                                               self.clock.now(), code))
        return self._after_refusal(record, exc)

    def _after_refusal(self, refused, exc):
        # Delete the new key (and the refused certificate with it), then retry with a
        # fresh key or, after max_rotation_attempts refusals, abandon the rotation: the
        # journal goes back to the state before it (one atomic write) and the old
        # credential stays in use.
        if enrol.clear_slot(self.se, refused.new):
            self._note("deleted the key in slot %d" % refused.new)
        count = rj.refusals(self.journal.records)
        if count < self.policy.max_rotation_attempts:
            begin = self.journal.append(rj.Record(rj.BEGIN, refused.cur, refused.new,
                                                  refused.cause, self.clock.now(), 0))
            self._note("BEGIN again: attempt %d of %d, slot %d -> %d" % (
                count + 1, self.policy.max_rotation_attempts, begin.cur, begin.new))
            return self._rotate_from(begin)
        if refused.cur == SLOT_IDENTITY:
            self.journal.reset()
        else:
            facts = self._facts(refused.cur)
            self.journal.compact(refused.cur, facts.not_before, facts.not_after)
        self._note("rotation abandoned after %d refused certificates: slot %d stays in use"
                   % (count, refused.cur))
        raise AgentError(AgentError.WRONG_CERTIFICATE,
                         "%d certificates refused (last: %s); slot %d stays in use"
                         % (count, exc if exc is not None else
                            rj.REFUSAL_NAMES.get(refused.t1, "?"), refused.cur), exc)

    def _retire(self, acked):
        if acked.cur != SLOT_IDENTITY and enrol.clear_slot(self.se, acked.cur):
            self._note("old key and certificate deleted from slot %d" % acked.cur)
        base = self.journal.compact(acked.new, acked.t0, acked.t1)
        self._note("BASE: slot %d" % acked.new)
        return base

    # -- revocation --------------------------------------------------------------------------

    def _refresh(self, cache, what, fetch_revocation, slot, now):
        # One refresh; a refused CRL keeps the old one (noted), an SE failure propagates.
        from fleetid.common.errors import ApduError, LinkError
        from fleetid.device.anchored_store import RevocationCacheError

        def fetch():
            return self._call(what, fetch_revocation, slot)

        try:
            result = cache.refresh(fetch, now)
            self._note("%s list %s" % (what, result or "refreshed"))
            forget = getattr(self.net, "forget_sessions", None)
            if result == "updated" and forget is not None:
                # A session ticket resumes without the server's certificate (RFC 8446
                # 2.2): after a new CRL, the next connections show their chains again.
                forget()
        except (LinkError, ApduError):
            raise  # the SE failed: not a revocation verdict
        except RevocationCacheError as exc:  # CrlError / RevsetCacheError: the old one stays
            self._note("%s refresh refused: %s" % (what, exc))

    def _revocation(self, report):
        now = self.clock.now()
        slot = report.slot
        if self.root_revocation is not None:  # the servers' root CRL (module header)
            self._refresh(self.root_revocation, "root revocation",
                          self.net.fetch_root_revocation, slot, now)
        cache = self.revocation
        if cache is None:
            return
        from fleetid.common.errors import ApduError, LinkError
        from fleetid.device.anchored_store import RevocationCacheError

        self._refresh(cache, "revocation", self.net.fetch_revocation, slot, now)
        try:
            cache.check_serial(report.serial, now)
        except (LinkError, ApduError):
            raise
        except RevocationCacheError as exc:  # RevokedError / StaleRevocationError
            report.revocation = "%s: %s" % (type(exc).__name__, exc)
            return
        report.revocation = status_text(cache.status(now))

    # -- status (no network) ------------------------------------------------------------------

    def status(self):
        """The agent's state without the network.

        Returns: dict: journal (list of str records), credential_slot, slots ({slot:
            {"key": bool, "cert": bool, "serial", "not_after"}}), renew_at, revocation
            (str or None), root_revocation (root_revocation.status(now): the fleet root's
            CRL cache, its SE high-water mark among it; None without one).
        Raises: AgentError(JOURNAL), SE errors.
        """
        from fleetid.common.errors import ReferenceNotFound

        last = self._load()
        slots = {}
        for slot in (SLOT_IDENTITY,) + self.policy.slots:
            entry = {"key": True, "cert": False, "serial": None, "not_after": None}
            try:
                self.se.public_key(slot)
            except ReferenceNotFound:
                entry["key"] = False
            if entry["key"]:
                try:
                    facts = self._facts(slot)
                    entry["cert"] = True
                    entry["serial"] = facts.serial
                    entry["not_after"] = facts.not_after
                except ReferenceNotFound:
                    pass
            slots[slot] = entry
        result = {"journal": [repr(r) for r in self.journal.records],
                  "credential_slot": rj.credential_slot(last), "slots": slots,
                  "final": rj.is_final(last), "renew_at": None, "revocation": None,
                  "root_revocation": None}
        if last is not None and last.kind == rj.BASE:
            result["renew_at"] = renew_at(last.t0, last.t1, self.policy.renew_fraction,
                           self.policy.renew_margin_s)
        if self.revocation is not None:
            result["revocation"] = status_text(self.revocation.status(self.clock.now()))
        if self.root_revocation is not None:
            result["root_revocation"] = self.root_revocation.status(self.clock.now())
        return result


def run_forever(agent, wait, interval, log=None, cycles=None):
    """The agent loop for a board (boards/*/main.py): one cycle, then wait until the next
    renewal or `interval` seconds, whichever is first; failures are logged and retried
    next cycle (the journal keeps the progress).

    Params: wait: fn(seconds) -> True to stop (an event's wait(), or a sleep that returns
        None).  interval: seconds between cycles.  cycles: stop after this many, with no
        wait after the last (tests, `fleetid agent run --runtime micropython --once`).
    Returns: the last AgentReport (or None).
    """
    done = 0
    last = None
    while cycles is None or done < cycles:
        done += 1
        pause = interval
        try:
            last = agent.run_once()
            if last.renew_at is not None:
                pause = min(interval, max(1, last.renew_at - agent.clock.now()))
        except FleetidError as exc:
            if log is not None:
                log("cycle failed: %s" % exc)
        if cycles is not None and done >= cycles:
            break  # no wait after the last cycle (`fleetid agent run --once`)
        if wait(pause):
            break
    return last
