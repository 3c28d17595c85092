"""Next-hop faults, against one relay process with three misbehaving next hops (one route each,
exercised at the same time so the 70-second case costs its wall time once):

- ``down.test``: the next hop is down; mail defers (the log says so, the sink has nothing),
  then the hop comes back on the same port and every message arrives exactly once;
- ``drop.test``: the next hop stores the message and drops the connection after the final dot
  without answering: the relay cannot know, retries, and the result is at most one duplicate
  per message, never a loss;
- ``slow.test``: the next hop stores the message and answers the final dot only after 70 s:
  RFC 5321 4.5.3.2.6 asks the client to wait 10 minutes, so exactly one copy arrives (a client
  with aiosmtplib's 60 s default would time out and send a second copy).
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from tests.faults.harness import (
    Relay,
    delivery_figures,
    record_figures,
    relay_config,
    relay_hop,
    running_sink,
    send_one,
)
from tests.relay.apphelp import free_port

SLOW_REPLY = 70.0
DOWN_MESSAGES = 10
DROP_MESSAGES = 5


def route(name: str, domain: str, port: int) -> dict[str, object]:
    return {
        "name": name,
        "match": {"recipientDomains": [domain]},
        "nextHop": relay_hop(name, port),
    }


async def test_hop_down_dropping_and_slow(tmp_path: Path) -> None:
    with running_sink() as slow, running_sink() as drop, running_sink() as down:
        down.stop()  # down from the start; comes back on the same port later
        slow.data_delay = SLOW_REPLY
        drop.drop_after_dot = DROP_MESSAGES  # every first attempt is stored, then cut
        config = relay_config(
            tmp_path,
            smtp_port=free_port(),
            routes=[
                route("slow", "slow.test", slow.port),
                route("drop", "drop.test", drop.port),
                route("down", "down.test", down.port),
            ],
        )
        relay = Relay(tmp_path, config)
        try:
            await relay.astart()
            loop = asyncio.get_running_loop()
            started = loop.time()
            await send_one(relay.port, "slow-0", rcpt="user@slow.test")
            down_tokens = {f"down-{i}" for i in range(DOWN_MESSAGES)}
            drop_tokens = {f"drop-{i}" for i in range(DROP_MESSAGES)}
            for token in sorted(down_tokens):
                await send_one(relay.port, token, rcpt="user@down.test")
            for token in sorted(drop_tokens):
                await send_one(relay.port, token, rcpt="user@drop.test")

            # down: every message is deferred at least once while nothing listens
            await asyncio.to_thread(
                relay.run.wait_for,
                r"deferred 1 recipients.*user@down\.test",
                occurrences=DOWN_MESSAGES,
                timeout=60,
            )
            assert down.tokens() == {}
            down.start()
            await asyncio.to_thread(down.wait_tokens, down_tokens, 60)

            # drop: every message stored once, cut, retried: at most one duplicate each
            await asyncio.to_thread(drop.wait_tokens, drop_tokens, 60)

            # slow: the one message is answered after 70 s; the relay waited and is done
            await asyncio.to_thread(relay.wait_queue_empty, SLOW_REPLY + 60)
            waited = loop.time() - started
            relay.run.signal(signal.SIGTERM)
            assert await asyncio.to_thread(relay.run.wait, 30) == 0

            down_arrived, drop_arrived, slow_arrived = down.tokens(), drop.tokens(), slow.tokens()
            record_figures(
                "faults.next_hop_down_then_back",
                sent=DOWN_MESSAGES,
                **delivery_figures(down_tokens, down_arrived),
            )
            record_figures(
                "faults.next_hop_drops_after_dot",
                sent=DROP_MESSAGES,
                **delivery_figures(drop_tokens, drop_arrived),
                transactions_at_hop=drop.transactions,
            )
            record_figures(
                "faults.next_hop_answers_after_70s",
                sent=1,
                **delivery_figures({"slow-0"}, slow_arrived),
                transactions_at_hop=slow.transactions,
                reply_delay_seconds=SLOW_REPLY,
                seconds_until_done=round(waited, 1),
            )
            assert down_arrived == dict.fromkeys(down_tokens, 1)
            assert set(drop_arrived) == drop_tokens
            assert all(n <= 2 for n in drop_arrived.values()), drop_arrived
            assert drop.transactions >= DROP_MESSAGES * 2  # each was cut once, then retried
            assert slow_arrived == {"slow-0": 1}
            assert slow.transactions == 1 and waited >= SLOW_REPLY
            relay.assert_no_traceback()
        finally:
            relay.stop()
