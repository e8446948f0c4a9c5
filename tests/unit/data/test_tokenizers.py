"""Tokenizers: round trips, special tokens, JSON persistence and the load_tokenizer factory."""

import json
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsk.data.tokenizers import (
    DEFAULT_ALPHABET,
    MARKUP_TOKENS,
    ByteTokenizer,
    CharTokenizer,
    HFTokenizer,
    Tokenizer,
    TokenizerFileError,
    build_char_tokenizer,
    load_tokenizer,
)

TRACE = "12+34=<think>2+4=6 1+3=4</think><answer>46</answer>"
SPELLED = "neuf plus zéro égale neuf, fünf plus vier ist neun, cinco más cero es cinco"


# ---- char -----------------------------------------------------------------------------------------------------------


def test_char_ids_of_specials_are_fixed():
    tok = CharTokenizer()
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert [tok.token_to_id(t) for t in MARKUP_TOKENS] == [4, 5, 6, 7]
    assert tok.vocab_size == 8 + len(DEFAULT_ALPHABET)
    assert tok.token_to_id("0") == 8 + DEFAULT_ALPHABET.index("0")


def test_char_vocabulary_is_the_same_in_a_fresh_process():
    # Portability of checkpoints: no set iteration or hash order may leak into the ids.
    code = "from dsk.data.tokenizers import CharTokenizer; print(CharTokenizer().encode('12+34=<think>zéro</think>'))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "123", "PYTHONPATH": ":".join(sys.path)},
    )
    assert json.loads(out.stdout) == CharTokenizer().encode("12+34=<think>zéro</think>")


def test_char_markup_tags_are_single_tokens():
    tok = CharTokenizer()
    ids = tok.encode(TRACE)
    assert ids.count(tok.token_to_id("<think>")) == 1
    assert ids.count(tok.token_to_id("</answer>")) == 1
    assert len(ids) == len("12+34=") + 1 + len("2+4=6 1+3=4") + 1 + 1 + len("46") + 1


def test_char_round_trips_every_task_language():
    tok = CharTokenizer()
    for text in (TRACE, SPELLED, "(23*7)%11=", "17,19,16,2>14", "3 plus 2 égale"):
        assert tok.decode(tok.encode(text)) == text


@given(st.lists(st.sampled_from(list(DEFAULT_ALPHABET) + list(MARKUP_TOKENS)), max_size=60))
@settings(max_examples=200, deadline=None)
def test_char_round_trip_property(pieces):
    tok = CharTokenizer()
    text = "".join(pieces)
    assert tok.decode(tok.encode(text)) == text


def test_bos_eos_added_on_request_and_skipped_on_decode():
    tok = CharTokenizer()
    ids = tok.encode("46", add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == "46"
    assert tok.decode(ids, skip_special=False) == "<bos>46<eos>"
    assert tok.decode([*ids, tok.pad_id, tok.pad_id]) == "46"


def test_control_tokens_never_come_from_text():
    # Otherwise a document containing "<eos>" would end a sequence early.
    for tok in (CharTokenizer(), ByteTokenizer()):
        ids = tok.encode("a<eos><pad><bos>b")
        assert not {tok.eos_id, tok.pad_id, tok.bos_id} & set(ids)
        assert tok.decode(ids) == "a<eos><pad><bos>b"


def test_char_unknown_character_raises_by_default_and_names_it():
    with pytest.raises(ValueError, match="'€'"):
        CharTokenizer().encode("5€")
    assert CharTokenizer().token_to_id("€") is None


def test_char_unknown_character_maps_to_unk_when_asked():
    tok = CharTokenizer(unknown="unk")
    assert tok.encode("5€") == [tok.token_to_id("5"), tok.unk_id]
    assert tok.decode(tok.encode("5€")) == "5<unk>"
    assert tok.token_to_id("<unk>") == tok.unk_id


def test_char_rejects_duplicate_alphabet():
    with pytest.raises(ValueError, match="repeats"):
        CharTokenizer("abca")


def test_decode_rejects_ids_outside_the_vocabulary():
    tok = CharTokenizer()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])


def test_decode_accepts_numpy_like_integers():
    torch = pytest.importorskip("torch")
    tok = CharTokenizer()
    assert tok.decode(torch.tensor(tok.encode("12+3"))) == "12+3"


def test_char_to_json_round_trip_keeps_a_custom_alphabet():
    tok = CharTokenizer("0123456789+=", unknown="unk")
    again = CharTokenizer.from_json(tok.to_json())
    assert again.alphabet == tok.alphabet and again.unknown == "unk"
    assert again.encode("1+2=3") == tok.encode("1+2=3")
    assert load_tokenizer(tok.to_json()).encode("1+2=3") == tok.encode("1+2=3")


def test_registry_factory_reads_the_config():
    class Cfg:
        unknown = "unk"

    assert build_char_tokenizer(Cfg()).unknown == "unk"


# ---- byte -----------------------------------------------------------------------------------------------------------


@given(st.text(max_size=60))
@settings(max_examples=200, deadline=None)
def test_byte_round_trip_property(text):
    tok = ByteTokenizer()
    assert tok.decode(tok.encode(text)) == text


def test_byte_specials_follow_the_bytes():
    tok = ByteTokenizer()
    assert tok.vocab_size == 263
    assert tok.pad_id == 256 and tok.token_to_id("</answer>") == 262
    assert tok.encode("é") == [0xC3, 0xA9]
    assert tok.decode(tok.encode(TRACE)) == TRACE


def test_byte_decode_of_broken_utf8_does_not_raise():
    assert ByteTokenizer().decode([0xC3]) == "\ufffd"


def test_byte_to_json_round_trip():
    tok = load_tokenizer(ByteTokenizer().to_json())
    assert isinstance(tok, ByteTokenizer)


# ---- hf -------------------------------------------------------------------------------------------------------------


@pytest.fixture
def hf_tokenizer_json(tmp_path):
    """A tiny BPE tokenizer trained locally (no downloads), with the R1 tags as non-special added tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = ["12+34=46", "seven plus five is one two", "the cat sat on the mat"] * 20
    tok.train_from_iterator(corpus, trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKUP_TOKENS])
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


def test_hf_round_trip_and_special_ids(hf_tokenizer_json):
    tok = HFTokenizer.from_file(hf_tokenizer_json)
    assert isinstance(tok, Tokenizer)
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<s>", "</s>")
    ids = tok.encode(TRACE, add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.token_to_id("<think>") in ids
    assert tok.decode(ids) == TRACE
    assert tok.decode(ids, skip_special=False) == f"<s>{TRACE}</s>"


def test_hf_special_tokens_are_not_read_from_text_but_tags_are(hf_tokenizer_json):
    from tokenizers import Tokenizer as Raw

    raw = Raw.from_file(str(hf_tokenizer_json))
    raw.add_special_tokens(["<answer>"])  # a tag registered as special still encodes as one id
    tok = HFTokenizer(raw)
    ids = tok.encode("1</s><answer>2")
    assert tok.eos_id not in ids and tok.token_to_id("<answer>") in ids
    assert tok.decode(ids) == "1</s><answer>2"
    assert raw.encode("</s>", add_special_tokens=False).ids == [tok.eos_id]  # the caller's object is untouched


def test_hf_to_json_and_load_tokenizer(hf_tokenizer_json):
    tok = HFTokenizer.from_file(hf_tokenizer_json)
    for again in (
        load_tokenizer(tok.to_json()),
        load_tokenizer(str(hf_tokenizer_json)),
        load_tokenizer(hf_tokenizer_json.parent),
    ):
        assert isinstance(again, HFTokenizer)
        assert again.encode(TRACE) == tok.encode(TRACE)
        assert again.vocab_size == tok.vocab_size


def test_hf_pad_falls_back_to_eos_and_explicit_names_are_checked(tmp_path):
    from tokenizers import Tokenizer as Raw
    from tokenizers import models

    raw = Raw(models.WordLevel({"a": 0, "b": 1, "</s>": 2}, unk_token="a"))
    tok = HFTokenizer(raw)
    assert tok.pad_id == tok.eos_id == 2 and tok.bos_id is None
    with pytest.raises(ValueError, match="no BOS"):
        tok.encode("a", add_bos=True)
    with pytest.raises(ValueError, match="not in its vocabulary"):
        HFTokenizer(raw, pad_token="<pad>")


# ---- factory --------------------------------------------------------------------------------------------------------


def test_load_tokenizer_by_name_and_file(tmp_path):
    assert isinstance(load_tokenizer("char"), CharTokenizer)
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    path = tmp_path / "tok.json"
    path.write_text(CharTokenizer().to_json(), encoding="utf-8")
    assert load_tokenizer(path).encode(TRACE) == CharTokenizer().encode(TRACE)
    tok = CharTokenizer()
    assert load_tokenizer(tok) is tok


def test_load_tokenizer_rejects_unknown_specs(tmp_path):
    with pytest.raises(TokenizerFileError, match="nope"):
        load_tokenizer("nope")
    with pytest.raises(ValueError, match="'wordpiece'"):
        load_tokenizer({"type": "wordpiece"})
    with pytest.raises(ValueError, match="int"):
        load_tokenizer(3)


def test_from_json_rejects_a_newer_format():
    data = json.loads(CharTokenizer().to_json())
    data["version"] = 99
    with pytest.raises(ValueError, match="newer"):
        CharTokenizer.from_json(data)


def test_tokenizer_module_does_not_import_torch():
    code = "import sys, dsk.data.tokenizers, dsk.data.jsonl, dsk.data.batching; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={"PYTHONPATH": ":".join(sys.path)}
    )
    assert out.stdout.strip() == "False"


def test_a_missing_or_unreadable_hf_tokenizer_file_is_input_error_naming_it(tmp_path):
    from dsk.errors import InputError

    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(TokenizerFileError, match="no tokenizer.json") as info:
        HFTokenizer.from_file(missing)
    assert isinstance(info.value, InputError) and info.value.file == str(missing)
    garbage = tmp_path / "tokenizer.json"
    garbage.write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerFileError, match="not a tokenizer.json") as info:
        HFTokenizer.from_file(tmp_path)
    assert info.value.file == str(garbage)
    with pytest.raises(TokenizerFileError, match="cannot read tokenizer JSON") as info:
        load_tokenizer(garbage)
    assert info.value.file == str(garbage)


def test_an_hf_tokenizer_without_the_named_special_token_names_its_file(hf_tokenizer_json):
    with pytest.raises(TokenizerFileError, match="pad_token='<nope>' is not in its vocabulary") as info:
        HFTokenizer.from_file(hf_tokenizer_json, pad_token="<nope>")
    assert info.value.file == str(hf_tokenizer_json)
