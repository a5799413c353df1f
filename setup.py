"""Only for the C extensions; everything else is in pyproject.toml.

`tether._linux` makes the Linux system calls the os module lacks (mount, openat2,
inotify...; tether/system.py is its one caller). It is required: the agent cannot set up
a machine without it, and python-prctl already needs the same compiler and headers.

`extraconfig.backdoor._portio` does the VMware backdoor's port I/O. It is optional: where
it cannot be built (no compiler, no Python headers, not x86-64 Linux) the install still
succeeds and the agent uses another guestinfo transport.
"""

import platform
import sys

from setuptools import Extension, setup

ext_modules = [Extension("tether._linux", sources=["tether/_linux.c"])]
if sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64"):
    ext_modules.append(Extension(
        "extraconfig.backdoor._portio",
        sources=["extraconfig/backdoor/_portio.c"],
        optional=True,
    ))

setup(ext_modules=ext_modules)
