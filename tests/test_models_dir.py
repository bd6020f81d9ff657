"""--models-dir: a folder of models loaded on demand, unloaded when idle, within a budget.

The folder's files are stand-ins served by the fake engine (the engine is not the
subject here), except the broken GGUF, which goes to the real llama.cpp engine so
that its error is llama.cpp's own. test_models_dir_real.py loads the real Gemma.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from support import PROMPT, VERSION, fake_model, serve_app, settings
from tcserve.api.app import create_app
from tcserve.cli.main import main
from tcserve.config import ConfigError, LlamaCppModel, ServedModel
from tcserve.core.folder import model_name
from tcserve.engines.base import Engine
from tcserve.engines.factory import build_engine

FAKE_GGUF = b"GGUF stand-in"
"""A file starting with this is served by the fake engine; anything else goes to llama.cpp."""


class Factory:
    """Builds the engines, and counts how often each model was built (= loaded)."""

    def __init__(self, load_delay: float = 0.0, token_delay: float = 0.0) -> None:
        self.builds: Counter[str] = Counter()
        self._load_delay = load_delay
        self._token_delay = token_delay

    def __call__(self, model: ServedModel) -> Engine:
        self.builds[model.name] += 1
        if isinstance(model, LlamaCppModel) and model.path is not None and model.path.read_bytes() == FAKE_GGUF:
            stand_in = fake_model(
                name=model.name,
                reply=f" I am {model.name}.",
                load_delay=self._load_delay,
                token_delay=self._token_delay,
            )
            return build_engine(stand_in)
        return build_engine(model)


def folder(tmp_path: Path, *names: str, content: bytes = FAKE_GGUF) -> Path:
    models = tmp_path / "models"
    models.mkdir(exist_ok=True)
    for name in names:
        (models / name).write_bytes(content)
    return models


def complete(url: str, model: str, **extra: object) -> httpx.Response:
    body = {"model": model, "prompt": PROMPT, "max_tokens_to_sample": 20, **extra}
    return httpx.post(f"{url}/v1/complete", json=body, headers=VERSION, timeout=30)


def models_state(url: str) -> dict[str, str]:
    return dict(httpx.get(f"{url}/health").json()["models"])


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def metric(url: str, line_start: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no metric {line_start}")


@pytest.fixture
def base() -> ServedModel:
    """The configured (default) model, kept loaded for ever as configured ones are."""
    return fake_model(name="base")


@contextmanager
def serve(models_dir: Path, table: list[ServedModel], factory: Factory, **overrides: object) -> Iterator[str]:
    app = create_app(settings(models_dir=models_dir, **overrides), table, factory)
    with serve_app(app) as url:
        yield url


def test_name_rule() -> None:
    assert model_name("Qwen2.5 0.5B Instruct.Q4_K_M.gguf") == "qwen2.5-0.5b-instruct.q4_k_m"
    assert model_name("gemma-3-270m.GGUF") == "gemma-3-270m"


@pytest.mark.parametrize(("files", "clash"), [(("A.gguf", "a.gguf"), "file A.gguf"), (("Base.gguf",), "configured")])
def test_names_that_collide_are_a_start_up_error(
    tmp_path: Path, base: ServedModel, files: tuple[str, ...], clash: str
) -> None:
    with pytest.raises(ConfigError, match=clash):
        create_app(settings(models_dir=folder(tmp_path, *files)), [base], Factory())


def test_first_request_loads_the_model_and_listings_show_it(
    tmp_path: Path, base: ServedModel, capsys: pytest.CaptureFixture[str]
) -> None:
    factory = Factory(load_delay=0.3)
    with serve(folder(tmp_path, "a.gguf", "notes.txt"), [base], factory) as url:
        assert models_state(url) == {"base": "ready", "a": "unloaded"}
        listed = httpx.get(f"{url}/v1/models/a", headers=VERSION).json()
        assert (listed["loaded"], listed["format"], listed["file"]) == (False, "gguf", "a.gguf")
        assert listed["size_bytes"] == len(FAKE_GGUF)
        assert factory.builds["a"] == 0

        body = {"model": "a", "prompt": PROMPT, "max_tokens_to_sample": 20, "stream": True}
        with httpx.stream("POST", f"{url}/v1/complete", headers=VERSION, timeout=30, json=body) as response:
            assert response.status_code == 200  # sent once the model had loaded
            frames = [json.loads(line[5:]) for line in response.iter_lines() if line.startswith("data:")]
        assert "".join(frame["completion"] for frame in frames) == " I am a." and len(frames) >= 3
        assert models_state(url)["a"] == "ready"
        assert httpx.get(f"{url}/v1/models/a", headers=VERSION).json()["loaded"] is True
        assert metric(url, 'tcserve_model_loads_total{model="a"}') == 1
        assert metric(url, 'tcserve_model_load_seconds_total{model="a"}') > 0
        assert metric(url, 'tcserve_model_loaded{model="a"}') == 1

        assert main(["models", "--base-url", url]) == 0
        rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()}
        assert rows["a"] == ["a", "yes", "gguf", "0.0", "MiB", "a.gguf"]
        assert rows["base"][:3] == ["base", "yes", "fake"]


def test_an_idle_model_is_unloaded_after_keep_alive_and_loads_again(tmp_path: Path, base: ServedModel) -> None:
    factory = Factory()
    with serve(folder(tmp_path, "a.gguf"), [base], factory, keep_alive=0.3) as url:
        assert complete(url, "a").status_code == 200
        wait_for(lambda: models_state(url)["a"] == "unloaded", "the idle unload")
        assert metric(url, 'tcserve_model_unloads_total{model="a",reason="idle"}') == 1
        assert metric(url, 'tcserve_model_loaded{model="a"}') == 0
        assert models_state(url)["base"] == "ready"  # configured: kept for ever
        assert complete(url, "a").json()["completion"] == " I am a."
        assert factory.builds["a"] == 2


def test_a_model_is_not_unloaded_while_it_streams(tmp_path: Path, base: ServedModel) -> None:
    factory = Factory(token_delay=0.2)
    with serve(folder(tmp_path, "a.gguf"), [base], factory, keep_alive=0) as url:
        body = {"model": "a", "prompt": PROMPT, "max_tokens_to_sample": 20, "stream": True}
        with httpx.stream("POST", f"{url}/v1/complete", headers=VERSION, json=body, timeout=30) as response:
            lines = [line for line in response.iter_lines() if line.startswith("data:")]
        assert '"stop_reason":"stop_sequence"' in lines[-1]  # it ran to its end
        wait_for(lambda: models_state(url)["a"] == "unloaded", "the unload once idle (keep_alive 0)")


def test_the_least_recently_used_idle_model_makes_room(tmp_path: Path) -> None:
    table: list[ServedModel] = [fake_model(name="base", keep_alive=60)]  # not kept for ever: it may go too
    factory = Factory()
    with serve(folder(tmp_path, "a.gguf", "b.gguf"), table, factory, max_loaded_models=2) as url:
        assert complete(url, "a").status_code == 200
        assert complete(url, "base").status_code == 200  # base is now more recent than a
        assert complete(url, "b").status_code == 200
        assert models_state(url) == {"base": "ready", "a": "unloaded", "b": "ready"}
        assert metric(url, 'tcserve_model_unloads_total{model="a",reason="evicted"}') == 1
        assert complete(url, "a").status_code == 200  # base is the least recently used now
        assert models_state(url) == {"base": "unloaded", "a": "ready", "b": "ready"}


def test_a_budget_of_one_model(tmp_path: Path) -> None:
    table: list[ServedModel] = [fake_model(name="base", keep_alive=60)]
    factory = Factory()
    with serve(folder(tmp_path, "a.gguf", "b.gguf"), table, factory, max_loaded_models=1) as url:
        for model in ("a", "b", "a", "base"):
            assert complete(url, model).status_code == 200
            assert [name for name, state in models_state(url).items() if state != "unloaded"] == [model]
        assert factory.builds == {"base": 2, "a": 2, "b": 1}


def test_a_model_that_cannot_fit_gets_a_clear_error(tmp_path: Path, base: ServedModel) -> None:
    with serve(folder(tmp_path, "a.gguf"), [base], Factory(), max_loaded_models=1) as url:
        refused = complete(url, "a")
        assert refused.status_code == 500
        assert refused.json()["error"] == {
            "type": "api_error",
            "message": "model a cannot be loaded: --max-loaded-models 1 is taken by models kept loaded for ever (base)",
        }
        assert complete(url, "base").status_code == 200


def test_busy_models_are_not_unloaded_to_make_room(tmp_path: Path) -> None:
    table: list[ServedModel] = [fake_model(name="base", keep_alive=60, reply=" tick" * 500, token_delay=0.02)]
    with serve(folder(tmp_path, "a.gguf"), table, Factory(), max_loaded_models=1) as url:
        body = {"model": "base", "prompt": PROMPT, "max_tokens_to_sample": 500, "stream": True}
        with httpx.stream("POST", f"{url}/v1/complete", headers=VERSION, json=body, timeout=30) as holder:
            lines = holder.iter_lines()  # kept: dropping it would close the connection
            assert next(lines).startswith("event: completion")
            refused = complete(url, "a")
        assert refused.status_code == 529
        assert refused.json()["error"]["type"] == "overloaded_error"
        assert "No room to load model a" in refused.json()["error"]["message"]
        assert int(refused.headers["retry-after"]) >= 1


def test_concurrent_first_requests_load_once(tmp_path: Path, base: ServedModel) -> None:
    factory = Factory(load_delay=0.5)
    with serve(folder(tmp_path, "a.gguf"), [base], factory) as url:
        results: list[int] = []
        threads = [threading.Thread(target=lambda: results.append(complete(url, "a").status_code)) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert results == [200] * 8
        assert factory.builds["a"] == 1
        assert metric(url, 'tcserve_model_loads_total{model="a"}') == 1


def test_a_load_longer_than_the_bound_is_529_while_it_goes_on(tmp_path: Path, base: ServedModel) -> None:
    factory = Factory(load_delay=1.0)
    with serve(folder(tmp_path, "a.gguf"), [base], factory, load_timeout=0.1) as url:
        refused = complete(url, "a")
        assert refused.status_code == 529
        assert refused.json()["error"]["message"] == "The model a is still loading"
        assert int(refused.headers["retry-after"]) >= 1
        wait_for(lambda: models_state(url)["a"] == "ready", "the load to finish in the background")
        assert complete(url, "a").status_code == 200
        assert factory.builds["a"] == 1


def test_a_file_added_at_run_time_is_served_from_the_next_request(tmp_path: Path, base: ServedModel) -> None:
    models = folder(tmp_path, "a.gguf")
    with serve(models, [base], Factory()) as url:
        assert complete(url, "later").status_code == 404
        (models / "Later.gguf").write_bytes(FAKE_GGUF)
        assert complete(url, "later").json()["completion"] == " I am later."
        ids = [m["id"] for m in httpx.get(f"{url}/v1/models", headers=VERSION, params={"limit": 100}).json()["data"]]
        assert "later" in ids


def test_a_broken_gguf_is_a_clear_error_and_the_others_keep_serving(tmp_path: Path, base: ServedModel) -> None:
    models = folder(tmp_path, "a.gguf")
    (models / "broken.gguf").write_bytes(b"this is not a GGUF file")
    with serve(models, [base], Factory()) as url:
        refused = complete(url, "broken")
        assert refused.status_code == 500
        assert refused.json()["error"] == {
            "type": "api_error",
            "message": "model broken failed to load; see the server log",
        }
        assert complete(url, "a").json()["completion"] == " I am a."
        assert complete(url, "base").status_code == 200
        health = httpx.get(f"{url}/health")
        assert health.status_code == 200  # a folder model does not make the server unhealthy
        assert health.json()["models"] == {"base": "ready", "a": "ready", "broken": "failed"}
