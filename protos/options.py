"""gRPC channel and server options for every BAGEL endpoint (both services, the client): message
size limits and keepalive. Plain data beside the contract, so the client needs no torch for it.

Frames are at most a chunk (16 MiB max) plus a few bytes, events at most a PNG or raw latents,
so 64 MiB covers both with room; keepalive finds a dead peer during a long denoising call.
"""

from __future__ import annotations

MAX_MESSAGE_BYTES = 64 << 20
KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 10_000

Options = list[tuple[str, int]]


def channel_options(*, max_message_bytes: int = MAX_MESSAGE_BYTES) -> Options:
    """Options for a client channel to a BAGEL service."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def server_options(*, max_message_bytes: int = MAX_MESSAGE_BYTES) -> Options:
    """Options for a BAGEL service's server; they admit the clients' keepalive pings."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
        ("grpc.http2.max_ping_strikes", 0),
        # gRPC's default SO_REUSEPORT lets a second server bind a port in use and take half its
        # connections at random; without it the second server fails to start.
        ("grpc.so_reuseport", 0),
    ]
