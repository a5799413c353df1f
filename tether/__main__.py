import sys

from tether import boottime

boottime.mark("python")     # the interpreter's start, up to tether's first line

from tether.cli import main  # noqa: E402

sys.exit(main())
