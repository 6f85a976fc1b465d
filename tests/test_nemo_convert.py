"""NeMo checkpoint conversion (hf_ssl_speech/interop/nemo.py, scripts/convert_nemo_checkpoint.py).

Two groups:
- Offline: tiny `.nemo` archives written here from our own models through the inverse key map (NeMo names,
  Conv1d pointwise shapes, NeMo's MultiSoftmaxDecoder row order) must convert back to identical outputs; unmappable
  keys, unsupported settings and non-tensor pickles must be refused with their names.
- Parity with NeMo itself (marker `nemo`): tests/nemo_parity/make_models.py, run by a NeMo interpreter
  (`NEMO_PYTHON`, default /work/nemo_env/venv/bin/python when present), builds small NeMo models from NeMo's recipes
  and dumps NeMo's outputs; our converted models must reproduce them within 1e-4. Skipped without NeMo.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
import soundfile as sf
import torch
import yaml
from support import make_speech_like, make_tiny_config, write_speech_wav
from transformers import AutoFeatureExtractor, AutoModel, AutoModelForCTC, AutoModelForPreTraining, AutoProcessor

import hf_ssl_speech  # noqa: F401  (registers the Auto classes)
from hf_ssl_speech.feature_extraction_conformer_ssl import ConformerSslFeatureExtractor
from hf_ssl_speech.interop.nemo import NemoConversionError, convert_nemo
from hf_ssl_speech.interop.nemo_mapping import (
    book_major_rows_to_multisoftmax,
    nemo_encoder_config,
    nemo_encoder_key_to_ours,
    nemo_preprocessor_config,
    our_encoder_key_to_nemo,
    our_encoder_state_dict_to_nemo,
    rpq_projection_to_nemo,
)
from hf_ssl_speech.modeling_conformer_ssl import ConformerSslForCTC, ConformerSslForPreTraining, ConformerSslModel

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "convert_nemo_checkpoint.py"
LABELS = [" ", "a", "b", "c", "d", "e", "'"]


def _load_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_nemo_checkpoint", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


convert_script = _load_script()


# ----------------------------------------------------------------------------------------------- fake archives


def randomise_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Move every parameter and BatchNorm statistic off its constant init (zero biases u/v, unit norms...)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=generator))
    return model.eval()


def featurizer_buffers(extractor: ConformerSslFeatureExtractor) -> dict[str, torch.Tensor]:
    """NeMo's preprocessor buffers (mel filterbank (1, mels, freq) and window) for our extractor's settings."""
    return {
        "preprocessor.featurizer.fb": extractor.mel_filters.float()[None],
        "preprocessor.featurizer.window": torch.hann_window(extractor.win_length, periodic=False),
    }


def write_nemo(path: Path, config: dict, state_dict: dict, extra_members: dict[str, bytes] | None = None) -> Path:
    """A .nemo archive as NeMo writes it: "./model_config.yaml" + "./model_weights.ckpt" in a plain tar."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    members = {"model_config.yaml": yaml.safe_dump(config).encode(), "model_weights.ckpt": buffer.getvalue()}
    members.update(extra_members or {})
    with tarfile.open(path, "w:") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo("./" + name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def fake_ctc(tmp_path: Path, **config_overrides) -> tuple[Path, ConformerSslForCTC, ConformerSslFeatureExtractor]:
    """A char-CTC .nemo made from one of our CTC models through the inverse map."""
    config = make_tiny_config(vocab_size=len(LABELS) + 1, pad_token_id=len(LABELS), **config_overrides)
    model = randomise_(ConformerSslForCTC(config))
    extractor = ConformerSslFeatureExtractor(feature_size=config.num_mel_bins)
    state = our_encoder_state_dict_to_nemo(model.conformer.state_dict())
    state["decoder.decoder_layers.0.weight"] = model.lm_head.weight.detach().unsqueeze(-1).clone()
    state["decoder.decoder_layers.0.bias"] = model.lm_head.bias.detach().clone()
    state.update(featurizer_buffers(extractor))
    nemo_config = {
        "target": "nemo.collections.asr.models.ctc_models.EncDecCTCModel",
        "sample_rate": 16000,
        "labels": LABELS,
        "preprocessor": nemo_preprocessor_config(extractor),
        "encoder": nemo_encoder_config(config),
        "decoder": {
            "_target_": "nemo.collections.asr.modules.ConvASRDecoder",
            "feat_in": config.hidden_size,
            "num_classes": len(LABELS),
            "vocabulary": LABELS,
        },
    }
    return write_nemo(tmp_path / "ctc.nemo", nemo_config, state), model, extractor


def fake_nest(tmp_path: Path) -> tuple[Path, ConformerSslForPreTraining, ConformerSslFeatureExtractor]:
    """A NEST .nemo (2 codebooks, FastConformer) made from our bestrq model through the inverse map."""
    config = make_tiny_config(
        subsampling="dw_striding",
        subsampling_conv_channels=8,
        bestrq_num_codebooks=2,
        objectives={"bestrq": {}},
        mask_fill="learned",
    )
    model = randomise_(ConformerSslForPreTraining(config))
    extractor = ConformerSslFeatureExtractor(feature_size=config.num_mel_bins)
    books, classes = config.bestrq_num_codebooks, config.bestrq_codebook_size
    state = our_encoder_state_dict_to_nemo(model.conformer.state_dict())
    state.update(featurizer_buffers(extractor))
    state.update(
        {
            "quantizer.proj.weight": rpq_projection_to_nemo(model.bestrq_quantizer.projection),
            "quantizer.codebooks": model.bestrq_quantizer.codebooks.double(),  # NeMo keeps them in float64
            "decoder.decoder_layers.0.weight": book_major_rows_to_multisoftmax(
                model.bestrq_head.weight.detach(), classes, books
            ).unsqueeze(-1),
            "decoder.decoder_layers.0.bias": book_major_rows_to_multisoftmax(
                model.bestrq_head.bias.detach(), classes, books
            ),
            "mask_processor.mask_embedding": model.masked_spec_embed.detach().clone(),
        }
    )
    factor, mels = config.subsampling_factor, config.num_mel_bins
    nemo_config = {
        "target": "nemo.collections.asr.models.ssl_models.EncDecDenoiseMaskedTokenPredModel",
        "preprocessor": nemo_preprocessor_config(extractor),
        "encoder": nemo_encoder_config(config),
        "mask_position": "pre_conv",
        "masking": {
            "_target_": "nemo.collections.asr.modules.RandomBlockMasking",
            "block_size": 40,
            "mask_prob": 0.01,
            "feat_in": "${preprocessor.features}",
            "freeze": True,
            "allow_overlap": True,
        },
        "quantizer": {
            "_target_": "nemo.collections.asr.modules.RandomProjectionVectorQuantizer",
            "feat_in": mels,
            "code_dim": config.bestrq_codebook_dim,
            "num_books": books,
            "num_classes": classes,
            "dist_fn": "l2",
            "freeze": True,
            "combine_time_steps": "${model.encoder.subsampling_factor}",
        },
        "decoder": {
            "_target_": "nemo.collections.asr.modules.MultiSoftmaxDecoder",
            "feat_in": config.hidden_size,
            "num_classes": classes,
            "num_decoders": books,
            "use_bias": True,
        },
        "loss": {
            "_target_": "nemo.collections.asr.losses.MultiMLMLoss",
            "combine_time_steps": factor,
            "mask_threshold": 0.8,
            "num_decoders": books,
        },
    }
    return write_nemo(tmp_path / "nest.nemo", nemo_config, state), model, extractor


def features_for(extractor: ConformerSslFeatureExtractor, seconds=(0.9, 0.6)) -> dict[str, torch.Tensor]:
    audio = [make_speech_like(s, seed=i) for i, s in enumerate(seconds)]
    return extractor(audio, sampling_rate=16000, return_tensors="pt")


class NotATensor:
    """Pickled by reference: a weights_only load must refuse it rather than import and build it."""

    def __init__(self) -> None:
        self.payload = "anything"


# ----------------------------------------------------------------------------------------------- offline tests


@pytest.mark.parametrize("subsampling", ["striding", "dw_striding"])
def test_encoder_key_map_round_trips_every_weight(subsampling: str) -> None:
    config = make_tiny_config(subsampling=subsampling, conv_norm_type="batch_norm")
    keys = list(ConformerSslModel(config).state_dict())
    nemo_keys = [our_encoder_key_to_nemo(k) for k in keys]
    assert all(k.startswith("encoder.") for k in nemo_keys)
    assert "encoder.layers.0.self_attn.linear_pos.weight" in nemo_keys
    assert "encoder.layers.1.conv.batch_norm.running_var" in nemo_keys
    assert "encoder.pre_encode.out.weight" in nemo_keys
    assert [nemo_encoder_key_to_ours(k) for k in nemo_keys] == keys
    assert nemo_encoder_key_to_ours("encoder.layers.0.self_attn.adapter.weight") is None


def test_fake_ctc_nemo_converts_to_identical_outputs(tmp_path: Path) -> None:
    nemo_file, original, extractor = fake_ctc(tmp_path, conv_norm_type="layer_norm")
    out_dir = tmp_path / "converted"
    assert convert_script.main([str(nemo_file), str(out_dir), "--license", "CC-BY-4.0"]) == 0

    converted = AutoModelForCTC.from_pretrained(out_dir).eval()
    assert isinstance(converted, ConformerSslForCTC)
    processor = AutoProcessor.from_pretrained(out_dir)
    inputs = features_for(processor.feature_extractor)
    reference = features_for(extractor)
    torch.testing.assert_close(inputs["input_features"], reference["input_features"], rtol=0, atol=0)
    with torch.no_grad():
        ours = converted(**inputs).logits
        theirs = original(**reference).logits
    assert (ours - theirs).abs().max() <= 1e-6
    # NeMo's ids: label i is id i, the blank is the last id; "|" stands for the space.
    tokenizer = processor.tokenizer
    assert tokenizer.pad_token_id == converted.config.pad_token_id == len(LABELS)
    assert tokenizer("ab c'").input_ids == [1, 2, 0, 3, 6]
    card = (out_dir / "README.md").read_text()
    assert "ctc.nemo" in card and "license: cc-by-4.0" in card and "CC-BY-4.0" in card


def test_fake_nest_nemo_converts_quantizer_and_multisoftmax_head(tmp_path: Path) -> None:
    nemo_file, original, extractor = fake_nest(tmp_path)
    out_dir = tmp_path / "converted"
    assert convert_script.main([str(nemo_file), str(out_dir)]) == 0

    converted = AutoModelForPreTraining.from_pretrained(out_dir).eval()
    for name in ("projection", "codebooks"):  # the saved buffers, not a fresh draw from the seed
        assert torch.equal(getattr(converted.bestrq_quantizer, name), getattr(original.bestrq_quantizer, name))
    assert torch.equal(converted.masked_spec_embed, original.masked_spec_embed)
    inputs = features_for(AutoFeatureExtractor.from_pretrained(out_dir))
    with torch.no_grad():
        ours = converted.bestrq_head(converted.conformer(**inputs).last_hidden_state)
        theirs = original.bestrq_head(original.conformer(**inputs).last_hidden_state)
    assert (ours - theirs).abs().max() <= 1e-6
    assert "unknown — check the source" in (out_dir / "README.md").read_text()


def test_unmappable_keys_are_refused_with_their_names(tmp_path: Path, capsys) -> None:
    nemo_file, _, _ = fake_ctc(tmp_path)
    with tarfile.open(nemo_file) as archive:
        config = yaml.safe_load(archive.extractfile("./model_config.yaml").read())
        state = torch.load(io.BytesIO(archive.extractfile("./model_weights.ckpt").read()), weights_only=True)
    state["joint.joint_net.2.weight"] = torch.zeros(3, 3)
    state["encoder.layers.0.self_attn.adapter.weight"] = torch.zeros(3)
    bad = write_nemo(tmp_path / "extra.nemo", config, state)

    with pytest.raises(NemoConversionError) as refused:
        convert_nemo(bad)
    assert "joint.joint_net.2.weight" in str(refused.value)
    assert "encoder.layers.0.self_attn.adapter.weight" in str(refused.value)
    assert convert_script.main([str(bad), str(tmp_path / "refused")]) == 2
    assert "joint.joint_net.2.weight" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()

    # Asked to, it converts the rest and says what it left behind.
    assert convert_script.main([str(bad), str(tmp_path / "rest"), "--drop-unmappable"]) == 0
    card = (tmp_path / "rest" / "README.md").read_text()
    assert "joint.joint_net.2.weight" in card and "encoder.layers.0.self_attn.adapter.weight" in card
    report = json.loads((tmp_path / "rest" / "nemo_conversion.json").read_text())
    assert set(report["dropped"]) >= {"joint.joint_net.2.weight", "encoder.layers.0.self_attn.adapter.weight"}


def test_a_missing_weight_is_an_error_not_a_random_init(tmp_path: Path) -> None:
    nemo_file, _, _ = fake_ctc(tmp_path)
    with tarfile.open(nemo_file) as archive:
        config = yaml.safe_load(archive.extractfile("./model_config.yaml").read())
        state = torch.load(io.BytesIO(archive.extractfile("./model_weights.ckpt").read()), weights_only=True)
    del state["encoder.layers.1.conv.depthwise_conv.weight"]
    with pytest.raises(NemoConversionError, match=r"would stay random.*layers\.1\.conv\.depthwise_conv\.weight"):
        convert_nemo(write_nemo(tmp_path / "missing.nemo", config, state), drop_unmappable=True)


def test_a_checkpoint_with_a_non_tensor_pickle_is_refused(tmp_path: Path) -> None:
    nemo_file, _, _ = fake_ctc(tmp_path)
    with tarfile.open(nemo_file) as archive:
        config = yaml.safe_load(archive.extractfile("./model_config.yaml").read())
        state = torch.load(io.BytesIO(archive.extractfile("./model_weights.ckpt").read()), weights_only=True)
    state["callback"] = NotATensor()
    with pytest.raises(NemoConversionError, match="weights_only=True"):
        convert_nemo(write_nemo(tmp_path / "pickle.nemo", config, state))


@pytest.mark.parametrize(
    ("section", "key", "value", "named"),
    [
        ("preprocessor", "normalize", "all_features", "preprocessor.normalize='all_features'"),
        ("preprocessor", "window", "hamming", "preprocessor.window='hamming'"),
        ("encoder", "causal_downsampling", True, "encoder.causal_downsampling=True"),
        ("encoder", "self_attention_model", "abs_pos", "encoder.self_attention_model='abs_pos'"),
        ("encoder", "conv_context_size", "causal", "encoder.conv_context_size='causal'"),
        ("encoder", "att_context_size", [70, 0], "encoder.att_context_size=[70, 0]"),
    ],
)
def test_settings_without_an_exact_counterpart_are_refused(tmp_path, section, key, value, named) -> None:
    nemo_file, _, _ = fake_ctc(tmp_path)
    with tarfile.open(nemo_file) as archive:
        config = yaml.safe_load(archive.extractfile("./model_config.yaml").read())
        state = torch.load(io.BytesIO(archive.extractfile("./model_weights.ckpt").read()), weights_only=True)
    config[section][key] = value
    with pytest.raises(NemoConversionError) as refused:
        convert_nemo(write_nemo(tmp_path / "bad.nemo", config, state))
    assert named in str(refused.value)


def test_a_filterbank_that_is_not_ours_is_refused(tmp_path: Path) -> None:
    nemo_file, _, _ = fake_ctc(tmp_path)
    with tarfile.open(nemo_file) as archive:
        config = yaml.safe_load(archive.extractfile("./model_config.yaml").read())
        state = torch.load(io.BytesIO(archive.extractfile("./model_weights.ckpt").read()), weights_only=True)
    state["preprocessor.featurizer.fb"] = state["preprocessor.featurizer.fb"] * 1.5  # e.g. another mel norm
    with pytest.raises(NemoConversionError, match="featurizer.fb"):
        convert_nemo(write_nemo(tmp_path / "fb.nemo", config, state))


def test_encoder_only_drops_heads_and_loads_as_automodel(tmp_path: Path) -> None:
    nemo_file, original, _ = fake_ctc(tmp_path)
    out_dir = tmp_path / "encoder"
    assert convert_script.main([str(nemo_file), str(out_dir), "--encoder-only"]) == 0
    encoder = AutoModel.from_pretrained(out_dir).eval()
    assert isinstance(encoder, ConformerSslModel)
    inputs = features_for(AutoFeatureExtractor.from_pretrained(out_dir))
    with torch.no_grad():
        difference = encoder(**inputs).last_hidden_state - original.conformer(**inputs).last_hidden_state
    assert difference.abs().max() <= 1e-6
    assert "decoder.decoder_layers.0.weight" in (out_dir / "README.md").read_text()


# ----------------------------------------------------------------------------------------------- parity with NeMo


def nemo_python() -> str | None:
    """The NeMo interpreter: $NEMO_PYTHON, else /work/nemo_env/venv/bin/python if it exists (os.path.isfile: in
    another user's unreadable folder it is False, where Path.is_file raises PermissionError and fails collection)."""
    candidate = os.environ.get("NEMO_PYTHON") or "/work/nemo_env/venv/bin/python"
    return candidate if os.path.isfile(candidate) else None


NEMO_SKIP = pytest.mark.skipif(nemo_python() is None, reason="NeMo not installed: set NEMO_PYTHON (see docs/nemo.md)")
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def nemo_models(tmp_path_factory) -> Path:
    """Run make_models.py with the NeMo interpreter once: .nemo files + NeMo's reference tensors."""
    folder = tmp_path_factory.mktemp("nemo_parity")
    wavs = [
        write_speech_wav(folder / "a.wav", 1.61, seed=1, subtype="FLOAT"),
        write_speech_wav(folder / "b.wav", 1.23, seed=2, subtype="FLOAT"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [nemo_python(), str(REPO / "tests" / "nemo_parity" / "make_models.py"), str(folder / "out"), *map(str, wavs)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return folder


def reference(folder: Path, name: str) -> dict[str, torch.Tensor]:
    return torch.load(folder / "out" / f"{name}.pt", weights_only=True)


def converted(folder: Path, name: str, *flags: str) -> Path:
    out_dir = folder / "converted" / name
    if not out_dir.exists():
        assert convert_script.main([str(folder / "out" / f"{name}.nemo"), str(out_dir), *flags]) == 0
    return out_dir


def our_features(folder: Path, out_dir: Path) -> dict[str, torch.Tensor]:
    audio = [sf.read(folder / f"{n}.wav", dtype="float32")[0] for n in "ab"]
    return AutoFeatureExtractor.from_pretrained(out_dir)(audio, sampling_rate=16000, return_tensors="pt")


def max_valid_diff(ours: torch.Tensor, theirs: torch.Tensor, lengths: torch.Tensor) -> float:
    """Max |ours - theirs| over the valid steps of each utterance (both (batch, time, ...))."""
    return max(float((ours[i, :n] - theirs[i, :n]).abs().max()) for i, n in enumerate(lengths.tolist()))


def encode(model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    encoder = getattr(model, "conformer", model)
    with torch.no_grad():
        out = encoder(**inputs)
    return out.last_hidden_state, out.output_lengths


PARITY = [
    ("ctc", AutoModelForCTC, ()),
    ("ctc_bpe", AutoModelForCTC, ()),
    ("nest", AutoModelForPreTraining, ()),
    ("contrastive", AutoModelForPreTraining, ("--drop-unmappable",)),
]


@pytest.mark.nemo
@NEMO_SKIP
@pytest.mark.parametrize(("name", "auto_class", "flags"), PARITY)
def test_features_and_encoder_match_nemo(nemo_models: Path, name: str, auto_class, flags) -> None:
    out_dir = converted(nemo_models, name, *flags)
    ref = reference(nemo_models, name)
    inputs = our_features(nemo_models, out_dir)
    frames = inputs["attention_mask"].sum(-1)
    assert torch.equal(frames, ref["feature_lengths"])
    assert max_valid_diff(inputs["input_features"], ref["features"].transpose(1, 2), frames) <= TOLERANCE
    hidden, steps = encode(auto_class.from_pretrained(out_dir).eval(), inputs)
    assert torch.equal(steps, ref["encoded_lengths"])
    assert max_valid_diff(hidden, ref["encoded"].transpose(1, 2), steps) <= TOLERANCE


@pytest.mark.nemo
@NEMO_SKIP
@pytest.mark.parametrize("name", ["ctc", "ctc_bpe"])
def test_ctc_logits_match_nemo(nemo_models: Path, name: str) -> None:
    out_dir = converted(nemo_models, name)
    ref = reference(nemo_models, name)
    model = AutoModelForCTC.from_pretrained(out_dir).eval()
    inputs = our_features(nemo_models, out_dir)
    with torch.no_grad():
        logits = model(**inputs).logits
    steps = ref["encoded_lengths"]
    assert logits.shape[-1] == ref["logits"].shape[-1]
    assert max_valid_diff(logits, ref["logits"], steps) <= TOLERANCE
    assert max_valid_diff(logits.log_softmax(-1), ref["log_probs"], steps) <= TOLERANCE
    assert model.config.pad_token_id == logits.shape[-1] - 1  # NeMo's blank is the last class


@pytest.mark.nemo
@NEMO_SKIP
def test_bpe_tokenizer_gives_nemo_ids(nemo_models: Path) -> None:
    from transformers import AutoTokenizer

    out_dir = converted(nemo_models, "ctc_bpe")
    ref = reference(nemo_models, "ctc_bpe")
    sentence = bytes(ref["sentence_utf8"].tolist()).decode("utf-8")  # the text NeMo's tokenizer encoded
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    ids = tokenizer(sentence, add_special_tokens=False).input_ids
    assert len(ids) > 5 and ids == ref["token_ids"].tolist()
    assert tokenizer.pad_token_id == AutoModelForCTC.from_pretrained(out_dir).config.pad_token_id


@pytest.mark.nemo
@NEMO_SKIP
def test_nest_targets_and_logits_match_nemo(nemo_models: Path) -> None:
    from hf_ssl_speech.targets import stack_frames

    out_dir = converted(nemo_models, "nest")
    ref = reference(nemo_models, "nest")
    model = AutoModelForPreTraining.from_pretrained(out_dir).eval()
    inputs = our_features(nemo_models, out_dir)
    hidden, steps = encode(model, inputs)
    books, classes = model.config.bestrq_num_codebooks, model.config.bestrq_codebook_size
    with torch.no_grad():
        logits = model.bestrq_head(hidden).view(*hidden.shape[:2], books, classes)  # (B, T', books, codes)
    nemo_log_probs = ref["log_probs"].permute(0, 1, 3, 2)  # NeMo: (B, T', codes, books)
    assert max_valid_diff(logits.log_softmax(-1), nemo_log_probs, steps) <= TOLERANCE

    stacked, token_lengths = stack_frames(
        inputs["input_features"], inputs["attention_mask"].sum(-1), model.config.subsampling_factor
    )
    quantizer = model.bestrq_quantizer
    assert model.config.bestrq_normalize_input is False  # NeMo projects the stacked frames unstandardised
    assert quantizer.normalize_input is False
    ids = quantizer(stacked, token_lengths).code_ids
    assert all(torch.equal(ids[i, :n], ref["tokens"][i, :n]) for i, n in enumerate(token_lengths.tolist()))


@pytest.mark.nemo
@NEMO_SKIP
def test_contrastive_quantizer_and_mlm_match_nemo(nemo_models: Path) -> None:
    from hf_ssl_speech.targets import stack_frames

    # The contrastive head (ConvASRDecoderReconstruction) has no counterpart: refused by default.
    with pytest.raises(NemoConversionError, match="decoder_losses.contrastive.decoder"):
        convert_nemo(nemo_models / "out" / "contrastive.nemo")
    out_dir = converted(nemo_models, "contrastive", "--drop-unmappable")
    ref = reference(nemo_models, "contrastive")
    model = AutoModelForPreTraining.from_pretrained(out_dir).eval()
    assert set(model.config.objectives) == {"mlm"}
    inputs = our_features(nemo_models, out_dir)
    hidden, steps = encode(model, inputs)
    stacked, token_lengths = stack_frames(
        inputs["input_features"], inputs["attention_mask"].sum(-1), model.config.subsampling_factor
    )
    with torch.no_grad():
        quantized = model.quantizer(stacked, temperature=2.0)  # eval: argmax codes, no Gumbel noise
        mlm_logits = model.mlm_head(hidden)
    assert all(
        torch.equal(quantized.code_ids[i, :n], ref["gumbel_ids"][i, :n]) for i, n in enumerate(token_lengths.tolist())
    )
    assert max_valid_diff(quantized.codevectors, ref["quantized"], token_lengths) <= TOLERANCE
    # NeMo's MLM decoder has one extra never-targeted class (dropped): compare the shared classes' logits.
    assert max_valid_diff(mlm_logits, ref["mlm_logits"][..., : mlm_logits.shape[-1]], steps) <= TOLERANCE
    # The MLM target id combines the group codes as NeMo does (group 0 most significant).
    groups, codes = model.config.num_codevector_groups, model.config.num_codevectors_per_group
    place = codes ** torch.arange(groups - 1, -1, -1)
    combined = (quantized.code_ids * place).sum(-1)
    assert all(torch.equal(combined[i, :n], ref["target_ids"][i, :n]) for i, n in enumerate(token_lengths.tolist()))


def test_without_a_nemo_interpreter_parity_tests_skip(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NEMO_PYTHON", str(tmp_path / "no-such-python"))
    assert nemo_python() is None
    fake = tmp_path / "python"
    fake.write_text("")
    monkeypatch.setenv("NEMO_PYTHON", str(fake))
    assert nemo_python() == str(fake)
