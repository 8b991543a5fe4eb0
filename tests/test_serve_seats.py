"""The server's seat choice (serve_batch.BatchLoop._best_seat) on its own:
a prompt-cache hit first; otherwise, without a unified cache, a seat next to
the busy ones, since llama.cpp puts only consecutive sequence ids in one
ubatch (each run of them is a pass over the streamed weights per step)."""

from types import MethodType, SimpleNamespace

from gguf_stream.serve_batch import BatchLoop


def loop(n_seats=4, unified=False, kept=None):
    ns = SimpleNamespace(n_seats=n_seats, unified=unified, _kept=kept or {})
    ns._runs_with = MethodType(BatchLoop._runs_with, ns)
    return ns


def best(ns, prompt, free):
    return BatchLoop._best_seat(ns, prompt, free)


def test_an_empty_seat_next_to_the_busy_one():
    # seat 2 busy: seat 0 would make two runs (0 | 2), 1 or 3 one
    assert best(loop(), [1, 2, 3], [0, 1, 3]) == (1, 0)
    assert best(loop(), [1, 2, 3], [0, 3]) == (0, 0)     # busy 1, 2: either end extends the run
    assert loop()._runs_with(0, [0, 1, 3]) == 2 and loop()._runs_with(3, [0, 1, 3]) == 1


def test_with_a_unified_cache_the_lowest_empty_seat():
    assert best(loop(unified=True), [1, 2, 3], [0, 1, 3]) == (0, 0)


def test_a_kept_seat_next_to_the_busy_ones_before_an_older_one():
    # no empty seat: both free seats keep cells (no hit); 1 is next to busy 2, 0 left longer ago
    kept = {0: ([9, 9, 9], 1), 1: ([8, 8, 8], 5)}
    assert best(loop(n_seats=3, kept=kept), [1, 2, 3], [0, 1]) == (1, 0)
    assert best(loop(n_seats=3, unified=True, kept=kept), [1, 2, 3], [0, 1]) == (0, 0)


def test_a_prompt_cache_hit_wins_over_adjacency():
    kept = {0: ([1, 2, 3, 4], 1)}
    assert best(loop(kept=kept), [1, 2, 3, 4, 5], [0, 1, 3]) == (0, 4)
