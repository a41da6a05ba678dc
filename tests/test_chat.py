"""`razor-gguf chat` driven as a user would: in a pseudo-terminal (pexpect), reading what the screen shows."""

import contextlib
import json
import re
import subprocess
import sys

import pytest

pexpect = pytest.importorskip("pexpect")

STATUS = re.compile(r"\[(\d+) tokens, [\d.]+ tok/s \| context (\d+)/2048 \| KV ([\d.]+) MiB razor vs ([\d.]+) MiB "
                    r"full \(-(\d+)%\)\]")


def _spawn(model: str, *extra: str):
    child = pexpect.spawn(sys.executable, ["-m", "razor_gguf", "chat", model, "--temp", "0", "--max-tokens", "24",
                                           "--ctx", "2048", "--n-batch", "128", *extra],
                          encoding="utf-8", timeout=120, dimensions=(40, 200))
    return child


@contextlib.contextmanager
def _session(model: str, *extra: str):
    """A chat in a pseudo-terminal that the block drives up to a prompt; then /quit leaves it with status 0."""
    child = _spawn(model, *extra)
    try:
        yield child
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_chat_in_a_terminal(smollm2_razor, tmp_path):
    child = _spawn(str(smollm2_razor[0]), "--system", "You are a helpful assistant.")
    try:
        child.expect(r"razor-gguf chat: smollm2-razor\.gguf .*KV [\d.]+ MiB razor vs [\d.]+ MiB full")
        child.expect("/help for commands")
        child.expect_exact("> ")

        child.sendline("What is the capital of France?")
        child.expect("Paris")  # streamed reply
        child.expect(STATUS)
        n_reply, used, kv, full, saving = (float(x) for x in child.match.groups())
        assert 0 < n_reply <= 24 and 20 < used < 2048 and kv < full and saving >= 30
        child.expect_exact("> ")

        child.sendline("/stats")
        child.expect(r"KV cache: razor, \d+/90 retrieval heads, n_sink 4, window \d+")
        child.expect(r"full cache would be [\d.]+ MiB: saving [\d.]+%")
        child.expect(r"KV budget 0.75: bought window \d+")  # the model's measured default budget
        child.expect(r"last reply: \d+ tokens")
        child.expect_exact("> ")

        transcript = tmp_path / "chat.json"
        child.sendline(f"/save {transcript}")
        child.expect(r"\(saved 2 messages to ")
        child.expect_exact("> ")
        saved = json.loads(transcript.read_text())
        assert saved["system"] == "You are a helpful assistant."
        assert [m["role"] for m in saved["messages"]] == ["user", "assistant"]
        assert "Paris" in saved["messages"][1]["content"]

        child.sendline("/razor off")
        child.expect(r"\(razor off\) .*KV [\d.]+ MiB full cache\]")
        child.expect_exact("> ")
        child.sendline("What is the capital of Italy?")
        child.expect("Rome")
        child.expect(r"context (\d+)/2048 \| KV [\d.]+ MiB full cache\]")
        assert int(child.match.group(1)) > used  # the whole conversation is in the new context
        child.expect_exact("> ")
        child.sendline("/razor on")
        child.expect(r"\(razor on\) .*MiB razor vs")
        child.expect_exact("> ")

        child.sendline("/reset")
        child.expect_exact("(conversation cleared)")
        child.sendline(f"/load {transcript}")
        child.expect(r"\(loaded 2 messages from ")
        child.sendline(f"/load {tmp_path / 'missing.json'}")
        child.expect(r"error: .*missing\.json: no such file")
        (tmp_path / "bad.json").write_text("{not json")
        child.sendline(f"/load {tmp_path / 'bad.json'}")
        child.expect(r"error: .*bad\.json: not a transcript")
        child.sendline("/razor sideways")
        child.expect_exact("usage: /razor on|off")
        child.sendline("/frobnicate")
        child.expect_exact("unknown command /frobnicate")
        child.sendline("/help")
        child.expect_exact("/save FILE")
        child.expect_exact("> ")

        child.sendeof()  # Ctrl-D leaves
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    assert json.loads(transcript.read_text()) == saved  # /load never writes


def test_chat_kv_cache_types(smollm2_razor):
    """-ctk / -ctv as in llama.cpp: razor's cache and the full cache it is measured against are both q8_0
    (34 bytes per 32 values: 23.9 MiB full at 2048 tokens instead of f16's 45)."""
    with _session(str(smollm2_razor[0]), "-ctk", "q8_0", "-ctv", "q8_0", "--system", "You are a helpful assistant.") \
            as child:
        child.expect(r"KV ([\d.]+) MiB razor vs ([\d.]+) MiB full")
        kv, full = (float(x) for x in child.match.groups())
        assert full == pytest.approx(2048 * 30 * 2 * 192 * 34 / 32 / 2**20, abs=0.01) and kv < full
        child.expect_exact("> ")
        child.sendline("What is the capital of France?")
        child.expect("Paris")
        child.expect_exact("> ")


def test_chat_without_head_map_says_so(smollm2_path):
    with _session(smollm2_path) as child:
        child.expect("no razor head map: running the full KV cache .*razor-gguf embed-heads")
        child.expect(r"KV [\d.]+ MiB full cache\]")
        child.expect_exact("> ")


@pytest.mark.parametrize("args, message", [
    (["/nonexistent/model.gguf"], "no such file"),
    ([__file__], "not a GGUF file"),
    (["MODEL", "--window", "0"], "window must be >= 1"),
    (["MODEL", "--max-tokens", "0"], "--max-tokens must be at least 1"),
    (["MODEL", "--pins", "-1"], "pins must be >= 0"),
    (["MODEL", "--cache-type-k", "q3_k"], "--cache-type-k: KV cache type must be one of f32, f16"),
    (["MODEL", "-ctv", "q8_0", "--no-flash-attn"], "a quantized V cache needs flash attention"),
])
def test_chat_bad_input_is_one_line_exit_2(smollm2_path, args, message):
    args = [smollm2_path if a == "MODEL" else a for a in args]
    r = subprocess.run([sys.executable, "-m", "razor_gguf", "chat", *args], capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, timeout=120)
    assert r.returncode == 2
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr
