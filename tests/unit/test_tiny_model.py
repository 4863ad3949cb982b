"""The tiny random-weight llama model of ``paddler.testing.tiny_model``, run by llama.cpp.

Every test uses the small default model (a few hundred KB); one llama-cpp-python ``Llama``
is shared by the module.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import gguf
import jinja2
import llama_cpp
import pytest

from paddler.testing.tiny_model import (
    CHAT_TEMPLATE,
    DEFAULT_MODEL_FILENAME,
    default_model_path,
    tiny_llama_file_size,
    write_tiny_llama,
)

N_BYTE_TOKENS = 256
FIRST_BYTE_ID = 3  # after <unk>, <s>, </s>


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-model") / "tiny.gguf")


@pytest.fixture(scope="module")
def llm(model_path: Path) -> Iterator[llama_cpp.Llama]:
    # One thread: the model is too small to gain from more, and ggml's spinning worker threads
    # can stall a prompt for a second when the machine's cores are busy with other tests.
    model = llama_cpp.Llama(
        model_path=str(model_path), n_ctx=256, n_threads=1, n_threads_batch=1, verbose=False
    )
    yield model
    model.close()


def _token_texts(path: Path) -> list[str]:
    reader = gguf.GGUFReader(path)
    field = reader.fields[gguf.Keys.Tokenizer.LIST]
    return [str(field.contents(index)) for index in range(len(field.data))]


# --------------------------------------------------------------------------------------
# Loading and the tokenizer
# --------------------------------------------------------------------------------------


def test_llama_cpp_loads_the_model_with_its_vocabulary(
    llm: llama_cpp.Llama, model_path: Path
) -> None:
    texts = _token_texts(model_path)
    assert llm.n_vocab() == len(texts)
    assert 500 < llm.n_vocab() < 2000
    assert texts[:3] == ["<unk>", "<s>", "</s>"]
    assert texts[FIRST_BYTE_ID : FIRST_BYTE_ID + N_BYTE_TOKENS] == [
        f"<0x{byte:02X}>" for byte in range(N_BYTE_TOKENS)
    ]
    assert {"\u2581the", "\u2581a", "a"} <= set(texts)
    assert llm.n_embd() == 64
    assert llm.n_ctx() == 256
    assert llm.token_bos() == 1
    assert llm.token_eos() == 2
    assert llm.metadata["tokenizer.ggml.model"] == "llama"
    assert llm.metadata["general.architecture"] == "llama"


def test_common_words_are_single_pieces(llm: llama_cpp.Llama) -> None:
    # <s> "▁hello" "▁world": the bos is added and each word is one piece.
    tokens = llm.tokenize(b"hello world")
    assert len(tokens) == 3
    assert tokens[0] == llm.token_bos()
    assert all(token >= FIRST_BYTE_ID + N_BYTE_TOKENS for token in tokens[1:])


@pytest.mark.parametrize(
    "text",
    ["hello world", "héllo wörld ✓ 日本", "Tabs\tand\nnew lines, <|im_start|> {braces}!"],
)
def test_text_round_trips_through_tokenize_and_detokenize(llm: llama_cpp.Llama, text: str) -> None:
    tokens = llm.tokenize(text.encode("utf-8"))
    assert tokens[0] == llm.token_bos()
    assert llm.detokenize(tokens).decode("utf-8") == text


def test_characters_outside_the_vocabulary_fall_back_to_bytes(llm: llama_cpp.Llama) -> None:
    tokens = llm.tokenize("日本".encode(), add_bos=False)
    # "▁" then the six UTF-8 bytes of the two characters, each as its <0xNN> token.
    assert tokens[1:] == [FIRST_BYTE_ID + byte for byte in "日本".encode()]


def test_chat_markers_are_control_tokens_and_im_end_ends_generation(
    llm: llama_cpp.Llama,
) -> None:
    [im_start] = llm.tokenize(b"<|im_start|>", add_bos=False, special=True)
    [im_end] = llm.tokenize(b"<|im_end|>", add_bos=False, special=True)
    assert int(llm.metadata["tokenizer.ggml.eot_token_id"]) == im_end
    # Without special parsing the marker is plain text, not the control token.
    assert im_end not in llm.tokenize(b"<|im_end|>", add_bos=False, special=False)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    assert llama_cpp.llama_vocab_is_eog(vocab, im_end)
    assert llama_cpp.llama_vocab_is_eog(vocab, llm.token_eos())
    assert not llama_cpp.llama_vocab_is_eog(vocab, im_start)


# --------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------


def _greedy(llm: llama_cpp.Llama, prompt: str) -> tuple[str, int, str | None]:
    # Evaluate the prompt again instead of reusing the cached prefix of the previous run.
    llm.reset()  # type: ignore[no-untyped-call]
    completion = llm.create_completion(prompt, max_tokens=16, temperature=0)
    assert not isinstance(completion, Iterator)
    choice = completion["choices"][0]
    return choice["text"], completion["usage"]["completion_tokens"], choice["finish_reason"]


def test_greedy_generation_produces_16_tokens_deterministically(llm: llama_cpp.Llama) -> None:
    first = _greedy(llm, "Hello, the world")
    second = _greedy(llm, "Hello, the world")
    text, n_tokens, finish_reason = first
    # Greedy decoding never picks a special or byte token: the full 16 pieces, all text.
    assert n_tokens == 16
    assert finish_reason == "length"
    assert text.strip()
    assert second == first


def test_the_output_depends_on_the_prompt(llm: llama_cpp.Llama) -> None:
    assert _greedy(llm, "Hello, the world")[0] != _greedy(llm, "What is the answer")[0]


def test_chat_completion_renders_the_template(llm: llama_cpp.Llama) -> None:
    llm.reset()  # type: ignore[no-untyped-call]
    completion = llm.create_chat_completion(
        messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0
    )
    assert not isinstance(completion, Iterator)
    # <s> <|im_start|> "user" "\n" "hi" <|im_end|> "\n" <|im_start|> "assistant" "\n"
    assert completion["usage"]["prompt_tokens"] >= 10
    assert completion["usage"]["completion_tokens"] == 4


# --------------------------------------------------------------------------------------
# Metadata, bytes and the cache
# --------------------------------------------------------------------------------------


def test_the_chat_template_is_in_the_metadata(llm: llama_cpp.Llama) -> None:
    template = llm.metadata["tokenizer.chat_template"]
    assert template == CHAT_TEMPLATE
    rendered = (
        jinja2.Environment()
        .from_string(template)
        .render(
            messages=[
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "hi"},
            ],
            add_generation_prompt=True,
            bos_token="<s>",
        )
    )
    assert rendered == (
        "<s><|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_the_same_seed_writes_the_same_bytes(tmp_path: Path, model_path: Path) -> None:
    again = write_tiny_llama(tmp_path / "again.gguf")
    other_seed = write_tiny_llama(tmp_path / "other.gguf", seed=1)
    assert again.read_bytes() == model_path.read_bytes()
    assert other_seed.read_bytes() != model_path.read_bytes()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["again.gguf", "other.gguf"]


def test_the_size_is_known_without_writing(tmp_path: Path, model_path: Path) -> None:
    assert model_path.stat().st_size == tiny_llama_file_size()
    assert 100_000 < tiny_llama_file_size() < 4_000_000
    small = write_tiny_llama(
        tmp_path / "small.gguf", seed=3, n_embd=32, n_layer=1, n_head=2, n_head_kv=1, n_ff=48
    )
    assert small.stat().st_size == tiny_llama_file_size(
        seed=3, n_embd=32, n_layer=1, n_head=2, n_head_kv=1, n_ff=48
    )


def test_default_model_path_writes_once_and_rewrites_a_wrong_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model_path: Path
) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("PADDLER_CACHE_DIR", str(cache))

    path = default_model_path()
    assert path == cache / DEFAULT_MODEL_FILENAME
    assert path.read_bytes() == model_path.read_bytes()

    written = path.stat()
    assert default_model_path() == path
    assert path.stat().st_mtime_ns == written.st_mtime_ns
    assert path.stat().st_ino == written.st_ino

    path.write_bytes(b"GGUF, cut short")
    assert default_model_path() == path
    assert path.read_bytes() == model_path.read_bytes()
    assert [entry.name for entry in cache.iterdir()] == [DEFAULT_MODEL_FILENAME]


@pytest.mark.parametrize(
    "arguments",
    [
        {"n_embd": 60, "n_head": 8},  # not a multiple
        {"n_embd": 36, "n_head": 4},  # odd head size
        {"n_head": 4, "n_head_kv": 3},
        {"n_layer": 0},
        {"seed": -1},
        {"vocab": "bpe"},
    ],
)
def test_invalid_shapes_are_refused(tmp_path: Path, arguments: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        write_tiny_llama(tmp_path / "bad.gguf", **arguments)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []
