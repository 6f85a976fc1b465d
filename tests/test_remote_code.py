"""Auto classes with the package installed, and `trust_remote_code` loading where it is NOT importable."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForAudioClassification, AutoModelForCTC

import hf_ssl_speech
from hf_ssl_speech import ConformerSslForCTC, ConformerSslModel
from hf_ssl_speech.configuration_conformer_ssl import AUTO_MAP

REPO_ROOT = Path(__file__).resolve().parent.parent

# Runs in a fresh interpreter: a meta-path hook makes `hf_ssl_speech` unimportable whatever is installed
# (editable finder or site-packages), then transformers must build the model from the files in the folder.
_REMOTE_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, importlib.util, json, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "hf_ssl_speech" or name.startswith("hf_ssl_speech."):
                raise ModuleNotFoundError(f"blocked for this test: {name}")
            return None

    sys.meta_path.insert(0, Block())
    try:
        importlib.util.find_spec("hf_ssl_speech")
        raise SystemExit("hf_ssl_speech is still importable")
    except ModuleNotFoundError:
        pass

    import torch
    from transformers import AutoConfig, AutoFeatureExtractor, AutoModel, AutoModelForCTC

    folder, inputs_path, out_path = sys.argv[1:4]
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    ctc = AutoModelForCTC.from_pretrained(folder, trust_remote_code=True).eval()
    extractor = AutoFeatureExtractor.from_pretrained(folder, trust_remote_code=True)
    inputs = torch.load(inputs_path)
    with torch.no_grad():
        hidden = model(inputs["features"], attention_mask=inputs["mask"]).last_hidden_state
        logits = ctc(inputs["features"], attention_mask=inputs["mask"]).logits
    torch.save({"hidden": hidden, "logits": logits}, out_path)
    print(json.dumps({"config": type(config).__module__, "model": type(model).__module__,
                      "extractor": type(extractor).__name__, "ctc": type(ctc).__name__}))
    """
)


def test_auto_classes_resolve_with_package_installed(tiny_config, tmp_path):
    config = tiny_config(vocab_size=9, num_labels=3)
    ConformerSslForCTC(config).save_pretrained(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)).__name__ == "ConformerSslConfig"
    assert type(AutoModel.from_pretrained(tmp_path)) is ConformerSslModel
    assert type(AutoModelForCTC.from_pretrained(tmp_path)) is ConformerSslForCTC
    classifier = AutoModelForAudioClassification.from_pretrained(tmp_path)
    assert type(classifier).__name__ == "ConformerSslForSequenceClassification"


def test_saved_folder_has_complete_auto_map_and_code(tiny_config, tmp_path):
    ConformerSslModel(tiny_config()).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["auto_map"] == AUTO_MAP
    assert saved["model_type"] == "conformer_ssl"
    for module in {entry.split(".")[0] for entry in AUTO_MAP.values() if "FeatureExtractor" not in entry}:
        assert (tmp_path / f"{module}.py").is_file(), module


@pytest.mark.parametrize("position_type", ["rel_pos", "gated_rel_pos"])
def test_trust_remote_code_without_the_package(tiny_config, tmp_path, position_type):
    from hf_ssl_speech import ConformerSslFeatureExtractor

    folder = tmp_path / "model"
    torch.manual_seed(0)
    config = tiny_config(vocab_size=7, num_mel_bins=80, position_embeddings_type=position_type)
    model = ConformerSslForCTC(config).eval()
    model.save_pretrained(folder)
    ConformerSslFeatureExtractor().save_pretrained(folder)
    features = torch.randn(2, 90, 80)
    mask = torch.ones(2, 90, dtype=torch.long)
    mask[1, 60:] = 0
    torch.save({"features": features, "mask": mask}, tmp_path / "inputs.pt")

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-c", _REMOTE_SCRIPT, str(folder), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["model"].startswith("transformers_modules."), loaded  # built from the folder's code
    assert loaded["extractor"] == "ConformerSslFeatureExtractor" and loaded["ctc"] == "ConformerSslForCTC"
    remote = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        torch.testing.assert_close(remote["logits"], model(features, attention_mask=mask).logits)
        torch.testing.assert_close(remote["hidden"], model.conformer(features, attention_mask=mask).last_hidden_state)


def test_package_registers_auto_classes_in_init_only():
    """docs/architecture.md §1: `__init__.py` is the only place that registers Auto classes."""
    for path in Path(hf_ssl_speech.__file__).parent.glob("*.py"):
        if path.name == "__init__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("register", "register_for_auto_class")
            ):
                pytest.fail(f"{path.name}:{node.lineno} registers an Auto class outside __init__.py")
