"""State hooks: executables an operator drops in a folder, run at a deployment's phase boundaries.

Rules (spec: ``docs/drivers-and-hooks.md``; naming after Mender's state scripts):

* A hook is an executable file named ``<Phase>_<When>_<NN>[_<description>]``
  in the hooks folder, where Phase is ``Download``, ``Flash``, ``Reboot`` or
  ``Commit``, When is ``Enter``, ``Leave`` or ``Error`` and NN two digits.
  The hooks of one boundary run one after another in lexical order of their
  names. Other files are ignored, but a file that starts like a hook
  (``Flash_Enter_...``) and is misnamed or not executable fails the boundary:
  a battery check silently skipped is worse than an update held back.
* Each hook gets the deployment's facts in ``SHOAL_*`` environment variables
  on top of the gateway's environment (less any ``SHOAL_*`` variable the
  gateway was started with), its working directory is the hooks
  folder, its standard input is empty, and its output (stdout and stderr
  together) is kept, the last :data:`OUTPUT_TAIL_BYTES` of it, for the report.
* Exit 0: go on with the next hook. Exit :data:`RETRY_LATER_EXIT` (21, as in
  Mender): hold the deployment and run this hook again later. Any other exit,
  a signal, a hook that cannot be started: the boundary fails with the hook's
  name, exit status and output tail.
* Every hook runs in its own session (process group) and has a time limit;
  past it the whole group gets SIGTERM, then SIGKILL after
  :data:`KILL_GRACE_S`, and the boundary fails. When the hook exits, what is
  left of its group gets SIGKILL (a daemon must leave it with ``setsid``).
  No process, pipe or thread of a run outlives it.
* A gateway that stops closes its :class:`HookRunner`: running hooks get
  SIGTERM, then SIGKILL after :data:`KILL_GRACE_S`, none starts any more, and
  their boundaries are STOPPED (decided nothing; they run again after a restart).
* Error hooks (``<Phase>_Error_*``) run when a phase ends badly; their exit
  statuses are logged and change nothing.
* This module decides nothing about deployments: retry delays and caps are the
  agent's, with :class:`HooksConfig`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import selectors
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import IO

from gateway_proxy.drivers import Phase, When
from otaproto.errors import InvalidInput

log = logging.getLogger("shoal.gateway.hooks")

#: The exit status that asks for the boundary to be tried again later.
RETRY_LATER_EXIT = 21
#: Output kept per hook run, from its end.
OUTPUT_TAIL_BYTES = 1024
#: After SIGTERM on a timeout, how long the group has before SIGKILL.
KILL_GRACE_S = 2.0
#: After a hook exits (and what was left of its group was killed), how long a
#: process that left the group (``setsid``) but kept the output pipe may hold
#: the run up before the rest of its output is given up.
OUTPUT_DRAIN_S = 1.0
#: Where the kernel has no pidfd: how often to look whether the hook exited.
EXIT_POLL_S = 0.05
READ_BYTES = 65536

_NAME = re.compile(
    r"^(?P<phase>Download|Flash|Reboot|Commit)_(?P<when>Enter|Leave|Error)_[0-9]{2}(_[^/]*)?$"
)
_PREFIX = re.compile(r"^(Download|Flash|Reboot|Commit)_(Enter|Leave|Error)(_|$)")
#: Names that look like state scripts of another naming (Mender's ``ArtifactInstall_Enter_10``).
_FOREIGN = re.compile(r"^[A-Z][A-Za-z]+_(Enter|Leave|Error)_[0-9]{2}")


class HookSetupError(InvalidInput):
    """The hooks folder holds a file named like a hook that cannot run as one."""


@dataclass(frozen=True)
class HooksConfig:
    """``[hooks]`` of ``gateway.toml``. No folder: no hooks, every boundary passes."""

    folder: Path | None = None
    timeout_s: float = 60.0  #: per hook run
    retry_delay_s: float = 60.0  #: after a hook asked to retry later
    max_attempts: int = 5  #: runs of one boundary before a retry-later counts as a failure


class Verdict(StrEnum):
    """What the hooks of one boundary decided."""

    PASSED = "passed"
    RETRY_LATER = "retry_later"
    FAILED = "failed"
    #: The gateway is closing: a hook was stopped or not started. Nothing was
    #: decided; the boundary runs again when the gateway does.
    STOPPED = "stopped"


@dataclass(frozen=True)
class HookRun:
    """One hook process, finished."""

    name: str
    exit_code: int | None  #: None when it timed out or could not start
    timed_out: bool
    output: str  #: the tail of stdout+stderr, decoded leniently
    elapsed_s: float
    start_error: str = ""
    stopped: bool = False  #: the gateway closed while it ran, or before it could start


@dataclass(frozen=True)
class BoundaryResult:
    """The outcome of running one boundary's hooks.

    ``hook`` and ``index`` name the hook that decided (for RETRY_LATER: the one
    to start from next time); ``reason`` is a one-paragraph explanation for a
    report, empty when all passed.
    """

    verdict: Verdict
    hook: str = ""
    index: int = 0
    reason: str = ""
    output: str = ""
    ran: int = 0  #: hooks run this time


def hook_name(phase: Phase, when: When) -> str:
    """The name prefix of a boundary's hooks: ``Flash_Enter``."""
    return f"{phase.value}_{when.value}"


def find_hooks(folder: Path, phase: Phase, when: When) -> list[Path]:
    """The hooks of one boundary, in the order they run. Raises HookSetupError."""
    prefix = hook_name(phase, when)
    try:
        entries = sorted(os.listdir(folder))
    except OSError as exc:
        raise HookSetupError(f"hooks folder {folder}: {exc.strerror or exc}") from exc
    found: list[Path] = []
    for name in entries:
        if not (name == prefix or name.startswith(prefix + "_")):
            continue
        path = folder / name
        _check_hook(path)
        found.append(path)
    return found


def _check_hook(path: Path) -> None:
    if not _NAME.match(path.name):
        raise HookSetupError(
            f"hook {path.name} is misnamed: hooks are <Phase>_<When>_<NN>[_<name>] with two digits"
        )
    if not path.is_file() or not os.access(path, os.X_OK):
        raise HookSetupError(f"hook {path.name} is not an executable file")


def survey(folder: Path) -> tuple[list[str], list[str]]:
    """Every hook in ``folder`` and every problem with it, for the log at start.

    Problems are files named like hooks that would fail their boundary, and
    files that look like another tool's state scripts (they never run here).
    """
    hooks: list[str] = []
    problems: list[str] = []
    try:
        entries = sorted(os.listdir(folder))
    except OSError as exc:
        return [], [f"hooks folder {folder}: {exc.strerror or exc}"]
    for name in entries:
        if _PREFIX.match(name):
            try:
                _check_hook(folder / name)
                hooks.append(name)
            except HookSetupError as exc:
                problems.append(str(exc))
        elif _FOREIGN.match(name):
            problems.append(
                f"{name} is not a Shoal hook name (phases: Download, Flash, Reboot, Commit): "
                "it never runs"
            )
    return hooks, problems


class HookGroups:
    """The process groups of the hooks running now, so that :meth:`close` can end them.

    A hook runs in a session of its own, so it would outlive the gateway and
    its time limit with it; a gateway that stops closes this first. Thread-safe:
    the hooks of several jobs run at once, each in its job's worker.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[subprocess.Popen[bytes], _Ending] = {}
        self._closed = False

    def start(self, path: Path, env: Mapping[str, str]) -> subprocess.Popen[bytes] | None:
        """Start a hook, or None once closed. Raises OSError when it cannot be started.

        Started under the lock, so that no hook can begin after :meth:`close` looked.
        """
        with self._lock:
            if self._closed:
                return None
            proc = subprocess.Popen(
                [str(path)], cwd=path.parent, env=dict(env), stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                close_fds=True,
            )  # fmt: skip
            self._running[proc] = _Ending()
            return proc

    def ended(self, proc: subprocess.Popen[bytes]) -> bool:
        """``proc`` exited and its group got SIGKILL: forget them.

        True when :meth:`close` stopped it (False when called again).
        """
        with self._lock:
            ending = self._running.pop(proc, None)
        if ending is None:
            return False
        ending.done.set()
        return ending.stopped

    def close(self) -> None:
        """End every running hook's group (SIGTERM, SIGKILL after KILL_GRACE_S); start no more.

        Returns once each group got its SIGKILL or its runner saw it end, so a
        gateway that exits next leaves no hook behind.
        """
        with self._lock:
            self._closed = True
            running = list(self._running.items())
            for proc, ending in running:
                ending.stopped = True
                _signal_group(proc, signal.SIGTERM)
        if not running:
            return
        log.info("stopping %d running hook(s)", len(running))
        deadline = time.monotonic() + KILL_GRACE_S
        for _, ending in running:
            ending.done.wait(max(0.0, deadline - time.monotonic()))
        with self._lock:  # only groups still running: a finished one's pgid may be reused
            for proc, _ in running:
                if proc in self._running:
                    _signal_group(proc, signal.SIGKILL)
        deadline = time.monotonic() + KILL_GRACE_S
        for _, ending in running:
            ending.done.wait(max(0.0, deadline - time.monotonic()))


@dataclass
class _Ending:
    """A running hook, as :meth:`HookGroups.close` sees it."""

    stopped: bool = False  #: :meth:`HookGroups.close` signalled the group
    done: threading.Event = field(default_factory=threading.Event)


def run_hook(
    path: Path, env: Mapping[str, str], timeout_s: float, *, groups: HookGroups | None = None
) -> HookRun:
    """Run one hook to its end or its time limit; kill its process group past the limit.

    Once the hook exits, what is left of its group is killed too, and its
    output read to its end (or for OUTPUT_DRAIN_S, from a process that left
    the group with the pipe), then the pipe is closed: no process, fd or
    thread outlives a run. ``groups`` is the registry a stopping gateway
    closes; a hook that closing stopped, or refused, is a HookRun with
    ``stopped``. Never raises for what the hook does; a hook that cannot be
    started is a HookRun with ``start_error``.
    """
    started = time.monotonic()
    registry = HookGroups() if groups is None else groups
    try:
        proc = registry.start(path, env)
    except OSError as exc:
        return HookRun(
            path.name, None, False, "", time.monotonic() - started, exc.strerror or str(exc)
        )
    if proc is None:
        return HookRun(path.name, None, False, "", 0.0, "the gateway is closing", stopped=True)
    output, timed_out, stopped = b"", False, False

    def exited() -> None:
        nonlocal stopped
        stopped = registry.ended(proc) or stopped

    try:
        output, timed_out = _supervise(proc, started + timeout_s, exited)
    finally:
        if proc.poll() is None:  # interrupted (KeyboardInterrupt): leave nothing behind
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
        exited()
    return HookRun(
        path.name, None if timed_out else proc.returncode, timed_out,
        output.decode(errors="replace"), time.monotonic() - started, stopped=stopped,
    )  # fmt: skip


def _supervise(
    proc: subprocess.Popen[bytes], deadline: float, exited: Callable[[], None]
) -> tuple[bytes, bool]:
    """Wait for the hook while keeping its output's tail; enforce its time limit.

    One thread and a selector: the output pipe and, where the kernel has
    them, a pidfd that wakes us when the hook exits (else a poll every
    EXIT_POLL_S). Calls ``exited`` once the hook exited and its group got
    SIGKILL, before the output is drained. Returns the output tail and
    whether the time limit hit.
    """
    stream = proc.stdout
    assert stream is not None  # stdout=PIPE
    kept = bytearray()
    timed_out = False
    kill_at: float | None = None  #: SIGKILL due (after a SIGTERM on the time limit)
    pidfd = _pidfd(proc.pid)
    with contextlib.ExitStack() as stack:
        stack.callback(stream.close)
        if pidfd is not None:
            stack.callback(os.close, pidfd)
        selector = stack.enter_context(selectors.DefaultSelector())
        selector.register(stream, selectors.EVENT_READ)
        if pidfd is not None:
            selector.register(pidfd, selectors.EVENT_READ)
        while proc.poll() is None:
            now = time.monotonic()
            if not timed_out and now >= deadline:
                timed_out = True
                _signal_group(proc, signal.SIGTERM)
                kill_at = now + KILL_GRACE_S
            elif kill_at is not None and now >= kill_at:
                _signal_group(proc, signal.SIGKILL)
                kill_at = None
            wake_at = kill_at if timed_out else deadline
            wait_s = None if wake_at is None else max(0.0, wake_at - now)
            if pidfd is None:
                wait_s = EXIT_POLL_S if wait_s is None else min(wait_s, EXIT_POLL_S)
            for key, _ in selector.select(wait_s):
                if key.fileobj is stream and not _read(stream, kept):
                    selector.unregister(stream)
        # The hook is gone: nothing of its group outlives it (daemons leave it with setsid).
        _signal_group(proc, signal.SIGKILL)
        exited()
        if pidfd is not None:
            selector.unregister(pidfd)
        drain_until = time.monotonic() + OUTPUT_DRAIN_S
        while selector.get_map():
            wait_s = drain_until - time.monotonic()
            if wait_s <= 0:
                break
            for _ in selector.select(wait_s):
                if not _read(stream, kept):
                    selector.unregister(stream)
    return bytes(kept), timed_out


def _read(stream: IO[bytes], kept: bytearray) -> bool:
    """Read what is there into the tail; False at the end of the output."""
    try:
        chunk = os.read(stream.fileno(), READ_BYTES)
    except OSError:
        return False
    kept += chunk
    del kept[:-OUTPUT_TAIL_BYTES]
    return bool(chunk)


def _pidfd(pid: int) -> int | None:
    """A descriptor readable once ``pid`` exits (Linux 5.3+), or None without."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """Signal the hook's process group (its pid: it leads a session of its own)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def describe(run: HookRun, timeout_s: float) -> str:
    """A one-paragraph reason for a failed hook run, ending with its output tail."""
    if run.stopped:
        head = f"hook {run.name} was stopped: the gateway is closing"
    elif run.start_error:
        head = f"hook {run.name} could not be started: {run.start_error}"
    elif run.timed_out:
        head = f"hook {run.name} did not finish within {timeout_s:g} s and was killed"
    elif run.exit_code is not None and run.exit_code < 0:
        head = f"hook {run.name} was killed by signal {-run.exit_code}"
    else:
        head = f"hook {run.name} failed (exit {run.exit_code})"
    output = run.output.strip()
    return f"{head}: {output}" if output else head


def last_line(output: str, limit: int = 200) -> str:
    """The last non-empty line of a hook's output, bounded: a reason's short form."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return lines[-1][:limit] if lines else ""


class HookRunner:
    """Runs the hooks of a boundary with the environment the agent gives."""

    def __init__(self, config: HooksConfig) -> None:
        self.config = config
        self._groups = HookGroups()

    def close(self) -> None:
        """End the hooks running now (SIGTERM, then SIGKILL after KILL_GRACE_S); run no more.

        Boundaries running or run afterwards return STOPPED; error hooks no
        longer run. Blocks for at most about twice KILL_GRACE_S.
        """
        self._groups.close()

    def run(
        self, phase: Phase, when: When, env: Mapping[str, str], *, start: int = 0
    ) -> BoundaryResult:
        """Run the boundary's hooks from the ``start``-th on; stop at the first that does not pass.

        Error boundaries should use :meth:`run_errors`. Never raises: a broken
        hooks folder is a FAILED result that says what is wrong.
        """
        folder = self.config.folder
        if folder is None:
            return BoundaryResult(Verdict.PASSED)
        try:
            hooks = find_hooks(folder, phase, when)
        except HookSetupError as exc:
            return BoundaryResult(Verdict.FAILED, reason=str(exc))
        ran = 0
        for index in range(start, len(hooks)):
            path = hooks[index]
            result = run_hook(path, env, self.config.timeout_s, groups=self._groups)
            if result.stopped:
                return BoundaryResult(
                    Verdict.STOPPED, path.name, index, describe(result, self.config.timeout_s),
                    result.output, ran,
                )  # fmt: skip
            ran += 1
            log.info(
                "hook %s: %s in %.1f s", path.name,
                "timed out" if result.timed_out else f"exit {result.exit_code}", result.elapsed_s,
            )  # fmt: skip
            if result.exit_code == 0:
                continue
            if result.exit_code == RETRY_LATER_EXIT:
                return BoundaryResult(
                    Verdict.RETRY_LATER, path.name, index, output=result.output, ran=ran
                )
            return BoundaryResult(
                Verdict.FAILED, path.name, index, describe(result, self.config.timeout_s),
                result.output, ran,
            )  # fmt: skip
        return BoundaryResult(Verdict.PASSED, ran=ran)

    def run_errors(self, phase: Phase, env: Mapping[str, str]) -> int:
        """Run every error hook of ``phase``, whatever each one exits with; return how many ran."""
        folder = self.config.folder
        if folder is None:
            return 0
        try:
            hooks = find_hooks(folder, phase, When.ERROR)
        except HookSetupError as exc:
            log.warning("%s", exc)
            return 0
        ran = 0
        for path in hooks:
            result = run_hook(path, env, self.config.timeout_s, groups=self._groups)
            if result.stopped:
                break
            ran += 1
            if result.exit_code != 0:
                log.warning("%s", describe(result, self.config.timeout_s))
        return ran
