"""Fresh-machine integrity: the wheel holds every module and works outside the repository, and a
checkout on sys.path never shadows Hugging Face's `kernels` package (which transformers imports)."""

import importlib.metadata
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Imports every module of the installed tokaccel (from its files: tokaccel.kernels is a namespace
# package, which pkgutil does not walk), then patches / unpatches a 1-layer model.
WHEEL_CHECK = r"""
import os, sys, importlib
import torch
import tokaccel, tokaccel.vision, tokaccel.models
from transformers import AutoModelForCausalLM, LlamaConfig

package = os.path.dirname(tokaccel.__file__)
assert package.startswith(sys.argv[1]), (package, sys.argv[1])
names = []
for folder, _, files in os.walk(package):
    for file in files:
        if file.endswith(".py"):
            rel = os.path.relpath(os.path.join(folder, file[:-3]), os.path.dirname(package))
            names.append(rel.replace(os.sep, ".").removesuffix(".__init__"))
for name in sorted(names):
    importlib.import_module(name)

config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
ids = torch.randint(1, 64, (1, 40))
with torch.no_grad():
    before = model(ids).logits
    tokaccel.patch_model(model, "tokenselect", k=64, n_init=4, n_local=8, chunk=16)
    patched = model(ids).logits
    tokaccel.unpatch_model(model)
    after = model(ids).logits
assert torch.allclose(patched, before, atol=1e-4), (patched - before).abs().max()
assert torch.equal(after, before)
print("modules", len(names))
"""


def _run(args, cwd, **kwargs):
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600, **kwargs)
    assert proc.returncode == 0, f"{args[:4]} failed:\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


def test_wheel_installs_and_works_outside_the_repository(tmp_path):
    # built from a copy of what the wheel is made of: setuptools' build/ folder in the checkout
    # would otherwise keep files of earlier builds (a deleted module would reach the next wheel)
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for name in ("tokaccel", "kernels"):
        shutil.copytree(ROOT / name, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
          "-w", str(tmp_path / "dist"), str(source)], cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("tokaccel-*.whl")
    files = zipfile.ZipFile(wheel).namelist()
    for expected in ("tokaccel/vision/__init__.py", "tokaccel/kernels/ops.py", "tokaccel/kernels/_soft_vote_triton.py",
                     "tokaccel/evals/tasks.py", "tokaccel/policies/fasa.py"):
        assert expected in files
    assert not [f for f in files if f.startswith("kernels/") or f.startswith("tests/")]

    # A fresh venv that sees this suite's packages through a .pth line: the dependencies are reused
    # (no downloads), while this environment's editable install of tokaccel is not (a .pth line adds
    # a folder to sys.path without running the .pth files inside it).
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    python = venv / "bin" / "python"
    venv_site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=tmp_path).stdout.strip()
    Path(venv_site, "suite_packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", str(wheel)], cwd=tmp_path)

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = _run([str(python), "-c", WHEEL_CHECK, str(venv)], cwd="/", env=env).stdout
    assert int(out.split()[-1]) > 60  # every module of the package was imported


@pytest.mark.skipif(not any(True for _ in importlib.metadata.distributions(name="kernels")),
                    reason="Hugging Face's kernels package is not installed")
@pytest.mark.parametrize("how", ["-c", "-m"])
def test_the_repository_root_never_shadows_hf_kernels(how):
    """From the repository root (first on sys.path for `python -c` and `python -m`), `import kernels`
    is Hugging Face's package, and transformers and tokaccel import."""
    check = ("import kernels, transformers, tokaccel, tokaccel.kernels.ops; "
             "from transformers import AttentionInterface; "
             "assert hasattr(kernels, 'CUDAProperties'), kernels.__file__; "
             f"assert not kernels.__file__.startswith({str(ROOT / 'kernels')!r}), kernels.__file__")
    if how == "-c":
        _run([sys.executable, "-c", check], cwd=ROOT)
    else:
        proc = _run([sys.executable, "-m", "tokaccel.cli", "policies"], cwd=ROOT)
        assert "tokenselect" in proc.stdout


def test_public_submodules_are_reachable_lazily():
    code = ("import sys, tokaccel; assert 'tokaccel.models' not in sys.modules; "
            "assert callable(tokaccel.models.load) and tokaccel.vision and tokaccel.evals.run_eval; "
            "assert set(tokaccel.SUBMODULES) <= set(dir(tokaccel))")
    _run([sys.executable, "-c", code], cwd="/")


def test_ruff_finds_nothing():
    """The lint configured in pyproject.toml holds for the library, the kernels, tests and benchmarks."""
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "tokaccel", "kernels", "tests", "benchmarks"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
