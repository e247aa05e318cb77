"""vqmoe-ds: Vector-Quantized Mixture-of-Experts training on DeepSpeed."""
import os

from setuptools import find_packages, setup


def _requirements(name):
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, name)) as f:
        return [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]


def _kernel_build_kwargs():
    """ext_modules/cmdclass of the optional nearest_code extension; see vqmoe_ds/kernels/_build.py."""
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location("_vqmoe_kernels_build", os.path.join(here, "vqmoe_ds", "kernels", "_build.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.setup_kwargs(here)


setup(
    name="vqmoe-ds",
    version="0.1.0",
    description="Vector-Quantized Mixture-of-Experts (VQMoE) language models and their baselines on DeepSpeed",
    packages=find_packages(include=["vqmoe_ds", "vqmoe_ds.*"]),
    python_requires=">=3.10",
    install_requires=_requirements("requirements.txt"),
    extras_require={"dev": _requirements("requirements-dev.txt"), "test": _requirements("requirements-dev.txt")},
    **_kernel_build_kwargs(),
)
