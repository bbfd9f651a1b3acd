"""`distlens <command> [arguments]`: the console entry point (`distlens lens ...`, `distlens view <store>`)."""

from __future__ import annotations

import runpy
import sys

COMMANDS = {
    "lens": "pipelines.lens",
    "steer": "pipelines.steer",
    "demo": "pipelines.demo",
    "verify": "pipelines.verify",
    "report": "pipelines.report",
    "tune": "pipelines.tune",
    "view": "pipelines.view",
    "serve": "pipelines.serve",
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(f"usage: distlens {{{','.join(COMMANDS)}}} [hydra overrides]", file=sys.stderr)
        sys.exit(2)
    module = COMMANDS[sys.argv.pop(1)]
    sys.argv[0] = module
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
