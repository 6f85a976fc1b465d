#!/usr/bin/env python
"""Make the built-in demo corpus (multi-voice English speech + NeMo manifests), offline and deterministic.

    python scripts/make_demo_corpus.py --out data/demo --minutes 30 [--seed 0] [--test-voices espeak:f2 ...]
        [--noise 0.3 --noise-types white pink babble --snr-db 5 20] [--engines auto|espeak flite festival]

See hf_ssl_speech/synthetic/corpus.py for what is written and how speakers and splits are made.
"""

import sys

from hf_ssl_speech.synthetic.corpus import main

if __name__ == "__main__":
    sys.exit(main())
