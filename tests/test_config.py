from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from tcserve.cli.flags import add_settings_flags, given_settings
from tcserve.config import ConfigError, FakeModel, LlamaCppModel, Settings, load_models
from tcserve.engines.factory import build_engine
from tcserve.engines.llamacpp.engine import LlamaCppEngine


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tcserve.toml"
    path.write_text(text)
    return path


def test_no_config_serves_the_packaged_model() -> None:
    (model,) = load_models(Settings())
    assert isinstance(model, LlamaCppModel)
    assert model.path is None and model.context_size == 8192 and model.check_transcript


def test_flags_apply_to_the_first_model(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    (model,) = load_models(Settings(model_path=gguf, ctx_size=1024, threads=3, prefill_budget=128))
    assert isinstance(model, LlamaCppModel)
    assert (model.path, model.context_size, model.threads, model.prefill_budget) == (gguf, 1024, 3, 128)


def test_table_with_two_models(tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "base.gguf").write_bytes(b"GGUF")
    config = write(
        tmp_path,
        """
[[models]]
name = "base"
path = "weights/base.gguf"
context_size = 4096
threads = 2
display_name = "My base model"
aliases = ["claude-2.1"]
check_transcript = false

[[models]]
name = "scripted"
engine = "fake"
reply = " hi"
""",
    )
    first, second = load_models(Settings(config=config))
    assert isinstance(first, LlamaCppModel) and isinstance(second, FakeModel)
    assert first.path == tmp_path / "weights" / "base.gguf"  # relative to the config file
    assert (first.context_size, first.threads, first.display_name) == (4096, 2, "My base model")
    assert first.aliases == ("claude-2.1",) and first.check_transcript is False
    assert second.reply == " hi"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[models]]\nname = 'a'\nengine = 'fake'\n[[models]]\nname = 'a'\nengine = 'fake'", "declared twice"),
        ("[[models]]\nname = 'a'\nengine = 'fake'\naliases = ['a']", "declared twice"),
        ("[[models]]\nname = 'a'\npath = 'missing.gguf'", "no such GGUF file"),
        ("[[models]]\nname = 'a'\ncontext_size = 'big'", "models.0.llamacpp.context_size"),
        ("[[models]]\nname = 'a'\nengine = 'gpu'", "models.0"),
        ("[[models]]\nname = 'a'\nengine = 'fake'\ncolour = 'red'", "colour"),
        ("models = []", "models"),
        ("this is not toml", "not valid TOML"),
    ],
)
def test_bad_config_files_say_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_models(Settings(config=write(tmp_path, text)))
    assert message in str(caught.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_models(Settings(config=tmp_path / "nope.toml"))


def test_api_keys_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TCSERVE_API_KEYS", "k1, k2,,")
    monkeypatch.setenv("TCSERVE_PORT", "9000")
    settings = Settings()
    assert settings.api_keys == ("k1", "k2") and settings.port == 9000
    assert Settings(api_keys=("flag",)).api_keys == ("flag",)  # flags win over the environment


@pytest.mark.parametrize(("argv", "speculative"), [([], True), (["--no-speculative"], False)])
def test_no_speculative_turns_speculation_off_for_the_default_model(argv: list[str], speculative: bool) -> None:
    parser = argparse.ArgumentParser()
    add_settings_flags(parser)
    (model,) = load_models(Settings(**given_settings(parser.parse_args(argv))))
    assert isinstance(model, LlamaCppModel) and model.speculative is speculative
    engine = build_engine(model)
    assert isinstance(engine, LlamaCppEngine) and engine._settings.speculative is speculative
