"""Installs: the build finds every package of the source tree (kernels/ as dsrewrite.kernels, nothing else at the
top level), and nothing at the repository root shadows another distribution's import (transformers probes for
Hugging Face's ``kernels`` by importing ``kernels``; run from the root, that name used to be this repository's
``kernels/`` folder, which then failed on its relative imports)."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest

from tests import conftest

ROOT = str(conftest.ROOT)


def source_packages() -> dict:
    """Every package of the source tree by its installed name (the folders holding an ``__init__.py``), read
    from the files themselves: ``dsrewrite/**`` under its own name, ``kernels/**`` as ``dsrewrite.kernels``."""
    found = {}
    for folder, name in (("dsrewrite", "dsrewrite"), ("kernels", "dsrewrite.kernels")):
        top = os.path.join(ROOT, folder)
        for here, dirs, files in os.walk(top):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            if "__init__.py" in files:
                rel = os.path.relpath(here, top)
                found[name if rel == "." else name + "." + rel.replace(os.sep, ".")] = os.path.relpath(here, ROOT)
    return found


def missing_build_requirements() -> str:
    """The first of pyproject.toml's build requirements this environment does not satisfy, or ''."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    requirements = pytest.importorskip("packaging.requirements")
    from importlib.metadata import PackageNotFoundError, version

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        for text in tomllib.load(f)["build-system"]["requires"]:
            req = requirements.Requirement(text)
            try:
                if req.specifier.contains(version(req.name), prereleases=True):
                    continue
            except PackageNotFoundError:
                pass
            return text
    return ""


def run(code: str, cwd: str = ROOT, *flags: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=env)


def test_source_tree_has_the_packages_this_test_reads():
    pkgs = source_packages()  # the reference itself: the subpackages the old hand-written list missed are here
    assert {"dsrewrite", "dsrewrite.kernels", "dsrewrite.dynamo", "dsrewrite.onnx"} <= set(pkgs), pkgs


def test_build_config_finds_every_package():
    """What setuptools will install (setup.py + pyproject.toml, read as a build reads them) is every package of
    the source tree, each from its own folder."""
    p = run(textwrap.dedent("""
        import json, warnings
        warnings.simplefilter("ignore")
        import setuptools
        from distutils.core import run_setup
        d = run_setup("setup.py", stop_after="config")
        print(json.dumps({"packages": d.packages, "package_dir": d.package_dir or {}}))
    """))
    assert p.returncode == 0, p.stderr
    cfg = json.loads(p.stdout.strip().splitlines()[-1])
    expected = source_packages()
    assert sorted(cfg["packages"]) == sorted(expected)

    def folder(pkg: str) -> str:  # setuptools' rule: the longest package_dir prefix maps the package's folder
        parts = pkg.split(".")
        for i in range(len(parts), 0, -1):
            prefix = ".".join(parts[:i])
            if prefix in cfg["package_dir"]:
                return os.path.normpath(os.path.join(cfg["package_dir"][prefix], *parts[i:]))
        return os.path.normpath(os.path.join(cfg["package_dir"].get("", ""), *parts))

    assert {pkg: folder(pkg) for pkg in cfg["packages"]} == expected


@pytest.mark.slow
def test_wheel_holds_every_package_and_nothing_at_the_top(tmp_path):
    """A wheel built from a copy of the sources holds every package of the tree, and only ``dsrewrite/`` (no
    top-level ``kernels`` that would clash with Hugging Face's distribution)."""
    missing = missing_build_requirements()
    if missing:
        pytest.skip(f"the build requirement {missing} is not installed here (the wheel is built without isolation)")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "setup.cfg", "README.md"):  # the build's files, those there are
        if os.path.exists(os.path.join(ROOT, name)):
            shutil.copy(os.path.join(ROOT, name), src / name)
    for name in ("dsrewrite", "kernels"):
        shutil.copytree(os.path.join(ROOT, name), src / name, ignore=shutil.ignore_patterns("__pycache__"))
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("dsrewrite-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    packages = {os.path.dirname(n).replace("/", ".") for n in names if n.endswith("/__init__.py")}
    assert packages == set(source_packages())
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"dsrewrite"}, tops
    # every module of the tree is in the wheel, under its installed name
    expected_files = {f"{pkg.replace('.', '/')}/{f}" for pkg, folder in source_packages().items()
                      for f in os.listdir(os.path.join(ROOT, folder)) if f.endswith(".py")}
    assert expected_files <= set(names), sorted(expected_files - set(names))


# ---------------------------------------------------------------- nothing at the root shadows another import
def test_top_level_kernels_without_another_distribution_is_an_empty_namespace():
    """``import kernels`` from the root with no other ``kernels`` on the path (``-S``: no site-packages) gives
    what the folder would be without its ``__init__.py``: an empty namespace package, which transformers'
    ``_is_package_available`` reads as "not installed" (no ``__file__``, no ``__version__``); names from it
    and its submodules raise ImportError; nothing heavy is imported."""
    p = run(textwrap.dedent("""
        import sys, kernels
        assert getattr(kernels, "__file__", None) is None and not hasattr(kernels, "__version__")
        assert list(kernels.__path__) == []
        for stmt in ("from kernels import get_kernel", "import kernels.library", "import kernels.ops"):
            try:
                exec(stmt)
            except ImportError:
                pass
            else:
                raise AssertionError(stmt + " imported")
        assert "torch" not in sys.modules
        print("ok")
    """), ROOT, "-S")
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr


def test_top_level_kernels_hands_over_to_an_installed_distribution(tmp_path):
    """With another ``kernels`` later on the path (a stand-in distribution), ``import kernels`` from the root
    is that one, submodules included."""
    pkg = tmp_path / "site" / "kernels"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("__version__ = '9.9.9'\ndef get_kernel(name):\n    return 'hub:' + name\n")
    (pkg / "layer.py").write_text("WHERE = 'stand-in'\n")
    p = run(textwrap.dedent(f"""
        import sys
        sys.path.append({str(tmp_path / 'site')!r})
        import kernels, kernels.layer
        from kernels import get_kernel
        print(kernels.__file__, kernels.__version__, get_kernel("x"), kernels.layer.WHERE)
    """), ROOT, "-S")
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == [str(pkg / "__init__.py"), "9.9.9", "hub:x", "stand-in"]


def test_dsrewrite_kernels_still_a_package_beside_top_level_kernels():
    """From the root, both names work side by side: ``dsrewrite.kernels`` is this package (its op registered),
    ``kernels`` is not."""
    pytest.importorskip("torch")
    p = run(textwrap.dedent("""
        import os, torch, kernels, dsrewrite.kernels as K
        assert callable(K.separable_conv2d) and hasattr(torch.ops.dsrewrite, "separable_conv2d")
        assert os.path.samefile(os.path.dirname(K.__file__), os.path.join(os.getcwd(), "kernels"))
        f = getattr(kernels, "__file__", None)
        assert f is None or not os.path.samefile(os.path.dirname(f), os.path.join(os.getcwd(), "kernels")), f
        print("ok")
    """))
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr


@pytest.mark.parametrize("module, stmt", [
    ("diffusers", "from diffusers import AutoencoderKL"),
    ("transformers", "import transformers.integrations.hub_kernels"),
])
def test_other_libraries_import_from_the_repository_root(module, stmt):
    pytest.importorskip(module)
    p = run(stmt + "\nprint('ok')")
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-3000:]


def test_transformers_sees_what_is_installed_from_the_root(tmp_path):
    """transformers' probe gives the same answer from the root as from elsewhere (the installed ``kernels``
    distribution or none), and a Hub-kernels import it makes then works."""
    pytest.importorskip("transformers")
    code = ("from transformers.utils.import_utils import is_kernels_available as k\n"
            "ok = k()\n"
            "if ok:\n    from kernels import get_kernel\n"
            "print(ok)")
    here, elsewhere = run(code), run(code, cwd=str(tmp_path))
    assert here.returncode == 0 and elsewhere.returncode == 0, here.stderr[-3000:] + elsewhere.stderr[-3000:]
    assert here.stdout.strip() == elsewhere.stdout.strip()


def test_no_script_folder_holds_a_module_named_like_a_probed_distribution():
    """A script run from benchmarks/ or examples/ puts that folder first on ``sys.path``: a ``kernels.py`` there
    would be what transformers and diffusers import as Hugging Face's ``kernels``."""
    probed = {"kernels", "diffusers", "transformers", "torch", "triton", "onnx", "onnxruntime", "timm", "accelerate"}
    for folder in ("benchmarks", "examples"):
        names = {os.path.splitext(f)[0] for f in os.listdir(os.path.join(ROOT, folder)) if f.endswith(".py")}
        names |= {d for d in os.listdir(os.path.join(ROOT, folder))
                  if os.path.isfile(os.path.join(ROOT, folder, d, "__init__.py"))}
        assert not names & probed, (folder, names & probed)
