"""Speech data pipeline: sources → epoch plan → decoded, bucketed, padded batches, exactly once per epoch.

The parts, in the order data flows through them:

1. **Sources** give raw examples (a path or bytes plus metadata) by row number, and the estimated
   duration of every row up front: `ManifestSource` (NeMo JSONL), `TarShardSource` (webdataset-layout
   tar shards, read with `tarfile`), `DatasetSource` (any map-style `datasets.Dataset` with a path or bytes
   column: json / csv / parquet builders). `StreamingDatasetSource` wraps a streaming
   `datasets.IterableDataset`, which has no row numbers (see "Streaming" below).
2. **The epoch plan** (`plan_epoch`) is a pure function of (durations, weights, seed, epoch): filter by
   duration, repeat/subsample each source by its weight, shuffle, sort windows of `bucket_window` rows by
   duration, pack each window into batches of at most `batch_seconds` padded seconds, shuffle the batches,
   and split a few batches so their number divides by the number of processes. Process `rank` takes
   batches `rank, rank + world_size, ...`; its dataloader worker `w` takes every `num_workers`-th of those.
   Every process computes the same plan, so no data is exchanged, every example is used exactly once per
   epoch, and all processes get the same number of batches (a DDP step never waits for a process that ran
   out of data).
3. **Decoding** (`decode_example`, in the dataloader workers) reads, crops, mixes to mono, checks and
   resamples one example (see `audio_io`). A bad example is dropped from its batch and reported with the
   batch; `BadExampleCounter` in the main process counts it by reason, logs it (rate-limited) and stops the
   run with `TooManyBadExamplesError` once the bad fraction exceeds `max_bad_fraction`.
4. **The collator** (`SpeechCollator`) pads: log-mel features from the feature extractor, or raw waveforms
   plus lengths for featurising on the accelerator.
5. **`SpeechDataLoader`** runs a `torch.utils.data.DataLoader` over the plan and keeps the data position
   (epoch, batches consumed), so `state_dict()` / `load_state_dict()` resume with the next unseen batch, in
   the same order as an uninterrupted run.

Use with accelerate: build one loader per process with `rank=accelerator.process_index,
world_size=accelerator.num_processes` and do **not** pass it to `accelerator.prepare` (accelerate would
shard it a second time, and its default `dispatch_batches=True` fails on variable-length batches; docs/architecture.md
§5). Move batches to the device with `batch[k].to(accelerator.device)`.

Streaming: a streaming dataset cannot be planned globally. Each (process, worker) pair reads a disjoint part
of the stream (whole shards round robin; shards left over when their number does not divide by the number of
parts are shared by rows, so parts stay balanced) and buckets it in windows; the loader then never ends (each
part restarts with a new shuffle when exhausted), so train for a number of steps. Resuming replays the
metadata of the stream (no decoding) up to the saved position. docs/architecture.md §6 has the details.
"""

from .audio_io import BAD_REASONS, AudioError, load_audio, probe_duration, read_audio
from .collate import SpeechCollator
from .config import DataConfig
from .decode import decode_example
from .loader import BadExampleCounter, SpeechDataLoader, TooManyBadExamplesError, build_dataloader
from .plan import EpochPlan, pack_sorted, plan_epoch
from .sources import (
    DatasetSource,
    ManifestSource,
    RawExample,
    StreamingDatasetSource,
    TarShardSource,
    open_source,
    parse_metadata,
    webdataset_key,
)

__all__ = [
    "BAD_REASONS",
    "AudioError",
    "BadExampleCounter",
    "DataConfig",
    "DatasetSource",
    "EpochPlan",
    "ManifestSource",
    "RawExample",
    "SpeechCollator",
    "SpeechDataLoader",
    "StreamingDatasetSource",
    "TarShardSource",
    "TooManyBadExamplesError",
    "build_dataloader",
    "decode_example",
    "load_audio",
    "open_source",
    "pack_sorted",
    "parse_metadata",
    "plan_epoch",
    "probe_duration",
    "read_audio",
    "webdataset_key",
]
