"""Plain-HTTP helpers for tests that drive a worker without the SDK (restarts, signals, faults)."""

from __future__ import annotations

import requests

from .conftest import API_KEY


def post(url: str, path: str, body: dict, key: str = API_KEY) -> dict:
    """POST a JSON body to `/api/v1/<path>`; the answer must be 200."""
    resp = requests.post(f"{url}/api/v1/{path}", json=body, headers={"X-API-Key": key}, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()


def get(url: str, path: str, key: str = API_KEY) -> dict:
    resp = requests.get(f"{url}/api/v1/{path}", headers={"X-API-Key": key}, timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.json()


def result(url: str, request_id: str, key: str = API_KEY, polls: int = 60) -> dict:
    """The future's final answer (a result or `{error, category}`), long-polling past `try_again`."""
    for _ in range(polls):
        answer = post(url, "retrieve_future", {"request_id": request_id}, key)
        if answer.get("type") != "try_again":
            return answer
    raise TimeoutError(request_id)
