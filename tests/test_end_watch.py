"""The CLI's end watch (sierra_prefect/trigger.py:EndWatch) never holds the CLI up.

Against a real stack's events websocket, a watch on a flow run that never ends is stopped
by leaving ``with`` (its subscription would otherwise wait forever); left at once, before
its thread's loop even runs, it stops too; a refused connection leaves it unset."""

from __future__ import annotations

import socket
from uuid import uuid4

from prefect.settings import PREFECT_API_URL, temporary_settings

from sierra_prefect.connection import Connection
from sierra_prefect.trigger import EndWatch
from tests.helpers import wait_until


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_leaving_stops_a_subscription_that_would_wait_forever(stack):
    connection = Connection(stack.api_url, stack.auth_string)
    with connection.prefect_settings():
        with EndWatch(uuid4()) as watch:
            # Subscribed (its loop runs the websocket) before it is left.
            wait_until(lambda: watch._task is not None, 60, "the watch's subscription to start")
        assert not watch._thread.is_alive()
        assert not watch.ended.is_set()


def test_left_at_once_its_thread_is_gone(stack):
    # The flow run may already be over at the first poll: the watch is left before its
    # thread has even started its loop, which would then subscribe and wait forever.
    connection = Connection(stack.api_url, stack.auth_string)
    with connection.prefect_settings():
        for _ in range(20):
            with EndWatch(uuid4()) as watch:
                pass
            assert not watch._thread.is_alive()
            assert not watch.ended.is_set()


def test_no_server_leaves_it_unset_and_gone():
    with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{_closed_port()}/api"}):
        with EndWatch(uuid4()) as watch:
            watch._thread.join(timeout=30)  # it gives up on a refused connection
        assert not watch._thread.is_alive()
        assert not watch.ended.is_set()
