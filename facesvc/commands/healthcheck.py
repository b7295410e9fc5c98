"""``python -m facesvc.commands.healthcheck``: exit 0 when the local facesvc reports SERVING.

The container's HEALTHCHECK runs this: it asks the standard ``grpc.health.v1``
service, the same one load balancers use, so the container is healthy exactly
when the service can take scans (models loaded, Redis reachable). The target
defaults to the configured gRPC port on loopback; TLS settings are honoured.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from facesvc.config import ConfigError, Settings, load_settings
from facesvc.serve.health import FACESVC_SERVICE


def _channel(target: str, settings: Settings) -> grpc.Channel:
    sec = settings.security
    if sec.tls_cert is None:
        return grpc.insecure_channel(target)
    # With mTLS the probe presents the server's own certificate as its client identity.
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(sec.tls_ca or sec.tls_cert).read_bytes(),
        private_key=sec.tls_key.read_bytes() if sec.tls_ca and sec.tls_key else None,
        certificate_chain=sec.tls_cert.read_bytes() if sec.tls_ca else None,
    )
    return grpc.secure_channel(target, credentials)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m facesvc.commands.healthcheck", description=__doc__
    )
    parser.add_argument("--target", help="host:port (default: 127.0.0.1:<server.grpc_port>)")
    parser.add_argument("--service", default=FACESVC_SERVICE, help="service name to check")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds")
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"healthcheck: {exc}", file=sys.stderr)
        return 2
    target = args.target or f"127.0.0.1:{settings.server.grpc_port}"
    with _channel(target, settings) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as exc:
            print(f"healthcheck: {target}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{target} {args.service}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
