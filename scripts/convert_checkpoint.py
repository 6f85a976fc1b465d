"""Convert any supported speech encoder into our transformers format, or one of ours back.

    python scripts/convert_checkpoint.py SRC OUT [--license L] [--drop-unmappable] [--encoder-only]
    python scripts/convert_checkpoint.py SRC OUT --to wav2vec2_bert|parakeet [--head ctc|rnnt|tdt --vocab-size N]

SRC is detected (hf_ssl_speech/interop/convert.py):
  - a NeMo `.nemo` file (Conformer / FastConformer CTC, NEST, SSL; see docs/nemo.md);
  - a folder or Hub repo of Wav2Vec2BertModel / Wav2Vec2BertForCTC (e.g. facebook/w2v-bert-2.0);
  - a folder or Hub repo of ParakeetEncoder / ParakeetForCTC / ParakeetForRNNT / ParakeetForTDT.
OUT is a save_pretrained folder that `AutoModel.from_pretrained` loads (after `import hf_ssl_speech`).

With `--to`, SRC is a folder of ours (converted, or pretrained here: runs/<run>/model) and OUT is written in the
target's own classes: `Wav2Vec2BertModel/ForCTC` (w2v-BERT architecture) or `ParakeetEncoder`, or a Parakeet
CTC / RNN-T / TDT model with a fresh head (`--head`, `--vocab-size`) to fine-tune with stock transformers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="a .nemo file, a model folder, or a Hub repo id")
    parser.add_argument("out_dir", type=Path, help="folder to write the converted model into")
    parser.add_argument(
        "--to", choices=("wav2vec2_bert", "parakeet"), default=None, help="convert a folder of ours back into this"
    )
    parser.add_argument(
        "--head",
        choices=("encoder", "ctc", "rnnt", "tdt"),
        default="encoder",
        help="--to parakeet: the encoder alone, or ParakeetForCTC / ForRNNT / ForTDT with a new head",
    )
    parser.add_argument(
        "--vocab-size", type=int, default=None, help="--head ctc|rnnt|tdt: tokenizer size (blank included)"
    )
    parser.add_argument("--license", default=None, help=".nemo: licence of the source weights for the model card")
    parser.add_argument(
        "--drop-unmappable",
        action="store_true",
        help=".nemo: convert what maps exactly and list the rest in the model card instead of refusing",
    )
    parser.add_argument("--encoder-only", action="store_true", help=".nemo: convert the preprocessor and encoder only")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Imported here: torch and transformers take seconds to load, after the quick path check (_preflight.py).
    from hf_ssl_speech.interop.convert import export_model, load_source, parameter_count, save_source

    if args.to is not None:
        model, out_dir = export_model(args.src, args.to, args.out_dir, head=args.head, vocab_size=args.vocab_size)
        print(f"{args.src} -> {out_dir} ({type(model).__name__}, {parameter_count(model):,} parameters)")
        return 0
    if args.src.endswith(".nemo") and args.encoder_only:
        from hf_ssl_speech.interop.convert import ConversionError, SourceModel
        from hf_ssl_speech.interop.nemo import NemoConversionError, convert_nemo

        try:
            conversion = convert_nemo(args.src, license=args.license, encoder_only=True)
        except NemoConversionError as error:
            raise ConversionError(str(error)) from error
        source = SourceModel(
            conversion.model, conversion.feature_extractor, "nemo", f"NeMo {conversion.nemo_class} ({args.src})",
            nemo=conversion,
        )  # fmt: skip
    else:
        source = load_source(args.src, drop_unmappable=args.drop_unmappable, license=args.license)
    if source.family == "ours":
        from hf_ssl_speech.interop.convert import ConversionError

        raise ConversionError(
            f"{args.src} is already a conformer_ssl model: load it with AutoModel.from_pretrained, or pass "
            "--to wav2vec2_bert|parakeet to convert it back"
        )
    out_dir = save_source(source, args.out_dir)
    model = source.model
    print(f"{source.description} -> {out_dir} ({type(model).__name__}, {parameter_count(model):,} parameters)")
    for note in source.notes:
        print(f"  note: {note}")
    return 0


def _check_source(errors, argv: list[str]) -> None:
    """Before torch loads: a local SRC that is not there (a .nemo file, or a folder without config.json)."""
    src = parse_args(argv).src
    if src.endswith(".nemo"):
        errors.check_paths([src], "SRC")
    else:
        errors.check_model_source(src, "SRC")


if __name__ == "__main__":
    from _preflight import preflight

    preflight(_check_source)
    from hf_ssl_speech.errors import run_command

    sys.exit(run_command(main))
