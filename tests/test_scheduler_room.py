"""Queue room: a subflow whose socket queue is full gets no new data.

The transport tells the core how many more bytes each subflow's socket
queue takes before data would wait there; the scheduler then gives the
next chunks to another subflow instead of queueing them behind a slow
path, where every later byte of the stream would wait for them at the
receiver.
"""

from __future__ import annotations

from memnet import MemNet, established, has_data, join, stream

from mptls.mptcp.scheduler import UNCAPPED, Subflow, SubflowState, pick_subflow

LIMIT = 1 << 20


def established_subflow(
    subflow_id: int, *, srtt: float | None = None, inflight: int = 0
) -> Subflow:
    return Subflow(
        subflow_id, SubflowState.ESTABLISHED, srtt=srtt, inflight=inflight
    )


def test_a_subflow_without_queue_room_is_passed_over() -> None:
    fast = established_subflow(1, srtt=0.01, inflight=5000)
    slow = established_subflow(2, srtt=0.2)
    assert pick_subflow([fast, slow], LIMIT) is fast
    fast.set_queue_room(0)
    assert fast.inflight_cap == 5000
    assert pick_subflow([fast, slow], LIMIT) is slow
    slow.set_queue_room(0)
    assert pick_subflow([fast, slow], LIMIT) is None


def test_queue_room_counts_from_what_is_in_flight_when_it_is_set() -> None:
    path = established_subflow(1, srtt=0.01, inflight=3000)
    path.set_queue_room(1000)
    assert path.inflight_cap == 4000
    path.inflight = 3999
    assert pick_subflow([path], LIMIT) is path
    path.inflight = 4000
    assert pick_subflow([path], LIMIT) is None
    # an overfull queue (negative room) is no room, not a lower cap
    path.set_queue_room(-500)
    assert path.inflight_cap == 4000


def test_an_unreported_queue_never_caps_a_subflow() -> None:
    path = established_subflow(1, srtt=0.01)
    assert path.inflight_cap == UNCAPPED
    assert pick_subflow([path], LIMIT) is path


def _data_bytes_by_subflow(net: MemNet) -> dict[int, int]:
    sent: dict[int, int] = {}
    for subflow_id, segment in net.client.segments_to_send(net.now):
        sent[subflow_id] = sent.get(subflow_id, 0) + len(segment.payload)
    return sent


def test_the_slower_subflow_takes_what_the_full_fast_one_cannot() -> None:
    net = established(MemNet())
    slow = join(net, delay=0.05)
    # both subflows measured: subflow 0 has the lower smoothed RTT
    net.client.send(stream(200_000, seed=1))
    assert net.run(has_data(net.server_side, 5 + 200_000))
    size = 300_000
    net.client.send(stream(size, seed=2))
    net.client.set_queue_room(0, 0)
    net.client.set_queue_room(slow, 100_000)
    sent = _data_bytes_by_subflow(net)
    assert sent.get(0, 0) == 0
    # the room is a threshold: the last chunk may end past it
    assert 100_000 <= sent[slow] < 100_000 + net.client.config.max_payload
    assert net.client.send_pending == size - sent[slow]
    # room again on the fast subflow: it takes the rest
    net.client.set_queue_room(0, size)
    assert _data_bytes_by_subflow(net) == {0: size - sent[slow]}
    assert net.client.send_pending == 0


def test_without_room_anywhere_data_waits_unmapped_and_is_not_lost() -> None:
    net = established(MemNet())
    other = join(net)
    net.client.send(stream(50_000, seed=3))
    net.client.set_queue_room(0, 0)
    net.client.set_queue_room(other, 0)
    assert _data_bytes_by_subflow(net) == {}
    assert net.client.send_pending == 50_000
    net.client.set_queue_room(other, 1 << 20)
    assert net.run(has_data(net.server_side, 5 + 50_000))
    assert bytes(net.server_side.data[5:]) == stream(50_000, seed=3)
