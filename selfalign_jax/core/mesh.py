"""Device mesh for training: axes ('data', 'fsdp', 'tensor'), parsed from `data=N,fsdp=N,tensor=N`.

Parameters are placed by `model.ShardingRules` (logical axis -> mesh axis); batches are split over
data x fsdp. The mesh uses Auto axis types (GSPMD propagation), so matmuls whose contracting
dimension is sharded need no explicit out_sharding.
"""

from __future__ import annotations

import math
import os
import socket
import time

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from selfalign_jax.core.errors import UserError

AXES = ("data", "fsdp", "tensor")


def compute_dtype(dtype: str | None = "auto") -> str:
    """The one dtype rule: "auto" (or None) is float32 on CPU (faster there) and bfloat16 on
    accelerators; anything else is returned as given."""
    if dtype in (None, "auto"):
        return "float32" if jax.default_backend() == "cpu" else "bfloat16"
    return dtype
BATCH = ("data", "fsdp")


def parse_mesh(spec: str | dict | None, n_devices: int | None = None) -> dict[str, int]:
    """{'data': d, 'fsdp': f, 'tensor': t} from 'data=2,fsdp=4,tensor=1' (missing axes are 1; one
    axis may be -1 = the remaining devices). None or '' puts every device on fsdp."""
    n = jax.device_count() if n_devices is None else n_devices
    if not spec:
        return {"data": 1, "fsdp": n, "tensor": 1}
    if isinstance(spec, dict):
        sizes = {k: int(v) for k, v in spec.items()}
    else:
        sizes = {}
        for part in str(spec).split(","):
            if not part.strip():
                continue
            k, eq, v = part.partition("=")
            k = k.strip()
            if not eq or k not in AXES:
                raise UserError(f"--mesh: bad entry {part!r} (expected data=N,fsdp=N,tensor=N)")
            if k in sizes:
                raise UserError(f"--mesh: axis {k!r} given twice")
            try:
                sizes[k] = int(v)
            except ValueError:
                raise UserError(f"--mesh: {k}={v!r} is not an integer") from None
    bad = [k for k in sizes if k not in AXES]
    if bad:
        raise UserError(f"--mesh: unknown axis {bad[0]!r} (axes: data, fsdp, tensor)")
    sizes = {a: sizes.get(a, 1) for a in AXES}
    free = [a for a, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise UserError("--mesh: at most one axis may be -1")
    if any(v < 1 for a, v in sizes.items() if a not in free):
        raise UserError(f"--mesh: axis sizes must be >= 1 (got {sizes})")
    if free:
        rest = math.prod(v for a, v in sizes.items() if a not in free)
        if n % rest:
            raise UserError(f"--mesh: {n} devices are not divisible by {rest}")
        sizes[free[0]] = n // rest
    if math.prod(sizes.values()) != n:
        raise UserError(f"--mesh: data*fsdp*tensor = {math.prod(sizes.values())} but there are {n} devices "
                        f"({', '.join(f'{k}={v}' for k, v in sizes.items())})")
    return sizes


def make_mesh(spec: str | dict | None = None, devices=None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh over `devices` (default: all), Auto axis types."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh(spec, len(devices))
    shape = tuple(sizes[a] for a in AXES)
    try:  # topology-aware order on TPU/GPU; plain reshape elsewhere
        from jax.experimental import mesh_utils

        arr = mesh_utils.create_device_mesh(shape, devices)
    except Exception:  # noqa: BLE001 - any failure: fall back to the listed order
        arr = np.array(devices, dtype=object).reshape(shape)
    return Mesh(arr, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def batch_size_multiple(mesh: Mesh) -> int:
    """Rows of a batch must be a multiple of this (data x fsdp)."""
    return math.prod(mesh.shape[a] for a in BATCH if a in mesh.shape)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, leading: int = 0) -> NamedSharding:
    """[*leading unsharded dims, batch, ...] with the batch over data x fsdp."""
    return NamedSharding(mesh, P(*([None] * leading), BATCH))


def put(arr: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a host array every process holds: each process transfers only the
    slices its own devices need (multi-host safe)."""
    arr = np.asarray(arr)
    return jax.make_array_from_callback(arr.shape, sharding, lambda idx: arr[idx])


def is_writer() -> bool:
    """Process 0 writes files (every process when single-process); paths name the same files on every host."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Every process waits here for the others (a no-op with one process): after process 0 wrote what they read."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def writer_only(name: str, fn) -> None:
    """fn() (a change to shared files) on process 0 only, between two barriers: every process has read the
    state it decided on before the change, and sees the change after it."""
    barrier(f"selfalign_{name}_read")
    if is_writer():
        fn()  # (when it raises, process 0 stops and the others fail at the next barrier: the heartbeat)
    barrier(f"selfalign_{name}_done")


def initialize_distributed(enabled: bool | None = None) -> None:
    """`jax.distributed.initialize()` (cluster auto-detection: TPU pods, SLURM, or the
    JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID environment). enabled=None: only
    when JAX_COORDINATOR_ADDRESS is set. Safe to call twice. A process that stops sending heartbeats
    for SELFALIGN_HEARTBEAT_S seconds (default 100) fails the others rather than leaving them waiting;
    connecting waits at most SELFALIGN_INIT_TIMEOUT_S (default 300). A failure to connect is a UserError,
    and so is a coordinator address that cannot work (`check_coordinator`), which XLA would abort the
    process on."""
    if enabled is None:
        enabled = bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))
    if not enabled:
        return
    if jax.distributed.is_initialized():
        return
    timeouts = {"heartbeat_timeout_seconds": int(os.environ.get("SELFALIGN_HEARTBEAT_S", "100")),
                "initialization_timeout": int(os.environ.get("SELFALIGN_INIT_TIMEOUT_S", "300"))}
    for name, key in (("JAX_COORDINATOR_ADDRESS", "coordinator_address"), ("JAX_NUM_PROCESSES", "num_processes"),
                      ("JAX_PROCESS_ID", "process_id")):  # jax 0.10 reads only the first from the environment
        if os.environ.get(name):
            v = os.environ[name]
            try:
                timeouts[key] = v if key == "coordinator_address" else int(v)
            except ValueError:
                raise UserError(f"{name}={v!r} is not an integer") from None
    if timeouts.get("coordinator_address"):
        check_coordinator(timeouts["coordinator_address"], timeouts.get("process_id"),
                          timeouts["initialization_timeout"])
    try:
        jax.distributed.initialize(**timeouts)
    except (RuntimeError, ValueError) as e:
        if "already" in str(e).lower():
            return
        where = os.environ.get("JAX_COORDINATOR_ADDRESS") or "auto-detected cluster"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"--distributed: cannot join the cluster ({where}, process "
                        f"{os.environ.get('JAX_PROCESS_ID', '?')} of {os.environ.get('JAX_NUM_PROCESSES', '?')}): "
                        f"{first}") from None


def check_coordinator(address: str, process_id: int | None, timeout_s: float) -> None:
    """UserError naming JAX_COORDINATOR_ADDRESS when it cannot be joined: not HOST:PORT, a host that does
    not resolve; for process 0 (which serves the coordinator on PORT) a port in use; for the others, no
    coordinator accepting TCP connections within `timeout_s` (connects of at most 2 s each, one a second:
    the coordinator may start after them)."""
    name = f"JAX_COORDINATOR_ADDRESS={address}"
    host, sep, port_s = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise UserError(f"{name}: expected HOST:PORT")
    port = int(port_s)
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UserError(f"{name}: cannot resolve host {host!r} ({e.strerror})") from None
    if process_id == 0:
        _check_port_free(name, port)
        return
    if process_id is None:
        return
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host, port), timeout=min(2.0, max(0.1, timeout_s))).close()
            return
        except OSError as e:
            if time.monotonic() + 1 >= deadline:
                raise UserError(f"{name}: no coordinator accepts connections there after {timeout_s:g} s "
                                f"({e.strerror or e}); start process 0 first, or check the address and the "
                                "firewall (SELFALIGN_INIT_TIMEOUT_S sets the wait)") from None
            time.sleep(1)


def _check_port_free(name: str, port: int) -> None:
    """Process 0 serves the coordinator on PORT of every interface: the port must be free."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as a server binds (a closed port's TIME_WAIT is free)
        s.bind(("", port))
    except OSError as e:
        raise UserError(f"{name}: process 0 serves the coordinator on port {port}, which is in use on this machine "
                        f"({e.strerror})") from None
    finally:
        s.close()
