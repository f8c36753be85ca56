"""Faults: what a terminal is told, and what the switch keeps doing, when
connections, the database or processes misbehave. Each test is the regression
test of a defect found by the fault campaign."""

from __future__ import annotations

import asyncio

from .conftest import Network, SwitchUnderTest
from .test_hostile import guarded_switch, on


async def test_a_busy_pipelining_client_is_not_cut_off_by_the_frame_timer(switch: SwitchUnderTest, network: Network):
    """The frame timer measures one frame, from its first byte to its last: a client
    whose reads keep ending mid-frame because it never stops sending is not closed."""
    async with guarded_switch(switch, frame_timeout_s=0.5, unauthenticated_idle_timeout_s=30) as running:
        async with on(running, network.terminal(0), "cup") as term:
            echo = term.base_fields("0820", "", "00", network_code="301")
            del echo["3"], echo["25"]
            frames = []
            for trace in range(1, 200):
                echo["11"] = f"{trace:06d}"
                frames.append(term.framing.frame(term.dialect.encode(echo)))
            stream = b"".join(frames)
            step = len(frames[0]) * 3 // 2  # every write ends in the middle of a frame
            for at in range(0, len(stream), step):
                term._writer.write(stream[at:at + step])
                await asyncio.sleep(0.01)  # ~1.3 s of continuous traffic, frame timeout 0.5 s
            answers = []
            for _ in range(len(frames)):
                answers.append(await term.next_unmatched(timeout_s=2))
            assert not term.closed_by_peer
    assert len(answers) == len(frames) and {a["39"] for a in answers} == {"00"}
