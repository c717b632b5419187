"""`python -m flashpatch.bench`: see flashpatch.bench.cli."""

from flashpatch.bench.cli import main

raise SystemExit(main())
