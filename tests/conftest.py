import json
import pathlib

import pytest

DATA = pathlib.Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    from razor_gguf.models import model_path

    return str(model_path("smollm2"))


@pytest.fixture(scope="session")
def golden_smollm2() -> dict:
    return json.loads((DATA / "golden_smollm2.json").read_text())
