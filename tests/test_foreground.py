"""scripts/supervisord/foreground.py: every stop signal becomes one SIGTERM to the command, which ends it cleanly.

Without a terminal (as here and in CI) it still runs the command in a process group
of its own and relays its output; with one, it also takes the terminal (checked by
hand: Ctrl-C and a closed tmux window stop `make run` with status 0, nothing left).
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from testing import BASE_DIR, wait_for

# Says when it is ready, exits 0 on SIGTERM, and says so if any other stop signal reaches it.
COMMAND = [
    "sh", "-c",
    'trap "echo got-term; exit 0" TERM; trap "echo got-other" INT HUP QUIT; echo ready; while :; do sleep 0.1; done',
]  # fmt: skip


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT])
def test_a_stop_signal_becomes_one_sigterm_and_the_exit_status_is_the_commands(signum, tmp_path):
    out = tmp_path / "out.log"
    with out.open("wb") as stdout:
        process = subprocess.Popen(
            [sys.executable, "scripts/supervisord/foreground.py", *COMMAND],
            cwd=BASE_DIR, stdout=stdout, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            wait_for(lambda: "ready" in out.read_text(), timeout=10, what="the command to start")
            process.send_signal(signum)
            assert process.wait(timeout=10) == 0
        finally:
            if process.poll() is None:
                process.kill()
    assert out.read_text().split() == ["ready", "got-term"]


def test_the_command_does_not_get_the_signals_sent_to_the_group_it_was_started_in(tmp_path):
    """A terminal's Ctrl-C goes to make's process group: the command must hear only the one SIGTERM."""
    out = tmp_path / "out.log"
    with out.open("wb") as stdout:
        process = subprocess.Popen(
            [sys.executable, "scripts/supervisord/foreground.py", *COMMAND],
            cwd=BASE_DIR, stdout=stdout, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            wait_for(lambda: "ready" in out.read_text(), timeout=10, what="the command to start")
            os.killpg(process.pid, signal.SIGINT)  # the group foreground.py started in
            assert process.wait(timeout=10) == 0
            time.sleep(0.2)
        finally:
            if process.poll() is None:
                process.kill()
    assert out.read_text().split() == ["ready", "got-term"]
