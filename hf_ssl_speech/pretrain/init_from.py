"""Continued pretraining: `model.init_from=<folder | Hub repo | .nemo>` starts a recipe from a trained encoder.

The source is converted on the fly (`interop.convert.load_source`: a folder of ours, a w2v-BERT 2.0 or Parakeet
folder / Hub repo, a `.nemo` archive). Its architecture is the model's: the recipe's `model` section may only set
what does not change the encoder's weights or function (`RECIPE_FIELDS`: dropout, masking, the objective heads);
an encoder field that contradicts the source is refused, naming the field. `ConformerSslForPreTraining` is built with
the recipe's objectives, the encoder is loaded exactly, heads the source has are loaded too (NEST's random-projection
quantizer and decoder head from a `.nemo`, or the heads of a pretraining folder of ours), and the rest start new.
An EMA teacher (data2vec, dinosr) starts as a copy of the loaded student. One line says what was loaded and what is
new.

This happens on a fresh start only: `--resume` rebuilds the same config from the checkpoint's own `model/config.json`
(`resumed_config`) and the checkpoint restores every weight.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..configuration_conformer_ssl import ConformerSslConfig
from ..modeling_conformer_ssl import ConformerSslForPreTraining
from .recipe import Recipe, RecipeError, model_field_types

logger = logging.getLogger(__name__)

INIT_FROM = "init_from"
# The model fields a recipe may set over a source: they change neither the encoder's weights nor its function.
DROPOUT_FIELDS = (
    "hidden_dropout",
    "activation_dropout",
    "attention_dropout",
    "feat_proj_dropout",
    "dropout_positions",
    "layerdrop",
    "final_dropout",
)
MASKING_FIELDS = (
    "mask_strategy",
    "mask_time_prob",
    "mask_time_length",
    "mask_time_min_masks",
    "mask_fill",
    "mask_token_threshold",
    "clone_batch",
)
_GUMBEL = (
    "num_codevector_groups",
    "num_codevectors_per_group",
    "codevector_dim",
    "proj_codevector_dim",
    "contrastive_target",
    "num_negatives",
    "contrastive_logits_temperature",
    "diversity_loss_weight",
)
# objective -> the config fields of its head and targets: taken from the source when the source has that head.
OBJECTIVE_FIELDS: dict[str, tuple[str, ...]] = {
    "contrastive": _GUMBEL,
    "mlm": _GUMBEL,
    "bestrq": (
        "bestrq_num_codebooks",
        "bestrq_codebook_size",
        "bestrq_codebook_dim",
        "bestrq_normalize_input",
        "bestrq_input_layer_norm",
    ),
    "hubert": ("hubert_num_labels",),
    "reconstruction": ("reconstruction_loss",),
    "apc": ("apc_shift",),
    "cpc": ("cpc_steps", "cpc_num_negatives"),
    "data2vec": (),
    "dinosr": (),
}
RECIPE_FIELDS = frozenset(
    (
        *DROPOUT_FIELDS,
        *MASKING_FIELDS,
        *(f for fields in OBJECTIVE_FIELDS.values() for f in fields),
        "initializer_range",
    )
)


def init_source(recipe: Recipe) -> str | None:
    """The recipe's `model.init_from`, or None for a run from scratch."""
    return recipe.model.get(INIT_FROM)


def merged_config(source: ConformerSslConfig, recipe: Recipe, what: str) -> ConformerSslConfig:
    """The source's architecture, the recipe's dropout / masking / head fields and objectives.

    Args:
        source: the config of the converted source (or of the checkpoint being resumed).
        what: how to name the source in errors ("model.init_from='facebook/w2v-bert-2.0'").
    """
    fields = model_field_types()
    base = {k: v for k, v in source.to_dict().items() if k in fields and k != INIT_FROM}
    source_objectives = set(source.objectives or {})
    pinned = {f for name in source_objectives & set(recipe.objectives) for f in OBJECTIVE_FIELDS.get(name, ())}
    for key, value in recipe.model.items():
        if key == INIT_FROM:
            continue
        same = base.get(key) == value
        if key in RECIPE_FIELDS and (key not in pinned or same):
            base[key] = value
        elif not same:
            reason = (
                "the head of that objective is loaded from the source"
                if key in pinned
                else "it is part of the encoder's architecture"
            )
            raise RecipeError(
                f"model.{key}={value!r} contradicts {what}, which has {key}={base.get(key)!r} ({reason}): remove it "
                f"from the recipe; over a source the model section may set only dropout, masking and new heads' fields."
            )
    try:
        return ConformerSslConfig(**base, objectives={name: dict(spec) for name, spec in recipe.objectives.items()})
    except ValueError as error:
        raise RecipeError(f"{what} with the recipe's objectives gives an invalid model config: {error}") from error


@dataclass
class Initialised:
    """A pretraining model started from a source, its feature extractor, and the one-line report."""

    model: ConformerSslForPreTraining
    feature_extractor: Any
    report: str


def _head_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The source's tensors outside the encoder (and never its EMA teacher)."""
    if not hasattr(model, "conformer"):
        return {}
    return {k: v for k, v in model.state_dict().items() if not k.startswith(("conformer.", "teacher."))}


def _top(key: str) -> str:
    return key.split(".", 1)[0]


def initialise(recipe: Recipe, seed: int | None = None) -> Initialised:
    """Convert `model.init_from`, build `ConformerSslForPreTraining` with the recipe's objectives, load the weights.

    Args:
        recipe: a recipe with `model.init_from` set.
        seed: torch seed for the new heads (the loop seeds before calling; None leaves the RNG as it is).
    """
    from ..interop.convert import load_source

    src = init_source(recipe)
    if src is None:
        raise RecipeError("model.init_from is not set: there is no checkpoint to continue from.")
    what = f"model.init_from={src!r}"
    source = load_source(src)
    config = merged_config(source.model.config, recipe, what)
    if seed is not None:
        torch.manual_seed(seed)
    model = ConformerSslForPreTraining(config)
    encoder = source.model.conformer if hasattr(source.model, "conformer") else source.model
    result = model.conformer.load_state_dict(encoder.state_dict(), strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("inv_freq")]
    if missing or result.unexpected_keys:  # merged_config keeps the architecture: this is a converter bug
        raise RuntimeError(
            f"{what}: the encoder does not load exactly: missing {missing}, unexpected {result.unexpected_keys}"
        )
    ours = model.state_dict()
    loaded_heads, dropped = set(), set()
    heads = _head_state(source.model)
    usable = {k: v for k, v in heads.items() if k in ours and ours[k].shape == v.shape}
    for key in heads:
        (loaded_heads if key in usable else dropped).add(_top(key))
    if usable:
        model.load_state_dict(usable, strict=False)
    dropped -= loaded_heads
    new_heads = sorted({_top(k) for k in ours if not k.startswith(("conformer.", "teacher."))} - loaded_heads)
    model.reset_teacher()  # data2vec / dinosr: the teacher starts as the loaded student
    parts = [
        f"init_from {source.description}: encoder loaded ({sum(p.numel() for p in encoder.parameters()):,} parameters)",
        f"heads loaded: {', '.join(sorted(loaded_heads)) or 'none'}",
        f"new: {', '.join(new_heads) or 'none'}",
    ]
    if hasattr(model, "teacher"):
        parts.append("EMA teacher = the loaded encoder")
    if dropped:
        parts.append(f"not used from the source: {', '.join(sorted(dropped))}")
    if source.notes:
        logger.info("init_from notes: %s", "; ".join(source.notes))
    return Initialised(model, source.feature_extractor, "; ".join(parts))


def resumed_config(checkpoint: Path, recipe: Recipe) -> tuple[ConformerSslConfig, Any]:
    """On `--resume` of an `init_from` run: the config the run was built with (its checkpoint's `model/`) with the
    recipe applied the same way, and the feature extractor saved there; no source is read again."""
    from transformers import AutoFeatureExtractor

    folder = Path(checkpoint) / "model"
    saved = ConformerSslConfig.from_pretrained(folder)
    return merged_config(saved, recipe, f"the checkpoint {folder}"), AutoFeatureExtractor.from_pretrained(folder)


__all__ = [
    "DROPOUT_FIELDS",
    "INIT_FROM",
    "MASKING_FIELDS",
    "OBJECTIVE_FIELDS",
    "RECIPE_FIELDS",
    "Initialised",
    "init_source",
    "initialise",
    "merged_config",
    "resumed_config",
]
