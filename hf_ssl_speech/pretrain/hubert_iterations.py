"""HuBERT's two iterations in one resumable command (Hsu et al. 2021, §III-B and §IV-C).

    iteration 1: k-means (100) on MFCCs of the training audio -> frame labels -> pretrain with `hubert`
    iteration 2: k-means (500) on a middle layer of the iteration-1 model -> frame labels -> pretrain again

Each iteration trains a fresh model (as HuBERT does: the labels change, not the starting point). Each stage
writes its outputs under `run.output_dir` and, when complete, a marker stages/<name>.json holding its
settings and result:

    phones              frame-level phone labels of the demo corpus (synthetic.alignment), when available
    iter1_labels        iter1/labels/{train,valid}: k-means fitted on train, the same centroids on valid;
                        the label-quality figures of both splits
    iter1_pretrain      iter1/pretrain: a `pretrain()` run on those labels
    iter2_labels        iter2/labels/{train,valid}: k-means on `iteration2.layer` of iter1's final model
    iter2_pretrain      iter2/pretrain
    report.json, report.md   label quality of both iterations side by side (rewritten on every run)

Rerunning the command skips every stage with a marker; a stage without one was interrupted: a labelling
stage is redone from scratch, a pretraining stage continues from its newest complete checkpoint
(`pretrain(resume=True)`). A marker whose settings differ from the config (or whose input stage was redone
since) stops the command with the stage's name and the fix: finished work is never deleted silently.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import config_io
from ..errors import ConfigError, UserError, check_paths
from .kmeans import make_kmeans_labels
from .label_quality import label_quality
from .recipe import Recipe, load_recipe, validate

logger = logging.getLogger(__name__)

PHONE_LABELS = ("auto", "espeak", "none")


# ----------------------------------------------------------------------------------------------- config
@dataclass
class RunSection:
    output_dir: str = "runs/hubert_iterations"
    device: str = "cpu"  # where k-means features are computed (pretraining follows accelerate's choice)
    progress: bool = True  # pretraining progress bars


@dataclass
class DemoCorpusSection:
    """Build the demo corpus here when it is missing (as `scripts/pretrain.py` does for its default recipe)."""

    folder: str = "demo_corpus"
    minutes: float = 20.0
    seed: int = 0


@dataclass
class DataSection:
    train_manifest: str = "demo_corpus/pretrain.jsonl"  # k-means is fitted on it and the models train on it
    valid_manifest: str | None = "demo_corpus/test.jsonl"  # labelled with the training centroids
    demo_corpus: DemoCorpusSection | None = None  # null: the manifests must exist
    # Phone labels for purity / PNMI: "espeak" = the demo corpus's own phoneme events (synthetic.alignment),
    # "auto" = those when the manifest is a demo-corpus manifest, "none" = codes used and entropy only.
    phone_labels: str = "auto"


@dataclass
class PretrainSection:
    recipe: str = "configs/pretrain/tiny_hubert.yaml"  # a `hubert` recipe: file or packaged name
    overrides: list[str] = field(default_factory=list)  # section.key=value, both iterations


@dataclass
class KmeansSection:
    iterations: int = 10  # Lloyd iterations
    max_fit_steps: int = 200_000  # frames / steps sampled to fit
    seed: int = 0


@dataclass
class IterationSection:
    num_clusters: int = 100
    layer: int | None = None  # iteration 2 only: hidden state of the iteration-1 model; None = the middle block
    pretrain_overrides: list[str] = field(default_factory=list)  # recipe overrides for this iteration only


@dataclass
class HubertIterationsConfig:
    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    pretrain: PretrainSection = field(default_factory=PretrainSection)
    kmeans: KmeansSection = field(default_factory=KmeansSection)
    iteration1: IterationSection = field(default_factory=lambda: IterationSection(num_clusters=100))
    iteration2: IterationSection = field(default_factory=lambda: IterationSection(num_clusters=500))


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> HubertIterationsConfig:
    """Read the YAML config (or start from the defaults), apply `section.key=value` overrides, check values."""
    raw = config_io.read_yaml(path, "hubert_iterations config") if path is not None else {}
    raw = config_io.apply_overrides(raw, overrides or [])
    config = config_io.build(HubertIterationsConfig, raw, "", "config key")
    check = _check
    check(config.data.phone_labels in PHONE_LABELS, "data.phone_labels", config.data.phone_labels, str(PHONE_LABELS))
    for name in ("iteration1", "iteration2"):
        k = getattr(config, name).num_clusters
        check(k >= 2, f"{name}.num_clusters", k, "an integer >= 2")
    check(config.kmeans.iterations >= 1, "kmeans.iterations", config.kmeans.iterations, "an integer >= 1")
    check(config.kmeans.max_fit_steps >= 1, "kmeans.max_fit_steps", config.kmeans.max_fit_steps, "an integer >= 1")
    check(config.iteration1.layer is None, "iteration1.layer", config.iteration1.layer, "null (iteration 1 is MFCC)")
    return config


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise config_io.invalid(key, value, expected)


# ----------------------------------------------------------------------------------------------- stages
class StageMismatchError(UserError):
    """A finished stage was made with other settings than the config asks for now."""


class Stages:
    """Markers stages/<name>.json: a stage with one is done (and skipped); see the module doc."""

    def __init__(self, output_dir: Path) -> None:
        self.root = output_dir / "stages"

    def done(self, name: str) -> dict | None:
        path = self.root / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def run(self, name: str, settings: dict, work: Any, folder: Path | None = None, resumable: bool = False) -> dict:
        """The stage's marker (running `work()` first unless a marker with the same settings exists).

        `folder`: the stage's outputs; left over by an interrupted run it is removed first, unless `resumable`
        (pretraining continues from it).
        """
        settings = json.loads(json.dumps(settings))  # compare as they are stored (tuples -> lists, ...)
        marker = self.done(name)
        if marker is not None:
            if marker["settings"] != settings:
                differing = sorted(
                    k for k in {**settings, **marker["settings"]} if marker["settings"].get(k) != settings.get(k)
                )
                raise StageMismatchError(
                    f"stage {name!r} finished with other settings than the config gives now (differing: "
                    f"{', '.join(differing)}); delete {self.root / (name + '.json')} and its outputs"
                    f"{f' ({folder})' if folder else ''} and those of the stages after it to redo them, or set "
                    "run.output_dir to a new folder"
                )
            logger.info("stage %s: done (%s), skipped", name, marker["finished"])
            return marker
        if folder is not None and folder.exists() and not resumable:
            logger.info("stage %s: removing the outputs of an interrupted run in %s", name, folder)
            shutil.rmtree(folder)
        logger.info("stage %s: running", name)
        start = time.monotonic()
        result = work()
        marker = {
            "stage": name,
            "settings": settings,
            "result": result,
            "seconds": round(time.monotonic() - start, 1),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            "stamp": uuid.uuid4().hex,  # what later stages record as their input's identity
        }
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{name}.json.tmp"
        tmp.write_text(json.dumps(marker, indent=2))
        os.replace(tmp, self.root / f"{name}.json")  # a marker is complete or absent
        logger.info("stage %s: finished in %.1f s", name, marker["seconds"])
        return marker


# ----------------------------------------------------------------------------------------------- the run
def _splits(config: HubertIterationsConfig) -> dict[str, str]:
    splits = {"train": config.data.train_manifest}
    if config.data.valid_manifest:
        splits["valid"] = config.data.valid_manifest
    return splits


def _phone_stage(config: HubertIterationsConfig, stages: Stages, out: Path) -> dict | None:
    """Phone labels of each split (None when there are none to make; see `data.phone_labels`)."""
    mode = config.data.phone_labels
    if mode == "none":
        return None
    from ..synthetic.alignment import demo_corpus_of, write_phone_labels

    splits = _splits(config)
    if mode == "auto" and any(demo_corpus_of(path) is None for path in splits.values()):
        logger.info("phone labels: the manifests are not demo-corpus manifests; reporting codes used and entropy")
        return None

    def work() -> dict:
        return {split: write_phone_labels(path, out / "phones" / split) for split, path in splits.items()}

    return stages.run("phones", {"manifests": splits}, work, out / "phones")


def _label_stage(
    name: str,
    config: HubertIterationsConfig,
    stages: Stages,
    out: Path,
    iteration: IterationSection,
    features: str,
    checkpoint: str | None,
    layer: int | None,
    upstream: list[dict | None],
) -> dict:
    """k-means fitted on train, applied to valid; label quality of both splits."""
    folder = out / name.split("_")[0] / "labels"
    splits = _splits(config)
    phones = upstream[0]
    settings = {
        "features": features,
        "checkpoint": checkpoint,
        "layer": layer,
        "num_clusters": iteration.num_clusters,
        "kmeans": config_io.plain(config.kmeans),
        "manifests": splits,
        "inputs": [marker["stamp"] if marker else None for marker in upstream],
    }

    def work() -> dict:
        try:
            return fit_and_score()
        except ConfigError as error:  # e.g. more clusters than frames: say which config key sets it
            key = "iteration1" if name.startswith("iter1") else "iteration2"
            raise ConfigError(f"{key} (stage {name}): {error}") from None

    def fit_and_score() -> dict:
        k = config.kmeans
        common = {"layer": -1 if layer is None else layer, "device": config.run.device, "features": features}
        summaries = {
            "train": make_kmeans_labels(
                checkpoint,
                splits["train"],
                folder / "train",
                num_clusters=iteration.num_clusters,
                iterations=k.iterations,
                max_fit_steps=k.max_fit_steps,
                seed=k.seed,
                **common,
            )
        }
        if "valid" in splits:
            summaries["valid"] = make_kmeans_labels(
                checkpoint, splits["valid"], folder / "valid", kmeans=folder / "train" / "kmeans.pt", **common
            )
        quality = {}
        for split, summary in summaries.items():
            phones_dir = out / "phones" / split if phones is not None else None
            quality[split] = label_quality(folder / split, iteration.num_clusters, phones_dir)
            quality[split]["skipped_utterances"] = sum(summary["skipped"].values())
        return {"quality": quality, "manifests": {s: str(folder / s / "manifest.jsonl") for s in summaries}}

    return stages.run(name, settings, work, folder)


def base_recipe(config: HubertIterationsConfig, iteration: IterationSection) -> Recipe:
    """`pretrain.recipe` with both override lists applied; it must train the `hubert` objective."""
    recipe = load_recipe(config.pretrain.recipe, [*config.pretrain.overrides, *iteration.pretrain_overrides])
    if "hubert" not in recipe.objectives:
        raise ConfigError(
            f"pretrain.recipe={config.pretrain.recipe!r} has no `hubert` objective (it has "
            f"{sorted(recipe.objectives)}); use a hubert recipe such as configs/pretrain/tiny_hubert.yaml"
        )
    return recipe


def _recipe_for(config: HubertIterationsConfig, iteration: IterationSection, labels: dict, folder: Path) -> Recipe:
    """The pretraining recipe of one iteration: the base recipe, the overrides, then this iteration's labels."""
    recipe = base_recipe(config, iteration)
    manifests = labels["result"]["manifests"]
    recipe.data.train_manifests = [manifests["train"]]
    recipe.data.valid_manifests = [manifests["valid"]] if "valid" in manifests else []
    recipe.data.frame_labels_key = "frame_labels"
    recipe.model["hubert_num_labels"] = iteration.num_clusters
    recipe.train.output_dir = str(folder)
    validate(recipe)
    return recipe


def _pretrain_stage(
    name: str, config: HubertIterationsConfig, stages: Stages, out: Path, iteration: IterationSection, labels: dict
) -> dict:
    from .checkpoints import CheckpointManager
    from .loop import pretrain

    folder = out / name.split("_")[0] / "pretrain"
    recipe = _recipe_for(config, iteration, labels, folder)

    def work() -> dict:
        latest = CheckpointManager(folder).latest()
        if latest is None and folder.exists():  # interrupted before its first checkpoint: nothing to continue
            shutil.rmtree(folder)
        if latest is not None:
            logger.info("stage %s: continuing the interrupted run from %s", name, latest)
        result = pretrain(recipe, resume=latest is not None, progress=config.run.progress)
        if result.checkpoint is None:
            raise UserError(f"{folder}: pretraining wrote no checkpoint; check train.max_steps and train.save_steps")
        return {
            "checkpoint": str(result.checkpoint / "model"),
            "step": result.step,
            "valid": result.valid_metrics,
            "resumed_from": None if latest is None else str(latest),
        }

    return stages.run(name, {"recipe": recipe.to_dict(), "input": labels["stamp"]}, work, folder, resumable=True)


def middle_layer(checkpoint: str) -> int:
    """HuBERT clusters a middle layer (the 6th of Base's 12 blocks in iteration 2): num_hidden_layers // 2."""
    from ..configuration_conformer_ssl import ConformerSslConfig

    return max(1, ConformerSslConfig.from_pretrained(checkpoint).num_hidden_layers // 2)


def run_hubert_iterations(config: HubertIterationsConfig) -> dict:
    """Run (or continue) both iterations; returns the report also written to report.json / report.md."""
    out = Path(config.run.output_dir)
    if config.data.demo_corpus is not None:
        from ..synthetic.corpus import ensure_demo_corpus

        corpus = config.data.demo_corpus
        ensure_demo_corpus(corpus.folder, minutes=corpus.minutes, seed=corpus.seed)
    check_paths([config.data.train_manifest], "data.train_manifest")
    if config.data.valid_manifest:
        check_paths([config.data.valid_manifest], "data.valid_manifest")
    for iteration in (config.iteration1, config.iteration2):
        base_recipe(config, iteration)  # a bad recipe fails before any work
    stages = Stages(out)

    phones = _phone_stage(config, stages, out)
    labels1 = _label_stage("iter1_labels", config, stages, out, config.iteration1, "mfcc", None, None, [phones])
    model1 = _pretrain_stage("iter1_pretrain", config, stages, out, config.iteration1, labels1)
    checkpoint1 = model1["result"]["checkpoint"]
    layer = config.iteration2.layer if config.iteration2.layer is not None else middle_layer(checkpoint1)
    labels2 = _label_stage(
        "iter2_labels", config, stages, out, config.iteration2, "hidden", checkpoint1, layer, [phones, model1]
    )
    model2 = _pretrain_stage("iter2_pretrain", config, stages, out, config.iteration2, labels2)

    report = {
        "phone_labels": None if phones is None else phones["result"],
        "iterations": [
            {
                "iteration": i,
                "features": labels["settings"]["features"],
                "layer": labels["settings"]["layer"],
                "num_clusters": labels["settings"]["num_clusters"],
                "label_quality": labels["result"]["quality"],
                "checkpoint": model["result"]["checkpoint"],
                "pretrain_steps": model["result"]["step"],
                "pretrain_valid": model["result"]["valid"],
            }
            for i, (labels, model) in enumerate(((labels1, model1), (labels2, model2)), start=1)
        ],
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    (out / "report.md").write_text(report_markdown(report))
    logger.info("report: %s", out / "report.md")
    return report


QUALITY_COLUMNS = (
    ("codes_used", "codes used", "{}"),
    ("entropy_bits", "entropy (bits)", "{:.2f}"),
    ("phone_purity", "phone purity", "{:.3f}"),
    ("cluster_purity", "cluster purity", "{:.3f}"),
    ("pnmi", "PNMI", "{:.3f}"),
)


def report_markdown(report: dict) -> str:
    """The label-quality table (one row per iteration and split) and what each row was made from."""
    lines = [
        "# HuBERT iterations: label quality",
        "",
        "| iteration | features | k | split | frames | " + " | ".join(c[1] for c in QUALITY_COLUMNS) + " |",
        "|---|---|---|---|---|" + "---|" * len(QUALITY_COLUMNS),
    ]
    for it in report["iterations"]:
        features = "MFCC 39" if it["features"] == "mfcc" else f"layer {it['layer']} of iteration {it['iteration'] - 1}"
        for split, q in it["label_quality"].items():
            cells = [fmt.format(q[key]) if key in q else "n/a" for key, _, fmt in QUALITY_COLUMNS]
            frames = q.get("phone_labelled_frames", q["frames"])
            lines.append(
                f"| {it['iteration']} | {features} | {it['num_clusters']} | {split} | {frames} | {' | '.join(cells)} |"
            )
    lines += ["", "Purity and PNMI count 10 ms frames (silence is a phone class, `sil`)."]
    phones = report.get("phone_labels")
    if phones is None:
        lines.append("No phone labels: the manifests are not demo-corpus manifests, or data.phone_labels is none.")
    else:
        for split, s in phones.items():
            lines.append(
                f"Phone labels ({split}): {s['aligned']} of {s['utterances']} utterances aligned from espeak's "
                f"phoneme events, {s['phones']} phone classes; skipped: {s['skipped'] or 'none'}."
            )
    for it in report["iterations"]:
        valid = ", ".join(f"{k} {v:.4g}" for k, v in it["pretrain_valid"].items() if "loss" in k) or "no validation"
        lines.append(f"Iteration {it['iteration']} model: {it['pretrain_steps']} steps, {valid}; {it['checkpoint']}")
    return "\n".join(lines) + "\n"


__all__ = [
    "HubertIterationsConfig",
    "IterationSection",
    "StageMismatchError",
    "Stages",
    "load_config",
    "middle_layer",
    "report_markdown",
    "run_hubert_iterations",
]
