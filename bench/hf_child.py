"""The Hugging Face reference of a benchmark runs in a child process, so that torch and JAX keep
separate GPU allocators: the child prints one tagged JSON line, the parent reads it back."""

import json
import statistics
import subprocess
import sys

TAG = "HF_JSON "


def emit(result: dict) -> None:
    """In the child: print the result as the one tagged line the parent looks for."""
    print(TAG + json.dumps(result), flush=True)


def run(script: str, argv: list[str], timeout: float = 900) -> dict:
    """Runs `python script argv...` and returns the child's tagged JSON, or {"error": ...} with
    the tail of its output when it printed none (the benchmark's JAX side still runs)."""
    try:
        res = subprocess.run(
            [sys.executable, script, *argv], capture_output=True, text=True, timeout=timeout
        )
    except Exception as e:  # noqa: BLE001
        return {"error": repr(e)}
    for line in res.stdout.splitlines():
        if line.startswith(TAG):
            return json.loads(line[len(TAG) :])
    return {"error": (res.stderr or res.stdout)[-600:]}


def cuda_median_ms(fn, steps: int, warmup: int = 2) -> float:
    """In the child: median milliseconds of fn() between CUDA events, a sync after each call."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(steps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)
