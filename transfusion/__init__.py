"""Transfusion: one transformer that predicts the next text token and diffuses images.

``from transfusion import Pipeline`` is the library's face (``transfusion.pipeline``), imported when
first asked for, so that ``import transfusion.<module>`` stays light."""

__version__ = "0.1.0"
__all__ = ["MIN_TORCH", "Pipeline", "check_torch"]

MIN_TORCH = (2, 9)
"""The oldest PyTorch this package runs on (pyproject.toml says the same; a test checks both): 2.9
brought the two newest APIs it uses, ``torch.backends.cuda.matmul.fp32_precision`` (TF32 on the CUDA
paths) and ``HuggingFaceStorageWriter(save_distributed=...)`` (sharded checkpoints as safetensors)."""


def check_torch(version: str) -> None:
    """Refuse a PyTorch older than ``MIN_TORCH`` with what to do, instead of an AttributeError deep in
    a run."""
    parts = version.split("+")[0].split(".")
    found = tuple(int("".join(c for c in p if c.isdigit()) or 0) for p in parts[:2])
    if found < MIN_TORCH:
        need = ".".join(map(str, MIN_TORCH))
        raise ImportError(
            f"transfusion needs torch >= {need}, found {version}; upgrade it: pip install 'torch>={need}'"
        )


def _check_installed_torch() -> None:
    import torch

    check_torch(torch.__version__)


_check_installed_torch()


def __getattr__(name: str):  # noqa: ANN202
    if name == "Pipeline":
        from transfusion.pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module 'transfusion' has no attribute {name!r}")
