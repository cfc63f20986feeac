"""A merged export goes with its checkpoint: deleting the checkpoint (`tinker checkpoint delete`, the
REST DELETE) or its TTL running out removes the export folder and its `GET /api/v1/exports` entry, and
leaves every other checkpoint's export alone. An export being written is never broken: a DELETE meanwhile
is a 409 naming the checkpoint, and the TTL sweep waits for it."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import requests
import tinker
from tinker import types

from src.api import export as export_route
from src.export import EXPORTS_IN_PROGRESS

from .conftest import API_KEY, OTHER_KEY
from .test_export import export


@pytest.fixture(scope="module")
def checkpoints(service_client, server) -> dict[str, str]:
    """Sampler checkpoints of one run trained a step, by name."""
    trainer = service_client.create_lora_training_client(base_model=server.worker.base_model, rank=4, seed=5).result()
    tokens = [1, 40, 41, 97, 12, 300, 5]
    datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})
    trainer.forward_backward([datum], "cross_entropy").result()
    trainer.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    names = ("deleted", "kept", "expiring", "busy", "busy-expiring")
    return {name: trainer.save_weights_for_sampler(f"cleanup-{name}").result().path for name in names}


def exported(server, path: str) -> Path:
    answer = export(server.url, {"path": path})
    assert answer.status_code == 200, answer.text
    folder = Path(answer.json()["directory"])
    assert folder.is_dir()
    return folder


def listed(server, key: str = API_KEY) -> dict[str, str]:
    answer = requests.get(f"{server.url}/api/v1/exports", headers={"X-API-Key": key}, timeout=30)
    assert answer.status_code == 200, answer.text
    return {entry["path"]: entry["directory"] for entry in answer.json()["exports"]}


def delete(server, path: str) -> requests.Response:
    model_id, segment, name = path.removeprefix("tinker://").split("/")
    return requests.delete(f"{server.url}/api/v1/training_runs/{model_id}/checkpoints/{segment}/{name}",
                           headers={"X-API-Key": API_KEY}, timeout=60)


def hidden_leftovers(server) -> list[Path]:
    """Staging or removed folders under the checkpoints and exports (none once a removal is done)."""
    return [p for root in ("checkpoints", "exports") for p in (server.state_dir / root).glob("*/*/.*")]


def test_delete_removes_the_export_and_its_listing_entry_and_nothing_else(server, checkpoints):
    gone, kept = exported(server, checkpoints["deleted"]), exported(server, checkpoints["kept"])
    before = listed(server)
    assert before[checkpoints["deleted"]] == str(gone) and before[checkpoints["kept"]] == str(kept)
    assert checkpoints["deleted"] not in listed(server, OTHER_KEY)  # another key's export is not listed

    rest = tinker.RestClient(base_url=server.url, api_key=API_KEY)
    rest.delete_checkpoint_from_tinker_path(checkpoints["deleted"]).result()  # what `tinker checkpoint delete` sends

    assert not gone.exists()
    assert server.worker.store.get_checkpoint(checkpoints["deleted"]) is None
    after = listed(server)
    assert checkpoints["deleted"] not in after
    assert after[checkpoints["kept"]] == str(kept) and (kept / "config.json").is_file()
    assert not hidden_leftovers(server)


def test_ttl_expiry_removes_the_export_too(server, checkpoints):
    expiring, kept = exported(server, checkpoints["expiring"]), exported(server, checkpoints["kept"])
    server.worker.store.set_checkpoint_expiry(checkpoints["expiring"], time.time() - 1)  # its hour has passed

    assert server.worker.checkpoints.remove_expired() >= 1  # the sweep the timer runs

    assert not expiring.exists()
    assert server.worker.store.get_checkpoint(checkpoints["expiring"]) is None
    assert checkpoints["expiring"] not in listed(server)
    assert listed(server)[checkpoints["kept"]] == str(kept) and (kept / "config.json").is_file()
    assert not hidden_leftovers(server)


def exporting_in_background(server, path: str) -> tuple[threading.Thread, dict]:
    """Start an export of `path` while another merge holds the one-at-a-time lock (the caller holds it):
    the export is then in progress, queued, until the caller lets go."""
    answer: dict = {}
    thread = threading.Thread(target=lambda: answer.update(response=export(server.url, {"path": path})))
    thread.start()
    folder = server.state_dir / "exports" / Path(path.removeprefix("tinker://"))
    deadline = time.monotonic() + 60
    while not EXPORTS_IN_PROGRESS.is_writing(folder):
        assert time.monotonic() < deadline and thread.is_alive(), answer
        time.sleep(0.01)
    return thread, answer


def test_delete_while_its_export_is_written_is_a_409_naming_it(server, checkpoints):
    path = checkpoints["busy"]
    with export_route._one_at_a_time:
        thread, answer = exporting_in_background(server, path)
        refused = delete(server, path)
        assert refused.status_code == 409, refused.text
        assert path in refused.json()["error"] and refused.json()["field"] == "checkpoint_id"
    thread.join(120)
    assert answer["response"].status_code == 200, answer["response"].text  # the export was not broken
    folder = Path(answer["response"].json()["directory"])
    assert folder.is_dir() and server.worker.store.get_checkpoint(path) is not None

    assert delete(server, path).status_code == 204  # once it has finished
    assert not folder.exists() and path not in listed(server)


def test_the_ttl_sweep_waits_for_an_export_being_written_then_removes_both(server, checkpoints):
    path = checkpoints["busy-expiring"]
    with export_route._one_at_a_time:
        thread, answer = exporting_in_background(server, path)
        server.worker.store.set_checkpoint_expiry(path, time.time() - 1)
        sweep = threading.Thread(target=server.worker.checkpoints.remove_expired)
        sweep.start()
        sweep.join(2)
        assert sweep.is_alive()  # held by the export, which has not merged yet
    thread.join(120)
    sweep.join(60)
    assert answer["response"].status_code == 200, answer["response"].text
    assert not sweep.is_alive()
    assert not Path(answer["response"].json()["directory"]).exists()
    assert server.worker.store.get_checkpoint(path) is None and path not in listed(server)
    assert not hidden_leftovers(server)
