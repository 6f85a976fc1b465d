#!/usr/bin/env python
"""Give a fine-tuned CTC folder an n-gram word LM, so transcribe.py and pipeline() decode with beam search + LM.

    python scripts/build_lm.py runs/ctc_demo --text lm_sentences.txt                       # irstlm 3-gram
    python scripts/build_lm.py runs/ctc_demo --arpa my.arpa --alpha 0.6 --beta 1.5          # an existing ARPA LM
    python scripts/build_lm.py runs/ctc_demo --text lm.txt --valid_manifest valid.jsonl     # weights tuned there

`--text` (one sentence per line, disjoint from the sentences you will test on) is turned into an ARPA LM by
Debian's irstlm (`apt-get install irstlm`); `--arpa` takes one from anywhere (KenLM lmplz, SRILM). The LM and
its weights are saved into the folder as a `Wav2Vec2ProcessorWithLM` (alphabet.json, language_model/). With
`--valid_manifest`, alpha and beta are chosen by WER on that manifest over the `--alphas` x `--betas` grid.
The work is `hf_ssl_speech.finetune.lm`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="fine-tuned CTC folder (finetune_ctc.py output)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="LM training sentences, one per line (built with irstlm)")
    source.add_argument("--arpa", help="an ARPA n-gram LM to use as is")
    parser.add_argument("--order", type=int, default=3, help="n-gram order when building from --text")
    parser.add_argument("--alpha", type=float, default=0.5, help="LM weight (without --valid_manifest)")
    parser.add_argument("--beta", type=float, default=1.0, help="word insertion bonus (without --valid_manifest)")
    parser.add_argument("--valid_manifest", help="JSONL manifest with text: choose alpha and beta on it")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.3, 0.6, 1.0])
    parser.add_argument("--betas", type=float, nargs="+", default=[0.0, 1.5])
    parser.add_argument("--beam_width", type=int, default=24)
    return parser.parse_args(argv)


def check_paths(errors, args: argparse.Namespace) -> None:
    """Every path argument, before any work (`errors` is hf_ssl_speech.errors; see _preflight.py)."""
    errors.check_paths([args.model], "model", "folder")  # local only: the LM is written into it
    errors.check_model_source(args.model, "model")
    for flag in ("text", "arpa", "valid_manifest"):
        if getattr(args, flag):
            errors.check_paths([getattr(args, flag)], f"--{flag}")


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    # Imported here: torch and transformers take seconds to load, after the quick path checks (_preflight.py).
    import hf_ssl_speech  # noqa: F401  (registers the conformer_ssl classes with the Auto factories)
    from hf_ssl_speech import errors
    from hf_ssl_speech.finetune.lm import attach_lm, build_arpa, save_lm, tune_lm_weights

    check_paths(errors, args)
    folder = Path(args.model)
    if args.text:
        arpa = build_arpa(
            Path(args.text).read_text(encoding="utf-8").splitlines(), folder / f"lm_{args.order}gram.arpa", args.order
        )
    else:
        arpa = Path(args.arpa)
    processor_lm = attach_lm(folder, arpa, alpha=args.alpha, beta=args.beta, save=False)
    alpha, beta, table = args.alpha, args.beta, []
    if args.valid_manifest:
        from hf_ssl_speech.finetune.inference import load_validation_outputs

        references, log_probs = load_validation_outputs(folder, args.valid_manifest)
        alpha, beta, table = tune_lm_weights(
            processor_lm, log_probs, references, args.alphas, args.betas, args.beam_width
        )
    save_lm(processor_lm, folder, alpha=alpha, beta=beta)
    if args.text:
        arpa.unlink()  # the folder's language_model/ holds its own copy
    summary = {"model": str(folder), "alpha": alpha, "beta": beta, "grid": table}
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    from _preflight import preflight

    preflight(lambda errors, argv: check_paths(errors, parse(argv)))
    from hf_ssl_speech.errors import run_command

    sys.exit(run_command(main))
