"""Node drivers: how a gateway updates one node, whatever protocol the node speaks.

Rules (spec: ``docs/drivers-and-hooks.md``):

* A driver is a :class:`NodeDriver` subclass registered under the entry point
  group :data:`ENTRY_POINT_GROUP` (``shoal.node_drivers``); ``gateway.toml``
  names one per node (``driver = "..."``) and gives it a free-form table of
  options (``[nodes.NAME.options]``). Shoal's own serial protocol
  (``shoal-serial``) and SMP/MCUboot (``smp``) register exactly as a
  third-party package does.
* Drivers are found by name without importing anything (config checking
  needs only the names); a driver's code is imported the first time a node
  names it, once. A driver that is not registered, does not import or is not
  a NodeDriver fails the nodes that name it, with a one-line InvalidInput,
  and no other node.
* A driver offers steps: :meth:`~NodeDriver.inventory`,
  :meth:`~NodeDriver.transfer` (to the node's staging slot, resuming from
  what the node already holds), :meth:`~NodeDriver.test_boot`,
  :meth:`~NodeDriver.await_boot`, :meth:`~NodeDriver.confirm`,
  :meth:`~NodeDriver.reset`. :meth:`~NodeDriver.run_update` sequences them
  into the phases Flash, Reboot and Commit and calls a :class:`PhaseHooks`
  at every boundary (the gateway runs its state hooks there). A driver whose
  protocol cannot be split this way overrides ``run_update`` and must call
  the hooks at the same boundaries, with no byte sent to the node for a phase
  before its ``enter`` returned.
* Hooks run *between* steps, never inside one: no step holds a link or a
  session open while a hook runs, so a hook may take as long as it likes
  (or ask to retry hours later) without a protocol timer expiring. What a
  node does on its own meanwhile (a watchdog reset reverting an unconfirmed
  image) is what :meth:`~NodeDriver.confirm` must check for.
* The steps block and are called from one worker thread per node at a time;
  the gateway never calls two steps of one driver at once.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

from otaproto.errors import InvalidInput, ShoalError

log = logging.getLogger("shoal.gateway")

if TYPE_CHECKING:
    from gateway_proxy.config import NodePort
    from otaproto.artifact import VerifiedArtifact

#: The entry point group drivers register under (``pyproject.toml``).
ENTRY_POINT_GROUP = "shoal.node_drivers"
#: The driver of a node whose ``gateway.toml`` table names none.
DEFAULT_DRIVER = "shoal-serial"


# -- errors ---------------------------------------------------------------------


class DriverNotFound(InvalidInput):
    """No driver is registered under the name a node's configuration gives."""


class DriverLoadError(InvalidInput):
    """A registered driver could not be imported, or is not a NodeDriver."""


class DriverOptionError(InvalidInput):
    """A node's driver options are missing, mistyped or unknown to its driver."""


class StepFailed(ShoalError):
    """A driver step did not reach its goal (the node refused, failed or went silent).

    The message is the node's or protocol's reason, fit for a deployment report.
    """


class StepRejected(StepFailed):
    """The node refused for good: the same image would be refused again (signature, format).

    For what a step after :meth:`NodeDriver.transfer` learns only then (an SMP
    node checks the signature when asked to test-boot); ends the update ``rejected``.
    """


class HookFailed(ShoalError):
    """A state hook failed, timed out, or asked to retry later past the cap.

    Raised by a :class:`PhaseHooks` ``enter``/``leave``; the message (with the
    hook's name and the tail of its output) becomes the deployment's reason.
    """


class _CommitRefused(HookFailed):
    """A Commit_Enter hook refused, and the node was already reset to revert (or kept
    an image it had confirmed itself)."""


class UpdateCancelled(ShoalError):
    """The deployment was cancelled while a hook held it back; nothing more is done."""


# -- phases and progress ------------------------------------------------------------


class Phase(StrEnum):
    """The phases of a deployment that hooks may guard; values are the hook name prefixes."""

    DOWNLOAD = "Download"  #: the gateway fetches, verifies and rebuilds (no node I/O)
    FLASH = "Flash"  #: the image goes to the node's staging slot and is verified there
    REBOOT = "Reboot"  #: the node test-boots the image and gives its verdict
    COMMIT = "Commit"  #: the new image is made permanent


class When(StrEnum):
    """Which boundary of a phase; values are the second part of hook names."""

    ENTER = "Enter"
    LEAVE = "Leave"
    ERROR = "Error"


class InstallState(StrEnum):
    """What a driver reports while it works: the gateway's STATUS words (``docs/topics.md``)."""

    FLASHING = "flashing"
    VERIFYING = "verifying"
    REBOOTING = "rebooting"
    CONFIRMING = "confirming"


@dataclass(frozen=True)
class InstallProgress:
    """A progress report: where the update stands and how many image bytes the node holds."""

    state: InstallState
    bytes_done: int
    bytes_total: int


ProgressFn = Callable[[InstallProgress], None]


# -- what steps return ---------------------------------------------------------------


@dataclass(frozen=True)
class RunningImage:
    """The image a node runs, as far as its protocol tells (None: not known)."""

    version: str
    sequence: int | None = None
    image_sha256: bytes | None = None
    image_bytes: int | None = None
    #: What tells this image from another of the same version, in the protocol's own
    #: terms (SMP: the MCUboot SHA-256 TLV); lets the gateway recognise an image it
    #: installed when the protocol cannot tell Shoal's sequence and digest.
    identity: bytes | None = None


@dataclass(frozen=True)
class NodeInventory:
    """Who a node is and what it runs, in words every driver can fill.

    ``protocol`` names what the driver spoke (``"shoal-serial/1"``, ``"smp"``);
    ``extra`` holds protocol-specific facts for logs and debugging.
    """

    device_type: str | None
    boot_state: str | None
    running: RunningImage | None
    protocol: str
    extra: Mapping[str, Any] = field(default_factory=dict)


class TransferOutcome(StrEnum):
    """How :meth:`NodeDriver.transfer` ended."""

    STAGED = "staged"  #: the whole image is in the staging slot, verified by the node
    TESTING = "testing"  #: the node already test-boots this image (an earlier update got there)
    ALREADY_INSTALLED = "already_installed"  #: the node runs this image, confirmed
    REJECTED = "rejected"  #: the node will never take it (signature, device type, rollback, size)
    FAILED = "failed"  #: it did not work this time (link lost, node busy): may be retried


@dataclass(frozen=True)
class TransferReport:
    """What a transfer did, with the figures operators and benchmarks want."""

    outcome: TransferOutcome
    reason: str
    image_bytes: int
    bytes_sent: int = 0  #: image bytes written to the link (repeats included)
    resumed_from_bytes: int = 0  #: what the node already held when this transfer began


class BootVerdict(StrEnum):
    """What a node did with a test boot."""

    NEW_IMAGE = "new_image"  #: it runs the new image (under test, or confirmed already)
    REVERTED = "reverted"  #: it runs its previous image again
    TIMED_OUT = "timed_out"  #: no verdict in the driver's time limit


@dataclass(frozen=True)
class BootOutcome:
    """The node's state after a test boot or a confirm.

    ``confirmed`` is True when the new image is permanent already: some nodes
    (Shoal's serial protocol) confirm themselves after their self-test.
    """

    verdict: BootVerdict
    confirmed: bool
    reason: str


class UpdateOutcome(StrEnum):
    """How a whole update ended: the gateway's final STATUS words."""

    SUCCEEDED = "succeeded"
    ROLLED_BACK = "rolled_back"
    ALREADY_INSTALLED = "already_installed"
    REJECTED = "rejected"
    FAILED = "failed"


@dataclass(frozen=True)
class UpdateResult:
    """The end of :meth:`NodeDriver.run_update`."""

    outcome: UpdateOutcome
    reason: str
    bytes_sent: int = 0


# -- hooks -----------------------------------------------------------------------------


class PhaseHooks(Protocol):
    """Called by :meth:`NodeDriver.run_update` at every phase boundary.

    ``enter`` and ``leave`` return when the update may go on. They may block
    for long (a hook asked to retry later) and raise :class:`HookFailed` or
    :class:`UpdateCancelled` to stop it; ``run_update`` lets both through.
    ``error`` runs when a phase ends badly; it never raises.
    """

    def enter(self, phase: Phase) -> None: ...
    def leave(self, phase: Phase) -> None: ...
    def error(self, phase: Phase, reason: str) -> None: ...


class NoHooks:
    """A :class:`PhaseHooks` that lets every phase pass (``shoal flash``, tests)."""

    def enter(self, phase: Phase) -> None:
        return None

    def leave(self, phase: Phase) -> None:
        return None

    def error(self, phase: Phase, reason: str) -> None:
        return None


@contextlib.contextmanager
def guarded_phase(hooks: PhaseHooks, phase: Phase) -> Iterator[None]:
    """Run a block as ``phase``: enter hooks before, leave hooks after, error hooks on failure.

    A failing enter hook runs the phase's error hooks too (as Mender does), so
    that an error hook can undo what an earlier enter hook of the same phase did.
    """
    try:
        hooks.enter(phase)
        yield
        hooks.leave(phase)
    except Exception as exc:
        hooks.error(phase, str(exc))
        raise


class _Stop(Exception):
    """Ends :meth:`NodeDriver.run_update` early with a result (and the phase's error hooks)."""

    def __init__(self, outcome: UpdateOutcome, reason: str) -> None:
        super().__init__(reason)
        self.outcome = outcome
        self.reason = reason


# -- options ---------------------------------------------------------------------------

_REQUIRED: Any = object()


class DriverOptions:
    """A node's ``[nodes.NAME.options]`` table with typed, checked reads.

    Every getter raises DriverOptionError naming the node and the key, so a
    driver's constructor can read its options in a few lines and a mistake
    reads as a configuration error.
    """

    def __init__(self, node_name: str, values: Mapping[str, Any]) -> None:
        self.where = f"nodes.{node_name}.options"
        self.values = dict(values)

    def only(self, *known: str) -> None:
        """Refuse keys this driver does not know (a typo would be silently ignored otherwise)."""
        unknown = sorted(set(self.values) - set(known))
        if unknown:
            allowed = ", ".join(sorted(known)) or "none"
            raise DriverOptionError(
                f"{self.where}: unknown option {', '.join(unknown)} (this driver takes: {allowed})"
            )

    def text(self, key: str, default: str = _REQUIRED) -> str:
        value = self._get(key, default)
        if not isinstance(value, str) or not value:
            raise DriverOptionError(f"{self.where}.{key} must be a non-empty string")
        return value

    def integer(
        self, key: str, default: int = _REQUIRED, *, minimum: int | None = None,
        maximum: int | None = None,
    ) -> int:  # fmt: skip
        value = self._get(key, default)
        if not isinstance(value, int) or isinstance(value, bool):
            raise DriverOptionError(f"{self.where}.{key} must be an integer")
        self._range(key, value, minimum, maximum)
        return value

    def number(
        self, key: str, default: float = _REQUIRED, *, minimum: float | None = None,
        maximum: float | None = None,
    ) -> float:  # fmt: skip
        value = self._get(key, default)
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise DriverOptionError(f"{self.where}.{key} must be a number")
        self._range(key, value, minimum, maximum)
        return float(value)

    def flag(self, key: str, default: bool = _REQUIRED) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise DriverOptionError(f"{self.where}.{key} must be true or false")
        return value

    def _get(self, key: str, default: Any) -> Any:
        if key in self.values:
            return self.values[key]
        if default is _REQUIRED:
            raise DriverOptionError(f"{self.where}.{key} is required by this driver")
        return default

    def _range(self, key: str, value: float, minimum: float | None, maximum: float | None) -> None:
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            low = "" if minimum is None else f"{minimum:g}"
            high = "" if maximum is None else f"{maximum:g}"
            raise DriverOptionError(f"{self.where}.{key} must be in {low}..{high}, not {value:g}")


# -- the driver ------------------------------------------------------------------------


class NodeDriver(ABC):
    """One node, one protocol. Subclass it, register it, name it in ``gateway.toml``.

    The constructor gets the node's configuration (name, port, baud, driver
    name, options) and must not touch the node: drivers are made when first
    needed, possibly while the node is off. It should read and check every
    option (raising DriverOptionError) so mistakes show before an update.
    """

    def __init__(self, node: NodePort) -> None:
        self.node = node
        self.options = DriverOptions(node.name, node.options)

    @abstractmethod
    def inventory(self) -> NodeInventory:
        """Ask the node who it is and what it runs. Raises LinkError, InvalidInput."""

    @abstractmethod
    def transfer(
        self, artifact: VerifiedArtifact, image: bytes, progress: ProgressFn
    ) -> TransferReport:
        """Put ``image`` (verified, rebuilt) into the node's staging slot, resuming.

        Ends with the whole image staged and checked by the node (``STAGED``), or
        with what the node said instead (``TESTING``, ``ALREADY_INSTALLED``,
        ``REJECTED``, ``FAILED``). Calls ``progress`` with FLASHING/VERIFYING as
        it goes. Raises LinkError when the node cannot be reached at all.
        """

    @abstractmethod
    def test_boot(self, artifact: VerifiedArtifact, image: bytes) -> None:
        """Mark the staged image for one test boot and make the node reset into it.

        Returns once the node took the request (not once it booted). Raises
        StepFailed when the node refuses, LinkError when it cannot be reached.
        """

    @abstractmethod
    def await_boot(self, artifact: VerifiedArtifact) -> BootOutcome:
        """Wait for the node's verdict on the test boot (in the driver's own time limit).

        Raises LinkError when the link fails in a way the driver cannot ride out.
        """

    @abstractmethod
    def confirm(self, artifact: VerifiedArtifact) -> BootOutcome:
        """Make the running new image permanent; say what the node runs afterwards.

        Must check the node still runs ``artifact``'s image: hooks may have held
        the update for long, and a node reset meanwhile reverts an unconfirmed
        image (then: ``REVERTED``). Raises StepFailed, LinkError.
        """

    @abstractmethod
    def reset(self) -> None:
        """Reset the node (an unconfirmed test image then reverts). Raises LinkError."""

    def close(self) -> None:
        """Release what the driver holds between updates (nothing, by default)."""
        return None

    def run_update(
        self,
        artifact: VerifiedArtifact,
        image: bytes,
        *,
        hooks: PhaseHooks,
        progress: ProgressFn,
    ) -> UpdateResult:
        """The whole update, phase by phase, with ``hooks`` at every boundary.

        Flash: transfer. Reboot: test boot (unless the node already tests this
        image) and its verdict. Commit: confirm (unless the node confirmed
        itself). A phase that ends badly runs its error hooks and ends the
        update with its outcome; an image the node already runs ends after
        Flash. A commit refused by a hook leaves the node on its old image when
        the new one is not confirmed yet (the node is reset to revert);
        otherwise the node keeps it, and the reason says so.

        Whatever ends an update after the node was asked to test-boot the image
        and before it is confirmed (a hook refusing, a cancel, a failed or
        timed-out step) resets the node, best effort, so that it reverts: a node
        is never left running an unconfirmed test image, which would also block
        its next update.

        Returns the outcome for every ending a node can produce. Raises
        HookFailed and UpdateCancelled (from ``hooks``), StepFailed, LinkError
        and whatever else a step raises, after the phase's error hooks ran.
        """
        total = len(image)
        report: TransferReport | None = None
        on_test = False  # the node may run (or boot next) the new image, unconfirmed
        try:
            with guarded_phase(hooks, Phase.FLASH):
                report = self.transfer(artifact, image, progress)
                if report.outcome in (TransferOutcome.REJECTED, TransferOutcome.FAILED):
                    raise _Stop(UpdateOutcome(report.outcome.value), report.reason)
            if report.outcome is TransferOutcome.ALREADY_INSTALLED:
                return UpdateResult(
                    UpdateOutcome.ALREADY_INSTALLED, report.reason, report.bytes_sent
                )
            with guarded_phase(hooks, Phase.REBOOT):
                progress(InstallProgress(InstallState.REBOOTING, total, total))
                on_test = True
                if report.outcome is TransferOutcome.STAGED:
                    try:
                        self.test_boot(artifact, image)
                    except StepRejected as exc:
                        on_test = False  # refused: nothing was marked
                        raise _Stop(UpdateOutcome.REJECTED, str(exc)) from exc
                boot = self.await_boot(artifact)
                if boot.verdict is BootVerdict.REVERTED or boot.confirmed:
                    on_test = False
                _stop_unless_running(boot)
            boot = self._commit(artifact, boot, hooks, progress, total)
            on_test = False
        except _Stop as stop:
            if on_test and stop.outcome is not UpdateOutcome.ROLLED_BACK:
                self._revert_quietly()
            sent = report.bytes_sent if report is not None else 0
            return UpdateResult(stop.outcome, stop.reason, sent)
        except _CommitRefused:
            raise  # _commit has reset the node already
        except BaseException:
            if on_test:
                self._revert_quietly()
            raise
        return UpdateResult(UpdateOutcome.SUCCEEDED, boot.reason, report.bytes_sent)

    def _revert_quietly(self) -> None:
        """Reset a node left on an unconfirmed test image; an error is logged, not raised."""
        try:
            self.reset()
        except Exception as exc:  # the update's own failure is what gets reported
            log.warning("node %s: reset to revert the test image failed: %s", self.node.name, exc)

    def _commit(
        self,
        artifact: VerifiedArtifact,
        boot: BootOutcome,
        hooks: PhaseHooks,
        progress: ProgressFn,
        total: int,
    ) -> BootOutcome:
        """The Commit phase; a refused enter hook says what became of the image.

        Returns the node's state after it (confirmed).
        """
        try:
            hooks.enter(Phase.COMMIT)
        except HookFailed as exc:
            if boot.confirmed:
                what = f"the node had confirmed {artifact.manifest.version} itself and keeps it"
            else:
                what = "the node was reset to revert to its previous image"
                try:
                    self.reset()
                except ShoalError as reset_error:
                    what = f"resetting the node to revert failed: {reset_error}"
            refused = _CommitRefused(f"{exc}; {what}")
            hooks.error(Phase.COMMIT, str(refused))
            raise refused from exc
        except Exception as exc:
            hooks.error(Phase.COMMIT, str(exc))
            raise
        try:
            progress(InstallProgress(InstallState.CONFIRMING, total, total))
            if not boot.confirmed:
                boot = self.confirm(artifact)
                _stop_unless_running(boot)
            hooks.leave(Phase.COMMIT)
        except Exception as exc:
            hooks.error(Phase.COMMIT, str(exc))
            raise
        return boot


def _stop_unless_running(boot: BootOutcome) -> None:
    if boot.verdict is BootVerdict.REVERTED:
        raise _Stop(UpdateOutcome.ROLLED_BACK, boot.reason)
    if boot.verdict is BootVerdict.TIMED_OUT:
        raise _Stop(UpdateOutcome.FAILED, boot.reason)


# -- finding drivers -----------------------------------------------------------------------

_loaded: dict[str, type[NodeDriver] | DriverLoadError] = {}
_loading = threading.Lock()


def _entry_points(name: str | None = None) -> list[importlib.metadata.EntryPoint]:
    found = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    return [ep for ep in found if name is None or ep.name == name]


def registered_drivers() -> tuple[str, ...]:
    """The names of every registered driver, sorted. Imports no driver code."""
    return tuple(sorted({ep.name for ep in _entry_points()}))


def check_registered(name: str) -> None:
    """Refuse a driver name nobody registered. Raises DriverNotFound naming those that are."""
    if not _entry_points(name):
        known = ", ".join(registered_drivers()) or "none"
        raise DriverNotFound(f"no node driver {name!r} is registered (registered: {known})")


def load_driver(name: str) -> type[NodeDriver]:
    """The driver class registered as ``name``, imported on first use and remembered.

    A failure is remembered too: a broken package is not imported again on
    every job (fixing it takes a gateway restart, as any code change does).
    Raises DriverNotFound, DriverLoadError.
    """
    with _loading:
        cached = _loaded.get(name)
        if cached is None:
            cached = _loaded[name] = _import(name)
    if isinstance(cached, DriverLoadError):
        raise cached
    return cached


def _import(name: str) -> type[NodeDriver] | DriverLoadError:
    points = _entry_points(name)
    if not points:
        check_registered(name)  # raises DriverNotFound
    targets = sorted({ep.value for ep in points})
    if len(targets) > 1:
        return DriverLoadError(
            f"node driver {name!r} is registered twice ({' and '.join(targets)}): "
            "uninstall one of the packages"
        )
    point = points[0]
    try:
        loaded = point.load()
    except Exception as exc:  # any error of third-party code at import
        return DriverLoadError(
            f"node driver {name!r} ({point.value}) cannot be loaded: {type(exc).__name__}: {exc}"
        )
    if not (isinstance(loaded, type) and issubclass(loaded, NodeDriver)):
        return DriverLoadError(f"node driver {name!r} ({point.value}) is not a NodeDriver class")
    return loaded


def make_driver(node: NodePort) -> NodeDriver:
    """A driver for ``node``, of the kind its configuration names.

    Raises DriverNotFound, DriverLoadError, DriverOptionError; a driver whose
    constructor fails otherwise is reported as DriverLoadError.
    """
    cls = load_driver(node.driver)
    try:
        return cls(node)
    except InvalidInput:
        raise
    except Exception as exc:  # third-party constructor code
        raise DriverLoadError(
            f"node driver {node.driver!r} failed to start for node {node.name}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
