"""GPT-2 byte-level BPE: turn a model's own ``vocab.json`` + ``merges.txt`` into a tiktoken codec.

One responsibility: text <-> token ids (and streaming ids -> text) for a GPT-2 checkpoint,
built only from the files that ship with it, so nothing is ever downloaded.
"""

from __future__ import annotations

import codecs
import functools
import json
import operator
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import tiktoken

from gpt2cli.errors import BadInputError, CorruptWeightsError, MissingTokenizerError

VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
ENDOFTEXT = "<|endoftext|>"

# tiktoken's own definition of GPT-2 (tiktoken_ext/openai_public.py, ``r50k_pat_str``): equivalent
# to the original release's r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|
# \s+(?!\S)|\s+""" but faster.
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""

# Vocabulary entries of this shape are control tokens, never produced by a merge.
_SPECIAL_RE = re.compile(r"<\|[^|\s]+\|>")

FileStamp = tuple[int, int]


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used for vocab/merges strings."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@functools.cache
def _byte_decoder() -> dict[str, int]:
    return {char: byte for byte, char in bytes_to_unicode().items()}


def _corrupt(path: Path, problem: str) -> CorruptWeightsError:
    return CorruptWeightsError(f"tokenizer file {path}: {problem}")


def _stamp(path: Path) -> FileStamp:
    try:
        info = path.stat()
    except OSError as exc:
        raise _corrupt(path, f"cannot read it ({exc.strerror or exc})") from exc
    return info.st_mtime_ns, info.st_size


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise _corrupt(path, f"cannot read it ({reason or exc})") from exc


def _load_vocab(path: Path) -> dict[str, int]:
    try:
        vocab = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise _corrupt(path, f"invalid JSON ({exc})") from exc
    if not isinstance(vocab, dict) or not vocab:
        raise _corrupt(path, "expected a non-empty JSON object mapping token -> id")
    for token, idx in vocab.items():
        if type(idx) is not int or idx < 0:
            raise _corrupt(path, f"token {token!r} has id {idx!r}, not a non-negative integer")
    if len(set(vocab.values())) != len(vocab):
        raise _corrupt(path, "two tokens share the same id")
    return vocab


def _load_merges(path: Path) -> list[tuple[str, str]]:
    lines = _read_text(path).splitlines()
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    merges: list[tuple[str, str]] = []
    for lineno, line in enumerate(lines, start=2):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise _corrupt(path, f"line {lineno} is not a merge of two tokens: {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _split_specials(vocab: dict[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    """Split ``vocab`` into (byte-level BPE tokens, special tokens such as ``<|endoftext|>``)."""
    specials = {tok: idx for tok, idx in vocab.items() if _SPECIAL_RE.fullmatch(tok)}
    regular = {tok: idx for tok, idx in vocab.items() if tok not in specials}
    return regular, specials


def _check_merges(regular: dict[str, int], merges: list[tuple[str, str]], path: Path) -> None:
    """tiktoken ranks merges by token id, so ids must grow with merges.txt line order."""
    previous = -1
    for lineno, (left, right) in enumerate(merges, start=2):
        result = regular.get(left + right, -1)
        parts = (regular.get(left, result), regular.get(right, result))
        if result <= previous or max(parts) >= result:
            raise _corrupt(
                path,
                f"merge {left!r} {right!r} (line {lineno}) does not match the ids in {VOCAB_FILE}",
            )
        previous = result


def _mergeable_ranks(regular: dict[str, int], n_merges: int, path: Path) -> dict[bytes, int]:
    decoder = _byte_decoder()
    missing = [char for char in decoder if char not in regular]
    if missing:
        raise _corrupt(path, f"missing the single-byte token {missing[0]!r}")
    if len(regular) != len(decoder) + n_merges:
        raise _corrupt(path, f"{len(regular)} tokens but {n_merges} merges in {MERGES_FILE}")
    try:
        return {bytes(decoder[c] for c in tok): idx for tok, idx in regular.items()}
    except KeyError as exc:
        raise _corrupt(path, f"character {exc.args[0]!r} is not a GPT-2 byte symbol") from exc


@functools.lru_cache(maxsize=4)
def _build_encoding(
    vocab_path: Path, merges_path: Path, stamps: tuple[FileStamp, FileStamp]
) -> tiktoken.Encoding:
    """Build (and cache by path + mtime + size) the tiktoken Encoding for one vocab/merges pair."""
    del stamps  # only part of the cache key
    regular, specials = _split_specials(_load_vocab(vocab_path))
    if ENDOFTEXT not in specials:
        raise _corrupt(vocab_path, f"no {ENDOFTEXT} token")
    merges = _load_merges(merges_path)
    _check_merges(regular, merges, merges_path)
    ranks = _mergeable_ranks(regular, len(merges), vocab_path)
    return tiktoken.Encoding(
        f"gpt2-bpe:{vocab_path}",
        pat_str=GPT2_PAT_STR,
        mergeable_ranks=ranks,
        special_tokens=specials,
    )


class Tokenizer:
    """A GPT-2 tokenizer backed by tiktoken, built from a checkpoint's own BPE files."""

    def __init__(self, encoding: tiktoken.Encoding) -> None:
        self._encoding = encoding
        self._eot_id = encoding.encode_single_token(ENDOFTEXT)

    @classmethod
    def from_files(cls, vocab_path: str | os.PathLike[str], merges_path: str | os.PathLike[str]) -> Tokenizer:
        """Load ``vocab.json`` + ``merges.txt``; raises CorruptWeightsError naming a bad file."""
        vocab, merges = Path(vocab_path).resolve(), Path(merges_path).resolve()
        return cls(_build_encoding(vocab, merges, (_stamp(vocab), _stamp(merges))))

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load the ``vocab.json`` and ``merges.txt`` inside a checkpoint directory.

        Raises:
            MissingTokenizerError: one of the two files is not there.
        """
        path = Path(path)
        missing = [name for name in (VOCAB_FILE, MERGES_FILE) if not (path / name).is_file()]
        if missing:
            raise MissingTokenizerError(
                f"{path} has no {' or '.join(missing)}: GPT-2's tokenizer files are needed",
                hint="copy vocab.json and merges.txt from the model it came from "
                "(`gpt2 models info gpt2` shows where gpt2's are)",
            )
        return cls.from_files(path / VOCAB_FILE, path / MERGES_FILE)

    @property
    def encoding(self) -> tiktoken.Encoding:
        return self._encoding

    @property
    def eot_id(self) -> int:
        """Id of ``<|endoftext|>`` (50256 for every GPT-2 checkpoint)."""
        return self._eot_id

    @property
    def n_vocab(self) -> int:
        """One more than the largest token id (50257 for GPT-2)."""
        return self._encoding.n_vocab

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Encode ``text`` to token ids.

        By default special-token text such as a literal ``"<|endoftext|>"`` inside user text is
        ordinary text and is encoded byte-wise (``<``, ``|``, ``endoftext`` ...), never as the
        control token, so a prompt cannot smuggle in an end-of-text. With ``allow_special=True``
        it becomes the special token (``eot_id``).
        """
        if allow_special:
            return self._encoding.encode(text, allowed_special="all")
        return self._encoding.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], *, allow_special: bool = False) -> list[list[int]]:
        """``encode`` for many texts (threaded inside tiktoken)."""
        if allow_special:
            return self._encoding.encode_batch(list(texts), allowed_special="all")
        return self._encoding.encode_ordinary_batch(list(texts))

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Concatenated raw bytes of ``ids`` (may be invalid UTF-8)."""
        ids = list(ids)
        try:
            return self._encoding.decode_bytes(ids)
        except (KeyError, OverflowError, TypeError, ValueError) as exc:
            raise self._bad_ids(ids) from exc

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; byte sequences that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of one token (a special token gives its literal text)."""
        try:
            return self._encoding.decode_single_token_bytes(token_id)
        except (KeyError, OverflowError, TypeError, ValueError) as exc:
            raise self._bad_ids([token_id]) from exc

    def check_ids(self, ids: list[int]) -> None:
        """Raises BadInputError unless every one of ``ids`` is an integer (numpy's and torch's
        too, not bool) token id of this vocabulary."""
        n = self.n_vocab
        for i in ids:
            try:
                ok = not isinstance(i, bool) and 0 <= operator.index(i) < n
            except TypeError:
                ok = False
            if not ok:
                raise BadInputError(f"token id {i!r} is not in the vocabulary (size {n})")

    def _bad_ids(self, ids: list[int]) -> BadInputError:
        bad = next((i for i in ids if not self._is_valid(i)), ids[0] if ids else None)
        return BadInputError(f"token id {bad!r} is not in the vocabulary (size {self.n_vocab})")

    def _is_valid(self, token_id: object) -> bool:
        try:
            self._encoding.decode_single_token_bytes(token_id)  # type: ignore[arg-type]
        except (KeyError, OverflowError, TypeError, ValueError):
            return False
        return True


class StreamDecoder:
    """Turn token ids into text one at a time without ever emitting half a character.

    Bytes of a character split across tokens are held back until it is complete; bytes that can
    never complete become U+FFFD as soon as that is certain. The concatenation of every ``push``
    result plus ``flush()`` equals ``tokenizer.decode(all_ids)``.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is now complete (possibly ``""``)."""
        return self._decoder.decode(self._tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """End of stream: return what is held back (an incomplete tail becomes U+FFFD)."""
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text
