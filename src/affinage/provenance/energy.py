"""Energy and carbon estimate of a training run.

    energy (kWh) = device-hours × power per device (kW) × PUE
    emissions (g CO2e) = energy × grid carbon intensity (g CO2e/kWh)

Device-hours are the training loop's wall time (``train_runtime`` of every session, resumed ones
included) times the number of GPUs (the world size on a GPU run). Defaults, each replaceable in
the recipe's ``card:`` section (or by a cluster profile's ``gpu_power_w``/``pue`` when it has them):

* **power**: the GPU's thermal design power from :data:`GPU_POWER_W` (an upper bound: GPUs rarely
  run at TDP the whole time), 400 W for an unknown GPU; on CPU, 10 W per core used;
* **PUE** 1.2 (an assumption for a modern HPC centre; ask your centre for its figure);
* **grid** 60 g CO2e/kWh for France: a round life-cycle figure for the French electricity mix
  (yearly averages were roughly 50–75 g in the early 2020s, RTE éCO2mix / ADEME Base Empreinte).

Node CPUs, memory, network and storage are not counted, nor the manufacture of the hardware.
"""

from __future__ import annotations

from typing import Optional

#: thermal design power in watts, matched on the CUDA device name (first match wins)
GPU_POWER_W: tuple[tuple[str, float], ...] = (
    ("H200", 700.0),
    ("H100 PCIe", 350.0),
    ("H100 NVL", 400.0),
    ("H100", 700.0),          # SXM (Jean Zay gpu_p6)
    ("GH200", 900.0),
    ("A100-PCIE", 300.0),
    ("A100 PCIe", 300.0),
    ("A100", 400.0),          # SXM (Jean Zay gpu_p5)
    ("V100", 300.0),          # SXM2 (Jean Zay gpu_p13)
    ("L40S", 350.0),
    ("L40", 300.0),
    ("A40", 300.0),
    ("A10", 150.0),
    ("L4", 72.0),
    ("T4", 70.0),
    ("MI300X", 750.0),
    ("MI250X", 280.0),        # per GCD: a 560 W MI250X module is seen as two devices (LUMI-G)
    ("MI250", 280.0),
)
DEFAULT_GPU_W = 400.0
CPU_W_PER_CORE = 10.0
DEFAULT_PUE = 1.2
GRID_GCO2_PER_KWH = {"France": 60.0}
DEFAULT_GRID = 60.0


def gpu_power(name: Optional[str]) -> tuple[float, str]:
    if name:
        for key, watts in GPU_POWER_W:
            if key.lower() in name.lower():
                return watts, f"TDP of {key} (affinage table)"
    return DEFAULT_GPU_W, "unknown GPU: default 400 W"


def estimate(*, device_seconds: Optional[float], devices: int, device_kind: str, device_name: Optional[str] = None,
             cpu_cores: Optional[int] = None, power_w: Optional[float] = None, pue: Optional[float] = None,
             grid_gco2_per_kwh: Optional[float] = None, location: str = "France") -> dict:
    """Energy (kWh) and emissions (g CO2e) of the training loop, with every assumption spelled out."""
    assumptions = []
    if power_w is not None:
        watts, why = float(power_w), "given (card.gpu_power_w or cluster profile)"
    elif device_kind == "gpu":
        watts, why = gpu_power(device_name)
    else:
        cores = cpu_cores or 1
        watts, why = CPU_W_PER_CORE * cores, f"CPU: {CPU_W_PER_CORE:.0f} W per core × {cores} cores"
        devices = 1
    assumptions.append(f"power {watts:.0f} W per device ({why})")
    pue_v = DEFAULT_PUE if pue is None else float(pue)
    assumptions.append(f"PUE {pue_v:g}" + (" (default assumption)" if pue is None else ""))
    if grid_gco2_per_kwh is not None:
        grid, gwhy = float(grid_gco2_per_kwh), "given"
    else:
        grid = GRID_GCO2_PER_KWH.get(location, DEFAULT_GRID)
        gwhy = f"default for {location}" if location in GRID_GCO2_PER_KWH else f"no default for {location!r}: French value used"
    assumptions.append(f"grid {grid:g} g CO2e/kWh ({gwhy})")
    if device_seconds is None:
        return {"kwh": None, "co2e_g": None, "device_hours": None, "assumptions": assumptions,
                "summary": "training time unknown"}
    hours = device_seconds * devices / 3600
    kwh = hours * watts / 1000 * pue_v
    co2 = kwh * grid
    unit = "GPU" if device_kind == "gpu" else "CPU"
    return {
        "device_kind": device_kind,
        "devices": devices,
        "device_hours": hours,
        "power_w": watts,
        "pue": pue_v,
        "grid_gco2_per_kwh": grid,
        "location": location,
        "kwh": kwh,
        "co2e_g": co2,
        "assumptions": assumptions,
        "summary": f"{hours:.3g} {unit}-hours × {watts:.0f} W × PUE {pue_v:g} × {grid:g} g/kWh",
    }
