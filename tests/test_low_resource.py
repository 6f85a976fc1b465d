"""The low-resource experiment end to end at toy scale (configs/experiments/low_resource_toy.yaml).

One module-level run of `scripts/low_resource_experiment.py` (about 15 s on one core: ~3 minutes of espeak
audio, 2 objective families, 3 steps per pretraining and fine-tuning run) makes every artefact; the tests
check their form (JSON schema, Markdown tables, readable PNGs), the data splits, and that finished stages are
skipped, redone work re-evaluated and changed settings refused. Never the WER values: at this scale they mean
nothing.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from pathlib import Path

import pytest

from hf_ssl_speech.experiments.low_resource import (
    ExperimentError,
    command_line,
    load_experiment_config,
    plan_finetune_runs,
    run_experiment,
)
from hf_ssl_speech.experiments.report import best_change

REPO_ROOT = Path(__file__).resolve().parent.parent
TOY = REPO_ROOT / "configs" / "experiments" / "low_resource_toy.yaml"
FULL = REPO_ROOT / "configs" / "experiments" / "low_resource.yaml"
ROW_TYPES = {
    "objective": str,
    "labeled_minutes": (int, float),
    "init": str,
    "wer": (int, float),
    "cer": (int, float),
    "steps": int,
    "wall_s": (int, float),
}
PNGS = ("wer_vs_labeled_minutes.png", "cer_vs_labeled_minutes.png", "pretraining_loss.png")


def load_script():
    spec = importlib.util.spec_from_file_location(
        "low_resource_script", REPO_ROOT / "scripts" / "low_resource_experiment.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The toy experiment, run once through the script: (work folder, results folder, toy config)."""
    from hf_ssl_speech.synthetic.espeak import EspeakError, check_espeak

    try:
        check_espeak()
    except EspeakError as error:
        pytest.skip(f"espeak unavailable: {error}")
    root = tmp_path_factory.mktemp("low_resource")
    work, results = root / "work", root / "results"
    argv = ["--config", str(TOY), "--out", str(work), "--results_dir", str(results)]
    assert load_script().main(argv) == 0
    config = load_experiment_config(TOY, {"output_dir": str(work), "results_dir": str(results)})
    return work, results, config


def _table(markdown: str, heading: str) -> list[list[str]]:
    """Data rows (cells) of the first Markdown table after `heading`."""
    lines = markdown.split(heading, 1)[1].splitlines()
    table = []
    for line in lines:
        if line.startswith("|"):
            table.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif table:
            break
    assert set(table[1][0]) <= {"-"}, "second line of a table must be the separator"
    return table[2:]


def _manifest(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------ artefacts
def test_json_has_one_well_formed_row_per_run(toy):
    work, results, config = toy
    document = json.loads((results / "low_resource.json").read_text())
    rows = document["rows"]
    families = list(config.pretrain.recipes)
    subsets = [s.minutes for s in config.finetune.subsets]
    # pretrained + probe per family and subset, and one scratch run per architecture (nest non-causal, apc causal)
    assert len(rows) == len(subsets) * (2 * len(families) + 2)
    for row in rows:
        for key, kind in ROW_TYPES.items():
            assert isinstance(row[key], kind) and not isinstance(row[key], bool), (key, row)
        assert row["init"] in ("pretrained", "probe", "scratch")
        assert math.isfinite(row["wer"]) and row["wer"] >= 0 and math.isfinite(row["cer"]) and row["cer"] >= 0
        assert row["steps"] == 3 and row["wall_s"] >= 0
        assert row["labeled_minutes"] in subsets
        assert (row["objective"] == "none") == (row["init"] == "scratch")
        assert row["objective"] in families or row["objective"] == "none"
    scratch = {(r["architecture"], r["labeled_minutes"]) for r in rows if r["init"] == "scratch"}
    assert scratch == {(arch, m) for arch in ("causal", "non-causal") for m in subsets}
    assert {r["architecture"] for r in rows if r["objective"] == "apc"} == {"causal"}
    pretraining = document["pretraining"]
    assert set(pretraining) == set(families)
    # the same budget for every family: steps, batch seconds and encoder size
    assert {p["steps"] for p in pretraining.values()} == {config.pretrain.max_steps}
    assert len({p["batch_seconds"] for p in pretraining.values()}) == 1
    assert len({p["encoder_params"] for p in pretraining.values()}) == 1
    assert all(p["wall_s"] > 0 for p in pretraining.values())
    assert "python scripts/low_resource_experiment.py --config" in document["command"]


def test_recorded_command_is_the_one_that_reproduces_the_results():
    line = command_line(["scripts/low_resource_experiment.py", "--stages", "finetune", "report", "--config", "x.yaml"])
    assert line.endswith("python scripts/low_resource_experiment.py --config x.yaml")
    assert command_line(["scripts/low_resource_experiment.py", "--config", "x.yaml", "--stages", "report"]).endswith(
        "--config x.yaml"
    )


def test_best_change_compares_each_objective_with_its_own_architecture():
    def row(objective, init, architecture, wer, cer):
        return {
            "objective": objective,
            "init": init,
            "architecture": architecture,
            "labeled_minutes": 10.0,
            "wer": wer,
            "cer": cer,
        }

    rows = [
        row("nest", "pretrained", "non-causal", 0.5, 0.2),
        row("apc", "pretrained", "causal", 0.45, 0.3),
        row("none", "scratch", "non-causal", 1.0, 0.5),
        row("none", "scratch", "causal", 0.5, 0.6),
    ]
    pretrained = {"nest": {"architecture": "non-causal"}, "apc": {"architecture": "causal"}}
    # apc has the lowest WER but only -10% against the causal scratch model; nest halves its baseline
    assert best_change(rows, pretrained, 10.0, "wer") == ("nest", pytest.approx(-0.5))
    assert best_change(rows, pretrained, 10.0, "cer") == ("nest", pytest.approx(-0.6))
    assert best_change(rows, pretrained, 60.0, "wer") is None


def test_markdown_tables_list_every_run_and_family(toy):
    _, results, config = toy
    markdown = (results / "low_resource.md").read_text()
    rows = json.loads((results / "low_resource.json").read_text())["rows"]
    every_run = _table(markdown, "### Every run")
    assert len(every_run) == len(rows)
    for cells, row in zip(every_run, rows):
        assert len(cells) == 11
        expected_lr = {"probe": config.finetune.probe_learning_rate, "scratch": config.finetune.scratch_learning_rate}
        assert (
            float(cells[7]) == row["learning_rate"] == (expected_lr.get(row["init"]) or config.finetune.learning_rate)
        )
        assert cells[0] == row["objective"] and cells[2] == row["init"]
        assert float(cells[4]) == pytest.approx(100 * row["wer"], abs=0.051)
    pretraining = _table(markdown, "## Pretraining")
    assert [cells[0] for cells in pretraining] == list(config.pretrain.recipes)
    pivot = _table(markdown, "## Results on held-out voices")
    assert [cells[0] for cells in pivot] == list(config.pretrain.recipes)
    assert all(len(cells) == 1 + 4 * len(config.finetune.subsets) for cells in pivot)
    cer_pivot = _table(markdown, "### CER")
    assert [cells[0] for cells in cer_pivot] == list(config.pretrain.recipes)
    first = next(
        r
        for r in rows
        if r["objective"] == cer_pivot[0][0]
        and r["init"] == "pretrained"
        and r["labeled_minutes"] == min(s.minutes for s in config.finetune.subsets)
    )
    assert float(cer_pivot[0][1]) == pytest.approx(100 * first["cer"], abs=0.051)
    assert "Best fine-tuned objective against scratch" in markdown
    assert "python scripts/low_resource_experiment.py --config" in markdown
    assert "Machine:" in markdown and "held-out voices" in markdown
    for png in PNGS:
        assert f"]({png})" in markdown


@pytest.mark.parametrize("name", PNGS)
def test_plots_are_readable_images(toy, name):
    from matplotlib.image import imread

    image = imread(toy[1] / name)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].std() > 0.01  # something is drawn


# ------------------------------------------------------------------------------------------ data splits
def test_test_voices_never_occur_in_training_data_and_subsets_nest(toy):
    work, _, config = toy
    corpus = work / "corpus"
    seen = _manifest(corpus / "pretrain.jsonl") + _manifest(corpus / "finetune.jsonl")
    test = _manifest(corpus / "test.jsonl")
    assert test and not {r["voice"] for r in test} & {r["voice"] for r in seen}
    assert not {r["speaker"] for r in test} & {r["speaker"] for r in seen}
    pool = {r["audio_filepath"] for r in _manifest(corpus / "finetune.jsonl")}
    previous: set[str] = set()
    for subset in config.finetune.subsets:
        rows = _manifest(corpus / f"labeled_{subset.minutes:g}min.jsonl")
        files = {r["audio_filepath"] for r in rows}
        assert files <= pool and previous <= files  # drawn from the labeled pool, nested
        assert sum(r["duration"] for r in rows) >= 60 * subset.minutes
        assert sum(r["duration"] for r in rows[:-1]) < 60 * subset.minutes  # the shortest prefix that reaches it
        previous = files


# ------------------------------------------------------------------------------------------ resuming
def test_rerun_skips_every_finished_stage(toy, capsys):
    work, results, _ = toy
    watched = [results / "low_resource.json", *sorted((work / "finetune").glob("*/model/model.safetensors"))]
    before = {path: path.stat().st_mtime_ns for path in watched}
    argv = ["--config", str(TOY), "--out", str(work), "--results_dir", str(results)]
    assert load_script().main(argv) == 0
    assert "stages: corpus skipped, pretrain skipped, finetune skipped, evaluate skipped, report skipped" in (
        capsys.readouterr().out
    )
    assert {path: path.stat().st_mtime_ns for path in watched} == before


def test_a_redone_run_is_retrained_and_reevaluated_alone(toy):
    work, results, config = toy
    target = work / "finetune" / "apc__probe__labeled_1min"
    models = {p: p.stat().st_mtime_ns for p in (work / "finetune").glob("*/model/model.safetensors")}
    evaluations = {p: p.stat().st_mtime_ns for p in (work / "evaluate").glob("*/done.json")}
    (target / "done.json").unlink()  # as if the run had been killed before it finished
    (work / "stages" / "finetune" / "done.json").unlink()
    outcome = run_experiment(config, log=lambda line: None)
    assert outcome.status == {
        "corpus": "skipped",
        "pretrain": "skipped",
        "finetune": "ran",
        "evaluate": "ran",
        "report": "ran",
    }
    changed = {p for p, t in models.items() if p.stat().st_mtime_ns != t}
    assert changed == {target / "model" / "model.safetensors"}
    reevaluated = {p.parent.name for p, t in evaluations.items() if p.stat().st_mtime_ns != t}
    assert reevaluated == {target.name}
    assert len(json.loads((results / "low_resource.json").read_text())["rows"]) == len(models)


def test_changed_settings_are_refused_not_mixed(toy):
    work, _, config = toy
    changed = dataclasses.replace(config, pretrain=dataclasses.replace(config.pretrain, max_steps=4))
    with pytest.raises(ExperimentError, match="stages/pretrain") as error:
        run_experiment(changed, log=lambda line: None)
    assert "pretrain" in str(error.value) and "--out" in str(error.value)
    assert json.loads((work / "pretrain" / "nest" / "done.json").read_text())["result"]["steps"] == 3


def test_missing_upstream_stage_is_named(tmp_path):
    config = load_experiment_config(TOY, {"output_dir": str(tmp_path / "w"), "results_dir": str(tmp_path / "r")})
    with pytest.raises(ExperimentError, match=r"needs stage\(s\) \['corpus'\]"):
        run_experiment(config, stages=["pretrain"], log=lambda line: None)


# ------------------------------------------------------------------------------------------ configs and plans
def test_config_errors_name_the_field_and_the_fix(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TOY.read_text().replace("results_dir:", "result_dir:"))
    with pytest.raises(ExperimentError, match="result_dir.*Did you mean 'results_dir'"):
        load_experiment_config(bad)
    bad.write_text(TOY.read_text().replace("{minutes: 1.0, steps: 3}", "{minutes: 9.0, steps: 3}"))
    with pytest.raises(ExperimentError, match="exceeds the labeled pool.*corpus.minutes"):
        load_experiment_config(bad)
    text = TOY.read_text().replace(
        "  progress: false\nfinetune:", "  progress: false\n  family_overrides: {apc: [train.max_steps=9]}\nfinetune:"
    )
    bad.write_text(text)
    with pytest.raises(ExperimentError, match="compute budget must be equal"):
        load_experiment_config(bad)


def test_scratch_baseline_per_distinct_encoder():
    config = load_experiment_config(TOY)
    encoder = {"hidden_size": 96, "causal": False}
    pretrained = {
        "nest": {"architecture": "non-causal", "encoder": encoder, "checkpoint": "a", "finished_at": 1.0},
        "mixed": {"architecture": "non-causal", "encoder": encoder, "checkpoint": "b", "finished_at": 2.0},
        "cpc": {
            "architecture": "causal",
            "encoder": {**encoder, "causal": True},
            "checkpoint": "c",
            "finished_at": 3.0,
        },
    }
    runs = plan_finetune_runs(config, pretrained)
    scratch = [r for r in runs if r.init == "scratch"]
    assert sorted((r.architecture, r.checkpoint) for r in scratch) == sorted(
        [("non-causal", "a"), ("causal", "c")] * len(config.finetune.subsets)
    )
    assert len(runs) == len(config.finetune.subsets) * (2 * len(pretrained) + 2)
    assert len({r.name for r in runs}) == len(runs)


def test_full_config_pretrains_every_family_on_three_hours_with_one_budget():
    config = load_experiment_config(FULL)
    c = config.corpus
    assert c.engines == "auto"
    assert c.minutes * (1 - c.finetune_fraction - c.test_fraction) >= 180 and c.min_pretrain_hours >= 3
    assert set(config.pretrain.recipes) == {"nest", "contrastive_mlm", "reconstruction", "apc", "cpc", "mixed"}
    assert [s.minutes for s in config.finetune.subsets] == [10, 60]
    assert set(config.finetune.inits) == {"pretrained", "probe", "scratch"}
    for recipe in config.pretrain.recipes.values():
        assert (REPO_ROOT / recipe).is_file(), recipe
    assert not config.pretrain.family_overrides or all(
        not any(
            item.startswith(("model.hidden_size", "model.num_hidden_layers", "data.batch_seconds")) for item in items
        )
        for items in config.pretrain.family_overrides.values()
    )


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "configs" / "experiments").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_experiment_configs_load_and_their_recipes_exist(path):
    config = load_experiment_config(path)
    for family, recipe in config.pretrain.recipes.items():
        assert (REPO_ROOT / recipe).is_file(), (family, recipe)
    assert Path(config.results_dir).parts[:2] == ("docs", "results")
