"""Check a GBNF grammar with llama.cpp's own parser, in a child process; turn
a JSON schema into a grammar as llama-cpp-python does (schema_grammar).

llama.cpp returns no sampler for a grammar it cannot parse, and
llama-cpp-python adds that NULL to its sampler chain: the next token sampled
crashes the process (and the parser recurses once per nesting level, so a
deeply nested grammar can overflow its stack). A child process parses each
distinct grammar once, with the model's vocabulary (a grammar may name its
tokens), and the verdict is cached.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from collections import OrderedDict
from pathlib import Path

MAX_GRAMMAR_BYTES = 1 << 20
TIMEOUT_S = 60
CACHE_SIZE = 256
ERROR_LEVEL = 4  # GGML_LOG_LEVEL_ERROR
MAX_SCHEMA_REPEAT = 10_000  # minItems / maxLength ...: the grammar spells each repetition out
MAX_SCHEMA_DEPTH = 100
_cache: OrderedDict[tuple[str, str, str], str | None] = OrderedDict()
_lock = threading.Lock()


def grammar_error(model_path: str | os.PathLike, grammar: str, root: str = "root") -> str | None:
    """None when llama.cpp parses the grammar for this model; else why not, in one line."""
    try:
        data = grammar.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"the grammar is not valid UTF-8 (at character {exc.start})"
    if len(data) > MAX_GRAMMAR_BYTES:
        return f"the grammar has {len(data)} bytes, over the limit of {MAX_GRAMMAR_BYTES}"
    key = (str(model_path), root, hashlib.sha256(data).hexdigest())
    with _lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    verdict = _parse_in_child(str(model_path), data, root)
    with _lock:
        _cache[key] = verdict
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return verdict


def schema_grammar(schema) -> str:
    """The GBNF grammar llama-cpp-python makes of a JSON schema (a parsed
    one: dict or bool). ValueError, in one line, where it cannot (llama-cpp-python's
    response_format would fall back to any JSON: the schema asked for is
    refused instead) or where the grammar would be too large to build."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    big = _largest_repeat(schema)
    if big > MAX_SCHEMA_REPEAT:
        raise ValueError(f"the schema repeats something {big} times; at most {MAX_SCHEMA_REPEAT} "
                         "(the grammar spells out each repetition)")
    try:
        return json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # noqa: BLE001 - any failure of the converter is the schema's
        raise ValueError(f"the schema cannot be turned into a grammar ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:200]})") from None


def _largest_repeat(schema, depth: int = 0) -> int:
    if depth > MAX_SCHEMA_DEPTH:
        raise ValueError(f"the schema is nested over {MAX_SCHEMA_DEPTH} levels deep")
    if isinstance(schema, dict):
        own = [v for k, v in schema.items() if k in ("minItems", "maxItems", "minLength", "maxLength")
               and isinstance(v, int)]
        return max(own + [_largest_repeat(v, depth + 1) for v in schema.values()] + [0])
    if isinstance(schema, list):
        return max([_largest_repeat(v, depth + 1) for v in schema] + [0])
    return 0


def _parse_in_child(model_path: str, data: bytes, root: str) -> str | None:
    env = dict(os.environ, GGML_NO_BACKTRACE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent),
                                                        os.environ.get("PYTHONPATH")])))
    try:
        r = subprocess.run([sys.executable, "-m", "gguf_stream.grammar", model_path, root], input=data,
                           capture_output=True, env=env, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"llama.cpp's grammar parser did not finish in {TIMEOUT_S} s"
    if r.returncode == 0:
        return None
    if r.returncode == 1:
        said = [line.strip() for line in r.stderr.decode(errors="replace").splitlines() if line.strip()]
        return "; ".join(said[:3] or ["llama.cpp could not parse it"])[:300]
    return f"llama.cpp's grammar parser crashed on it (exit status {r.returncode})"


def _child(model_path: str, root: str) -> int:
    """Parse the grammar on stdin: exit 0 if llama.cpp makes a sampler of it, 1 if not."""
    import llama_cpp

    @llama_cpp.llama_log_callback
    def errors_only(level, text, user_data):  # the parser says why through the log
        if level == ERROR_LEVEL:
            sys.stderr.write(text.decode("utf-8", errors="replace"))

    llama_cpp.llama_log_set(errors_only, None)
    grammar = sys.stdin.buffer.read()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(model_path.encode(), params)
    if not model:
        print("parse: the model's vocabulary could not be loaded", file=sys.stderr)
        return 2
    sampler = llama_cpp.llama_sampler_init_grammar(llama_cpp.llama_model_get_vocab(model), grammar, root.encode())
    if not sampler:
        return 1
    llama_cpp.llama_sampler_free(sampler)
    llama_cpp.llama_model_free(model)
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1], sys.argv[2]))
