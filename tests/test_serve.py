"""`distlens serve` over real HTTP on 127.0.0.1, driven with the `openai` package (sync and
async): one server for the module (`python -m pipelines.serve`, joined to this test process's
Ray cluster, its two stages Ray actors), every answer checked against the unsliced HF model
generating that request alone with only its edits hooked in by the test (tests/reference.py's
HookedModel): tokens, the lens at every returned position and layer, streamed against whole;
bad requests, keys, a full queue, a client that leaves, and a stage actor killed mid-request."""

from __future__ import annotations

import asyncio
import json
import os
import time
from types import SimpleNamespace

import numpy as np
import pytest
import requests
import torch
from driver import serving

from reference import HookedModel, lens_reference

pytestmark = pytest.mark.xdist_group("serve")

APP, KEY = "servetest", "test-key-0123"
D = 32  # tiny_with_tokenizer's hidden size
VECTORS = [3.0 * torch.randn(D, generator=torch.Generator().manual_seed(s)) for s in (1, 2, 3)]
PROBE = (1, "resid_post")  # where the registered vector "probe" (VECTORS[0]) was built
MESSAGES = ["Hi", "Tell me about the sea and the ships on it", "What is 17 times 3?", "Name a colour",
            "Write one sentence about the ocean.", "Who are you?", "Count to five, slowly please", "Why?"]  # fmt: skip
# Each request's steering (None: unsteered): registered and inline vectors, every site, positions.
STEERING = [
    None,
    [{"vector": "probe", "coefficient": 2.0}],
    [{"vector": VECTORS[1].tolist(), "layer": 0, "site": "resid_pre", "coefficient": 1.5}],
    [{"vector": VECTORS[2].tolist(), "layer": 1, "site": "attn_in", "positions": "generated", "coefficient": -2.0}],
    None,
    [{"vector": VECTORS[1].tolist(), "layer": 0, "site": "mlp_in", "positions": "prompt", "coefficient": 3.0},
     {"vector": "probe", "layer": 0, "site": "resid_post", "positions": 4, "coefficient": 1.0}],
    [{"vector": VECTORS[2].tolist(), "layer": 1, "site": "resid_pre", "positions": "last", "coefficient": 2.5}],
    None,
]  # fmt: skip
MAX_TOKENS = [6, 3, 5, 4, 6, 2, 5, 3]


@pytest.fixture(scope="module")
def served(tiny_with_tokenizer, ray_cluster, tmp_path_factory):
    """The server, started as a user starts it; yields what the tests read; stopped with Ctrl-C."""
    from transformers import AutoTokenizer

    from pipelines.vectors import SteeringVector

    folder = tmp_path_factory.mktemp("serve")
    probe = SteeringVector(
        vector=VECTORS[0].numpy(), model=str(tiny_with_tokenizer), hidden_size=D, layer=PROBE[0], site=PROBE[1],
        dataset="probe", items=1, aggregator="mean_diff", normalised=False, norm=float(VECTORS[0].norm()),
    ).save(folder / "probe.safetensors")  # fmt: skip
    from actors.distributed import free_port

    port = free_port()
    overrides = [f"model.name={tiny_with_tokenizer}", f"serve.port={port}", f"serve.api_key={KEY}", f"serve.app={APP}",
                 f"serve.vectors=['probe={probe}']", "serve.max_waiting=8", "cluster.micro_batch_size=3",
                 "cluster.micro_batches_in_flight=2", "capture.k=5"]  # fmt: skip
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address)
    with serving(*overrides, cwd=folder, env=env) as log:
        tok = AutoTokenizer.from_pretrained(tiny_with_tokenizer)
        yield SimpleNamespace(
            url=f"http://127.0.0.1:{port}/v1", root=f"http://127.0.0.1:{port}", model=str(tiny_with_tokenizer),
            hooked=HookedModel(tiny_with_tokenizer), tok=tok, eos=tok.eos_token_id, log=log,
        )  # fmt: skip


def _client(served, asynchronous: bool = False):
    import openai

    return (openai.AsyncOpenAI if asynchronous else openai.OpenAI)(base_url=served.url, api_key=KEY, max_retries=0)


def _edits(steering) -> tuple:
    """A request's steering as HookedModel's edits (vector values, layer, site, positions, coefficient)."""
    out = []
    for e in steering or ():
        vector, layer, site = e["vector"], e.get("layer"), e.get("site")
        if vector == "probe":
            vector, layer, site = VECTORS[0].tolist(), PROBE[0] if layer is None else layer, site or PROBE[1]
        out.append((vector, layer, site, e.get("positions", "all"), e["coefficient"]))
    return tuple(out)


def _chat_ids(served, content: str) -> list[int]:
    return list(
        served.tok.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, return_dict=False
        )
    )


def _reference(served, ids, steering, max_tokens) -> list[int]:
    seq, _ = served.hooked.alone(ids, _edits(steering), max_tokens, served.eos)
    return seq[len(ids) :]


def test_eight_concurrent_chats_each_with_its_own_steering_equal_hf_alone(served):
    """Eight requests at once on 2 lanes of 3 rows (two wait, rows leave at different steps), each
    equal to HF greedy generation of that request alone with only its edits hooked in."""

    async def ask(client, i):
        return await client.chat.completions.create(
            model=served.model, messages=[{"role": "user", "content": MESSAGES[i]}], max_tokens=MAX_TOKENS[i],
            temperature=0, logprobs=True, extra_body={"distlens": {"steering": STEERING[i]}} if STEERING[i] else None,
        )  # fmt: skip

    async def everyone():
        client = _client(served, asynchronous=True)
        try:
            return await asyncio.gather(*(ask(client, i) for i in range(len(MESSAGES))))
        finally:
            await client.close()

    answers = asyncio.run(everyone())
    differ = 0
    for i, answer in enumerate(answers):
        ids = _chat_ids(served, MESSAGES[i])
        want = _reference(served, ids, STEERING[i], MAX_TOKENS[i])
        choice = answer.choices[0]
        assert choice.message.content == served.tok.decode(want, skip_special_tokens=True), i
        assert len(choice.logprobs.content) == len(want) and answer.usage.completion_tokens == len(want), i
        assert answer.usage.prompt_tokens == len(ids)
        assert choice.finish_reason == ("stop" if want[-1] == served.eos else "length")
        logits = served.hooked.model(torch.tensor([ids + want])).logits[0, len(ids) - 1 : -1]
        chosen = torch.log_softmax(logits.float(), -1)[torch.arange(len(want)), torch.tensor(want)]
        np.testing.assert_allclose([e.logprob for e in choice.logprobs.content], chosen.detach().numpy(), atol=1e-4)
        if STEERING[i]:
            differ += want != _reference(served, ids, None, MAX_TOKENS[i])
    assert differ >= 3, "the steering changed too few answers for the comparison to see it"


def test_the_lens_in_a_response_equals_the_unsliced_model_at_every_position_and_layer(served):
    steering = [{"vector": VECTORS[1].tolist(), "layer": 0, "site": "resid_post", "coefficient": 1.0}]
    prompt, max_tokens = "The lighthouse keeper", 4
    answer = _client(served).completions.create(
        model=served.model, prompt=prompt, max_tokens=max_tokens, temperature=0,
        extra_body={"distlens": {"steering": steering, "lens": {"positions": "all", "k": 5, "layers": [0, -1]}}},
    )  # fmt: skip
    ids = served.tok(prompt).input_ids
    seq, captured = served.hooked.alone(ids, _edits(steering), max_tokens, served.eos)
    lens = answer.model_extra["distlens"]["lens"]
    assert answer.choices[0].text == served.tok.decode(seq[len(ids) :], skip_special_tokens=True)
    assert [p["position"] for p in lens] == list(range(len(seq) - 1))
    model, last = served.hooked.model, len(captured) - 1
    checked = 0
    for entry in lens:
        p = entry["position"]
        assert entry["token_id"] == seq[p] and entry["next_token_id"] == seq[p + 1]
        final = lens_reference(model, captured[last][p])
        assert [c["layer"] for c in entry["cells"]] == [0, last]
        for cell in entry["cells"]:
            logp = lens_reference(model, captured[cell["layer"]][p])
            top = logp.topk(5)
            assert cell["top_ids"] == top.indices.tolist(), (p, cell["layer"])
            assert cell["top_tokens"] == [served.tok.decode([t]) for t in cell["top_ids"]]
            np.testing.assert_allclose(cell["top_logprobs"], top.values.detach().numpy(), atol=1e-4)
            entropy = float(-(logp.exp() * logp).sum().detach())
            kl = float((final.exp() * (final - logp)).sum().detach())
            assert abs(cell["entropy"] - entropy) < 1e-3 and abs(cell["kl_to_final"] - kl) < 1e-4
            checked += 1
    assert checked == 2 * (len(seq) - 1)
    # "generated": the positions whose lens predicts each generated token
    again = _client(served).completions.create(
        model=served.model, prompt=prompt, max_tokens=max_tokens, temperature=0,
        extra_body={"distlens": {"steering": steering, "lens": {"k": 2}}},
    )  # fmt: skip
    gen = again.model_extra["distlens"]["lens"]
    assert [p["next_token_id"] for p in gen] == seq[len(ids) :] and again.choices[0].text == answer.choices[0].text
    assert all(len(p["cells"]) == 2 and len(p["cells"][0]["top_ids"]) == 2 for p in gen)


def test_streaming_returns_the_tokens_of_the_whole_answer_and_stops_where_it_does(served):
    client = _client(served)
    ids = _chat_ids(served, MESSAGES[4])
    tokens = _reference(served, ids, STEERING[4], 10)
    want = served.tok.decode(tokens, skip_special_tokens=True)
    # a stop string first met at a later token: the text of that token, not in the text before it
    stop = next(piece for i in range(3, len(tokens)) if (piece := served.tok.decode(tokens[i]).strip())
                and piece not in served.tok.decode(tokens[:i]))  # fmt: skip
    kw = dict(model=served.model, messages=[{"role": "user", "content": MESSAGES[4]}], max_tokens=10, temperature=0,
              logprobs=True)  # fmt: skip
    for stops, text, reason in ((None, want, "length"), ([stop], want[: want.find(stop)], "stop")):
        whole = client.chat.completions.create(**kw, stop=stops)
        chunks = list(client.chat.completions.create(**kw, stop=stops, stream=True))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert whole.choices[0].message.content == streamed == text
        assert whole.choices[0].finish_reason == chunks[-1].choices[0].finish_reason == reason
        streamed_lp = [
            e.logprob for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content
        ]
        assert streamed_lp == [e.logprob for e in whole.choices[0].logprobs.content]  # every token's, once
        assert stops or len(chunks) > 3  # token by token, not one block


def test_bad_requests_get_a_400_naming_the_field_and_a_missing_key_a_401(served):
    import openai

    head = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    base = {"model": served.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    ok_vector = VECTORS[1].tolist()
    cases = [
        ({"distlens": {"steering": [{"vector": "nope", "coefficient": 1}]}}, "distlens.steering[0].vector"),
        ({"distlens": {"steering": [{"vector": ok_vector[:5], "layer": 0, "site": "resid_pre"}]}}, "distlens.steering[0].vector"),
        ({"distlens": {"steering": [{"vector": "probe", "coefficient": float("nan")}]}}, "distlens.steering[0].coefficient"),
        ({"distlens": {"steering": [{"vector": ok_vector, "layer": 0, "site": "mlp_out"}]}}, "distlens.steering[0].site"),
        ({"distlens": {"steering": [{"vector": ok_vector, "layer": 2, "site": "resid_pre"}]}}, "distlens.steering[0].layer"),
        ({"distlens": {"lens": {"k": 6}}}, "distlens.lens.k"),
        ({"n": 2}, "n"),
        ({"max_tokens": 2048}, "max_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"logit_bias": {"5": 10}}, "logit_bias"),
        ({"frobnicate": True}, "frobnicate"),
    ]  # fmt: skip
    url = f"{served.url}/chat/completions"
    for extra, field in cases:
        r = requests.post(url, data=json.dumps({**base, **extra}), headers=head, timeout=60)  # json.dumps writes NaN
        assert r.status_code == 400, (field, r.status_code, r.text)
        assert (
            r.json()["error"]["param"] == field and field.split(".")[-1].split("[")[0] in r.json()["error"]["message"]
        )
    for key in (None, "wrong"):
        hdr = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        assert requests.post(url, data=json.dumps(base), headers=hdr, timeout=60).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=served.url, api_key="wrong", max_retries=0).models.list()
    # a vector registered by POST is listed and steers like the same inline vector
    client = _client(served)
    added = requests.post(f"{served.url}/vectors", headers=head, timeout=60,
                          data=json.dumps({"name": "posted", "layer": 0, "site": "attn_in", "values": ok_vector}))  # fmt: skip
    assert added.status_code == 200, added.text
    listed = {v["name"]: v for v in requests.get(f"{served.url}/vectors", headers=head, timeout=60).json()["data"]}
    assert {"probe", "posted"} <= set(listed) and (listed["probe"]["layer"], listed["probe"]["site"]) == PROBE
    by_name, inline = (
        client.chat.completions.create(**base, temperature=0, extra_body={"distlens": {"steering": [s]}})
        for s in ({"vector": "posted", "coefficient": 2.0},
                  {"vector": ok_vector, "layer": 0, "site": "attn_in", "coefficient": 2.0})
    )  # fmt: skip
    assert by_name.choices[0].message.content == inline.choices[0].message.content


def test_a_full_queue_is_told_to_retry_and_a_client_that_leaves_frees_its_row(served):
    """30 requests at once against 6 slots and a queue of 8: the ones past the queue get 429 with
    Retry-After, the rest complete; a streamed request dropped after its first chunk leaves the batch."""
    import aiohttp

    async def ask(session, i):
        # 48 tokens: the admitted rows stay in their lanes while the rest arrive
        body = {"model": served.model, "prompt": f"Row {i} says", "max_tokens": 48, "temperature": 0}
        async with session.post(f"{served.url}/completions", json=body) as r:
            return r.status, r.headers.get("Retry-After"), await r.json()

    async def everyone():
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as session:
            return await asyncio.gather(*(ask(session, i) for i in range(30)))

    answers = asyncio.run(everyone())
    codes = [status for status, _, _ in answers]
    assert set(codes) == {200, 429} and codes.count(429) >= 1, codes
    assert all(retry for status, retry, _ in answers if status == 429)
    first = codes.index(200)
    want = _reference(served, served.tok(f"Row {first} says").input_ids, None, 48)
    assert answers[first][2]["choices"][0]["text"] == served.tok.decode(want, skip_special_tokens=True)
    body = {"model": served.model, "prompt": "A long story", "max_tokens": 1500, "temperature": 0, "stream": True}
    with requests.post(f"{served.url}/completions", json=body, stream=True, timeout=60,
                       headers={"Authorization": f"Bearer {KEY}"}) as r:  # fmt: skip
        next(r.iter_lines())
    deadline = time.monotonic() + 60
    while (health := requests.get(f"{served.root}/health", timeout=30).json())[
        "running"
    ] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert health["running"] == 0 and health["waiting"] == 0, health


def test_a_stage_actor_killed_mid_request_is_restarted_and_the_server_keeps_answering(served, ray_cluster):
    """The request in flight completes equal to the reference or fails with an error the client
    sees; requests after it equal the reference; the stages and the replica are named actors."""
    import openai

    stage = ray_cluster.get_actor(f"distlens-{APP}-stage1-rank0", namespace="distlens")
    assert ray_cluster.get_actor(f"distlens-{APP}-stage0-rank0", namespace="distlens")
    client = _client(served)
    ids = _chat_ids(served, MESSAGES[6])
    want = served.tok.decode(_reference(served, ids, STEERING[6], 120), skip_special_tokens=True)
    kw = dict(model=served.model, messages=[{"role": "user", "content": MESSAGES[6]}], max_tokens=120, temperature=0,
              extra_body={"distlens": {"steering": STEERING[6]}})  # fmt: skip
    text, failed = "", False
    try:
        for i, chunk in enumerate(client.chat.completions.create(**kw, stream=True)):
            if i == 1:
                ray_cluster.kill(stage, no_restart=False)  # Ray restarts it (cluster.max_restarts)
            text += (chunk.choices[0].delta.content or "") if chunk.choices else ""
    except openai.APIError:
        failed = True
    assert failed or text == want
    health = requests.get(f"{served.root}/health", timeout=30).json()
    assert health["stage_restarts"] == 1 and health["rows_run_again"] == 1, health  # this request's row, mid-way
    assert client.chat.completions.create(**kw).choices[0].message.content == want
    assert requests.get(f"{served.root}/health", timeout=30).json()["status"] == "ok"
