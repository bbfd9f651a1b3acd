"""`distlens verify <lens.zarr>` (`python -m pipelines.verify <store>`): check a store and exit
non-zero, naming each problem, if it is not whole."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from actors.store import LensStore, StoreError

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: distlens verify <path/to/lens.zarr>", file=sys.stderr)
        return 2
    try:
        problems = LensStore.open(args[0]).verify()
    except StoreError as err:
        problems = [str(err)]
    for problem in problems:
        print(f"distlens verify: {args[0]}: {problem}", file=sys.stderr)
    if not problems:
        print(f"{args[0]}: ok")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
