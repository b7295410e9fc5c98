"""``server.max_connection_age_s``: the server closes each client connection after that long,
so a client balancing over a headless Service resolves the name again and reaches replicas
added since it connected."""

from __future__ import annotations

import threading

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import ServerStarter


def test_a_connection_is_closed_once_it_reaches_its_age(
    start_server: ServerStarter, redis_url: str
) -> None:
    server = start_server(redis_url, server__max_connection_age_s=0.5, server__grace_s=1.0)
    left_ready = threading.Event()
    seen: list[grpc.ChannelConnectivity] = []

    def watch(state: grpc.ChannelConnectivity) -> None:
        seen.append(state)
        if grpc.ChannelConnectivity.READY in seen and state is not grpc.ChannelConnectivity.READY:
            left_ready.set()

    with grpc.insecure_channel(server.grpc_target) as channel:
        channel.subscribe(watch, try_to_connect=True)
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        # No call is made after this one: only the server's GOAWAY can end the connection.
        assert left_ready.wait(30), seen
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING  # reconnected at once
        channel.unsubscribe(watch)
