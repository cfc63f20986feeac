"""`tinker checkpoint ...` (the official CLI, as a subprocess) against a real worker on loopback:
list, info, delete with its confirmation, set-ttl and expiry, publish/unpublish across two
API keys, download through signed links, and the errors of each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlencode, urlparse

import numpy as np
import pytest
import requests
import tinker
import torch
from safetensors.torch import load_file
from tinker import types

from src.auth import UrlSigner

from .conftest import API_KEY, OTHER_KEY, RunningServer, free_port, serving

TINKER = Path(sys.executable).parent / "tinker"
SECRET = "test-url-signing-secret"
TOKENS = [1, 17, 42, 99, 7, 230, 5, 64, 12, 301]


@pytest.fixture(scope="module")
def ckpt_server(tiny_model_path, tmp_path_factory):
    """A worker of its own: a fast expiry timer and a known signing secret (to forge links)."""
    from src.app import create_app
    from src.config import Config
    from src.worker import Worker

    state = tmp_path_factory.mktemp("checkpoint-state")
    config = Config(base_model=str(tiny_model_path), state_dir=state, api_keys=(API_KEY, OTHER_KEY),
                    port=free_port(), retrieve_wait_s=5.0, threads=32, checkpoint_sweep_s=0.5,
                    url_signing_secret=SECRET, max_adapters_per_key=64)
    worker = Worker.from_config(config)
    with serving(create_app(config, worker), config) as url:
        yield RunningServer(url=url, worker=worker, state_dir=state)
    worker.close()


@pytest.fixture(scope="module")
def mine(ckpt_server):
    client = tinker.ServiceClient(base_url=ckpt_server.url, api_key=API_KEY)
    yield client
    client.close("success").result()


@pytest.fixture(scope="module")
def theirs(ckpt_server):
    client = tinker.ServiceClient(base_url=ckpt_server.url, api_key=OTHER_KEY)
    yield client
    client.close("success").result()


def tinker_cli(url: str, *args: str, key: str = API_KEY, answer: str | None = None) -> subprocess.CompletedProcess:
    """Run `tinker <args>` against the worker at `url` as the holder of `key`; `answer` is typed at prompts."""
    env = {**os.environ, "TINKER_BASE_URL": url, "TINKER_API_KEY": key, "TINKER_TELEMETRY": "0"}
    return subprocess.run([str(TINKER), *args], env=env, input=answer, capture_output=True, text=True,
                          timeout=300)


def cli_json(server: RunningServer, *args: str, key: str = API_KEY) -> dict:
    done = tinker_cli(server.url, "--format", "json", *args, key=key)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


def cli_fails(server: RunningServer, *args: str, key: str = API_KEY) -> str:
    """Run a command that must fail; returns what it printed."""
    done = tinker_cli(server.url, *args, key=key)
    assert done.returncode != 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def not_found(output: str) -> bool:
    """What the CLI prints for a 404 (or for a checkpoint missing from its run's list)."""
    return "404" in output or "not found" in output.lower()


def trained(client, base_model: str, steps: int = 2):
    """A training client whose LoRA weights moved away from zero (so an adapter changes the logits)."""
    tc = client.create_lora_training_client(base_model=base_model, rank=4, seed=0).result()
    datum = _datum(TOKENS)
    for _ in range(steps):
        tc.forward_backward([datum], "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=5e-2)).result()
    return tc


def _datum(tokens: list[int]) -> types.Datum:
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})


def folder_of(server: RunningServer, path: str) -> Path:
    return Path(server.worker.store.get_checkpoint(path)["directory"])


def http(server: RunningServer, method: str, route: str, key: str = API_KEY, **kwargs) -> requests.Response:
    return requests.request(method, f"{server.url}/api/v1/{route}", headers={"X-API-Key": key}, timeout=30,
                            **kwargs)


def rest_route(path: str) -> str:
    """`training_runs/<run>/checkpoints/<kind>/<name>` for a tinker:// path, as the SDK builds it."""
    run, kind, name = path.removeprefix("tinker://").split("/")
    return f"training_runs/{run}/checkpoints/{kind}/{name}"


# ---------------------------------------------------------------------------------------------- list / info


def test_list_shows_all_of_my_checkpoints_newest_first_and_pages(ckpt_server, mine, theirs):
    base = ckpt_server.worker.base_model
    first = mine.create_lora_training_client(base_model=base, rank=4).result()
    second = mine.create_lora_training_client(base_model=base, rank=4).result()
    saved = [first.save_state("a").result().path, second.save_state("b").result().path,
             first.save_weights_for_sampler("c").result().path]
    foreign = theirs.create_lora_training_client(base_model=base, rank=4).result().save_state("x").result().path

    listed = cli_json(ckpt_server, "checkpoint", "list", "--limit", "0")["checkpoints"]
    paths = [c["tinker_path"] for c in listed]
    assert set(saved) <= set(paths) and foreign not in paths
    assert [p for p in paths if p in saved] == saved[::-1]  # newest first
    kinds = {c["tinker_path"]: c["checkpoint_type"] for c in listed}
    assert kinds[saved[0]] == "training" and kinds[saved[2]] == "sampler"
    assert all(c["public"] is False and c["expires_at"] is None for c in listed if c["tinker_path"] in saved)

    # --limit 1: one shown, and the table says how many more there are (from the cursor's total_count).
    table = tinker_cli(ckpt_server.url, "checkpoint", "list", "--limit", "1")
    assert table.returncode == 0 and "1 checkpoint " in table.stdout
    assert f"({len(listed) - 1} more not shown" in table.stdout
    page = http(ckpt_server, "GET", "checkpoints", params={"limit": 2, "offset": 1}).json()
    assert [c["tinker_path"] for c in page["checkpoints"]] == paths[1:3]
    assert page["cursor"] == {"offset": 1, "limit": 2, "total_count": len(listed)}
    assert foreign in {c["tinker_path"] for c in cli_json(ckpt_server, "checkpoint", "list", key=OTHER_KEY)
                       ["checkpoints"]}


@pytest.mark.parametrize("params, field", [({"limit": 0}, "limit"), ({"limit": 1001}, "limit"),
                                           ({"limit": "ten"}, "limit"), ({"offset": -1}, "offset")])
def test_list_rejects_bad_paging(ckpt_server, params, field):
    resp = http(ckpt_server, "GET", "checkpoints", params=params)
    assert resp.status_code == 400 and resp.json()["field"] == field, resp.text


def test_info_of_mine_and_of_unknown_or_foreign_checkpoints(ckpt_server, mine, theirs):
    path = mine.create_lora_training_client(base_model=ckpt_server.worker.base_model, rank=4).result() \
        .save_state("info").result().path
    info = cli_json(ckpt_server, "checkpoint", "info", path)
    assert info["tinker_path"] == path and info["checkpoint_id"] == "weights/info"
    assert info["lora_rank"] == 4 and info["public"] is False and info["expires_at"] is None

    assert not_found(cli_fails(ckpt_server, "checkpoint", "info", path.replace("/info", "/nope")))
    assert not_found(cli_fails(ckpt_server, "checkpoint", "info", path, key=OTHER_KEY))


# ---------------------------------------------------------------------------------------------- delete


def test_delete_asks_first_and_then_really_removes(ckpt_server, mine):
    tc = trained(mine, ckpt_server.worker.base_model, steps=1)
    path = tc.save_weights_for_sampler("doomed").result().path
    folder = folder_of(ckpt_server, path)
    sampler = mine.create_sampling_client(model_path=path).result()
    prompt = types.ModelInput.from_ints(TOKENS[:4])
    params = types.SamplingParams(max_tokens=2)
    assert sampler.sample(prompt, 1, params).result().sequences

    refused = tinker_cli(ckpt_server.url, "checkpoint", "delete", path, answer="n\n")
    assert refused.returncode == 0 and "Are you sure" in refused.stdout and "Deletion cancelled." in refused.stdout
    assert folder.is_dir() and ckpt_server.worker.store.get_checkpoint(path) is not None

    confirmed = tinker_cli(ckpt_server.url, "checkpoint", "delete", path, answer="y\n")
    assert confirmed.returncode == 0 and "Deleted 1 checkpoint(s)" in confirmed.stdout, confirmed.stdout
    assert not folder.exists() and ckpt_server.worker.store.get_checkpoint(path) is None
    assert not any(p.name.startswith(f".{folder.name}.") for p in folder.parent.iterdir())  # no tombstone left

    with pytest.raises(tinker.NotFoundError):
        sampler.sample(prompt, 1, params).result()  # its sampling session is 404 from now on
    with pytest.raises(tinker.NotFoundError):
        mine.create_sampling_client(model_path=path).result()
    with pytest.raises(tinker.NotFoundError):
        mine.create_training_client_from_state(path).result()


def test_delete_yes_flag_and_run_filters(ckpt_server, mine):
    tc = mine.create_lora_training_client(base_model=ckpt_server.worker.base_model, rank=4).result()
    training = [tc.save_state(f"t{i}").result().path for i in range(2)]
    sampler = tc.save_weights_for_sampler("keep").result().path

    quick = tinker_cli(ckpt_server.url, "checkpoint", "delete", "-y", training[0])
    assert quick.returncode == 0 and "Are you sure" not in quick.stdout and "Deleted 1" in quick.stdout
    assert ckpt_server.worker.store.get_checkpoint(training[0]) is None

    by_run = json.loads(tinker_cli(ckpt_server.url, "--format", "json", "checkpoint", "delete", "--yes",
                                   "--run-id", tc.model_id, "--type", "weights").stdout)
    assert by_run == {"deleted_count": 1, "failed": []}
    assert ckpt_server.worker.store.get_checkpoint(training[1]) is None
    left = http(ckpt_server, "GET", f"training_runs/{tc.model_id}/checkpoints").json()["checkpoints"]
    assert [c["tinker_path"] for c in left] == [sampler]


def test_delete_errors_unknown_and_foreign(ckpt_server, mine):
    path = mine.create_lora_training_client(base_model=ckpt_server.worker.base_model, rank=4).result() \
        .save_state("private").result().path
    for key, target in ((API_KEY, path.replace("/private", "/never-saved")), (OTHER_KEY, path)):
        done = json.loads(tinker_cli(ckpt_server.url, "--format", "json", "checkpoint", "delete", "-y", target,
                                     key=key).stdout)
        assert done["deleted_count"] == 0 and "404" in done["failed"][0]["error"], done
    assert folder_of(ckpt_server, path).is_dir()  # the other key's attempt changed nothing
    resp = http(ckpt_server, "DELETE", rest_route(path).replace("/weights/", "/bogus_kind/"))
    assert resp.status_code == 400 and resp.json()["field"] == "checkpoint_id"


# ---------------------------------------------------------------------------------------------- TTL


def test_set_ttl_sets_and_removes_an_expiry(ckpt_server, mine):
    path = mine.create_lora_training_client(base_model=ckpt_server.worker.base_model, rank=4).result() \
        .save_state("ttl").result().path
    before = time.time()
    assert tinker_cli(ckpt_server.url, "checkpoint", "set-ttl", path, "--ttl", "7200").returncode == 0
    expires = cli_json(ckpt_server, "checkpoint", "info", path)["expires_at"]
    from datetime import datetime

    assert before + 7200 - 5 <= datetime.fromisoformat(expires).timestamp() <= time.time() + 7200 + 5
    assert tinker_cli(ckpt_server.url, "checkpoint", "set-ttl", path, "--remove").returncode == 0
    assert ckpt_server.worker.store.get_checkpoint(path)["expires_at"] is None


def test_set_ttl_errors(ckpt_server, mine):
    path = mine.create_lora_training_client(base_model=ckpt_server.worker.base_model, rank=4).result() \
        .save_state("ttl-errors").result().path
    too_short = cli_fails(ckpt_server, "checkpoint", "set-ttl", path, "--ttl", "60")
    assert "Invalid request" in too_short and "between 3600" in too_short
    assert not_found(cli_fails(ckpt_server, "checkpoint", "set-ttl", path, "--ttl", "3600", key=OTHER_KEY))
    assert not_found(cli_fails(ckpt_server, "checkpoint", "set-ttl", path + "x", "--ttl", "3600"))
    for body in ({}, {"ttl_seconds": "3600"}, {"ttl_seconds": True}, {"ttl_seconds": 3600.5},
                 {"ttl_seconds": 11 * 365 * 86400}):
        resp = http(ckpt_server, "PUT", f"{rest_route(path)}/ttl", json=body)
        assert resp.status_code == 400 and resp.json()["field"] == "ttl_seconds", (body, resp.text)
    resp = http(ckpt_server, "POST", "save_weights", json={"model_id": path.split("/")[2], "path": "t",
                                                            "ttl_seconds": 5})
    assert resp.status_code == 400 and resp.json()["field"] == "ttl_seconds"
    assert ckpt_server.worker.store.get_checkpoint(path)["expires_at"] is None


def test_expired_checkpoints_are_removed_by_the_timer(ckpt_server, mine):
    tc = mine.create_lora_training_client(base_model=ckpt_server.worker.base_model, rank=4).result()
    expiring, lasting = tc.save_state("expiring").result().path, tc.save_state("lasting").result().path
    saved_with_ttl = tc.save_weights_for_sampler("sampler-ttl", ttl_seconds=3600).result().path
    assert tinker_cli(ckpt_server.url, "checkpoint", "set-ttl", expiring, "--ttl", "3600").returncode == 0
    store = ckpt_server.worker.store
    assert store.get_checkpoint(saved_with_ttl)["expires_at"] == pytest.approx(time.time() + 3600, abs=30)
    folders = {p: folder_of(ckpt_server, p) for p in (expiring, lasting, saved_with_ttl)}

    # The hour passes: what the clock would do, done to the row.
    for path in (expiring, saved_with_ttl):
        store.set_checkpoint_expiry(path, time.time() - 1)
    deadline = time.time() + 20
    while time.time() < deadline and (store.get_checkpoint(expiring) or store.get_checkpoint(saved_with_ttl)):
        time.sleep(0.2)
    for path in (expiring, saved_with_ttl):
        assert store.get_checkpoint(path) is None and not folders[path].exists()
    assert store.get_checkpoint(lasting) is not None and folders[lasting].is_dir()  # no TTL: it stays
    listed = {c["tinker_path"] for c in http(ckpt_server, "GET", "checkpoints", params={"limit": 1000}).json()
              ["checkpoints"]}
    assert lasting in listed and expiring not in listed
    with pytest.raises(tinker.NotFoundError):
        mine.create_training_client_from_state(expiring).result()


# ---------------------------------------------------------------------------------------------- publish


def test_publish_lets_other_keys_read_and_unpublish_takes_it_back(ckpt_server, mine, theirs):
    tc = trained(mine, ckpt_server.worker.base_model)
    state = tc.save_state("shared").result().path
    weights = tc.save_weights_for_sampler("shared-s").result().path
    prompt = types.ModelInput.from_ints(TOKENS[:5])
    params = types.SamplingParams(max_tokens=3, temperature=0.0)

    with pytest.raises(tinker.NotFoundError):
        theirs.create_sampling_client(model_path=weights).result()
    with pytest.raises(tinker.NotFoundError):
        theirs.create_training_client_from_state(state).result()
    assert not_found(cli_fails(ckpt_server, "checkpoint", "publish", state, key=OTHER_KEY))
    assert http(ckpt_server, "POST", f"{rest_route(state)}/publish", key=OTHER_KEY).status_code == 404

    rest = tinker.RestClient(base_url=ckpt_server.url, api_key=API_KEY)
    assert tinker_cli(ckpt_server.url, "checkpoint", "publish", state).returncode == 0
    assert tinker_cli(ckpt_server.url, "checkpoint", "publish", state).returncode == 0  # again: no change
    rest.publish_checkpoint_from_tinker_path(weights).result()
    mine_listed = http(ckpt_server, "GET", f"training_runs/{tc.model_id}/checkpoints").json()["checkpoints"]
    assert all(c["public"] for c in mine_listed if c["tinker_path"] in (state, weights))

    # The other key samples from it, trains from it, and gets the same numbers as the owner.
    their_sampler = theirs.create_sampling_client(model_path=weights).result()
    mine_sampler = mine.create_sampling_client(model_path=weights).result()
    assert their_sampler.sample(prompt, 1, params).result().sequences[0].tokens == \
        mine_sampler.sample(prompt, 1, params).result().sequences[0].tokens
    copy = theirs.create_training_client_from_state(state).result()
    theirs_lp = copy.forward([_datum(TOKENS)], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].data
    mine_lp = tc.forward([_datum(TOKENS)], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].data
    np.testing.assert_allclose(theirs_lp, mine_lp, atol=1e-5)
    info = tinker.RestClient(base_url=ckpt_server.url, api_key=OTHER_KEY).get_weights_info_by_tinker_path(
        state).result()
    assert info.lora_rank == 4 and info.base_model == ckpt_server.worker.base_model

    # ... but cannot change it.
    done = tinker_cli(ckpt_server.url, "checkpoint", "delete", "-y", state, key=OTHER_KEY)
    assert not_found(done.stdout + done.stderr) and "Deleted 0" in done.stdout
    for method, route, body in (("DELETE", "publish", None), ("PUT", "ttl", {"ttl_seconds": 3600})):
        assert http(ckpt_server, method, f"{rest_route(state)}/{route}", key=OTHER_KEY, json=body).status_code == 404
    assert folder_of(ckpt_server, state).is_dir() and not ckpt_server.worker.store.get_checkpoint(state)["expires_at"]
    theirs_listed = http(ckpt_server, "GET", "checkpoints", key=OTHER_KEY).json()["checkpoints"]
    assert state not in {c["tinker_path"] for c in theirs_listed}  # readable, yet not theirs

    assert tinker_cli(ckpt_server.url, "checkpoint", "unpublish", state).returncode == 0
    rest.unpublish_checkpoint_from_tinker_path(weights).result()
    assert not ckpt_server.worker.store.get_checkpoint(state)["public"]
    with pytest.raises(tinker.NotFoundError):
        their_sampler.sample(prompt, 1, params).result()
    with pytest.raises(tinker.NotFoundError):
        theirs.create_training_client_from_state(state).result()
    assert mine_sampler.sample(prompt, 1, params).result().sequences  # the owner still can


# ---------------------------------------------------------------------------------------------- download


def _peft_logprobs(base_model: str, adapter_dir: Path | None, tokens: list[int]) -> np.ndarray:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_model, torch_dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    with torch.no_grad():
        logits = model.eval()(torch.tensor([tokens])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return np.array([logprobs[i, tokens[i + 1]].item() for i in range(len(tokens) - 1)])


def test_download_is_a_peft_adapter_with_the_workers_numbers(ckpt_server, mine, theirs, tmp_path):
    base = ckpt_server.worker.base_model
    tc = trained(mine, base, steps=3)
    state = tc.save_state("final").result().path
    sampler_path = tc.save_weights_for_sampler("final-s").result().path

    done = cli_json(ckpt_server, "checkpoint", "download", state, "-o", str(tmp_path))
    target = Path(done["destination"])
    assert target == tmp_path / state.removeprefix("tinker://").replace("/", "_")
    assert sorted(p.name for p in target.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert done["file_size_bytes"] == sum(p.stat().st_size for p in target.iterdir())
    saved = load_file(str(folder_of(ckpt_server, state) / "adapter_model.safetensors"))
    got = load_file(str(target / "adapter_model.safetensors"))
    assert got.keys() == saved.keys() and all(torch.equal(got[k], saved[k]) for k in saved)

    # PEFT loads it as it is, and scores as the worker's trainer and sampler do.
    peft_lp = _peft_logprobs(base, target, TOKENS)
    trainer_lp = tc.forward([_datum(TOKENS)], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].data
    sampler_lp = mine.create_sampling_client(model_path=sampler_path).result().compute_logprobs(
        types.ModelInput.from_ints(TOKENS)).result()[1:]
    np.testing.assert_allclose(peft_lp, trainer_lp, atol=1e-4)
    np.testing.assert_allclose(peft_lp, sampler_lp, atol=1e-4)
    assert np.abs(peft_lp - _peft_logprobs(base, None, TOKENS)).max() > 1e-3  # the adapter does something

    # The temporary export is gone; the same target again needs --force.
    listed = http(ckpt_server, "GET", "checkpoints", params={"limit": 1000}).json()["checkpoints"]
    assert not [c for c in listed if c["checkpoint_type"] == "external"]
    assert "already exists" in cli_fails(ckpt_server, "checkpoint", "download", state, "-o", str(tmp_path))
    assert tinker_cli(ckpt_server.url, "checkpoint", "download", state, "-o", str(tmp_path),
                      "--force").returncode == 0

    # Another key: not while it is private, yes once published.
    assert not_found(cli_fails(ckpt_server, "checkpoint", "download", state, "-o", str(tmp_path / "b"),
                                    key=OTHER_KEY))
    tinker.RestClient(base_url=ckpt_server.url, api_key=API_KEY).publish_checkpoint_from_tinker_path(state).result()
    theirs_done = cli_json(ckpt_server, "checkpoint", "download", state, "-o", str(tmp_path / "b"), key=OTHER_KEY)
    their_copy = load_file(str(Path(theirs_done["destination"]) / "adapter_model.safetensors"))
    assert all(torch.equal(their_copy[k], saved[k]) for k in saved)
    assert not_found(cli_fails(ckpt_server, "checkpoint", "download", state.replace("final", "nope"),
                                    "-o", str(tmp_path / "c")))


def test_signed_links_refuse_expired_or_altered(ckpt_server, mine, theirs):
    tc = mine.create_lora_training_client(base_model=ckpt_server.worker.base_model, rank=4).result()
    export = tc.save_weights_external("links").result().path
    assert export.endswith("/external_weights/links")
    rest = tinker.RestClient(base_url=ckpt_server.url, api_key=API_KEY)
    answer = rest.get_external_weights_urls(export).result()
    assert sorted(answer.urls) == ["adapter_config.json", "adapter_model.safetensors"]
    assert answer.expires.timestamp() == pytest.approx(time.time() + ckpt_server.worker.config.download_url_ttl_s,
                                                       abs=30)
    url = answer.urls["adapter_config.json"]
    assert url.startswith(ckpt_server.url + "/")
    fetched = requests.get(url, timeout=30)  # no API key: the link is the authority
    assert fetched.status_code == 200
    assert fetched.content == (folder_of(ckpt_server, export) / "adapter_config.json").read_bytes()

    parsed = urlparse(url)
    query = {k: v[0] for k, v in parse_qs(parsed.query).items()}
    base = f"{parsed.scheme}://{parsed.netloc}{parsed.path}"
    resource = unquote(parsed.path)
    past = int(time.time()) - 10
    forged_expired = {"expires": past, "signature": UrlSigner(SECRET.encode()).sign(resource, past)}
    refused = {
        "tampered signature": f"{base}?{urlencode({**query, 'signature': '0' * 64})}",
        "extended expiry": f"{base}?{urlencode({**query, 'expires': int(query['expires']) + 3600})}",
        "other file": f"{base.replace('adapter_config.json', 'adapter_model.safetensors')}?{parsed.query}",
        "expired": f"{base}?{urlencode(forged_expired)}",
        "no signature": base,
        "another server's secret": f"{base}?{urlencode({'expires': query['expires'], 'signature': UrlSigner(b'x').sign(resource, int(query['expires']))})}",  # noqa: E501
    }
    for why, bad in refused.items():
        resp = requests.get(bad, timeout=30)
        assert resp.status_code == 403, (why, resp.status_code, resp.text)
    assert "expired" in requests.get(refused["expired"], timeout=30).json()["error"]

    # Only external weights have links; another key gets 404 for a private export.
    assert http(ckpt_server, "GET", f"{rest_route(tc.save_state('s').result().path)}/external_weights_urls"
                ).status_code == 400
    assert http(ckpt_server, "GET", f"{rest_route(export)}/external_weights_urls", key=OTHER_KEY).status_code == 404

    # A valid link to a deleted checkpoint: 404.
    rest.delete_checkpoint_from_tinker_path(export).result()
    assert requests.get(url, timeout=30).status_code == 404


def test_unsupported_export_options_and_copy_weights_say_why(ckpt_server, mine):
    tc = mine.create_lora_training_client(base_model=ckpt_server.worker.base_model, rank=4).result()
    resp = http(ckpt_server, "POST", "save_weights_external",
                json={"model_id": tc.model_id, "path": "enc", "age_encryption_recipients": ["age1xyz"]})
    assert resp.status_code == 400 and resp.json()["field"] == "age_encryption_recipients"
    resp = http(ckpt_server, "POST", "save_weights_external", json={"model_id": tc.model_id, "path": "../up"})
    assert resp.status_code == 400 and resp.json()["field"] == "path"
    resp = http(ckpt_server, "POST", "save_weights_external",
                json={"model_id": tc.model_id, "path": "short", "ttl_seconds": 10})
    assert resp.status_code == 400 and resp.json()["field"] == "ttl_seconds"

    path = tc.save_state("to-copy").result().path
    rest = tinker.RestClient(base_url=ckpt_server.url, api_key=API_KEY)
    with pytest.raises(tinker.BadRequestError, match="no projects"):
        rest.copy_weights(path, "proj-archive").result()
    resp = http(ckpt_server, "POST", "weights_info", json={})
    assert resp.status_code == 400 and resp.json()["field"] == "tinker_path"
    resp = http(ckpt_server, "POST", "weights_info", json={"tinker_path": path}, key=OTHER_KEY)
    assert resp.status_code == 404
