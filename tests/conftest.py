import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _deterministic():
    """Every test starts from the same RNG state and leaves global torch settings as it found them."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    # tiny models on two (often shared) cores: one thread avoids OpenMP spinning, ~10x faster here
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
