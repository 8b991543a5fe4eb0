"""`gguf-stream chat` at a terminal: a real process on a pty (stdlib pty/os,
no pexpect) running the Gemma model in host mode. Line editing and history
(readline), Ctrl-C during a reply (back to the prompt, the conversation
kept), Ctrl-C at the prompt or twice (exit 130), /exit (0), and the t/s line
after each reply.

Generous timeouts: the CI box is small and often shared; one ggml thread
(-t 1), since threads that outnumber free cores crawl."""
from __future__ import annotations

import fcntl
import os
import re
import select
import signal
import struct
import sys
import termios
import time

import pytest

from conftest import ROOT, subprocess_env

pty = pytest.importorskip("pty")

TIMEOUT = 300  # seconds for any one step (a load, a whole reply)
STATS = re.compile(r"prompt: (\d+) new tokens \((\d+) in context\) in [0-9.]+ s \([0-9.]+ t/s\); "
                   r"generated: (\d+) tokens in [0-9.]+ s \([0-9.]+ t/s\)")


class Terminal:
    """A child process on a pseudo-terminal: send keys, wait for output."""

    def __init__(self, *argv: str):
        env = subprocess_env()
        env["TERM"] = "dumb"  # readline without colour or bracketed-paste escapes
        cmd = [sys.executable, "-m", "gguf_stream", *argv]
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: exec, never return into pytest
            try:
                os.chdir(ROOT)
                os.execve(cmd[0], cmd, env)
            finally:
                os._exit(127)
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
        self.out, self.pos, self.status = "", 0, None

    def _read(self, timeout: float) -> bool:
        """Append what the child wrote; False at its end."""
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            data = b""
        self.out += data.decode("utf-8", errors="replace")
        return bool(data)

    def expect(self, pattern: str, timeout: float = TIMEOUT) -> re.Match:
        """The first match of pattern after the previous one's end."""
        rx, end = re.compile(pattern, re.S), time.monotonic() + timeout
        while True:
            m = rx.search(self.out, self.pos)
            if m:
                self.pos = m.end()
                return m
            if time.monotonic() > end:
                raise AssertionError(f"no {pattern!r} within {timeout} s; the terminal shows:\n{self.out[-3000:]}")
            if not self._read(min(1.0, max(end - time.monotonic(), 0.01))):
                raise AssertionError(f"the chat ended before {pattern!r}:\n{self.out[-3000:]}")

    def send(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def ctrl_c(self) -> None:
        os.kill(self.pid, signal.SIGINT)

    def wait(self, timeout: float = TIMEOUT) -> int:
        end = time.monotonic() + timeout
        while self.status is None and time.monotonic() < end:
            self._read(0.2)
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
        if self.status is None:
            raise AssertionError(f"the chat did not exit; the terminal shows:\n{self.out[-3000:]}")
        return self.status

    def close(self) -> None:
        if self.status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        os.close(self.fd)

    def ctrl_c_until_exit(self, timeout: float = TIMEOUT) -> int:
        """Ctrl-C every half second until the chat exits; its exit code.
        Repeated because one can be lost at the prompt: CPython's readline
        loop notices a signal only when it interrupts its select(), so one
        that lands the instant before (just as the prompt is drawn) waits for
        the next; and signals landing during one decode count once."""
        end = time.monotonic() + timeout
        while self.status is None and time.monotonic() < end:
            self.ctrl_c()
            try:
                return self.wait(0.5)
            except AssertionError:
                continue
        return self.wait(0)

    def prompt(self) -> None:
        self.expect(r"\n> ")

    def reply(self) -> tuple[int, int, int]:
        """Wait for a reply's t/s line and the prompt after it: (new prompt
        tokens, tokens in context, tokens generated)."""
        m = self.expect(STATS.pattern)
        self.prompt()
        return int(m[1]), int(m[2]), int(m[3])


@pytest.fixture
def chat(gemma_path):
    terminals = []

    def start(n_predict: int = 160) -> Terminal:
        t = Terminal("chat", str(gemma_path), "--device", "host", "--n-streamed", "6", "-n", str(n_predict),
                     "-t", "1", "-c", "2048")
        terminals.append(t)
        t.expect(r"chat format: ")
        t.prompt()
        return t

    yield start
    for t in terminals:
        t.close()


def test_ctrl_c_stops_a_reply_and_the_conversation_goes_on(chat):
    t = chat()
    t.send("Hi! My name is Ada.\r")
    new, first_context, generated = t.reply()
    assert new == first_context > 5 and generated > 0  # nothing cached before the first message

    t.send("Write a very long story about a dragon.\r")
    t.expect(r"a dragon\.\r?\n")
    t.expect(r".{120}")  # the reply is under way: ~30 tokens printed
    t.ctrl_c()
    t.expect(r"reply stopped \(Ctrl-C\)")
    new, context, stopped_at = t.reply()
    assert context > first_context + generated  # the first reply is part of this prompt
    assert stopped_at < 160  # stopped well before -n

    t.send("What is my name?\r")
    _, later_context, _ = t.reply()
    # the stopped reply stayed in the conversation as the assistant's turn (as llama-cli keeps it):
    # this prompt holds it, not only the new message
    assert later_context - context >= stopped_at

    # history: Ctrl-P brings the last message back to the line (then Ctrl-U clears it)
    t.send("\x10")
    t.expect(r"What is my name\?")
    t.send("\x15/exit\r")
    assert t.wait() == 0
    assert "Traceback" not in t.out


def test_ctrl_c_at_the_prompt_exits_130(chat):
    t = chat()
    assert t.ctrl_c_until_exit() == 130
    assert "reply stopped" not in t.out  # no reply was running
    assert "Traceback" not in t.out


def test_ctrl_c_twice_during_a_reply_exits_130(chat):
    t = chat(n_predict=400)
    t.send("Write a very long story about a dragon.\r")
    t.expect(r"a dragon\.\r?\n")
    t.expect(r".{40}")
    # the first stops the reply, the next exits, whether it lands during the reply or at the prompt
    assert t.ctrl_c_until_exit() == 130
    assert "Traceback" not in t.out


# ------------------------------------------------ the loop in process, with a fake model

class FakeLlm:
    """create_chat_completion streams words, one token each; a word '^C'
    sends this process SIGINT right after it is yielded (as a user pressing
    Ctrl-C while that token decodes)."""

    def __init__(self, replies):
        import numpy as np

        self.replies, self.seen = list(replies), []
        self.input_ids, self.n_tokens = np.zeros(512, dtype=np.intc), 0

    def create_chat_completion(self, messages, stream, temperature, max_tokens):
        assert stream
        self.seen.append([dict(m) for m in messages])
        words = self.replies.pop(0).split()
        prompt = sum(len(m["content"].split()) + 2 for m in messages)
        self.input_ids[:prompt] = range(1, prompt + 1)
        self.n_tokens = prompt
        for i, word in enumerate(words):
            if word == "^C":
                os.kill(os.getpid(), signal.SIGINT)
                continue
            if i:
                self.n_tokens += 1  # the decode of the token before
            yield {"choices": [{"delta": {"content": word + " "}}]}


def run_loop(monkeypatch, capsys, llm, lines):
    import argparse
    import io

    from gguf_stream.cli import chat as chat_cmd
    from gguf_stream.cli.common import output

    monkeypatch.setattr(output, "quiet", False)  # an earlier cli.main(-q) leaves it set
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    args = argparse.Namespace(system_prompt=None, temp=0.0, n_predict=64)
    rc = chat_cmd._chat_loop(llm, args)
    out, err = capsys.readouterr()
    return rc, out, err


def test_a_stopped_reply_stays_as_the_assistants_turn(monkeypatch, capsys):
    llm = FakeLlm(["one two ^C three four five", "fine"])
    rc, out, err = run_loop(monkeypatch, capsys, llm, "count\nagain\n")
    assert rc == 0 and out == "one two three \nfine \n"  # stopped after the token being decoded
    assert llm.seen[1][-2:] == [{"role": "assistant", "content": "one two three "},
                                {"role": "user", "content": "again"}]
    assert "reply stopped (Ctrl-C)" in err
    assert err.count("generated: ") == 2 and "generated: 3 tokens" in err


def test_a_second_ctrl_c_during_a_reply_exits_130(monkeypatch, capsys):
    llm = FakeLlm(["one two ^C ^C three four", "never"])  # twice while one token decodes
    rc, out, err = run_loop(monkeypatch, capsys, llm, "count\nagain\n")
    assert rc == 130 and out.startswith("one two")
    assert "interrupted (Ctrl-C)" in err and len(llm.seen) == 1
