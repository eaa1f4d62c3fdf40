import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def tiny_cfg():
    import dada_min as dm
    return dm.make_config("tiny", device="cpu")


@pytest.fixture
def tiny_data(tiny_cfg):
    import dada_min as dm
    return dm.make_data(tiny_cfg)
