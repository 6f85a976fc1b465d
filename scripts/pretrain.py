#!/usr/bin/env python
"""Self-supervised pretraining from a YAML recipe (a thin wrapper over `hf_ssl_speech.pretrain.cli.pretrain_main`).

    accelerate launch scripts/pretrain.py --config configs/pretrain/nest_fastconformer.yaml train.max_steps=1000
    accelerate launch scripts/pretrain.py --config configs/pretrain/nest_fastconformer.yaml --resume
    python scripts/pretrain.py        # tiny NEST demo: builds ./demo_corpus, a few CPU minutes

Several CPU processes (gloo): ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 scripts/pretrain.py ...
The loop itself is hf_ssl_speech/pretrain/loop.py.
"""

from hf_ssl_speech.pretrain.cli import pretrain_main

if __name__ == "__main__":
    raise SystemExit(pretrain_main())
