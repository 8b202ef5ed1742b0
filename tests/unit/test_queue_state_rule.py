"""The queue state rule as a table: an operator's record wins, else what QStash holds, else the
configuration; what is pushed to QStash and what is recorded for the dispatcher."""

from __future__ import annotations

import pytest

from tierq.ops.queue_state import QueueConf, applied, recorded, settle

CONF = QueueConf(parallelism=16, paused=False)
OP = "operator"
QS = "qstash"
CF = "configuration"


@pytest.mark.parametrize(
    ("qstash", "record", "state", "sources", "push", "adopt"),
    [
        # a new queue: configuration seeds it
        (None, {}, QueueConf(16, False), (CF, CF), True, {}),
        # QStash agrees with configuration: nothing to do (a plain restart)
        (QueueConf(16, False), {}, QueueConf(16, False), (QS, QS), False, {}),
        # an operator's pause and parallelism, applied in both places: a restart keeps them
        (QueueConf(32, True), {"parallelism": "32", "paused": "1"}, QueueConf(32, True),
         (OP, OP), False, {}),
        # the operator's record wins over a QStash an older start-up sync had reset
        (QueueConf(16, False), {"paused": "1"}, QueueConf(16, True), (QS, OP), True, {}),
        # a queue QStash lost is created with the operator's state, not the configuration
        (None, {"parallelism": "3"}, QueueConf(3, False), (OP, CF), True, {}),
        # set in the Upstash console (or configuration changed since): kept, and recorded so
        # that tierq's dispatcher applies it too
        (QueueConf(5, True), {}, QueueConf(5, True), (QS, QS), False,
         {"parallelism": "5", "paused": "1"}),
        (QueueConf(5, False), {"paused": "0"}, QueueConf(5, False), (QS, OP), False,
         {"parallelism": "5"}),
        # unreadable record fields are ignored, as the dispatcher's Lua ignores them
        (QueueConf(16, False), {"parallelism": "x", "other": "1"}, QueueConf(16, False),
         (QS, QS), False, {}),
    ],
)  # fmt: skip
def test_settle(
    qstash: QueueConf | None,
    record: dict[str, str],
    state: QueueConf,
    sources: tuple[str, str],
    push: bool,
    adopt: dict[str, str],
) -> None:
    settled = settle(CONF, qstash, record)
    assert settled.state == state
    assert (settled.source["parallelism"], settled.source["paused"]) == sources
    assert settled.push is push
    assert settled.adopt == adopt


def test_paused_configuration_seeds_paused() -> None:
    settled = settle(QueueConf(2, True), None, {})
    assert (settled.state, settled.push, settled.adopt) == (QueueConf(2, True), True, {})


@pytest.mark.parametrize(
    ("record", "values", "dispatch"),
    [
        ({}, {}, QueueConf(16, False)),
        ({"paused": "1"}, {"paused": True}, QueueConf(16, True)),
        ({"paused": "0", "parallelism": "4"}, {"paused": False, "parallelism": 4},
         QueueConf(4, False)),
        ({"parallelism": "0"}, {}, QueueConf(16, False)),
        ({"parallelism": "-2", "paused": "yes"}, {"paused": False}, QueueConf(16, False)),
    ],
)  # fmt: skip
def test_what_the_dispatcher_applies(
    record: dict[str, str], values: dict[str, object], dispatch: QueueConf
) -> None:
    assert recorded(record) == values
    assert applied(CONF, record) == dispatch


def test_record_spelling() -> None:
    assert QueueConf(7, True).as_record() == {"parallelism": "7", "paused": "1"}
    assert QueueConf(1, False).as_record() == {"parallelism": "1", "paused": "0"}
