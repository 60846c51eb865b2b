"""Stream a request's text out of its token ids, one token at a time.

Two things make this harder than decoding each token: a byte-level BPE token can hold part of a
UTF-8 character (it decodes to U+FFFD alone), and a tokenizer may render a token differently
depending on its left neighbours (SentencePiece's leading space). So each step decodes a short
window of recent tokens twice, with and without the new ones, and emits the difference once it no
longer ends in U+FFFD; the window then slides, keeping the cost per token independent of the
length. Text that could still grow into a stop string is held back until it cannot.
"""

from __future__ import annotations

from typing import Any

PROMPT_CONTEXT_TOKENS = 6  # prompt tokens decoded before the output so its first token renders right


class IncrementalDetokenizer:
    """Emits a request's output text as it becomes final; `text` is everything emitted so far."""

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: list[int],
        stop: list[str],
        skip_special_tokens: bool = True,
        include_stop_str_in_output: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.skip_special_tokens = skip_special_tokens
        self.include_stop_str_in_output = include_stop_str_in_output
        self.text = ""
        self.stopped = False
        self._ids = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self._prefix = 0  # window start: context decoded only so later tokens render right
        self._read = len(self._ids)  # tokens before this one have been decoded into text
        self._pending = ""  # decoded text held back because it may start a stop string

    def add(self, token_id: int) -> str:
        """Append one token; return the text that is now final (often "")."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        window_text = self._decode(self._ids[self._prefix :])
        if len(window_text) <= len(prefix_text) or window_text.endswith("\ufffd"):
            return ""  # nothing visible yet, or the last character is still incomplete
        self._pending += window_text[len(prefix_text) :]
        self._prefix, self._read = self._read, len(self._ids)
        return self._release()

    def flush(self) -> str:
        """At the end of a request, emit whatever is still held back (nothing after a stop)."""
        if self.stopped:
            return ""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        self._pending += self._decode(self._ids[self._prefix :])[len(prefix_text) :]
        self._prefix = self._read = len(self._ids)
        out, self._pending = self._pending, ""
        self.text += out
        return out

    def _release(self) -> str:
        """Emit pending text up to a stop string, or up to a suffix that may begin one."""
        match = self._find_stop()
        if match is not None:
            start, stop = match
            out = self._pending[: start + len(stop) if self.include_stop_str_in_output else start]
            self.stopped = True
            self._pending = ""
        else:
            keep = self._stop_prefix_len()
            out = self._pending[: len(self._pending) - keep]
            self._pending = self._pending[len(out) :]
        self.text += out
        return out

    def _find_stop(self) -> tuple[int, str] | None:
        """Earliest stop string in the pending text (held-back text is where any match begins)."""
        found = [(self._pending.find(s), s) for s in self.stop]
        found = [(start, s) for start, s in found if start >= 0]
        return min(found, key=lambda m: (m[0], -len(m[1]))) if found else None

    def _stop_prefix_len(self) -> int:
        """Length of the longest suffix of the pending text that is a proper prefix of a stop."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self._pending)), longest, -1):
                if self._pending.endswith(s[:n]):
                    longest = n
                    break
        return longest

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)
