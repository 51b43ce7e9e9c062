import pytest


@pytest.fixture(scope="session")
def smollm2():
    """The real default model (SmolLM2-135M-Instruct); fetched and converted once into the qcfuse home."""
    from qcfuse import load_model
    return load_model("smollm2-135m", quiet=True)


@pytest.fixture(scope="session")
def smollm2_engine(smollm2):
    from qcfuse import FusionEngine
    return FusionEngine(smollm2)
