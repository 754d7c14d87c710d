"""Joining Ray, for the two things that run on it: `ferkit sweep --parallel` (training) and `ferkit predict --ray`
(inference). Low level on purpose (like shared_files and device): both layers import it, neither imports the
other. Ray comes with the `cluster` extra and is imported only when called.
"""

from __future__ import annotations

from typing import Any

INSTALL_HINT = "pip install 'ferkit[cluster]'"


class RayStartError(RuntimeError):
    """Ray cannot be joined at the address asked for; the message says where and why."""


def import_ray() -> Any:
    """The `ray` module, or ImportError naming the extra to install."""
    try:
        import ray
    except ImportError as e:
        raise ImportError(f"Ray is not installed: {INSTALL_HINT} ({e})") from e
    return ray


def connect(address: str, num_cpus: int | None = None) -> bool:
    """Join Ray at `address` ("local": start a private one on this machine, bound to 127.0.0.1, with `num_cpus`
    CPUs (default: all); "auto": the cluster `ray start` made this machine part of; or host:port /
    ray://host:port). Reuses a Ray this process already joined. True when this call started it (so the caller
    shuts it down). RayStartError when Ray cannot be started or reached (ray.init raises ConnectionError,
    ValueError, RuntimeError... depending on what is wrong)."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    try:
        if address == "local":
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                     log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    except Exception as e:  # noqa: BLE001  whatever ray.init raises, the caller gets one clear error
        hint = (" (is a cluster running? `ray start --head` on this machine, or use the address 'local' for a "
                "private Ray)" if address == "auto" else "")
        raise RayStartError(f"cannot join Ray at {address!r}: {type(e).__name__}: {e}{hint}") from e
    return True
