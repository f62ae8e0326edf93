"""What a tensor-parallel rank reads and holds while loading: its slices of the safetensors files, a layer at a time,
against loading the whole checkpoint and cutting it.

    python benchmarks/tp_loading.py            -> benchmarks/results/tp-loading.{json,md}

The checkpoint is the 40B-shaped Falcon of ``tensor_parallel.py`` (about 340 MB in float32), built on this machine.
Each way of loading runs rank 0 of 2 in a fresh process: its peak resident memory (``VmHWM``) above what the
same process held once torch and transformers were imported, the bytes it read from the files (counted at ``os.preadv``; the
whole load reads through safetensors' own mapping, so it counts the file's size), the seconds taken, and the size
of the shard it kept.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

CHILD = r"""
import json, os, sys, time
import torch, transformers  # noqa: F401 - imported before the baseline
from predictor.engine.model import layerwise
from predictor.engine.model.loading import LoadSpec, load_engine
from predictor.engine.parallel import sharding
from predictor.engine.parallel.sharding import shard_model

way, source = sys.argv[1], sys.argv[2]
baseline = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1024  # resident now, KiB
read = []
preadv = os.preadv
layerwise.os.preadv = lambda *args: read.append(preadv(*args)) or read[-1]
spec = LoadSpec(source, device="cpu")
started = time.perf_counter()
if way == "slices":
    model = sharding._read_shard(spec, 0, 2)[0]
    nread = sum(read)
else:
    engine = load_engine(spec)
    shard_model(engine.model, engine.shape, 0, 2)
    model = engine.model
    nread = sum(path.stat().st_size for path in __import__("pathlib").Path(source).glob("*.safetensors"))
seconds = time.perf_counter() - started
kept = sum(t.numel() * t.element_size() for t in model.state_dict().values())
peak = next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith('VmHWM:'))  # KiB
print(json.dumps(dict(way=way, peak_above_imports_mb=(peak - baseline) / 1024, read_mb=nread / 2**20,
                      kept_mb=kept / 2**20, seconds=seconds)))
"""


def main() -> None:
    from tensor_parallel import build_checkpoint

    source = build_checkpoint(Path(tempfile.gettempdir()) / "falcon-tp-bench")
    rows = []
    for way in ("whole", "slices"):
        done = subprocess.run([sys.executable, "-c", CHILD, way, str(source)], capture_output=True, text=True,
                              check=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    table = ["| rank 0 of 2 loads | peak memory above imports MB | read from the files MB | shard kept MB | seconds |",
             "|---|---|---|---|---|"]
    for row in rows:
        table.append(f"| {row['way']} | {row['peak_above_imports_mb']:.0f} | {row['read_mb']:.0f} | "
                     f"{row['kept_mb']:.0f} | {row['seconds']:.2f} |")
    out = REPO / "benchmarks" / "results" / "tp-loading"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(dict(machine=dict(platform=platform.platform(),
                                                                     load_avg=os.getloadavg()), rows=rows), indent=2))
    out.with_suffix(".md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
