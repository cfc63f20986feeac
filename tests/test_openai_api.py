"""The OpenAI-compatible endpoints (`/v1/models`, `/v1/completions`, `/v1/chat/completions`), driven by the
official `openai` client against a real worker on loopback, serving an adapter trained through the tinker SDK.

The tiny model has no chat template, so a copy of it with one serves chat; the shared `server` (the
original tiny model) checks that chat without a template is refused."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass

import openai
import pytest
import requests
import tinker
from tinker import types
from transformers import AutoTokenizer

from src.backends import SampledSequence
from src.openai_wire import ChoiceText

from .conftest import ADMIN_KEY, API_KEY, OTHER_KEY, free_port, serving

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'tool' %}{{ raise_exception('tool messages are not supported') }}{% endif %}"
    "{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
PROMPT = "The cat"
MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "The cat"}]


@dataclass
class Served:
    url: str
    base_model: str
    tokenizer: object
    path: str  # tinker:// path of the trained adapter's sampler checkpoint
    model_id: str
    sampler: tinker.SamplingClient  # the Tinker API's sampling client for the same adapter


@pytest.fixture(scope="module")
def chat_model_path(tiny_model_path, tmp_path_factory):
    """A copy of the tiny model folder with a simple chat template."""
    path = tmp_path_factory.mktemp("chat-model") / "tiny-chat"
    shutil.copytree(tiny_model_path, path)
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return path


@pytest.fixture(scope="module")
def served(chat_model_path, tmp_path_factory) -> Iterator[Served]:
    """A real worker (HF sampler) on the chat model, and an adapter trained a few steps through the SDK."""
    from src.app import create_app
    from src.config import Config
    from src.worker import Worker

    config = Config(base_model=str(chat_model_path), state_dir=tmp_path_factory.mktemp("oai-state"),
                    api_keys=(API_KEY, OTHER_KEY), admin_keys=(ADMIN_KEY,), port=free_port(), retrieve_wait_s=5.0,
                    threads=16)
    worker = Worker.from_config(config)
    tokenizer = AutoTokenizer.from_pretrained(chat_model_path)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    with serving(create_app(config, worker), config) as url, \
            tinker.ServiceClient(base_url=url, api_key=API_KEY) as service:
        tc = service.create_lora_training_client(base_model=worker.base_model, rank=8, seed=0).result()
        prompt, answer = tokenizer.encode(PROMPT), tokenizer.encode(" sat on the mat.") + [tokenizer.eos_token_id]
        tokens = prompt + answer
        datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                            loss_fn_inputs={"target_tokens": tokens[1:],
                                            "weights": [0.0] * (len(prompt) - 1) + [1.0] * len(answer)})
        for _ in range(4):
            tc.forward_backward([datum], "cross_entropy").result()
            tc.optim_step(types.AdamParams(learning_rate=5e-2)).result()
        path = tc.save_weights_for_sampler("oai").result().path
        yield Served(url, worker.base_model, tokenizer, path, tc.model_id,
                     service.create_sampling_client(model_path=path).result())
    worker.close()


def client(served: Served, key: str = API_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key=key, max_retries=0, timeout=120)


def tinker_greedy(served: Served, prompt: list[int], max_tokens: int) -> types.SampledSequence:
    params = types.SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return served.sampler.sample(types.ModelInput.from_ints(prompt), 1, params).result().sequences[0]


def raw_post(served: Served, path: str, body: dict | str, key: str = API_KEY) -> requests.Response:
    data = body if isinstance(body, str) else json.dumps(body)
    return requests.post(f"{served.url}/v1/{path}", data=data, timeout=120,
                         headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})


def error_of(resp: requests.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


# ---------------------------------------------------------------------------- models


def test_models_list_the_base_model_and_the_keys_own_adapters(served):
    mine = {m.id: m for m in client(served).models.list().data}
    assert served.base_model in mine and served.path in mine
    adapter = mine[served.path]
    assert adapter.model_extra["alias"] == f"{served.model_id}/oai" and adapter.model_extra["parent"] == served.base_model
    others = [m.id for m in client(served, OTHER_KEY).models.list().data]
    assert others == [served.base_model]
    assert served.path in [m.id for m in client(served, ADMIN_KEY).models.list().data]


# ---------------------------------------------------------------------------- completions


def test_greedy_completion_equals_tinker_sampling_token_for_token(served):
    prompt = served.tokenizer.encode(PROMPT, add_special_tokens=True)
    expected = tinker_greedy(served, prompt, 12)
    base = client(served).completions.create(model=served.base_model, prompt=PROMPT, max_tokens=12, temperature=0,
                                             extra_body={"return_token_ids": True})
    for model in (served.path, f"{served.model_id}/oai", served.model_id):  # the path and its two short forms
        answer = client(served).completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0,
                                                   logprobs=3, extra_body={"return_token_ids": True})
        choice = answer.choices[0]
        assert answer.object == "text_completion" and answer.model == model
        assert choice.model_extra["token_ids"] == list(expected.tokens)
        assert choice.model_extra["prompt_token_ids"] == prompt
        assert choice.text == served.tokenizer.decode(expected.tokens, skip_special_tokens=True)
        assert choice.logprobs.token_logprobs == pytest.approx(list(expected.logprobs), abs=1e-4)
        for token, logprob, top in zip(choice.logprobs.tokens, choice.logprobs.token_logprobs,
                                       choice.logprobs.top_logprobs):
            assert top[token] == pytest.approx(logprob, abs=1e-5), "the chosen token is among the top ones"
            assert max(top.values()) == pytest.approx(logprob, abs=1e-5)  # greedy: the argmax
            assert len(top) <= 3, "logprobs=3 (fewer only where two ids decode to one string)"
        assert answer.usage.prompt_tokens == len(prompt) and answer.usage.completion_tokens == len(expected.tokens)
    assert base.choices[0].model_extra["token_ids"] != choice.model_extra["token_ids"]  # the adapter is applied
    as_ids = client(served).completions.create(model=served.path, prompt=prompt, max_tokens=12, temperature=0)
    assert as_ids.choices[0].text == choice.text  # a prompt of token ids is sampled as it is


def assert_joins_to(chunks, whole) -> None:
    """Streamed completion chunks, joined per choice index, give the whole answer's texts and finish reasons."""
    texts, finish = {}, {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    assert texts == {c.index: c.text for c in whole.choices}
    assert finish == {c.index: c.finish_reason for c in whole.choices}


def test_streamed_completion_concatenates_to_the_whole_one(served):
    kwargs = dict(model=served.path, prompt=[PROMPT, "One two"], max_tokens=10, temperature=1.0, seed=7, n=2)
    whole = client(served).completions.create(**kwargs)
    assert [c.index for c in whole.choices] == [0, 1, 2, 3]  # prompt-major, as OpenAI numbers them
    assert all(c.text for c in whole.choices)
    chunks = list(client(served).completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert all(chunk.usage is None and chunk.object == "text_completion" for chunk in chunks[:-1])
    assert_joins_to(chunks[:-1], whole)
    assert len(chunks) > 5  # token by token, not one piece per choice
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_stop_strings_end_the_text_before_them(served):
    plain = client(served).completions.create(model=served.path, prompt="One two", max_tokens=24, temperature=0,
                                              logprobs=0).choices[0]
    text, pieces = plain.text, plain.logprobs.tokens
    # A stop string across a token boundary: streaming must hold back the first token's tail until it knows.
    spans = [(pieces[i][-2:] + pieces[i + 1][:2], plain.logprobs.text_offset[i + 1] - 2)
             for i in range(len(pieces) - 1) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2]
    stop, at = next((s, at) for s, at in spans if "\ufffd" not in s and text.index(s) == at)
    kwargs = dict(model=served.path, prompt="One two", max_tokens=24, temperature=0, stop=[stop, "@@never@@"])
    cut = client(served).completions.create(**kwargs).choices[0]
    assert cut.text == text[:at] and cut.finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client(served).completions.create(**kwargs, stream=True))
    assert streamed == cut.text


def test_choice_text_releases_only_what_cannot_change(served):
    """Token by token: no partial UTF-8 character, nothing that may still become a stop string."""
    tokenizer = served.tokenizer
    tokens = tokenizer.encode("one two é three four")

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    for stop, final in [((), "one two é three four"), (("wo é t", "four"), "one t"), (("é",), "one two "),
                        (("xyz", "four"), "one two é three ")]:
        text, released = ChoiceText(decode, stop), ""
        for token in tokens:
            piece = text.add([token], [-1.0])
            released += piece.text if piece else ""
            assert final.startswith(released) and "\ufffd" not in released, (stop, released)
        rest = text.finish(SampledSequence(tokens, [-1.0] * len(tokens), "length"))
        assert released + rest.text == final and text.text == final
        assert text.finish_reason(SampledSequence(tokens, [], "length")) == ("stop" if stop else "length")


def test_top_logprobs_while_streaming_come_with_each_whole_choice(served):
    kwargs = dict(model=served.path, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2)
    whole = client(served).completions.create(**kwargs).choices[0]
    chunks = [c for c in client(served).completions.create(**kwargs, stream=True) if c.choices]
    assert len(chunks) == 1 and chunks[0].choices[0].text == whole.text
    assert chunks[0].choices[0].logprobs.tokens == whole.logprobs.tokens


# ---------------------------------------------------------------------------- chat


def test_greedy_chat_equals_tinker_sampling_on_the_templated_prompt(served):
    text = served.tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text.endswith("user: The cat\nassistant:")
    prompt = served.tokenizer.encode(text, add_special_tokens=False)
    expected = tinker_greedy(served, prompt, 10)
    answer = client(served).chat.completions.create(model=served.path, messages=MESSAGES, max_tokens=10,
                                                    temperature=0, logprobs=True, top_logprobs=2,
                                                    extra_body={"return_token_ids": True})
    choice = answer.choices[0]
    assert answer.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.model_extra["token_ids"] == list(expected.tokens)
    assert choice.message.content == served.tokenizer.decode(expected.tokens, skip_special_tokens=True)
    assert [e.logprob for e in choice.logprobs.content] == pytest.approx(list(expected.logprobs), abs=1e-4)
    assert all(1 <= len(e.top_logprobs) <= 2 for e in choice.logprobs.content)
    assert answer.usage.prompt_tokens == len(prompt)


def test_streamed_chat_concatenates_to_the_whole_answer(served):
    kwargs = dict(model=served.path, messages=MESSAGES, max_completion_tokens=12, temperature=1.0, seed=3, n=2)
    whole = client(served).chat.completions.create(**kwargs)
    chunks = list(client(served).chat.completions.create(**kwargs, stream=True,
                                                         stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert [c.delta.role for c in chunks[0].choices] == ["assistant", "assistant"]
    texts: dict[int, str] = {}
    for chunk in chunks[:-1]:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert chunks[-1].usage == whole.usage and chunks[-1].usage.completion_tokens > 0


def test_chat_without_a_chat_template_is_refused(server):
    resp = requests.post(f"{server.url}/v1/chat/completions", timeout=60, headers={"X-API-Key": API_KEY},
                         json={"model": server.worker.base_model, "messages": MESSAGES})
    error = error_of(resp, 400)
    assert error["param"] == "model" and "no chat template" in error["message"]


# ---------------------------------------------------------------------------- keys and errors


def test_keys_come_as_bearer_or_x_api_key_and_a_bad_one_is_401(served):
    body = {"model": served.base_model, "prompt": "hi", "max_tokens": 2}
    resp = requests.post(f"{served.url}/v1/completions", json=body, headers={"X-API-Key": API_KEY}, timeout=60)
    assert resp.status_code == 200, resp.text
    with pytest.raises(openai.AuthenticationError) as failed:
        client(served, "not-a-key").completions.create(**body)
    assert failed.value.code == "invalid_api_key"
    error_of(requests.get(f"{served.url}/v1/models", timeout=30), 401)


def test_unknown_model_and_another_keys_adapter_are_404(served):
    for key, model in [(API_KEY, "gpt-4o"), (API_KEY, "no-such-run/oai"), (OTHER_KEY, served.path),
                       (OTHER_KEY, f"{served.model_id}/oai"), (OTHER_KEY, served.model_id)]:
        with pytest.raises(openai.NotFoundError) as failed:
            client(served, key).completions.create(model=model, prompt="hi", max_tokens=2)
        assert failed.value.param == "model" and failed.value.code == "model_not_found", (key, model)
    with pytest.raises(openai.NotFoundError):
        client(served, OTHER_KEY).chat.completions.create(model=served.path, messages=MESSAGES, stream=True)


@pytest.mark.parametrize("path, change, param", [
    ("chat/completions", {"messages": None}, "messages"),
    ("chat/completions", {"messages": []}, "messages"),
    ("chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ("chat/completions", {"messages": [{"role": "tool", "content": "42"}]}, "messages"),  # the template refuses
    ("chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("chat/completions", {"max_completion_tokens": 4, "max_tokens": 4}, "max_completion_tokens"),
    ("chat/completions", {"tools": [{"type": "function"}]}, "tools"),
    ("chat/completions", {"max_tokens": 10**6}, "max_tokens"),
    ("chat/completions", {"max_tokens": None, "max_completion_tokens": 10**6}, "max_completion_tokens"),
    ("chat/completions", {"logprobs": True, "top_logprobs": 500}, "top_logprobs"),
    ("completions", {"prompt": None}, "prompt"),
    ("completions", {"prompt": [1, "x"]}, "prompt"),
    ("completions", {"prompt": [10**9]}, "prompt"),
    ("completions", {"temperature": -1}, "temperature"),
    ("completions", {"temperature": "hot"}, "temperature"),
    ("completions", {"top_p": 0}, "top_p"),
    ("completions", {"n": 0}, "n"),
    ("completions", {"n": 5000}, "n"),
    ("completions", {"max_tokens": 0}, "max_tokens"),
    ("completions", {"max_tokens": 10**6}, "max_tokens"),
    ("completions", {"stop": ["x", ""]}, "stop"),
    ("completions", {"stop": 5}, "stop"),
    ("completions", {"logprobs": 500}, "logprobs"),
    ("completions", {"echo": True}, "echo"),
    ("completions", {"presence_penalty": 0.5}, "presence_penalty"),
    ("completions", {"stream_options": {"include_usage": True}}, "stream_options"),
    ("completions", {"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ("completions", {"model": 5}, "model"),
])
def test_bad_parameters_are_400_naming_the_field(served, path, change, param):
    body = {"model": served.path, "max_tokens": 4, **({"messages": MESSAGES} if path.startswith("chat") else
                                                      {"prompt": PROMPT})}
    body = {k: v for k, v in {**body, **change}.items() if v is not None}  # None: leave the field out
    assert error_of(raw_post(served, path, body), 400)["param"] == param


def test_bad_temperature_through_the_client(served):
    with pytest.raises(openai.BadRequestError) as failed:
        client(served).chat.completions.create(model=served.path, messages=MESSAGES, temperature=-0.5, stream=True)
    assert failed.value.param == "temperature" and failed.value.type == "invalid_request_error"


@pytest.mark.parametrize("body", ['{"model": "x", "prompt": ', "[1, 2]", ""])
def test_malformed_json_is_400(served, body):
    assert error_of(raw_post(served, "completions", body), 400)["param"] == "body"
