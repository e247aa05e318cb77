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


# the command-line tools (tools/*.py) install as the package vqmoe_tools, each with a console script
TOOLS = ("analyze_routing", "convert_hf", "convert_to_vqmoe", "embed", "estimate_memory", "evaluate", "export_checkpoint",
         "generate", "get_data", "get_vision_data", "make_default_corpus", "preprocess_data", "reshard_checkpoint",
         "sweep", "train_tokenizer")
CONSOLE_SCRIPTS = ([f"vqmoe-{t.replace('_', '-')} = vqmoe_tools.{t}:cli" for t in TOOLS] +
                   ["vqmoe-pretrain = vqmoe_ds.training.lm:cli", "vqmoe-finetune = vqmoe_ds.finetune.task:cli",
                    "vqmoe-train-vision = vqmoe_ds.vision.task:cli"])

setup(
    name="vqmoe-ds",
    version="0.1.0",
    description="Vector-Quantized Mixture-of-Experts (VQMoE) language models and their baselines on DeepSpeed",
    packages=find_packages(include=["vqmoe_ds", "vqmoe_ds.*"]) + ["vqmoe_tools"],
    package_dir={"vqmoe_tools": "tools"},
    entry_points={"console_scripts": CONSOLE_SCRIPTS},
    python_requires=">=3.10",
    install_requires=_requirements("requirements.txt"),
    extras_require={"dev": _requirements("requirements-dev.txt"), "test": _requirements("requirements-dev.txt")},
    **_kernel_build_kwargs(),
)
