import pytest

from train_cli import make_data


@pytest.fixture(scope="session")
def run_data(tmp_path_factory):
    """Synthetic shards and a tokenizer for short training runs."""
    return make_data(tmp_path_factory.mktemp("synthetic_run"))
