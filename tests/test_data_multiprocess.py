"""Two gloo processes (accelerate launch on CPU) × two dataloader workers: every example exactly once per
epoch, the same number of batches on both ranks, and resume after an interruption loses or repeats nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

WORKER = r"""
import json, sys
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from hf_ssl_speech.data import build_dataloader

manifest, out_path = sys.argv[1], sys.argv[2]
accelerator = Accelerator()
kwargs = dict(batch_seconds=3.0, num_workers=2, rank=accelerator.process_index,
              world_size=accelerator.num_processes, seed=11, return_waveforms=True, return_ids=True)

def run(loader, stop_after=None):
    ids, batches = [], 0
    for batch in loader:
        ids += batch["ids"]
        batches += 1
        # One collective per step, as DDP does: a rank with fewer batches would hang (or fail) here.
        torch.distributed.all_reduce(torch.ones(1))
        if stop_after is not None and batches == stop_after:
            break
    return ids, batches

full_ids, full_batches = run(build_dataloader(manifest, **kwargs))
interrupted = build_dataloader(manifest, **kwargs)
before, _ = run(interrupted, stop_after=2)
state = json.loads(json.dumps(interrupted.state_dict()))  # one data state per rank, as a checkpoint holds it
resumed = build_dataloader(manifest, **kwargs)
resumed.load_state_dict(state)
after, _ = run(resumed)
report = {"rank": accelerator.process_index, "world": accelerator.num_processes, "full": full_ids,
          "batches": full_batches, "before": before, "after": after, "bad": resumed.counter.total_bad}
gathered = gather_object([report])
if accelerator.is_main_process:
    with open(out_path, "w") as handle:
        json.dump(gathered, handle)
accelerator.wait_for_everyone()
accelerator.end_training()  # tear gloo down before exit: left to atexit a rank can abort while its peer is gone
"""


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_two_workers_exactly_once_and_resume(tmp_path: Path):
    rng = np.random.default_rng(0)
    rows = []
    (tmp_path / "audio").mkdir()
    for index in range(30):
        seconds = float(rng.uniform(0.6, 1.8))
        path = tmp_path / "audio" / f"u{index:02d}.flac"
        sf.write(path, (0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32), 16000)
        rows.append(json.dumps({"audio_filepath": f"audio/{path.name}", "duration": seconds}))
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("\n".join(rows) + "\n")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "report.json"
    accelerate = Path(sys.executable).with_name("accelerate")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [
        str(accelerate),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(script),
        str(manifest),
        str(out),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    reports = json.loads(out.read_text())
    expected = sorted(f"audio/u{index:02d}" for index in range(30))
    assert [r["rank"] for r in reports] == [0, 1] and reports[0]["world"] == 2
    full = [i for r in reports for i in r["full"]]
    assert sorted(full) == expected  # each example once, on exactly one rank
    assert reports[0]["batches"] == reports[1]["batches"]  # no rank waits for the other at the epoch end
    assert set(reports[0]["full"]).isdisjoint(reports[1]["full"])
    for report in reports:  # per rank: interrupted + resumed = the uninterrupted epoch, in the same order
        assert report["before"] + report["after"] == report["full"]
        assert report["bad"] == 0
