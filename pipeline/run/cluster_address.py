"""What answers at a Ray cluster address, asked before `ray.init`: nothing, a dashboard, or a GCS that wants a token."""

from __future__ import annotations

import socket

from pipeline.config import ConfigError

HTTP_PROBE = b"GET /api/version HTTP/1.0\r\n\r\n"  # a dashboard answers "HTTP/1.x ..."; a GCS (gRPC) never does
GCS_PROBE_METHOD = "/ray.rpc.NodeInfoGcsService/GetClusterId"  # the first call ray.init makes; its request is empty
GCS_ADVICE = "the head's GCS, HOST:6379 by default, or 'auto' on a cluster node"
TOKEN_SOURCES = "RAY_AUTH_MODE=token with RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH"


def check_address(address: str | None, timeout_s: float) -> None:
    """Refuse, within seconds, an address that `ray.init` would hang on, wait on, or that cannot run Ray Data.

    `ray.init` waits forever on the dashboard's HTTP port and 20 s on a GCS that rejects its token, then reports
    neither; Ray Client (`ray://`) connects but Ray Data fails under it.

    Args:
        address: `execution.address`: None, "auto", "local" or HOST:PORT of the head's GCS.
        timeout_s: how long each probe waits for an answer.

    Raises:
        ConfigError: a `ray://` or `http://` address, nothing listening, an HTTP server, or a GCS that refuses
            this process's token; the message names the address to use instead.
    """
    if not address or address in ("auto", "local"):
        return
    if "://" in address:
        raise ConfigError(_scheme_advice(address))
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"--address {address} is not HOST:PORT; pass {GCS_ADVICE}")
    try:
        connection = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s)
    except OSError as error:
        raise ConfigError(f"cannot reach the Ray cluster at {address} ({error}); check --address ({GCS_ADVICE})") from None
    with connection:
        answer = _first_bytes(connection)
    if answer.startswith(b"HTTP/"):
        raise ConfigError(
            f"--address {address} answers HTTP: it is the Ray dashboard (the job API), not the head's GCS. Pass {GCS_ADVICE}; "
            f"or run the job through the dashboard with `lgca submit --address http://{address}`, which also ships this code"
        )
    problem = token_problem(address, timeout_s)
    if problem:
        raise ConfigError(problem)


def token_problem(address: str, timeout_s: float) -> str | None:
    """Why the GCS at HOST:PORT refuses this process's auth token, or None when it accepts it (or needs none).

    Sends the token `ray.init` would send: the one Ray finds when RAY_AUTH_MODE is "token".

    Args:
        address: HOST:PORT of a GCS.
        timeout_s: how long to wait for its answer.

    Returns:
        A message naming the fix, or None (accepted, not a GCS, or no answer: ray.init reports those).
    """
    import grpc  # type: ignore[import-untyped]
    from ray._raylet import AuthenticationTokenLoader  # type: ignore[attr-defined]  # compiled; absent from Ray's stub

    loader = AuthenticationTokenLoader.instance()
    metadata = tuple(loader.get_token_for_http_header().items()) if loader.has_token() else ()
    with grpc.insecure_channel(address) as channel:
        get_cluster_id = channel.unary_unary(GCS_PROBE_METHOD)  # no serializers: the empty request is b""
        try:
            get_cluster_id(b"", timeout=timeout_s, metadata=metadata)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNAUTHENTICATED:
                return None
            if metadata:
                return (
                    f"the Ray cluster at {address} rejected this process's auth token; set the cluster's token "
                    f"({TOKEN_SOURCES}; `ray get-auth-token` on the head prints it). The address itself is right"
                )
            return (
                f"the Ray cluster at {address} requires token authentication and this process has no token: set {TOKEN_SOURCES} "
                "to the cluster's token (`ray get-auth-token` on the head prints it; docs/OPERATIONS.md, Token authentication). "
                "The address itself is right"
            )
    return None


def join_failure(address: str | None, error: Exception, timeout_s: float) -> str:
    """What to tell about a failed `ray.init`: a token problem (Ray only logs it, and raises a bare ConnectionError), else the address.

    Args:
        address: the address ray.init was given.
        error: what ray.init raised: ConnectionError, RuntimeError or Ray's AuthenticationError.
        timeout_s: how long the token probe waits.

    Returns:
        The message, naming the fix.
    """
    from ray.exceptions import AuthenticationError

    where = f"cannot join the Ray cluster at {address or 'auto'}: {str(error).splitlines()[0]}"
    if isinstance(error, AuthenticationError):  # RAY_AUTH_MODE=token, and no token found
        return f"{where}; set {TOKEN_SOURCES} to the cluster's token (docs/OPERATIONS.md, Token authentication)"
    is_host_port = bool(address) and ":" in str(address) and "://" not in str(address)
    problem = token_problem(str(address), timeout_s) if is_host_port else None
    return f"{where}; {problem}" if problem else f"{where}; check --address ({GCS_ADVICE})"


def _first_bytes(connection: socket.socket) -> bytes:
    """The start of the server's answer to an HTTP request; empty when it closes or stays silent (a gRPC server)."""
    try:
        connection.sendall(HTTP_PROBE)
        return connection.recv(5)
    except OSError:
        return b""


def _scheme_advice(address: str) -> str:
    scheme = address.partition("://")[0].lower()
    if scheme == "ray":
        return (
            f"--address {address} is a Ray Client address, and Ray Data jobs fail under Ray Client. Submit the job instead: "
            "`lgca submit --address http://HEAD:8265` (ships this code); or run on a cluster node with --address auto, "
            "or pass HEAD:6379 (the GCS)"
        )
    if scheme in ("http", "https"):
        return (
            f"--address {address} is a dashboard URL; `lgca run` joins a cluster through {GCS_ADVICE}. "
            f"To run through the dashboard use `lgca submit --address {address}`, which also ships this code"
        )
    return f"--address {address}: pass {GCS_ADVICE}"
