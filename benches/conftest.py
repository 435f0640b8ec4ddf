import json

from qdelta.machine import machine_info as machine_info  # the benches import it from here

_machine_info = machine_info


def pytest_benchmark_update_machine_info(config, machine_info):  # pytest names it so
    machine_info["qdelta_machine"] = json.loads(json.dumps(_machine_info()))
