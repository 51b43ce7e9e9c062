import openai
import pytest

from servers import serve


@pytest.fixture(scope="session")
def smollm2():
    """The real default model (SmolLM2-135M-Instruct); fetched and converted once into the qcfuse home."""
    from qcfuse import load_model
    return load_model("smollm2-135m", quiet=True)


@pytest.fixture(scope="session")
def smollm2_engine(smollm2):
    from qcfuse import FusionEngine
    return FusionEngine(smollm2)


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """One plain `qcfuse serve` (defaults) shared by every test that only needs a server."""
    yield from serve(tmp_path_factory)


@pytest.fixture(scope="session")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="not-needed", max_retries=0, timeout=120)

