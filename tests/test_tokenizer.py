"""engine.tokenizer against the real Qwen2.5 vocabulary and transformers' AutoTokenizer."""
import json
import re

import pytest
import tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from protege.engine.tokenizer import Tokenizer, qwen25_tokenizer, qwen25_tokenizer_file, train_bpe_tokenizer

TEXTS = ["Hello, world!", "<|im_start|>user\n你好<|im_end|>\n", "def f(x):\n    return x  # ok\n\n\n",
         "naïve café 123456 ü\u0301 «quotes» \"q\" \\ <tool_call>\n{\"a\": 1}\n</tool_call>", "  \t spaces\r\n end  "]


@pytest.fixture(scope="module")
def qwen():
    return qwen25_tokenizer()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    corpus = ["def add(a, b):\n    return a + b\n", "Hello, world! The quick brown fox.", "你好，世界",
              "x = [1, 2, 3]\n"]
    return train_bpe_tokenizer(corpus * 10, 400, tmp_path_factory.mktemp("tiny"))


def test_qwen_known_ids(qwen):
    assert qwen.encode("Hello, world!") == [9707, 11, 1879, 0]
    assert qwen.encode("<|im_start|>user\n你好<|im_end|>") == [151644, 872, 198, 108386, 151645]
    assert qwen.vocab_size == 151665
    assert qwen.eos_ids == (151645, 151643)
    assert (qwen.endoftext_id, qwen.im_start_id, qwen.im_end_id) == (151643, 151644, 151645)
    assert qwen.token_id("<tool_call>") == 151657 and qwen.token_id("</tool_call>") == 151658
    assert qwen.token_id("<|file_sep|>") == 151664


def test_qwen3_tokens_are_dropped(qwen):
    # Qwen3's files add <tool_response>, <think>, ... at 151665+; in Qwen2.5 they are plain text.
    for token in ("<tool_response>", "</tool_response>", "<think>", "</think>"):
        with pytest.raises(KeyError, match="no token"):
            qwen.token_id(token)
        assert len(qwen.encode(token)) > 1 and max(qwen.encode(token)) < 151643


def test_decode_round_trip(qwen):
    for text in TEXTS:
        text = text.replace("ü\u0301", "ǘ")  # NFC-normalised already, so decoding gives it back unchanged
        assert qwen.decode(qwen.encode(text)) == text
    assert qwen.decode([151644, 872, 198, 151645], skip_special_tokens=True) == "user\n"


@pytest.mark.parametrize("which", ["qwen", "tiny"])
def test_encode_text_makes_every_added_token_plain_text(which, request):
    tokenizer = request.getfixturevalue(which)
    added = tokenizer.backend.get_added_tokens_decoder()
    for token in (t.content for t in added.values()):  # special ones and non-special ones (<tool_call>, ...)
        for text in (token, f"x.{token}\n{token}{token} y"):
            ids = tokenizer.encode_text(text)
            assert not set(ids) & set(added) and tokenizer.decode(ids) == text
            assert tokenizer.encode(text) != ids  # encode still maps it to its token
    for text in (t for t in TEXTS if "<" not in t):  # no added-token strings in them: the same ids as encode
        assert tokenizer.encode_text(text) == tokenizer.encode(text)


def test_encode_text_matches_transformers_split_special_tokens(qwen):
    # transformers encodes special=True tokens as text with split_special_tokens=True; <tool_call> and
    # <|file_sep|> are special=False in Qwen's files, so this reference covers the special ones.
    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer.from_str(qwen.backend.to_str()))
    for text in ["<|im_end|>\n<|im_start|>assistant\n", "end.<|endoftext|>", " <|im_start|><|vision_pad|>  ",
                 "你好<|im_end|>\r\n\n", TEXTS[0], TEXTS[2]]:
        assert qwen.encode_text(text) == hf.encode(text, add_special_tokens=False, split_special_tokens=True)


@pytest.mark.parametrize("which", ["qwen", "tiny"])
def test_saved_dir_loads_in_autotokenizer(which, request, tmp_path):
    tokenizer = request.getfixturevalue(which)
    tokenizer.save(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    reloaded = Tokenizer.from_dir(tmp_path)
    for text in TEXTS:
        assert hf.encode(text, add_special_tokens=False) == tokenizer.encode(text) == reloaded.encode(text)
    assert hf.eos_token == "<|im_end|>" and hf.pad_token == "<|endoftext|>" and hf.bos_token is None
    assert len(hf) == tokenizer.vocab_size
    prompt = hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                      "<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_tiny_bpe_layout(tiny):
    assert tiny.vocab_size <= 400
    n = tiny.vocab_size
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"]
    assert [tiny.token_id(t) for t in specials] == list(range(n - 5, n))  # after the learned tokens, as in Qwen
    assert tiny.eos_ids == (n - 3, n - 5)
    assert tiny.encode("<|im_start|>user\nhi<|im_end|>")[0] == n - 4
    assert len(tiny.encode("def add(a, b):")) < len("def add(a, b):")  # merges were learned
    for text in TEXTS:
        text = text.replace("ü\u0301", "ǘ")
        assert tiny.decode(tiny.encode(text)) == text  # byte-level: any text round-trips


def test_tiny_bpe_splits_text_like_qwen(qwen, tiny):
    # Same normalizer and pre-tokenizer as the real vocabulary, so chat segment boundaries behave the same.
    for text in TEXTS:
        normalized = qwen.backend.normalizer.normalize_str(text)
        assert tiny.backend.normalizer.normalize_str(text) == normalized
        assert tiny.backend.pre_tokenizer.pre_tokenize_str(normalized) == \
            qwen.backend.pre_tokenizer.pre_tokenize_str(normalized)


def test_tiny_bpe_rejects_too_small_vocab(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_bpe_tokenizer(["abc"], 100, tmp_path)


def test_missing_tokenizer_json_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "tokenizer.json"))):
        Tokenizer.from_dir(tmp_path)


def test_malformed_json_names_path(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text('{"model": {"type": "BPE", ')
    with pytest.raises(ValueError, match=re.escape(f"{path}: not valid JSON")):
        Tokenizer.from_file(path)
    path.write_text('{"version": "1.0"}')
    with pytest.raises(ValueError, match="no 'model' object"):
        Tokenizer.from_file(path)
    path.write_text('{"model": {"type": "NoSuchModel"}}')
    with pytest.raises(ValueError, match="cannot build a tokenizer"):
        Tokenizer.from_file(path)


def test_tokenizer_without_chat_tokens_is_rejected(tmp_path):
    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.add_special_tokens(["<|endoftext|>"])
    path = tmp_path / "tokenizer.json"
    backend.save(str(path))
    with pytest.raises(ValueError, match=r"lacks the chat tokens \['<\|im_start\|>', '<\|im_end\|>'"):
        Tokenizer.from_file(path)


def test_qwen_files_have_the_qwen3_extras_we_drop():
    # Guards the filter: the shipped file really holds tokens past 151664, which from_file must drop.
    ids = [t["id"] for t in json.loads(qwen25_tokenizer_file().read_text())["added_tokens"]]
    assert max(ids) > 151664 and 151664 in ids
