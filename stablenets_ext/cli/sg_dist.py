"""``torchrun --nproc-per-node M -m stablenets_ext.cli.sg_dist [stablenets train options]``:
the ``stablenets train`` command line with ``--trainer sg --backend dist`` implied, one
synthetic-gradient stage per rank; rank 0 prints (``--json``: one line).

The entry point lives here, beside the command line it runs, so that the trainer
(:mod:`stablenets_ext.training.sg.dist`) never imports the CLI."""

from __future__ import annotations

import os
import sys

from ..training.runtime import torchrun

USAGE = ("run me under torchrun, e.g. `torchrun --nproc-per-node 2 -m stablenets_ext.cli.sg_dist "
         "--dataset digits --json`")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not torchrun.under_torchrun():
        print(f"stablenets_ext.cli.sg_dist: {USAGE}", file=sys.stderr)
        return 2
    torchrun.rank_setup()
    from . import main as cli_main

    if int(os.environ["RANK"]) != 0:
        sys.stdout = open(os.devnull, "w")
    return cli_main(["train", "--trainer", "sg", "--backend", "dist", *argv])


if __name__ == "__main__":
    code = main()
    if torchrun.under_torchrun():
        torchrun.exit_rank(code)
    sys.exit(code)
