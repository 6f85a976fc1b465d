"""Recipes: schema checks, dotted overrides, presets, and every shipped recipe builds a valid model config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from hf_ssl_speech.config_io import parse_override
from hf_ssl_speech.pretrain.recipe import (
    Recipe,
    RecipeError,
    load_recipe,
    model_config,
    recipe_from_dict,
    save_recipe,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO_ROOT / "configs" / "pretrain").glob("*.yaml"))
BASE = {"model": {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2}, "objectives": {"bestrq": {}}}


def test_overrides_are_typed_and_coerced():
    recipe = load_recipe(
        base=BASE,
        overrides=[
            "train.max_steps=100",
            "optim.lr=1e-3",
            "optim.betas=[0.8, 0.9]",
            "data.train_manifests=a.jsonl",
            "train.push_to_hub=user/model",
            "train.max_minutes=null",
            "model.causal=true",
            "objectives.apc.weight=2",
        ],
    )
    assert recipe.train.max_steps == 100
    assert recipe.optim.lr == 1e-3 and isinstance(recipe.optim.lr, float)  # YAML reads "1e-3" as a string
    assert recipe.optim.betas == (0.8, 0.9)
    assert recipe.data.train_manifests == ["a.jsonl"]  # a single manifest needs no brackets
    assert recipe.train.push_to_hub == "user/model" and recipe.train.max_minutes is None
    assert recipe.objectives["apc"]["weight"] == 2.0 and recipe.objectives["bestrq"]["weight"] == 1.0
    config = model_config(recipe)
    assert config.causal is True and config.hidden_size == 64
    assert config.objectives["apc"] == {"weight": 2.0, "start_step": 0, "layer": -1}


def test_a_bare_yaml_no_is_the_string_no_for_a_string_field(tmp_path):
    """YAML 1.1 reads `no` as False; `train.mixed_precision: no` (or the override) still means the string "no"."""
    assert load_recipe(base=BASE, overrides=["train.mixed_precision=no"]).train.mixed_precision == "no"
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(BASE) + "train:\n  mixed_precision: no\n")
    assert load_recipe(path).train.mixed_precision == "no"
    assert load_recipe(base=BASE).train.mixed_precision == "auto"


def test_objective_can_be_removed_by_override():
    recipe = load_recipe(
        base={**BASE, "objectives": {"bestrq": {}, "reconstruction": {"weight": 0.5}}},
        overrides=["objectives.reconstruction=null"],
    )
    assert list(recipe.objectives) == ["bestrq"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.max_step=3", r"Unknown recipe key 'train.max_step'. Did you mean 'train.max_steps'\?.*save_steps"),
        ("model.hiden_size=8", r"Did you mean 'model.hidden_size'\?"),
        ("objectives.bestrqq.weight=1", r"Did you mean 'objectives.bestrq'\?"),
        ("objectives.bestrq.wieght=1", r"Did you mean 'objectives.bestrq.weight'\?"),
        ("trian.max_steps=3", r"Unknown recipe section 'trian'. Did you mean 'train'\?"),
        ("train.max_steps=ten", r"train.max_steps='ten' has the wrong type: expected int"),
        ("train.max_steps=1.5", r"train.max_steps=1.5 has the wrong type: expected int"),
        ("optim.betas=[0.9]", r"optim.betas=\[0.9\] has the wrong type: expected tuple\[float, float\]"),
        ("model.causal=maybe", r"model.causal='maybe' has the wrong type: expected bool"),
        ("optim.scheduler=poly", r"optim.scheduler='poly' is invalid: expected one of"),
        ("train.max_steps=0", r"train.max_steps=0 is invalid: expected an integer >= 1"),
        ("max_steps=3", r"must be dotted"),
        ("train.max_steps", r"not of the form section.key=value"),
    ],
)
def test_bad_overrides_name_the_key_value_and_fix(override, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(base=BASE, overrides=[override])


def test_model_config_errors_point_at_the_recipe():
    with pytest.raises(RecipeError, match="hidden_size"):
        model_config(load_recipe(base=BASE, overrides=["model.num_attention_heads=3"]))
    with pytest.raises(RecipeError, match="causal"):  # apc needs a causal encoder
        model_config(load_recipe(base=BASE, overrides=["objectives.apc.weight=1"]))


def test_preset_is_expanded_and_recipe_fields_win(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "small.yaml").write_text(
        "hidden_size: 64\nnum_attention_heads: 4\nnum_hidden_layers: 6\n_reference: {params_millions: 1}\n"
    )
    (tmp_path / "pretrain").mkdir()
    recipe_path = tmp_path / "pretrain" / "r.yaml"
    recipe_path.write_text(
        yaml.safe_dump({"model": {"preset": "small", "num_hidden_layers": 2}, "objectives": {"bestrq": {}}})
    )
    recipe = load_recipe(recipe_path)
    assert recipe.model == {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2}
    recipe_path.write_text(yaml.safe_dump({"model": {"preset": "huge"}, "objectives": {"bestrq": {}}}))
    with pytest.raises(RecipeError, match=r"model.preset='huge'.*known presets: .*small"):
        load_recipe(recipe_path)
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")


def test_saved_recipe_round_trips(tmp_path):
    recipe = load_recipe(base=BASE, overrides=["optim.betas=[0.8, 0.9]", "data.noise_snr_db=[0, 10]"])
    save_recipe(recipe, tmp_path / "recipe.yaml")
    again = recipe_from_dict(yaml.safe_load((tmp_path / "recipe.yaml").read_text()))
    assert again == recipe and isinstance(again, Recipe)


def test_parse_override_reads_yaml_values():
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("a.b.c=null") == (["a", "b", "c"], None)
    assert parse_override("a.b=x=y") == (["a", "b"], "x=y")


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipes_build_valid_model_configs(path):
    recipe = load_recipe(path)
    config = model_config(recipe)
    assert set(config.objectives) == set(recipe.objectives)
    assert recipe.train.output_dir.startswith("runs/")
    if path.stem.startswith("tiny_"):
        assert config.hidden_size <= 96 and config.num_hidden_layers <= 4, "tiny recipes must run on a CPU"


@pytest.mark.parametrize(
    "path",
    [p for p in RECIPES if p.stem.startswith("tiny_")],
    ids=[p.stem for p in RECIPES if p.stem.startswith("tiny_")],
)
def test_tiny_recipes_run_a_pretraining_step(path):
    from hf_ssl_speech.modeling_conformer_ssl import ConformerSslForPreTraining

    config = model_config(load_recipe(path))
    torch.manual_seed(0)
    model = ConformerSslForPreTraining(config)
    features = torch.randn(2, 400, config.num_mel_bins)  # two 4 s utterances, the second 3 s long
    attention_mask = torch.ones(2, 400, dtype=torch.long)
    attention_mask[1, 300:] = 0
    extra = {}
    if "hubert" in config.objectives:
        extra["frame_labels"] = torch.randint(0, config.hubert_num_labels, (2, 400))
    out = model(features, attention_mask, generator=torch.Generator().manual_seed(0), **extra)
    assert torch.isfinite(out.loss) and out.loss > 0
    assert set(config.objectives) <= set(out.loss_sums)  # every objective of the recipe contributes
    out.loss.backward()


def test_default_recipe_is_packaged_and_loads_by_name_from_any_folder(tmp_path, monkeypatch):
    """The no-argument default is package data (a wheel has it); configs/pretrain/tiny_nest.yaml is that file."""
    from hf_ssl_speech.presets import RECIPE_DIR
    from hf_ssl_speech.pretrain.recipe import DEFAULT_RECIPE

    packaged = RECIPE_DIR / f"{DEFAULT_RECIPE}.yaml"
    assert (REPO_ROOT / "configs" / "pretrain" / "tiny_nest.yaml").resolve() == packaged.resolve()
    monkeypatch.chdir(tmp_path)  # no configs/ folder here
    recipe = load_recipe(DEFAULT_RECIPE)
    assert recipe == load_recipe(packaged)
    assert recipe.model["hidden_size"] == 96 and list(recipe.objectives) == ["bestrq"]
