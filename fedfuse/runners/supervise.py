"""A tiny supervisor that leaves no orphans: ``python supervise.py [--remove PATH]... -- CMD [ARG]...``.

It runs ``CMD`` and ends ``CMD`` and **every process ``CMD`` started** when the process that started the
supervisor ends — however it ends, ``kill -9`` included — or on SIGTERM/SIGINT/SIGHUP, and then deletes the
``--remove`` paths; when ``CMD`` exits by itself it ends what ``CMD`` left running and keeps the paths (the parent
is alive and reads them). It exits with ``CMD``'s code (128 + N for a signal N).

Why this design (Linux, where the guarantee holds):

* **Death notice that no signal can skip**: the parent holds the write end of the supervisor's stdin and
  never hands it on; the kernel closes it when the parent dies, so EOF on stdin means "parent gone (or it asked
  us to stop)". ``PR_SET_PDEATHSIG`` alone is weaker: it fires when the parent *thread* that forked exits, is
  lost across a double fork or ``setsid``, and Flower's SuperLink hangs on its first SIGTERM.
* **No descendant escapes**: the supervisor is a child subreaper (``prctl(PR_SET_CHILD_SUBREAPER)``, Linux 3.4+),
  so a process whose parent dies is reparented to it, not to init — also processes that start their own
  session (``flower-superexec`` calls ``setsid``; Ray's ``gcs_server``, ``raylet`` and workers are its
  grandchildren). Walking ``/proc`` from the supervisor's pid therefore finds all of them; process groups would
  not (they are left by ``setsid``), and cgroups need privileges.
* **Bounded**: SIGTERM once to every descendant, SIGKILL after ``GRACE`` seconds to whatever is left, repeated
  until nothing is left (also what was forked meanwhile). A parent that writes ``quick`` before closing says that
  nothing still running holds a result (a finished run whose simulation engine is still shutting Ray down, which
  ignores SIGTERM for seconds): the grace is then ``QUICK_GRACE``.

Elsewhere (no ``/proc``, no subreaper) it falls back to killing ``CMD``'s process group.
Standard library only, and run as a script (not ``-m``): it starts in ~50 ms without importing fedfuse/torch.
"""

from __future__ import annotations

import ctypes
import os
import select
import shutil
import signal
import subprocess
import sys
import time

GRACE = 2.0  # seconds between SIGTERM and SIGKILL
QUICK_GRACE = 0.3  # the same when the parent writes QUICK before closing: nothing still running holds a result
QUICK = b"quick"
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36
LINUX = sys.platform.startswith("linux")


def _prctl(option: int, value: int) -> bool:
    if not LINUX:
        return False
    try:
        return int(ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def descendants(root: int) -> list[int]:
    """Live (non-zombie) descendants of ``root``, from ``/proc/<pid>/stat`` (parent pid and state)."""
    children: dict[int, list[int]] = {}
    zombies: set[int] = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
        except OSError:  # gone meanwhile
            continue
        pid = int(entry.name)
        children.setdefault(int(fields[1]), []).append(pid)
        if fields[0] in (b"Z", b"X"):
            zombies.add(pid)
    found, todo = [], [root]
    while todo:
        for pid in children.get(todo.pop(), []):
            todo.append(pid)
            if pid not in zombies:
                found.append(pid)
    return found


class Supervisor:
    def __init__(self, cmd: list[str]) -> None:
        self.subreaper = _prctl(PR_SET_CHILD_SUBREAPER, 1) and os.path.isdir("/proc")
        self.child = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            start_new_session=not self.subreaper,  # the fallback kills this group
            # backup for a supervisor killed itself (single-threaded here, so the thread caveat does not apply)
            preexec_fn=(lambda: _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)) if LINUX else None,
        )
        self.code: int | None = None

    def poll(self) -> int | None:
        """``CMD``'s exit code once it has ended; reaps every other (orphaned) child that has ended."""
        if self.code is None and self.child.poll() is not None:
            self.code = self.child.returncode
        while self.subreaper:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid == self.child.pid and self.code is None:
                self.code = os.waitstatus_to_exitcode(status)
                self.child.returncode = self.code
        return self.code

    def end_all(self, grace: float = GRACE) -> None:
        """SIGTERM every descendant once, SIGKILL what is left after ``grace`` s, until none is left."""
        deadline = time.monotonic() + grace
        termed: set[int] = set()
        while True:
            self.poll()
            if self.subreaper:
                alive = descendants(os.getpid())
            else:
                alive = [self.child.pid] if self.child.poll() is None else []
            if not alive:
                return
            late = time.monotonic() > deadline
            for pid in alive:
                if late or pid not in termed:
                    try:
                        if self.subreaper:
                            os.kill(pid, signal.SIGKILL if late else signal.SIGTERM)
                        else:
                            os.killpg(pid, signal.SIGKILL if late else signal.SIGTERM)
                    except (ProcessLookupError, PermissionError):
                        pass
                    termed.add(pid)
            time.sleep(0.05)


def main(argv: list[str]) -> int:
    remove: list[str] = []
    while argv and argv[0] != "--":
        opt = argv.pop(0)
        if not opt.startswith("--remove="):
            print(f"supervise: unknown option {opt!r}; allowed: --remove=PATH ... -- CMD", file=sys.stderr)
            return 2
        remove.append(opt.split("=", 1)[1])
    cmd = argv[1:]
    if not cmd:
        print("supervise: no command after --", file=sys.stderr)
        return 2
    stop: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: stop.append(signum))
    sup = Supervisor(cmd)
    asked, grace, said = False, GRACE, b""
    try:
        while not stop and sup.poll() is None:
            ready, _, _ = select.select([0], [], [], 0.2)
            if ready:
                data = os.read(0, 4096)
                said += data
                if not data:  # EOF: the parent is gone or asks us to stop
                    break
        asked = sup.poll() is None  # else CMD ended by itself: the parent lives on and reads what it left
        grace = QUICK_GRACE if QUICK in said else GRACE
    finally:
        sup.end_all(grace)
        if asked or stop:
            for path in remove:
                shutil.rmtree(path, ignore_errors=True)
    code = sup.poll()
    code = -1 if code is None else code
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
