"""One benchmark configuration in its own process: `python -m benchmarks.worker TASK --params JSON --result FILE`.

The suites start this module once per configuration (see `common.run_worker`). A task is
resolved lazily from `TASKS`, so a process that measures ORT never imports torch and the
other way round; the result dict is written as JSON to `--result` (stdout stays free for
whatever ORT or torch print).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from benchmarks.common import peak_rss_bytes

# task name -> "module:function"; each function takes the params dict and returns a JSON-able dict.
TASKS: dict[str, str] = {
    "accuracy_train": "benchmarks.accuracy:train_task",
    "convergence_snr": "benchmarks.convergence:snr_task",
    "convergence_cache": "benchmarks.convergence:cache_task",
    "convergence_train": "benchmarks.convergence:train_task",
    "bandwidth": "benchmarks.layers:bandwidth_task",
    "layer_exact": "benchmarks.layers:exact_task",
    "layer_filtered": "benchmarks.layers:filtered_task",
    "layer_model_file": "benchmarks.layers:model_file_task",
    "ort_train": "benchmarks.training:ort_task",
    "torch_train": "benchmarks.training:torch_task",
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.worker", description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=sorted(TASKS))
    parser.add_argument("--params", required=True, help="JSON object with the configuration")
    parser.add_argument("--result", required=True, type=Path, help="where to write the JSON result")
    args = parser.parse_args(argv)
    # Before the task imports anything: shows that ru_maxrss starts small, i.e. nothing was
    # inherited from the launching process (see common.run_worker).
    maxrss_at_start = peak_rss_bytes()
    # Other processes on the machine are the main source of timing noise: keep the load with each number.
    load_at_start = os.getloadavg()[0]
    module_name, function_name = TASKS[args.task].split(":")
    task = getattr(importlib.import_module(module_name), function_name)
    result = task(json.loads(args.params))
    result["worker"] = {
        "task": args.task,
        "maxrss_at_start_bytes": maxrss_at_start,
        "loadavg_1min_start": round(load_at_start, 2),
        "loadavg_1min_end": round(os.getloadavg()[0], 2),
    }
    args.result.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
