"""Small helpers for work shared between the processes of a run."""

from __future__ import annotations

from typing import Any, Callable, TypeVar

T = TypeVar("T")


def main_process_first(accelerator: Any, work: Callable[[], T], shared_files: bool = True) -> T:
    """Run ``work`` on the main process first, then on the others once it is done.

    For caches written to disk: the main process writes the files, the others wait for it and then
    find them valid instead of writing them too. Without ``shared_files`` (an in-memory cache) or
    with one process, every process runs ``work`` at once.
    """
    if not shared_files or accelerator.num_processes <= 1:
        return work()
    if accelerator.is_main_process:
        result = work()
        accelerator.wait_for_everyone()
        return result
    accelerator.wait_for_everyone()
    return work()
