"""``python -m stablenets_ext``: the ``stablenets`` command line."""

import sys

from .cli import main

if __name__ == "__main__":
    code = main()
    from .training.runtime import torchrun

    if torchrun.under_torchrun():  # a rank: leave without the interpreter's shutdown
        torchrun.exit_rank(code)
    sys.exit(code)
