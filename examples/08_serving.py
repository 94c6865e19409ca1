"""Lesson 8: serving. The engine behind an OpenAI-compatible HTTP server, called with the official
`openai` client: a completion, a stream chunk by chunk, a stream cancelled midway, /metrics.
Read beside it: nanoserve/server.py (build_app, the routes), nanoserve/async_engine.py, docs/serving.md.
Try: `python -m nanoserve serve --model weights/nanoserve-stdlib-tiny` in a terminal, then curl it.
"""
# %%
import itertools
import threading
import time

import httpx
import openai
import uvicorn
from lesson_utils import MODEL_DIR, check

from nanoserve import LLM, EngineConfig, SamplingParams
from nanoserve.server import build_app

PROMPT = "def read_config(path):\n"
config = EngineConfig(model=str(MODEL_DIR), device="cpu", quiet=True, num_blocks=256)

# %% [markdown]
# The server runs in this process: `build_app` loads the engine and returns a FastAPI app, which
# starts the engine's own thread; uvicorn serves the app from a background thread, on a port the
# OS picks (port 0). `python -m nanoserve serve --model weights/nanoserve-stdlib-tiny --port 8000`
# does the same in a process of its own. /health says 200 once a warm-up generation has run.


# %%
def start_server() -> tuple[uvicorn.Server, threading.Thread]:
    uv = uvicorn.Server(uvicorn.Config(build_app(config), host="127.0.0.1", port=0, log_level="warning",
                                       timeout_graceful_shutdown=5))
    thread = threading.Thread(target=uv.run, name="lesson-08-uvicorn", daemon=True)
    thread.start()
    return uv, thread


def wait_until_healthy(uv: uvicorn.Server, thread: threading.Thread) -> str:
    """The server's base URL, once uvicorn listens and GET /health answers 200."""
    deadline = time.monotonic() + 60
    while not uv.started:                     # bound to its socket yet?
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    base = f"http://127.0.0.1:{uv.servers[0].sockets[0].getsockname()[1]}"
    while httpx.get(base + "/health", timeout=5).status_code != 200:
        assert time.monotonic() < deadline, "the server did not become healthy in 60 s"
        time.sleep(0.1)
    print(f"serving {MODEL_DIR.name} at {base}")
    return base


def metrics(base: str) -> dict[str, float]:
    """GET /metrics (Prometheus text: `name{labels} value` lines, `#` comments) as {name: value}."""
    lines = httpx.get(base + "/metrics", timeout=5).text.splitlines()
    return {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in lines if ln and not ln.startswith("#")}


def metric(values: dict[str, float], *words: str) -> float:
    """The sum of the metrics whose names hold all `words` (robust to small renames)."""
    return sum(v for name, v in values.items() if all(w in name for w in words))


# %% [markdown]
# What we do while it serves, each step printing what it saw: the model id from /v1/models
# (clients must send it), one greedy completion, the same prompt streamed chunk by chunk (one
# server-sent event per engine step with new text), and a long stream we close after a few
# chunks: the server notices the hang-up, aborts the request and frees its KV blocks.

# %%
def completion_and_stream(client: openai.OpenAI) -> tuple[str, str, str]:
    model_id = client.models.list().data[0].id
    resp = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=24, temperature=0)
    print(f"model {model_id!r}; completion: {resp.choices[0].text!r}\n  usage: {resp.usage.prompt_tokens} prompt "
          f"+ {resp.usage.completion_tokens} completion tokens")
    print("streamed, one chunk at a time as they arrive:")
    chunks = []
    stream = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=24, temperature=0, stream=True)
    for chunk in stream:
        chunks.append(chunk.choices[0].text)
        print(f"  {chunks[-1]!r}", end="", flush=True)
    print(f"\n  ({len(chunks)} chunks)")
    return model_id, resp.choices[0].text, "".join(chunks)


def cancel_midway(client: openai.OpenAI, model_id: str, base: str) -> tuple[float, dict[str, float]]:
    """Start a 900-token stream, read 5 chunks, hang up; wait until /metrics shows the abort."""
    stream = client.completions.create(model=model_id, prompt="import os\nimport sys\n", max_tokens=900,
                                       temperature=0, stream=True, extra_body={"ignore_eos": True})
    first_chunks = [c.choices[0].text for c in itertools.islice(stream, 5)]
    blocks_in_use = metric(metrics(base), "blocks", "used")
    stream.close()                            # closes the HTTP connection: the client has gone
    deadline = time.monotonic() + 20
    while metric(m := metrics(base), "finish", "abort") < 1 or metric(m, "blocks", "used") > 0:
        assert time.monotonic() < deadline, f"no abort in /metrics after 20 s: {m}"
        time.sleep(0.05)
    print(f"cancelled after 5 chunks ({''.join(first_chunks)!r}): KV blocks in use "
          f"{blocks_in_use:.0f} while streaming, {metric(m, 'blocks', 'used'):.0f} after the abort")
    return blocks_in_use, m


# %% [markdown]
# The server lives only inside this try: whatever fails, `finally` stops uvicorn (which stops
# the engine thread after the last response). The checks come after, on what we recorded.

# %%
uv, server_thread = start_server()
try:
    base = wait_until_healthy(uv, server_thread)
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", timeout=30, max_retries=0)
    model_id, server_text, streamed_text = completion_and_stream(client)
    blocks_while_streaming, after_cancel = cancel_midway(client, model_id, base)
    metrics_text = httpx.get(base + "/metrics", timeout=5).text
finally:
    uv.should_exit = True
    server_thread.join(30)
print("/metrics at the end (histogram buckets left out):")
for line in [ln for ln in metrics_text.splitlines() if ln.startswith("nanoserve_") and "_bucket" not in ln]:
    print("  " + line)
check("the server has shut down (its thread ended)", not server_thread.is_alive())
check("the streamed chunks add up to the plain completion", streamed_text == server_text)
check("the cancelled stream held KV blocks, and /metrics shows it aborted with every block freed",
      blocks_while_streaming > 0 and metric(after_cancel, "finish", "abort") >= 1
      and metric(after_cancel, "blocks", "used") == 0)

# %% [markdown]
# The server is the same engine behind HTTP: greedy text equals LLM.generate's.

# %%
llm = LLM(str(MODEL_DIR), device="cpu", quiet=True, num_blocks=256)
offline_text = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0].outputs[0].text
print(f"LLM.generate: {offline_text!r}")
check("the server's greedy completion equals LLM.generate's", server_text == offline_text)
