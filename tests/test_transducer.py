"""Transducer fine-tuning (scripts/finetune_transducer.py): a tiny FastConformer from a pretraining-like folder becomes
the encoder of transformers' ParakeetForTDT, trains 2 steps on tone words, and the output folder (stock classes only)
transcribes through `pipeline("automatic-speech-recognition")` and scripts/transcribe.py."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import soundfile as sf
import torch
from support import REPO_ROOT, load_script, make_tiny_config, write_tone_corpus
from transformers import AutoModelForTDT, AutoProcessor, ParakeetProcessor, TrainingArguments, pipeline

from hf_ssl_speech.errors import ConfigError, UserError
from hf_ssl_speech.finetune import transducer
from hf_ssl_speech.finetune.args import DataArguments, FinetuneArguments, ModelArguments, parse_args
from hf_ssl_speech.finetune.rows import manifest_rows
from hf_ssl_speech.finetune.transducer import (
    BLANK_TOKEN,
    TransducerArguments,
    TransducerCollator,
    build_transducer_processor,
    build_transducer_tokenizer,
    init_transducer_model,
)
from hf_ssl_speech.modeling_conformer_ssl import ConformerSslForPreTraining

TEXTS = ["abc def", "gha bad", "cab fed ace", "bead face", "dead beef cafe"]
# A tiny FastConformer (dw_striding, what ParakeetEncoder holds), 16 mels.
FAST = {"subsampling": "dw_striding", "subsampling_factor": 4, "subsampling_conv_channels": 16}
SMALL_HEAD = ["tokenizer_vocab_size=20", "decoder_hidden_size=16"]


def _pretrained_folder(path, **overrides):
    torch.manual_seed(0)
    ConformerSslForPreTraining(make_tiny_config(**{**FAST, **overrides})).save_pretrained(path)
    return str(path)


def _args(root, model, output, *extra):
    return [
        "--model_name_or_path", model,
        "--train_manifests", str(root / "train.jsonl"),
        "--eval_manifests", str(root / "valid.jsonl"),
        "--output_dir", str(output),
        "--max_steps", "2",
        "--per_device_train_batch_size", "3",
        "--per_device_eval_batch_size", "4",
        "--use_cpu", "mixed_precision=no", "eval_strategy=no", "save_strategy=no", "logging_steps=1",
        "dataloader_num_workers=0", "learning_rate=1e-3", "warmup_steps=0",
        *SMALL_HEAD,
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def tdt_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tdt")
    write_tone_corpus(root, 6, seed=1, name="train")
    write_tone_corpus(root, 3, seed=2, name="valid")
    model = _pretrained_folder(root / "pretrained")
    result = load_script("finetune_transducer").main(_args(root, model, root / "out"))
    return root, result


def test_tdt_finetune_saves_a_stock_parakeet_folder_with_results(tdt_run):
    root, result = tdt_run
    out = root / "out"
    assert result.summary["steps"] == 2 and result.summary["head"] == "tdt"
    assert np.isfinite(result.summary["train_loss"])
    assert result.load_report is not None and result.load_report.encoder_complete
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["valid"]) >= {"wer", "cer", "loss", "utterances"} and saved["valid"]["utterances"] == 3
    card = (out / "README.md").read_text()
    assert card.count("finetune_transducer.py") == 1
    assert f"from `{root / 'pretrained'}`" in card  # the encoder it was fine-tuned from, not the tokenizer's source
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "parakeet_tdt" and "auto_map" not in config  # stock classes, no remote code
    processor = AutoProcessor.from_pretrained(out)
    assert isinstance(processor, ParakeetProcessor) and processor.decoder_type == "tdt"
    tokenizer = processor.tokenizer
    assert tokenizer.convert_tokens_to_ids(BLANK_TOKEN) == len(tokenizer) - 1 == config["blank_token_id"]
    model = AutoModelForTDT.from_pretrained(out)
    # The duration slots of the joint's output are never generated as tokens (transformers 5.25's greedy search
    # takes the arg-max over tokens and durations together).
    assert model.generation_config.suppress_tokens == list(range(len(tokenizer), len(tokenizer) + 5))


def test_tdt_folder_transcribes_through_the_pipeline_and_transcribe_script(tdt_run):
    root, _ = tdt_run
    out = root / "out"
    rows = [json.loads(line) for line in (root / "valid.jsonl").read_text().splitlines()]
    audios = [sf.read(root / row["audio_filepath"], dtype="float32")[0] for row in rows]
    asr = pipeline("automatic-speech-recognition", model=str(out))
    assert asr.type == "tdt"
    texts = [asr(audio)["text"] for audio in audios]
    assert all(isinstance(text, str) for text in texts)
    hyp = root / "hyp.jsonl"
    result = load_script("transcribe").main([str(out), "--manifest", str(root / "valid.jsonl"), "--output", str(hyp)])
    assert [record["hypothesis"] for record in result.records] == texts
    assert result.scores["utterances"] == 3 and "wer" in result.scores and "cer" in result.scores
    with pytest.raises(UserError, match="transducer"):
        load_script("transcribe").main([str(out), str(root / rows[0]["audio_filepath"]), "--chunk_length_s", "1"])


def test_conformer_striding_encoder_is_refused_in_one_line(tmp_path):
    model = _pretrained_folder(tmp_path / "conformer", subsampling="striding")
    with pytest.raises(ConfigError) as error:
        load_script("finetune_transducer").main(_args(tmp_path, model, tmp_path / "out"))
    message = str(error.value)
    assert "subsampling='striding'" in message and "finetune_ctc.py" in message and "\n" not in message
    assert not (tmp_path / "out").exists()


def test_a_decoding_budget_below_one_symbol_per_frame_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="max_symbols_per_step=0: use at least 1"):
        load_script("finetune_transducer").main(_args(tmp_path, "unused", tmp_path / "out", "max_symbols_per_step=0"))
    assert not (tmp_path / "out").exists()


def test_rnnt_training_without_a_working_torchaudio_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(transducer, "rnnt_loss_problem", lambda: "torchaudio is not installed")
    with pytest.raises(ConfigError, match="head=rnnt.*torchaudio is not installed.*use head=tdt"):
        load_script("finetune_transducer").main(_args(tmp_path, "unused", tmp_path / "out", "head=rnnt"))
    if importlib.util.find_spec("torchaudio") is None:
        assert transducer.rnnt_loss_problem() == "torchaudio is not installed"


def test_rnnt_head_folder_transcribes_through_the_pipeline(tmp_path):
    tokenizer = build_transducer_tokenizer(TEXTS, 16)
    args = ModelArguments(model_name_or_path=_pretrained_folder(tmp_path / "pretrained"))
    model, report = init_transducer_model("rnnt", tokenizer, args, TransducerArguments(decoder_hidden_size=16))
    assert type(model).__name__ == "ParakeetForRNNT" and report.encoder_complete
    processor, _ = build_transducer_processor(tokenizer, model.config.encoder_config.num_mel_bins, "rnnt")
    model.save_pretrained(tmp_path / "rnnt")
    processor.save_pretrained(tmp_path / "rnnt")
    asr = pipeline("automatic-speech-recognition", model=str(tmp_path / "rnnt"))
    assert asr.type == "tdt"  # the pipeline's transducer path (generate -> sequences)
    assert isinstance(asr(np.zeros(16000, dtype=np.float32))["text"], str)


def test_tokenizer_has_blank_last_and_round_trips(tmp_path):
    for kind in ("bpe", "unigram"):
        tokenizer = build_transducer_tokenizer(TEXTS, 24, kind)
        assert len(tokenizer) <= 24 and tokenizer.pad_token_id == len(tokenizer) - 1
        assert tokenizer.convert_ids_to_tokens(tokenizer.pad_token_id) == BLANK_TOKEN
        ids = tokenizer("dead beef", add_special_tokens=False).input_ids
        assert tokenizer.pad_token_id not in ids
        assert tokenizer.decode(ids, group_tokens=False) == "dead beef"


def test_collator_pads_labels_with_blank_and_prepends_it_to_decoder_inputs(tmp_path):
    manifest = write_tone_corpus(tmp_path, 2, seed=3, words=(1, 3))
    rows = manifest_rows([str(manifest)], 0.0, None, True, None, None)[0]
    tokenizer = build_transducer_tokenizer([row["text"] for row in rows], 24)
    _, features = build_transducer_processor(tokenizer, 16)
    batch = TransducerCollator(features, tokenizer)(rows)
    blank = tokenizer.pad_token_id
    assert batch["input_features"].shape[-1] == 16
    assert (batch["decoder_input_ids"][:, 0] == blank).all()
    assert torch.equal(batch["decoder_input_ids"][:, 1:], batch["labels"])
    lengths = (batch["labels"] != blank).sum(-1)
    assert lengths.min() < batch["labels"].shape[1] or lengths.min() == lengths.max()


def test_tdt_demo_recipe_parses():
    types = (ModelArguments, DataArguments, FinetuneArguments, TransducerArguments, TrainingArguments)
    parsed = parse_args(types, ["--config", str(REPO_ROOT / "configs" / "finetune" / "tdt_demo.yaml"), "--use_cpu"])
    assert parsed[0].model_name_or_path == "runs/tiny_nest/model"
    assert parsed[3].head == "tdt" and parsed[3].tokenizer_vocab_size == 64 and parsed[4].max_steps == 20


def test_a_parakeet_folder_is_converted_and_its_encoder_fine_tuned_unchanged(tmp_path):
    """--model_name_or_path a ParakeetForCTC folder (e.g. a converted NVIDIA checkpoint): its encoder is converted to
    ours for the run and lands in the TDT model weight for weight (learning rate 0: no weight moves)."""
    from hf_ssl_speech.interop.parakeet import export_parakeet_for_asr

    write_tone_corpus(tmp_path, 4, seed=1, name="train")
    write_tone_corpus(tmp_path, 2, seed=2, name="valid")
    torch.manual_seed(0)
    source = export_parakeet_for_asr(ConformerSslForPreTraining(make_tiny_config(**FAST)).conformer, "ctc", 12)
    source.save_pretrained(tmp_path / "parakeet_ctc")
    args = _args(tmp_path, str(tmp_path / "parakeet_ctc"), tmp_path / "out", "learning_rate=0", "weight_decay=0")
    result = load_script("finetune_transducer").main(args)
    assert result.load_report is not None and result.load_report.encoder_complete
    # Parameters: BatchNorm's running statistics do move in training mode, whatever the learning rate.
    tuned = dict(AutoModelForTDT.from_pretrained(tmp_path / "out").encoder.named_parameters())
    expected = dict(source.encoder.named_parameters())
    assert tuned.keys() == expected.keys()
    assert all(torch.equal(tuned[key], expected[key]) for key in expected)
    for name in ("README.md", "results.json"):  # the temporary folder of the conversion is gone and named nowhere
        assert "converted_encoder_" not in (tmp_path / "out" / name).read_text()
