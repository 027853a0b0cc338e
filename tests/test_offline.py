"""The suite runs with the network disabled: any socket use fails the test that tries it."""

import socket

import pytest
from pytest_socket import SocketBlockedError


def test_network_is_blocked_during_tests():
    with pytest.raises(SocketBlockedError):
        socket.create_connection(("127.0.0.1", 9), timeout=1)
    with pytest.raises(SocketBlockedError):
        socket.socket(socket.AF_INET, socket.SOCK_STREAM)
