"""Streaming sentence splitting and speech clean-up, shared by the orchestrator and the TTS servicer.

LLM deltas arrive a few characters at a time; TTS wants whole sentences (prosody needs the
full sentence) but as early as possible (time to first audio). `SentenceAggregator` emits a
sentence the moment the character after its end is seen. With BPE tokens the space usually
arrives glued to the next word (" How"), so that look-ahead costs no extra token.

When a boundary is ambiguous we prefer not to split: merging two sentences costs a little
latency, a wrong split is audible as a pause in the middle of a sentence.
"""
from __future__ import annotations

import re

# A terminator run, closing quotes/brackets/markdown emphasis, then whitespace.
_END = re.compile(r"(\.{2,}|…|[.?!;]+)[\"'”’)\]*_`]*(\s+)")
_END_NO_SEMICOLON = re.compile(r"(\.{2,}|…|[.?!]+)[\"'”’)\]*_`]*(\s+)")
# Words before a period that is not a sentence end, lower-cased, without the period.
_ABBREVIATIONS = frozenset(
    """mr mrs ms mx dr prof sr jr st mt rev fr gen col capt lt sgt cmdr hon gov sen rep pres
    e.g eg i.e ie vs cf viz approx al fig figs no nos vol ch sec pp""".split()
)
_DOTTED_ACRONYM = re.compile(r"^(?:[A-Za-z]\.)+[A-Za-z]$")  # U.S, e.g, a.m: unsure, keep together
_HAS_LETTER = re.compile(r"[^\W\d_]")
# A clause end inside a sentence: a comma, colon or semicolon, or a spaced dash, then whitespace
# ("1,000" and "well-known" do not match).
_CLAUSE = re.compile(r"(?:[,;:]|\s[—–-])[\"'”’)\]*_`]*\s+")
_FENCE = "```"
_CONSUMED, _WAIT, _TEXT = "consumed", "wait", "text"


def _inside_brackets_or_quotes(text: str) -> bool:
    """Whether `text` ends inside an open bracket, double quote or markdown span: a comma there
    ('{"error": ...', '(Paris, Lyon', '**one, two') is no place to pause."""
    without_bold = text.replace("**", "")
    return (text.count('"') % 2 == 1 or text.count("“") > text.count("”")
            or text.count("`") % 2 == 1 or text.count("**") % 2 == 1 or without_bold.count("*") % 2 == 1
            or any(text.count(left) > text.count(right) for left, right in ("()", "[]", "{}")))


class SentenceAggregator:
    """Turns a stream of text deltas into complete sentences.

    min_chars: sentences shorter than this ("Ok.") are held and spoken together with the next
    one. 0 turns merging off. merge_first: also merge the first sentence of a turn; off by
    default because the first sentence decides time to first audio.
    skip_code_blocks: drop ``` fenced blocks, which should not be read aloud.
    split_on_semicolon: treat ";" as a sentence end.
    first_clause_words: the first piece of a turn may end at a clause end (comma, colon,
    semicolon, spaced dash) once it has this many words, so the TTS starts before the first
    sentence is complete ("Paris, the capital of France," then "is known for ..."). 0: off.
    """

    def __init__(
        self,
        min_chars: int = 0,
        merge_first: bool = False,
        skip_code_blocks: bool = True,
        split_on_semicolon: bool = False,
        first_clause_words: int = 0,
    ) -> None:
        self.min_chars = min_chars
        self.first_clause_words = first_clause_words
        self.merge_first = merge_first
        self.skip_code_blocks = skip_code_blocks
        self._end = _END if split_on_semicolon else _END_NO_SEMICOLON
        self.reset()

    def reset(self) -> None:
        """Forget everything: a new turn starts."""
        self._buf = ""
        self._held = ""  # a short sentence waiting to be merged with the next
        self._emitted = 0
        self._at_line_start = True
        self._in_code = False

    def push(self, text: str) -> list[str]:
        """Add a delta; return the sentences it completed (possibly none)."""
        self._buf += text
        out: list[str] = []
        while True:
            if self.skip_code_blocks and self._at_line_start:
                state = self._code_line()
                if state == _CONSUMED:
                    continue
                if state == _WAIT:
                    return out
            cut = self._find_boundary()
            if self.first_clause_words and not self._emitted and not self._held:
                clause = self._find_clause(cut)
                cut = clause if clause is not None else cut
            if cut is None:
                return out
            sentence, self._buf = self._buf[:cut], self._buf[cut:]
            self._at_line_start = "\n" in sentence[len(sentence.rstrip()) :]
            self._emit(sentence.strip(), out)

    def flush(self) -> str:
        """End of input: return whatever is left (held and partial text) and start a new turn."""
        rest = "" if self._in_code else self._buf.strip()
        if self.skip_code_blocks and rest.startswith(_FENCE):
            rest = ""  # an unterminated fence line
        remainder = f"{self._held} {rest}".strip()
        self.reset()
        return remainder

    # -- internals ------------------------------------------------------------------------

    def _emit(self, sentence: str, out: list[str]) -> None:
        if not sentence:
            return
        if self._held:
            sentence = f"{self._held} {sentence}"
            self._held = ""
        may_merge = self._emitted > 0 or self.merge_first
        if may_merge and len(sentence) < self.min_chars:
            self._held = sentence
            return
        out.append(sentence)
        self._emitted += 1

    def _code_line(self) -> str:
        """At a line start: drop a fence line or a line inside a code block.

        Returns _CONSUMED (a line was dropped), _WAIT (need the rest of the line) or _TEXT.
        """
        rest = self._buf.lstrip(" \t\n")
        if not self._in_code:
            if rest and _FENCE.startswith(rest) and rest != _FENCE:
                return _WAIT  # "`" or "``" so far: could still become a fence
            if not rest.startswith(_FENCE):
                return _TEXT
        newline = rest.find("\n")
        if newline < 0:
            return _WAIT
        if rest[:newline].strip().startswith(_FENCE):
            self._in_code = not self._in_code
        self._buf = rest[newline + 1 :]
        return _CONSUMED

    def _find_clause(self, sentence_end: int | None) -> int | None:
        """Index just after the first clause end, before `sentence_end`, with at least
        first_clause_words words before it; None if there is none (yet)."""
        buf = self._buf if sentence_end is None else self._buf[:sentence_end]
        newline = buf.find("\n")
        for match in _CLAUSE.finditer(buf if newline < 0 else buf[:newline]):
            before = buf[: match.start()]
            if (len(before.split()) >= self.first_clause_words and _HAS_LETTER.search(before)
                    and not _inside_brackets_or_quotes(before)):
                return match.end()
        return None

    def _find_boundary(self) -> int | None:
        """Index just after the first complete sentence in the buffer, or None to wait."""
        buf = self._buf
        newline = buf.find("\n")
        pos = 0
        while True:
            match = self._end.search(buf, pos)
            if match is None or (newline >= 0 and newline < match.start()):
                return newline + 1 if newline >= 0 else None
            if "\n" in match.group(2):
                return match.end()  # a line break after punctuation: no look-ahead needed
            if match.end() >= len(buf):
                return None  # the next character decides; wait for it
            if self._ends_sentence(buf, match, buf[match.end()]):
                return match.end()
            pos = match.end()

    @staticmethod
    def _ends_sentence(buf: str, match: re.Match[str], nxt: str) -> bool:
        if not _HAS_LETTER.search(buf[: match.start()]):
            return False  # "1." list markers, "..." alone
        mark = match.group(1)
        if mark in ("?", "!") or mark[0] in "?!;":
            return True
        if mark != ".":
            return False  # ellipsis: "Well... I think" is one sentence; a line break still ends it
        if nxt.islower():
            return False  # an abbreviation we do not know, or "etc. and"
        word = buf[: match.start()].rsplit(None, 1)[-1].lstrip("(\"“'‘*_")
        if word.lower() in _ABBREVIATIONS:
            return False
        if len(word) == 1 and word.isupper():
            return False  # an initial: "J. K. Rowling"
        return not _DOTTED_ACRONYM.match(word)


# -- speech clean-up ----------------------------------------------------------------------

_CODE_BLOCK = re.compile(r"```.*?(?:```|$)", re.DOTALL)
_IMAGE = re.compile(r"!\[([^\]]*)\]\([^)]*\)")
_LINK = re.compile(r"\[([^\]]+)\]\([^)]*\)")
_INLINE_CODE = re.compile(r"`([^`]*)`")
_BOLD = re.compile(r"(\*\*|__)(.+?)\1")
_ITALIC_STAR = re.compile(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])")
_ITALIC_UNDERSCORE = re.compile(r"(?<![\w_])_(?!\s)(.+?)(?<!\s)_(?![\w_])")
_STRIKE = re.compile(r"~~(.+?)~~")
_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+", re.MULTILINE)
_BULLET = re.compile(r"^\s*[-*+•]\s+", re.MULTILINE)
_QUOTE = re.compile(r"^\s*>\s?", re.MULTILINE)
_RULE = re.compile(r"^\s*([-*_])(\s*\1){2,}\s*$", re.MULTILINE)
_TABLE_PIPE = re.compile(r"\s*\|\s*")
_EMOJI = re.compile(
    "[\U0001F000-\U0001FAFF\U00002600-\U000027BF\U00002B00-\U00002BFF"
    "\U0000FE00-\U0000FE0F\U0000200D\U000020E3\U000E0020-\U000E007F]"
)
_SPACE = re.compile(r"\s+")


def clean_for_speech(text: str) -> str:
    """Strip what should not be read aloud: markdown syntax, code blocks and emoji.

    Link and emphasis text is kept, inline code keeps its content, whitespace is collapsed.
    """
    text = _CODE_BLOCK.sub(" ", text)
    text = _RULE.sub(" ", text)
    text = _IMAGE.sub(r"\1", text)
    text = _LINK.sub(r"\1", text)
    text = _INLINE_CODE.sub(r"\1", text)
    text = _HEADING.sub("", text)
    text = _BULLET.sub("", text)
    text = _QUOTE.sub("", text)
    text = _BOLD.sub(r"\2", text)
    text = _STRIKE.sub(r"\1", text)
    text = _ITALIC_STAR.sub(r"\1", text)
    text = _ITALIC_UNDERSCORE.sub(r"\1", text)
    text = _TABLE_PIPE.sub(" ", text) if "|" in text else text
    text = _EMOJI.sub("", text)
    return _SPACE.sub(" ", text).strip()
