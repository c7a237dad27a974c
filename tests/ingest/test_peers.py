"""Tests for ingest/peers.py: the BONEWATCH_DICOM_PEERS allow-list."""

from __future__ import annotations

import pytest

from bonewatch.ingest.peers import Peer, PeerListError, parse_peers, resolve_policy


def _policy(text: str):
    hosts = {"pacs.example": ["10.1.2.3"], "ct.example": ["10.9.9.9", "::ffff:10.9.9.8"]}
    return resolve_policy(text, resolve=lambda host: hosts[host])


def test_parse_forms():
    assert parse_peers("") == ()
    assert parse_peers(" * ") is None
    assert parse_peers("CT1, PACS@pacs.example ,*@ct.example") == (
        Peer("CT1"),
        Peer("PACS", "pacs.example"),
        Peer(None, "ct.example"),
    )


@pytest.mark.parametrize("text", ["*, CT1", "@host", "A" * 17, "PACS@"])
def test_bad_entries_are_refused(text):
    with pytest.raises(PeerListError):
        parse_peers(text)


def test_an_empty_list_allows_loopback_only():
    policy = _policy("")
    assert policy.allows("ANY", "127.0.0.1")
    assert policy.allows("ANY", "::1")
    assert policy.allows("ANY", "::ffff:127.0.0.1")
    assert not policy.allows("ANY", "10.1.2.3")


def test_listed_peers_by_title_and_host():
    policy = _policy("CT1, PACS@pacs.example, *@ct.example")
    assert policy.allows("CT1", "192.0.2.7")  # any host
    assert policy.allows("PACS", "10.1.2.3")
    assert not policy.allows("PACS", "10.1.2.4")
    assert policy.allows("WHOEVER", "::ffff:10.9.9.9")  # IPv4-mapped spelling
    assert policy.allows("WHOEVER", "10.9.9.8")
    # With a list, loopback is not let in by default.
    assert not policy.allows("MODALITY", "127.0.0.1")


def test_star_allows_anyone():
    assert _policy("*").allows("X", "203.0.113.5")


def test_a_host_that_does_not_resolve_is_an_error():
    def fail(host):
        raise OSError("no such host")

    with pytest.raises(PeerListError, match="does not resolve"):
        resolve_policy("PACS@nowhere.invalid", resolve=fail)
