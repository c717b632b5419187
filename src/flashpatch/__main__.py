"""`python -m flashpatch doctor [options]`."""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "doctor":
        print("usage: python -m flashpatch doctor [--help]", file=sys.stderr)
        return 2
    from flashpatch import doctor

    return doctor.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
