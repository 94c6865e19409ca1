"""The HTTP server end to end: a real uvicorn on a loopback port, driven by the official `openai`
client and by raw HTTP (httpx). The reference for every generated token is the offline engine
(LLM.generate) on the same tiny checkpoint, so "the server works" means "the server returns what
the engine computes", for one request or for 64 clients at once.

Most tests share one server in a subprocess (its own GIL, as in production). Tests that need an
unusual configuration (a one-sequence batch to make queues and timeouts deterministic, rate
limits, draining) run uvicorn in a thread of this process via `build_app`.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
import torch

# The serving stack is an optional extra; without it these tests skip, with this reason.
for _module in ("fastapi", "uvicorn", "httpx", "openai"):
    pytest.importorskip(_module, reason="pip install -e '.[serve]' openai httpx to run the server tests")

import httpx      # noqa: E402
import openai     # noqa: E402
import uvicorn    # noqa: E402

from nanoserve import EngineConfig, LLMEngine, SamplingParams   # noqa: E402
from nanoserve.async_engine import OutputSink                    # noqa: E402
from nanoserve.sequence import CompletionOutput, RequestOutput   # noqa: E402
from nanoserve.launch import add_serve_args, uvicorn_config      # noqa: E402
from nanoserve.server import build_app                          # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-test-key"
MODEL = "tiny-gpt2"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPTS = ["Hello, my name is", "The capital of France is", "def fibonacci(n):", "Once upon a time"]

# ---- servers ---------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(base: str, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text() if log else ''}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    pytest.fail(f"server at {base} not healthy after 60 s:\n{log.read_text() if log else ''}")


def _start_subprocess(ckpt: Path, log: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "nanoserve", "serve", "--model", str(ckpt), "--device", "cpu", "--quiet",
           "--port", str(port), "--served-model-name", MODEL, *flags]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    _wait_healthy(base, proc, log)
    return proc, base


@pytest.fixture(scope="module")
def server(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("server") / "server.log"
    proc, base = _start_subprocess(tiny_ckpt, log, "--api-key", KEY, "--num-blocks", "1024",
                                   "--max-body-bytes", "65536")
    yield base
    proc.terminate()
    assert proc.wait(30) == 0, log.read_text()
    assert "Traceback" not in log.read_text(), log.read_text()


@pytest.fixture(scope="module")
def one_seq_engine(tiny_ckpt: Path) -> LLMEngine:
    """An engine that runs one sequence at a time, shifting its context past n_ctx: LONG keeps
    it busy for 32,000 steps (half a minute even at the C++ step's ~1 ms), so queues, timeouts,
    hang-ups and drains happen while it runs, however fast the machine."""
    return LLMEngine(EngineConfig(model=str(tiny_ckpt), device="cpu", quiet=True, max_num_seqs=1, num_blocks=256,
                                  context_overflow="shift"))


@contextlib.contextmanager
def _in_process(engine: LLMEngine, **options) -> Iterator[tuple[str, object]]:
    app = build_app(engine, **{"served_model_name": MODEL, **options})
    uv = uvicorn.Server(uvicorn_config(app, port=0, log_level="warning"))   # the settings `serve` uses
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.01)
    base = f"http://127.0.0.1:{uv.servers[0].sockets[0].getsockname()[1]}"
    _wait_healthy(base)
    try:
        yield base, app.state.server
    finally:
        uv.should_exit = True
        thread.join(30)


# ---- helpers ---------------------------------------------------------------------------
def _client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)


def _metrics(base: str) -> dict[str, float]:
    text = httpx.get(base + "/metrics", headers=AUTH).text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def _wait_until(base: str, ok, expected: str, timeout: float) -> dict[str, float]:
    """Poll /metrics until ok(metrics) holds; return those metrics."""
    deadline = time.monotonic() + timeout
    while not ok(m := _metrics(base)):
        assert time.monotonic() < deadline, f"expected {expected}; metrics: {m}"
        time.sleep(0.05)
    return m


def _wait_metric(base: str, name: str, want: float, timeout: float = 10.0) -> None:
    _wait_until(base, lambda m: m.get(name) == want, f"{name} = {want}", timeout)


def _wait_aborted(base: str, at_least: int, timeout: float = 20.0) -> dict[str, float]:
    """Wait until `at_least` completions were aborted and no KV block is in use. Both at once:
    the pool can be empty for a moment between two completions of a request still running."""
    return _wait_until(base, lambda m: m.get(ABORTED, 0) >= at_least and m["nanoserve_kv_blocks_used"] == 0,
                       f"aborted >= {at_least} and no KV block used", timeout)


def _events(lines: list[str]) -> list[dict]:
    return [json.loads(line[6:]) for line in lines if line.startswith("data: ") and line != "data: [DONE]"]


def _offline(llm, prompts, **params):
    return llm.generate(prompts, SamplingParams(**params), use_tqdm=False)


def _post(base: str, **body) -> httpx.Response:
    return httpx.post(base + "/v1/completions", json={"model": MODEL, **body}, headers=AUTH, timeout=60)


ABORTED = 'nanoserve_requests_finished_total{finish_reason="abort"}'
LONG = dict(prompt="Hi", n=16, max_tokens=2000, ignore_eos=True, temperature=0.0)   # 32,000 steps on one_seq_engine


# ---- the OpenAI API, compared with the offline engine ---------------------------------
def test_models_route_lists_the_served_model(server):
    """GET /v1/models names the model clients must send; /health says ready."""
    assert [m.id for m in _client(server).models.list().data] == [MODEL]
    assert httpx.get(server + "/health").json() == {"status": "ok"}


def test_greedy_completions_equal_offline_generate(server, tiny_llm):
    """A list of prompts, greedy: each choice's text, finish reason and token counts equal LLM.generate's."""
    resp = _client(server).completions.create(model=MODEL, prompt=PROMPTS, max_tokens=12, temperature=0)
    ref = _offline(tiny_llm, PROMPTS, max_tokens=12, temperature=0.0)
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    assert [c.text for c in resp.choices] == [r.outputs[0].text for r in ref]
    assert [c.finish_reason for c in resp.choices] == [r.outputs[0].finish_reason for r in ref]
    assert resp.usage.prompt_tokens == sum(len(r.prompt_token_ids) for r in ref)
    assert resp.usage.completion_tokens == sum(len(r.outputs[0].token_ids) for r in ref)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    by_ids = _client(server).completions.create(model=MODEL, prompt=[r.prompt_token_ids for r in ref],
                                                max_tokens=12, temperature=0)
    assert [c.text for c in by_ids.choices] == [c.text for c in resp.choices]


def test_streamed_chunks_concatenate_to_the_offline_text(server, tiny_llm):
    """stream=True: OpenAI text_completion chunks whose texts add up to the offline result, then [DONE]."""
    stream = _client(server).completions.create(model=MODEL, prompt=PROMPTS[:2], max_tokens=12, temperature=0,
                                                stream=True, stream_options={"include_usage": True})
    texts, reasons, usage = {0: "", 1: ""}, {}, None
    for chunk in stream:
        assert chunk.object == "text_completion"
        usage = chunk.usage or usage
        for c in chunk.choices:
            texts[c.index] += c.text
            reasons[c.index] = c.finish_reason
    ref = _offline(tiny_llm, PROMPTS[:2], max_tokens=12, temperature=0.0)
    assert texts == {i: r.outputs[0].text for i, r in enumerate(ref)}
    assert reasons == {0: "length", 1: "length"}
    assert usage.completion_tokens == 24
    with httpx.stream("POST", server + "/v1/completions", headers=AUTH, json={
            "model": MODEL, "prompt": PROMPTS[0], "max_tokens": 4, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and len(_events(lines)) >= 2
    with httpx.stream("POST", server + "/v1/completions", headers=AUTH, json={
            "model": MODEL, "prompt": PROMPTS[0], "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True}}) as r:
        events = _events([line for line in r.iter_lines() if line])
    assert all(e["usage"] is None for e in events[:-1])                 # as OpenAI: null until the last
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 4


def test_n_and_seed_sample_like_the_offline_engine(server, tiny_llm):
    """n=3 with a seed: the same three samples as LLM.generate with that seed, in index order."""
    resp = _client(server).completions.create(model=MODEL, prompt=PROMPTS[0], n=3, seed=1234, temperature=0.9,
                                              max_tokens=10)
    ref = _offline(tiny_llm, PROMPTS[0], n=3, seed=1234, temperature=0.9, max_tokens=10)[0]
    assert [c.text for c in resp.choices] == [o.text for o in ref.outputs]
    assert len({c.text for c in resp.choices}) > 1, "the samples should differ from each other"


def test_penalties_and_logit_bias_match_the_offline_engine(server, tiny_llm):
    """OpenAI's presence_penalty, frequency_penalty and logit_bias (token ids as strings) reach
    the sampler: the text equals LLM.generate's with the same SamplingParams."""
    knobs = dict(presence_penalty=0.5, frequency_penalty=1.5)
    resp = _client(server).completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=12, temperature=0,
                                              logit_bias={"42": 8}, **knobs)
    ref = _offline(tiny_llm, PROMPTS[2], max_tokens=12, temperature=0.0, logit_bias={42: 8}, **knobs)[0]
    plain = _offline(tiny_llm, PROMPTS[2], max_tokens=12, temperature=0.0)[0]
    assert resp.choices[0].text == ref.outputs[0].text != plain.outputs[0].text


def test_best_of_returns_the_n_candidates_with_the_best_logprob_per_token(server, tiny_llm):
    """best_of=4, n=2: the engine samples 4 candidates (the same 4 as LLM.generate with n=4 and
    the seed) and the 2 with the highest mean token logprob come back, best first."""
    resp = _client(server).completions.create(model=MODEL, prompt=PROMPTS[0], n=2, best_of=4, seed=7,
                                              temperature=1.0, max_tokens=8)
    cands = _offline(tiny_llm, PROMPTS[0], n=4, seed=7, temperature=1.0, max_tokens=8, logprobs=0)[0].outputs
    ranked = sorted(cands, key=lambda c: c.cumulative_logprob / len(c.token_ids), reverse=True)
    assert len({c.text for c in cands}) == 4, "the candidates should differ"
    assert [c.text for c in resp.choices] == [c.text for c in ranked[:2]]
    assert [c.index for c in resp.choices] == [0, 1] and all(c.logprobs is None for c in resp.choices)


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_cuts_the_text_like_the_offline_engine(server, tiny_llm, stream):
    """A stop string spanning tokens ends the text before it, streamed or not."""
    full = _offline(tiny_llm, PROMPTS[1], max_tokens=24, temperature=0.0)[0].outputs[0].text
    stop = full[len(full) // 2: len(full) // 2 + 5]
    ref = _offline(tiny_llm, PROMPTS[1], max_tokens=24, temperature=0.0, stop=stop)[0].outputs[0]
    assert ref.finish_reason == "stop" and len(ref.text) < len(full)
    resp = _client(server).completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=24, temperature=0,
                                              stop=[stop], stream=stream)
    chunks = list(resp) if stream else [resp]
    assert "".join(c.text for chunk in chunks for c in chunk.choices) == ref.text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_logprobs_match_the_offline_engine(server, tiny_llm):
    """logprobs=3: OpenAI's tokens/token_logprobs/top_logprobs/text_offset, values equal to the engine's."""
    resp = _client(server).completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=8, temperature=0,
                                              logprobs=3)
    ref = _offline(tiny_llm, PROMPTS[2], max_tokens=8, temperature=0.0, logprobs=3)[0].outputs[0]
    lp, text = resp.choices[0].logprobs, resp.choices[0].text
    assert lp.token_logprobs == pytest.approx([d[t] for t, d in zip(ref.token_ids, ref.logprobs)], abs=1e-4)
    assert "".join(lp.tokens) == text
    assert all(len(top) <= 4 and tok in top for tok, top in zip(lp.tokens, lp.top_logprobs))
    assert [text[o:o + len(tok)] for o, tok in zip(lp.text_offset, lp.tokens)] == lp.tokens
    streamed = _client(server).completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=8, temperature=0,
                                                  logprobs=3, stream=True)
    assert [x for chunk in streamed for c in chunk.choices for x in c.logprobs.token_logprobs] == \
        pytest.approx(lp.token_logprobs, abs=1e-4)


def test_echo_prepends_the_prompt_and_scores_it(server, tiny_llm):
    """echo=True: the text starts with the prompt; with logprobs the prompt tokens are scored too (first: None)."""
    resp = _client(server).completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=4, temperature=0,
                                              echo=True, logprobs=1)
    ref = _offline(tiny_llm, PROMPTS[0], max_tokens=4, temperature=0.0, logprobs=1, prompt_logprobs=1)[0]
    choice = resp.choices[0]
    assert choice.text == PROMPTS[0] + ref.outputs[0].text
    assert len(choice.logprobs.tokens) == len(ref.prompt_token_ids) + 4
    assert choice.logprobs.token_logprobs[0] is None
    want = [d[t] for t, d in zip(ref.prompt_token_ids[1:], ref.prompt_logprobs[1:])]
    assert choice.logprobs.token_logprobs[1:len(ref.prompt_token_ids)] == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("stream", [False, True])
def test_echo_with_max_tokens_zero_scores_the_prompt_only(server, tiny_llm, stream):
    """echo=True, max_tokens=0 (how evaluation harnesses ask for loglikelihoods): each choice is
    its prompt with the prompt's logprobs, nothing generated, completion_tokens 0."""
    ref = _offline(tiny_llm, PROMPTS[:2], max_tokens=1, temperature=0.0, logprobs=2, prompt_logprobs=2)
    before = _metrics(server)
    resp = _client(server).completions.create(model=MODEL, prompt=PROMPTS[:2], max_tokens=0, echo=True, logprobs=2,
                                              temperature=0, stream=stream,
                                              **({"stream_options": {"include_usage": True}} if stream else {}))
    texts, tokens, lps, reasons, usage = {}, {}, {}, {}, None
    for chunk in resp if stream else [resp]:
        usage = chunk.usage or usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            tokens.setdefault(c.index, []).extend(c.logprobs.tokens)
            lps.setdefault(c.index, []).extend(c.logprobs.token_logprobs)
            reasons[c.index] = c.finish_reason
    assert texts == {0: PROMPTS[0], 1: PROMPTS[1]} and reasons == {0: "length", 1: "length"}
    for i, r in enumerate(ref):
        assert len(tokens[i]) == len(r.prompt_token_ids) and lps[i][0] is None
        want = [d[t] for t, d in zip(r.prompt_token_ids[1:], r.prompt_logprobs[1:])]
        assert lps[i][1:] == pytest.approx(want, abs=1e-4)
    assert usage.completion_tokens == 0 and usage.prompt_tokens == sum(len(r.prompt_token_ids) for r in ref)
    after = _metrics(server)                  # the metrics agree with usage: nothing generated
    assert after["nanoserve_generation_tokens_total"] == before["nanoserve_generation_tokens_total"]
    assert after["nanoserve_prompt_tokens_total"] - before["nanoserve_prompt_tokens_total"] == usage.prompt_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_text_offset_gives_a_generated_eos_no_room(server, stream):
    """A generated <|endoftext|> is not in the text (as offline), so text_offset does not move
    past it: offsets always index the returned text."""
    resp = _client(server).completions.create(model=MODEL, prompt="Hello", max_tokens=3, temperature=0, logprobs=0,
                                              logit_bias={"50256": 100}, stream=stream,
                                              extra_body={"ignore_eos": True})
    chunks = list(resp) if stream else [resp]
    text = "".join(c.text for ch in chunks for c in ch.choices)
    offsets = [o for ch in chunks for c in ch.choices if c.logprobs for o in c.logprobs.text_offset]
    tokens = [t for ch in chunks for c in ch.choices if c.logprobs for t in c.logprobs.tokens]
    assert text == "" and tokens == ["<|endoftext|>"] * 3 and offsets == [0, 0, 0]


def test_logprob_tokens_holding_part_of_a_character_are_shown_as_bytes(server, tiny_llm):
    """A token that is part of a UTF-8 character shows as OpenAI's "bytes:\\xe6\\x97" form, not
    U+FFFD: the prompt's tokens then spell out its exact bytes."""
    prompt = "日本語 🤖!"
    resp = _client(server).completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0,
                                              echo=True, logprobs=0)
    n = len(tiny_llm.engine.tokenizer.encode(prompt))
    tokens = resp.choices[0].logprobs.tokens[:n]
    as_bytes = [bytes.fromhex(t[6:].replace("\\x", "")) if t.startswith("bytes:") else t.encode() for t in tokens]
    assert b"".join(as_bytes) == prompt.encode()
    assert any(t.startswith("bytes:") for t in tokens) and not any("\ufffd" in t for t in tokens)


def test_a_repeated_prompt_is_served_from_the_prefix_cache(server):
    """The second request with the same 40-token prompt takes its full KV blocks from the
    prefix cache (visible in /metrics) and gets the same greedy text."""
    prompt = " ".join(f"w{i}" for i in range(20))          # 40 tokens: two full 16-token blocks
    before = _metrics(server)["nanoserve_prefix_cache_hit_tokens_total"]
    texts = [_post(server, prompt=prompt, max_tokens=6, temperature=0).json()["choices"][0]["text"]
             for _ in range(2)]
    after = _metrics(server)["nanoserve_prefix_cache_hit_tokens_total"]
    assert texts[0] == texts[1] and after - before >= 32


def test_output_sink_keeps_only_the_latest_snapshot_per_request():
    """A slow reader finds one (the newest) snapshot per request id, in arrival order of the
    newest; the verdict and errors are never merged away."""
    def snap(rid: str, num_tokens: int) -> RequestOutput:
        return RequestOutput(rid, None, [1], None, [CompletionOutput(0, "", [7] * num_tokens, None, None)], False)

    async def run() -> list:
        sink = OutputSink()
        for item in [None, snap("a", 1), snap("b", 1), snap("a", 2), snap("a", 3), RuntimeError("x")]:
            sink.put_nowait(item)
        return [await sink.get() for _ in range(len(sink.items))]

    got = asyncio.run(run())
    assert got[0] is None and isinstance(got[3], RuntimeError) and len(got) == 4
    assert [(o.request_id, len(o.outputs[0].token_ids)) for o in got[1:3]] == [("b", 1), ("a", 3)]


# ---- load and cancellation ---------------------------------------------------------------
def test_64_concurrent_clients_get_complete_greedy_results(server, tiny_llm):
    """500 requests from 64 concurrent clients: every response complete and equal to the offline
    engine's; afterwards no request is left and every KV block is free."""
    prompts = [f"{PROMPTS[i % 4]} {' and'.join(['x'] * (i % 7))} #{i}" for i in range(50)]
    ref = {p: r.outputs[0].text for p, r in zip(prompts, _offline(tiny_llm, prompts, max_tokens=8, temperature=0.0))}
    before = _metrics(server)
    latencies, results = [], []

    async def one_client(http: httpx.AsyncClient, jobs: list[int]) -> None:
        while jobs:
            prompt = prompts[jobs.pop() % len(prompts)]
            t0 = time.perf_counter()
            r = await http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 8,
                                                         "temperature": 0})
            latencies.append(time.perf_counter() - t0)
            results.append((prompt, r.status_code, r.json()))

    async def run() -> float:
        jobs = list(range(500))
        # One AsyncClient per client, as 64 separate users would be (one shared connection
        # pool of 64 makes httpx itself the bottleneck: 2.5x lower throughput, 5x the p99).
        clients = [httpx.AsyncClient(base_url=server, headers=AUTH, timeout=120) for _ in range(64)]
        t0 = time.perf_counter()
        await asyncio.gather(*(one_client(http, jobs) for http in clients))
        wall = time.perf_counter() - t0
        await asyncio.gather(*(http.aclose() for http in clients))
        return wall

    wall = asyncio.run(run())
    assert len(results) == 500
    for prompt, status, body in results:
        assert status == 200, body
        assert body["choices"][0]["text"] == ref[prompt] and body["choices"][0]["finish_reason"] == "length"
    lat = sorted(latencies)
    print(f"\nload test: 500 requests, 64 clients, max_tokens 8: {500 / wall:.1f} requests/s, "
          f"p50 {lat[249] * 1000:.0f} ms, p99 {lat[494] * 1000:.0f} ms, wall {wall:.1f} s")
    _wait_metric(server, "nanoserve_kv_blocks_used", 0)
    after = _metrics(server)
    assert after["nanoserve_num_requests_running"] == after["nanoserve_num_requests_waiting"] == 0
    finished = 'nanoserve_requests_finished_total{finish_reason="length"}'
    assert after[finished] - before.get(finished, 0) == 500
    ttft = "nanoserve_time_to_first_token_seconds_count"
    assert after[ttft] - before.get(ttft, 0) == 500
    assert after["nanoserve_generation_tokens_total"] - before["nanoserve_generation_tokens_total"] == 4000


def test_disconnected_streams_are_aborted_and_free_their_blocks(server, tiny_llm):
    """20 clients that hang up mid-stream are aborted (their KV blocks go back to the pool);
    4 other clients streaming at the same time get their full, correct results."""
    ref = [r.outputs[0].text for r in _offline(tiny_llm, PROMPTS, max_tokens=20, temperature=0.0)]
    before = _metrics(server).get(ABORTED, 0)

    async def run() -> tuple[list[str], dict]:
        all_started, keepers_started, hang_up, seen, kept = (asyncio.Event(), asyncio.Event(),
                                                             asyncio.Event(), [], [])

        async def quitter(http: httpx.AsyncClient) -> None:
            body = {"model": MODEL, "prompt": "Hi", "max_tokens": 110, "ignore_eos": True, "stream": True}
            async with http.stream("POST", "/v1/completions", json=body) as r:
                lines = r.aiter_lines()         # held: a collected iterator would close the stream
                async for line in lines:
                    if line.startswith("data: "):
                        seen.append(1)
                        if len(seen) == 20:
                            all_started.set()
                        break
                await hang_up.wait()

        async def keeper(http: httpx.AsyncClient, prompt: str) -> str:
            body = {"model": MODEL, "prompt": prompt, "max_tokens": 20, "temperature": 0, "stream": True}
            lines = []
            async with http.stream("POST", "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line and not lines:          # this keeper's first event
                        kept.append(1)
                        if len(kept) == len(PROMPTS):
                            keepers_started.set()
                    if line:
                        lines.append(line)
            assert lines[-1] == "data: [DONE]"
            return "".join(c["text"] for e in _events(lines) for c in e["choices"])

        async with httpx.AsyncClient(base_url=server, headers=AUTH, timeout=60) as http:
            quitters = [asyncio.create_task(quitter(http)) for _ in range(20)]
            await all_started.wait()
            during = await asyncio.to_thread(_metrics, server)
            keepers = asyncio.gather(*(keeper(http, p) for p in PROMPTS))
            await keepers_started.wait()
            hang_up.set()                       # the 20 hang up while the keepers stream
            texts = await keepers
            await asyncio.gather(*quitters)
        return texts, during

    texts, during = asyncio.run(run())
    assert during["nanoserve_kv_blocks_used"] > 0 and during["nanoserve_num_requests_running"] >= 20
    assert texts == ref
    assert _wait_aborted(server, before + 20)[ABORTED] - before == 20


# ---- client errors ---------------------------------------------------------------------
BAD_REQUESTS = {
    "malformed json": (dict(content=b'{"model": "tiny-gpt2", "prompt": '), 400, None),
    "not an object": (dict(json=["hello"]), 400, None),
    "missing prompt": (dict(json={"model": MODEL}), 400, "prompt"),
    "max_tokens a string": (dict(json={"model": MODEL, "prompt": "a", "max_tokens": "ten"}), 400, "max_tokens"),
    "n a float": (dict(json={"model": MODEL, "prompt": "a", "n": 1.5}), 400, "n"),
    "prompt a dict": (dict(json={"model": MODEL, "prompt": {"text": "a"}}), 400, "prompt"),
    "negative temperature": (dict(json={"model": MODEL, "prompt": "a", "temperature": -1}), 400, "temperature"),
    "top_p zero": (dict(json={"model": MODEL, "prompt": "a", "top_p": 0}), 400, "top_p"),
    "max_tokens zero": (dict(json={"model": MODEL, "prompt": "a", "max_tokens": 0}), 400, "max_tokens"),
    "too many logprobs": (dict(json={"model": MODEL, "prompt": "a", "logprobs": 99}), 400, "logprobs"),
    "too many choices": (dict(json={"model": MODEL, "prompt": "a", "n": 1000}), 400, "n"),
    "beyond n_ctx": (dict(json={"model": MODEL, "prompt": "a", "max_tokens": 1000}), 400, "prompt"),
    "token id beyond vocab": (dict(json={"model": MODEL, "prompt": [1, 99999999]}), 400, "prompt"),
    "empty prompt": (dict(json={"model": MODEL, "prompt": ""}), 400, "prompt"),
    "empty prompt list": (dict(json={"model": MODEL, "prompt": []}), 400, "prompt"),
    "unknown option": (dict(json={"model": MODEL, "prompt": "a", "temprature": 0}), 400, "temprature"),
    "unsupported option": (dict(json={"model": MODEL, "prompt": "a", "suffix": "b"}), 400, "suffix"),
    "best_of below n": (dict(json={"model": MODEL, "prompt": "a", "n": 3, "best_of": 2}), 400, "best_of"),
    "best_of streamed": (dict(json={"model": MODEL, "prompt": "a", "best_of": 3, "stream": True}), 400, "best_of"),
    "penalty out of range": (dict(json={"model": MODEL, "prompt": "a", "presence_penalty": 2.5}), 400,
                             "presence_penalty"),
    "logit_bias key not an id": (dict(json={"model": MODEL, "prompt": "a", "logit_bias": {"x": 1}}), 400,
                                 "logit_bias"),
    "logit_bias key a superscript": (dict(json={"model": MODEL, "prompt": "a", "logit_bias": {"²": 1}}), 400,
                                     "logit_bias"),
    "logit_bias id beyond vocab": (dict(json={"model": MODEL, "prompt": "a", "logit_bias": {"99999": 1}}), 400,
                                   "logit_bias"),
    "logit_bias over 100": (dict(json={"model": MODEL, "prompt": "a", "logit_bias": {"5": 500}}), 400,
                            "logit_bias"),
    "unknown model": (dict(json={"model": "gpt-4", "prompt": "a"}), 404, "model"),
    "lone surrogate in prompt": (dict(content=b'{"model": "tiny-gpt2", "prompt": "a\\ud800b", "echo": true}'), 400,
                                 "prompt"),
    "unknown stream option": (dict(json={"model": MODEL, "prompt": "a", "stream": True,
                                         "stream_options": {"nonsense": True}}), 400, "stream_options"),
    "stream_options without stream": (dict(json={"model": MODEL, "prompt": "a",
                                                 "stream_options": {"include_usage": True}}), 400, "stream_options"),
    "seed beyond 64 bits": (dict(json={"model": MODEL, "prompt": "a", "seed": 2**64}), 400, "seed"),
    "too many stop strings": (dict(json={"model": MODEL, "prompt": "a", "stop": [f"s{i}" for i in range(33)]}), 400,
                              "stop"),
    "stop string too long": (dict(json={"model": MODEL, "prompt": "a", "stop": ["x" * 257]}), 400, "stop"),
    "max_tokens and max_completion_tokens differ": (dict(json={"model": MODEL, "prompt": "a", "max_tokens": 3,
                                                               "max_completion_tokens": 4}), 400, None),
    "missing api key": (dict(json={"model": MODEL, "prompt": "a"}, headers={}), 401, None),
    "wrong api key": (dict(json={"model": MODEL, "prompt": "a"}, headers={"Authorization": "Bearer nope"}), 401, None),
    # The key is checked before the body is read: without it, a broken body is still a 401.
    "malformed json without a key": (dict(content=b'{"prompt": ', headers={}), 401, None),
    "oversized body without a key": (dict(json={"model": MODEL, "prompt": "a " * 40_000}, headers={}), 401, None),
    "oversized body": (dict(json={"model": MODEL, "prompt": "a " * 40_000}), 413, None),
    "oversized chunked body": (dict(content=iter([b'{"prompt": "' + b"a" * 70_000 + b'"}'])), 413, None),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_an_openai_error_and_the_server_keeps_serving(server, case):
    """Each client mistake gets its 4xx with an OpenAI error object naming the problem; no traceback."""
    kwargs, status, param = BAD_REQUESTS[case]
    headers = {"Content-Type": "application/json", **kwargs.pop("headers", AUTH)}
    r = httpx.post(server + "/v1/completions", headers=headers, timeout=30, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"] and "Traceback" not in r.text
    assert error["param"] == param
    if status == 404:
        assert error["code"] == "model_not_found"
    assert _post(server, prompt="still serving", max_tokens=2).status_code == 200


def test_openai_client_raises_its_typed_errors(server):
    """The official client maps our statuses to its exceptions: 400, 401, 404."""
    with pytest.raises(openai.BadRequestError, match="temperature"):
        _client(server).completions.create(model=MODEL, prompt="a", temperature=5)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        _client(server).completions.create(model="davinci-002", prompt="a")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).models.list()


def test_unknown_route_and_method_get_openai_errors(server):
    """404 and 405 from routing are OpenAI error objects too."""
    assert httpx.get(server + "/v1/nothing").json()["error"]["message"]
    r = httpx.get(server + "/v1/completions", headers=AUTH)
    assert r.status_code == 405 and r.json()["error"]["message"]


# ---- admission, timeouts, shutdown ---------------------------------------------------------
def test_serve_flags_default_to_loopback_and_port_8000():
    """The server binds 127.0.0.1 unless told otherwise: nothing is exposed by accident."""
    import argparse
    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    args = parser.parse_args([])
    assert (args.host, args.port, args.rate_limit) == ("127.0.0.1", 8000, None)


def test_health_is_503_until_warm_up_is_done(tiny_ckpt):
    """Before the engine thread has warmed up, /health says 503 and completions are refused."""
    app = build_app(EngineConfig(model=str(tiny_ckpt), device="cpu", quiet=True, num_blocks=64))

    async def run() -> tuple[httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=app)   # no lifespan: the engine thread never starts
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return await http.get("/health"), await http.post("/v1/completions", json={"model": "hub", "prompt": "a"})

    health, completion = asyncio.run(run())
    assert health.status_code == 503 and health.json()["status"] == "starting"
    assert completion.status_code == 503


def test_rate_limit_answers_429_with_retry_after(one_seq_engine):
    """A client over its token bucket (burst 2, then 0.05/s) gets 429 with Retry-After; others are unaffected."""
    with _in_process(one_seq_engine, rate_limit=0.05, rate_limit_burst=2) as (base, _):
        statuses = [_post(base, prompt="a", max_tokens=1).status_code for _ in range(2)]
        r = _post(base, prompt="a", max_tokens=1)
        assert statuses == [200, 200] and r.status_code == 429
        assert int(r.headers["Retry-After"]) >= 1 and r.json()["error"]["code"] == "rate_limit_exceeded"
        assert httpx.get(base + "/health").status_code == 200
        # No --api-key: the Authorization header is unchecked, so a new one is not a new client.
        other = httpx.post(base + "/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 1},
                           headers={"Authorization": "Bearer somebody-else"})
        assert other.status_code == 429


def test_full_queue_answers_503_with_retry_after(one_seq_engine):
    """With the batch full and max_queue=2 prompts waiting, the next request gets 503 + Retry-After;
    the waiting ones still complete once the batch frees up."""
    with _in_process(one_seq_engine, max_queue=2) as (base, server):
        async def run() -> tuple[list[int], httpx.Response]:
            async with httpx.AsyncClient(base_url=base, headers=AUTH, timeout=60) as http:
                async with http.stream("POST", "/v1/completions", json={"model": MODEL, **LONG, "stream": True}) as s:
                    lines = s.aiter_lines()     # held: a collected iterator would close the stream
                    async for line in lines:
                        if line.startswith("data: "):
                            break                   # the long request is running
                    waiting = [asyncio.create_task(http.post("/v1/completions",
                                                             json={"model": MODEL, "prompt": "a", "max_tokens": 1}))
                               for _ in range(2)]
                    while (await asyncio.to_thread(_metrics, base))["nanoserve_num_requests_waiting"] < 3:
                        await asyncio.sleep(0.02)
                    refused = await http.post("/v1/completions", json={"model": MODEL, "prompt": "a"})
                # leaving the stream hangs up: the long request is aborted and the queue drains
                return [(await w).status_code for w in waiting], refused

        statuses, refused = asyncio.run(run())
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
        assert refused.json()["error"]["code"] == "queue_full"
        assert statuses == [200, 200]
        _wait_metric(base, "nanoserve_kv_blocks_used", 0)
        assert server.num_admitted == server.core.num_dequeued == 3     # the queue is empty again
        # More prompts in one request than the queue can ever hold: a 400, since retrying can't help.
        too_many = _post(base, prompt=["a", "b", "c"], max_tokens=1)
        assert too_many.status_code == 400 and "--max-queue" in too_many.json()["error"]["message"]


def test_request_timeout_aborts_with_a_clear_error(one_seq_engine):
    """A request running past --request-timeout is aborted: 504 when not streamed, an error event
    then [DONE] when streamed; its KV blocks are freed."""
    with _in_process(one_seq_engine, request_timeout=0.5) as (base, server):
        t0 = time.perf_counter()
        r = _post(base, **LONG)
        assert r.status_code == 504 and "--request-timeout" in r.json()["error"]["message"]
        assert time.perf_counter() - t0 < 5
        with httpx.stream("POST", base + "/v1/completions", json={"model": MODEL, **LONG, "stream": True}) as s:
            lines = [line for line in s.iter_lines() if line]
        assert lines[-1] == "data: [DONE]"
        assert _events(lines)[-1]["error"]["code"] == "request_timeout"
        with pytest.raises(openai.APIError, match="--request-timeout"):   # the official client raises it
            list(_client(base).completions.create(model=MODEL, prompt="Hi", n=16, max_tokens=LONG["max_tokens"], temperature=0,
                                                  stream=True, extra_body={"ignore_eos": True}))
        _wait_aborted(base, 2)                        # at least one completion of each request
        assert server.num_admitted == server.core.num_dequeued == 3


def test_plain_request_is_aborted_when_its_client_hangs_up(one_seq_engine):
    """A non-streamed request whose client goes away is aborted too: its blocks are freed."""
    with _in_process(one_seq_engine) as (base, _):
        async def run() -> None:
            # Hang up only once the request runs: a client gone before the server read the body
            # (a client-side timeout on a loaded machine) never becomes a request at all.
            async with httpx.AsyncClient(base_url=base, headers=AUTH, timeout=60) as http:
                post = asyncio.create_task(http.post("/v1/completions", json={"model": MODEL, **LONG}))
                while (await asyncio.to_thread(_metrics, base))["nanoserve_num_requests_running"] < 1:
                    await asyncio.sleep(0.02)
                post.cancel()                   # the connection closes under the pending response
                with contextlib.suppress(asyncio.CancelledError):
                    await post
        asyncio.run(run())
        _wait_aborted(base, 1)


def test_draining_server_refuses_new_work_and_aborts_stragglers(one_seq_engine):
    """After SIGTERM's drain begins: new requests get 503, /health 503, and an in-flight stream
    that outlives --shutdown-timeout ends with an error event, not a cut connection."""
    with _in_process(one_seq_engine, shutdown_timeout=0.3) as (base, server):
        with httpx.stream("POST", base + "/v1/completions", json={"model": MODEL, **LONG, "stream": True}) as s:
            lines = s.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            server.loop.call_soon_threadsafe(server.begin_drain)
            time.sleep(0.05)
            refused = _post(base, prompt="a", max_tokens=1)
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
            assert httpx.get(base + "/health").status_code == 503
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]" and _events(rest)[-1]["error"]["code"] == "shutting_down"
        _wait_metric(base, "nanoserve_kv_blocks_used", 0)


def test_sigterm_finishes_in_flight_stream_and_exits_zero(tiny_ckpt, tmp_path):
    """SIGTERM: the server stops admitting, lets the in-flight stream finish properly, exits 0."""
    log = tmp_path / "server.log"
    proc, base = _start_subprocess(tiny_ckpt, log, "--num-blocks", "256")
    try:
        body = {"model": MODEL, "prompt": "Hi", "n": 2, "max_tokens": 60, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as s:
            lines = s.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.05)
            try:
                assert httpx.post(base + "/v1/completions", json={"model": MODEL, "prompt": "a"}).status_code == 503
            except httpx.ConnectError:
                pass                        # the listening socket is already closed: also refused
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert sorted(c["index"] for e in _events(rest) for c in e["choices"] if c["finish_reason"]) == [0, 1]
        assert all(c["finish_reason"] == "length" for e in _events(rest) for c in e["choices"] if c["finish_reason"])
        assert proc.wait(30) == 0, log.read_text()
    finally:
        proc.kill()
    assert "Traceback" not in log.read_text()


# ---- issue 9: no request can kill, stall or starve the server -----------------------------
class _CountingTokenizer:
    """The engine's tokenizer, counting encode calls and noting the thread each ran on."""

    def __init__(self, tok) -> None:
        self.tok, self.threads = tok, []

    def encode(self, text: str) -> list[int]:
        self.threads.append(threading.get_ident())
        return self.tok.encode(text)

    def __getattr__(self, name: str):
        return getattr(self.tok, name)


def _loop_thread(server) -> int:
    async def ident() -> int:
        return threading.get_ident()
    return asyncio.run_coroutine_threadsafe(ident(), server.loop).result(5)


def test_rate_limited_and_oversized_prompts_are_refused_before_tokenizing(one_seq_engine):
    """The cheap checks come first: a request the rate limiter refuses, or one whose prompts
    exceed --max-prompt-chars, is answered without tokenizing anything."""
    with _in_process(one_seq_engine, rate_limit=0.05, rate_limit_burst=2, max_prompt_chars=1000) as (base, server):
        server.tokenizer = counting = _CountingTokenizer(server.tokenizer)
        too_long = _post(base, prompt="a " * 501, max_tokens=1)
        assert too_long.status_code == 400 and "--max-prompt-chars" in too_long.json()["error"]["message"]
        assert _post(base, prompt="a", max_tokens=1).status_code == 200
        assert len(counting.threads) == 1
        refused = _post(base, prompt="word " * 199, max_tokens=1)
        assert refused.status_code == 429 and len(counting.threads) == 1


def test_prompts_are_tokenized_and_responses_built_off_the_event_loop(one_seq_engine):
    """A long prompt's tokenizing and a large response's building run in worker threads, so
    they never stall the event loop (and with it every other client)."""
    with _in_process(one_seq_engine) as (base, server):
        server.tokenizer = counting = _CountingTokenizer(server.tokenizer)
        built, body = [], server.responses.body
        server.responses.body = lambda *a: built.append(threading.get_ident()) or body(*a)
        assert _post(base, prompt="Hello world", max_tokens=2, logprobs=2).status_code == 200
        loop = _loop_thread(server)
        assert counting.threads and loop not in counting.threads
        assert built and loop not in built


@pytest.mark.parametrize("body, flag", [
    (dict(prompt=["a"] * 120, n=4, best_of=20, max_tokens=120), "--max-request-tokens"),
    (dict(prompt=["a"] * 200, n=16, max_tokens=20, logprobs=20), "--max-request-logprobs"),
])
def test_work_per_request_is_bounded(server, body, flag):
    """Prompts x candidates x max_tokens, and the logprobs a response would hold, are bounded
    before anything runs: over the limit is a 400 that names the flag."""
    r = _post(server, **body)
    assert r.status_code == 400 and flag in r.json()["error"]["message"], r.text


def test_echo_only_scoring_with_best_of_returns_n_choices_with_distinct_indexes(server):
    """max_tokens=0 + echo with best_of > n: scoring has nothing to choose from, so n choices
    per prompt come back, indexed prompt * n + i, never repeated."""
    r = _post(server, prompt=PROMPTS[:2], max_tokens=0, echo=True, logprobs=1, n=1, best_of=3)
    assert r.status_code == 200, r.text
    assert [c["index"] for c in r.json()["choices"]] == [0, 1]


def test_text_offset_never_points_past_text_cut_by_a_stop_string(server, tiny_llm):
    """A stop string spanning three tokens cuts the text at the first one's start: the tokens
    after it start past the cut, and their text_offset is the text's end, not beyond."""
    ref = _offline(tiny_llm, PROMPTS[1], max_tokens=24, temperature=0.0)[0].outputs[0]
    tok = tiny_llm.engine.tokenizer
    for k in range(4, 20):
        stop, cut = tok.decode(ref.token_ids[k:k + 3]), len(tok.decode(ref.token_ids[:k]))
        if len(stop) > 2 and ref.text.find(stop) == cut:
            break
    for stream in (False, True):
        resp = _client(server).completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=24, temperature=0,
                                                  stop=[stop], logprobs=0, stream=stream)
        chunks = list(resp) if stream else [resp]
        text = "".join(c.text for ch in chunks for c in ch.choices)
        offsets = [o for ch in chunks for c in ch.choices if c.logprobs for o in c.logprobs.text_offset]
        assert text == ref.text[:cut] and len(offsets) == k + 3
        assert all(o <= len(text) for o in offsets) and offsets[-2:] == [cut, cut]


def test_nan_logprobs_are_a_clear_error_never_invalid_json(tiny_ckpt):
    """A model with broken (NaN) weights: a plain request gets a 500 naming NaN; a stream
    ends with that error event; every byte sent is strict JSON."""
    engine = LLMEngine(EngineConfig(model=str(tiny_ckpt), device="cpu", quiet=True, num_blocks=64))
    with torch.no_grad():
        engine.model.ln_f.weight.fill_(float("nan"))
    strict = lambda text: json.loads(text, parse_constant=lambda c: pytest.fail(f"invalid JSON constant {c}"))
    with _in_process(engine) as (base, _):
        r = _post(base, prompt="Hello", max_tokens=3, temperature=0, logprobs=1)
        assert r.status_code == 500 and "NaN" in strict(r.text)["error"]["message"]
        with httpx.stream("POST", base + "/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 3,
                                                                 "temperature": 0, "logprobs": 1, "stream": True}) as s:
            lines = [line for line in s.iter_lines() if line]
        events = [strict(line[6:]) for line in lines[:-1]]
        assert lines[-1] == "data: [DONE]" and events[-1]["error"]["code"] == "invalid_model_output"


def test_dead_engine_thread_answers_every_request_and_reports_failure(tiny_ckpt):
    """If the engine thread dies (here: a step error whose clean-up fails too), the running
    stream gets an error event, requests still waiting to be admitted get 500 (even with no
    request timeout), /health says "failed" and new requests get 503: no request hangs."""
    engine = LLMEngine(EngineConfig(model=str(tiny_ckpt), device="cpu", quiet=True, max_num_seqs=1, num_blocks=256,
                                    context_overflow="shift"))      # as one_seq_engine, for LONG
    gate = threading.Event()

    def stuck_step(*args, **kwargs):
        gate.wait()
        raise RuntimeError("injected step failure")

    def broken_abort(*args, **kwargs):
        raise RuntimeError("injected abort failure")

    with _in_process(engine, request_timeout=None) as (base, server):
        async def run() -> tuple[list[str], list[httpx.Response]]:
            async with httpx.AsyncClient(base_url=base, timeout=30) as http:
                async with http.stream("POST", "/v1/completions", json={"model": MODEL, **LONG, "stream": True}) as s:
                    lines = s.aiter_lines()
                    async for line in lines:
                        if line.startswith("data: "):
                            break                   # the long request is running
                    engine.step, engine.abort_request = stuck_step, broken_abort
                    waiting = [asyncio.create_task(http.post("/v1/completions", json={"model": MODEL, "prompt": "a"}))
                               for _ in range(2)]
                    while server.num_admitted < 3:  # both added: their verdicts wait for the engine
                        await asyncio.sleep(0.01)
                    gate.set()
                    rest = [line async for line in lines if line]
                return rest, [await w for w in waiting]

        rest, waiting = asyncio.run(asyncio.wait_for(run(), 60))
        assert rest[-1] == "data: [DONE]" and "engine failed" in _events(rest)[-1]["error"]["message"]
        assert [w.status_code for w in waiting] == [500, 500]
        assert server.failed and "injected" in server.failed
        health = httpx.get(base + "/health")
        assert health.status_code == 503 and health.json()["status"] == "failed"
        assert _post(base, prompt="a").status_code == 503


_DYING_SERVER = """
import sys
from nanoserve.engine import LLMEngine
real_step = LLMEngine.step
def step(self, *args, **kwargs):
    if {when}:
        raise RuntimeError("injected engine failure")
    return real_step(self, *args, **kwargs)
def abort_request(self, request_id):
    raise RuntimeError("injected abort failure")
LLMEngine.step, LLMEngine.abort_request = step, abort_request
from nanoserve.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("when", ["warm-up", "serving"])
def test_serve_exits_nonzero_when_the_engine_thread_dies(tiny_ckpt, tmp_path, when):
    """`serve` whose engine fails at warm-up, or dies while serving, exits with status 1 (the
    request in flight gets its 500 first) instead of staying up unhealthy forever."""
    condition = "True" if when == "warm-up" else "any(r.startswith('cmpl-') for r in self.requests)"
    port, log = _free_port(), tmp_path / "server.log"
    proc = subprocess.Popen([sys.executable, "-c", _DYING_SERVER.format(when=condition), "serve", "--model",
                             str(tiny_ckpt), "--device", "cpu", "--quiet", "--port", str(port)],
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        if when == "serving":
            _wait_healthy(f"http://127.0.0.1:{port}", proc, log)
            r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"model": "hub", "prompt": "a"}, timeout=30)
            assert r.status_code == 500 and "engine failed" in r.json()["error"]["message"]
        assert proc.wait(60) == 1, log.read_text()
    finally:
        proc.kill()
    assert "injected engine failure" in log.read_text()


@pytest.mark.parametrize("flags, field", [(["--api-key", ""], "api_key"), (["--request-timeout", "nan"],
                                                                           "request_timeout"),
                                          (["--model", "/nonexistent/model"], "/nonexistent/model")])
def test_serve_refuses_bad_flags_with_a_clear_error(flags, field, tiny_ckpt):
    """An empty --api-key (it would turn authentication off), a NaN timeout, or a model that
    cannot load: `serve` exits with status 2 and a one-line error naming it, no traceback."""
    r = subprocess.run([sys.executable, "-m", "nanoserve", "serve", "--model", str(tiny_ckpt), "--device", "cpu",
                        "--port", str(_free_port()), *flags], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and field in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_non_loopback_host_without_a_key_warns_loudly(caplog):
    """Binding a non-loopback address with no API key logs a WARNING; loopback, or a key, does not."""
    from nanoserve.launch import _warn_if_exposed
    with caplog.at_level(logging.WARNING, logger="nanoserve.server"):
        _warn_if_exposed("127.0.0.1", None)
        _warn_if_exposed("0.0.0.0", "key")
        assert not caplog.records
        _warn_if_exposed("0.0.0.0", None)
    assert caplog.records[0].levelno == logging.WARNING and "no --api-key" in caplog.records[0].getMessage()


@pytest.mark.parametrize("path", ["/metrics", "/docs", "/redoc", "/openapi.json", "/v1/models"])
def test_every_route_but_health_needs_the_api_key(server, path):
    """With --api-key, /metrics (whose prefix-cache counter tells about other clients' prompts),
    the docs and the OpenAPI schema need the key; /health never does."""
    assert httpx.get(server + path).status_code == 401
    assert httpx.get(server + path, headers=AUTH).status_code == 200
    assert httpx.get(server + "/health").status_code == 200


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "Bearer"])
def test_bearer_scheme_is_case_insensitive(server, scheme):
    """RFC 7235: the auth scheme is case-insensitive; the key itself is not."""
    assert httpx.get(server + "/v1/models", headers={"Authorization": f"{scheme} {KEY}"}).status_code == 200
    assert httpx.get(server + "/v1/models", headers={"Authorization": f"{scheme} {KEY.upper()}"}).status_code == 401


def test_openapi_schema_documents_400_not_422(server):
    """The server answers a bad body with 400, and its OpenAPI schema says so."""
    responses = httpx.get(server + "/openapi.json", headers=AUTH).json()["paths"]["/v1/completions"]["post"]["responses"]
    assert "400" in responses and "422" not in responses


def test_server_log_says_why_a_request_got_400(one_seq_engine, caplog):
    """A 400 is logged with its reason, not only "400 Bad Request"."""
    with caplog.at_level(logging.INFO, logger="nanoserve.server"), _in_process(one_seq_engine) as (base, _):
        assert _post(base, prompt="a", temperature=7).status_code == 400
    assert any("400" in r.getMessage() and "temperature" in r.getMessage() for r in caplog.records)


def test_x_forwarded_for_is_ignored_unless_the_proxy_is_trusted(one_seq_engine):
    """By default a client cannot pick its rate-limit bucket by sending X-Forwarded-For;
    with --forwarded-allow-ips naming the proxy, the header is the client's address."""
    for trusted, want in ((None, 429), ("127.0.0.1", 200)):
        with _in_process(one_seq_engine, rate_limit=0.05, rate_limit_burst=1, forwarded_allow_ips=trusted) as (base, _):
            statuses = [httpx.post(base + "/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 1},
                                   headers={"X-Forwarded-For": ip}).status_code for ip in ("10.0.0.1", "10.0.0.2")]
        assert statuses == [200, want]


def test_half_sent_requests_are_cut_off(one_seq_engine):
    """Slowloris: a connection that never finishes its request head, or its body, gets 408 and
    is closed after --header-timeout / --body-timeout (here 0.5 s) instead of staying open."""
    with _in_process(one_seq_engine, header_timeout=0.5, body_timeout=0.5, timeout_keep_alive=1) as (base, _):
        host, port = base[len("http://"):].split(":")
        partial = [b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: app",
                   b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"model\": "]
        for data in partial:
            with socket.create_connection((host, int(port))) as sock:
                sock.sendall(data)
                sock.settimeout(10)
                t0, reply = time.monotonic(), b""
                while chunk := sock.recv(4096):     # b"": the server closed the connection
                    reply += chunk
                assert reply.startswith(b"HTTP/1.1 408") and time.monotonic() - t0 < 5, reply


def test_connection_limits_and_read_deadlines_reach_uvicorn(one_seq_engine):
    """serve's uvicorn gets the connection limit, keep-alive, head size and proxy settings."""
    app = build_app(one_seq_engine, limit_concurrency=7, timeout_keep_alive=3, max_header_bytes=9000)
    config = uvicorn_config(app)
    assert (config.limit_concurrency, config.timeout_keep_alive, config.h11_max_incomplete_event_size) == (7, 3, 9000)
    assert config.proxy_headers is False


# ---- the clients people use ----------------------------------------------------------------
@pytest.mark.parametrize("older", [False, True])
def test_guidellm_streamed_request_body_is_served_with_continuous_usage(server, older):
    """guidellm's text-completions body, as TextCompletionsRequestHandler.format builds it (and
    as older releases did, with max_completion_tokens too): every chunk carries its choice's
    usage so far (vLLM's continuous_usage_stats), the last one the totals."""
    body = {"model": MODEL, "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            "max_tokens": 12, "stop": None, "ignore_eos": True, "prompt": PROMPTS[0]}
    if older:
        body["max_completion_tokens"] = 12
    with httpx.stream("POST", server + "/v1/completions", json=body, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200, r.read()
        events = _events([line for line in r.iter_lines() if line])
    counts = [e["usage"]["completion_tokens"] for e in events[:-1]]
    assert counts == sorted(counts) and counts[-1] == 12 and all(e["usage"]["prompt_tokens"] == 5 for e in events)
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 12


def test_lm_eval_loglikelihood_request_body_matches_the_engine(server, tiny_llm):
    """lm-eval local-completions' loglikelihood body (token-id prompts, echo, logprobs 1,
    max_tokens 1, seed 1234): the prompt tokens' logprobs equal the engine's."""
    ref = _offline(tiny_llm, PROMPTS[:2], max_tokens=1, temperature=0.0, prompt_logprobs=1)
    ids = [r.prompt_token_ids for r in ref]
    r = _post(server, prompt=ids, temperature=0, max_tokens=1, logprobs=1, seed=1234, echo=True)
    assert r.status_code == 200, r.text
    for choice, want in zip(r.json()["choices"], ref):
        got = choice["logprobs"]["token_logprobs"][1:len(want.prompt_token_ids)]
        assert got == pytest.approx([d[t] for t, d in zip(want.prompt_token_ids[1:], want.prompt_logprobs[1:])],
                                    abs=1e-4)


def test_lm_eval_generate_until_request_body_matches_the_engine(server, tiny_llm):
    """lm-eval local-completions' generate_until body (stop: the task's `until` plus the EOS
    string, seed 1234, temperature 0): the same texts as LLM.generate."""
    stop = ["\n\n", "<|endoftext|>"]
    r = _post(server, prompt=PROMPTS, max_tokens=16, temperature=0, stop=stop, seed=1234)
    ref = _offline(tiny_llm, PROMPTS, max_tokens=16, temperature=0.0, stop=stop)
    assert [c["text"] for c in r.json()["choices"]] == [o.outputs[0].text for o in ref]


def test_vllm_extensions_are_accepted_with_vllm_meaning(server, tiny_llm):
    """top_k/min_p/repetition_penalty (null: defaults), skip_special_tokens,
    spaces_between_special_tokens, include_stop_str_in_output (the text keeps its stop
    string), truncate_prompt_tokens (the last k prompt tokens) and prompt_logprobs."""
    full = _offline(tiny_llm, PROMPTS[1], max_tokens=24, temperature=0.0)[0].outputs[0].text
    stop = full[len(full) // 2: len(full) // 2 + 4]
    cut = _offline(tiny_llm, PROMPTS[1], max_tokens=24, temperature=0.0, stop=stop)[0].outputs[0].text
    for stream in (False, True):
        resp = _client(server).completions.create(
            model=MODEL, prompt=PROMPTS[1], max_tokens=24, temperature=0, stop=[stop], stream=stream,
            extra_body={"include_stop_str_in_output": True, "top_k": None, "min_p": None, "repetition_penalty": None,
                        "skip_special_tokens": True, "spaces_between_special_tokens": True})
        assert "".join(c.text for ch in (list(resp) if stream else [resp]) for c in ch.choices) == cut + stop
    ids = tiny_llm.engine.tokenizer.encode(PROMPTS[0])
    r = _post(server, prompt=PROMPTS[0], max_tokens=4, temperature=0, echo=True, truncate_prompt_tokens=3,
              prompt_logprobs=2).json()
    ref = _offline(tiny_llm, [ids[-3:]], max_tokens=4, temperature=0.0, prompt_logprobs=2)[0]
    assert r["usage"]["prompt_tokens"] == 3
    assert r["choices"][0]["text"] == tiny_llm.engine.tokenizer.decode(ids[-3:]) + ref.outputs[0].text
    plp = r["choices"][0]["prompt_logprobs"]
    assert plp[0] is None and len(plp) == 3
    for t, got, want in zip(ref.prompt_token_ids[1:], plp[1:], ref.prompt_logprobs[1:]):
        assert got[str(t)]["logprob"] == pytest.approx(want[t], abs=1e-4)
        assert got[str(t)]["decoded_token"] == tiny_llm.engine.tokenizer.decode([t])
        assert sorted(v["rank"] for v in got.values() if v["rank"] is not None) == [1, 2]


def test_chat_completions_says_to_use_completions(server):
    """GPT-2 is a base model: /v1/chat/completions answers a 400 pointing at /v1/completions."""
    with pytest.raises(openai.BadRequestError, match="/v1/completions"):
        _client(server).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])


def test_models_retrieve_and_max_model_len(server):
    """GET /v1/models/{id} (the SDK's models.retrieve) finds the served model, 404 for others;
    entries carry max_model_len, as vLLM's do."""
    assert _client(server).models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        _client(server).models.retrieve("gpt-4")
    entry = httpx.get(server + f"/v1/models/{MODEL}", headers=AUTH).json()
    assert entry["max_model_len"] == 128


def test_tokenize_and_detokenize_round_trip(server, tiny_llm):
    """vLLM's /tokenize and /detokenize: ids, count and max_model_len; and back to the text."""
    text = "Hello, my name is 東京"
    r = httpx.post(server + "/tokenize", json={"model": MODEL, "prompt": text, "return_token_strs": True},
                   headers=AUTH).json()
    ids = tiny_llm.engine.tokenizer.encode(text)
    assert (r["tokens"], r["count"], r["max_model_len"]) == (ids, len(ids), 128) and len(r["token_strs"]) == len(ids)
    back = httpx.post(server + "/detokenize", json={"model": MODEL, "tokens": ids}, headers=AUTH).json()
    assert back == {"prompt": text}
    bad = httpx.post(server + "/detokenize", json={"tokens": [10**9]}, headers=AUTH)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_metrics_come_from_prometheus_client(tiny_ckpt):
    """/metrics is rendered by prometheus_client from its own registry (one per server)."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.parser import text_string_to_metric_families
    app = build_app(EngineConfig(model=str(tiny_ckpt), device="cpu", quiet=True, num_blocks=64))
    metrics = app.state.server.core.metrics
    assert isinstance(metrics.registry, CollectorRegistry)
    families = {f.name: f.type for f in text_string_to_metric_families(metrics.render().decode())}
    assert families["nanoserve_time_to_first_token_seconds"] == "histogram"
    assert families["nanoserve_requests_finished"] == "counter" and families["nanoserve_kv_blocks_used"] == "gauge"


def test_fallback_model_answers_to_the_name_that_was_asked_for(tmp_path):
    """`serve --model gpt2` offline falls back to the embedded model; the README's request with
    "model": "gpt2" still works, and so does the embedded model's own name."""
    log = tmp_path / "server.log"
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "nanoserve", "serve", "--model", "gpt2", "--device", "cpu",
                             "--port", str(port)], stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "NANOSERVE_WEIGHTS": str(ROOT / "weights")})
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(base, proc, log)
        assert "embedded model" in log.read_text()
        assert [m["id"] for m in httpx.get(base + "/v1/models").json()["data"]] == ["gpt2", "nanoserve-stdlib-tiny"]
        for name in ("gpt2", "nanoserve-stdlib-tiny"):
            r = httpx.post(base + "/v1/completions", json={"model": name, "prompt": "def f(x):", "max_tokens": 4},
                           timeout=60)
            assert r.status_code == 200 and r.json()["model"] == name
    finally:
        proc.terminate()
        proc.wait(30)


# ---- last: after every attack above ------------------------------------------------------
def test_skip_special_tokens_false_puts_generated_end_of_text_in_the_text(server):
    """vLLM's skip_special_tokens=false: a generated <|endoftext|> (here forced by logit_bias,
    with ignore_eos so it does not stop) appears in the text, plain and streamed."""
    body = {"model": MODEL, "prompt": "a", "max_tokens": 3, "temperature": 0, "ignore_eos": True,
            "logit_bias": {"50256": 100}}
    plain = httpx.post(server + "/v1/completions", headers=AUTH, timeout=60,
                       json={**body, "skip_special_tokens": False}).json()
    assert plain["choices"][0]["text"] == "<|endoftext|>" * 3
    default = httpx.post(server + "/v1/completions", headers=AUTH, timeout=60, json=body).json()
    assert default["choices"][0]["text"] == ""
    streamed = "".join(c.choices[0].text for c in _client(server).completions.create(
        stream=True, extra_body={"ignore_eos": True, "skip_special_tokens": False},
        **{k: v for k, v in body.items() if k != "ignore_eos"}))
    assert streamed == "<|endoftext|>" * 3


def test_metrics_export_the_engines_memory_stats_and_context_shifts(tiny_ckpt):
    """/metrics carries LLMEngine.get_stats(): peak and cached-free KV blocks, usage, the prefix
    cache's hit rate, and a counter of context shifts that a generation past n_ctx makes."""
    engine = LLMEngine(EngineConfig(model=str(tiny_ckpt), device="cpu", quiet=True, num_blocks=64,
                                    context_overflow="shift"))
    n_ctx = engine.model_config.n_ctx
    with _in_process(engine) as (base, _):
        resp = httpx.post(base + "/v1/completions", timeout=120, json={
            "model": MODEL, "prompt": [5, 6, 7], "max_tokens": 2 * n_ctx, "temperature": 0, "ignore_eos": True})
        assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 2 * n_ctx
        stats, m = engine.get_stats(), _metrics(base)
    assert stats["num_shifts"] >= 1 and m["nanoserve_context_shifts_total"] == stats["num_shifts"]
    assert m["nanoserve_kv_blocks_peak"] == stats["peak_blocks_used"] > 0
    assert m["nanoserve_kv_blocks_cached_free"] == stats["num_blocks_cached_free"]
    assert m["nanoserve_kv_cache_usage_ratio"] == 0 == stats["num_blocks_used"]
    assert m["nanoserve_prefix_cache_hit_rate"] == pytest.approx(stats["prefix_cache_hit_rate"])
    assert m["nanoserve_kv_blocks_evicted_total"] == 0 and m["nanoserve_cuda_memory_allocated_bytes"] == 0


def test_a_request_the_engine_gives_up_on_gets_a_500_and_the_others_are_served(tiny_ckpt, monkeypatch):
    """When one request's bookkeeping raises inside the engine (RequestOutput.error), its client
    gets a 500 naming the error, not a 503 'shutting down'; a request beside it completes and
    the server stays healthy with its pool empty."""
    engine = LLMEngine(EngineConfig(model=str(tiny_ckpt), device="cpu", quiet=True, num_blocks=64))
    real, bad_prompt = engine.outputs.append, [11, 22, 33]

    def append(seq, token, logprobs):
        if seq.prompt_token_ids == bad_prompt:
            raise KeyError("undecodable token")
        return real(seq, token, logprobs)
    monkeypatch.setattr(engine.outputs, "append", append)
    with _in_process(engine) as (base, _):
        body = {"model": MODEL, "max_tokens": 8, "temperature": 0}
        bad = httpx.post(base + "/v1/completions", json={**body, "prompt": bad_prompt}, timeout=60)
        good = httpx.post(base + "/v1/completions", json={**body, "prompt": [4, 5, 6]}, timeout=60)
        assert bad.status_code == 500 and "undecodable token" in bad.json()["error"]["message"]
        assert good.status_code == 200 and good.json()["choices"][0]["finish_reason"] == "length"
        assert httpx.get(base + "/health", timeout=10).status_code == 200
        assert engine.allocator.num_free == engine.num_blocks


def test_echo_only_scores_a_full_context_window(server, tiny_llm):
    """An evaluation harness scores a whole n_ctx-token window with echo and max_tokens 0: the
    engine samples no token that would need position n_ctx, so the request is accepted and its
    logprobs equal the offline prompt logprobs."""
    n_ctx = tiny_llm.engine.model_config.n_ctx
    ids = [(7 * i + 3) % 50000 for i in range(n_ctx)]
    resp = httpx.post(server + "/v1/completions", headers=AUTH, timeout=60, json={
        "model": MODEL, "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0})
    assert resp.status_code == 200, resp.text
    lp = resp.json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == n_ctx and lp["token_logprobs"][0] is None
    ref = _offline(tiny_llm, [ids], max_tokens=1, temperature=0.0, prompt_logprobs=1)[0]
    want = [d[t] for t, d in zip(ids[1:], ref.prompt_logprobs[1:])]
    assert lp["token_logprobs"][1:] == pytest.approx(want, abs=1e-4)


def test_after_all_attacks_the_pool_is_empty_and_greedy_output_is_unchanged(server, tiny_llm, one_seq_engine):
    """Run last: the shared server, after every bad, huge, cancelled or timed-out request in
    this file, holds no KV block and still returns LLM.generate's greedy text; the in-process
    servers' engine is idle with its whole pool free."""
    _wait_metric(server, "nanoserve_kv_blocks_used", 0)
    m = _metrics(server)
    assert m["nanoserve_num_requests_running"] == m["nanoserve_num_requests_waiting"] == 0
    resp = _client(server).completions.create(model=MODEL, prompt=PROMPTS, max_tokens=12, temperature=0)
    assert [c.text for c in resp.choices] == [r.outputs[0].text for r in _offline(tiny_llm, PROMPTS, max_tokens=12,
                                                                                  temperature=0.0)]
    assert not one_seq_engine.has_unfinished_requests()
    assert one_seq_engine.allocator.num_free == one_seq_engine.num_blocks
