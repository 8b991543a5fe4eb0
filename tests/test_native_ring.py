"""The ring of slots (gs_ring) alone, through a fake copy engine whose
completions the test controls: no engine, no llama.cpp."""
import pytest

from gguf_stream import NativeError
from gguf_stream.native import (PHASE_GENERATE, PHASE_PROMPT, SLOT_EMPTY, SLOT_IN_USE, SLOT_LOADING, SLOT_READY,
                                Ring)


class FakeCopy:
    """A FIFO copy engine: copies land only when the test (or a wait) says so."""

    def __init__(self):
        self.issued = []     # (slot, layer) in issue order
        self.queue = []      # (slot, layer) in flight, oldest first
        self.waits = []      # slots waited for
        self.drains = 0
        self.points = []     # (layer, slot) adoptions the ring reported

    def issue(self, slot, layer):
        self.issued.append((slot, layer))
        self.queue.append((slot, layer))

    def done(self, slot):
        return all(s != slot for s, _ in self.queue)

    def land(self, n=None):
        """The oldest n copies (all by default) land."""
        del self.queue[:len(self.queue) if n is None else n]

    def wait(self, slot):
        self.waits.append(slot)
        last = max((i for i, (s, _) in enumerate(self.queue) if s == slot), default=-1)
        self.land(last + 1)  # FIFO: everything before it lands too

    def drain(self):
        self.drains += 1
        self.land()

    def point(self, layer, slot):
        self.points.append((layer, slot))


def make(order, n_slots, n_layer=None, prefetch=True, layer_bytes=None, generate=None):
    fake = FakeCopy()
    ring = Ring(n_layer=n_layer or max(order) + 1, n_slots=n_slots, ops=fake, prefetch=prefetch,
                layer_bytes=layer_bytes)
    ring.set_order(PHASE_PROMPT, order)
    if generate is not None:
        ring.set_order(PHASE_GENERATE, generate)
    return ring, fake


def evaluate(ring, fake, order, phase=PHASE_PROMPT, land=True):
    """One evaluation as the hook runs it: adopt each layer before its nodes,
    release it after; copies land before each adoption unless land=False."""
    for layer in order:
        if land:
            fake.land()
        ring.adopt(phase, layer)
        ring.release(phase, layer)


# (execution order, n_slots): layer counts that are and are not multiples of the slot count
SHAPES = [
    ([0, 1, 2, 3, 4, 5], 2),
    ([0, 1, 2, 3, 4], 2),
    ([0, 1, 2, 3, 4, 5, 6], 3),
    ([1, 3, 4, 7, 9], 2),
    ([2, 5, 6, 8], 3),
    ([0, 1, 2, 3, 4], 1),
    ([0, 1, 2], 3),
    ([4], 1),
]


@pytest.mark.parametrize("order,n_slots", SHAPES)
def test_prefetch_fills_the_slots_with_the_first_layers(order, n_slots):
    with make(order, n_slots)[0] as ring:
        ring.prefetch_first(PHASE_PROMPT)
        assert ring.slots() == [(order[s], SLOT_LOADING) for s in range(n_slots)]


@pytest.mark.parametrize("order,n_slots", SHAPES)
def test_early_trigger_over_evaluations(order, n_slots):
    """Releasing the k-th streamed layer at once uploads the one n_slots
    steps ahead into the freed slot, wrapping round to the next evaluation:
    over the whole run the g-th upload is order[g % S] into slot g % n_slots,
    and every adoption finds its copy landed."""
    S, n_eval = len(order), 3
    ring, fake = make(order, n_slots)
    with ring:
        ring.prefetch_first(PHASE_PROMPT)
        for _ in range(n_eval):
            evaluate(ring, fake, order)
        c = ring.counters()
    if n_slots < S:
        uploads = n_slots + n_eval * S
        assert fake.issued == [(g % n_slots, order[g % S]) for g in range(uploads)]
    else:  # every layer has its own slot: nothing is uploaded twice
        uploads = S
        assert fake.issued == [(g, order[g]) for g in range(S)]
    assert c["uploads"] == uploads and c["evaluations"] == n_eval
    assert c["adopted_ready"] == n_eval * S and c["adopted_waited"] == c["sync_fallbacks"] == 0
    assert fake.waits == []


@pytest.mark.parametrize("order,n_slots,released,expected", [
    ([0, 1, 2, 3, 4, 5], 2, 0, 2),   # k -> k + n_slots
    ([0, 1, 2, 3, 4, 5], 2, 3, 5),
    ([0, 1, 2, 3, 4, 5], 2, 4, 0),   # wraps to the next evaluation's first layer
    ([0, 1, 2, 3, 4, 5], 2, 5, 1),
    ([1, 3, 4, 7, 9], 2, 7, 1),      # positions, not layer numbers, count
    ([1, 3, 4, 7, 9], 3, 4, 1),
    ([0, 1, 2, 3, 4], 1, 4, 0),
])
def test_release_uploads_n_slots_ahead(order, n_slots, released, expected):
    ring, fake = make(order, n_slots)
    with ring:
        ring.adopt(PHASE_PROMPT, released)      # nothing prefetched: uploaded on demand into slot 0
        fake.issued.clear()
        ring.release(PHASE_PROMPT, released)
        assert fake.issued == [(0, expected)]
        assert ring.slots()[0] == (expected, SLOT_LOADING) and ring.adopted(released) == -1


def test_release_skips_a_layer_already_held():
    ring, fake = make([0, 1, 2, 3], 2)
    with ring:
        ring.adopt(PHASE_PROMPT, 2)             # on demand, slot 0
        ring.adopt(PHASE_PROMPT, 0)             # on demand, slot 1
        fake.issued.clear()
        ring.release(PHASE_PROMPT, 2)           # 2 steps ahead is 0, which slot 1 holds
        assert fake.issued == [] and ring.slots() == [(2, SLOT_READY), (0, SLOT_IN_USE)]


@pytest.mark.parametrize("landed_first,waited", [(True, 0), (False, 1)])
def test_adopt_takes_a_prefetched_copy(landed_first, waited):
    """A landed copy is adopted without waiting; one in flight is waited for."""
    ring, fake = make([0, 1, 2], 2)
    with ring:
        ring.prefetch_first(PHASE_PROMPT)
        if landed_first:
            fake.land()
        assert ring.landed(0) == landed_first
        ring.adopt(PHASE_PROMPT, 0)
        c = ring.counters()
        assert (c["adopted_ready"], c["adopted_waited"], c["sync_fallbacks"]) == (1 - waited, waited, 0)
        assert fake.waits == ([0] if waited else [])
        assert (c["wait_seconds"] > 0) == bool(waited)
        assert c["uploads"] == 2 and c["evaluations"] == 1
        assert ring.slots()[0] == (0, SLOT_IN_USE) and ring.adopted(0) == 0
        assert fake.points == [(0, 0)]


def test_adopting_twice_in_an_evaluation_is_one_adoption():
    ring, fake = make([0, 1], 1)
    with ring:
        ring.prefetch_first(PHASE_PROMPT)
        for _ in range(3):
            ring.adopt(PHASE_PROMPT, 0)
        assert sum(ring.counters()[k] for k in ("adopted_ready", "adopted_waited", "sync_fallbacks")) == 1
        assert fake.points == [(0, 0)]


def test_sync_fallback_without_prefetch():
    """No copy issued ahead: each adoption uploads into a victim and waits,
    and a layer a slot still holds from the last evaluation needs no upload."""
    order = [0, 1, 2]
    ring, fake = make(order, 2, prefetch=False, layer_bytes=[10, 20, 40])
    with ring:
        ring.prefetch_first(PHASE_PROMPT)
        assert fake.issued == []
        evaluate(ring, fake, order, land=False)
        c = ring.counters()
        assert c["sync_fallbacks"] == c["uploads"] == 3 and c["bytes_uploaded"] == 70
        assert c["adopted_waited"] == 0 and fake.waits == [0, 1, 1]   # 2 evicted 1, needed last
        evaluate(ring, fake, order, land=False)   # 0 and 2 are still there; 1 evicts 0
        c = ring.counters()
        assert c["sync_fallbacks"] == c["uploads"] == 4 and c["adopted_ready"] == 2
        assert fake.issued[3:] == [(0, 1)] and c["evaluations"] == 2


def test_release_frees_the_slot():
    ring, fake = make([0, 1, 2], 2, prefetch=False)
    with ring:
        ring.release(PHASE_PROMPT, 1)           # not adopted: nothing happens
        assert ring.slots() == [(-1, SLOT_EMPTY)] * 2
        ring.adopt(PHASE_PROMPT, 1)
        ring.release(PHASE_PROMPT, 1)
        assert ring.slots()[0] == (1, SLOT_READY) and ring.adopted(1) == -1
        assert fake.issued == [(0, 1)]          # prefetch off: the release issues nothing


@pytest.mark.parametrize("held,adopt,victim", [
    # an empty slot first
    ([0], 2, 1),
    # else the layer needed last from the one adopted (4 layers: 2 -> 0 is 2 steps, 2 -> 1 is 3)
    ([0, 1], 2, 1),
    ([1, 0], 2, 0),
    ([3, 1], 2, 1),   # 3 is the next one after 2: keep it
    ([0, 3], 1, 0),
])
def test_victim_is_the_layer_needed_last(held, adopt, victim):
    order = [0, 1, 2, 3]
    ring, fake = make(order, 2, prefetch=False)
    with ring:
        for layer in held:
            ring.adopt(PHASE_PROMPT, layer)
            ring.release(PHASE_PROMPT, layer)
        ring.adopt(PHASE_PROMPT, adopt)
        assert ring.adopted(adopt) == victim


def test_victim_prefers_a_layer_the_phase_does_not_stream():
    ring, fake = make([0, 1, 2, 3], 2, prefetch=False, generate=[0, 2, 3])
    with ring:
        for layer in (1, 3):                    # prompt phase: 1 in slot 0, 3 in slot 1
            ring.adopt(PHASE_PROMPT, layer)
            ring.release(PHASE_PROMPT, layer)
        ring.adopt(PHASE_GENERATE, 2)           # 3 is needed next; 1 does not stream now
        assert ring.adopted(2) == 0 and ring.slots()[1] == (3, SLOT_READY)


def test_slots_in_use_are_reclaimed_last():
    """A slot left in use (an aborted evaluation) is taken only when no other is left."""
    ring, fake = make([0, 1, 2], 2, prefetch=False)
    with ring:
        ring.adopt(PHASE_PROMPT, 0)             # never released
        ring.adopt(PHASE_PROMPT, 1)
        ring.release(PHASE_PROMPT, 1)
        ring.adopt(PHASE_PROMPT, 2)             # takes 1's slot, not 0's
        assert ring.adopted(2) == 1 and ring.adopted(0) == 0
        ring.adopt(PHASE_PROMPT, 1)             # both in use: reclaims the first
        assert ring.adopted(1) == 0 and ring.adopted(0) == -1


def test_phase_switch_keeps_the_first_layers_and_prefetches_the_rest():
    """Prompt phase streams 0..5, the generate phase 0, 2, 4 (1, 3, 5 on the CPU)."""
    ring, fake = make([0, 1, 2, 3, 4, 5], 2, generate=[0, 2, 4])
    with ring:
        ring.prefetch_first(PHASE_PROMPT)
        evaluate(ring, fake, [0, 1, 2, 3])      # slots now: 4 (slot 0), 5 (slot 1)
        ring.adopt(PHASE_PROMPT, 4)             # in use when the phase switches (aborted)
        fake.land()
        assert ring.slots() == [(4, SLOT_IN_USE), (5, SLOT_LOADING)]
        ring.keep_first(PHASE_GENERATE)         # want 0 and 2: neither 4 nor 5 stays
        assert ring.slots() == [(-1, SLOT_EMPTY)] * 2 and ring.adopted(4) == -1
        fake.issued.clear()
        ring.prefetch_first(PHASE_GENERATE)
        assert fake.issued == [(0, 0), (1, 2)]
        evaluate(ring, fake, [0, 2, 4], phase=PHASE_GENERATE)
        assert fake.issued[2:] == [(0, 4), (1, 0), (0, 2)]


def test_keep_first_keeps_what_the_phase_needs_first():
    ring, fake = make([0, 1, 2, 3], 3, generate=[1, 3])
    with ring:
        ring.prefetch_first(PHASE_PROMPT)       # 0, 1, 2
        ring.keep_first(PHASE_GENERATE)         # keeps 1 (first), drops 0 (not streamed), 2 (CPU)
        assert ring.slots() == [(-1, SLOT_EMPTY), (1, SLOT_LOADING), (-1, SLOT_EMPTY)]
        fake.issued.clear()
        ring.prefetch_first(PHASE_GENERATE)     # 1 is held: only 3, into the first empty slot
        assert fake.issued == [(0, 3)]
        ring.keep_first(PHASE_PROMPT)           # want 0, 1, 2: keeps 1
        assert ring.slots() == [(-1, SLOT_EMPTY), (1, SLOT_LOADING), (-1, SLOT_EMPTY)]


def test_prefetch_first_does_nothing_without_prefetch():
    ring, fake = make([0, 1, 2], 2, prefetch=False)
    with ring:
        ring.prefetch_first(PHASE_PROMPT)
        assert fake.issued == [] and ring.slots() == [(-1, SLOT_EMPTY)] * 2


def test_landed():
    ring, fake = make([0, 1, 2], 2)
    with ring:
        assert not ring.landed(0)               # not in any slot
        ring.prefetch_first(PHASE_PROMPT)
        assert not ring.landed(0)               # in flight
        fake.land(1)
        assert ring.landed(0) and not ring.landed(1)
        ring.adopt(PHASE_PROMPT, 0)
        assert not ring.landed(0)               # in use
        ring.release(PHASE_PROMPT, 0)           # slot 0 now loads layer 2
        assert not ring.landed(0) and not ring.landed(2)
        fake.land()
        assert ring.landed(2) and ring.landed(1)


def test_counters_add_up():
    order, sizes = [0, 1, 2, 3, 4], [1, 2, 4, 8, 16]
    ring, fake = make(order, 2, layer_bytes=sizes)
    with ring:
        ring.prefetch_first(PHASE_PROMPT)
        evaluate(ring, fake, order, land=False)  # no copy lands by itself: every adoption waits
        evaluate(ring, fake, order)              # every copy landed before its adoption
        c = ring.counters()
    assert c["evaluations"] == 2
    assert c["adopted_waited"] == 5 and c["adopted_ready"] == 5 and c["sync_fallbacks"] == 0
    assert c["uploads"] == len(fake.issued) == 12
    assert c["bytes_uploaded"] == sum(sizes[layer] for _, layer in fake.issued)
    assert c["wait_seconds"] > 0 and c["boundaries"] == c["kv_moved_bytes"] == 0


def test_time_upload_leaves_the_layer_ready_in_slot_0():
    ring, fake = make([0, 1, 2], 2, layer_bytes=[5, 5, 5])
    with ring:
        ring.prefetch_first(PHASE_PROMPT)       # 0 in slot 0, 1 in slot 1
        ring.adopt(PHASE_PROMPT, 0)
        best = ring.time_upload(1, 3)
        assert best >= 0
        assert ring.slots() == [(1, SLOT_READY), (-1, SLOT_EMPTY)]
        assert ring.adopted(0) == -1
        assert fake.issued[2:] == [(0, 1)] * 3 and ring.counters()["uploads"] == 5


def test_discard_drains_and_forgets():
    ring, fake = make([0, 1, 2], 3)
    with ring:
        ring.prefetch_first(PHASE_PROMPT)
        ring.adopt(PHASE_PROMPT, 1)
        ring.discard()
        assert fake.drains == 1 and fake.queue == []
        assert ring.slots() == [(-1, SLOT_EMPTY), (1, SLOT_IN_USE), (-1, SLOT_EMPTY)]


def test_orders_and_positions():
    ring, _ = make([0, 1, 2, 3, 4], 2, generate=[4, 1])
    with ring:
        assert [ring.position(PHASE_PROMPT, i) for i in range(5)] == [0, 1, 2, 3, 4]
        assert [ring.position(PHASE_GENERATE, i) for i in range(5)] == [-1, 1, -1, -1, 0]
        ring.set_order(PHASE_GENERATE, [])
        assert [ring.position(PHASE_GENERATE, i) for i in range(5)] == [-1] * 5


def test_bad_calls_fail_cleanly():
    with pytest.raises(NativeError, match="gs_ring_create.*n_slots > 0"):
        make([0, 1], 0)
    ring, fake = make([0, 1, 2], 2, n_layer=4)
    with ring:
        with pytest.raises(NativeError, match="layer 3 does not stream in phase 0"):
            ring.adopt(PHASE_PROMPT, 3)
        with pytest.raises(NativeError, match="layer 1 twice"):
            ring.set_order(PHASE_GENERATE, [1, 1])
        with pytest.raises(NativeError, match="layer 4 out of range"):
            ring.set_order(PHASE_GENERATE, [4])
        from gguf_stream.native import ffi, lib

        assert lib.gs_ring_get_slot(ring._r, 2, ffi.new("int *"), ffi.new("int *")) == lib.GS_E_INVALID
        assert "slot 2 out of range" in ffi.string(lib.gs_last_error()).decode()


class BrokenCopy(FakeCopy):
    def issue(self, slot, layer):
        raise RuntimeError("copy engine down")


def test_a_failing_copy_leaves_the_slot_empty():
    ring = Ring(n_layer=3, n_slots=2, ops=BrokenCopy())
    with ring:
        ring.set_order(PHASE_PROMPT, [0, 1, 2])
        with pytest.raises(NativeError, match="gs_ring_prefetch_first.*copy engine down"):
            ring.prefetch_first(PHASE_PROMPT)
        assert ring.slots() == [(-1, SLOT_EMPTY)] * 2
        with pytest.raises(NativeError, match="gs_ring_adopt.*copy engine down"):
            ring.adopt(PHASE_PROMPT, 1)
        assert ring.adopted(1) == -1 and ring.counters()["uploads"] == 2
