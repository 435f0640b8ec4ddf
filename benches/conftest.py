import json
import os
import platform
from pathlib import Path


def machine_info() -> dict:
    """What the numbers were measured on, stored beside them."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform()}


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["qdelta_machine"] = json.loads(json.dumps(globals()["machine_info"]()))
