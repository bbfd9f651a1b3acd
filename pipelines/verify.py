"""`distlens verify <lens.zarr> [...]` (`python -m pipelines.verify <store> ...`): check stores
and exit non-zero, naming each problem, if any is not whole. Each store is read one shard at a
time (bounded memory, whatever its rows); a whole one is reported `ok`, then what it costs
(bytes, objects, bytes per (row, layer, position) cell) on a second line."""

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
        store = None
        try:
            store = LensStore.open(path)
            problems = store.verify()
        except StoreError as err:
            problems = [str(err)]
        for problem in problems:
            print(f"distlens verify: {path}: {problem}", file=sys.stderr)
        if not problems:
            print(f"{path}: ok")
            print(size_line(path, store.size()))
        failed += bool(problems)
    return 1 if failed else 0


def size_line(path, size: dict) -> str:
    """What a store's rows cost (actors/store.py LensStore.size), in one line."""
    return (
        f"{path}: {size['bytes']} bytes in {size['objects']} objects; {size['cells']} (row, layer, position) "
        f"cells with a lens, {size['bytes_per_cell']} bytes per cell ({size['padded_cells']} cells padded)"
    )


if __name__ == "__main__":
    sys.exit(main())
