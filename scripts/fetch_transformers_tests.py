#!/usr/bin/env python
"""Fetch transformers' common model tests (`ModelTesterMixin`, `ConfigTester`) for the installed version.

Why: the transformers wheel ships no tests, but the source distribution of the same version does
(`tests/test_modeling_common.py` and friends). Running those mixins against our models is the best
check that they behave like native transformers models (save/load, attention masks, hidden states,
gradient checkpointing, init, ...). The sdist holds only the top-level `tests/*.py`, not the
`tests/generation`, `tests/exporters` or `tests/utils` sub-packages those files import, so the few
names they import from there are replaced by small stubs (see STUBS below).

Result: `<dest>/transformers_tests/` (default dest: `<repo>/.cache/transformers_tests`), a package that
tests import after putting `<dest>` on `sys.path`:

    from transformers_tests.test_modeling_common import ModelTesterMixin

Idempotent: nothing is downloaded when `<dest>/transformers_tests/VERSION` already names the installed
version. Needs network access to PyPI only (`pip download`); run it once as a CI set-up step:

    python scripts/fetch_transformers_tests.py [--dest DIR] [--force]
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "transformers_tests"
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DEST = REPO_ROOT / ".cache" / "transformers_tests"
# The test modules we want; everything they import relatively is pulled in (or stubbed) automatically.
ROOT_MODULES = ("test_modeling_common", "test_configuration_common")

# Modules that test_modeling_common / test_configuration_common import from sub-packages of the
# transformers `tests/` folder that are absent from the sdist. Each stub provides only the names imported.
STUBS: dict[str, str] = {
    # ModelTesterMixin inherits from ExportTesterMixin; an empty base means the torch.export tests are
    # simply not collected (our tests do not claim export support).
    "exporters.test_export": (
        '"""Stub (not in the transformers sdist): no torch.export tests are collected."""\n\n\n'
        "class ExportTesterMixin:\n"
        "    pass\n"
    ),
    # ModelTesterMixin only uses GenerationTesterMixin in `issubclass` checks that ask "does this tester
    # run generate() tests?". Our encoders cannot generate, so an empty class is the truthful answer.
    "generation.test_utils": (
        '"""Stub (not in the transformers sdist): encoders do not generate, no generation tests."""\n\n\n'
        "class GenerationTesterMixin:\n"
        "    pass\n"
    ),
    # ConfigTester.check_config_arguments_init builds a config from these PreTrainedConfig kwargs and
    # checks each one is stored. Values are generic PreTrainedConfig fields (not model specific).
    "utils.test_configuration_utils": (
        '"""Stub (not in the transformers sdist): generic PreTrainedConfig kwargs for ConfigTester."""\n\n'
        "config_common_kwargs = {\n"
        '    "return_dict": False,\n'
        '    "output_hidden_states": True,\n'
        '    "output_attentions": True,\n'
        '    "dtype": "float16",\n'
        '    "chunk_size_feed_forward": 5,\n'
        '    "architectures": ["ConformerSslModel"],\n'
        '    "id2label": {0: "label"},\n'
        '    "label2id": {"label": "0"},\n'
        '    "problem_type": "regression",\n'
        "}\n"
    ),
}


def installed_transformers_version() -> str:
    """The version of the transformers distribution installed in this interpreter."""
    return importlib.metadata.version("transformers")


def download_sdist(version: str, workdir: Path) -> Path:
    """`pip download` the transformers sdist for `version` into `workdir`; returns the archive path."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        f"transformers=={version}",
        "-d",
        str(workdir),
        "--quiet",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(
            f"`{' '.join(cmd)}` failed (exit {result.returncode}); this script needs PyPI access.\n{result.stderr}"
        )
    archives = sorted(workdir.glob("transformers-*.tar.gz"))
    if len(archives) != 1:
        raise SystemExit(f"expected one transformers-*.tar.gz in {workdir}, found {[a.name for a in archives]}")
    return archives[0]


def relative_imports(source: str, module: str) -> set[str]:
    """Dotted names (relative to the tests package) that `module` imports with `from .x import y`."""
    package_parts = module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            base = package_parts[: len(package_parts) - (node.level - 1)]
            if node.module:
                found.add(".".join([*base, node.module]))
            else:  # `from . import x`: each name is a module
                found.update(".".join([*base, alias.name]) for alias in node.names)
    return found


def collect(archive: Path, version: str) -> dict[str, str]:
    """Module name -> source for the root modules and everything they import relatively (stubs filled in)."""
    prefix = f"transformers-{version}/tests/"
    with tarfile.open(archive) as tar:
        sources = {}
        for member in tar.getmembers():
            if member.isfile() and member.name.startswith(prefix) and member.name.endswith(".py"):
                name = member.name[len(prefix) : -3].replace("/", ".")
                sources[name] = tar.extractfile(member).read().decode("utf-8")
    if not sources:
        raise SystemExit(f"{archive} has no {prefix}*.py files: the sdist layout changed; update this script.")
    wanted, todo = {}, list(ROOT_MODULES)
    while todo:
        name = todo.pop()
        if name in wanted:
            continue
        if name in sources:
            wanted[name] = sources[name]
        elif name in STUBS:
            wanted[name] = STUBS[name]
        elif f"{name}.__init__" in sources:  # a sub-package import
            name = f"{name}.__init__"
            wanted[name] = sources[name]
        else:
            raise SystemExit(
                f"`{name}` is imported by the transformers {version} tests but is neither in the sdist nor in "
                f"STUBS of {__file__}: add a stub for it."
            )
        todo.extend(relative_imports(wanted[name], name))
    return wanted


def write_package(modules: dict[str, str], version: str, dest: Path) -> None:
    """Write `modules` as the package `dest/transformers_tests` (atomically: build aside, then rename)."""
    dest.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=dest))
    root = staging / PACKAGE
    for name, source in modules.items():
        path = root.joinpath(*name.split(".")).with_suffix(".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source, encoding="utf-8")
    # Every folder must be a package so the relative imports resolve.
    for folder in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        (folder / "__init__.py").touch(exist_ok=True)
    (root / "VERSION").write_text(version + "\n", encoding="utf-8")
    target = dest / PACKAGE
    if target.exists():
        shutil.rmtree(target)
    root.rename(target)
    shutil.rmtree(staging)


def cached_version(dest: Path) -> str | None:
    """The transformers version the cache at `dest` was built for, or None when there is none."""
    marker = dest / PACKAGE / "VERSION"
    return marker.read_text(encoding="utf-8").strip() if marker.is_file() else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST, help=f"cache folder (default {DEFAULT_DEST})")
    parser.add_argument("--force", action="store_true", help="download again even when the cache is current")
    args = parser.parse_args(argv)

    version = installed_transformers_version()
    if not args.force and cached_version(args.dest) == version:
        print(f"transformers {version} tests already in {args.dest / PACKAGE}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        archive = download_sdist(version, Path(tmp))
        modules = collect(archive, version)
    write_package(modules, version, args.dest)
    stubbed = sorted(name for name in modules if name in STUBS)
    print(f"wrote {len(modules)} modules of transformers {version} tests to {args.dest / PACKAGE} (stubs: {stubbed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
