"""Run supervisord for `make run`: Ctrl-C, a closed terminal or kill stop it cleanly, and make exits 0.

`make run` ends in `foreground.py supervisord -n -c …`. Three things go wrong
without it. A Ctrl-C in a terminal is sent to the foreground process group,
which is make's: GNU make then dies of the signal (it re-raises SIGINT once its
children stop, exit status 130) however cleanly the stack stopped. A closed
terminal sends SIGHUP, which supervisord takes as "reload": every process
restarts and nothing stops. And once the terminal is gone, supervisord's next
write to it fails (EIO) and it exits at once without stopping its processes,
which run on with nobody to stop them.

So supervisord runs in a process group of its own, which no terminal signal
reaches, and writes into a pipe that this process copies to the terminal for
as long as there is one (and drains after). This process takes the terminal
(tcsetpgrp, as a shell's job control does) in a group of its own too: SIGINT,
SIGTERM, SIGHUP and SIGQUIT reach it alone, and each becomes one SIGTERM to
supervisord, which stops every process and exits 0. The terminal goes back to
make's group before this exits. Without a controlling terminal (CI, nohup)
the signals still become SIGTERM.

Usage: python foreground.py COMMAND [ARG ...]; exits with the command's status.
"""

import contextlib
import os
import signal
import sys
import threading

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


def relay(source: int, target: int) -> None:
    """Copy `source` to `target` until end of file; once `target` fails (the terminal closed), only drain."""
    writable = True
    while chunk := os.read(source, 65536):
        if writable:
            try:
                os.write(target, chunk)
            except OSError:
                writable = False


def main(argv: list[str]) -> int:
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        os.setpgid(0, 0)
        os.dup2(write_end, 1)
        os.dup2(write_end, 2)
        os.close(read_end)
        os.close(write_end)
        os.execvp(argv[0], argv)  # noqa: S606 (the command line is make's own)
    os.setpgid(child, child)  # both sides set it: the group exists whichever runs first
    os.close(write_end)
    copier = threading.Thread(target=relay, args=(read_end, sys.stdout.fileno()), daemon=True)
    copier.start()
    terminal = take_terminal()

    def stop(signum, frame):
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGTERM)

    for signum in STOP_SIGNALS:
        signal.signal(signum, stop)
    try:
        _, status = os.waitpid(child, 0)  # retried across the handled signals (PEP 475)
        copier.join(timeout=5)  # the last lines, unless a process outlived it holding the pipe
    finally:
        if terminal is not None:
            tty, home_group = terminal
            with contextlib.suppress(OSError):  # the terminal may be gone
                os.tcsetpgrp(tty, home_group)
            os.close(tty)
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
