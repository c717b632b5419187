"""`python -m flashpatch doctor|bench|tune [options]`, `python -m flashpatch --version`."""

from __future__ import annotations

import sys

USAGE = """usage: python -m flashpatch COMMAND [options]

commands:
  doctor   what is installed, what would be patched, which backend `auto` picks for a shape, and why
  bench    benchmark every backend against openpi's einsum (the same as python -m flashpatch.bench)
  tune     time every backend at your model's attention shapes on this GPU; auto then follows your measurement

python -m flashpatch COMMAND --help shows a command's options;
python -m flashpatch --version prints flashpatch's version."""


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from flashpatch import __version__

        print(f"flashpatch {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command == "doctor":
        from flashpatch.tools import doctor

        return doctor.main(rest)
    if command == "bench":
        from flashpatch.bench.cli import main as bench

        return bench(rest)
    if command == "tune":
        from flashpatch.bench import tune

        return tune.main(rest)
    message = f"unknown command {command!r}; the commands are doctor, bench and tune (or --version, --help)"
    print(f"python -m flashpatch: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
