"""Regenerate the coverage table in README.md (between <!-- coverage:start --> and <!-- coverage:end -->).

    python scripts/update_coverage.py           # rewrite README.md
    python scripts/update_coverage.py --check   # exit 1 when README.md is stale (writes nothing)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


from psu_export.coverage import README, write_readme


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report whether README.md is stale (exit 1 when it is)")
    parser.add_argument("--readme", type=Path, default=README, help="the README to update (default: the repository's)")
    args = parser.parse_args(argv)
    changed = write_readme(args.readme, check=args.check)
    if args.check:
        print(f"{args.readme}: coverage table is {'stale (run scripts/update_coverage.py)' if changed else 'current'}")
        return 1 if changed else 0
    print(f"{args.readme}: coverage table {'updated' if changed else 'already current'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
