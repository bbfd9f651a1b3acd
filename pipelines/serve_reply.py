"""One served request's answer in the OpenAI formats, built token by token: the whole response
(completion or chat completion) or its streamed chunks. Text is decoded from all tokens so far
(a character split over tokens comes out whole), cut before the first stop string, and a streamed
chunk holds back text that could still turn out to start one."""

from __future__ import annotations

from pipelines.serve_api import created, lens_body, logprob_entry, new_id, usage


class Reply:
    """`server`: the replica's Server (tokenizer, facts); `kind`: "completion" or "chat"."""

    def __init__(self, server, kind: str, parsed):
        self.server, self.kind, self.parsed = server, kind, parsed
        self.id, self.created = new_id(kind), created()
        self.tokens: list[int] = []
        self.logprobs: list = []
        self.sent = ""  # text already streamed
        self.unsent: list[int] = []  # tokens whose log-probs no chunk has carried yet
        self.hold = max((len(s) for s in parsed.request.stop), default=1) - 1

    def _text(self) -> tuple[str, bool]:
        """(the text so far, cut before the first stop string; whether one was found)."""
        text = self.server.decode(self.tokens)
        cuts = [text.find(s) for s in self.parsed.request.stop if s in text]
        return (text[: min(cuts)], True) if cuts else (text, False)

    def token(self, token: int, logprobs) -> dict | None:
        """Take one generated token; a stream's chunk of the new text (None: nothing to send yet)."""
        self.tokens.append(token)
        self.logprobs.append(logprobs)
        if logprobs is not None:  # sent with the next chunk that carries text
            self.unsent.append(len(self.tokens) - 1)
        text, stopped = self._text()
        if stopped or text.endswith("\ufffd"):  # a stop string (sent at the end), or a character still split
            return None
        ready = text[: len(text) - self.hold] if self.hold else text
        if len(ready) <= len(self.sent):
            return None
        delta, self.sent = ready[len(self.sent) :], ready
        return self._chunk(delta, None, self._take_logprobs())

    def _take_logprobs(self) -> list | None:
        entries = [self._logprob(i) for i in self.unsent]
        self.unsent = []
        return entries or None

    def first_chunk(self) -> dict:
        if self.kind == "chat":
            return self._chunk_body({"role": "assistant", "content": ""}, None, None)
        return self._chunk("", None, None)

    def last_chunks(self, reason: str, lens) -> list[dict]:
        text, stopped = self._text()
        reason = "stop" if stopped else reason
        out = [self._chunk(text[len(self.sent) :], reason, self._take_logprobs())]
        extra = self._extra(lens)
        if extra:
            out[-1]["distlens"] = extra
        out[-1]["usage"] = self._usage()
        return out

    def whole(self, reason: str, lens) -> dict:
        text, stopped = self._text()
        reason = "stop" if stopped else reason
        logprobs = None
        if self.parsed.request.logprobs is not None:
            entries = [self._logprob(i) for i in range(len(self.tokens))]
            logprobs = {"content": entries} if self.kind == "chat" else _completion_logprobs(entries)
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                      "logprobs": logprobs}  # fmt: skip
        else:
            choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": logprobs}
        body = {
            "id": self.id, "object": "chat.completion" if self.kind == "chat" else "text_completion",
            "created": self.created, "model": self.server.facts.name, "choices": [choice], "usage": self._usage(),
        }  # fmt: skip
        extra = self._extra(lens)
        if extra:
            body["distlens"] = extra
        return body

    # -- parts ---------------------------------------------------------------------------------
    def _usage(self) -> dict:
        return usage(self.parsed.prompt_tokens, len(self.tokens))

    def _extra(self, lens) -> dict | None:
        if lens is None or self.parsed.lens is None:
            return None
        ids = list(self.parsed.request.ids) + self.tokens
        return {"lens": lens_body(lens, self.parsed.lens, self.server.facts, ids, self.server.decode)}

    def _logprob(self, i: int) -> dict:
        return logprob_entry(self.tokens[i], self.logprobs[i], self.server.decode)

    def _chunk(self, delta: str, reason, logprobs) -> dict:
        if self.kind == "chat":
            return self._chunk_body({"content": delta} if delta or reason is None else {}, reason, logprobs)
        choice = {"index": 0, "text": delta, "finish_reason": reason,
                  "logprobs": _completion_logprobs(logprobs) if logprobs else None}  # fmt: skip
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.server.facts.name,
                "choices": [choice]}  # fmt: skip

    def _chunk_body(self, delta, reason, logprobs) -> dict:
        choice = {"index": 0, "delta": delta, "finish_reason": reason,
                  "logprobs": {"content": logprobs} if logprobs else None}  # fmt: skip
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.server.facts.name, "choices": [choice]}  # fmt: skip


def _completion_logprobs(entries: list[dict]) -> dict:
    """The legacy completions format of chat-style logprob entries."""
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
        "text_offset": [],
    }
