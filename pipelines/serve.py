"""`distlens serve` (`python -m pipelines.serve`): the staged model behind the OpenAI API on Ray
Serve. One deployment replica owns the stage group and the continuous batch (actors/serving.py);
each request carries its own steering edits and lens request under `"distlens"` in its body
(pipelines/serve_api.py: the checks and the response bodies). The driver checks the config,
starts or joins Ray (pipelines/session.py), deploys the app and waits until Ctrl-C or SIGTERM
(`ray job stop`), which take the app down."""

# no `from __future__ import annotations`: FastAPI reads the routes' annotations (Request) as types
import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import hydra
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from omegaconf import DictConfig, OmegaConf
from ray import serve

from pipelines import session
from pipelines.config import register

register()
api = FastAPI(title="distlens", docs_url=None, redoc_url=None, openapi_url=None)


class Server:
    """What the replica serves with: the engine, the model facts the checks read, the vectors,
    the tokenizer. Built from the driver's resolved config (`settings`)."""

    def __init__(self, settings: dict):
        from actors.checkpoint import load_tokenizer
        from actors.executor import LocalExecutor, RayExecutor
        from actors.serving import ServeEngine, serving_specs
        from pipelines.config import cluster_settings, run_spec
        from pipelines.serve_api import Vectors, model_facts

        cfg = OmegaConf.create(settings["cfg"])
        self.api_key = settings["api_key"]
        spec = run_spec(cfg, settings["model_path"], "")
        self.facts, hf_config = model_facts(cfg, settings["model_path"], spec)
        self.tokenizer = load_tokenizer(settings["model_path"])
        self.vectors = Vectors(self.facts)
        for entry in cfg.serve.vectors:
            self.vectors.load(str(entry), cfg.model.name)
        c = cluster_settings(cfg.cluster)
        name = f"distlens-{cfg.serve.app}"
        self.executor = LocalExecutor() if c.executor == "local" else RayExecutor.for_cluster(c, actor_names=name)
        self.engine = ServeEngine(
            serving_specs(spec, hf_config), self.executor, c, self.facts.eos, self.facts.pad, self.tokenizer,
            max_waiting=cfg.serve.max_waiting,
        )  # fmt: skip

    def encode(self, prompt) -> list[int]:
        tok = self.tokenizer
        if isinstance(prompt, str):
            return tok(prompt).input_ids
        if getattr(tok, "chat_template", None):
            return list(tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False))
        return tok("\n".join(m["content"] for m in prompt)).input_ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def _error(status: int, message: str, field: str | None = None, retry: bool = False) -> JSONResponse:
    from pipelines.serve_api import RequestError

    body = RequestError(field, message, status).body()
    return JSONResponse(body, status_code=status, headers={"Retry-After": "1"} if retry else None)


async def _json(request: Request):
    from pipelines.serve_api import RequestError

    try:
        return await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RequestError(None, f"the body is not JSON: {err}") from None


async def _streamed(server: Server, ticket, events: asyncio.Queue, reply):
    """Server-sent events: a chunk per token (text held back while it could still become a
    stop string), then the last chunk (finish reason, `distlens.lens`, usage) and [DONE]."""
    try:
        yield _sse(reply.first_chunk())
        while True:
            event = await events.get()
            if event[0] == "token":
                chunk = reply.token(event[1], event[2])
                if chunk is not None:
                    yield _sse(chunk)
            elif event[0] == "error":
                yield _sse({"error": {"message": event[2], "type": "server_error", "code": event[1]}})
                break
            else:
                for chunk in reply.last_chunks(event[1], event[2]):
                    yield _sse(chunk)
                break
        yield "data: [DONE]\n\n"
    finally:
        if not ticket.done:
            server.engine.cancel(ticket)


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


# Ray Serve pickles the app's routes when the class below is decorated: what they call is defined above it.
@serve.deployment(name="DistlensServer", num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
@serve.ingress(api)
class DistlensServer:
    """The replica: routes of the OpenAI API over one `Server`."""

    def __init__(self, settings: dict):
        self.server = Server(settings)

    def __del__(self):  # Serve calls it when the replica goes: its stage actors and their placement group go too
        self.server.engine.close()
        self.server.executor.close()

    def _refused(self, request: Request) -> JSONResponse | None:
        key = self.server.api_key
        if key and request.headers.get("authorization", "") != f"Bearer {key}":
            return _error(401, "a valid API key is required: Authorization: Bearer <serve.api_key>")
        return None

    @api.get("/health")
    async def health(self):
        state = self.server.engine.health()
        return JSONResponse(state, status_code=200 if state["status"] == "ok" else 503)

    @api.get("/v1/models")
    async def models(self, request: Request):
        if refused := self._refused(request):
            return refused
        f = self.server.facts
        return {"object": "list", "data": [{"id": f.name, "object": "model", "created": 0, "owned_by": "distlens"}]}

    @api.get("/v1/vectors")
    async def list_vectors(self, request: Request):
        if refused := self._refused(request):
            return refused
        return {"object": "list", "data": [v.describe() for v in self.server.vectors.table.values()]}

    @api.post("/v1/vectors")
    async def add_vector(self, request: Request):
        from pipelines.serve_api import RequestError

        if refused := self._refused(request):
            return refused
        try:
            return self.server.vectors.add(await _json(request)).describe()
        except RequestError as err:
            return JSONResponse(err.body(), status_code=err.status)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._generate(request, "completion")

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request):
        return await self._generate(request, "chat")

    async def _generate(self, request: Request, kind: str):
        from actors.serving import Busy, Unavailable
        from pipelines.serve_api import RequestError, parse

        if refused := self._refused(request):
            return refused
        s = self.server
        try:
            parsed = parse(await _json(request), kind, s.facts, s.vectors, s.encode)
        except RequestError as err:
            return JSONResponse(err.body(), status_code=err.status)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        try:
            ticket = s.engine.submit(parsed.request, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        except Busy as err:
            return _error(429, f"the server is busy: {err}; retry later", retry=True)
        except Unavailable as err:
            return _error(503, f"the server cannot serve now: {err}", retry=True)
        from pipelines.serve_reply import Reply

        reply = Reply(s, kind, parsed)
        if parsed.stream:
            return StreamingResponse(_streamed(s, ticket, events, reply), media_type="text/event-stream")
        try:
            while True:
                event = await events.get()
                if event[0] == "token":
                    reply.token(event[1], event[2])
                elif event[0] == "error":
                    return _error(event[1], event[2], retry=event[1] == 503)
                else:
                    return reply.whole(event[1], event[2])
        finally:
            if not ticket.done:  # the client went away (Serve cancels the handler): free the row
                s.engine.cancel(ticket)


def deploy(cfg: DictConfig, model_path: str) -> str:
    """Deploy the app on the connected Ray cluster, waiting until its replica has loaded the
    stages; returns the base URL."""
    host, port = cfg.serve.host, cfg.serve.port
    serve.start(http_options={"host": host, "port": port}, detached=False)
    settings = {
        "cfg": OmegaConf.to_container(cfg, resolve=True),
        "model_path": model_path,
        "api_key": cfg.serve.api_key or os.environ.get("DISTLENS_API_KEY") or None,
    }
    serve.run(DistlensServer.bind(settings), name=cfg.serve.app, route_prefix="/", blocking=False)
    return f"http://{host}:{port}/v1"


@hydra.main(version_base=None, config_path=str(Path(__file__).resolve().parent.parent / "conf"), config_name="serve")
def main(cfg: DictConfig) -> None:
    from pipelines.config import check_serve

    with session.refusals():
        model_path = check_serve(cfg)
        session.connect_ray(cfg.cluster)
        url = deploy(cfg, model_path)
        print(f"[distlens] serving {cfg.serve.model_name or cfg.model.name} at {url} (Ctrl-C stops)", flush=True)
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            print("[distlens] stopping the server", file=sys.stderr, flush=True)
        finally:
            serve.delete(cfg.serve.app)
            if not serve.status().applications:  # nothing else served on this cluster: Serve goes too
                serve.shutdown()


if __name__ == "__main__":
    from actors import head_watch
    from pipelines.config import ServeConf, check_overrides

    check_overrides(ServeConf)
    head_watch.exit_on_loss()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `ray job stop`, `kill`: as Ctrl-C
    # The module under its own name, not __main__: Ray Serve pickles the deployment by reference
    # (a class of __main__ is pickled by value, without the module's functions its routes call).
    from pipelines import serve as module

    module.main()
