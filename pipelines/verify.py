"""`distlens verify <lens.zarr> [...]` (`python -m pipelines.verify <store> ...`): check stores
and exit non-zero, naming each problem, if any is not whole."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from actors.store import LensStore, StoreError

    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: distlens verify <path/to/lens.zarr> [more stores ...]", file=sys.stderr)
        return 2
    failed = 0
    for path in args:
        try:
            problems = LensStore.open(path).verify()
        except StoreError as err:
            problems = [str(err)]
        for problem in problems:
            print(f"distlens verify: {path}: {problem}", file=sys.stderr)
        if not problems:
            print(f"{path}: ok")
        failed += bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
