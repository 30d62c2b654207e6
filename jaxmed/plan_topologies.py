"""Named compile targets for `jaxmed.plan`: TPU slices (compiled for without a TPU, through
libtpu's deviceless topology API) and this machine's CPU.

A TPU name is the Cloud TPU accelerator type (``v5e-8``: 8 chips of v5e; ``v4-8`` and
``v5p-8``: 4 chips, since those names count TensorCores and each chip holds two). Per-chip
peak and memory are Google's published figures (docs.cloud.google.com/tpu/docs/v4, /v5e,
/v5p, /v6e): peak dense bf16 matrix throughput and HBM per chip. Slice shapes follow
MaxText's ``accelerator_to_spec_map.py``.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import os

import jax
from jax.experimental import topologies

INSTALL_HINT = "pip install 'jaxmed[tpu-plan]'"


class TopologyError(ValueError):
    """An unknown topology name, or no libtpu to compile for a TPU."""


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    peak_tflops: float  # dense bf16, per chip
    hbm_gib: float  # per chip


CHIPS = {
    "v4": Chip("TPU v4", 275.0, 32.0),
    "v5e": Chip("TPU v5e", 197.0, 16.0),
    "v5p": Chip("TPU v5p", 459.0, 95.0),
    "v6e": Chip("TPU v6e", 918.0, 32.0),
}


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str
    platform: str  # "tpu" | "cpu"
    chips: int
    chip: Chip | None = None  # None: this machine's CPU
    topology: str = ""  # libtpu's topology name, e.g. "v5e:2x4"
    chip_config: str = "default"
    host_bounds: tuple[int, int, int] = (1, 1, 1)
    wrap: tuple[bool, bool, bool] = (False, False, False)
    accelerator_type: str = ""  # what a TPU VM reports in TPU_ACCELERATOR_TYPE

    @property
    def peak_flops(self) -> float | None:
        return self.chip.peak_tflops * 1e12 if self.chip else None

    @property
    def capacity_bytes(self) -> int:
        """Memory per chip; for ``cpu``, the host's physical memory."""
        if self.chip:
            return int(self.chip.hbm_gib * 2**30)
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    @property
    def chip_name(self) -> str:
        return self.chip.name if self.chip else "CPU host"


def _tpu(name: str, family: str, shape: str, chips: int, *, megacore: bool = False,
         bounds=(2, 2, 1), accel: str = "") -> Topology:
    gen = {"v5p": "v5"}.get(family, family)  # libtpu calls the v5p "v5"
    return Topology(name, "tpu", chips, CHIPS[family], f"{gen}:{shape}",
                    "megacore" if megacore else "default", bounds,
                    accelerator_type=accel or name)


TOPOLOGIES: dict[str, Topology] = {t.name: t for t in (
    _tpu("v5e-1", "v5e", "1x1", 1, bounds=(1, 1, 1), accel="v5litepod-1"),
    _tpu("v5e-4", "v5e", "2x2", 4, accel="v5litepod-4"),
    _tpu("v5e-8", "v5e", "2x4", 8, accel="v5litepod-8"),
    _tpu("v5e-16", "v5e", "4x4", 16, accel="v5litepod-16"),
    _tpu("v5e-32", "v5e", "4x8", 32, accel="v5litepod-32"),
    _tpu("v4-8", "v4", "2x2x1", 4, megacore=True),
    _tpu("v4-16", "v4", "2x2x2", 8, megacore=True),
    _tpu("v4-32", "v4", "2x2x4", 16, megacore=True),
    _tpu("v5p-8", "v5p", "2x2x1", 4, megacore=True),
    _tpu("v5p-16", "v5p", "2x2x2", 8, megacore=True),
    _tpu("v6e-1", "v6e", "1x1", 1, bounds=(1, 1, 1)),
    _tpu("v6e-4", "v6e", "2x2", 4),
    _tpu("v6e-8", "v6e", "2x4", 8),
    _tpu("v6e-16", "v6e", "4x4", 16),
    Topology("cpu", "cpu", 1),
)}


def get(name: str) -> Topology:
    if name in TOPOLOGIES:
        return TOPOLOGIES[name]
    close = difflib.get_close_matches(name, TOPOLOGIES, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise TopologyError(f"unknown topology {name!r}{hint}; choose one of "
                        f"{', '.join(TOPOLOGIES)}")


def require_libtpu() -> None:
    """TopologyError (one line: how to install it) unless libtpu can be imported."""
    try:
        importlib.import_module("libtpu")
    except ImportError as err:
        raise TopologyError(
            f"compiling for a TPU topology needs libtpu, which is not installed ({err}); "
            f"{INSTALL_HINT} (or pip install 'jax[tpu]' matching your jax)") from None


def prepare_environment(topo: Topology) -> None:
    """Environment for a deviceless TPU compile on a machine without TPUs. Only fills what
    is unset, and only before libtpu starts (it reads these once): no metadata server to
    ask, no lock on the (absent) chips, and the worker list and accelerator type it would
    otherwise warn about."""
    if topo.platform != "tpu":
        return
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    # Compiling attaches no TPU, so other processes doing the same need not wait for us.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", topo.accelerator_type)


def devices(topo: Topology) -> list:
    """The devices to build a mesh of: the topology's (not attached: compile only), or the
    CPU devices of this process for ``cpu``."""
    if topo.platform == "cpu":
        devs = jax.devices("cpu")
        return devs
    require_libtpu()
    prepare_environment(topo)
    desc = topologies.get_topology_desc(
        platform="tpu", topology_name=topo.topology, chip_config_name=topo.chip_config,
        chips_per_host_bounds=topo.host_bounds, num_slices=1, wrap=topo.wrap)
    devs = list(desc.devices)
    if len(devs) != topo.chips:
        raise TopologyError(f"topology {topo.name}: libtpu made {len(devs)} devices, "
                            f"expected {topo.chips}")
    return devs
