"""The ``ckptvc`` command installed by the wheel: the same command line as
the Rust binary, run in-process by the native module."""

import sys

from ._ckptvc import run_cli


def main() -> None:
    sys.exit(run_cli(["ckptvc", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
