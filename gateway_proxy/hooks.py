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
  on top of the gateway's environment, its working directory is the hooks
  folder, its standard input is empty, and its output (stdout and stderr
  together) is kept, the last :data:`OUTPUT_TAIL_BYTES` of it, for the report.
* Exit 0: go on with the next hook. Exit :data:`RETRY_LATER_EXIT` (21, as in
  Mender): hold the deployment and run this hook again later. Any other exit,
  a signal, a hook that cannot be started: the boundary fails with the hook's
  name, exit status and output tail.
* Every hook runs in its own session (process group) and has a time limit;
  past it the whole group gets SIGTERM, then SIGKILL after
  :data:`KILL_GRACE_S`, and the boundary fails.
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
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from gateway_proxy.drivers import Phase, When
from otaproto.errors import InvalidInput

log = logging.getLogger("shoal.gateway.hooks")

#: The exit status that asks for the boundary to be tried again later.
RETRY_LATER_EXIT = 21
#: Output kept per hook run, from its end.
OUTPUT_TAIL_BYTES = 1024
#: After SIGTERM on a timeout, how long the group has before SIGKILL.
KILL_GRACE_S = 2.0
#: After a hook exits, how long to wait for the rest of its output (a child it
#: left behind may hold the pipe open forever).
OUTPUT_DRAIN_S = 1.0
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


@dataclass(frozen=True)
class HookRun:
    """One hook process, finished."""

    name: str
    exit_code: int | None  #: None when it timed out or could not start
    timed_out: bool
    output: str  #: the tail of stdout+stderr, decoded leniently
    elapsed_s: float
    start_error: str = ""


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


def run_hook(path: Path, env: Mapping[str, str], timeout_s: float) -> HookRun:
    """Run one hook to its end or its time limit; kill its process group past the limit.

    Never raises for what the hook does; a hook that cannot be started is a
    HookRun with ``start_error``.
    """
    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            [str(path)], cwd=path.parent, env=dict(env), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
            close_fds=True,
        )  # fmt: skip
    except OSError as exc:
        return HookRun(
            path.name, None, False, "", time.monotonic() - started, exc.strerror or str(exc)
        )
    tail = _Tail(proc)
    timed_out = False
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc)
    finally:
        if proc.poll() is None:  # interrupted (KeyboardInterrupt): leave nothing behind
            _kill_group(proc)
    output = tail.finish()
    return HookRun(
        path.name, None if timed_out else proc.returncode, timed_out, output,
        time.monotonic() - started,
    )  # fmt: skip


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the hook's whole process group, SIGKILL after the grace time."""
    for sig, wait_s in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait_s)
            if sig is signal.SIGTERM:
                # The leader is gone; children that ignored SIGTERM are not spared.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
            return
        except subprocess.TimeoutExpired:
            continue


class _Tail:
    """Reads a hook's output in a thread, keeping only the last OUTPUT_TAIL_BYTES."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self._stream = proc.stdout
        self._kept = bytearray()
        self._thread = threading.Thread(target=self._read, name="hook-output", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        stream = self._stream
        if stream is None:
            return
        fd = stream.fileno()
        with contextlib.suppress(OSError, ValueError):
            while chunk := os.read(fd, READ_BYTES):
                self._kept += chunk
                del self._kept[:-OUTPUT_TAIL_BYTES]

    def finish(self) -> str:
        self._thread.join(OUTPUT_DRAIN_S)
        kept = bytes(self._kept)
        if not self._thread.is_alive() and self._stream is not None:
            self._stream.close()
        return kept.decode(errors="replace")


def describe(run: HookRun, timeout_s: float) -> str:
    """A one-paragraph reason for a failed hook run, ending with its output tail."""
    if run.start_error:
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
            result = run_hook(path, env, self.config.timeout_s)
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
        for path in hooks:
            result = run_hook(path, env, self.config.timeout_s)
            if result.exit_code != 0:
                log.warning("%s", describe(result, self.config.timeout_s))
        return len(hooks)
