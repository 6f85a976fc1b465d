"""Continued pretraining: `scripts/convert_checkpoint.py` (every source, and back) and `model.init_from` recipes.

The end-to-end cases build a small source (a random Wav2Vec2BertModel; a ParakeetEncoder exported from a tiny
FastConformer pretrained for 30 steps), save it with `save_pretrained`, convert it with the command, run 20 steps
of a shipped `continue_*.yaml` recipe on a small speech-like corpus, and check: the losses are finite and fall (mean of the first 5 logged steps vs the last 5), the
encoder at step 0 is the source's (and still is at the end of the heads-only warm-up), and `--to` gives a folder the
target's own classes load.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import REPO_ROOT, make_corpus, run_env

from hf_ssl_speech.pretrain.recipe import RecipeError, load_recipe

SCRIPT = REPO_ROOT / "scripts" / "convert_checkpoint.py"


def _convert(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=run_env(tmp_path), timeout=300
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """12 speech-like utterances of 2 s (a manifest)."""
    return make_corpus(tmp_path_factory.mktemp("corpus"), count=12, seconds=2.0)


def _recipe(name: str, init_from: Path, corpus: Path, out: Path, *extra: str):
    return load_recipe(
        REPO_ROOT / "configs" / "pretrain" / f"{name}.yaml",
        [
            f"model.init_from={init_from}",
            f"data.train_manifests=[{corpus}]",
            "data.valid_manifests=[]",
            "data.batch_seconds=8",
            "data.max_batch_size=4",
            "data.min_duration=0.5",
            "data.num_workers=0",
            f"train.output_dir={out}",
            "train.max_steps=20",
            "train.save_steps=10",
            "train.log_steps=1",
            "train.report_to=none",
            "train.mixed_precision=no",
            "train.seed=0",
            "optim.warmup_steps=2",
            *extra,
        ],
    )


def _losses(checkpoint: Path) -> list[float]:
    history = json.loads((checkpoint / "trainer_state.json").read_text())["metrics"]["history"]
    return [row["train/loss"] for row in history if "train/loss" in row]


def _encoder_state(folder: Path) -> dict[str, torch.Tensor]:
    from hf_ssl_speech.modeling_conformer_ssl import ConformerSslForPreTraining, ConformerSslModel

    if json.loads((folder / "config.json").read_text())["architectures"] == ["ConformerSslForPreTraining"]:
        return ConformerSslForPreTraining.from_pretrained(folder).conformer.state_dict()
    return ConformerSslModel.from_pretrained(folder).state_dict()


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _run_and_check(recipe, converted: Path) -> None:
    """20 steps (heads-only for the first 10): finite (and falling) losses; the encoder is the source's until step 10."""
    from hf_ssl_speech.pretrain.loop import pretrain

    result = pretrain(recipe, progress=False)
    assert result.step == 20
    losses = _losses(result.checkpoint)
    assert len(losses) == 20 and all(torch.isfinite(torch.tensor(losses))), losses
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first, (first, last, losses)
    source = _encoder_state(converted)
    warm_up_end = result.output_dir / "checkpoints" / "checkpoint-00000010" / "model"
    assert _same(_encoder_state(warm_up_end), source), "the frozen encoder moved during the warm-up"
    assert not _same(_encoder_state(result.checkpoint / "model"), source), "the encoder never trained after it"


# ---------------------------------------------------------------------------------------------- w2v-BERT 2.0
@pytest.mark.slow  # a real run in subprocesses: in the full suite, not the quick subset
def test_w2v_bert_source_continues_with_its_own_objective_and_exports_back(tmp_path, corpus):
    from transformers import Wav2Vec2BertConfig, Wav2Vec2BertForCTC, Wav2Vec2BertModel

    from hf_ssl_speech.pretrain.init_from import initialise

    torch.manual_seed(0)
    config = Wav2Vec2BertConfig(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
        conv_depthwise_kernel_size=3,
        output_hidden_size=32,
        hidden_dropout=0.0,
        activation_dropout=0.0,
        attention_dropout=0.0,
        feat_proj_dropout=0.0,
    )
    Wav2Vec2BertModel(config).save_pretrained(tmp_path / "w2v")
    converted = tmp_path / "converted"
    done = _convert(tmp_path, str(tmp_path / "w2v"), str(converted))
    assert done.returncode == 0, done.stderr
    assert "Wav2Vec2BertModel" in done.stdout and "ConformerSslModel" in done.stdout

    recipe = _recipe(
        "continue_w2v_bert",
        converted,
        corpus,
        tmp_path / "run",
        "model.num_codevectors_per_group=16",
        "model.codevector_dim=16",
        "model.proj_codevector_dim=16",
        "model.num_negatives=10",
        "objectives.contrastive.layer=1",
        "train.freeze_encoder_steps=10",
        "optim.lr=5e-3",
        "optim.gumbel_temperature_decay=0.99",
    )
    init = initialise(recipe, seed=0)  # step 0: the encoder is the source's, the quantizer and heads are new
    assert _same(init.model.conformer.state_dict(), _encoder_state(converted))
    assert "heads loaded: none" in init.report and "quantizer" in init.report, init.report
    _run_and_check(recipe, converted)

    exported = tmp_path / "exported"
    done = _convert(tmp_path, str(tmp_path / "run" / "model"), str(exported), "--to", "wav2vec2_bert")
    assert done.returncode == 0, done.stderr
    # The transformers blog's fine-tuning recipe starts here (it passes its tokenizer's size as vocab_size).
    ctc = Wav2Vec2BertForCTC.from_pretrained(exported, vocab_size=12, pad_token_id=0)
    assert ctc.config.num_hidden_layers == 3
    assert (exported / "preprocessor_config.json").is_file()


# ---------------------------------------------------------------------------------------------- Parakeet
def _trained_parakeet(corpus: Path, folder: Path) -> Path:
    """A trained ParakeetEncoder: 30 steps of `tiny_nest.yaml` (BEST-RQ, NeMo's own SSL for FastConformers) on a
    Parakeet-shaped FastConformer (8x, 32 wide, 2 blocks), exported with `interop.parakeet.to_parakeet`.

    Not a random ParakeetEncoder: transformers initialises every conv and linear of one with N(0, 0.02), so with
    this tiny width the subsampling's output is ~1e-7 and each block's LayerNorm (eps 1e-5) amplifies it ~300x.
    Such an encoder's features sit at the noise floor: its instance-normalised top layers are targets no decoder
    predicts (the loss stays at the targets' own energy) and its biases' gradients are ~1e5, so when the encoder
    unfreezes even a 0.05 % EMA step of the teacher lifts a layer above the instance norm's eps and the targets'
    energy (and the loss) jumps 2-3x. A trained encoder has neither problem.
    """
    from hf_ssl_speech.interop.parakeet import to_parakeet
    from hf_ssl_speech.modeling_conformer_ssl import ConformerSslForPreTraining
    from hf_ssl_speech.pretrain.loop import pretrain

    recipe = load_recipe(
        REPO_ROOT / "configs" / "pretrain" / "tiny_nest.yaml",
        [
            "model.subsampling_factor=8",
            "model.subsampling_conv_channels=16",
            "model.hidden_size=32",
            "model.num_attention_heads=2",
            "model.intermediate_size=64",
            "model.num_mel_bins=80",
            f"data.train_manifests=[{corpus}]",
            "data.valid_manifests=[]",
            "data.batch_seconds=8",
            "data.max_batch_size=4",
            "data.num_workers=0",
            f"train.output_dir={folder / 'nest'}",
            "train.max_steps=30",
            "train.save_steps=30",
            "train.report_to=none",
            "train.mixed_precision=no",
            "train.seed=0",
            "optim.warmup_steps=3",
        ],
    )
    result = pretrain(recipe, progress=False)
    trained = ConformerSslForPreTraining.from_pretrained(result.checkpoint / "model").conformer
    to_parakeet(trained).save_pretrained(folder / "parakeet")
    return folder / "parakeet"


@pytest.mark.slow  # a real run in subprocesses: in the full suite, not the quick subset
def test_parakeet_source_continues_with_data2vec_and_exports_back(tmp_path, corpus):
    from transformers import ParakeetEncoder, ParakeetForRNNT

    from hf_ssl_speech.pretrain.init_from import initialise

    source = _trained_parakeet(corpus, tmp_path)
    assert ParakeetEncoder.from_pretrained(source).config.hidden_size == 32
    converted = tmp_path / "converted"
    done = _convert(tmp_path, str(source), str(converted))
    assert done.returncode == 0, done.stderr

    recipe = _recipe(
        "continue_data2vec",
        converted,
        corpus,
        tmp_path / "run",
        "model.clone_batch=2",
        "objectives.data2vec.top_k_layers=2",
        "objectives.data2vec.decoder_layers=1",
        "objectives.data2vec.decoder_dim=32",
        "objectives.data2vec.decoder_groups=4",
        # Every step reads all 12 utterances (only the masks differ), so the first and last 5 losses are over the
        # same audio: with 3 batches of 4 the targets' energy differs ~2x between batches and decides the comparison.
        "data.batch_seconds=24",
        "data.max_batch_size=12",
        # The recipe's shape, shortened: the LR warms up over the heads-only steps, so the decoder reaches its peak
        # LR as the encoder unfreezes; the teacher keeps the recipe's slow momentum (0.9995 ->).
        "train.freeze_encoder_steps=10",
        "optim.warmup_steps=10",
        "optim.lr=5e-3",
    )
    init = initialise(recipe, seed=0)
    source_state = _encoder_state(converted)
    assert _same(init.model.conformer.state_dict(), source_state)
    assert _same(init.model.teacher.state_dict(), source_state), "the EMA teacher must start as the checkpoint"
    assert "EMA teacher" in init.report
    # The loss falls 16-32 % (first 5 vs last 5) over 3 source seeds x 3 run seeds; 25 % here (1.79 -> 1.34).
    _run_and_check(recipe, converted)

    exported = tmp_path / "exported"
    done = _convert(tmp_path, str(tmp_path / "run" / "model"), str(exported), "--to", "parakeet")
    assert done.returncode == 0, done.stderr
    assert ParakeetEncoder.from_pretrained(exported).config.num_hidden_layers == 2
    rnnt = tmp_path / "rnnt"
    done = _convert(tmp_path, str(converted), str(rnnt), "--to", "parakeet", "--head", "rnnt", "--vocab-size", "12")
    assert done.returncode == 0, done.stderr
    assert ParakeetForRNNT.from_pretrained(rnnt).config.vocab_size == 12


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.slow  # a real run in subprocesses: in the full suite, not the quick subset
def test_a_non_speech_model_is_refused_in_one_line_naming_the_supported_ones(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(
        tmp_path / "bert"
    )
    done = _convert(tmp_path, str(tmp_path / "bert"), str(tmp_path / "out"))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), done.stderr
    for name in ("model_type='bert'", ".nemo", "Wav2Vec2BertModel", "ParakeetForRNNT", "ParakeetForTDT"):
        assert name in lines[0]
    assert not (tmp_path / "out").exists()


def test_a_missing_source_is_refused_before_torch_loads(tmp_path):
    done = _convert(tmp_path, "./no_such_model", str(tmp_path / "out"))
    assert done.returncode == 2 and "no such folder" in done.stderr
    done = _convert(tmp_path, str(tmp_path / "missing.nemo"), str(tmp_path / "out"))
    assert done.returncode == 2 and "missing.nemo" in done.stderr


def test_architecture_overrides_that_contradict_the_source_are_refused(tmp_path):
    from transformers import ParakeetEncoderConfig

    from hf_ssl_speech.interop.parakeet import from_parakeet_config
    from hf_ssl_speech.pretrain.init_from import merged_config

    source = from_parakeet_config(ParakeetEncoderConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2))
    base = {"objectives": {"data2vec": {"top_k_layers": 2, "decoder_dim": 32, "decoder_groups": 4}}}
    ok = load_recipe(base={**base, "model": {"init_from": "x", "mask_time_prob": 0.2, "hidden_size": 32}})
    config = merged_config(source, ok, "model.init_from='x'")
    assert config.mask_time_prob == 0.2 and config.num_hidden_layers == 2 and config.subsampling == "dw_striding"
    bad = load_recipe(base={**base, "model": {"init_from": "x", "num_hidden_layers": 4}})
    with pytest.raises(RecipeError, match=r"model.num_hidden_layers=4 contradicts model.init_from='x'.*=2"):
        merged_config(source, bad, "model.init_from='x'")


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("optim.encoder_lr_scale=0", "optim.encoder_lr_scale"),
        ("optim.layer_decay=1.5", "optim.layer_decay"),
        ("train.freeze_encoder_steps=-1", "train.freeze_encoder_steps"),
        ("train.freeze_encoder_steps=5000000", "train.max_steps"),
    ],
)
def test_continued_pretraining_fields_are_validated(override, named):
    with pytest.raises(RecipeError, match=named.replace(".", r"\.")):
        load_recipe(REPO_ROOT / "configs" / "pretrain" / "continue_data2vec.yaml", [override])


def test_freezing_without_a_source_is_refused():
    base = {
        "model": {"hidden_size": 32, "num_attention_heads": 2, "num_hidden_layers": 2},
        "objectives": {"bestrq": {}},
    }
    with pytest.raises(RecipeError, match="model.init_from"):
        load_recipe(base=base, overrides=["train.freeze_encoder_steps=5"])


def test_encoder_lr_scale_and_layer_decay_give_per_depth_groups():
    from support import make_tiny_config

    from hf_ssl_speech.modeling_conformer_ssl import ConformerSslForPreTraining
    from hf_ssl_speech.pretrain.optim import build_optimizer, param_groups

    model = ConformerSslForPreTraining(make_tiny_config(num_hidden_layers=2, objectives={"bestrq": {}}))
    assert len(param_groups(model, 1e-3, 1.0)) == 2  # defaults: the two groups of a run from scratch
    optimizer = build_optimizer(model, 1.0, (0.9, 0.98), 1e-3, encoder_lr_scale=0.1, layer_decay=0.5)
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    named = dict(model.named_parameters())
    assert optimizer.param_groups[0]["lr"] == 1.0  # the heads' group comes first (the loop logs its LR)
    assert lr_of[id(named["bestrq_head.weight"])] == 1.0
    assert lr_of[id(named["conformer.layers.1.feed_forward1.linear1.weight"])] == pytest.approx(0.05)
    assert lr_of[id(named["conformer.layers.0.feed_forward1.linear1.weight"])] == pytest.approx(0.025)
    assert lr_of[id(named["conformer.subsampling.linear.weight"])] == pytest.approx(0.0125)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == sum(p.requires_grad for p in model.parameters())
