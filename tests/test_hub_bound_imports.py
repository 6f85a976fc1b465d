"""Hub-bound modules import only the standard library, torch, numpy, transformers and flat siblings.

Why: `save_pretrained` copies these files next to the weights and `trust_remote_code` loading imports them
where hf_ssl_speech is not installed. An absolute `hf_ssl_speech...` import fails there, a dotted relative
import (`from .sub.x import y`) or `from . import x` is not copied by transformers' dynamic-module code,
and any other third-party import is a dependency the Hub user may not have.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "hf_ssl_speech"
HUB_BOUND = (
    "configuration_conformer_ssl",
    "feature_extraction_conformer_ssl",
    "modeling_conformer_ssl",
    "masking",
    "targets",
    "losses",
    "frames",
    "objectives",
)
ALLOWED_PACKAGES = {"torch", "numpy", "transformers"}
ALLOWED_TOP_LEVEL = ALLOWED_PACKAGES | set(sys.stdlib_module_names)


def import_violations(source: str, filename: str) -> list[str]:
    """Every import in `source` (at any depth) that breaks the Hub-bound rules, as 'file:line: reason'."""
    problems = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                if top not in ALLOWED_TOP_LEVEL:
                    problems.append(f"{where}: `import {alias.name}` ({top!r} is not stdlib/torch/numpy/transformers)")
        elif isinstance(node, ast.ImportFrom):
            names = ", ".join(alias.name for alias in node.names)
            statement = f"`from {'.' * node.level}{node.module or ''} import {names}`"
            if node.level == 0:
                top = node.module.split(".")[0]
                if top not in ALLOWED_TOP_LEVEL:
                    problems.append(f"{where}: {statement} ({top!r} is not stdlib/torch/numpy/transformers)")
            elif node.level > 1 or node.module is None or "." in node.module:
                problems.append(f"{where}: {statement} (only flat sibling imports `from .module import name`)")
    return problems


def sibling_imports(source: str) -> set[str]:
    """Names of the sibling modules imported as `from .name import ...`."""
    return {
        node.module
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module and "." not in node.module
    }


@pytest.mark.parametrize("module", HUB_BOUND)
def test_hub_bound_module_imports(module):
    path = PACKAGE_DIR / f"{module}.py"
    # A renamed or missing Hub-bound file fails here: skipping would silently switch the firewall off.
    assert path.is_file(), f"Hub-bound module {path} is missing: restore it or update HUB_BOUND (and the docs)"
    source = path.read_text(encoding="utf-8")
    problems = import_violations(source, path.name)
    for sibling in sorted(sibling_imports(source)):
        if sibling not in HUB_BOUND:
            problems.append(
                f"{path.name}: imports sibling `.{sibling}`, which is not Hub-bound: it would be copied to the Hub "
                "too; move what is needed into a Hub-bound module (or add it to HUB_BOUND and keep it clean)"
            )
        elif not (PACKAGE_DIR / f"{sibling}.py").is_file():
            problems.append(f"{path.name}: imports sibling `.{sibling}`, but {sibling}.py does not exist")
    assert not problems, "Hub-bound import rules broken:\n" + "\n".join(problems)


def test_checker_catches_each_kind_of_bad_import():
    """The checker itself: each forbidden form is reported, each allowed form is not."""
    allowed = (
        "from __future__ import annotations\nimport math, os.path\nimport torch.nn.functional as F\n"
        "import numpy as np\nfrom transformers.utils import logging\nfrom .masking import compute_block_mask\n"
        "def f():\n    import json\n"
    )
    assert import_violations(allowed, "ok.py") == []
    forbidden = {
        "import hf_ssl_speech.masking": "hf_ssl_speech",
        "from hf_ssl_speech import masking": "hf_ssl_speech",
        "import soundfile": "soundfile",
        "def f():\n    import scipy.signal": "scipy",
        "from .sub.module import x": "flat sibling",
        "from .. import x": "flat sibling",
        "from . import masking": "flat sibling",
    }
    for source, needle in forbidden.items():
        problems = import_violations(source, "bad.py")
        assert len(problems) == 1 and needle in problems[0], (source, problems)


def hand_written_autograd(source: str, filename: str) -> list[str]:
    """Stock PyTorch only: no `torch.autograd.Function` subclass, no `torch.ops.*` call (private aten kernels such as
    `convolution_backward`), no private `torch._*` function. Each as 'file:line: what'."""
    problems = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.ClassDef):
            for base in node.bases:
                if ast.unparse(base).endswith("autograd.Function"):
                    problems.append(f"{where}: class {node.name}({ast.unparse(base)})")
        elif isinstance(node, ast.Attribute) and ast.unparse(node).startswith("torch.ops."):
            problems.append(f"{where}: {ast.unparse(node)}")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "torch":
            if node.attr.startswith("_") and not node.attr.startswith("__"):
                problems.append(f"{where}: torch.{node.attr}")
    return sorted(set(problems))


@pytest.mark.parametrize("module", HUB_BOUND)
def test_hub_bound_module_is_stock_pytorch(module):
    path = PACKAGE_DIR / f"{module}.py"
    problems = hand_written_autograd(path.read_text(encoding="utf-8"), path.name)
    assert not problems, "hand-written autograd or private torch ops in a Hub-bound file:\n" + "\n".join(problems)


def test_stock_checker_catches_each_kind():
    assert hand_written_autograd("import torch\nx = torch.nn.functional.relu(torch.ones(1))\n", "ok.py") == []
    for source in (
        "class F(torch.autograd.Function):\n    pass\n",
        "y = torch.ops.aten.convolution_backward(g, x, w)\n",
        "y = torch._softmax_backward_data(g, p, -1, p.dtype)\n",
    ):
        assert len(hand_written_autograd(source, "bad.py")) >= 1, source
