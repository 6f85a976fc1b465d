"""Size presets mirror published model sizes (NeMo's, w2v-BERT 2.0's): parameter counts within 3%."""

from __future__ import annotations

import pytest
import torch
from transformers import ParakeetRNNTConfig

from hf_ssl_speech import ConformerSslModel
from hf_ssl_speech.interop.parakeet import to_parakeet_config
from hf_ssl_speech.presets import load_preset, preset_config, preset_names, preset_reference

NEMO_PRESETS = [name for name in preset_names() if preset_reference(name) is not None]


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _params_as_published(name: str) -> int:
    """Our encoder plus the head that NeMo's published figure counts (built on the meta device: no memory)."""
    config = preset_config(name)
    counted_with = preset_reference(name)["counted_with"]
    with torch.device("meta"):
        encoder = _count(ConformerSslModel(config))
        if counted_with == "encoder":  # w2v-BERT 2.0: the encoder alone
            return encoder
        if counted_with.startswith("ctc_head_"):  # NeMo Conformer-CTC: a linear decoder over vocab + blank
            vocab = int(counted_with.removeprefix("ctc_head_"))
            return encoder + (config.hidden_size + 1) * (vocab + 1)
        # NeMo FastConformer sizes are transducers: count a Parakeet RNN-T (transformers) of the same shape.
        from transformers import ParakeetForRNNT

        hidden_layers, vocab = counted_with.removeprefix("rnnt_").split("_vocab")
        hidden, layers = (int(v) for v in hidden_layers.split("x"))
        rnnt = ParakeetRNNTConfig(
            vocab_size=int(vocab) + 1,
            decoder_hidden_size=hidden,
            num_decoder_layers=layers,
            encoder_config=to_parakeet_config(config).to_dict(),
            blank_token_id=int(vocab),
        )
        model = ParakeetForRNNT(rnnt)
        assert _count(model.encoder) == encoder  # the same network in transformers' own implementation
        return _count(model)


def test_all_nemo_sizes_have_presets():
    assert set(NEMO_PRESETS) == {f"conformer_{s}" for s in "sml"} | {
        f"fastconformer_{s}" for s in ("s", "m", "l", "xl")
    } | {"w2v_bert_2"}


@pytest.mark.parametrize("name", NEMO_PRESETS)
def test_preset_parameter_count_matches_nemo(name):
    reference = preset_reference(name)["params_millions"] * 1e6
    ours = _params_as_published(name)
    assert abs(ours - reference) / reference <= 0.03, f"{name}: {ours / 1e6:.2f}M vs published {reference / 1e6:.0f}M"


def test_tiny_preset_and_overrides():
    config = preset_config("tiny", num_hidden_layers=2)
    assert config.num_hidden_layers == 2 and config.subsampling == "dw_striding" and config.subsampling_factor == 4
    assert "_reference" not in load_preset("conformer_s")


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(FileNotFoundError, match="conformer_s"):
        load_preset("conformer_xxs")
