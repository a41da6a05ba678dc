"""`razor-gguf chat MODEL.gguf`: a terminal chat with streaming, the model's chat template, slash
commands and a status line comparing the razor KV cache against the full one."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

from .errors import UserError
from .options import add_model_arguments, llama_kwargs, load_model, razor_kwargs

TRANSCRIPT_FORMAT = "razor-gguf-chat/1"
ROLES = ("system", "user", "assistant")

HELP = """commands:
  /help              this list
  /reset             forget the conversation (keeps the system prompt)
  /stats             KV-cache memory by part, context used, speed of the last reply
  /razor on|off      reload with the razor KV cache on or off (the conversation is kept)
  /save FILE         write the transcript as JSON
  /load FILE         replace the conversation with a saved transcript
  /quit              leave (Ctrl-D works too)"""


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def parse_transcript(data: Any) -> tuple[str | None, list[dict[str, str]]]:
    """(system prompt, messages) of a razor-gguf-chat/1 transcript (what /save and the chat page's Export
    write); ValueError when data is not one."""
    msgs = data.get("messages") if isinstance(data, dict) else None
    ok = (isinstance(data, dict) and data.get("format") == TRANSCRIPT_FORMAT and isinstance(msgs, list)
          and all(isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in msgs)
          and (data.get("system") is None or isinstance(data["system"], str)))
    if not ok:
        raise ValueError(f"not a {TRANSCRIPT_FORMAT} transcript")
    return data.get("system"), [{"role": m["role"], "content": m["content"]} for m in msgs]


@dataclass
class Reply:
    text: str = ""
    n_tokens: int = 0
    seconds: float = 0.0  # request to last token
    prompt_seconds: float = 0.0  # request to first token (prompt evaluation)
    interrupted: bool = False
    dropped_turns: int = 0  # oldest exchanges dropped to fit the context

    @property
    def tps(self) -> float:
        """Generation speed after the first token (the prompt evaluation is not in it)."""
        gen = self.seconds - self.prompt_seconds
        return (self.n_tokens - 1) / gen if self.n_tokens > 1 and gen > 0 else 0.0


@dataclass
class ChatSession:
    """A conversation with one model. The Llama object persists across turns, so llama-cpp-python
    reuses the cached prompt prefix wherever the KV cache can keep it."""

    model_path: str
    llama_kwargs: dict[str, Any]
    razor_kwargs: dict[str, Any]
    system: str | None = None
    max_tokens: int = 512
    temperature: float = 0.7
    seed: int = 0
    messages: list[dict[str, str]] = field(default_factory=list)
    last: Reply | None = None

    def __post_init__(self) -> None:
        self.llm = load_model(self.model_path, seed=self.seed, **self.llama_kwargs, **self.razor_kwargs)

    # ------------------------------------------------------------------------------- model state

    def set_razor(self, on: bool) -> None:
        """Reload the model with the razor cache required (on) or off; the conversation is kept."""
        kw = {**self.razor_kwargs, "razor": on}
        new = load_model(self.model_path, seed=self.seed, **self.llama_kwargs, **kw)  # raises: keep the old one
        self.llm.close()
        self.llm, self.razor_kwargs = new, kw

    def stats(self) -> dict[str, Any]:
        s = self.llm.razor_stats()
        s.update(n_ctx=self.llm.n_ctx(), n_past=self.llm.n_tokens)
        return s

    def status_line(self) -> str:
        s = self.stats()
        parts = []
        if self.last is not None:
            parts.append(f"{self.last.n_tokens} tokens, {self.last.tps:.1f} tok/s")
        parts.append(f"context {s['n_past']}/{s['n_ctx']}")
        if s["razor"]:
            parts.append(f"KV {mib(s['kv_bytes'])} razor vs {mib(s['full_equiv_bytes'])} full "
                         f"(-{s['saving']:.0%})")
        else:
            parts.append(f"KV {mib(s['kv_bytes'])} full cache")
        return "[" + " | ".join(parts) + "]"

    # ---------------------------------------------------------------------------- conversation

    def conversation(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.messages

    def reset(self) -> None:
        self.messages.clear()
        self.last = None

    def send(self, text: str) -> Iterator[str]:
        """Stream the reply to `text` piece by piece; the finished reply is in self.last.

        When the conversation no longer fits the context, the oldest exchanges are dropped."""
        self.messages.append({"role": "user", "content": text})
        reply = Reply()
        self.last = reply
        while True:
            start = time.perf_counter()
            try:
                stream = self.llm.create_chat_completion(
                    self.conversation(), max_tokens=self.max_tokens, temperature=self.temperature,
                    seed=self.seed, stream=True)
                first = next(stream, None)  # the prompt is evaluated here: overflow raises now
                reply.prompt_seconds = time.perf_counter() - start
                break
            except ValueError as e:
                if "exceed context window" not in str(e) or len(self.messages) <= 1:
                    self.messages.pop()
                    if "exceed context window" in str(e):
                        raise UserError(f"the message does not fit the context of {self.llm.n_ctx()} "
                                        "tokens (start the chat with a larger --ctx)") from None
                    raise
                del self.messages[:2]  # the oldest user/assistant exchange
                reply.dropped_turns += 1
            except KeyboardInterrupt:
                self.messages.pop()  # interrupted during the prompt: as if never sent
                raise
        chunks = [first] if first is not None else []
        try:
            for chunk in _chain(chunks, stream):
                delta = chunk["choices"][0]["delta"].get("content")
                if delta:
                    reply.text += delta
                    reply.n_tokens += 1
                    yield delta
        except KeyboardInterrupt:
            reply.interrupted = True
        finally:
            reply.seconds = time.perf_counter() - start
            self.messages.append({"role": "assistant", "content": reply.text})

    # ------------------------------------------------------------------------------ transcripts

    def save(self, path: str) -> None:
        data = {"format": TRANSCRIPT_FORMAT, "model": os.path.basename(self.model_path),
                "system": self.system, "messages": self.messages}
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise UserError(f"{path}: no such directory")
        # Write beside the target, then rename: never a half-written transcript.
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".razor-chat-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, ensure_ascii=False, indent=1)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise

    def load(self, path: str) -> None:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise UserError(f"{path}: no such file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{path}: not a transcript ({str(e).splitlines()[0]})") from None
        try:
            self.system, self.messages = parse_transcript(data)
        except ValueError as e:
            raise UserError(f"{path}: {e}") from None
        self.last = None


def _chain(first: list, rest: Iterator) -> Iterator:
    yield from first
    yield from rest


# ----------------------------------------------------------------------------------- terminal


class Terminal:
    """The interactive loop: reads lines, runs slash commands, streams replies."""

    def __init__(self, session: ChatSession, out=sys.stdout) -> None:
        self.s = session
        self.out = out

    def say(self, text: str = "", end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    def command(self, line: str) -> bool:
        """Run one slash command; False means leave."""
        name, _, arg = line[1:].strip().partition(" ")
        arg = arg.strip()
        if name in ("quit", "exit", "q"):
            return False
        if name == "help":
            self.say(HELP)
        elif name == "reset":
            self.s.reset()
            self.say("(conversation cleared)")
        elif name == "stats":
            self.print_stats()
        elif name == "razor":
            if arg not in ("on", "off"):
                self.say("usage: /razor on|off")
            else:
                self.s.set_razor(arg == "on")
                self.say(f"(razor {arg}) {self.s.status_line()}")
        elif name in ("save", "load"):
            if not arg:
                self.say(f"usage: /{name} FILE")
            elif name == "save":
                self.s.save(arg)
                self.say(f"(saved {len(self.s.messages)} messages to {arg})")
            else:
                self.s.load(arg)
                self.say(f"(loaded {len(self.s.messages)} messages from {arg})")
        else:
            self.say(f"unknown command /{name}: /help lists the commands")
        return True

    def print_stats(self) -> None:
        st = self.s.stats()
        self.say(f"context: {st['n_past']} of {st['n_ctx']} tokens")
        if st["razor"]:
            self.say(f"KV cache: razor, {st['retrieval_heads']}/{st['kv_heads']} retrieval heads, "
                     f"n_sink {st['n_sink']}, window {st['window']}")
            swa = f" + sliding-window layers {mib(st['swa_bytes'])}" if st.get("swa_bytes") else ""
            self.say(f"  retrieval {mib(st['retrieval_bytes'])} + local {mib(st['local_bytes'])} + "
                     f"compensation {mib(st['compensation_bytes'])}{swa} = {mib(st['kv_bytes'])}")
            self.say(f"  full cache would be {mib(st['full_equiv_bytes'])}: saving {st['saving']:.1%}")
            if st.get("kv_budget") is not None:
                self.say(f"  KV budget {st['kv_budget']}: bought window {st['window']} ({st['kv_fraction']:.1%} of the full cache)")
        else:
            self.say(f"KV cache: full, {mib(st['kv_bytes'])}")
        if self.s.last is not None:
            self.say(f"last reply: {self.s.last.n_tokens} tokens in {self.s.last.seconds:.2f} s "
                     f"({self.s.last.tps:.1f} tok/s)")

    def turn(self, text: str) -> None:
        for piece in self.s.send(text):
            self.say(piece, end="")
        reply = self.s.last
        self.say()
        if reply.interrupted:
            self.say("(interrupted)")
        if reply.dropped_turns:
            self.say(f"(dropped the {reply.dropped_turns} oldest exchange(s) to fit the context)")
        self.say(self.s.status_line())

    def run(self) -> int:
        if sys.stdin.isatty():
            try:
                import readline  # noqa: F401  (line editing and history for input())
            except ImportError:
                pass
        self.say(f"razor-gguf chat: {os.path.basename(self.s.model_path)}  {self.s.status_line()}")
        self.say("type a message, /help for commands, Ctrl-D to leave")
        while True:
            try:
                line = input("> ")
            except (EOFError, KeyboardInterrupt):
                self.say()
                return 0
            if not line.strip():
                continue
            try:
                if line.startswith("/"):
                    if not self.command(line):
                        return 0
                else:
                    self.turn(line)
            except UserError as e:
                self.say(f"error: {e}")
            except KeyboardInterrupt:
                self.say("\n(interrupted)")
            except RuntimeError:  # llama_decode failed: with a lost RPC worker the model is gone
                from .errors import error
                from .llama import lost_rpc_workers

                lost = lost_rpc_workers()
                if not lost:
                    raise
                self.say()
                return error(f"RPC worker {', '.join(sorted(lost))} is lost: the model's layers there are gone; "
                             "start the chat again once it answers")


def cmd_chat(args: argparse.Namespace) -> int:
    from .errors import error

    if args.web:
        from .serve import serve_page

        return serve_page(args)
    try:
        if args.max_tokens < 1:
            raise UserError(f"--max-tokens must be at least 1, got {args.max_tokens}")
        session = ChatSession(args.model, llama_kwargs(args), razor_kwargs(args), system=args.system,
                              max_tokens=args.max_tokens, temperature=args.temp, seed=args.seed)
    except UserError as e:
        return error(str(e))
    try:
        return Terminal(session).run()
    finally:
        session.llm.close()


def add_subcommand(sub) -> None:
    p = sub.add_parser("chat", help="a local terminal chat with streaming and a KV-memory gauge")
    add_model_arguments(p, default_ctx=4096)
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-tokens", type=int, default=512, metavar="N", help="longest reply (default 512)")
    p.add_argument("--temp", type=float, default=0.7, help="sampling temperature (0: greedy; default 0.7)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--web", action="store_true",
                   help="chat in the browser instead: serve the chat page on 127.0.0.1 and open it")
    p.set_defaults(func=cmd_chat)
