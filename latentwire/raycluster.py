"""Joining a Ray cluster and sizing its workers: shared by `sweep --ray` and `screen`, which
each decide what a worker does. Ray is imported only inside functions, so that nothing needs it
until a command asks for it."""

import logging
import os
import socket
from dataclasses import dataclass

from .errors import UsageError
from .options import option

GROUP = "Ray (pip install 'latentwire[ray]')"

# A worker killed this many times in a row (out of memory on every try, say) is given up on;
# what it was running is reported as not run, and a rerun resumes it.
MAX_RESTARTS = 3


@dataclass
class WorkerShape:
    """What one worker (a sweep's unit, a screen's trial) takes of the cluster."""
    ray_gpus_per_worker: float | None = option(
        None, group=GROUP, metavar="N",
        help="GPUs per worker, fractions allowed; None: 1 where the cluster has GPUs, else 0")
    ray_cpus_per_worker: float = option(1.0, group=GROUP, metavar="N",
                                        help="CPUs per worker, also its torch threads")


def require_ray():
    try:
        import ray
    except ImportError:
        raise UsageError("--ray needs Ray: pip install 'latentwire[ray]' (make install does)")
    return ray


def connect(address: str) -> bool:
    """Join the cluster at `address`, else at RAY_ADDRESS, else start a local one; True when
    this call started the connection (and so should end it). A caller that is already connected
    (a notebook, the tests) keeps its own."""
    ray = require_ray()
    target = address or os.environ.get("RAY_ADDRESS") or "local"
    host, _, port = target.removeprefix("ray://").rpartition(":")
    if host and port.isdigit():
        # Ray retries an unreachable address for minutes; one refused connection says enough.
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except OSError as err:
            raise UsageError(f"cannot reach the Ray cluster at {target} ({err.strerror or err}); "
                             "start one with `ray start --head`, or pass --ray with no address "
                             "for a local Ray")
    if ray.is_initialized():
        return False
    try:
        ray.init(address=target, logging_level=logging.WARNING)
    except (ConnectionError, ValueError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"cannot reach the Ray cluster at {target} ({first}); start one with "
                         "`ray start --head`, or pass --ray with no address for a local Ray")
    return True


def worker_shape(opts: WorkerShape) -> tuple[float, float, int]:
    """(CPUs, GPUs) per worker and how many workers the cluster holds at once."""
    ray = require_ray()
    total = ray.cluster_resources()
    gpus = opts.ray_gpus_per_worker
    if gpus is None:
        gpus = 1.0 if total.get("GPU", 0) >= 1 else 0.0
    cpus = opts.ray_cpus_per_worker
    capacity = 0
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        have = node.get("Resources", {})
        fit = int(have.get("CPU", 0) // cpus)
        if gpus:
            fit = min(fit, int(have.get("GPU", 0) // gpus))
        capacity += fit
    if capacity < 1:
        raise UsageError(f"no node of the Ray cluster has {cpus:g} CPUs and {gpus:g} GPUs for a "
                         f"worker (the cluster has {total.get('CPU', 0):g} CPUs, "
                         f"{total.get('GPU', 0):g} GPUs); lower --ray_cpus_per_worker / "
                         "--ray_gpus_per_worker")
    return cpus, gpus, capacity
