"""Run supervisord for `make run`: Ctrl-C, a closed terminal or kill stop it cleanly, and make exits 0.

`make run` ends in `foreground.py supervisord -n -c …`. Two things go wrong
without it. A Ctrl-C in a terminal is sent to the foreground process group,
which is make's: GNU make then dies of the signal (it re-raises SIGINT once its
children stop, exit status 130) however cleanly the stack stopped. And a
closed terminal sends SIGHUP, which supervisord takes as "reload": every
process restarts and nothing stops.

So supervisord runs in a process group of its own, which no terminal signal
reaches, and this process takes the terminal (tcsetpgrp, as a shell's job
control does) in a group of its own too: SIGINT, SIGTERM, SIGHUP and SIGQUIT
reach it alone, and each becomes one SIGTERM to supervisord, which stops every
process and exits 0. The terminal goes back to make's group before this exits.
Without a controlling terminal (CI, nohup) the signals still become SIGTERM.

Usage: python foreground.py COMMAND [ARG ...]; exits with the command's status.
"""

import os
import signal
import sys

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def take_terminal() -> tuple[int, int] | None:
    """Make this process's own group the terminal's foreground; (tty fd, the group to give it back to)."""
    try:
        tty = os.open("/dev/tty", os.O_RDWR)
        home_group = os.tcgetpgrp(tty)
    except OSError:
        return None  # no controlling terminal
    if home_group != os.getpgrp():  # started in the background: leave the terminal alone
        os.close(tty)
        return None
    os.setpgid(0, 0)
    # A process that is not in the foreground group gets SIGTTOU when it changes it.
    signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    os.tcsetpgrp(tty, os.getpgrp())
    return tty, home_group


def main(argv: list[str]) -> int:
    child = os.fork()
    if child == 0:
        os.setpgid(0, 0)
        os.execvp(argv[0], argv)  # noqa: S606 (the command line is make's own)
    os.setpgid(child, child)  # both sides set it: the group exists whichever runs first
    terminal = take_terminal()

    def stop(signum, frame):
        os.kill(child, signal.SIGTERM)

    for signum in STOP_SIGNALS:
        signal.signal(signum, stop)
    try:
        _, status = os.waitpid(child, 0)  # retried across the handled signals (PEP 475)
    finally:
        if terminal is not None:
            tty, home_group = terminal
            os.tcsetpgrp(tty, home_group)
            os.close(tty)
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
