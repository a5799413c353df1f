"""A container process racing the agent: chrooted into a root as an unprivileged user, it
exchanges two entries (a directory and a symlink, a file and a FIFO) with
renameat2(RENAME_EXCHANGE) in a loop until it is killed (by its PID)."""
from __future__ import annotations

import subprocess
import sys

USER = 1234

SCRIPT = r"""
import ctypes, os, sys
root, uid, first, second = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
libc = ctypes.CDLL(None, use_errno=True)
os.chroot(root)
os.chdir("/")
os.setgroups([])
os.setgid(uid)
os.setuid(uid)
a, b = first.encode(), second.encode()
exchange = libc.renameat2
if exchange(-100, a, -100, b, 2) != 0:          # AT_FDCWD, RENAME_EXCHANGE
    sys.exit(f"renameat2: {os.strerror(ctypes.get_errno())}")
print("swapping", flush=True)
while True:
    exchange(-100, a, -100, b, 2)
"""


class Swapper:
    def __init__(self, root, first: str, second: str, uid: int = USER):
        self.proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(root), str(uid),
                                      first, second], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if line.strip() != "swapping":
            self.stop()
            raise AssertionError(f"the swapper did not start: {self.proc.stderr.read()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.proc.stdout.close()
        self.proc.stderr.close()
