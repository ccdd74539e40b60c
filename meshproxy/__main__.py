"""``python -m meshproxy`` and the ``meshproxy`` console script: delegate to :mod:`meshproxy.cli`.

Theory of operation: this module only turns :func:`meshproxy.cli.main`'s return value into the
process exit code; all parsing and dispatch live in ``cli`` so tests can call it in-process.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from meshproxy.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
