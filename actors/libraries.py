"""Process start-up: torch, DeepSpeed and transformers' modeling code imported once with Python's
cyclic garbage collector paused, then every object they made moved out of its reach (`gc.freeze`).

A stage actor or a compute driver holds about a million long-lived objects once these are in.
Each full collection during their import walked all of them: about a fifth of the ~4.5
CPU-seconds these imports take (measured on this project's 2-core CPU machine), paid by every
stage actor and driver process; and each full collection later walks them again, in the middle
of a decode loop. Serving engines (vLLM among them) freeze their start-up objects for the same
reason. Importing this module does it, so it goes first, before anything imports torch: in
actors/stage.py (every stage process, and the drivers that import it) and pipelines/session.py
(every compute driver)."""

from __future__ import annotations

import gc


def load() -> None:
    """Import the heavy libraries with the collector paused, then freeze what they made; the
    collector is left as it was found (on, normally). Called once, below: a module's body runs
    once a process."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        import deepspeed  # noqa: F401
        import torch  # noqa: F401
        import transformers.masking_utils  # noqa: F401  (torch's compiler stack, which it pulls in)
        import transformers.modeling_utils  # noqa: F401
        from transformers import AutoConfig  # noqa: F401
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()


load()
