"""Pure logic of the warm engine (sierra_prefect/warm_engine.py): its frames, its code
identity, its edited-module reload; the engine itself is exercised for real in
tests/test_warm_engine.py and by the stack tests (tests/test_stack.py)."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import socket
import struct
import sys
import time

import pytest

from sierra_prefect import warm_engine
from tests.helpers import PROJECT


def _package(root, name: str) -> None:
    (root / name).mkdir()
    (root / name / "__init__.py").write_text("")
    (root / name / "plan.py").write_text("VALUE = 1\n")


def test_forget_edited_keeps_unchanged_modules_and_drops_all_after_an_edit(tmp_path, monkeypatch):
    name = "sp_fake_flows"
    _package(tmp_path, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    old = time.time() - 100
    for path in (tmp_path / name).iterdir():
        os.utime(path, (old, old))
    try:
        importlib.import_module(f"{name}.plan")
        imported_at = time.time() - 50
        assert warm_engine.forget_edited(name, imported_at) is False
        assert f"{name}.plan" in sys.modules

        (tmp_path / name / "plan.py").write_text("VALUE = 2\n")  # mtime now: after the import
        assert warm_engine.forget_edited(name, imported_at) is True
        assert name not in sys.modules and f"{name}.plan" not in sys.modules
        assert importlib.import_module(f"{name}.plan").VALUE == 2
    finally:
        for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[module]


def test_socket_path_is_none_when_too_long_for_a_unix_socket(tmp_path):
    assert warm_engine.socket_path(tmp_path) == tmp_path / "warm-engine.sock"
    assert warm_engine.socket_path(tmp_path / ("x" * 120)) is None


def test_serve_with_bad_arguments_is_one_clear_line(tmp_path):
    import subprocess

    for args in (["serve"], ["serve", str(tmp_path / "missing" / "x.sock")],
                 ["serve", str(tmp_path / "x.sock"), "soon"], ["serve", str(tmp_path / "x.sock"), "-1"]):
        result = subprocess.run([sys.executable, "-m", "sierra_prefect.warm_engine", *args],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "usage: serve SOCKET" in lines[0], result.stderr
    assert list(tmp_path.iterdir()) == []  # nothing created


# -- frames ----------------------------------------------------------------------------------


def _frames() -> list[warm_engine.Frame]:
    Frame, Kind = warm_engine.Frame, warm_engine.Kind
    return [Frame(Kind.REQUEST, b'{"module": "m"}'), Frame.number(Kind.SIGNAL, 15),
            Frame(Kind.ACCEPTED), Frame(Kind.REFUSED, "its venv /x is not …".encode()),
            Frame.number(Kind.EXIT, -9)]


def _decoded(frames: list[warm_engine.Frame]) -> list[tuple[int, bytes]]:
    return [(frame.kind, frame.payload) for frame in frames]


def test_frames_come_out_whole_however_the_stream_is_split():
    frames = _frames()
    stream = b"".join(frame.encode() for frame in frames)
    for chunk in (1, 2, 3, 7, 9, 10, len(stream)):  # one byte at a time .. all in one read
        reader = warm_engine.FrameReader()
        out = []
        for start in range(0, len(stream), chunk):
            out += reader.feed(stream[start:start + chunk])
        reader.end()  # closed between frames: fine
        assert _decoded(out) == _decoded(frames), chunk
    numbers = (warm_engine.Kind.SIGNAL, warm_engine.Kind.EXIT)
    assert [frame.as_number() for frame in out if frame.kind in numbers] == [15, -9]


def test_a_partial_frame_is_held_until_complete_and_refused_at_a_close():
    frame = _frames()[0].encode()
    reader = warm_engine.FrameReader()
    assert reader.feed(frame[:-1]) == []
    with pytest.raises(warm_engine.ProtocolError, match=f"closed {len(frame) - 1} bytes into a message"):
        reader.end()
    assert _decoded(reader.feed(frame[-1:])) == _decoded(_frames()[:1])


@pytest.mark.parametrize(("header", "refused"), [
    (struct.pack("!QB", 0, 0), "unknown message type 0"),
    (struct.pack("!QB", 4, 99), "unknown message type 99"),
    (struct.pack("!QB", 5, warm_engine.Kind.SIGNAL), "SIGNAL of 5 bytes (it has 4)"),
    (struct.pack("!QB", 1, warm_engine.Kind.ACCEPTED), "ACCEPTED of 1 bytes (it has 0)"),
    (struct.pack("!QB", 2**40, warm_engine.Kind.REQUEST), f"REQUEST of {2**40} bytes (at most"),
], ids=["type-0", "type-99", "signal-size", "accepted-size", "too-long"])
def test_a_header_of_an_unknown_type_or_size_is_refused_before_its_payload(header, refused):
    with pytest.raises(warm_engine.ProtocolError, match=re.escape(refused)):
        warm_engine.FrameReader().feed(header)  # the header alone: nothing waited for


def test_the_unframed_requests_of_before_are_refused_and_refuse_the_frames():
    """A client of the protocol before (an 8-byte length, then JSON) is refused by type;
    a warm engine of before reads a frame's length as its own and then fails on the type
    byte, so it closes at once (its new client then starts cold) instead of waiting."""
    old_request = b'{"module": "prefect.engine", "argv": []}'
    with pytest.raises(warm_engine.ProtocolError, match=f"unknown message type {ord('{')}"):
        warm_engine.FrameReader().feed(struct.pack("!Q", len(old_request)) + old_request)
    new = warm_engine.Frame(warm_engine.Kind.REQUEST, old_request).encode()
    (length,) = struct.unpack_from("!Q", new)  # what the engine of before read first
    assert length == len(old_request)
    with pytest.raises(ValueError):
        json.loads(new[8:8 + length])


def test_frames_travel_over_a_socket_pair_with_stdio_attached(tmp_path):
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with left, right, open(tmp_path / "out", "wb") as out:
        sender, receiver = warm_engine.Channel(left), warm_engine.Channel(right)
        request = warm_engine.Frame(warm_engine.Kind.REQUEST, b"x" * 200_000)  # > one read
        sender.send(request, [out.fileno()] * 3)
        sender.send(warm_engine.Frame.number(warm_engine.Kind.SIGNAL, 2))
        frame, fds = receiver.receive_with_fds(3)
        try:
            assert (frame.kind, frame.payload) == (request.kind, request.payload)
            assert len(fds) == 3
            os.write(fds[1], b"via the passed descriptor")
        finally:
            for fd in fds:
                os.close(fd)
        assert receiver.receive().as_number() == 2
        left.close()
        assert receiver.receive() is None  # closed between frames
    assert (tmp_path / "out").read_bytes() == b"via the passed descriptor"


# -- code identity ---------------------------------------------------------------------------


def _engine_code(checkout) -> warm_engine.EngineCode:
    (checkout / "uv.lock").write_text("version = 1\n")
    code = warm_engine.Code("/venvs/a", str(checkout), warm_engine._lock_stat(str(checkout)))
    return warm_engine.EngineCode(code, warm_engine.lock_digest(str(checkout)), "engine")


def test_a_client_of_the_same_code_is_served_and_of_another_is_refused_with_why(tmp_path):
    engine = _engine_code(tmp_path)
    same = engine.code.as_dict()
    assert engine.refusal(same) is None
    venv = engine.refusal({**same, "python": "/venvs/b"})
    assert venv == "its venv /venvs/b is not the warm engine's (/venvs/a)"
    checkout = engine.refusal({**same, "checkout": "/elsewhere"})
    assert checkout == f"its checkout /elsewhere is not the warm engine's ({tmp_path})"
    for no_code in ({}, {"python": "/venvs/a"}, {**same, "extra": "1"}):
        assert "names no code" in engine.refusal(no_code)


def test_uv_lock_is_compared_by_content_when_its_stat_differs(tmp_path):
    engine = _engine_code(tmp_path)
    lock = tmp_path / "uv.lock"
    lock.write_text("version = 1\n")  # rewritten, same bytes: a new mtime, same code
    os.utime(lock, ns=(1, 1))
    client = warm_engine.Code("/venvs/a", str(tmp_path), warm_engine._lock_stat(str(tmp_path)))
    assert client.lock != engine.code.lock
    assert engine.refusal(client.as_dict()) is None
    lock.write_text("version = 2\n")  # an upgrade
    client = warm_engine.Code("/venvs/a", str(tmp_path), warm_engine._lock_stat(str(tmp_path)))
    assert engine.refusal(client.as_dict()) == (
        f"{tmp_path}/uv.lock changed since the warm engine started (an upgrade?): "
        "`sierra-prefect up` restarts it")
    lock.unlink()
    assert "uv.lock changed" in engine.refusal({**client.as_dict(), "lock": ""})


def test_this_process_code_is_this_venv_and_checkout():
    code = warm_engine.Code.here()
    assert code.python == os.path.realpath(sys.prefix)
    assert code.checkout == str(PROJECT)
    assert code.lock == warm_engine._lock_stat(str(PROJECT)) != ""
    engine = warm_engine.EngineCode.here()
    assert engine.lock_digest == hashlib.sha256(b"uv.lock" + (PROJECT / "uv.lock").read_bytes()).hexdigest()
    assert engine.refusal(code.as_dict()) is None
