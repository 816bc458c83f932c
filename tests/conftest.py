import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # tiny models: one thread is fastest and leaves a core free


def pytest_configure(config):
    config.addinivalue_line("markers", "heavy: a test of minutes; collected first so that the two xdist "
                            "workers start the long ones at once instead of one worker ending on them")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.get_closest_marker("heavy") is None)  # stable: heavy first, else as collected


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
