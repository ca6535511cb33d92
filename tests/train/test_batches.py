"""The data path: batches drawn one ahead on a worker thread, the data position always that of the next batch."""

from __future__ import annotations

import threading

import torch

from scratchlab.train.batches import BatchPrefetcher


def draws(generator: torch.Generator, threads: list | None = None) -> dict[str, torch.Tensor]:
    if threads is not None:
        threads.append(threading.current_thread())
    return {"x": torch.randint(0, 1000, (3,), generator=generator)}


def test_the_position_is_the_next_batch_and_batches_equal_drawing_in_the_foreground():
    position = torch.Generator().manual_seed(7)
    reference = torch.Generator().manual_seed(7)
    threads: list = []
    prefetcher = BatchPrefetcher(lambda g: draws(g, threads), position)
    try:
        for _ in range(4):
            got = prefetcher.next()
            assert torch.equal(got["x"], draws(reference)["x"])
            # What a checkpoint saves now: the state the next consumed batch starts from, not the prefetched one's end.
            assert torch.equal(position.get_state(), reference.get_state())
    finally:
        prefetcher.close()
    assert threads[0] is threading.main_thread()  # the first batch: nothing was prefetched yet
    assert all(t is not threading.main_thread() for t in threads[1:])  # then each is drawn ahead on the worker


def test_a_prefetched_batch_from_a_stale_position_is_redrawn():
    position = torch.Generator().manual_seed(3)
    prefetcher = BatchPrefetcher(draws, position)
    try:
        start = position.get_state()
        first = prefetcher.next()
        position.set_state(start)  # e.g. the eager retry of a failed compile, or a resume
        again = prefetcher.next()
        assert torch.equal(first["x"], again["x"])
        restart = torch.Generator().manual_seed(99)
        position.set_state(restart.get_state())
        assert torch.equal(prefetcher.next()["x"], draws(restart)["x"])
        assert torch.equal(position.get_state(), restart.get_state())
    finally:
        prefetcher.close()
