"""State hooks as processes: order, exit codes, output tails, time limits, naming mistakes.

Every hook here is a real executable the test writes into a temporary hooks
folder; the agent-level behaviour (deferral, caps, reports) is in
``tests/test_gateway_agent.py``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway_proxy.drivers import Phase, When
from gateway_proxy.hooks import (
    OUTPUT_TAIL_BYTES,
    RETRY_LATER_EXIT,
    HookRunner,
    HooksConfig,
    Verdict,
    find_hooks,
    run_hook,
    survey,
)
from otaproto.errors import InvalidInput

ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "SHOAL_NODE": "n1"}


def write_hook(folder: Path, name: str, body: str, *, executable: bool = True) -> Path:
    """A shell script hook; ``body`` runs under ``set -u``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(f"#!/bin/sh\nset -u\n{body}\n")
    path.chmod(0o755 if executable else 0o644)
    return path


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Wait for a condition another process brings about, pacing on an event (no sleep)."""
    pace = threading.Event()
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        pace.wait(0.02)


def gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie left to an init that does not reap counts)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def test_a_boundarys_hooks_run_in_lexical_order_with_the_environment(tmp_path: Path) -> None:
    hooks = tmp_path / "hooks"
    log = tmp_path / "log"
    for name in ("Flash_Enter_20_second", "Flash_Enter_05_first", "Flash_Enter_99"):
        write_hook(hooks, name, f'echo "$(basename "$0") $SHOAL_NODE $(pwd)" >> {log}')
    write_hook(hooks, "Flash_Leave_00_not_now", f"echo leave >> {log}")
    (hooks / "README").write_text("not a hook")
    result = HookRunner(HooksConfig(hooks)).run(Phase.FLASH, When.ENTER, ENV)
    assert result.verdict is Verdict.PASSED and result.ran == 3
    assert log.read_text().splitlines() == [
        f"Flash_Enter_05_first n1 {hooks}",
        f"Flash_Enter_20_second n1 {hooks}",
        f"Flash_Enter_99 n1 {hooks}",
    ]


def test_no_folder_means_every_boundary_passes() -> None:
    result = HookRunner(HooksConfig()).run(Phase.COMMIT, When.ENTER, ENV)
    assert result.verdict is Verdict.PASSED and result.ran == 0


def test_retry_later_names_the_hook_and_the_next_run_starts_there(tmp_path: Path) -> None:
    hooks = tmp_path / "hooks"
    log = tmp_path / "log"
    write_hook(hooks, "Reboot_Enter_10_stop_motor", f"echo stop >> {log}")
    write_hook(
        hooks, "Reboot_Enter_20_battery",
        f"echo battery >> {log}; [ -e {tmp_path}/charged ] && exit 0; echo 'battery at 12 %'; "
        f"exit {RETRY_LATER_EXIT}",
    )  # fmt: skip
    runner = HookRunner(HooksConfig(hooks))
    first = runner.run(Phase.REBOOT, When.ENTER, ENV)
    assert first.verdict is Verdict.RETRY_LATER
    assert (first.hook, first.index) == ("Reboot_Enter_20_battery", 1)
    assert "battery at 12 %" in first.output
    (tmp_path / "charged").touch()
    again = runner.run(Phase.REBOOT, When.ENTER, ENV, start=first.index)
    assert again.verdict is Verdict.PASSED
    assert log.read_text().split() == ["stop", "battery", "battery"]  # the motor hook ran once


def test_a_failing_hook_stops_the_boundary_with_the_tail_of_its_output(tmp_path: Path) -> None:
    hooks = tmp_path / "hooks"
    # 20 KB of noise, then the line that matters: only the tail is kept.
    noisy = "yes noise | head -c 20000; echo; echo 'app not healthy' >&2; exit 3"
    write_hook(hooks, "Commit_Enter_10_check", noisy)
    write_hook(hooks, "Commit_Enter_20_never", f"touch {tmp_path}/ran")
    result = HookRunner(HooksConfig(hooks)).run(Phase.COMMIT, When.ENTER, ENV)
    assert result.verdict is Verdict.FAILED
    assert result.reason.startswith("hook Commit_Enter_10_check failed (exit 3): ")
    assert result.reason.endswith("app not healthy")
    assert len(result.output.encode()) <= OUTPUT_TAIL_BYTES
    assert not (tmp_path / "ran").exists()


def test_a_hook_past_its_time_limit_is_killed_with_its_children(tmp_path: Path) -> None:
    hooks = tmp_path / "hooks"
    write_hook(
        hooks, "Download_Enter_10_hang",
        f"echo waiting; sleep 60 & echo $! > {tmp_path}/child; echo $$ > {tmp_path}/leader; wait",
    )  # fmt: skip
    started = time.monotonic()
    result = HookRunner(HooksConfig(hooks, timeout_s=0.5)).run(Phase.DOWNLOAD, When.ENTER, ENV)
    assert time.monotonic() - started < 10
    assert result.verdict is Verdict.FAILED
    assert result.reason == (
        "hook Download_Enter_10_hang did not finish within 0.5 s and was killed: waiting"
    )
    for pid_file in ("leader", "child"):
        pid = int((tmp_path / pid_file).read_text())
        wait_until(lambda pid=pid: gone(pid), 10, f"the hook's {pid_file} process to end")  # type: ignore[misc]


def test_a_hook_killed_by_a_signal_or_unable_to_start_fails(tmp_path: Path) -> None:
    hooks = tmp_path / "hooks"
    write_hook(hooks, "Flash_Leave_10_suicide", "kill -9 $$")
    run = run_hook(hooks / "Flash_Leave_10_suicide", ENV, 5)
    assert run.exit_code == -9
    bad = hooks / "Flash_Leave_20_no_interpreter"
    bad.write_text("#!/nonexistent/interpreter\n")
    bad.chmod(0o755)
    assert run_hook(bad, ENV, 5).start_error
    result = HookRunner(HooksConfig(hooks)).run(Phase.FLASH, When.LEAVE, ENV)
    assert result.reason == "hook Flash_Leave_10_suicide was killed by signal 9"


@pytest.mark.parametrize(
    ("name", "executable", "message"),
    [
        ("Flash_Enter_battery", True, "hook Flash_Enter_battery is misnamed"),
        ("Flash_Enter_1_battery", True, "misnamed"),
        ("Flash_Enter_10_battery", False, "hook Flash_Enter_10_battery is not an executable file"),
    ],
)
def test_a_file_named_like_a_hook_that_cannot_run_fails_its_boundary(
    tmp_path: Path, name: str, executable: bool, message: str
) -> None:
    hooks = tmp_path / "hooks"
    write_hook(hooks, name, "exit 0", executable=executable)
    with pytest.raises(InvalidInput, match=message):
        find_hooks(hooks, Phase.FLASH, When.ENTER)
    result = HookRunner(HooksConfig(hooks)).run(Phase.FLASH, When.ENTER, ENV)
    assert result.verdict is Verdict.FAILED and message in result.reason
    # Other boundaries are not affected.
    assert (
        HookRunner(HooksConfig(hooks)).run(Phase.FLASH, When.LEAVE, ENV).verdict is Verdict.PASSED
    )


def test_survey_lists_hooks_and_warns_about_foreign_script_names(tmp_path: Path) -> None:
    hooks = tmp_path / "hooks"
    write_hook(hooks, "Flash_Enter_10_ok", "exit 0")
    write_hook(hooks, "ArtifactInstall_Enter_10_mender", "exit 0")
    write_hook(hooks, "Commit_Leave_x", "exit 0")
    found, problems = survey(hooks)
    assert found == ["Flash_Enter_10_ok"]
    assert any("ArtifactInstall_Enter_10_mender is not a Shoal hook name" in p for p in problems)
    assert any("Commit_Leave_x is misnamed" in p for p in problems)


def test_error_hooks_all_run_whatever_they_exit_with(tmp_path: Path) -> None:
    hooks = tmp_path / "hooks"
    log = tmp_path / "log"
    write_hook(hooks, "Flash_Error_10_a", f"echo a >> {log}; exit 7")
    write_hook(hooks, "Flash_Error_20_b", f"echo b >> {log}; exit {RETRY_LATER_EXIT}")
    write_hook(hooks, "Flash_Error_30_c", f"echo c >> {log}")
    assert HookRunner(HooksConfig(hooks)).run_errors(Phase.FLASH, ENV) == 3
    assert log.read_text().split() == ["a", "b", "c"]
