"""Joining a Ray cluster, sizing its workers and watching that it stays: shared by `sweep --ray`,
`study --ray` and `screen`, which each decide what a worker does. Ray is imported only inside
functions, so that nothing needs it until a command asks for it."""

import logging
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

from .errors import UsageError
from .memory import keep_freed_memory
from .options import option

GROUP = "Ray (pip install 'latentwire[ray]')"

# A worker killed this many times in a row (out of memory on every try, say) is given up on;
# what it was running is reported as not run, and a rerun resumes it.
MAX_RESTARTS = 3

# A cluster that looks gone for this long is taken as gone for good. Long enough to ride out a
# head that restarts or a node that is replaced; short of the minute after which Ray itself ends
# a driver whose head stopped answering, with a fatal log instead of a line that says what to do.
GRACE_S = 20.0
POLL_S = 2.0
NODES_S = 10.0
AGAIN = "run the same command again, on a cluster or without --ray here, to continue from it"


@dataclass
class WorkerShape:
    """What one worker (a sweep's unit, a screen's trial) takes of the cluster."""
    ray_gpus_per_worker: float | None = option(
        None, group=GROUP, metavar="N",
        help="GPUs per worker, fractions allowed; unset: 1 where the cluster has GPUs, else 0")
    ray_cpus_per_worker: float = option(1.0, group=GROUP, metavar="N",
                                        help="CPUs per worker, also its torch threads")


def driver(cpus: float) -> dict:
    """What a Ray worker takes of the driver to run as the command would: its working directory
    (the flags' relative paths are the driver's), its command line (what a run's provenance
    records; the worker's own is Ray's) and its torch threads (its CPUs)."""
    return {"cwd": os.getcwd(), "argv": list(sys.argv), "threads": max(1, int(cpus))}


def as_driver(context: dict, tag: str):
    """In a Ray worker, before a run: the command's allocator tuning, the driver's `context`
    (see `driver`). Returns the run's log, every line tagged: Ray's log deduplication would
    merge untagged lines of runs side by side."""
    import torch

    keep_freed_memory()
    torch.set_num_threads(context["threads"])
    os.chdir(context["cwd"])
    sys.argv = context["argv"]

    def log(text: str) -> None:
        print("\n".join(f"[{tag}] {line}" for line in text.splitlines()), flush=True)

    return log


def check(shape: WorkerShape, on_ray: bool) -> None:
    """The worker flags, before anything starts: they need a cluster to size."""
    if not on_ray and (shape.ray_gpus_per_worker is not None or shape.ray_cpus_per_worker != 1.0):
        raise UsageError("--ray_gpus_per_worker and --ray_cpus_per_worker need --ray")
    if shape.ray_cpus_per_worker <= 0 or (shape.ray_gpus_per_worker or 0) < 0:
        raise UsageError("--ray_cpus_per_worker must be above 0 and --ray_gpus_per_worker at "
                         "least 0")


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


def workers_on(nodes: list, cpus: float, gpus: float) -> int:
    """How many workers of this shape the live ones of `nodes` (ray.nodes()) hold at once."""
    capacity = 0
    for node in nodes:
        if not node.get("Alive"):
            continue
        have = node.get("Resources", {})
        fit = int(have.get("CPU", 0) // cpus)
        if gpus:
            fit = min(fit, int(have.get("GPU", 0) // gpus))
        capacity += fit
    return capacity


def worker_shape(opts: WorkerShape) -> tuple[float, float, int]:
    """(CPUs, GPUs) per worker and how many workers the cluster holds at once."""
    ray = require_ray()
    total = ray.cluster_resources()
    gpus = opts.ray_gpus_per_worker
    if gpus is None:
        gpus = 1.0 if total.get("GPU", 0) >= 1 else 0.0
    cpus = opts.ray_cpus_per_worker
    capacity = workers_on(ray.nodes(), cpus, gpus)
    if capacity < 1:
        raise UsageError(f"no node of the Ray cluster has {cpus:g} CPUs and {gpus:g} GPUs for a "
                         f"worker (the cluster has {total.get('CPU', 0):g} CPUs, "
                         f"{total.get('GPU', 0):g} GPUs); lower --ray_cpus_per_worker / "
                         "--ray_gpus_per_worker")
    return cpus, gpus, capacity


@contextmanager
def session(address: str, shape: WorkerShape, where: str, again: str = AGAIN):
    """On the cluster (see `connect`) for the block, which gets (CPUs, GPUs, workers at once) as
    `worker_shape` gives them, while a watcher ends the command should the cluster go away (see
    `watch`; `where` is the output folder and `again` how to continue, for its one line). A
    connection this call started is ended after the block."""
    started = connect(address)
    try:
        cpus, gpus, capacity = worker_shape(shape)
        stop = threading.Event()
        watcher = threading.Thread(target=watch, args=(cpus, gpus, f"{where}: {again}", stop), daemon=True,
                                   name="latentwire-ray-watch")
        watcher.start()
        try:
            yield cpus, gpus, capacity
        finally:
            stop.set()
            watcher.join()
    finally:
        if started:
            require_ray().shutdown()


def lost(head: str, cpus: float, gpus: float) -> str | None:
    """What is missing of the cluster, or None while its head answers and a live node can hold
    a worker. The head is probed over TCP first: every Ray call blocks while it is away."""
    host, _, port = head.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=POLL_S).close()
    except OSError as err:
        return f"its head at {head} stopped answering ({err.strerror or err})"
    # A head killed just after the probe leaves Ray's call waiting for it, for up to its own
    # timeout (tens of seconds), which the grace period would then start after: asked on the
    # side, an answer later than that counts as no answer.
    answer: list = []

    def ask():
        try:
            answer.append(require_ray().nodes())
        except Exception:  # a call that fails on a lost head is no answer, like one that hangs
            pass

    asking = threading.Thread(target=ask, daemon=True, name="latentwire-ray-nodes")
    asking.start()
    asking.join(NODES_S)
    if not answer:
        return f"its head at {head} did not list its nodes within {NODES_S:.0f} s"
    nodes = answer[0]
    if workers_on(nodes, cpus, gpus) < 1:
        dead = sum(not n.get("Alive") for n in nodes)
        return (f"no live node can run a worker of {cpus:g} CPUs and {gpus:g} GPUs ({dead} of "
                f"{len(nodes)} nodes lost)")
    return None


def watch(cpus: float, gpus: float, kept: str, stop: threading.Event) -> None:
    """Until `stop`: every POLL_S, whether the cluster is still there. Gone for GRACE_S, the
    command ends here with exit 1 and one line (`kept`: where its results are, and how to go
    on). It cannot be ended from the command's own
    thread: that one waits in Ray (ray.wait, or Tune's loop), whose calls and clean-up block on
    a lost head, and so would Ray's own exit handlers. Every result is already on disk (each is
    written whole, then renamed), so ending the process loses none of them."""
    head = require_ray().get_runtime_context().gcs_address
    since = None
    while not stop.wait(POLL_S):
        problem = lost(head, cpus, gpus)
        if problem is None:
            since = None
            continue
        since = since or time.monotonic()
        if time.monotonic() - since >= GRACE_S and not stop.is_set():
            sys.stdout.flush()
            print(f"error: lost the Ray cluster: {problem}, for {GRACE_S:.0f} s. Everything "
                  f"finished before is kept in {kept}", file=sys.stderr, flush=True)
            os._exit(1)
