"""``--model_alias``: the OpenAI routes answer to other names too, as KServe's LLMInferenceService needs (its routes
and scheduler name the model ``publishers/<namespace>/models/<name>``, as vLLM's extra ``--served-model-name``)."""

from __future__ import annotations

import httpx
import openai
import pytest

from predictor.api.model import FalconModel
from predictor.config import parse_config

ALIAS = "publishers/falcon/models/tiny-falcon"


def test_aliases_are_parsed_in_order_without_repeats(tmp_path):
    config = parse_config(["--model_dir", str(tmp_path), "--model_name", "falcon-7b", "--model_alias", "b",
                           "--model_alias", "a", "--model_alias", "b"])
    assert config.model_aliases == ("b", "a")
    assert parse_config(["--model_dir", str(tmp_path), "--model_name", "falcon-7b"]).model_aliases == ()


def test_an_empty_alias_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="--model_alias"):
        parse_config(["--model_dir", str(tmp_path), "--model_name", "falcon-7b", "--model_alias", " "])


def test_the_model_serves_its_name_and_its_aliases_only(tmp_path):
    model = FalconModel(parse_config(["--model_dir", str(tmp_path), "--model_name", "falcon-7b",
                                      "--model_alias", "publishers/ns/models/falcon-7b"]))
    assert model.serves("falcon-7b") and model.serves("publishers/ns/models/falcon-7b")
    assert not model.serves("publishers/other/models/falcon-7b") and not model.serves("falcon-40b")


def test_an_alias_means_the_base_model_and_no_adapter_may_take_it(tmp_path):
    flags = ["--model_dir", str(tmp_path), "--model_name", "falcon-7b", "--model_alias", "fine"]
    model = FalconModel(parse_config(flags))
    assert model.is_base("fine") and model.adapter_for("fine") is None
    with pytest.raises(SystemExit, match="the name fine is already served"):
        parse_config([*flags, "--lora_modules", f"fine={tmp_path}"])


@pytest.fixture(scope="module")
def aliased(start_server, tiny_dir):
    return start_server(tiny_dir, "--model_alias", ALIAS)


@pytest.mark.parametrize("base", ["/v1", "/openai/v1"])
def test_completions_and_chat_answer_the_alias(aliased, base):
    client = openai.OpenAI(base_url=f"{aliased.url}{base}", api_key="-", max_retries=0, timeout=60)
    completion = client.completions.create(model=ALIAS, prompt="Falcons", max_tokens=3, temperature=0)
    assert completion.usage.completion_tokens == 3
    assert completion.model == aliased.model_name  # answers name the model, as vLLM's name its first served name
    chat = client.chat.completions.create(model=ALIAS, max_tokens=3, temperature=0,
                                          messages=[{"role": "user", "content": "Hi"}])
    assert chat.choices[0].finish_reason == "length"
    by_name = client.completions.create(model=aliased.model_name, prompt="Falcons", max_tokens=3, temperature=0)
    assert by_name.choices[0].text == completion.choices[0].text


def test_another_namespace_is_still_unknown(aliased):
    client = openai.OpenAI(base_url=f"{aliased.url}/v1", api_key="-", max_retries=0, timeout=60)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="publishers/other/models/tiny-falcon", prompt="Falcons", max_tokens=3)


def test_models_list_and_tokenizer_know_the_alias(aliased):
    listed = httpx.get(f"{aliased.url}/v1/models", timeout=30).json()
    assert [card["id"] for card in listed["data"]] == [aliased.model_name, ALIAS]
    assert listed["models"] == [aliased.model_name]
    tokens = httpx.post(f"{aliased.url}/tokenize", json={"model": ALIAS, "prompt": "Falcons"}, timeout=30)
    assert tokens.status_code == 200 and tokens.json()["count"] > 0


def test_without_the_flag_the_alias_is_unknown(tiny_server):
    response = httpx.post(f"{tiny_server.url}/v1/completions", json={"model": ALIAS, "prompt": "x", "max_tokens": 1},
                          timeout=30)
    assert response.status_code == 404 and response.json()["error"]["param"] == "model"
