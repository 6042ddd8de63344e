"""What a run of the engine leaves for the garbage collector: frames of the venue code and key objects kept in
reference cycles (a failure's frames hold the keys in their locals until a collection)."""

from __future__ import annotations

import gc
import os
from collections.abc import Awaitable, Callable
from types import FrameType

import venues

CODE_DIR = (
    os.path.dirname(venues.__file__) + os.sep
)  # the probes, the key managers and the in-process simulator


async def left_for_the_collector(
    run: Callable[[], Awaitable[None]], key_types: tuple[type, ...]
) -> tuple[set[str], set[str]]:
    """Run ``run`` with every collection saving its garbage, collect, and name what was in cycles: the venue
    code's frames (function and file) and the objects of ``key_types``."""
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        await run()
        gc.collect()
        left = list(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    frames = {
        f"{o.f_code.co_qualname} ({os.path.basename(o.f_code.co_filename)})"
        for o in left
        if isinstance(o, FrameType) and o.f_code.co_filename.startswith(CODE_DIR)
    }
    return frames, {type(o).__qualname__ for o in left if isinstance(o, key_types)}
