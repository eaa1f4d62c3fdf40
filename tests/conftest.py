import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# nbformat imports jsonschema, which compiles a URI grammar at import when the optional package rfc3987-syntax is
# installed (about 3 s per process); notebooks never use that format, so the tests do without it
sys.modules.setdefault("rfc3987_syntax", None)
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def tiny_cfg():
    import dada_min as dm
    return dm.make_config("tiny", device="cpu")


@pytest.fixture(scope="session")
def tiny_data_once():
    import dada_min as dm
    return dm.make_data(dm.make_config("tiny", device="cpu"))


@pytest.fixture
def tiny_data(tiny_data_once):
    """The tiny preset's built-in data, made once a session; every test gets its own copy (a test may change it)."""
    return type(tiny_data_once)(**{k: None if v is None else v.clone() for k, v in vars(tiny_data_once).items()})
