"""w2v-BERT 2.0 (transformers' Wav2Vec2Bert) in our model family: conversion both ways with equal outputs.

Every comparison starts from raw audio: transformers' `SeamlessM4TFeatureExtractor` (the one `feature_extractor_for`
builds, and what a converted folder saves) makes the stacked fbank frames both models read. The small configs are
transformers' own `Wav2Vec2BertConfig` with every weight perturbed (LayerNorms included: at their initial values
a swapped norm would not show). Distances are clipped at 8 left / 4 right so that the relative_key clipping is
exercised on ~1 s inputs.

With padding, every frame matches, padded ones included: both sides zero padded frames after the projection and
before each depthwise conv, and mask padded keys. The adapter's strided convs read padded encoder steps at the end
of a short utterance in both implementations (Wav2Vec2Bert does not zero them), so with the adapter a padded
utterance's last steps differ from the same utterance run alone, identically on both sides: that comparison is made
without the adapter only.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import (
    AutoFeatureExtractor,
    AutoModel,
    AutoModelForCTC,
    AutoProcessor,
    SeamlessM4TFeatureExtractor,
    Wav2Vec2BertConfig,
    Wav2Vec2BertForCTC,
    Wav2Vec2BertModel,
)

import hf_ssl_speech  # noqa: F401  (Auto registration)
from hf_ssl_speech import ConformerSslConfig, ConformerSslForCTC, ConformerSslForPreTraining, ConformerSslModel
from hf_ssl_speech.interop.w2v_bert import (
    W2vBertConversionError,
    config_from_wav2vec2_bert,
    feature_extractor_for,
    from_wav2vec2_bert,
    to_wav2vec2_bert,
)
from hf_ssl_speech.presets import preset_config

TOLERANCE = 1e-5
LENGTHS = (16000, 9000, 12345)  # samples: 1 s and two shorter utterances padded in the same batch


def _small_config(**overrides) -> Wav2Vec2BertConfig:
    settings = {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "conv_depthwise_kernel_size": 3,
        "left_max_position_embeddings": 8,
        "right_max_position_embeddings": 4,
        "position_embeddings_type": "relative_key",
        "vocab_size": 11,
    }
    return Wav2Vec2BertConfig(**{**settings, **overrides})


ADAPTERS = {
    "no_adapter": {},
    "adapter_1": {"add_adapter": True, "num_adapter_layers": 1},
    "adapter_2_narrow_ffn": {
        "add_adapter": True,
        "num_adapter_layers": 2,
        "output_hidden_size": 16,
        "use_intermediate_ffn_before_adapter": True,
    },
}


@torch.no_grad()
def _perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        param.add_(torch.randn(param.shape, generator=generator) * 0.2)
    return model.eval()


def _audio(lengths=LENGTHS) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    t = [np.arange(n) / 16000 for n in lengths]
    return [(0.3 * np.sin(2 * np.pi * 220 * x) + 0.05 * rng.standard_normal(len(x))).astype(np.float32) for x in t]


def _features(config, audio=None) -> dict[str, torch.Tensor]:
    extractor = feature_extractor_for(config)
    return dict(extractor(audio or _audio(), sampling_rate=16000, return_tensors="pt"))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def _compare(theirs, ours, inputs) -> dict[str, float]:
    """Max abs differences of the final output and of every block's hidden states; also checks the lengths."""
    with torch.no_grad():
        a = theirs(**inputs, output_hidden_states=True)
        b = ours(**inputs, output_hidden_states=True)
    final = "logits" if hasattr(a, "logits") else "last_hidden_state"
    diffs = {final: _max_diff(getattr(a, final), getattr(b, final))}
    assert len(a.hidden_states) == len(b.hidden_states) == theirs.config.num_hidden_layers + 1
    diffs["hidden_states"] = max(_max_diff(x, y) for x, y in zip(a.hidden_states, b.hidden_states))
    # Output lengths: Wav2Vec2Bert's formula (adapter pooling included) is ours.
    base = ours if isinstance(ours, ConformerSslModel) else ours.conformer
    frames = inputs["attention_mask"].sum(-1)
    expected = theirs._get_feat_extract_output_lengths(frames)
    assert torch.equal(ours._get_feat_extract_output_lengths(frames), expected)
    with torch.no_grad():
        assert torch.equal(base(**inputs).output_lengths, expected)
    return diffs


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("adapter", list(ADAPTERS))
@pytest.mark.parametrize("head", ["model", "ctc"])
def test_wav2vec2_bert_converts_to_ours_with_equal_outputs(adapter, head, attention):
    """`attention`: the attention implementation of both sides (the converted config keeps it): "eager" takes the
    explicit softmax, where their position term is an einsum and ours a gather of one matmul."""
    config = _small_config(**ADAPTERS[adapter], attn_implementation=attention)
    theirs = _perturb((Wav2Vec2BertForCTC if head == "ctc" else Wav2Vec2BertModel)(config))
    ours = from_wav2vec2_bert(theirs)
    assert isinstance(ours, ConformerSslForCTC if head == "ctc" else ConformerSslModel) and not ours.training
    assert ours.config._attn_implementation == attention
    inputs = _features(config)
    assert inputs["attention_mask"].sum(-1).unique().numel() == 3  # three lengths: real padding
    diffs = _compare(theirs, ours, inputs)
    print(f"w2v-BERT ({attention}) -> ours, {head}, {adapter}: max abs diff {diffs}")
    assert max(diffs.values()) <= TOLERANCE, diffs


@pytest.mark.parametrize("adapter", list(ADAPTERS))
@pytest.mark.parametrize("head", ["model", "ctc"])
def test_ours_converts_to_wav2vec2_bert_with_equal_outputs(adapter, head):
    """Start from a random model of ours with the w2v-BERT options, built from our own config."""
    config = config_from_wav2vec2_bert(_small_config(**ADAPTERS[adapter]))
    config = ConformerSslConfig(**config.to_diff_dict())  # a config that went through JSON, as a saved one
    ours = _perturb((ConformerSslForCTC if head == "ctc" else ConformerSslModel)(config), seed=1)
    theirs = to_wav2vec2_bert(ours)
    assert isinstance(theirs, Wav2Vec2BertForCTC if head == "ctc" else Wav2Vec2BertModel) and not theirs.training
    diffs = _compare(theirs, ours, _features(config))
    print(f"ours -> w2v-BERT, {head}, {adapter}: max abs diff {diffs}")
    assert max(diffs.values()) <= TOLERANCE, diffs
    # And back: the same weights again.
    again = from_wav2vec2_bert(theirs)
    for key, value in ours.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key


def test_relative_key_and_causal_conv_ignore_padding():
    """A padded utterance's valid frames equal the same utterance alone (relative_key attention, causal conv)."""
    config = _small_config()
    ours = from_wav2vec2_bert(_perturb(Wav2Vec2BertModel(config)))
    audio = _audio()
    batched = _features(config, audio)
    with torch.no_grad():
        together = ours(**batched).last_hidden_state
        for i, utterance in enumerate(audio):
            single = _features(config, [utterance])  # an odd fbank count leaves a half-padded last frame, masked
            alone = ours(**single).last_hidden_state[0]
            steps = int(batched["attention_mask"][i].sum())
            assert int(single["attention_mask"].sum()) == steps
            assert _max_diff(together[i, :steps], alone[:steps]) <= TOLERANCE


def test_save_and_load_through_the_auto_classes(tmp_path):
    config = _small_config(**ADAPTERS["adapter_1"])
    ours = from_wav2vec2_bert(_perturb(Wav2Vec2BertForCTC(config)))
    ours.save_pretrained(tmp_path)
    feature_extractor_for(ours.config).save_pretrained(tmp_path)
    extractor = AutoFeatureExtractor.from_pretrained(tmp_path)
    assert type(extractor) is SeamlessM4TFeatureExtractor and extractor.stride == 2 and extractor.num_mel_bins == 80
    assert type(AutoProcessor.from_pretrained(tmp_path)) is SeamlessM4TFeatureExtractor
    inputs = dict(extractor(_audio(), sampling_rate=16000, return_tensors="pt"))
    loaded_ctc = AutoModelForCTC.from_pretrained(tmp_path).eval()
    encoder = AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded_ctc) is ConformerSslForCTC and type(encoder) is ConformerSslModel
    with torch.no_grad():
        assert _max_diff(loaded_ctc(**inputs).logits, ours(**inputs).logits) == 0.0
        assert _max_diff(encoder(**inputs).last_hidden_state, ours.conformer(**inputs).last_hidden_state) == 0.0
    assert (
        loaded_ctc.config.inputs_to_logits_ratio == Wav2Vec2BertConfig(**ADAPTERS["adapter_1"]).inputs_to_logits_ratio
    )


def test_frame_geometry_for_the_asr_pipeline():
    """Samples per output step: 320 (20 ms) without the adapter, times its stride per adapter layer."""
    for adapter, ratio in (("no_adapter", 320), ("adapter_1", 640), ("adapter_2_narrow_ffn", 1280)):
        config = config_from_wav2vec2_bert(_small_config(**ADAPTERS[adapter]))
        assert config.inputs_to_logits_ratio == ratio
    # Stacked frames per second of audio: ~50, the extractor's own count for 1 s (kaldi snip-edges frames / 2).
    frames = _features(_small_config(), [np.zeros(16000, np.float32)])["input_features"].shape[1]
    assert frames == (1 + (16000 - 400) // 160) // 2


def test_ctc_model_runs_through_the_asr_pipeline(tmp_path):
    from transformers import Wav2Vec2CTCTokenizer, pipeline

    vocab = {"<pad>": 0, "|": 1, **{c: i + 2 for i, c in enumerate("abcdefghi")}}
    (tmp_path / "vocab.json").write_text(__import__("json").dumps(vocab))
    tokenizer = Wav2Vec2CTCTokenizer(str(tmp_path / "vocab.json"), word_delimiter_token="|")
    ours = from_wav2vec2_bert(_perturb(Wav2Vec2BertForCTC(_small_config(vocab_size=len(vocab)))))
    ours.save_pretrained(tmp_path / "model")
    feature_extractor_for(ours.config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    asr = pipeline("automatic-speech-recognition", model=str(tmp_path / "model"))
    audio = _audio([48000])[0]
    with torch.no_grad():
        logits = ours(**_features(ours.config, [audio])).logits
    assert asr(audio)["text"] == tokenizer.decode(logits.argmax(-1)[0])
    chunked = asr(audio, chunk_length_s=1.0, stride_length_s=0.25)["text"]
    assert isinstance(chunked, str)


# ----------------------------------------------------------------------------------------------- pretraining


def _pretraining_config(objectives: dict, **overrides) -> ConformerSslConfig:
    config = config_from_wav2vec2_bert(_small_config(layerdrop=0.0))
    settings = {
        **config.to_diff_dict(),
        "objectives": objectives,
        "num_codevectors_per_group": 8,
        "codevector_dim": 16,
        "proj_codevector_dim": 16,
        "num_negatives": 4,
        "bestrq_codebook_size": 32,
        "bestrq_codebook_dim": 8,
        "mask_time_length": 4,
        "mask_time_prob": 0.05,
        "cpc_steps": 2,
        "cpc_num_negatives": 2,
        **overrides,
    }
    settings.pop("auto_map", None)
    return ConformerSslConfig(**settings)


PRETRAINING = {
    "w2v_bert": ({"contrastive": {"layer": 1}, "mlm": {}}, {"num_codevector_groups": 1}),
    "data2vec": ({"data2vec": {"top_k_layers": 2, "decoder_dim": 16, "decoder_groups": 4}}, {}),
    "bestrq_reconstruction": ({"bestrq": {}, "reconstruction": {}}, {}),
    "dinosr": ({"dinosr": {"top_k_layers": 2, "codebook_size": 8}}, {}),
    "apc_cpc": ({"apc": {}, "cpc": {}}, {"causal": True}),
}


@pytest.mark.parametrize("recipe", list(PRETRAINING))
def test_pretraining_objectives_run_on_stacked_fbank_input(recipe):
    """The objectives see 20 ms stacked frames: one target frame (160 dims) per encoder step, gradients flow."""
    objectives, overrides = PRETRAINING[recipe]
    model = ConformerSslForPreTraining(_pretraining_config(objectives, **overrides)).train()
    inputs = _features(model.config)
    out = model(**inputs, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss) and set(objectives) <= set(out.loss_sums)
    out.loss.backward()
    assert model.conformer.subsampling.linear.weight.grad.abs().sum() > 0


def test_unsupported_settings_are_refused_by_name():
    with pytest.raises(
        W2vBertConversionError, match=r"position_embeddings_type='rotary'.*supported: \('relative_key',\)"
    ):
        config_from_wav2vec2_bert(_small_config(position_embeddings_type="rotary"))
    with pytest.raises(W2vBertConversionError, match=r"ConformerSslConfig.subsampling='striding'"):
        to_wav2vec2_bert(ConformerSslModel(ConformerSslConfig(hidden_size=32, num_hidden_layers=1)))
    feature_projection = config_from_wav2vec2_bert(_small_config()).to_diff_dict()
    feature_projection.pop("auto_map")
    with pytest.raises(W2vBertConversionError, match=r"ConformerSslConfig.xscaling=True"):
        to_wav2vec2_bert(ConformerSslModel(ConformerSslConfig(**{**feature_projection, "xscaling": True})))
    with pytest.raises(ValueError, match=r"subsampling_factor=2 is invalid.*feature_projection"):
        ConformerSslConfig(**{**feature_projection, "subsampling_factor": 2})
    with pytest.raises(ValueError, match=r"objectives=\['hubert'\] is invalid.*10 ms"):
        ConformerSslConfig(**{**feature_projection, "objectives": {"hubert": {}}})
    with pytest.raises(ValueError, match=r"use_intermediate_ffn_before_adapter=True is invalid.*add_adapter"):
        ConformerSslConfig(**{**feature_projection, "use_intermediate_ffn_before_adapter": True})
    with pytest.raises(ValueError, match=r"add_adapter=True.*pretrain with add_adapter=False"):
        ConformerSslForPreTraining(ConformerSslConfig(**{**feature_projection, "add_adapter": True}))


def test_preset_is_the_w2v_bert_2_network():
    """The preset has exactly the parameters of transformers' Wav2Vec2BertModel of the 2.0 config (meta device)."""
    with torch.device("meta"):
        ours = sum(p.numel() for p in ConformerSslModel(preset_config("w2v_bert_2")).parameters())
        theirs = sum(p.numel() for p in Wav2Vec2BertModel(Wav2Vec2BertConfig(mask_time_prob=0.0)).parameters())
    assert ours == theirs == 580_492_096
    reference = config_from_wav2vec2_bert(Wav2Vec2BertConfig())
    preset = preset_config("w2v_bert_2")
    for field in ("subsampling", "num_mel_bins", "hop_length", "position_embeddings_type", "conv_depthwise_causal"):
        assert getattr(preset, field) == getattr(reference, field), field


def test_a_converted_w2v_bert_folder_fine_tunes_with_ctc_and_transcribes(tmp_path):
    """finetune_ctc.py takes a folder converted from w2v-BERT as it is: transformers' SeamlessM4T extractor (not our
    log-mels), CTC feasibility counted after the adapter's pooling; the result transcribes through the pipeline."""
    import json

    import soundfile as sf
    from support import load_script, write_tone_corpus
    from transformers import pipeline

    from hf_ssl_speech.finetune.ctc import ctc_output_steps

    torch.manual_seed(0)
    ours = from_wav2vec2_bert(Wav2Vec2BertModel(_small_config(add_adapter=True, num_adapter_layers=1)))
    source = tmp_path / "converted"
    ours.save_pretrained(source)
    feature_extractor_for(ours.config).save_pretrained(source)
    assert ctc_output_steps(16000, ours.config) == int(ours._get_feat_extract_output_lengths(16000 // 320))
    manifest = write_tone_corpus(tmp_path / "tones", count=8, seed=0, words=(1, 2), name="train")
    output = tmp_path / "ctc"
    argv = ["--model_name_or_path", str(source), "--train_manifests", str(manifest), "--eval_manifests", str(manifest)]
    argv += ["--output_dir", str(output), "--use_cpu", "--max_steps", "2", "--per_device_train_batch_size", "4"]
    argv += ["--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true"]
    result = load_script("finetune_ctc").main(argv)
    assert result.summary["steps"] == 2 and result.results["train"]["utterances"] == 8
    asr = pipeline("automatic-speech-recognition", model=str(output))
    assert type(asr.feature_extractor).__name__ == "SeamlessM4TFeatureExtractor"
    row = json.loads(manifest.read_text().splitlines()[0])
    audio, rate = sf.read(manifest.parent / row["audio_filepath"], dtype="float32")
    assert isinstance(asr({"raw": audio, "sampling_rate": rate})["text"], str)
