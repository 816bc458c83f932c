import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # tiny models: one thread is fastest and leaves a core free


@pytest.fixture(scope="session")
def tiny_pipe(tmp_path_factory):
    from shapefirst.tiny import tiny_sd_pipeline

    return tiny_sd_pipeline(folder=tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, tiny_pipe):
    path = tmp_path_factory.mktemp("tiny_saved") / "pipe"
    tiny_pipe.save_pretrained(path, safe_serialization=True)
    return path


def gens(seed, n):
    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]
