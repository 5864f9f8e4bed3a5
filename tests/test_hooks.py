"""State hooks as processes: order, exit codes, output tails, time limits, naming mistakes.

Every hook here is a real executable the test writes into a temporary hooks
folder; the agent-level behaviour (deferral, caps, reports) is in
``tests/test_gateway_agent.py``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import gateway_proxy.hooks as hooks_module
from gateway_proxy.agent import GatewayAgent
from gateway_proxy.config import GatewayConfig
from gateway_proxy.drivers import Phase, When
from gateway_proxy.hooks import (
    OUTPUT_DRAIN_S,
    OUTPUT_TAIL_BYTES,
    RETRY_LATER_EXIT,
    BoundaryResult,
    HookRunner,
    HooksConfig,
    Verdict,
    find_hooks,
    run_hook,
    survey,
)
from otaproto.errors import InvalidInput
from tests.hook_fixtures import write_hook
from tests.node_fixtures import TRUST

ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "SHOAL_NODE": "n1"}


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


def count_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def dead(pid: int) -> bool:
    """True once ``pid`` no longer runs: no such process, or a zombie nobody reaps yet."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return gone(pid)


def read_pid(path: Path) -> int | None:
    """The pid a hook wrote to ``path`` (via a rename, so never half written), once it did."""
    try:
        return int(path.read_text())
    except FileNotFoundError:
        return None


def kill_leftovers(*pid_files: Path) -> None:
    """Test cleanup: SIGKILL, by pid, whatever a hook of a failing test left running."""
    for pid_file in pid_files:
        pid = read_pid(pid_file)
        if pid is not None and not dead(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("pidfd", [True, False], ids=["pidfd", "polling"])
def test_a_hook_that_leaves_a_child_behind_ends_at_once_and_so_does_the_child(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pidfd: bool
) -> None:
    if not pidfd:  # kernels before 5.3: the runner looks every EXIT_POLL_S instead
        monkeypatch.setattr(hooks_module, "_pidfd", lambda pid: None)
    hooks = tmp_path / "hooks"
    child = tmp_path / "child"
    path = write_hook(
        hooks, "Flash_Enter_10_background",
        f"echo starting; sleep 60 & echo $! > {child}.new; mv {child}.new {child}; echo done",
    )  # fmt: skip
    fds, threads = count_fds(), set(threading.enumerate())
    try:
        for _ in range(4):
            started = time.monotonic()
            run = run_hook(path, ENV, 10)
            assert time.monotonic() - started < OUTPUT_DRAIN_S / 2
            assert (run.exit_code, run.output) == (0, "starting\ndone\n")
            pid = read_pid(child)
            assert pid is not None
            wait_until(lambda pid=pid: dead(pid), 5, "the hook's background child to end")  # type: ignore[misc]
            child.unlink()
        assert count_fds() == fds
        assert set(threading.enumerate()) == threads
    finally:
        kill_leftovers(child)


def test_a_daemon_that_left_the_group_survives_and_costs_at_most_the_drain_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hooks_module, "OUTPUT_DRAIN_S", 0.3)
    hooks = tmp_path / "hooks"
    daemon = tmp_path / "daemon"
    # setsid: out of the hook's group, but still holding the output pipe.
    path = write_hook(
        hooks, "Commit_Leave_10_daemon",
        f"setsid sleep 60 & echo $! > {daemon}.new; mv {daemon}.new {daemon}; echo left",
    )  # fmt: skip
    fds, threads = count_fds(), set(threading.enumerate())
    try:
        started = time.monotonic()
        run = run_hook(path, ENV, 10)
        assert 0.3 <= time.monotonic() - started < 5
        assert (run.exit_code, run.output) == (0, "left\n")
        pid = read_pid(daemon)
        assert pid is not None and not dead(pid)
        assert count_fds() == fds
        assert set(threading.enumerate()) == threads
    finally:
        kill_leftovers(daemon)


def run_in_thread(
    runner: HookRunner, phase: Phase, when: When
) -> tuple[threading.Event, list[BoundaryResult]]:
    """Run a boundary in a worker thread, as the agent does; the event is set when it returned."""
    done = threading.Event()
    results: list[BoundaryResult] = []

    def work() -> None:
        try:
            results.append(runner.run(phase, when, ENV))
        finally:
            done.set()

    threading.Thread(target=work, name="test-hook-worker", daemon=True).start()
    return done, results


SLOW_HOOK = (
    "{trap}echo $$ > {dir}/leader.new; mv {dir}/leader.new {dir}/leader; echo run >> {dir}/log; "
    "sleep 60 & echo $! > {dir}/child.new; mv {dir}/child.new {dir}/child; echo started; wait"
)


@pytest.mark.parametrize("ignores_sigterm", [False, True])
def test_closing_the_runner_ends_a_hook_still_running_and_refuses_new_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ignores_sigterm: bool
) -> None:
    monkeypatch.setattr(hooks_module, "KILL_GRACE_S", 0.3)
    hooks = tmp_path / "hooks"
    trap = "trap '' TERM; " if ignores_sigterm else ""
    write_hook(hooks, "Commit_Enter_10_slow", SLOW_HOOK.format(trap=trap, dir=tmp_path))
    runner = HookRunner(HooksConfig(hooks, timeout_s=60))
    try:
        done, results = run_in_thread(runner, Phase.COMMIT, When.ENTER)
        wait_until(lambda: (tmp_path / "child").exists(), 10, "the hook to start its child")
        runner.close()
        assert done.wait(10), "the boundary did not return after close()"
        [result] = results
        assert result.verdict is Verdict.STOPPED
        assert (result.hook, result.index) == ("Commit_Enter_10_slow", 0)
        assert result.reason == (
            "hook Commit_Enter_10_slow was stopped: the gateway is closing: started"
        )
        for name in ("leader", "child"):
            pid = read_pid(tmp_path / name)
            assert pid is not None
            wait_until(lambda pid=pid: dead(pid), 10, f"the hook's {name} to end")  # type: ignore[misc]
        # After close nothing starts: the boundary runs again when the gateway does.
        again = runner.run(Phase.COMMIT, When.ENTER, ENV)
        assert (again.verdict, again.ran) == (Verdict.STOPPED, 0)
        assert runner.run_errors(Phase.COMMIT, ENV) == 0
        assert (tmp_path / "log").read_text() == "run\n"
    finally:
        kill_leftovers(tmp_path / "leader", tmp_path / "child")


def test_closing_the_gateway_agent_ends_its_running_hooks(tmp_path: Path) -> None:
    hooks = tmp_path / "hooks"
    write_hook(hooks, "Reboot_Enter_10_slow", SLOW_HOOK.format(trap="", dir=tmp_path))
    config = GatewayConfig(
        gateway_id="gw1", data_dir=tmp_path / "gw", trust=(), mqtt_host="-", mqtt_port=1,
        password="-", nodes=(), hooks=HooksConfig(hooks, timeout_s=60),
    )  # fmt: skip
    agent = GatewayAgent(config, TRUST)
    try:
        done, results = run_in_thread(agent._hooks, Phase.REBOOT, When.ENTER)
        wait_until(lambda: (tmp_path / "child").exists(), 10, "the hook to start its child")
        agent.close()
        assert done.wait(10), "the boundary did not return after the agent closed"
        assert results[0].verdict is Verdict.STOPPED
        for name in ("leader", "child"):
            pid = read_pid(tmp_path / name)
            assert pid is not None
            wait_until(lambda pid=pid: dead(pid), 10, f"the hook's {name} to end")  # type: ignore[misc]
    finally:
        kill_leftovers(tmp_path / "leader", tmp_path / "child")
