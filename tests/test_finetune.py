"""CTC fine-tuning: overfit check through scripts/finetune_ctc.py, Auto reload, argument parsing, model init
from a checkpoint vs from scratch, SpecAugment, layer-wise LR decay, encoder freezing, collator, reports."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file, save_file
from support import (
    ALPHABET,
    REPO_ROOT,
    SAMPLING_RATE,
    TINY_CTC_OVERRIDES,
    accelerate_launch,
    letter_chord,
    load_script,
    tiny_scratch_args,
    write_tone_corpus,
)
from transformers import AutoModelForCTC, AutoProcessor, Trainer, TrainingArguments

import hf_ssl_speech  # noqa: F401  (Auto registration)
from hf_ssl_speech import ConformerSslFeatureExtractor, ConformerSslModel
from hf_ssl_speech.data.augment import SpecAugmentConfig, spec_augment
from hf_ssl_speech.finetune.args import (
    DataArguments,
    FinetuneArguments,
    ModelArguments,
    parse_args,
    parse_config_overrides,
)
from hf_ssl_speech.finetune.collators import CtcCollator
from hf_ssl_speech.finetune.ctc import greedy_ctc_ids, transcribe
from hf_ssl_speech.finetune.model_init import init_ctc_model
from hf_ssl_speech.finetune.optim import FreezeEncoderCallback, build_optimizer, layerwise_param_groups
from hf_ssl_speech.finetune.report import ctc_model_card, plot_training_curves, write_results
from hf_ssl_speech.finetune.rows import manifest_rows, rows_to_dataset
from hf_ssl_speech.finetune.run import OutputDirInUseError, check_output_dir
from hf_ssl_speech.finetune.text import build_processor, build_vocab, normalize_transcript
from hf_ssl_speech.finetune.trainers import CtcTrainer, SslTrainer

ARG_TYPES = (ModelArguments, DataArguments, FinetuneArguments, TrainingArguments)


@pytest.fixture
def trained(tone_ctc):
    return tone_ctc  # session-scoped (conftest): test_pipeline.py shares the same model


# ------------------------------------------------------------------------------------------ corpus checks
def test_tone_corpus_is_readable_and_letters_are_distinct(tmp_path):
    manifest = write_tone_corpus(tmp_path, count=3, seed=1)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert len(rows) == 3
    for row in rows:
        audio, rate = sf.read(tmp_path / row["audio_filepath"], dtype="float32")
        assert rate == SAMPLING_RATE and abs(len(audio) / rate - row["duration"]) < 1e-6
        assert set(row["text"]) <= set(ALPHABET + " ")
        assert all(a != b for word in row["text"].split() for a, b in zip(word, word[1:]))
    # Each letter's chord has its own pair of partials: the spectra's peak bins differ pairwise.
    rng = np.random.default_rng(0)
    peaks = set()
    for letter in ALPHABET:
        spectrum = np.abs(np.fft.rfft(letter_chord(letter, rng)))
        low, high = spectrum[:100].argmax(), 100 + spectrum[100:].argmax()  # 100 bins = 667 Hz
        peaks.add((int(low) // 3, int(high) // 10))
    assert len(peaks) == len(ALPHABET)


def _read_audio(manifest: Path) -> tuple[list[np.ndarray], list[str]]:
    import soundfile as sf

    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    audios = [sf.read(manifest.parent / row["audio_filepath"], dtype="float32")[0] for row in rows]
    return audios, [row["text"] for row in rows]


# ------------------------------------------------------------------------------------------ (1) overfit
def test_overfit_tiny_model_reaches_low_cer_and_writes_reports(trained):
    result = trained["result"]
    output_dir = trained["output_dir"]
    cer = result.results["train"]["cer"]
    wer = result.results["train"]["wer"]
    print(
        f"overfit: steps={result.summary['steps']} train CER={cer:.4f} WER={wer:.4f} "
        f"unseen CER={result.results['heldout']['cer']:.4f} train_seconds={result.summary['train_seconds']}"
    )
    assert cer <= 0.15
    assert result.summary["steps"] > 0
    # Reports at the end of the run: results table (Markdown + JSON), curves, model card with model-index.
    table = json.loads((output_dir / "results.json").read_text())
    assert table["train"]["cer"] == pytest.approx(cer) and table["train"]["utterances"] == 32
    assert table["heldout"]["utterances"] == 8
    assert "| train | 32 |" in (output_dir / "results.md").read_text()
    png = (output_dir / "training_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    card = (output_dir / "README.md").read_text()
    assert "model-index" in card and "automatic-speech-recognition" in card
    # The training loss went down (the first logged loss vs the last).
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert losses[-1] < 0.5 * losses[0]


def test_auto_classes_reload_the_pair_and_give_the_same_transcripts(trained):
    output_dir = trained["output_dir"]
    processor = AutoProcessor.from_pretrained(output_dir)
    model = AutoModelForCTC.from_pretrained(output_dir)
    assert type(processor.feature_extractor).__name__ == "ConformerSslFeatureExtractor"
    assert type(processor.tokenizer).__name__ == "Wav2Vec2CTCTokenizer"
    assert type(model).__name__ == "ConformerSslForCTC"
    assert model.config.vocab_size == len(processor.tokenizer) and model.config.pad_token_id == 0
    audios, texts = _read_audio(trained["manifest"])
    hypotheses = transcribe(model, processor, audios, batch_size=5)
    # Batched (with padding) and one-by-one transcripts agree: padded steps never leak into the text.
    singles = [transcribe(model, processor, [audio])[0] for audio in audios[:4]]
    assert hypotheses[:4] == singles
    # The reloaded pair reproduces the CER the run reported.
    from hf_ssl_speech.finetune.metrics import load_metrics

    cer = load_metrics(["cer"])["cer"].compute(predictions=hypotheses, references=texts)
    assert cer == pytest.approx(trained["result"].results["train"]["cer"], abs=1e-6)


# ------------------------------------------------------------------------------------------ (4) arguments
def test_yaml_recipe_with_flag_and_key_value_overrides(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "model:\n  model_preset: tiny\n  from_scratch: true\n"
        "data:\n  train_manifests: [a.jsonl]\n  time_masks: 4\n"
        "finetune:\n  layer_decay: 0.8\n"
        "training:\n  output_dir: out\n  max_steps: 50\n  learning_rate: 1.0e-3\n  eval_strategy: steps\n"
    )
    model_args, data_args, finetune_args, training_args = parse_args(
        ARG_TYPES,
        [
            "--config",
            str(recipe),
            "--max_steps",
            "7",
            "learning_rate=5e-4",
            "eval_manifests=x.jsonl,y.jsonl",
            "--freeze_encoder_steps",
            "3",
            "spec_augment=false",
            "--config_overrides",
            "layerdrop=0.1",
        ],
        defaults={"metric_for_best_model": "wer", "greater_is_better": False},
    )
    assert model_args.model_preset == "tiny" and model_args.from_scratch is True
    assert model_args.config_overrides == "layerdrop=0.1"  # a flag's value may contain "="
    assert data_args.train_manifests == ["a.jsonl"] and data_args.eval_manifests == ["x.jsonl", "y.jsonl"]
    assert data_args.time_masks == 4 and data_args.spec_augment is False and data_args.freq_masks == 2
    assert finetune_args.layer_decay == 0.8 and finetune_args.freeze_encoder_steps == 3
    assert training_args.max_steps == 7 and training_args.learning_rate == 5e-4  # command line wins
    assert training_args.output_dir == "out" and training_args.eval_strategy == "steps"  # recipe kept
    assert training_args.metric_for_best_model == "wer" and training_args.greater_is_better is False
    assert training_args.remove_unused_columns is False  # forced: the collator needs the metadata columns


def test_recipe_errors_name_the_key(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("training:\n  learning_rat: 1.0\n")
    with pytest.raises(ValueError, match="learning_rat.*learning_rate"):
        parse_args(ARG_TYPES, ["--config", str(recipe)])
    with pytest.raises(ValueError, match="Unknown argument 'learning_rat'. Did you mean 'learning_rate'"):
        parse_args(ARG_TYPES, ["learning_rat=1.0"])
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        parse_args(ARG_TYPES, ["--config", str(tmp_path / "nope.yaml")])
    assert parse_config_overrides("final_dropout=0.0,subsampling=striding") == {
        "final_dropout": 0.0,
        "subsampling": "striding",
    }
    with pytest.raises(ValueError, match="key=value"):
        parse_config_overrides("final_dropout")


@pytest.mark.parametrize("name", ["ctc_demo", "ctc_base", "speaker_id_demo", "superb_probe"])
def test_shipped_recipes_parse(name):
    parsed = parse_args(ARG_TYPES, ["--config", str(REPO_ROOT / "configs" / "finetune" / f"{name}.yaml"), "--use_cpu"])
    assert parsed[3].output_dir.startswith("runs/")


def test_from_scratch_and_checkpoint_init_differ_only_in_weights(tmp_path, tiny_config):
    checkpoint = tmp_path / "pretrained"
    encoder = ConformerSslModel(tiny_config())
    encoder.save_pretrained(checkpoint)
    pretrained, report = init_ctc_model(12, 0, str(checkpoint))
    scratch, none = init_ctc_model(12, 0, str(checkpoint), from_scratch=True)
    assert none is None and report.encoder_complete and report.new_head == ["lm_head.bias", "lm_head.weight"]
    skip = {"_name_or_path", "architectures", "transformers_version", "dtype", "torch_dtype"}
    config_a = {k: v for k, v in pretrained.config.to_dict().items() if k not in skip}
    config_b = {k: v for k, v in scratch.config.to_dict().items() if k not in skip}
    assert config_a == config_b and config_a["vocab_size"] == 12
    state_a, state_b = pretrained.state_dict(), scratch.state_dict()
    assert {k: v.shape for k, v in state_a.items()} == {k: v.shape for k, v in state_b.items()}
    source = encoder.state_dict()
    for name, value in source.items():
        assert torch.equal(state_a[f"conformer.{name}"], value), name  # transferred exactly
    weight = "conformer.layers.0.feed_forward1.linear1.weight"
    assert not torch.equal(state_b[weight], source[weight.removeprefix("conformer.")])  # random init


def test_pretraining_checkpoint_transfers_encoder_and_drops_ssl_heads(tmp_path, tiny_config):
    from hf_ssl_speech.modeling_conformer_ssl import ConformerSslForPreTraining

    pretrained = ConformerSslForPreTraining(tiny_config(objectives={"bestrq": {}, "contrastive": {}}))
    pretrained.save_pretrained(tmp_path / "ssl")
    model, report = init_ctc_model(7, 0, str(tmp_path / "ssl"))
    assert report.encoder_complete and report.new_head == ["lm_head.bias", "lm_head.weight"]
    assert "bestrq_head.weight" in report.unused and "quantizer.codevectors" in report.unused
    source = pretrained.conformer.state_dict()
    assert all(torch.equal(model.conformer.state_dict()[name], value) for name, value in source.items())


def test_pretraining_checkpoint_load_is_one_line_of_ours_not_the_load_report(tmp_path, tiny_config, caplog):
    from hf_ssl_speech.modeling_conformer_ssl import ConformerSslForCTC, ConformerSslForPreTraining

    ConformerSslForPreTraining(tiny_config(objectives={"bestrq": {}})).save_pretrained(tmp_path / "ssl")
    seen: list[str] = []
    collector = logging.Handler()
    collector.emit = lambda record: seen.append(record.getMessage())
    transformers_logger = logging.getLogger("transformers.modeling_utils")
    transformers_logger.addHandler(collector)
    try:
        ConformerSslForCTC.from_pretrained(str(tmp_path / "ssl"), vocab_size=7, pad_token_id=0)
        assert any("LOAD REPORT" in message for message in seen)  # what a plain from_pretrained prints
        seen.clear()
        with caplog.at_level(logging.INFO, logger="hf_ssl_speech.finetune.model_init"):
            init_ctc_model(7, 0, str(tmp_path / "ssl"))
    finally:
        transformers_logger.removeHandler(collector)
    assert not any("LOAD REPORT" in message for message in seen), seen
    ours = [record.getMessage() for record in caplog.records if record.name == "hf_ssl_speech.finetune.model_init"]
    assert len(ours) == 1 and "\n" not in ours[0], ours
    assert "dropped (not used by this head): bestrq_head, bestrq_quantizer, masked_spec_embed" in ours[0]
    assert "new (randomly initialised): lm_head" in ours[0]


def test_missing_encoder_weights_warn_loudly_by_name(tmp_path, tiny_config):
    checkpoint = tmp_path / "broken"
    ConformerSslModel(tiny_config()).save_pretrained(checkpoint)
    weights = load_file(checkpoint / "model.safetensors")
    dropped = "layers.1.conv.depthwise_conv.weight"
    del weights[dropped]
    save_file(weights, checkpoint / "model.safetensors", metadata={"format": "pt"})
    with pytest.warns(UserWarning, match=rf"ENCODER WEIGHTS NOT LOADED.*conformer\.{dropped}"):
        _, report = init_ctc_model(9, 0, str(checkpoint))
    assert report.missing_encoder == [f"conformer.{dropped}"] and not report.encoder_complete


def test_model_needs_a_checkpoint_or_from_scratch():
    with pytest.raises(ValueError, match="--model_name_or_path"):
        init_ctc_model(9, 0)
    with pytest.raises(ValueError, match="--from_scratch"):
        init_ctc_model(9, 0, model_preset="tiny")
    model, _ = init_ctc_model(9, 0, model_preset="tiny", from_scratch=True, config_overrides="num_hidden_layers=1")
    assert model.config.num_hidden_layers == 1 and model.lm_head.out_features == 9


# ------------------------------------------------------------------------------------------ text / vocab
def test_vocabulary_and_tokenizer_round_trip(tmp_path):
    assert normalize_transcript("  Hello, WORLD!  It’s 2 o'clock. ") == "hello world it's 2 o'clock"
    vocab = build_vocab(["ab ba", "Cab!"])
    assert vocab == {"<pad>": 0, "<unk>": 1, "|": 2, "a": 3, "b": 4, "c": 5}
    processor = build_processor(["ab ba", "cab"])
    tokenizer = processor.tokenizer
    ids = tokenizer(normalize_transcript("Ab, cz")).input_ids
    assert ids == [3, 4, 2, 5, 1]  # z was never seen: <unk>
    # CTC grouping: repeats merge, blanks (pad) separate, | becomes a space.
    assert tokenizer.decode([3, 3, 0, 3, 4, 2, 0, 5]) == "aab c"
    processor.save_pretrained(tmp_path / "p")
    again = AutoProcessor.from_pretrained(tmp_path / "p")
    assert again.tokenizer.get_vocab() == tokenizer.get_vocab()
    assert isinstance(again.feature_extractor, ConformerSslFeatureExtractor)
    with pytest.raises(ValueError, match="empty"):
        build_vocab(["", " !? "])


# ------------------------------------------------------------------------------------------ augmentation
def test_spec_augment_masks_only_valid_frames_within_bounds():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(3, 200, 80) + 5.0  # no natural zeros
    lengths = torch.tensor([200, 120, 40])
    features[1, 120:] = 0.0
    features[2, 40:] = 0.0
    config = SpecAugmentConfig(freq_masks=2, freq_width=27, time_masks=10, time_width=0.05)
    out = spec_augment(features, lengths, config, generator)
    masked = out == 0.0
    for row, length in enumerate(lengths.tolist()):
        cells = masked[row, :length]
        full_bins = cells.all(dim=0)  # frequency masks cover every valid frame
        assert 0 < int(full_bins.sum()) <= 2 * 27
        time_rows = cells[:, ~full_bins].all(dim=1)  # time masks cover every bin
        assert int(time_rows.sum()) <= 10 * max(1, int(0.05 * length))
        # Everything not masked is unchanged.
        keep = ~masked[row, :length]
        assert torch.equal(out[row, :length][keep], features[row, :length][keep])
    assert torch.equal(out[1, 120:], features[1, 120:]) and torch.equal(out[2, 40:], features[2, 40:])
    # Deterministic with a seeded generator, different across seeds.
    again = spec_augment(features, lengths, config, torch.Generator().manual_seed(0))
    other = spec_augment(features, lengths, config, torch.Generator().manual_seed(1))
    assert torch.equal(out, again) and not torch.equal(out, other)


def test_ctc_collator_pads_labels_and_augments_only_training_rows(tmp_path):
    manifest = write_tone_corpus(tmp_path, count=3, seed=2)
    rows, left_out = manifest_rows([str(manifest)], require_text=True)
    assert len(rows) == 3 and not left_out and all(row["length"] > 0 for row in rows)
    processor = build_processor([row["text"] for row in rows])
    collator = CtcCollator(processor, SpecAugmentConfig(), dither=True)
    eval_rows = [dict(row, augment=False) for row in rows]
    batch = collator(eval_rows)
    assert set(batch) == {"input_features", "attention_mask", "labels"}
    lengths = [len(processor.tokenizer(row["text"]).input_ids) for row in rows]
    assert batch["labels"].shape == (3, max(lengths))
    for index, length in enumerate(lengths):
        assert (batch["labels"][index, length:] == -100).all() and (batch["labels"][index, :length] >= 0).all()
    # Eval rows: exactly the feature extractor's output (deterministic).
    audios, _ = _read_audio(manifest)
    direct = processor.feature_extractor(audios, sampling_rate=16000, return_tensors="pt")
    assert torch.allclose(batch["input_features"], direct["input_features"], atol=1e-3)
    assert torch.equal(collator(eval_rows)["input_features"], batch["input_features"])
    # Training rows: SpecAugment zeroes cells (and dither changes the rest slightly).
    train_batch = collator([dict(row, augment=True) for row in rows])
    valid = batch["attention_mask"].bool()
    assert (train_batch["input_features"][valid] == 0).float().mean() > 0.05
    assert not torch.equal(train_batch["input_features"], batch["input_features"])


# ------------------------------------------------------------------------------------------ optimisation
def test_layerwise_lr_decay_groups(tiny_config):
    model, _ = init_ctc_model(9, 0, model_preset="tiny", from_scratch=True, config_overrides="num_hidden_layers=2")
    groups = layerwise_param_groups(model, learning_rate=1.0, weight_decay=0.01, layer_decay=0.5)
    # Every parameter exactly once.
    grouped = [id(p) for group in groups for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())
    lr_of = {id(p): group["lr"] for group in groups for p in group["params"]}
    decay_of = {id(p): group["weight_decay"] for group in groups for p in group["params"]}
    params = dict(model.named_parameters())
    assert lr_of[id(params["lm_head.weight"])] == 1.0  # head: full lr
    assert lr_of[id(params["conformer.layers.1.feed_forward1.linear1.weight"])] == 0.5  # top block
    assert lr_of[id(params["conformer.layers.0.feed_forward1.linear1.weight"])] == 0.25
    assert lr_of[id(params["conformer.subsampling.linear.weight"])] == 0.125  # bottom
    assert decay_of[id(params["conformer.layers.0.self_attn.bias_u"])] == 0.0
    assert decay_of[id(params["conformer.layers.0.norm_out.weight"])] == 0.0
    assert decay_of[id(params["lm_head.bias"])] == 0.0 and decay_of[id(params["lm_head.weight"])] == 0.01
    assert groups[0]["lr"] == 1.0  # the head group first: Trainer logs the peak lr
    with pytest.raises(ValueError, match="layer_decay"):
        layerwise_param_groups(model, 1.0, 0.0, layer_decay=1.5)


def _run_steps(tmp_path, freeze_steps: int, max_steps: int, trainer_class: type = Trainer):
    """Train a tiny CTC model for `max_steps` with the encoder frozen for `freeze_steps`; (before, after) states."""
    manifest = write_tone_corpus(tmp_path / "data", count=4, seed=3)
    rows, _ = manifest_rows([str(manifest)], require_text=True)
    processor = build_processor([row["text"] for row in rows])
    model, _ = init_ctc_model(
        len(processor.tokenizer), 0, model_preset="tiny", from_scratch=True, config_overrides=TINY_CTC_OVERRIDES
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        use_cpu=True,
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=rows_to_dataset(rows, augment=False),
        data_collator=CtcCollator(processor, None),
        callbacks=[FreezeEncoderCallback(freeze_steps)],
        optimizers=(build_optimizer(model, args, layer_decay=0.9), None),
    )
    trainer.train()
    return before, model.state_dict(), model


def test_freeze_encoder_callback_freezes_then_unfreezes(tmp_path):
    weight = "conformer.layers.0.feed_forward1.linear1.weight"
    before, after, model = _run_steps(tmp_path / "a", freeze_steps=2, max_steps=2)
    assert torch.equal(before[weight], after[weight])  # encoder untouched while frozen
    assert not torch.equal(before["lm_head.weight"], after["lm_head.weight"])  # the head trained
    before, after, model = _run_steps(tmp_path / "b", freeze_steps=1, max_steps=3)
    assert not torch.equal(before[weight], after[weight])  # unfrozen after step 1: the encoder trained
    assert all(p.requires_grad for p in model.parameters())


def test_frozen_encoder_keeps_batchnorm_statistics_only_with_ssl_trainer(tmp_path):
    """A probe's encoder must be a fixed function: `SslTrainer` keeps it in eval mode while frozen."""
    stats = "conformer.layers.0.conv.norm.running_mean"
    before, after, _ = _run_steps(tmp_path / "plain", freeze_steps=2, max_steps=2)
    assert not torch.equal(before[stats], after[stats])  # the stock Trainer lets BatchNorm follow the data
    before, after, _ = _run_steps(tmp_path / "ssl", freeze_steps=2, max_steps=2, trainer_class=SslTrainer)
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("conformer."))
    assert not torch.equal(before["lm_head.weight"], after["lm_head.weight"])
    assert issubclass(CtcTrainer, SslTrainer)  # the CTC script and the experiment train with CtcTrainer


# ------------------------------------------------------------------------------------------ decoding / reports
def test_greedy_ids_blank_padded_steps():
    logits = torch.zeros(2, 4, 3)
    logits[:, :, 2] = 1.0  # every step says "2", padding included
    ids = greedy_ctc_ids(logits, torch.tensor([4, 2]), blank_id=0)
    assert ids.tolist() == [[2, 2, 2, 2], [2, 2, 0, 0]]


def test_results_table_curves_and_card(tmp_path):
    results = {"dev": {"utterances": 3, "wer": 0.25, "cer": 0.1, "loss": 1.5}}
    md, js = write_results(results, tmp_path)
    assert json.loads(js.read_text()) == results
    text = md.read_text()
    assert "| dev | 3 |" in text and "25.00" in text and "10.00" in text
    history = [{"step": 10, "loss": 3.0}, {"step": 20, "loss": 2.0}, {"step": 20, "eval_loss": 2.2, "eval_wer": 0.5}]
    png = plot_training_curves(history, tmp_path / "curves.png")
    assert png is not None and png.stat().st_size > 1000
    assert plot_training_curves([{"step": 1, "epoch": 1.0}], tmp_path / "none.png") is None
    card = ctc_model_card("me/tiny-ctc", results, base_model="me/ssl-encoder")
    import yaml

    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["base_model"] == "me/ssl-encoder" and metadata["pipeline_tag"] == "automatic-speech-recognition"
    entry = metadata["model-index"][0]["results"][0]
    assert entry["dataset"]["split"] == "dev"
    assert {m["type"]: m["value"] for m in entry["metrics"]} == {"wer": 25.0, "cer": 10.0}


# ------------------------------------------------------------------------------------------ several processes
# The tiny CTC model with a FastConformer stem: what a Parakeet transducer's encoder holds.
TINY_FAST_OVERRIDES = f"{TINY_CTC_OVERRIDES},subsampling=dw_striding,subsampling_factor=4,subsampling_conv_channels=16"


def _heads_without_unused_reasons(tmp_path):
    """(name, model, training batch) of each fine-tuning head, built as its script builds it, from scratch."""
    from hf_ssl_speech import ConformerSslConfig, ConformerSslForSequenceClassification
    from hf_ssl_speech.finetune.transducer import (
        TransducerArguments,
        TransducerCollator,
        build_transducer_processor,
        build_transducer_tokenizer,
        init_transducer_model,
    )

    rows = manifest_rows([str(write_tone_corpus(tmp_path, 3, seed=6))], 0.0, None, True, None, None)[0]
    from hf_ssl_speech.finetune.run import _feature_extractor

    scratch = ModelArguments(from_scratch=True, model_preset="tiny", config_overrides=TINY_CTC_OVERRIDES)
    processor = build_processor([row["text"] for row in rows], _feature_extractor(scratch))
    overrides = parse_config_overrides(TINY_CTC_OVERRIDES)
    ctc, _ = init_ctc_model(len(processor.tokenizer), processor.tokenizer.pad_token_id, None, True, "tiny", overrides)
    ctc_batch = CtcCollator(processor, SpecAugmentConfig(2, 0.1, 2, 0.05))(rows)
    classifier = ConformerSslForSequenceClassification(
        ConformerSslConfig(
            **{**ctc.config.to_dict(), "id2label": dict(enumerate("abc")), "use_weighted_layer_sum": True}
        )
    )
    features = ctc_batch["input_features"]
    classifier_batch = {"input_features": features, "attention_mask": ctc_batch["attention_mask"]}
    classifier_batch["labels"] = torch.tensor([0, 2, 1])
    tokenizer = build_transducer_tokenizer([row["text"] for row in rows], 16)
    model_args = ModelArguments(from_scratch=True, model_preset="tiny", config_overrides=TINY_FAST_OVERRIDES)
    tdt, _ = init_transducer_model("tdt", tokenizer, model_args, TransducerArguments(decoder_hidden_size=16))
    _, tdt_features = build_transducer_processor(tokenizer, tdt.config.encoder_config.num_mel_bins)
    tdt_batch = TransducerCollator(tdt_features, tokenizer)(rows)
    return [("ctc", ctc, ctc_batch), ("classification", classifier, classifier_batch), ("tdt", tdt, tdt_batch)]


def test_without_a_reason_every_fine_tuning_parameter_gets_a_gradient(tmp_path):
    # What lets DDP run without its unused-parameter search (`set_unused_parameter_search`): when
    # `unused_parameter_reasons` is empty, one training step of each head gives every trainable parameter a
    # gradient. A parameter that only sometimes joins the loss would make DDP stop at the next step.
    from hf_ssl_speech.finetune.optim import set_unused_parameter_search, unused_parameter_reasons

    for name, model, batch in _heads_without_unused_reasons(tmp_path):
        assert unused_parameter_reasons(FinetuneArguments(), model.config) == [], name
        model.train()
        model(**batch).loss.backward()
        missing = [
            key for key, parameter in model.named_parameters() if parameter.requires_grad and parameter.grad is None
        ]
        assert not missing, (name, missing)
    # The reasons that need the search, each named by its field (a transducer's encoder config is nested).
    assert unused_parameter_reasons(FinetuneArguments(freeze_encoder_steps=5), model.config) == [
        "freeze_encoder_steps=5"
    ]
    assert unused_parameter_reasons(FinetuneArguments(freeze_encoder=True, freeze_encoder_steps=5), model.config) == []
    model.config.encoder_config.layerdrop = 0.1
    assert unused_parameter_reasons(FinetuneArguments(), model.config) == ["layerdrop=0.1"]
    # One process: the default is set from the reasons, and an explicit false is kept (DDP is not used).
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True)
    set_unused_parameter_search(args, ["layerdrop=0.1"])
    assert args.ddp_find_unused_parameters is True
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, ddp_find_unused_parameters=False)
    set_unused_parameter_search(args, ["layerdrop=0.1"])
    assert args.ddp_find_unused_parameters is False
    # Several processes: an explicit false that DDP would refuse after the first step is refused now, by its reason.
    from types import SimpleNamespace

    from hf_ssl_speech.errors import ConfigError

    several = SimpleNamespace(ddp_find_unused_parameters=False, world_size=2)
    with pytest.raises(ConfigError, match="ddp_find_unused_parameters=False, but with layerdrop=0.1 .*drop"):
        set_unused_parameter_search(several, ["layerdrop=0.1"])
    set_unused_parameter_search(several, [])
    assert several.ddp_find_unused_parameters is False


# A fine-tuning script (scripts/finetune_ctc.py, finetune_transducer.py) as it is, plus one callback that saves each
# process's own final parameters (the Trainer saves only the main process's). Not the buffers: DDP broadcasts
# BatchNorm's running statistics from process 0 at each forward, so each process's differ by its own last batch, and
# the saved model holds process 0's.
_SAVE_EACH_REPLICA = """
import importlib
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

import hf_ssl_speech.finetune.run as run
import hf_ssl_speech.finetune.transducer as transducer


class SaveEachReplica(TrainerCallback):
    def on_train_end(self, args, state, control, model=None, **kwargs):
        weights = {name: parameter.detach() for name, parameter in model.named_parameters()}
        torch.save(weights, Path(args.output_dir) / f"replica_{args.process_index}.pt")
        Path(args.output_dir, "find_unused.txt").write_text(str(args.ddp_find_unused_parameters))


stock = run.train_time_options


def with_replica_saving(*args, **kwargs):
    spec, callbacks = stock(*args, **kwargs)
    return spec, [*callbacks, SaveEachReplica()]


run.train_time_options = transducer.train_time_options = with_replica_saving
sys.path.insert(0, sys.argv.pop(1))
main = importlib.import_module(sys.argv.pop(1)).main
main(sys.argv[1:])
"""


def _fine_tune_in_two_processes(tmp_path, script: str, args: list[str]) -> tuple[subprocess.CompletedProcess, list]:
    """`accelerate launch --num_processes 2 scripts/<script>.py args` (2 gloo workers): the run and each process's
    final parameters."""
    launcher = tmp_path / "finetune_each_replica.py"
    launcher.write_text(_SAVE_EACH_REPLICA)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    proc = accelerate_launch(launcher, [str(REPO_ROOT / "scripts"), script, *args], 2, env, tmp_path, 300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = Path(args[args.index("--output_dir") + 1])
    replicas = [torch.load(out / f"replica_{rank}.pt") for rank in (0, 1)]
    assert replicas[0].keys() == replicas[1].keys()
    differ = [name for name in replicas[0] if not torch.equal(replicas[0][name], replicas[1][name])]
    assert not differ, differ
    # The saved model is the replicas' shared state.
    saved = load_file(out / "model.safetensors")
    assert all(torch.equal(saved[name], replicas[0][name].to(saved[name].dtype)) for name in replicas[0])
    return proc, replicas


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_gloo_processes_fine_tune_with_one_model_across_the_unfreeze(tmp_path):
    # `accelerate launch --num_processes 2 scripts/finetune_ctc.py`: the Trainer wraps the model in DDP before the
    # head-only phase freezes the encoder, so DDP holds every parameter; after the unfreeze the encoder's gradients
    # must be averaged over the processes too, or each process's encoder follows its own batches. The phase needs
    # DDP's unused-parameter search (without it DDP stops at step 2: the frozen encoder got no gradient). A run
    # without a reason for the search runs without it: the transducer test below.
    manifest = write_tone_corpus(tmp_path / "data", count=16, seed=5)
    out = tmp_path / "out"
    args = [*tiny_scratch_args(), "--train_manifests", str(manifest)]
    args += ["--output_dir", str(out), "--max_steps", "6", "--freeze_encoder_steps", "3"]
    args += ["--per_device_train_batch_size", "4", "--eval_strategy", "no", "--save_strategy", "no"]
    args += ["--disable_tqdm", "true", "--learning_rate", "3e-3"]
    proc, replicas = _fine_tune_in_two_processes(tmp_path, "finetune_ctc", args)
    assert "step 3: encoder unfrozen" in proc.stderr, proc.stderr[-3000:]
    assert (out / "find_unused.txt").read_text() == "True"
    assert any(name.startswith("conformer.") for name in replicas[0])  # the encoder is in the shared state
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 6 and state["train_batch_size"] == 4


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_gloo_processes_fine_tune_one_tdt_transducer(tmp_path):
    # `accelerate launch --num_processes 2 scripts/finetune_transducer.py`: transformers' ParakeetForTDT (encoder,
    # prediction network, joint) under DDP, without the unused-parameter search (every parameter joins the TDT loss),
    # so without DDP's warning that the search found nothing
    manifest = write_tone_corpus(tmp_path / "data", count=16, seed=7)
    out = tmp_path / "out"
    args = [*tiny_scratch_args(TINY_FAST_OVERRIDES), "--train_manifests", str(manifest)]
    args += ["--output_dir", str(out), "--max_steps", "4", "tokenizer_vocab_size=20", "decoder_hidden_size=16"]
    args += ["--per_device_train_batch_size", "4", "--eval_strategy", "no", "--save_strategy", "no"]
    args += ["--disable_tqdm", "true", "--learning_rate", "1e-3"]
    proc, replicas = _fine_tune_in_two_processes(tmp_path, "finetune_transducer", args)
    assert (out / "find_unused.txt").read_text() == "False"
    assert "did not find any unused parameters" not in proc.stderr, proc.stderr[-3000:]
    assert {name.split(".")[0] for name in replicas[0]} >= {"encoder", "decoder", "joint"}
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4


# ------------------------------------------------------------------------------------------ push to the Hub
@pytest.mark.slow
def test_push_to_hub_uploads_model_processor_code_and_card(tmp_path):
    import hub_server  # tests/hub_server.py: the loopback Hub

    manifest = write_tone_corpus(tmp_path / "data", count=4, seed=4)
    with hub_server.HubServer() as hub:
        env = {**os.environ, **hub.env(), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
        command = [
            sys.executable,
            str(REPO_ROOT / "scripts" / "finetune_ctc.py"),
            *tiny_scratch_args(),
            "--train_manifests",
            str(manifest),
            "--eval_manifests",
            str(manifest),
            "--output_dir",
            str(tmp_path / "out"),
            "--max_steps",
            "2",
            "--use_cpu",
            "--per_device_train_batch_size",
            "4",
            "--save_strategy",
            "no",
            "--eval_strategy",
            "no",
            "--push_to_hub",
            "--hub_model_id",
            "tester/tiny-ctc",
            "--disable_tqdm",
            "true",
        ]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        # Load the pushed pair back from the loopback Hub, in a fresh process (HF_ENDPOINT is read at import).
        check = (
            "import hf_ssl_speech, json, yaml\n"
            "from huggingface_hub import HfApi, hf_hub_download\n"
            "from transformers import AutoModelForCTC, AutoProcessor\n"
            "files = sorted(HfApi().list_repo_files('tester/tiny-ctc'))\n"
            "card = open(hf_hub_download('tester/tiny-ctc', 'README.md')).read()\n"
            "meta = yaml.safe_load(card.split('---')[1])\n"
            "model = AutoModelForCTC.from_pretrained('tester/tiny-ctc')\n"
            "processor = AutoProcessor.from_pretrained('tester/tiny-ctc')\n"
            "print(json.dumps({'files': files, 'index': meta['model-index'], 'vocab': model.config.vocab_size,\n"
            "                  'tokens': len(processor.tokenizer)}))\n"
        )
        loaded = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=300)
        assert loaded.returncode == 0, loaded.stderr[-3000:]
    info = json.loads(loaded.stdout.strip().splitlines()[-1])
    for name in (
        "config.json",
        "model.safetensors",
        "modeling_conformer_ssl.py",
        "configuration_conformer_ssl.py",
        "feature_extraction_conformer_ssl.py",
        "processor_config.json",
        "vocab.json",
        "README.md",
        "results.json",
    ):
        assert name in info["files"], name
    assert not any(name.startswith("checkpoint-") for name in info["files"])
    metrics = {m["type"] for m in info["index"][0]["results"][0]["metrics"]}
    assert metrics == {"wer", "cer"} and info["vocab"] == info["tokens"]


# ------------------------------------------------------------------------------------------ real speech (slow)
@pytest.mark.slow
def test_overfit_on_demo_corpus_speech(tmp_path):
    """Real (espeak) speech: 8 short demo-corpus utterances, overfit to CER <= 0.15. Minutes of CPU."""
    import hf_ssl_speech.synthetic.corpus as demo

    # espeak comes from espeakng-loader, a declared dependency ([demo]): a broken install fails here, never skips.
    demo.make_demo_corpus(tmp_path / "demo", minutes=1.5, seed=0, engines=["espeak"], num_workers=1, progress=False)
    rows = [
        json.loads(line)
        for split in ("pretrain", "finetune", "test")
        for line in (tmp_path / "demo" / f"{split}.jsonl").read_text().splitlines()
    ]
    rows = sorted(rows, key=lambda row: row["duration"])[:8]
    manifest = tmp_path / "demo" / "short8.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    overrides = TINY_CTC_OVERRIDES.replace("hidden_size=64", "hidden_size=96").replace(
        "num_hidden_layers=2", "num_hidden_layers=3"
    )
    result = load_script("finetune_ctc").main(
        [
            *tiny_scratch_args(overrides),
            "--train_manifests",
            str(manifest),
            "--eval_manifests",
            str(manifest),
            "--output_dir",
            str(tmp_path / "o"),
            "--use_cpu",
            "--max_steps",
            "150",
            "--per_device_train_batch_size",
            "8",
            "--learning_rate",
            "3e-3",
            "--warmup_steps",
            "30",
            "--eval_strategy",
            "no",
            "--save_strategy",
            "no",
            "spec_augment=false",
            "--disable_tqdm",
            "true",
        ]
    )
    cer = result.results["short8"]["cer"]
    print(
        f"demo-corpus overfit: CER={cer:.4f} steps={result.summary['steps']} seconds={result.summary['train_seconds']}"
    )
    assert cer <= 0.15


# ------------------------------------------------------------------------------------------ script options
def test_early_stopping_on_wer_stops_the_run(tmp_path):
    """learning_rate 0 keeps WER constant: with patience 1 the run stops at the second evaluation."""
    manifest = write_tone_corpus(tmp_path / "data", count=4, seed=5)
    heldout = write_tone_corpus(tmp_path / "data", count=2, seed=6, name="heldout")
    argv = [
        *tiny_scratch_args(),
        "--train_manifests",
        str(manifest),
        "--eval_manifests",
        str(manifest),
        "--test_manifests",  # scored once with the selected model, never during training
        str(heldout),
        "--output_dir",
        str(tmp_path / "o"),
        "--use_cpu",
        "--max_steps",
        "50",
        "--per_device_train_batch_size",
        "4",
        "--learning_rate",
        "0",
        "--eval_strategy",
        "steps",
        "--eval_steps",
        "2",
        "--save_strategy",
        "steps",
        "--save_steps",
        "2",
        "--load_best_model_at_end",
        "early_stopping_patience=1",
        "--disable_tqdm",
        "true",
    ]
    result = load_script("finetune_ctc").main(argv)
    assert result.summary["steps"] == 4
    history = json.loads((tmp_path / "o" / "trainer_state.json").read_text())["log_history"]
    assert [entry["step"] for entry in history if "eval_wer" in entry] == [2, 4]
    assert [entry for entry in history if "heldout_wer" in entry] == []  # not during training
    assert result.results["heldout"]["utterances"] == 2 and "wer" in result.results["heldout"]
    # The run says why it ended early instead of leaving the progress bar at 4/50.
    assert result.summary["early_stopped"].startswith("early stopping at step 4 of 50: wer did not improve")
    # The same command again would mix two runs in one folder: refused before any model is built.
    with pytest.raises(OutputDirInUseError, match=r"already holds a run \(last checkpoint checkpoint-4\)"):
        load_script("finetune_ctc").main(argv)


@pytest.mark.parametrize(("extra", "stop_step"), [([], 6), (["early_stopping_start_step=6"], 8)])
def test_early_stopping_does_not_count_the_head_only_phase(tmp_path, extra, stop_step):
    """With freeze_encoder_steps=4, the evaluations at steps 2 and 4 (head only) do not count towards the
    patience: a constant WER (learning_rate 0) stops the run at the first evaluation after it, step 6; with
    early_stopping_start_step=6 the one at step 6 does not count either, and the run stops at step 8."""
    manifest = write_tone_corpus(tmp_path / "data", count=4, seed=5)
    argv = [
        *tiny_scratch_args(),
        "--train_manifests",
        str(manifest),
        "--eval_manifests",
        str(manifest),
        "--output_dir",
        str(tmp_path / "o"),
        "--use_cpu",
        "--max_steps",
        "50",
        "--per_device_train_batch_size",
        "4",
        "--learning_rate",
        "0",
        "--eval_strategy",
        "steps",
        "--eval_steps",
        "2",
        "--save_strategy",
        "steps",
        "--save_steps",
        "2",
        "--load_best_model_at_end",
        "early_stopping_patience=1",
        "freeze_encoder_steps=4",
        *extra,
        "--disable_tqdm",
        "true",
    ]
    result = load_script("finetune_ctc").main(argv)
    assert result.summary["steps"] == stop_step
    assert result.summary["early_stopped"].startswith(f"early stopping at step {stop_step} of 50")


def test_a_fresh_run_takes_an_empty_or_missing_folder_and_resume_continues(tmp_path):
    check_output_dir(TrainingArguments(output_dir=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    check_output_dir(TrainingArguments(output_dir=str(tmp_path / "empty")))
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "all_results.json").write_text("{}")
    with pytest.raises(OutputDirInUseError, match="files of an earlier run"):
        check_output_dir(TrainingArguments(output_dir=str(tmp_path / "used")))
    check_output_dir(TrainingArguments(output_dir=str(tmp_path / "used"), resume_from_checkpoint="x"))


def test_without_manifests_the_demo_corpus_is_made_and_used_and_its_test_split_is_read_only_at_the_end(
    tmp_path, monkeypatch
):
    """The demo selects (best checkpoint, early stopping) on its valid split; its test split is read once, at the end.

    Every manifest opened where `ManifestSource` reads it (`hf_ssl_speech.data.sources`), every clip decoded for a
    batch (`finetune.rows.decode_example`) and the return of `CtcTrainer.train` is logged in order.
    """
    import hf_ssl_speech.synthetic.corpus as demo

    demo.check_espeak()  # espeakng-loader is a declared dependency ([demo]): a broken install fails, never skips
    from hf_ssl_speech.data import sources
    from hf_ssl_speech.finetune import rows as rows_module
    from hf_ssl_speech.finetune.trainers import CtcTrainer

    events: list[tuple[str, str]] = []
    real_open, real_decode, real_train = open, rows_module.decode_example, CtcTrainer.train

    def logged_open(path, *args, **kwargs):
        events.append(("open", Path(path).name))
        return real_open(path, *args, **kwargs)

    def logged_decode(raw, *args, **kwargs):
        events.append(("decode", Path(raw.audio).name))
        return real_decode(raw, *args, **kwargs)

    def logged_train(self, *args, **kwargs):
        output = real_train(self, *args, **kwargs)
        events.append(("train_end", ""))
        return output

    monkeypatch.setattr(sources, "open", logged_open, raising=False)
    monkeypatch.setattr(rows_module, "decode_example", logged_decode)
    monkeypatch.setattr(CtcTrainer, "train", logged_train)
    folder = tmp_path / "demo"
    result = load_script("finetune_ctc").main(
        [
            *tiny_scratch_args(),
            f"demo_corpus_dir={folder}",
            "demo_minutes=0.5",
            "--output_dir",
            str(tmp_path / "o"),
            "--use_cpu",
            "--max_steps",
            "2",
            "--per_device_train_batch_size",
            "2",
            "--eval_strategy",
            "steps",
            "--eval_steps",
            "1",
            "--save_strategy",
            "steps",
            "--save_steps",
            "1",
            "--load_best_model_at_end",
            "--metric_for_best_model",
            "cer",
            "early_stopping_patience=3",
            "--dataloader_num_workers",
            "0",
            "--disable_tqdm",
            "true",
        ]
    )
    assert set(result.results) == {"valid", "test"} and result.results["test"]["utterances"] >= 1
    assert result.summary["selected_on"] == "valid"
    end = events.index(("train_end", ""))
    test_reads = [i for i, (kind, name) in enumerate(events) if name == "test.jsonl" or name.startswith("test-")]
    valid_decodes = [i for i, (kind, name) in enumerate(events) if kind == "decode" and name.startswith("valid-")]
    assert test_reads and min(test_reads) > end, events  # nothing of test before training ended, and read after
    # indexed once: as many opens as the valid manifest's single indexing takes
    assert events.count(("open", "test.jsonl")) == events.count(("open", "valid.jsonl"))
    assert valid_decodes and min(valid_decodes) < end  # the evaluations during training were on valid
    history = json.loads((tmp_path / "o" / "trainer_state.json").read_text())["log_history"]
    assert [entry["step"] for entry in history if "eval_cer" in entry] == [1, 2]
    # The demo fine-tunes on its pretrain + finetune splits (its transcribed minutes; valid and test held out).
    lines = sum(len((folder / f"{split}.jsonl").read_text().splitlines()) for split in ("pretrain", "finetune"))
    assert result.summary["train_utterances"] == lines


def test_ctc_feasibility_matches_the_model_and_refuses_impossible_data(tmp_path):
    from hf_ssl_speech.finetune.ctc import ctc_min_steps, ctc_output_steps, drop_infeasible_ctc, split_ctc_feasible

    model, _ = init_ctc_model(9, 0, model_preset="tiny", from_scratch=True, config_overrides="num_hidden_layers=1")
    extractor = ConformerSslFeatureExtractor()
    for samples in (3200, 16000, 16000 + 1279, 40000):
        features = extractor(np.zeros(samples, dtype=np.float32) + 1e-3, sampling_rate=16000, return_tensors="pt")
        with torch.no_grad():
            steps = model(**features).logits.shape[1]
        assert ctc_output_steps(samples, model.config) == steps  # 8x: ceil(ceil(ceil(frames / 2) / 2) / 2)
    assert ctc_min_steps([3, 3, 4, 3]) == 5 and ctc_min_steps([]) == 0
    manifest = write_tone_corpus(tmp_path, count=4, seed=6)
    rows, _ = manifest_rows([str(manifest)])
    processor = build_processor([row["text"] for row in rows])
    # Tone words carry ~5 letters per second: they fit 8x (12.5 steps/s) ...
    assert len(split_ctc_feasible(rows, processor.tokenizer, model.config)[0]) == 4
    # ... but not when the same transcripts are claimed for clips 10x shorter.
    squeezed = [dict(row, length=row["length"] // 10) for row in rows]
    assert len(split_ctc_feasible(squeezed, processor.tokenizer, model.config)[1]) == 4
    with pytest.raises(ValueError, match="subsampling_factor=4"):
        drop_infeasible_ctc(squeezed, processor.tokenizer, model.config, "training data")
    mixed = rows[:3] + squeezed[3:]
    assert drop_infeasible_ctc(mixed, processor.tokenizer, model.config, "training data") == rows[:3]


def test_gradient_accumulation_averages_the_loss(tmp_path):
    """With 2 accumulation steps the logged loss is the mean of the micro-batch losses, not their sum
    (`ConformerSslPreTrainedModel.accepts_loss_kwargs = False`: our heads' `**kwargs` would otherwise make
    Trainer skip the division)."""
    manifest = write_tone_corpus(tmp_path, count=8, seed=1)
    rows, _ = manifest_rows([str(manifest)])
    processor = build_processor([row["text"] for row in rows])
    model, _ = init_ctc_model(
        len(processor.tokenizer), 0, model_preset="tiny", from_scratch=True, config_overrides=TINY_CTC_OVERRIDES
    )
    collator = CtcCollator(processor, None)
    model.train()  # as Trainer runs it: BatchNorm on batch statistics (this config has no dropout)
    with torch.no_grad():  # the two micro-batches Trainer will see (sequential order)
        expected = sum(float(model(**collator([dict(r, augment=False) for r in rows[i : i + 4]])).loss) for i in (0, 4))
    args = TrainingArguments(
        output_dir=str(tmp_path / "o"),
        max_steps=1,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=0.0,
        use_cpu=True,
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,
        disable_tqdm=True,
        train_sampling_strategy="sequential",
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows_to_dataset(rows, False), data_collator=collator)
    assert trainer.model_accepts_loss_kwargs is False
    assert trainer.train().training_loss == pytest.approx(expected / 2, rel=1e-4)
