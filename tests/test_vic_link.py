"""A VIC attach socket client (tether/attach/vic/server.py, Link) after its SSH
connection has ended: the real VicAttachServer on a real Loop in this process, the test
as the client on its unix socket."""
from __future__ import annotations

import socket
import threading

import pytest

import vicssh_client as vc
from helpers import vic_socket_server


@pytest.fixture
def served(tmp_path):
    """(loop, server, client socket): a client through the sync handshake, in SSH."""
    with vic_socket_server(tmp_path, socket.SO_RCVBUF, 4096) as (loop, server, client):
        shaken = threading.Thread(target=vc.handshake_head, args=(client,), daemon=True)
        shaken.start()
        assert loop.run_until(lambda: any(link._pair for link in server.links), timeout=30)
        shaken.join(10)
        yield loop, server, client


def test_a_socket_client_that_reads_nothing_after_its_ssh_ended_is_let_go(served):
    """When the SSH connection of a socket client ends, what is still queued for it
    gets a moment to leave, then the link closes. It used to wait for ever for a client
    that does not read, and to keep reading it meanwhile: whatever it sent piled up in
    the handshake's leftover (27 MB in 5 s here), without bound, in PID 1."""
    loop, server, client = served
    (link,) = server.links
    link.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    link._write_line(b"o" * (4 << 20))       # SSH's output (a session's), not read
    assert link._out, "the client's socket took everything: nothing is left queued"
    client.sendall(b"SSH-1.0-not-a-version-we-speak\r\n")      # ends the SSH connection
    assert loop.run_until(lambda: link._pair is None, timeout=30)
    client.setblocking(False)
    sent = 0

    def flood() -> bool:                      # the client keeps sending, never reads
        nonlocal sent
        try:
            sent += client.send(bytes(1 << 16))
        except BlockingIOError:
            pass
        except OSError:                       # closed on us: what the test waits for
            return True
        return link.closed or sent > 16 << 20

    loop.run_until(flood, timeout=60)
    buffered = len(link.handshake.leftover) + len(link._to_ssh)
    assert link.closed and buffered < 1 << 20, (
        f"after its SSH ended the link took {sent} bytes, holds {buffered}, "
        f"{'closed' if link.closed else 'still open'}")
