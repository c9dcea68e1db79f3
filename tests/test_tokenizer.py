import json

import pytest

from transfusion.tokenizer import ByteTokenizer, HFTokenizer, tokenizer_from_dict

TEXTS = [
    "",
    "hello",
    "a red circle to the left of a blue square",
    "héllo wörld",
    "日本語のテキスト",
    "emoji 🙂🚀👩‍👩‍👧",
    "\x00\x7f tabs\tand\nnewlines",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_roundtrip_exact(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text


def test_special_ids_distinct_and_skipped_on_decode():
    tok = ByteTokenizer()
    specials = [tok.bos_id, tok.eos_id, tok.boi_id, tok.eoi_id, tok.pad_id]
    assert len(set(specials)) == 5 and min(specials) == 256 and tok.vocab_size == 261
    assert tok.decode([tok.bos_id, *tok.encode("hi"), tok.boi_id, tok.eoi_id, tok.eos_id]) == "hi"


def test_lone_surrogate_is_a_clear_error():
    with pytest.raises(ValueError, match="surrogate"):
        ByteTokenizer().encode("bad \ud800 text")


def test_invalid_utf8_from_a_model():
    tok = ByteTokenizer()
    assert tok.decode([0xFF, 104, 105]) == "\ufffdhi"
    with pytest.raises(ValueError, match="not valid UTF-8"):
        tok.decode([0xFF], errors="strict")


def _tiny_tokenizer_json(path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for word in ["a", "red", "circle", "blue", "square", "the", "of"]:
        vocab[word] = len(vocab)
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    return len(vocab)


def test_hf_wrapper_adds_specials(tmp_path):
    base = _tiny_tokenizer_json(tmp_path)
    tok = HFTokenizer(tmp_path)
    assert tok.base_vocab_size == base
    assert tok.bos_id == 1 and tok.eos_id == 2  # reused from the file
    assert {tok.boi_id, tok.eoi_id} == {base, base + 1}  # new ids after the vocabulary
    assert tok.pad_id >= base and tok.vocab_size == base + 3
    ids = tok.encode("a red circle")
    assert tok.decode(ids) == "a red circle"
    assert tok.decode([tok.bos_id, *ids, tok.boi_id, tok.eoi_id]) == "a red circle"
    again = tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))
    assert again.encode("blue square") == tok.encode("blue square")


def test_hf_wrapper_missing_file(tmp_path):
    pytest.importorskip("tokenizers")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        HFTokenizer(tmp_path)


def test_train_tokenizer_cli_learns_the_source_words(tmp_path, capsys):
    """`transfusion train-tokenizer` on the shape captions: their words become single tokens, and any
    text still round-trips."""
    pytest.importorskip("tokenizers")
    from transfusion import cli
    from transfusion.config import DataConfig
    from transfusion.data.sources import source_texts

    assert cli.main(["train-tokenizer", "--out", str(tmp_path), "--texts", "300", "--vocab-size", "320"]) == 0
    assert "tokenizer.json" in capsys.readouterr().out
    tok = HFTokenizer(tmp_path / "tokenizer.json")
    caption = source_texts(DataConfig(), 1)[0]
    assert len(tok.encode(caption)) <= len(caption.split()) < len(caption.encode())
    assert tok.decode(tok.encode("ünïcode ✓ text")) == "ünïcode ✓ text"
