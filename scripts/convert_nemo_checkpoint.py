"""Convert a NeMo `.nemo` checkpoint (Conformer / FastConformer: CTC, NEST, SSL) into a transformers folder.

    python scripts/convert_nemo_checkpoint.py model.nemo out_dir [--license cc-by-4.0] [--drop-unmappable]
                                                                  [--encoder-only]

NeMo is not needed: the archive is read directly and the weights are loaded with `weights_only=True`. The output
folder loads with `AutoModel*.from_pretrained` / `AutoFeatureExtractor.from_pretrained` (and `AutoProcessor` for
character CTC models); README.md names the source checkpoint and its licence, nemo_conversion.json lists every NeMo
key that was not carried over and every approximation. See docs/nemo.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("nemo_file", type=Path, help="the .nemo archive to convert")
    parser.add_argument("out_dir", type=Path, help="folder to write the transformers model into")
    parser.add_argument(
        "--license",
        default=None,
        help="licence of the source weights for the model card (default: from the .nemo config, else "
        "'unknown — check the source')",
    )
    parser.add_argument(
        "--drop-unmappable",
        action="store_true",
        help="convert what maps exactly and list the rest in the model card instead of refusing "
        "(objectives whose heads cannot be mapped are removed; no weight is left random)",
    )
    parser.add_argument(
        "--encoder-only",
        action="store_true",
        help="convert the preprocessor and encoder only (any ConformerEncoder model, e.g. RNN-T/TDT), as AutoModel",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Imported here: torch and transformers take seconds to load, after the quick path check (_preflight.py).
    from hf_ssl_speech.errors import check_paths
    from hf_ssl_speech.interop.nemo import NemoConversionError, convert_nemo, save_conversion

    try:
        check_paths([args.nemo_file], "nemo_file")
        conversion = convert_nemo(
            args.nemo_file, license=args.license, drop_unmappable=args.drop_unmappable, encoder_only=args.encoder_only
        )
    except (NemoConversionError, ValueError, FileNotFoundError) as error:  # ValueError: config validation
        print(f"error: {error}", file=sys.stderr)
        return 2
    out_dir = save_conversion(conversion, args.out_dir)
    model = conversion.model
    print(
        f"{args.nemo_file} (NeMo {conversion.nemo_class}) -> {out_dir} ({type(model).__name__}, "
        f"{sum(p.numel() for p in model.parameters()):,} parameters, licence: {conversion.license})"
    )
    dropped = {k: v for k, v in conversion.dropped.items() if not k.startswith("preprocessor.featurizer.")}
    for key, why in sorted(dropped.items()):
        print(f"  dropped {key}: {why}")
    for note in conversion.notes:
        print(f"  note: {note}")
    return 0


if __name__ == "__main__":
    from _preflight import preflight

    preflight(lambda errors, argv: errors.check_paths([parse_args(argv).nemo_file], "nemo_file"))
    from hf_ssl_speech.errors import run_command

    sys.exit(run_command(main))
