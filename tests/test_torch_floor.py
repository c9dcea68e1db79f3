"""The oldest PyTorch the package runs on is stated once and checked: pyproject.toml's floor equals
``transfusion.MIN_TORCH``, the installed torch has every API the code uses that arrived after 2.5
(with the release that brought it: the floor is the newest of them), and an older torch is refused at
import with what to do."""

import re
from pathlib import Path

import pytest
import torch

import transfusion

# API -> the first release that has it (docs.pytorch.org/docs/<version>/, checked for the floor)
NEWER_APIS = {
    "torch.backends.cuda.matmul.fp32_precision": (2, 9),
    "torch.backends.cudnn.conv.fp32_precision": (2, 9),
    "torch.distributed.checkpoint.HuggingFaceStorageWriter(save_distributed)": (2, 9),
    "torch.distributed.checkpoint.HuggingFaceStorageReader": (2, 8),
    "torch.nn.utils.get_total_norm": (2, 6),
    "torch.nn.utils.clip_grads_with_norm_": (2, 6),
    "torch.distributed.fsdp.fully_shard": (2, 6),
    "torch.distributed.fsdp.FSDPModule.set_requires_gradient_sync": (2, 6),
    "torch.distributed.fsdp.MixedPrecisionPolicy(cast_forward_inputs)": (2, 6),
}


def resolve(name: str) -> bool:
    import importlib
    import inspect

    path, _, arg = name.partition("(")
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return not arg or arg.rstrip(")") in inspect.signature(obj).parameters
    return False


def test_the_floor_is_the_newest_api_used_and_pyproject_says_it():
    missing = [n for n in NEWER_APIS if not resolve(n)]
    assert not missing, missing
    assert max(NEWER_APIS.values()) == transfusion.MIN_TORCH
    text = (Path(transfusion.__file__).parents[1] / "pyproject.toml").read_text()
    floor = re.search(r'"torch>=([\d.]+)"', text).group(1)
    assert tuple(map(int, floor.split("."))) == transfusion.MIN_TORCH
    makefile = (Path(transfusion.__file__).parents[1] / "Makefile").read_text()
    assert set(re.findall(r"torch>=([\d.]+)", makefile)) == {floor}


def test_an_older_torch_is_refused_with_what_to_do():
    with pytest.raises(ImportError, match=r"needs torch >= 2\.9, found 2\.8\.0\+cu128; upgrade it"):
        transfusion.check_torch("2.8.0+cu128")
    for ok in ("2.9.0", "2.13.0+cpu", "2.10.0a0+git1234", "3.0.0"):
        transfusion.check_torch(ok)
    transfusion.check_torch(torch.__version__)
