"""Tokenizer: ids identical to Hugging Face's GPT-2 tokenizer, lossless round trips, streaming."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from bpe import ENCODER_JSON_SHA256, VOCAB_BPE_SHA256, _sha256, bpe_files, copy_bpe_files
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gpt2cli.errors import BadInputError, CorruptWeightsError, MissingTokenizerError
from gpt2cli.tokenizer import StreamDecoder, Tokenizer

SETTINGS = settings(deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow])

CORPUS = [
    "Hello, world! This is a plain English sentence.",
    "The quick brown fox jumps over the lazy dog.",
    "",
    " ",
    "a",
    "Café naïve résumé façade — déjà vu; Ærøskøbing, Straße, İstanbul.",
    "e\u0301 a\u0300\u0323 combining marks: Z\u0351\u0362a\u0334l\u0338g\u0335o",
    "中文分词测试：今天天气很好。日本語のテキスト、한국어 문장.",
    "مرحبا بالعالم! هذا نص عربي.",
    "עברית וגם ελληνικά και кириллица.",
    "emoji 🙂😀👍🏽 family 👨‍👩‍👧‍👦 rainbow 🏳️‍🌈 flags 🇺🇸🇯🇵🇩🇪 keycap 1️⃣",
    "def f(x):\n\tif x:\n\t\treturn {'a': [1, 2, 3]}  # comment\n\treturn None\n",
    'int main(void) {\r\n    printf("%d\\n", 42);\r\n    return 0;\r\n}\r\n',
    "a" + " " * 40 + "b" + "\n" * 12 + "c\t\t\t  \n \n  ",
    "   leading and trailing spaces   ",
    "\n\n\n",
    "It's, don't, they're, we've, I'm, he'll, she'd.",
    "IT'S DON'T THEY'RE WE'VE I'M HE'LL SHE'D 'S 'T 'Re",
    "numbers 0 1 12 123 1234 12345 3.14159 -2.5e10 1,000,000 ٣٤٥ ²³",
    "<|endoftext|>",
    "before<|endoftext|>after <|endoftext|> <|endoftext|>\n<|endoftext|>",
    "<|endoftext|><|endoftext|> <|endoft",
    "URL https://example.com/path?q=1&r=2#frag and email a.b@c.org",
    "\u00a0nbsp\u2003em-space\u3000ideographic\u200bzero-width",
    "mixed 'quotes' “curly” ‘single’ «guillemets» ...!!!???",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    vocab, merges = bpe_files()
    return Tokenizer.from_files(vocab, merges)


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory):
    transformers = pytest.importorskip("transformers")
    directory = tmp_path_factory.mktemp("hf-gpt2")
    copy_bpe_files(directory)
    oracle = transformers.GPT2TokenizerFast.from_pretrained(directory)
    assert len(oracle) == 50257  # really built from our files, not an empty vocab
    return oracle


def hf_ids(hf, text: str, *, special: bool = False) -> list[int]:
    return list(hf(text, add_special_tokens=False, split_special_tokens=not special)["input_ids"])


def test_bpe_files_are_the_real_gpt2_files() -> None:
    vocab, merges = bpe_files()
    assert _sha256(vocab) == ENCODER_JSON_SHA256
    assert _sha256(merges) == VOCAB_BPE_SHA256


def test_basic_properties(tok: Tokenizer) -> None:
    assert tok.eot_id == 50256
    assert tok.n_vocab == 50257
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.token_bytes(tok.eot_id) == b"<|endoftext|>"
    assert tok.token_bytes(220) == b" "


@pytest.mark.parametrize("text", CORPUS)
def test_ids_match_huggingface(tok: Tokenizer, hf, text: str) -> None:
    assert tok.encode(text) == hf_ids(hf, text)
    assert tok.encode(text, allow_special=True) == hf_ids(hf, text, special=True)
    assert tok.decode(tok.encode(text)) == text


def test_endoftext_in_user_text_is_text_by_default(tok: Tokenizer) -> None:
    ids = tok.encode("a<|endoftext|>b")
    assert tok.eot_id not in ids
    assert tok.decode(ids) == "a<|endoftext|>b"
    assert tok.encode("a<|endoftext|>b", allow_special=True) == [64, tok.eot_id, 65]


def test_encode_batch(tok: Tokenizer) -> None:
    assert tok.encode_batch(CORPUS) == [tok.encode(text) for text in CORPUS]
    assert tok.encode_batch([]) == []
    texts = ["x<|endoftext|>", "y"]
    assert tok.encode_batch(texts, allow_special=True) == [
        tok.encode(text, allow_special=True) for text in texts
    ]


@SETTINGS
@given(text=st.text())
def test_round_trip(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")


@SETTINGS
@given(text=st.text(alphabet=st.characters(codec="utf-8"), max_size=60))
def test_ids_match_huggingface_on_arbitrary_text(tok: Tokenizer, hf, text: str) -> None:
    assert tok.encode(text) == hf_ids(hf, text)


def test_decode_replaces_invalid_utf8(tok: Tokenizer) -> None:
    ids = tok.encode("🙂")
    assert len(ids) > 1
    assert tok.decode(ids[:-1]) == "\ufffd"
    assert tok.decode_bytes(ids[:-1]) == "🙂".encode()[: len(tok.decode_bytes(ids[:-1]))]


@pytest.mark.parametrize("bad", [-1, 50257, 10**12])
def test_unknown_token_id_is_a_clear_error(tok: Tokenizer, bad: int) -> None:
    with pytest.raises(BadInputError, match=str(bad)):
        tok.decode([1, bad])
    with pytest.raises(BadInputError):
        tok.token_bytes(bad)


def test_from_dir_and_cache(tmp_path: Path) -> None:
    copy_bpe_files(tmp_path)
    first = Tokenizer.from_dir(tmp_path)
    assert Tokenizer.from_dir(tmp_path).encoding is first.encoding  # cached by path + mtime
    assert first.encode("Hello world") == [15496, 995]


# ---- broken files ------------------------------------------------------------------------


def _edited(tmp_path: Path, *, vocab=None, merges=None) -> Path:
    """Copy the real files into tmp_path, passing vocab (dict) / merges (lines) through edits."""
    vocab_path, merges_path = copy_bpe_files(tmp_path)
    if vocab is not None:
        data = json.loads(vocab_path.read_text(encoding="utf-8"))
        vocab_path.write_text(json.dumps(vocab(data)), encoding="utf-8")
    if merges is not None:
        lines = merges_path.read_text(encoding="utf-8").split("\n")
        merges_path.write_text("\n".join(merges(lines)), encoding="utf-8")
    return tmp_path


def _swap_lines(lines: list[str]) -> list[str]:
    return [lines[0], lines[2], lines[1], *lines[3:]]


def _drop_eot(vocab: dict) -> dict:
    return {k: v for k, v in vocab.items() if k != "<|endoftext|>"}


def _bad_id(vocab: dict) -> dict:
    return {**vocab, "Ġthe": "262"}


def _duplicate_id(vocab: dict) -> dict:
    return {**vocab, "Ġthe": 263}


BROKEN: dict[str, tuple[dict[str, Callable[[Any], Any]], str]] = {
    "merges out of id order": ({"merges": _swap_lines}, "merges.txt"),
    "merge line missing": ({"merges": lambda ls: ls[:100] + ls[101:]}, "merges"),
    "malformed merge line": ({"merges": lambda ls: [*ls[:5], "a b c", *ls[5:]]}, "line 6"),
    "merge of unknown token": ({"merges": lambda ls: [*ls, "zzzq qqqz"]}, "merges.txt"),
    "no endoftext": ({"vocab": _drop_eot}, "endoftext"),
    "non-integer id": ({"vocab": _bad_id}, "vocab.json"),
    "duplicate id": ({"vocab": _duplicate_id}, "same id"),
    "not an object": ({"vocab": lambda v: list(v)}, "JSON object"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_inconsistent_files_raise_corrupt_weights(tmp_path: Path, case: str) -> None:
    edits, message = BROKEN[case]
    directory = _edited(tmp_path, **edits)
    with pytest.raises(CorruptWeightsError, match=message):
        Tokenizer.from_dir(directory)


def test_invalid_json_names_the_file(tmp_path: Path) -> None:
    copy_bpe_files(tmp_path)
    (tmp_path / "vocab.json").write_text('{"a": 1,', encoding="utf-8")
    with pytest.raises(CorruptWeightsError, match=r"vocab\.json.*invalid JSON"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("missing", ["vocab.json", "merges.txt"])
def test_missing_file_names_the_file(tmp_path: Path, missing: str) -> None:
    copy_bpe_files(tmp_path)
    (tmp_path / missing).unlink()
    with pytest.raises(MissingTokenizerError, match=missing.replace(".", r"\.")):
        Tokenizer.from_dir(tmp_path)


def test_merges_not_utf8(tmp_path: Path) -> None:
    copy_bpe_files(tmp_path)
    (tmp_path / "merges.txt").write_bytes(b"#version: 0.2\n\xff\xfe x\n")
    with pytest.raises(CorruptWeightsError, match="merges.txt"):
        Tokenizer.from_dir(tmp_path)


# ---- streaming ---------------------------------------------------------------------------


def _byte_token(tok: Tokenizer, byte: int) -> int:
    return next(i for i in range(256) if tok.token_bytes(i) == bytes([byte]))


def test_emoji_split_over_tokens_waits_until_complete(tok: Tokenizer) -> None:
    emoji = "🙂"
    pieces = [_byte_token(tok, b) for b in emoji.encode("utf-8")]
    assert len(pieces) == 4
    stream = StreamDecoder(tok)
    assert [stream.push(i) for i in pieces] == ["", "", "", emoji]
    assert stream.flush() == ""

    stream = StreamDecoder(tok)
    natural = tok.encode(" " + emoji + "!")
    assert "".join(stream.push(i) for i in natural) + stream.flush() == " 🙂!"


def test_truncated_character_becomes_replacement_on_flush(tok: Tokenizer) -> None:
    stream = StreamDecoder(tok)
    first_two = [_byte_token(tok, b) for b in "🙂".encode()[:2]]
    assert [stream.push(i) for i in first_two] == ["", ""]
    assert stream.flush() == "\ufffd"
    assert stream.push(tok.encode("ok")[0]) == "ok"  # reusable after flush


def test_impossible_byte_is_replaced_promptly(tok: Tokenizer) -> None:
    stream = StreamDecoder(tok)
    assert stream.push(_byte_token(tok, 0xF0)) == ""
    # 'A' cannot continue a 4-byte sequence: the lone lead byte is replaced right away.
    assert stream.push(_byte_token(tok, ord("A"))) == "\ufffdA"


token_ids = st.one_of(st.integers(0, 255), st.integers(0, 50256))


@SETTINGS
@given(ids=st.lists(token_ids, max_size=40))
@example(ids=[169, 94])  # b"\xed\xa1": a surrogate lead that CPython's incremental decoder holds
def test_stream_decoder_matches_full_decode(tok: Tokenizer, ids: list[int]) -> None:
    full = tok.decode(ids)
    stream = StreamDecoder(tok)
    emitted = ""
    for k, token_id in enumerate(ids, start=1):
        emitted += stream.push(token_id)
        assert full.startswith(emitted)
        # Everything decodable so far is out; only the bytes of one possibly incomplete
        # character (at most 3) are held back, which a one-shot decode of the same prefix
        # shows as trailing U+FFFD (CPython holds e.g. b"\xed\xa1", which it shows as two).
        prefix = tok.decode(ids[:k])
        assert prefix.startswith(emitted)
        held = prefix[len(emitted) :]
        assert set(held) <= {"\ufffd"} and len(held) <= 3
    assert emitted + stream.flush() == full
