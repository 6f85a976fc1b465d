"""A missing local path ends every command at once: one `error:` line naming the argument and the path, exit 2,
no attempt to reach the Hub (HF_ENDPOINT points at a loopback socket that records any connection)."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import REPO_ROOT, load_script

from hf_ssl_speech.errors import MissingPathError, check_model_source, looks_local, option_value, run_command

SCRIPTS = REPO_ROOT / "scripts"
MISSING = "runs/nothing_here"

# (script arguments, the argument the error must name, the path it must name)
COMMANDS = {
    "transcribe": (["transcribe.py", MISSING, "--manifest", "x.jsonl"], "model", MISSING),
    "finetune_ctc": (["finetune_ctc.py", "--model_name_or_path", MISSING], "--model_name_or_path", MISSING),
    "finetune_classification": (
        ["finetune_classification.py", "--model_name_or_path", MISSING],
        "--model_name_or_path",
        MISSING,
    ),
    "finetune_transducer": (
        ["finetune_transducer.py", "--model_name_or_path", MISSING],
        "--model_name_or_path",
        MISSING,
    ),
    "pretrain_predictor": (["pretrain_predictor.py", "--text", MISSING, "--output_dir", "out"], "--text", MISSING),
    "build_lm": (["build_lm.py", MISSING, "--text", "lm_sentences.txt"], "model", MISSING),
    "convert_nemo": (["convert_nemo_checkpoint.py", "runs/model.nemo", "out"], "nemo_file", "runs/model.nemo"),
}


def _run_against_listening_hub(args: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, float, bool]:
    """Run a script with HF_ENDPOINT on a loopback socket that listens but never answers; return the process, its
    wall time, and whether anything connected (a connection completes in the backlog even though it is never
    accepted, so a non-blocking accept afterwards sees it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as hub:
        hub.bind(("127.0.0.1", 0))
        hub.listen(16)
        env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{hub.getsockname()[1]}"
        env.pop("HF_SSL_SPEECH_DEBUG", None)
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, str(SCRIPTS / args[0]), *args[1:]],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        seconds = time.perf_counter() - start
        hub.setblocking(False)
        try:
            connection, _ = hub.accept()
        except BlockingIOError:
            return proc, seconds, False
        connection.close()
        return proc, seconds, True


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_missing_local_path_is_one_line_exit_2_without_network(name, tmp_path):
    args, argument, path = COMMANDS[name]
    proc, seconds, connected = _run_against_listening_hub(args, tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and argument in lines[0] and path in lines[0], lines[0]
    assert "Traceback" not in proc.stderr and "HFValidationError" not in proc.stderr
    assert not connected, "the command tried to reach the Hub for a local path"
    assert seconds < 5.0, f"{name} took {seconds:.1f} s to refuse a missing path"
    assert list(tmp_path.iterdir()) == [], "nothing may be written (e.g. the demo corpus) before the check"


def test_missing_model_in_recipe_is_refused_before_imports(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model:\n  model_name_or_path: {MISSING}\n")
    proc, seconds, connected = _run_against_listening_hub(["finetune_ctc.py", "--config", str(recipe)], tmp_path)
    assert proc.returncode == 2 and "--model_name_or_path" in proc.stderr and MISSING in proc.stderr, proc.stderr
    assert not connected and seconds < 5.0


def test_library_entry_points_check_the_model_path_too(tmp_path, monkeypatch):
    """Callers that skip the scripts' quick check (library users, tests) get the same one-line error."""
    monkeypatch.chdir(tmp_path)
    assert run_command(load_script("finetune_ctc").main, ["--model_name_or_path", MISSING]) == 2
    assert not (tmp_path / "demo_corpus").exists()  # refused before the demo corpus is made
    assert run_command(load_script("transcribe").main, [MISSING, "--manifest", "x.jsonl"]) == 2


def test_folder_without_config_names_the_model_folder_inside(tmp_path):
    checkpoint = tmp_path / "checkpoint-00000100"
    (checkpoint / "model").mkdir(parents=True)
    (checkpoint / "model" / "config.json").write_text("{}")
    with pytest.raises(
        MissingPathError, match=r"--model_name_or_path .*without config\.json.*checkpoint-00000100/model"
    ):
        check_model_source(str(checkpoint), "--model_name_or_path")
    check_model_source(str(checkpoint / "model"), "--model_name_or_path")  # the model folder itself is fine


def test_hub_ids_are_left_to_the_hub_unless_it_is_off(monkeypatch):
    for local in ("./model", "/abs/model", "runs/ctc", "a/b/c", "~/model", "dir\\model", "bad name", "a--b"):
        assert looks_local(local), local
    for hub_id in ("user/model", "model", "facebook/wav2vec2-base-960h"):
        assert not looks_local(hub_id), hub_id
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    check_model_source("user/model", "model")  # may exist on the Hub: transformers asks it
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingPathError, match="HF_HUB_OFFLINE"):
        check_model_source("user/model", "model")


def test_option_value_reads_the_three_spellings():
    assert option_value(["--model_name_or_path", "a"], "model_name_or_path") == "a"
    assert option_value(["--model_name_or_path=b"], "model_name_or_path") == "b"
    assert option_value(["x=1", "model_name_or_path=c"], "model_name_or_path") == "c"
    assert option_value(["--other", "d"], "model_name_or_path") is None


def test_bad_data_report_lists_every_kind_with_its_override_key(tmp_path):
    """A manifest with several kinds of bad lines: the report names each kind (not only the first found) and the
    setting by the key a recipe override uses (`data.max_bad_fraction`)."""
    import json

    import numpy as np
    import soundfile as sf

    from hf_ssl_speech.data import TooManyBadExamplesError, build_dataloader

    rows = []
    for index in range(3):
        sf.write(tmp_path / f"good{index}.wav", np.full(16000, 0.1 * (index + 1), dtype=np.float32), 16000)
        rows.append({"audio_filepath": f"good{index}.wav", "duration": 1.0})
    sf.write(tmp_path / "short.wav", np.full(1600, 0.1, dtype=np.float32), 16000)
    (tmp_path / "garbage.wav").write_bytes(b"not a wave file at all" * 10)
    rows += [
        {"audio_filepath": "gone.wav", "duration": 1.0},
        {"audio_filepath": "garbage.wav", "duration": 1.0},
        {"audio_filepath": "short.wav", "duration": 0.1},
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join([json.dumps(row) for row in rows] + ["{not json"]) + "\n")
    with pytest.raises(TooManyBadExamplesError) as caught:
        build_dataloader(str(manifest), num_workers=0, return_waveforms=True, max_bad_fraction=0.05)
    message = str(caught.value)
    for reason in ("malformed", "missing", "unreadable", "too_short"):
        assert f"  {reason} (" in message, (reason, message)
    assert "4 of 7 examples" in message, message
    assert "data.max_bad_fraction=0.05" in message and "raise data.max_bad_fraction" in message, message


# the committed 10-minute pretrained model, whichever family the experiment chose
LM_MODEL = next(iter(sorted((REPO_ROOT / "docs" / "results" / "models").glob("ctc_10min_pretrained_*"))), REPO_ROOT)


@pytest.mark.skipif(not (LM_MODEL / "language_model").is_dir(), reason="the committed LM model is not in this checkout")
def test_lm_loading_chatter_goes_to_the_debug_log(capfd, caplog):
    # pyctcdecode and kenlm are part of the test install (README): missing, this fails rather than skips
    import kenlm  # noqa: F401
    import pyctcdecode  # noqa: F401

    from hf_ssl_speech.finetune.inference import load_lm_processor

    with caplog.at_level(logging.DEBUG, logger="hf_ssl_speech.finetune.lm"):
        assert load_lm_processor(LM_MODEL, "lm") is not None
    err = capfd.readouterr().err
    assert "Loading the LM" not in err and "Transformers v6" not in err, err
    assert any("Loading the LM" in record.getMessage() for record in caplog.records)  # kept, at debug level


def test_folder_lm_without_pyctcdecode_says_greedy_and_how_to_install(tmp_path, monkeypatch, caplog):
    (tmp_path / "alphabet.json").write_text("{}")
    (tmp_path / "language_model").mkdir()
    monkeypatch.setitem(sys.modules, "pyctcdecode", None)  # an import of it now raises ImportError
    from hf_ssl_speech.finetune.inference import load_lm_processor
    from hf_ssl_speech.finetune.lm import LM_INSTALL, LmError

    with caplog.at_level(logging.WARNING):
        assert load_lm_processor(tmp_path, "auto") is None
    assert any("GREEDY" in r.getMessage() and LM_INSTALL in r.getMessage() for r in caplog.records), caplog.text
    with pytest.raises(LmError, match="pyctcdecode"):
        load_lm_processor(tmp_path, "lm")
