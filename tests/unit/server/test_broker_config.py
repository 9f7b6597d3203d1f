"""The generated mosquitto config: identities bound, exact-leaf ACL, packet limit from the protocol."""

from __future__ import annotations

from pathlib import Path

from agent.protocol.envelope import CHUNK_HEADER_SIZE, TAG_SIZE
from agent.protocol.topics import MAX_TOPIC_LENGTH, Channel
from server.broker import PROTOCOL_MAX_PACKET, BrokerSecurity, acl_text, current_user, render_config
from server.identity import SERVER_USER, device_id_problem
from server.profiles import CHUNK_KB_RANGE


def test_the_packet_limit_fits_the_largest_chunk_a_profile_allows() -> None:
    largest = CHUNK_KB_RANGE[1] * 1024 + CHUNK_HEADER_SIZE + TAG_SIZE
    mqtt_overhead = 5 + 2 + MAX_TOPIC_LENGTH + 2  # fixed header, topic length + topic, packet id
    assert largest + mqtt_overhead <= PROTOCOL_MAX_PACKET < 2 * largest


def test_device_acl_names_exact_leaves_only() -> None:
    device_lines = [ln for ln in acl_text().splitlines() if ln.startswith("pattern")]
    assert device_lines and not any("#" in ln for ln in device_lines)
    leaves = {ln.split()[2] for ln in device_lines}
    assert {f"edgefleet/v1/dev/%u/{c.value}" for c in Channel if c not in (Channel.ARTIFACT, Channel.CHUNK)} \
        <= leaves
    assert {"edgefleet/v1/dev/%u/down/chunk/+", "edgefleet/v1/art/+"} <= leaves


def test_secured_config_binds_client_id_to_username(tmp_path: Path) -> None:
    conf = render_config(port=1, workdir=tmp_path, run_as=current_user(),
                         security=BrokerSecurity(tls=None, users={SERVER_USER: "p"}))
    assert "use_username_as_clientid true" in conf.splitlines()
    assert f"max_packet_size {PROTOCOL_MAX_PACKET}" in conf.splitlines()


def test_one_rule_for_reserved_device_ids() -> None:
    for bad in (SERVER_USER, "EdgeFleet-Server", "edgefleet-serverX", "ops", "a b", "#", "", "x" * 65):
        assert device_id_problem(bad, {"ops"}) is not None, bad
    for good in ("pi-0042", "edgefleet-device-1", "server", "edge.fleet_server"):
        assert device_id_problem(good, {"ops"}) is None, good
