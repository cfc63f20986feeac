"""`/v1/completions` with a list of prompts: every prompt reaches the sampler at once (each is a sampling
operation of the worker's pool, as an `/api/v1/asample` is), and the choices come back in prompt order,
each equal to what that prompt alone gives. The worker's own timestamps of those operations show them
overlapping; a bad prompt fails the whole request with one error before anything is sampled."""

from __future__ import annotations

import json
import sqlite3
import time

import openai
import pytest
import requests

from src.api.openai_compat import OPENAI_SAMPLE_OP

from .conftest import API_KEY
from .test_openai_api import assert_joins_to

PROMPTS = ["The cat", "Once upon a time there was", "A", "Numbers: 1 2 3 4 5 6"]
MAX_TOKENS = 48


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def greedy(server, prompt, n: int = 1, **extra):
    return client(server).completions.create(model=server.worker.base_model, prompt=prompt, max_tokens=MAX_TOKENS,
                                             temperature=0, n=n, extra_body={"return_token_ids": True, **extra})


def sample_operations(server, since: float, until: float) -> list[dict]:
    """The worker's records of the OpenAI prompts it sampled between `since` and `until` (its store)."""
    with sqlite3.connect(f"file:{server.worker.config.database_path}?mode=ro", uri=True) as db:
        db.row_factory = sqlite3.Row
        rows = db.execute("SELECT status, created_at, started_at, finished_at FROM futures "
                          "WHERE op=? AND created_at BETWEEN ? AND ? ORDER BY created_at",
                          (OPENAI_SAMPLE_OP, since, until)).fetchall()
    return [dict(r) for r in rows]


def test_a_list_of_prompts_answers_in_order_each_as_it_would_alone_sampled_together(server):
    since = time.time()
    batch = greedy(server, PROMPTS, n=2)
    until = time.time()

    assert [c.index for c in batch.choices] == list(range(2 * len(PROMPTS)))
    for position, prompt in enumerate(PROMPTS):
        alone = greedy(server, prompt).choices[0]
        for sample in range(2):
            choice = batch.choices[2 * position + sample]
            assert choice.model_extra["prompt_token_ids"] == alone.model_extra["prompt_token_ids"]
            assert choice.model_extra["token_ids"] == alone.model_extra["token_ids"]
            assert choice.text == alone.text and choice.finish_reason == alone.finish_reason
    assert batch.usage.completion_tokens == sum(len(c.model_extra["token_ids"]) for c in batch.choices)

    operations = sample_operations(server, since, until)
    assert len(operations) == len(PROMPTS) and all(op["status"] == "done" for op in operations)
    # Together: every prompt had started at the sampler before the first one finished (one after
    # another, the second would start only after the first had finished).
    assert max(op["started_at"] for op in operations) < min(op["finished_at"] for op in operations), operations


def test_a_streamed_list_of_prompts_joins_to_the_whole_answer(server):
    whole = greedy(server, PROMPTS)
    chunks = client(server).completions.create(model=server.worker.base_model, prompt=PROMPTS, stream=True,
                                               max_tokens=MAX_TOKENS, temperature=0)
    assert_joins_to(list(chunks), whole)


@pytest.mark.parametrize("stream", [False, True])
def test_one_bad_prompt_is_one_error_for_the_request_and_nothing_is_sampled(server, stream):
    prompts = [[1, 40, 41], [2, 50], [3, 10 ** 9]]  # the third names a token outside the vocabulary
    since = time.time()
    answer = requests.post(f"{server.url}/v1/completions", timeout=120, headers={"Authorization": f"Bearer {API_KEY}"},
                           json={"model": server.worker.base_model, "prompt": prompts, "max_tokens": 4,
                                 "stream": stream})
    assert answer.status_code == 400, answer.text
    error = json.loads(answer.text)["error"]
    assert error["param"] == "prompt" and str(10 ** 9) in error["message"]
    assert sample_operations(server, since, time.time()) == []  # refused before any prompt was sampled
