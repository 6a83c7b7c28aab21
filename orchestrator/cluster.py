"""Joining a Ray cluster or starting a local instance, safely: what ``eac run`` and ``eac tune`` call
before any actor starts (``connect``).

- A local instance listens on the loopback interface only (``init_loopback_ray``), its token is
  readable by its owner only (``private_token``), its session directory is not world-writable, and
  its processes are recorded so that a run killed before it could stop them has them reaped by the
  next run (``reap_leftovers``).
- Joining a cluster at an address (``HOST:PORT`` or ``auto``) gives up after a bounded time with one
  line naming the address (``ClusterError``); a Ray Client address (``ray://``) is refused at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import ray
from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR  # set by Ray's job supervisor

# Settings that actors on other machines of a cluster must see as the driver does; an object store's
# endpoint and region too (its credentials stay out of the job's runtime_env, which the dashboard
# shows: nodes take theirs from their own environment or instance role).
FORWARDED_ENVIRONMENT = ("EAC_OFFLINE", "HF_HUB_OFFLINE", "EAC_CACHE_DIR", "EAC_DATA_DIR", "AWS_ENDPOINT_URL",
                         "AWS_REGION", "AWS_DEFAULT_REGION")




def forwarded_environment() -> dict[str, str]:
    """The ``FORWARDED_ENVIRONMENT`` settings this process has, less those that the runtime environment
    of the Ray job it runs in already gives every process of the job (``ray job submit --runtime-env-json``
    or ``JobSubmissionClient.submit_job(runtime_env=...)``): Ray refuses a driver whose ``ray.init`` sets
    one of those again (ValueError: Failed to merge the Job's runtime env ... because of a conflict)."""
    job = json.loads(os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR) or "{}")
    given = (job.get("runtime_env") or {}).get("env_vars") or {}
    return {name: os.environ[name] for name in FORWARDED_ENVIRONMENT if name in os.environ and name not in given}


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


CONNECT_TIMEOUT_SECONDS = 30.0  # joining a cluster: `eac run --connect-timeout` changes it


class ClusterError(RuntimeError):
    """A cluster that cannot be joined (or a local instance that cannot be started): one line naming
    the address."""


def join_address(address: str, timeout: float) -> str:
    """The ``host:port`` to join for ``--address`` (``auto``: the cluster Ray finds on this machine),
    once something answers there within ``timeout`` seconds; a ``ClusterError`` otherwise. A TCP
    connection refused or unanswered is found here in at most ``timeout`` seconds, where ``ray.init``
    would retry without end."""
    from ray._private.services import canonicalize_bootstrap_address

    if "://" in address:
        raise ClusterError(f"--address {address}: Ray Client addresses (ray://) are not supported (the driver "
                           "streams every actor's events); run eac on a node of the cluster with --address "
                           "HOST:PORT (the head's GCS address) or auto")
    resolved = address
    if address == "auto":  # Ray's lookup: RAY_ADDRESS, the last `ray start` on this machine, a running GCS
        try:
            resolved = canonicalize_bootstrap_address(address)
        except (ConnectionError, ValueError, OSError) as exc:
            raise ClusterError(f"--address {address}: {' '.join(str(exc).split())}") from None
        if resolved is None:
            raise ClusterError(f"--address {address}: no Ray cluster found on this machine (leave out --address "
                               "for a local instance)")
    # Given HOST:PORT is joined as given (Ray would turn 127.0.0.1 into the machine's routable address,
    # where a loopback-only instance does not listen).
    host, _, port = resolved.rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise ClusterError(f"--address {address}: expected HOST:PORT (the head's GCS address) or auto")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise ClusterError(f"--address {address}: no Ray cluster answers at {host}:{port} ({reason}, "
                           f"waited at most {timeout:g} s)") from None
    return resolved


def init_within(timeout: float, address: str, shown: str | None = None, **options) -> None:
    """``ray.init(address=...)``, given up after ``timeout`` seconds (a server that accepts connections
    but is not a healthy Ray head leaves ``ray.init`` waiting without end); Ray's own errors as one line."""
    outcome: dict = {}

    def attempt():
        try:
            ray.init(address=address, **options)
            outcome["ok"] = True
        except Exception as exc:  # noqa: BLE001 - reported below as one line naming the address
            outcome["error"] = exc

    import logging

    # Ray warns that a driver connecting from another thread cannot set its SIGTERM handler: we keep ours.
    worker_logger = logging.getLogger("ray._private.worker")
    level = worker_logger.level
    worker_logger.setLevel(logging.ERROR)
    thread = threading.Thread(target=attempt, name="ray-connect", daemon=True)
    thread.start()
    thread.join(timeout)
    worker_logger.setLevel(level)
    if "ok" in outcome:
        return
    if "error" in outcome:
        exc = outcome["error"]
        raise ClusterError(f"--address {shown or address}: {type(exc).__name__}: "
                           f"{' '.join(str(exc).split())[:300]}") from None
    raise ClusterError(f"--address {shown or address}: the Ray cluster there did not accept this driver within "
                       f"{timeout:g} s (--connect-timeout)")


def private_token() -> None:
    """Ray's token authentication reads ``~/.ray/auth_token`` and writes it there when missing, with
    the process's umask (0644: anyone on the machine could read it and run code in the job). Keep the
    directory 0700 and the file 0600, writing a fresh token ourselves when there is none. A token given
    in the environment (``RAY_AUTH_TOKEN``) or at another path (``RAY_AUTH_TOKEN_PATH``) is the user's."""
    from ray._private.authentication.authentication_token_generator import generate_new_authentication_token

    if os.environ.get("RAY_AUTH_TOKEN"):
        return
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.parent.stat().st_uid == os.getuid():
        path.parent.chmod(0o700)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        path.chmod(0o600)
        return
    with os.fdopen(descriptor, "w") as handle:
        handle.write(generate_new_authentication_token())


def private_session() -> None:
    """The instance's session directory on this machine (logs, sockets, runtime environments) for its
    owner only: Ray makes it world-writable (0777), and again whenever a driver joins."""
    from ray._private import worker

    node = getattr(worker, "_global_node", None)
    session = node.get_session_dir_path() if node is not None else None
    if session and os.path.isdir(session) and os.stat(session).st_uid == os.getuid():
        os.chmod(session, 0o700)


# ---- processes a local instance leaves behind when its driver is killed ----

def instances_dir() -> Path:
    from workers import settings

    return settings.cache_dir() / "ray-instances"


def process_start(pid: int) -> str | None:
    """The process's start time since boot (clock ticks, /proc/PID/stat field 22): with the pid, it names
    one process for good (a pid alone may be reused). None when there is no such process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[19]


def descendants(pid: int) -> list[int]:
    """The process's children, their children, ... (from /proc; empty where there is none)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if entry.name.isdigit():
            try:
                parent = int(Path(entry, "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, stack = [], list(children.get(pid, []))
    while stack:
        child = stack.pop()
        found.append(child)
        stack.extend(children.get(child, []))
    return found


def record_instance() -> Path | None:
    """Write down this driver's Ray processes (pid and start time), so that a run after a SIGKILL can
    stop what this one could not. Removed by ``forget_instance`` when the instance shuts down."""
    me = os.getpid()
    processes = {pid: process_start(pid) for pid in descendants(me)}
    processes = {pid: start for pid, start in processes.items() if start is not None}
    if not processes:
        return None
    path = instances_dir() / f"{me}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"driver": [me, process_start(me)], "processes": sorted(processes.items())}))
    return path


def forget_instance() -> None:
    (instances_dir() / f"{os.getpid()}.json").unlink(missing_ok=True)


def reap_leftovers(grace: float = 3.0) -> list[int]:
    """Stop the recorded processes of local instances whose driver is gone (killed before it could
    shut them down: Ray's agents outlive it), each only if it is still the very process recorded (same
    pid and start time). Returns the pids stopped."""
    directory = instances_dir()
    stopped = []
    for record in sorted(directory.glob("*.json")) if directory.is_dir() else ():
        try:
            data = json.loads(record.read_text())
            (driver, driver_start), processes = data["driver"], data["processes"]
        except (OSError, ValueError, KeyError, TypeError):
            record.unlink(missing_ok=True)
            continue
        if process_start(int(driver)) == driver_start:
            continue  # its driver is alive: the instance is in use
        alive = [int(pid) for pid, start in processes if process_start(int(pid)) == start]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + grace
            while alive and time.monotonic() < deadline:
                alive = [pid for pid, start in processes if process_start(int(pid)) == start]
                time.sleep(0.1)
            if not alive:
                break
        stopped += [int(pid) for pid, _ in processes]
        record.unlink(missing_ok=True)
    return stopped


@contextlib.contextmanager
def handlers_kept():
    """``ray.init`` sets its own SIGTERM handler (``sys.exit(15)``) in the driver; keep the caller's
    (``eac run`` stops on SIGTERM as on Ctrl-C)."""
    main = threading.current_thread() is threading.main_thread()
    saved = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if main and callable(saved):
            signal.signal(signal.SIGTERM, saved)


def init_loopback_ray(**options) -> None:
    """Start a local Ray instance whose servers listen on the loopback interface only.

    Anyone who can reach one of Ray's ports and pass its authentication can run code in the job (Ray
    2.60 turns token authentication on for a local instance, but ``RAY_AUTH_MODE=disabled`` or an
    older Ray has none), so a local run must not listen on the machine's other interfaces. The
    address the instance got is checked."""
    reap_leftovers()
    private_token()
    with loopback_node(), handlers_kept():
        # "local": a new instance. With no address, ray.init joins the last cluster started on this
        # machine (a `ray start`, another run's launcher, a test's), whose shutdown then kills our actors.
        ray.init(address="local", **options)
    address = ray.util.get_node_ip_address()
    if address not in LOOPBACK:
        ray.shutdown()
        raise RuntimeError(f"the local Ray instance took the address {address}, not loopback; refusing to "
                           "run with servers reachable from other machines (join a cluster with --address)")
    private_session()
    record_instance()


def is_loopback_address(address: str) -> bool:
    """``host:port`` on this machine's loopback interface (not ``auto``, not a ``ray://`` client)."""
    if "://" in address or ":" not in address:
        return False
    host = address.rsplit(":", 1)[0].strip("[]")
    return host in LOOPBACK or host == "localhost"


def shutdown() -> None:
    """``ray.shutdown()``, and this driver's record of its local instance goes with it."""
    ray.shutdown()
    forget_instance()


def connect(address: str | None = None, timeout: float = CONNECT_TIMEOUT_SECONDS) -> bool:
    """Join the Ray cluster at ``address``, or start a loopback-only local instance; forward the
    settings actors must see. False when Ray was already initialised (the caller's to shut down).

    A driver joining an instance that listens on loopback (one ``eac run`` started, or ``ray start
    --node-ip-address 127.0.0.1``) must take the loopback node address too: with the machine's
    routable one, Ray looks for a raylet at that address and waits for it without end. Joining gives
    up after ``timeout`` seconds (``ClusterError``)."""
    if ray.is_initialized():
        return False
    options = dict(runtime_env={"env_vars": forwarded_environment()}, logging_level="WARNING")
    if address:  # the user's explicit choice: the cluster's own network settings apply, loopback's if it is one
        resolved = join_address(address, timeout)
        with loopback_node() if is_loopback_address(resolved) else contextlib.nullcontext(), handlers_kept():
            init_within(timeout, resolved, shown=address, **options)
        private_session()  # a driver joining makes the session directory world-writable again
    else:
        init_loopback_ray(include_dashboard=False, **options)
    return True
