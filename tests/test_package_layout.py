"""The package's layering (DESIGN.md): no library module imports the CLI, and the public names are
exported from `dspark`."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import dspark

ROOT = pathlib.Path(dspark.__file__).parent


def test_no_library_module_imports_the_cli():
    modules = sorted(
        "dspark." + ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for path in ROOT.rglob("*.py") if "cli" not in path.relative_to(ROOT).parts)
    modules = [m.removesuffix(".") for m in modules if not m.startswith("dspark.triton_kernels")]
    code = ("import importlib, sys\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            "    assert not any(m.startswith('dspark.cli') for m in sys.modules), f'{name} imports dspark.cli'\n"
            "print(len(sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_public_names_and_type_marker():
    for name in ("Engine", "SamplingParams", "NgramDrafter", "DSparkDrafter", "HybridDrafter", "DraftModelDrafter",
                 "Drafter", "VerificationPolicy", "tree_attention", "plan_tree_attention", "rejection_sample",
                 "kv_rollback"):
        assert hasattr(dspark, name), name
    assert (ROOT / "py.typed").exists()
