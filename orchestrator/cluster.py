"""Joining a Ray cluster or starting a local instance, safely: what ``eac run`` and ``eac tune`` call
before any actor starts (``connect``).

- A local instance listens on the loopback interface only (``init_loopback_ray``).
- Joining a cluster at an address gives up after a bounded time, with one line naming the address.
"""

from __future__ import annotations

import contextlib
import os

import ray

# Settings that actors on other machines of a cluster must see as the driver does; an object store's
# endpoint and region too (its credentials stay out of the job's runtime_env, which the dashboard
# shows: nodes take theirs from their own environment or instance role).
FORWARDED_ENVIRONMENT = ("EAC_OFFLINE", "HF_HUB_OFFLINE", "EAC_CACHE_DIR", "EAC_DATA_DIR", "AWS_ENDPOINT_URL",
                         "AWS_REGION", "AWS_DEFAULT_REGION")


LOOPBACK = ("127.0.0.1", "::1")
# Ray's switch for single-node instances (what it does by default on Windows and macOS): the node's
# address is then the loopback one, and every server of the instance (GCS, raylet, object manager,
# workers, agents) binds to that address instead of the machine's routable one.
SINGLE_NODE_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def loopback_node():
    """Ray's single-node switch on for the block: a node this process starts or joins takes the
    loopback address. Ray reads the switch when it is imported, so it is set in the environment (for
    the processes an instance starts) and in this process's copy of Ray's constants."""
    from ray._private import ray_constants  # no public API sets the node address to loopback

    saved_env, saved_flag = os.environ.get(SINGLE_NODE_SWITCH), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[SINGLE_NODE_SWITCH] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(SINGLE_NODE_SWITCH, None)
        else:
            os.environ[SINGLE_NODE_SWITCH] = saved_env


def init_loopback_ray(**options) -> None:
    """Start a local Ray instance whose servers listen on the loopback interface only.

    Anyone who can reach one of Ray's ports and pass its authentication can run code in the job (Ray
    2.60 turns token authentication on for a local instance, but ``RAY_AUTH_MODE=disabled`` or an
    older Ray has none), so a local run must not listen on the machine's other interfaces. The
    address the instance got is checked."""
    with loopback_node():
        ray.init(**options)
    address = ray.util.get_node_ip_address()
    if address not in LOOPBACK:
        ray.shutdown()
        raise RuntimeError(f"the local Ray instance took the address {address}, not loopback; refusing to "
                           "run with servers reachable from other machines (join a cluster with --address)")


def is_loopback_address(address: str) -> bool:
    """``host:port`` on this machine's loopback interface (not ``auto``, not a ``ray://`` client)."""
    if "://" in address or ":" not in address:
        return False
    host = address.rsplit(":", 1)[0].strip("[]")
    return host in LOOPBACK or host == "localhost"


def connect(address: str | None = None) -> bool:
    """Join the Ray cluster at ``address``, or start a loopback-only local instance; forward the
    settings actors must see. False when Ray was already initialised (the caller's to shut down).

    A driver joining an instance that listens on loopback (one ``eac run`` started, or ``ray start
    --node-ip-address 127.0.0.1``) must take the loopback node address too: with the machine's
    routable one, Ray looks for a raylet at that address and waits for it without end."""
    if ray.is_initialized():
        return False
    env = {name: os.environ[name] for name in FORWARDED_ENVIRONMENT if name in os.environ}
    options = dict(runtime_env={"env_vars": env}, logging_level="WARNING")
    if address:  # the user's explicit choice: the cluster's own network settings apply, loopback's if it is one
        with loopback_node() if is_loopback_address(address) else contextlib.nullcontext():
            ray.init(address=address, **options)
    else:
        init_loopback_ray(include_dashboard=False, **options)
    return True
