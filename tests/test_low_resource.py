"""The low-resource experiment end to end at toy scale (configs/experiments/low_resource_toy.yaml).

One module-level run of `scripts/low_resource_experiment.py` (~3 minutes of espeak audio, 2 objective families
and an in-domain arm, 3 steps per pretraining and fine-tuning run, an n-gram LM, the probes) makes every artefact;
the tests check their form (JSON schema, Markdown tables, readable PNGs), the data splits and hold-outs, the
validation choices, and that finished stages are skipped, redone work re-evaluated and changed settings refused.
Never the error-rate values: at this scale they mean nothing.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from pathlib import Path

import pytest

from hf_ssl_speech.experiments.config import ARMS, INITS, ROW_KEYS
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
ROW_TYPES = {key: (int, float) if kind is float else kind for key, kind in ROW_KEYS.items()}
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
    from hf_ssl_speech.finetune.lm import irstlm_available
    from hf_ssl_speech.synthetic.espeak import check_espeak

    check_espeak()  # espeakng-loader is a declared dependency ([demo]): a broken install fails here, never skips
    if not irstlm_available():
        pytest.skip(
            "irstlm not installed: run `sudo bash scripts/setup_voices.sh` (it runs apt-get install irstlm); "
            "the experiment builds its LM with it"
        )
    root = tmp_path_factory.mktemp("low_resource")
    work, results = root / "work", root / "results"
    argv = ["--config", str(TOY), "--out", str(work), "--results_dir", str(results), "--models_dir", str(root / "m")]
    assert load_script().main(argv) == 0
    config = load_experiment_config(
        TOY, {"output_dir": str(work), "results_dir": str(results), "models_dir": str(root / "m")}
    )
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
def test_json_has_one_well_formed_row_per_kept_run(toy):
    work, results, config = toy
    document = json.loads((results / "low_resource.json").read_text())
    rows = document["rows"]
    keys = [*config.pretrain.recipes, *(f"{f}@in_domain" for f in config.pretrain.in_domain)]
    subsets = [s.minutes for s in config.finetune.subsets]
    # pretrained + probe per pretraining run and subset, one scratch run per architecture (nest non-causal, apc causal)
    assert len(rows) == len(subsets) * (2 * len(keys) + 2)
    for row in rows:
        for key, kind in ROW_TYPES.items():
            assert isinstance(row[key], kind) and not isinstance(row[key], bool), (key, row)
        assert row["init"] in ("pretrained", "probe", "scratch") and row["arm"] in ARMS
        for metric in ("wer", "cer", "wer_lm", "cer_lm"):
            assert math.isfinite(row[metric]) and row[metric] >= 0, (metric, row)
        assert row["steps"] == 3 and row["wall_s"] >= 0
        assert row["labeled_minutes"] in subsets
        assert (row["objective"] == "none") == (row["init"] == "scratch")
        assert row["objective"] in config.pretrain.recipes or row["objective"] == "none"
        assert (row["arm"] == "in_domain") == row["key"].endswith("@in_domain")
        assert row["lm_alpha"] in config.evaluate.lm_alphas and row["lm_beta"] in config.evaluate.lm_betas
    scratch = {(r["architecture"], r["labeled_minutes"]) for r in rows if r["init"] == "scratch"}
    assert scratch == {(arch, m) for arch in ("causal", "non-causal") for m in subsets}
    assert {r["architecture"] for r in rows if r["objective"] == "apc"} == {"causal"}
    pretraining = document["pretraining"]
    assert set(pretraining) == set(keys)
    # the same budget for every family and arm: steps, batch seconds and encoder size
    assert {p["steps"] for p in pretraining.values()} == {config.pretrain.max_steps}
    assert len({p["batch_seconds"] for p in pretraining.values()}) == 1
    assert len({p["encoder_params"] for p in pretraining.values()}) == 1
    assert all(p["wall_s"] > 0 and 0 < p["flop_utilisation"] < 1 for p in pretraining.values())
    assert "python scripts/low_resource_experiment.py --config" in document["command"]


def test_validation_chooses_one_learning_rate_per_group_and_larger_subsets_reuse_it(toy):
    _, results, config = toy
    document = json.loads((results / "low_resource.json").read_text())
    selection = document["selection"]
    groups = {item["group"] for item in selection}
    for group in groups:
        members = [item for item in selection if item["group"] == group]
        kept = [item for item in members if item["kept"]]
        assert len(kept) == 1, group
        assert kept[0]["valid_cer"] == min(item["valid_cer"] for item in members)
    first = config.finetune.subsets[0].minutes
    grid = config.finetune.learning_rates["pretrained"]
    nest_first = [i for i in selection if i["group"] == f"nest__pretrained__labeled_{first:g}min"]
    assert sorted(i["learning_rate"] for i in nest_first) == sorted(grid)
    chosen = next(i["learning_rate"] for i in nest_first if i["kept"])
    last = config.finetune.subsets[-1].minutes
    assert [i["learning_rate"] for i in selection if i["group"] == f"nest__pretrained__labeled_{last:g}min"] == [chosen]


def test_lm_and_exported_models_load_and_transcribe(toy):
    from transformers import Wav2Vec2ProcessorWithLM, pipeline

    work, results, config = toy
    document = json.loads((results / "low_resource.json").read_text())
    models = document["models"]
    assert any(name.startswith("ctc_") and "pretrained" in name for name in models)
    assert any(name.endswith("_scratch") for name in models) and any(name.startswith("encoder_") for name in models)
    folder = Path(config.models_dir) / next(n for n in models if "pretrained" in n)
    assert (folder / "model.safetensors").is_file() and (folder / "language_model").is_dir()
    from transformers import AutoProcessor

    assert isinstance(AutoProcessor.from_pretrained(folder), Wav2Vec2ProcessorWithLM)
    test_row = _manifest(work / "corpus" / "test.jsonl")[0]
    asr = pipeline("automatic-speech-recognition", model=str(folder))
    assert asr.type == "ctc_with_lm"  # the folder's LM is what the pipeline decodes with
    import soundfile as sf

    audio, rate = sf.read(work / "corpus" / test_row["audio_filepath"], dtype="float32")
    assert isinstance(asr({"raw": audio, "sampling_rate": rate})["text"], str)
    assert sum(info["megabytes"] for info in models.values()) < 25


def test_recorded_command_is_the_one_that_reproduces_the_results():
    line = command_line(["scripts/low_resource_experiment.py", "--stages", "finetune", "report", "--config", "x.yaml"])
    assert line.endswith("python scripts/low_resource_experiment.py --config x.yaml")
    assert command_line(["scripts/low_resource_experiment.py", "--config", "x.yaml", "--stages", "report"]).endswith(
        "--config x.yaml"
    )


def test_best_change_compares_each_objective_with_its_own_architecture_and_chooses_on_validation():
    def row(key, init, architecture, wer, cer, valid_cer):
        return {
            "key": key,
            "init": init,
            "architecture": architecture,
            "labeled_minutes": 10.0,
            "wer": wer,
            "cer": cer,
            "valid_cer": valid_cer,
        }

    rows = [
        row("nest", "pretrained", "non-causal", 0.5, 0.2, 0.3),
        row("apc", "pretrained", "causal", 0.45, 0.3, 0.4),
        row("none", "scratch", "non-causal", 1.0, 0.5, 0.6),
        row("none", "scratch", "causal", 0.5, 0.6, 0.5),
    ]
    pretrained = {"nest": {"architecture": "non-causal"}, "apc": {"architecture": "causal"}}
    # apc has the lowest WER but only -10% against the causal scratch model; nest halves its baseline (and
    # validation, -50% against -20%, is what chooses it)
    assert best_change(rows, pretrained, 10.0, "wer") == ("nest", pytest.approx(-0.5))
    assert best_change(rows, pretrained, 10.0, "cer") == ("nest", pytest.approx(-0.6))
    # On validation apc is the better one: it is reported, whatever its test figures say.
    rows[1]["valid_cer"] = 0.1
    assert best_change(rows, pretrained, 10.0, "cer") == ("apc", pytest.approx(-0.5))
    assert best_change(rows, pretrained, 60.0, "wer") is None
    assert best_change(rows, pretrained, 10.0, "wer", arm="in_domain") is None


def test_markdown_tables_list_every_run_and_family(toy):
    _, results, config = toy
    markdown = (results / "low_resource.md").read_text()
    document = json.loads((results / "low_resource.json").read_text())
    rows = document["rows"]
    every_run = _table(markdown, "### Every kept run")
    assert len(every_run) == len(rows)
    for cells, row in zip(every_run, rows):
        assert len(cells) == 15
        assert cells[2] == row["init"] and cells[1] == row["arm"]
        assert float(cells[4]) == pytest.approx(100 * row["cer"], abs=0.051)
        assert float(cells[6]) == pytest.approx(100 * row["cer_lm"], abs=0.051)
        assert float(cells[9]) == row["learning_rate"]
    keys = list(document["pretraining"])
    assert [cells[0] for cells in _table(markdown, "## Pretraining")] == keys
    for heading in ("### CER", "### WER"):
        pivot = _table(markdown, heading)
        assert [cells[0] for cells in pivot] == keys
        assert all(len(cells) == 2 + 5 * len(config.finetune.subsets) for cells in pivot)
    first = next(
        r
        for r in rows
        if r["key"] == keys[0]
        and r["init"] == "pretrained"
        and r["labeled_minutes"] == config.finetune.subsets[0].minutes
    )
    assert _table(markdown, "### CER")[0][2] == f"{100 * first['cer']:.1f} / {100 * first['cer_lm']:.1f}"
    assert "**standard** arm" in markdown and "**in_domain** arm" in markdown
    assert "python scripts/low_resource_experiment.py --config" in markdown
    assert "Machine:" in markdown and "held-out voices" in markdown
    assert "## SUPERB-style probes" in markdown
    for png in PNGS:
        assert f"]({png})" in markdown


@pytest.mark.parametrize("name", PNGS)
def test_plots_are_readable_images(toy, name):
    from matplotlib.image import imread

    image = imread(toy[1] / name)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].std() > 0.01  # something is drawn


# ------------------------------------------------------------------------------------------ data splits
def test_held_out_voices_never_occur_in_training_data_and_subsets_nest(toy):
    work, _, config = toy
    corpus = work / "corpus"
    seen = _manifest(corpus / "pretrain.jsonl") + _manifest(corpus / "finetune.jsonl")
    splits = {name: _manifest(corpus / f"{name}.jsonl") for name in ("valid", "test", "in_domain")}
    for name in ("valid", "test"):
        rows = splits[name]
        assert rows and not {r["voice"] for r in rows} & {r["voice"] for r in seen}, name
        assert not {r["speaker"] for r in rows} & {r["speaker"] for r in seen}, name
    assert not {r["voice"] for r in splits["valid"]} & {r["voice"] for r in splits["test"]}
    # in-domain audio: the test voices, other sentences
    assert {r["voice"] for r in splits["in_domain"]} <= {r["voice"] for r in splits["test"]}
    assert not {r["text"] for r in splits["in_domain"]} & {r["text"] for r in splits["test"] + splits["valid"]}
    lm_text = (corpus / "lm_text.txt").read_text().splitlines()
    held = " | ".join(r["text"] for r in splits["test"] + splits["valid"])
    assert lm_text and not any(sentence in held for sentence in lm_text[:200])
    pool = {r["audio_filepath"] for r in _manifest(corpus / "finetune.jsonl")}
    previous: set[str] = set()
    for subset in config.finetune.subsets:
        rows = _manifest(corpus / f"labeled_{subset.minutes:g}min.jsonl")
        files = {r["audio_filepath"] for r in rows}
        assert files <= pool and previous <= files  # drawn from the labeled pool, nested
        assert sum(r["duration"] for r in rows) >= 60 * subset.minutes
        assert sum(r["duration"] for r in rows[:-1]) < 60 * subset.minutes  # it stops at the minutes
        if subset.voices is not None:
            assert {r["voice"] for r in rows} <= set(config.corpus.labeled_voices[: subset.voices])
        if subset.speakers is not None:
            assert len({r["speaker"] for r in rows}) <= subset.speakers
        previous = files


def test_probes_json_has_every_task_for_fbank_and_each_encoder(toy):
    from hf_ssl_speech.experiments.probes import FBANK, TASKS

    _, results, config = toy
    document = json.loads((results / "probes.json").read_text())
    rows = document["rows"]
    encoders = [key for key in config.pretrain.recipes]
    assert {(r["task"], r["features"]) for r in rows} == {(t, f) for t in TASKS for f in [FBANK, *encoders]}
    for row in rows:
        assert set(row) >= {"task", "features", "metric", "value", "higher_is_better"}
        assert row["metric"] == ("per" if row["task"] == "phone_recognition" else "accuracy")
        assert row["higher_is_better"] == (row["task"] != "phone_recognition")
        assert math.isfinite(row["value"]) and row["value"] >= 0
        assert sum(row["layer_weights"]) == pytest.approx(1.0, abs=1e-2)
    assert (results / "probes.png").stat().st_size > 1000 and "| task |" in (results / "probes.md").read_text()


# ------------------------------------------------------------------------------------------ resuming
def test_rerun_skips_every_finished_stage(toy, capsys):
    work, results, config = toy
    watched = [results / "low_resource.json", *sorted((work / "finetune").glob("*/model/model.safetensors"))]
    before = {path: path.stat().st_mtime_ns for path in watched}
    argv = ["--config", str(TOY), "--out", str(work), "--results_dir", str(results), "--models_dir", config.models_dir]
    assert load_script().main(argv) == 0
    assert (
        "stages: corpus skipped, pretrain skipped, finetune skipped, evaluate skipped, probes skipped, transducer "
        "skipped, report skipped" in (capsys.readouterr().out)
    )
    assert {path: path.stat().st_mtime_ns for path in watched} == before


def test_a_redone_run_is_retrained_and_reevaluated_alone(toy):
    work, results, config = toy
    target = work / "finetune" / "apc__probe__labeled_1min__lr0.005"
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
        "probes": "ran",
        "transducer": "ran",  # upstream ran; off in the toy config, so it has nothing to do
        "report": "ran",
    }
    changed = {p for p, t in models.items() if p.stat().st_mtime_ns != t}
    assert changed == {target / "model" / "model.safetensors"}
    reevaluated = {p.parent.name for p, t in evaluations.items() if p.stat().st_mtime_ns != t}
    assert reevaluated == {target.name}
    assert len(json.loads((results / "low_resource.json").read_text())["rows"]) == len(evaluations)


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
    with pytest.raises(ExperimentError, match="exceeds corpus.labeled_minutes"):
        load_experiment_config(bad)
    bad.write_text(TOY.read_text().replace("valid_voices: [espeak:m2]", "valid_voices: [espeak:f2]"))
    with pytest.raises(ExperimentError, match="espeak:f2.*named in two"):
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
    subset = config.finetune.subsets[-1]
    chosen = {(key, init): 1e-3 for key in [*pretrained, "scratch-non-causal", "scratch-causal"] for init in INITS}
    runs = plan_finetune_runs(config, pretrained, subset, chosen)
    scratch = [r for r in runs if r.init == "scratch"]
    assert sorted((r.architecture, r.checkpoint) for r in scratch) == [("causal", "c"), ("non-causal", "a")]
    assert len(runs) == 2 * len(pretrained) + 2
    assert len({r.name for r in runs}) == len(runs)
    grid = plan_finetune_runs(config, pretrained, config.finetune.subsets[0])  # the first subset: every rate
    rates = config.finetune.learning_rates
    assert len(grid) == len(pretrained) * (len(rates["pretrained"]) + len(rates["probe"])) + 2 * len(rates["scratch"])


def test_full_config_is_the_regime_ssl_is_used_in():
    """>= 10 h of pool from >= 300 pseudo-speakers; 10 min from <= 8 speakers of <= 3 voices; 1 h from <= 30
    speakers; >= 6 held-out test voices of >= 3 engines; validation voices of their own; one budget for all."""
    config = load_experiment_config(FULL)
    c = config.corpus
    assert c.engines == "auto" and c.pool_minutes >= 600 and c.min_pretrain_hours >= 9.5
    pool_voices = 51 - len(c.valid_voices) - len(c.test_voices)  # 36 espeak + 15 recorded voices installed
    assert pool_voices * c.speakers_per_voice >= 300
    ten, hour = config.finetune.subsets
    assert (ten.minutes, hour.minutes) == (10, 60) and ten.voices <= 3 and ten.speakers <= 8
    assert len(c.labeled_voices) * c.labeled_speakers_per_voice <= 30
    assert len(c.test_voices) >= 6 and len({v.split(":")[0] for v in c.test_voices}) >= 3
    assert c.valid_voices and not set(c.valid_voices) & set(c.test_voices) and c.in_domain_minutes > 0
    assert set(config.finetune.inits) == {"pretrained", "probe", "scratch"} and config.pretrain.in_domain
    for recipe in config.pretrain.recipes.values():
        assert (REPO_ROOT / recipe).is_file(), recipe
    assert not config.pretrain.family_overrides


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "configs" / "experiments").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_experiment_configs_load_and_their_recipes_exist(path):
    config = load_experiment_config(path)
    for family, recipe in config.pretrain.recipes.items():
        assert (REPO_ROOT / recipe).is_file(), (family, recipe)
    assert Path(config.results_dir).parts[:2] == ("docs", "results")
    assert config.models_dir is None or Path(config.models_dir).parts[:2] == ("docs", "results")


# Last in the module: it adds rows to the toy's shared report.
@pytest.mark.slow
def test_transducer_stage_puts_tdt_rows_beside_ctc_and_its_models_transcribe(toy):
    """The TDT stage on the finished toy experiment: predictor on the LM text, every arm on every subset, rows with
    the CTC rows' fields (head tdt, predictor scratch|text, no LM), a table beside CTC, stock-pipeline folders."""
    import soundfile as sf
    from transformers import pipeline

    work, results, config = toy
    config = dataclasses.replace(config, transducer=dataclasses.replace(config.transducer, enabled=True))
    result = run_experiment(config, stages=["transducer", "report"], log=lambda line: None)
    assert result.status["transducer"] == "ran" and result.status["report"] == "ran"
    document = json.loads((results / "low_resource.json").read_text())
    tdt = [r for r in document["rows"] if r["head"] == "tdt"]
    subsets = [s.minutes for s in config.finetune.subsets]
    arms = {(a.encoder, a.predictor) for a in config.transducer.arms}
    assert sorted((r["init"], r["predictor"], r["labeled_minutes"]) for r in tdt) == sorted(
        (*arm, m) for arm in arms for m in subsets
    )
    for row in tdt:
        for key, kind in ROW_TYPES.items():
            if key not in ("wer_lm", "cer_lm"):
                assert isinstance(row[key], kind) and not isinstance(row[key], bool), (key, row)
        assert row["wer_lm"] is None and row["cer_lm"] is None and 0 <= row["cer"] and row["best_step"] <= row["steps"]
        assert row["objective"] == ("nest" if row["init"] == "pretrained" else "none")
    assert all(r["head"] == "ctc" and r["predictor"] is None for r in document["rows"] if r not in tdt)
    predictor = document["transducer"]["predictor"]
    assert document["transducer"]["family"] == "nest" and math.isfinite(predictor["perplexity"])
    markdown = (results / "low_resource.md").read_text()
    table = _table(markdown, "## Transducers (TDT) beside CTC")
    assert sum(cells[1] == "tdt" for cells in table) == len(tdt)
    assert {cells[3] for cells in table if cells[1] == "tdt"} == {"scratch", "text"}
    # A kept TDT folder is a stock Parakeet model: the ASR pipeline transcribes a test utterance with it.
    test_row = _manifest(work / "corpus" / "test.jsonl")[0]
    audio, rate = sf.read(work / "corpus" / test_row["audio_filepath"], dtype="float32")
    asr = pipeline("automatic-speech-recognition", model=str(work / tdt[0]["model"]))
    assert isinstance(asr({"raw": audio, "sampling_rate": rate})["text"], str)
    again = run_experiment(config, stages=["transducer"], log=lambda line: None)
    assert again.status["transducer"] == "skipped"
