"""Package discovery (the rest of the build is in pyproject.toml): every package under ``dsrewrite/``, found
anew at each build, and the top-level ``kernels/`` folder with its subpackages installed as ``dsrewrite.kernels``
(pyproject.toml's ``packages.find`` cannot map a folder to another package name)."""
from setuptools import find_packages, setup

KERNELS = "dsrewrite.kernels"

setup(
    packages=find_packages(include=["dsrewrite", "dsrewrite.*"])
    + [KERNELS] + [f"{KERNELS}.{name}" for name in find_packages("kernels")],
    package_dir={KERNELS: "kernels"},
)
