"""`ConformerSslProcessorWithLM`: transformers' `Wav2Vec2ProcessorWithLM` (a feature extractor, a CTC tokenizer and a
pyctcdecode beam-search decoder with a kenlm n-gram LM) for our log-mel feature extractor.

Why a subclass: `Wav2Vec2ProcessorWithLM.__init__` accepts only the Wav2Vec2 and SeamlessM4T feature extractors by
class name, and its `from_pretrained` calls a `ProcessorMixin` helper that transformers 5 no longer has; both are
redone here with the Auto classes. The rest is inherited: `save_pretrained` writes `alphabet.json` and `language_model/` next to the
processor files, `from_pretrained` reads them back (alpha, beta included), `batch_decode(logits)` beam-searches.
The class name ends in "WithLM", which is how `pipeline("automatic-speech-recognition", model=<folder>)` knows to
load the folder's decoder and decode with the LM. Imports nothing beyond transformers (pyctcdecode is imported
when a decoder is built or loaded).
"""

from __future__ import annotations

import json
import os

from transformers import PretrainedConfig, Wav2Vec2ProcessorWithLM
from transformers.processing_utils import ProcessorMixin


class ConformerSslProcessorWithLM(Wav2Vec2ProcessorWithLM):
    def __init__(self, feature_extractor, tokenizer, decoder):
        from pyctcdecode import BeamSearchDecoderCTC

        ProcessorMixin.__init__(self, feature_extractor, tokenizer)
        if not isinstance(decoder, BeamSearchDecoderCTC):
            raise TypeError(f"decoder: a pyctcdecode.BeamSearchDecoderCTC is needed, got {type(decoder).__name__}")
        missing = self.get_missing_alphabet_tokens(decoder, tokenizer)
        if missing:
            raise ValueError(
                f"decoder: the tokenizer's tokens {sorted(missing)} are not in the decoder's alphabet; build the "
                "decoder from the tokenizer's vocabulary (hf_ssl_speech.finetune.lm.ctc_labels)"
            )
        self.decoder = decoder

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """`Wav2Vec2ProcessorWithLM.save_pretrained`, plus `processor_class` inside the nested feature-extractor
        entry of processor_config.json: the ASR pipeline looks for the LM only when the feature extractor's dict
        names a "...WithLM" class, and transformers 5 writes the name one level up (legacy folders had it in
        preprocessor_config.json)."""
        super().save_pretrained(save_directory, **kwargs)
        config_file = os.path.join(save_directory, "processor_config.json")
        with open(config_file, encoding="utf-8") as handle:
            config = json.load(handle)
        if isinstance(config.get("feature_extractor"), dict):
            config["feature_extractor"]["processor_class"] = type(self).__name__
            with open(config_file, "w", encoding="utf-8") as handle:
                json.dump(config, handle, indent=2, sort_keys=True)
                handle.write("\n")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> ConformerSslProcessorWithLM:
        """The feature extractor and tokenizer through the Auto classes, the decoder from `alphabet.json` and
        `language_model/` of the folder (or Hub repo). `alpha`, `beta`, `unk_score_offset`, `score_boundary`
        override the saved LM weights."""
        from pyctcdecode import BeamSearchDecoderCTC
        from transformers import AutoFeatureExtractor, AutoTokenizer

        overrides = {k: kwargs.pop(k) for k in ("alpha", "beta", "unk_score_offset", "score_boundary") if k in kwargs}
        kwargs.pop("_from_auto", None)
        path = str(pretrained_model_name_or_path)
        feature_extractor = AutoFeatureExtractor.from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        if not os.path.isdir(path):
            from huggingface_hub import snapshot_download

            hub = {k: kwargs[k] for k in ("revision", "token", "cache_dir") if kwargs.get(k) is not None}
            path = snapshot_download(path, allow_patterns=["alphabet.json", "language_model/*"], **hub)
        decoder = BeamSearchDecoderCTC.load_from_dir(path)
        for attribute, value in overrides.items():
            cls._set_language_model_attribute(decoder, attribute, value)
        return cls(feature_extractor=feature_extractor, tokenizer=tokenizer, decoder=decoder)


class ConformerSslLmProcessorKey(PretrainedConfig):
    """A key no model uses: `AutoProcessor` resolves a saved `processor_class` by name among registered classes,
    and registering ours under `ConformerSslConfig` would also make it the default processor of encoder folders."""

    model_type = "conformer_ssl_processor_with_lm"
