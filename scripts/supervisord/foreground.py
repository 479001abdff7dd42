"""Run a command as the terminal's foreground process group, then give the terminal back.

`make run` ends in `foreground.py supervisord -n -c …`. A Ctrl-C in a terminal is
sent to the foreground process group, which is make's: make then dies of the
signal (GNU make re-raises SIGINT after its children stop, exit status 130)
however cleanly the stack stopped. Here the command gets a process group of its
own and the terminal (tcsetpgrp, as a shell's job control does), so Ctrl-C
reaches supervisord alone; it stops every process and exits 0, and so does make.
Without a controlling terminal (CI, nohup) the command is simply exec'd.

Usage: python foreground.py COMMAND [ARG ...]; exits with the command's status.
"""

import os
import signal
import sys


def main(argv: list[str]) -> int:
    try:
        tty = os.open("/dev/tty", os.O_RDWR)
        home_group = os.tcgetpgrp(tty)
    except OSError:
        os.execvp(argv[0], argv)  # noqa: S606 (the command line is make's own)
    if home_group != os.getpgrp():  # make runs in the background already: leave the terminal alone
        os.close(tty)
        os.execvp(argv[0], argv)  # noqa: S606 (the command line is make's own)
    pid = os.fork()
    if pid == 0:
        os.setpgid(0, 0)
        os.execvp(argv[0], argv)  # noqa: S606 (the command line is make's own)
    os.setpgid(pid, pid)  # both sides set it: whichever runs first, the group exists before tcsetpgrp
    # A background process that changes the terminal's foreground group gets SIGTTOU.
    signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    os.tcsetpgrp(tty, pid)
    try:
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
    finally:
        os.tcsetpgrp(tty, home_group)
        os.close(tty)
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
