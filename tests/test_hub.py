"""Pushing to the Hub and loading back, offline, against the loopback endpoint of tests/hub_server.py.

The real `huggingface_hub` client and `transformers` talk HTTP to it: create-repo, validate-yaml, preupload,
commit, repo info, tree, resolve. The last test pretrains a tiny model with `scripts/pretrain.py
--push_to_hub`, then loads it back with `trust_remote_code=True` in a fresh interpreter that cannot import
hf_ssl_speech at all, and with the package installed; both must give the outputs of the local checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hub_server import HubServer, git_blob_oid
from support import PRETRAIN_MODEL, make_corpus, make_speech_like, run_env, write_recipe

from hf_ssl_speech.interop.hub import card_metadata, model_card_text, push_checkpoint, write_model_card

REPO_ROOT = Path(__file__).resolve().parent.parent
TOKEN = "hf_loopback_dummy_token"


def _folder(tmp_path: Path) -> Path:
    folder = tmp_path / "upload"
    (folder / "nested" / "deeper").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "conformer_ssl", "hidden_size": 32}))
    (folder / "nested" / "weights.bin").write_bytes(np.random.default_rng(0).bytes(50_000))
    (folder / "nested" / "deeper" / "notes.txt").write_text("résumé ✓\n")
    (folder / "empty.txt").write_bytes(b"")
    return folder


def test_push_then_download_gives_the_same_bytes(tmp_path):
    from huggingface_hub import hf_hub_download, snapshot_download

    folder = _folder(tmp_path)
    write_model_card(folder, "alice/tiny-ssl", {"optimiser steps": 3}, datasets=["demo_corpus"])
    with HubServer(lifetime_s=120) as hub:
        url = push_checkpoint(folder, "alice/tiny-ssl", token=TOKEN, endpoint=hub.url, commit_message="first")
        assert url.startswith(f"{hub.url}/alice/tiny-ssl/commit/")
        assert "POST /api/validate-yaml" in hub.requests  # the card's metadata went through the Hub's check
        local = Path(snapshot_download("alice/tiny-ssl", endpoint=hub.url, token=TOKEN, cache_dir=tmp_path / "c1"))
        one = hf_hub_download("alice/tiny-ssl", "nested/weights.bin", endpoint=hub.url, cache_dir=tmp_path / "c2")
        sent = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        received = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
        assert received == sent
        for name in sent:
            assert (local / name).read_bytes() == (folder / name).read_bytes(), name
        assert Path(one).read_bytes() == (folder / "nested" / "weights.bin").read_bytes()
        # Pushing again into the existing repo (exist_ok): unchanged files are recognised by their oid and an
        # unchanged folder makes no commit; a changed file makes a new head that downloads see.
        assert push_checkpoint(folder, "alice/tiny-ssl", token=TOKEN, endpoint=hub.url) == url
        (folder / "config.json").write_text(json.dumps({"model_type": "conformer_ssl", "hidden_size": 64}))
        second = push_checkpoint(folder, "alice/tiny-ssl", token=TOKEN, endpoint=hub.url)
        assert second != url
        config = hf_hub_download("alice/tiny-ssl", "config.json", endpoint=hub.url, cache_dir=tmp_path / "c3")
        assert json.loads(Path(config).read_text())["hidden_size"] == 64


def test_push_errors_are_clear(tmp_path):
    from huggingface_hub.errors import HfHubHTTPError

    with pytest.raises(FileNotFoundError, match="no config.json"):
        push_checkpoint(tmp_path, "alice/x", token=TOKEN, endpoint="http://127.0.0.1:9")
    folder = _folder(tmp_path)
    with HubServer(lifetime_s=60) as hub:
        with pytest.raises(HfHubHTTPError, match="401"):  # no token at all: the endpoint refuses writes
            push_checkpoint(folder, "alice/x", token=False, endpoint=hub.url)


def test_model_card_metadata_and_loading_instructions():
    from huggingface_hub import ModelCard

    config = {
        "subsampling": "dw_striding",
        "subsampling_factor": 8,
        "hop_length": 160,
        "num_hidden_layers": 2,
        "hidden_size": 96,
        "objectives": {"bestrq": {"weight": 1.0, "start_step": 0}},
    }
    text = model_card_text(
        "alice/nest-tiny",
        config,
        {"optimiser steps": 300, "final train loss": 3.25},
        datasets=["librispeech_asr"],
        recipe_yaml="train:\n  max_steps: 300\n",
    )
    card = ModelCard(text)
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "feature-extraction"
    assert set(card.data.tags) >= {"ssl", "speech", "conformer", "hf_ssl_speech"}
    assert card.data.datasets == ["librispeech_asr"]
    assert 'AutoModel.from_pretrained("alice/nest-tiny", trust_remote_code=True)' in text
    assert "import hf_ssl_speech" in text and 'AutoModel.from_pretrained("alice/nest-tiny")' in text
    assert "FastConformer encoder: 2 layers" in text and "bestrq" in text and "80 ms" in text
    assert "| final train loss | 3.25 |" in text and "max_steps: 300" in text
    assert card_metadata(extra_tags=["nest"])["tags"][-1] == "nest"


def test_git_blob_oid_matches_git():
    # The ETag the client caches by is git's blob id: `printf 'hello\n' | git hash-object --stdin`.
    assert git_blob_oid(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"


# Runs with `python -I -S`: no site processing, so neither the editable finder (a .pth file) nor the repo is on
# sys.path; only the venv's site-packages is added by hand. hf_ssl_speech must then be unimportable.
_REMOTE_LOAD = textwrap.dedent(
    """
    import importlib.util, json, sys
    purelib, repo, audio_path, out_path = sys.argv[1:5]
    sys.path.append(purelib)
    if importlib.util.find_spec("hf_ssl_speech") is not None:
        raise SystemExit("hf_ssl_speech is importable: the remote-code test would prove nothing")
    import numpy as np, torch
    from transformers import AutoFeatureExtractor, AutoModel

    model = AutoModel.from_pretrained(repo, trust_remote_code=True).eval()
    extractor = AutoFeatureExtractor.from_pretrained(repo, trust_remote_code=True)
    audio = list(np.load(audio_path, allow_pickle=True))
    inputs = extractor(audio, sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**inputs).last_hidden_state
    torch.save(hidden, out_path)
    print(json.dumps({"model": type(model).__name__, "module": type(model).__module__,
                      "extractor": type(extractor).__name__, "hf_ssl_speech_loaded": "hf_ssl_speech" in sys.modules}))
    """
)

_INSTALLED_LOAD = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch
    import hf_ssl_speech
    from transformers import AutoFeatureExtractor, AutoModel

    repo, audio_path, out_path = sys.argv[1:4]
    model = AutoModel.from_pretrained(repo).eval()
    extractor = AutoFeatureExtractor.from_pretrained(repo)
    inputs = extractor(list(np.load(audio_path, allow_pickle=True)), sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        torch.save(model(**inputs).last_hidden_state, out_path)
    print(json.dumps({"model": type(model).__name__, "module": type(model).__module__}))
    """
)


@pytest.mark.slow
def test_pretrain_push_and_load_with_and_without_the_package(tmp_path):
    manifest = make_corpus(tmp_path / "corpus", count=4, seconds=1.5)
    recipe = write_recipe(
        tmp_path / "recipe.yaml",
        model={"bestrq_codebook_size": 64, "bestrq_codebook_dim": 8, "mask_time_length": 8, "mask_time_prob": 0.05},
        objectives={"bestrq": {}},
        data={"train_manifests": [str(manifest)], "batch_seconds": 3.0},
        optim={},
        train={"max_steps": 2, "save_steps": 2, "output_dir": "run"},
    )
    audio = np.empty(2, dtype=object)
    audio[:] = [make_speech_like(1.3, seed=11), make_speech_like(0.9, seed=12)]
    np.save(tmp_path / "audio.npy", audio, allow_pickle=True)
    with HubServer(lifetime_s=300) as hub:
        env = {**run_env(tmp_path), **hub.env(TOKEN)}
        proc = subprocess.run(
            [
                sys.executable,
                str(REPO_ROOT / "scripts" / "pretrain.py"),
                "--config",
                str(recipe),
                "--push_to_hub",
                "alice/tiny-bestrq",
                "--no_progress",
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"Pushed:       {hub.url}/alice/tiny-bestrq/commit/" in proc.stdout
        checkpoint_model = tmp_path / "run" / "checkpoints" / "checkpoint-00000002" / "model"
        assert (checkpoint_model / "modeling_conformer_ssl.py").is_file(), "remote code saved with the weights"

        # Without the package: a fresh isolated interpreter from an empty folder.
        purelib = sysconfig.get_paths()["purelib"]
        script = tmp_path / "remote_load.py"
        script.write_text(_REMOTE_LOAD)
        isolated_cwd = tmp_path / "elsewhere"
        isolated_cwd.mkdir()
        isolated_env = {k: v for k, v in env.items() if not k.startswith("PYTHON")}
        isolated_env["HF_HOME"] = str(tmp_path / "hf_home_remote")
        proc = subprocess.run(
            [
                sys.executable,
                "-I",
                "-S",
                str(script),
                purelib,
                "alice/tiny-bestrq",
                str(tmp_path / "audio.npy"),
                str(tmp_path / "remote.pt"),
            ],
            cwd=isolated_cwd,
            env=isolated_env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        info = json.loads(proc.stdout.strip().splitlines()[-1])
        assert info["model"] == "ConformerSslModel" and info["extractor"] == "ConformerSslFeatureExtractor"
        assert info["module"].startswith("transformers_modules.") and not info["hf_ssl_speech_loaded"]

        # With the package installed.
        script = tmp_path / "installed_load.py"
        script.write_text(_INSTALLED_LOAD)
        proc = subprocess.run(
            [
                sys.executable,
                str(script),
                "alice/tiny-bestrq",
                str(tmp_path / "audio.npy"),
                str(tmp_path / "installed.pt"),
            ],
            cwd=isolated_cwd,
            env={**env, "HF_HOME": str(tmp_path / "hf_home_installed")},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert json.loads(proc.stdout.strip().splitlines()[-1])["module"] == "hf_ssl_speech.modeling_conformer_ssl"

    # Reference: the local checkpoint folder, loaded here with the package.
    from transformers import AutoFeatureExtractor, AutoModel

    model = AutoModel.from_pretrained(checkpoint_model).eval()
    extractor = AutoFeatureExtractor.from_pretrained(checkpoint_model)
    inputs = extractor(list(audio), sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        expected = model(**inputs).last_hidden_state
    assert expected.shape[0] == 2 and expected.shape[-1] == PRETRAIN_MODEL["hidden_size"]
    torch.testing.assert_close(torch.load(tmp_path / "remote.pt"), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.load(tmp_path / "installed.pt"), expected, rtol=1e-5, atol=1e-6)
    assert os.path.isfile(tmp_path / "run" / "loss_curves.png")
