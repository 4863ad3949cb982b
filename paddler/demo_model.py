"""A tiny random-weight llama model that llama.cpp loads and runs for real.

No model weights can be downloaded in the test and benchmark environments, so this module
writes one: a GGUF file of the ``llama`` architecture with seeded random weights and a small
SentencePiece-style vocabulary, written with the ``gguf`` package. llama.cpp (through
llama-cpp-python) loads it, tokenizes, decodes and samples exactly as it would a real model;
only the text it produces is gibberish.

Public API:

* :func:`write_tiny_llama` writes such a file (atomically) and returns its path;
* :func:`default_model_path` writes the default model once into a cache directory
  (``$PADDLER_CACHE_DIR`` or ``~/.cache/paddler``) and returns its path;
* :func:`tiny_llama_file_size` is the exact size in bytes :func:`write_tiny_llama` writes
  for the same arguments, computed without writing;
* :data:`CHAT_TEMPLATE` is the chat template stored in the model.

The default model (64-wide, 2 layers) is a few hundred KB and loads in milliseconds. The
benchmark preset ``write_tiny_llama(path, n_embd=512, n_layer=6, n_head=8, n_head_kv=4,
n_ff=1376)`` has 18.4M parameters (37 MB).

Vocabulary (``vocab="spm"``, the only one so far). The ``tokenizer.ggml.model`` is ``"llama"``
(SentencePiece, as in Llama 1 and 2) and the ids are laid out as in Llama 2:

* ``0 <unk>`` (UNKNOWN), ``1 <s>`` (CONTROL, bos), ``2 </s>`` (CONTROL, eos);
* ``3 .. 258``: the 256 byte-fallback tokens ``<0x00>`` .. ``<0xFF>`` (BYTE), so any UTF-8
  text round-trips through tokenize and detokenize;
* 714 NORMAL pieces (975 tokens in all) with decreasing scores: common English words with ``"▁"``
  (U+2581) for a leading space and all their prefixes (llama.cpp's SentencePiece tokenizer only
  reaches a piece through merges of pieces that are themselves in the vocabulary), common
  subword pieces, and the printable ASCII characters;
* ``<|im_start|>`` and ``<|im_end|>`` (CONTROL), the markers of the ChatML-like
  :data:`CHAT_TEMPLATE`.

``tokenizer.ggml.add_bos_token`` is true and ``add_eos_token`` false. End of generation:
``</s>`` stays the eos token (the SentencePiece convention, and what an ``add_eos`` would
append) and ``<|im_end|>`` is declared the end-of-turn token (``tokenizer.ggml.eot_token_id``),
so llama.cpp counts both as end-of-generation tokens (``llama_vocab_is_eog``) and a chat reply
ends at ``<|im_end|>`` like a ChatML model's, while the plain-completion eos is unchanged.

Weights: every 2-D matrix is F16 and every norm weight F32 (``general.file_type`` is
``MOSTLY_F16``), which halves the weights against F32 and loads and runs on llama.cpp's CPU
backend like a converted F16 model. Matrices are drawn from N(0, 0.02²), each tensor from its own
``numpy.random.default_rng([seed, tensor_index])`` stream; norm weights are ones. Two
deliberate departures from plain noise make the model behave like a serving target:

* the ``output`` projection is scaled so that logits have a standard deviation of about
  :data:`LOGIT_STD` (a peaked distribution, like a trained model's, instead of a nearly
  uniform one);
* its rows for the special and byte-fallback tokens are zero, so those tokens get logit 0,
  the median of the others: greedy decoding always produces ordinary pieces (valid UTF-8) and
  never stops before ``max_tokens``; with ``top_k`` or ``min_p`` sampling they are practically
  never drawn either, and at temperature 1 without truncation they share about 0.6% of the
  probability mass per step. A test that needs an early stop can use ``logit_bias`` or a
  stop string.

Determinism: the same arguments give the same bytes (for the same numpy version; numpy's
``Generator`` streams have been stable in practice but are not promised across versions).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import gguf
import numpy as np
import numpy.typing as npt

__all__ = [
    "CHAT_TEMPLATE",
    "DEFAULT_MODEL_FILENAME",
    "LOGIT_STD",
    "cache_dir",
    "default_model_path",
    "tiny_llama_file_size",
    "write_tiny_llama",
]

DEFAULT_MODEL_FILENAME: Final = "tiny-llama-v1.gguf"
"""Name of the default model in the cache directory; bump the version when its bytes change."""

CACHE_DIR_ENV: Final = "PADDLER_CACHE_DIR"

CHAT_TEMPLATE: Final = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""ChatML-like: ``<s><|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n``."""

WEIGHT_STD: Final = 0.02
"""Standard deviation of every weight matrix but ``output``."""

LOGIT_STD: Final = 3.0
"""Approximate standard deviation of the logits of the ordinary tokens."""

RMS_NORM_EPS: Final = 1e-5
ROPE_FREQ_BASE: Final = 10000.0

SPACE: Final = "\u2581"
"""SentencePiece's stand-in for a space: ``"▁"``."""

UNK_ID: Final = 0
BOS_ID: Final = 1
EOS_ID: Final = 2
_FIRST_BYTE_ID: Final = 3
_IM_START: Final = "<|im_start|>"
_IM_END: Final = "<|im_end|>"

# Common English words; each enters the vocabulary as "▁word" together with all its
# prefixes (benchmarks build prompts from them: one token per word).
COMMON_WORDS: Final = """
the of and to in is you that it he was for on are as with his they at be this have from or
one had by word but not what all were we when your can said there use an each which she do how
their if will up other about out many then them these so some her would make like him into time
has look two more write go see number no way could people my than first water been call who its
now find long down day did get come made may part over new sound take only little work know
place year live me back give most very after thing our just name good sentence man think say
great where help through much before line right too mean old any same tell boy follow came want
show also around form three small set put end does another well large must big even such because
turn here why ask went men read need land different home us move try kind hand picture again
change off play spell air away animal house point page letter mother answer found study still
learn should world
"""
# ... and a few of this project's.
_WORDS: Final = (
    COMMON_WORDS
    + """hello model token test chat user assistant system question yes request
server agent slot stream reply message
I A The This It What How Hello We You
"""
)

# Pieces without a leading space, each with all its prefixes.
_SUBWORDS: Final = """
ing ed er es ly tion ment ness able al ous ive ful less est th he in an re on at en nd st or ar
ll ou it is ve se le co me de hi ri ro ic ne ea ra ce li ch be ma si om ur
"""

_SPECIAL_TOKEN_TYPES: Final = {
    "<unk>": gguf.TokenType.UNKNOWN,
    "<s>": gguf.TokenType.CONTROL,
    "</s>": gguf.TokenType.CONTROL,
}


@dataclass(frozen=True, slots=True)
class _Config:
    seed: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    context_length: int
    vocab: str

    def validate(self) -> None:
        for name in ("n_embd", "n_layer", "n_head", "n_head_kv", "n_ff", "context_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if (self.n_embd // self.n_head) % 2 != 0:
            raise ValueError(f"the head size n_embd/n_head ({self.head_dim}) must be even (RoPE)")
        if self.n_head % self.n_head_kv != 0:
            raise ValueError(
                f"n_head ({self.n_head}) must be a multiple of n_head_kv ({self.n_head_kv})"
            )
        if self.vocab != "spm":
            raise ValueError(
                f"vocab must be 'spm' (the only vocabulary so far), got {self.vocab!r}"
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


@dataclass(frozen=True, slots=True)
class _Token:
    text: str
    score: float
    type: gguf.TokenType


@dataclass(frozen=True, slots=True)
class _KeyValue:
    key: str
    value: Any
    type: gguf.GGUFValueType
    sub_type: gguf.GGUFValueType | None = None


@dataclass(frozen=True, slots=True)
class _TensorSpec:
    name: str
    shape: tuple[int, ...]
    """In numpy order: the reverse of ggml's ``ne``, so ``(rows, columns)`` is ``ne = {columns,
    rows}``. llama.cpp's ``{n_in, n_out}`` weights are numpy ``(n_out, n_in)`` matrices."""
    dtype: type[np.float16] | type[np.float32]
    std: float  # 0.0: all ones (norm weights)
    zero_rows: tuple[int, ...] = ()

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


def _with_prefixes(piece: str, min_length: int) -> list[str]:
    return [piece[:end] for end in range(min_length, len(piece) + 1)]


def _vocabulary() -> list[_Token]:
    """The ``spm`` vocabulary, in id order (the same for every model size)."""
    tokens = [_Token(text, 0.0, kind) for text, kind in _SPECIAL_TOKEN_TYPES.items()]
    tokens += [_Token(f"<0x{byte:02X}>", 0.0, gguf.TokenType.BYTE) for byte in range(256)]

    pieces: dict[str, None] = {SPACE: None}  # an ordered set
    for word in _WORDS.split():
        pieces.update(dict.fromkeys(_with_prefixes(SPACE + word, 2)))
    for subword in _SUBWORDS.split():
        pieces.update(dict.fromkeys(_with_prefixes(subword, 2)))
    pieces.update(dict.fromkeys(chr(code) for code in range(0x21, 0x7F)))
    tokens += [
        _Token(piece, -float(rank), gguf.TokenType.NORMAL) for rank, piece in enumerate(pieces)
    ]

    tokens += [_Token(marker, 0.0, gguf.TokenType.CONTROL) for marker in (_IM_START, _IM_END)]
    return tokens


def _metadata(config: _Config, vocabulary: Sequence[_Token]) -> list[_KeyValue]:
    """All key-values but ``general.architecture``, which ``GGUFWriter`` adds itself."""
    V = gguf.GGUFValueType
    arch = "llama"
    ids = {token.text: index for index, token in enumerate(vocabulary)}
    return [
        _KeyValue(gguf.Keys.General.TYPE, "model", V.STRING),
        _KeyValue(gguf.Keys.General.NAME, "paddler tiny llama", V.STRING),
        _KeyValue(
            gguf.Keys.General.DESCRIPTION,
            f"Random weights (seed {config.seed}) for tests, by paddler.demo_model",
            V.STRING,
        ),
        _KeyValue(gguf.Keys.General.FILE_TYPE, int(gguf.LlamaFileType.MOSTLY_F16), V.UINT32),
        _KeyValue(gguf.Keys.General.QUANTIZATION_VERSION, gguf.GGML_QUANT_VERSION, V.UINT32),
        _KeyValue(gguf.Keys.LLM.VOCAB_SIZE.format(arch=arch), len(vocabulary), V.UINT32),
        _KeyValue(gguf.Keys.LLM.CONTEXT_LENGTH.format(arch=arch), config.context_length, V.UINT32),
        _KeyValue(gguf.Keys.LLM.EMBEDDING_LENGTH.format(arch=arch), config.n_embd, V.UINT32),
        _KeyValue(gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch), config.n_layer, V.UINT32),
        _KeyValue(gguf.Keys.LLM.FEED_FORWARD_LENGTH.format(arch=arch), config.n_ff, V.UINT32),
        _KeyValue(gguf.Keys.Attention.HEAD_COUNT.format(arch=arch), config.n_head, V.UINT32),
        _KeyValue(gguf.Keys.Attention.HEAD_COUNT_KV.format(arch=arch), config.n_head_kv, V.UINT32),
        _KeyValue(gguf.Keys.Attention.LAYERNORM_RMS_EPS.format(arch=arch), RMS_NORM_EPS, V.FLOAT32),
        _KeyValue(gguf.Keys.Rope.DIMENSION_COUNT.format(arch=arch), config.head_dim, V.UINT32),
        _KeyValue(gguf.Keys.Rope.FREQ_BASE.format(arch=arch), ROPE_FREQ_BASE, V.FLOAT32),
        _KeyValue(gguf.Keys.Tokenizer.MODEL, "llama", V.STRING),
        _KeyValue(gguf.Keys.Tokenizer.LIST, [t.text for t in vocabulary], V.ARRAY, V.STRING),
        _KeyValue(gguf.Keys.Tokenizer.SCORES, [t.score for t in vocabulary], V.ARRAY, V.FLOAT32),
        _KeyValue(
            gguf.Keys.Tokenizer.TOKEN_TYPE, [int(t.type) for t in vocabulary], V.ARRAY, V.INT32
        ),
        _KeyValue(gguf.Keys.Tokenizer.UNK_ID, UNK_ID, V.UINT32),
        _KeyValue(gguf.Keys.Tokenizer.BOS_ID, BOS_ID, V.UINT32),
        _KeyValue(gguf.Keys.Tokenizer.EOS_ID, EOS_ID, V.UINT32),
        _KeyValue(gguf.Keys.Tokenizer.EOT_ID, ids[_IM_END], V.UINT32),
        _KeyValue(gguf.Keys.Tokenizer.ADD_BOS, True, V.BOOL),
        _KeyValue(gguf.Keys.Tokenizer.ADD_EOS, False, V.BOOL),
        _KeyValue(gguf.Keys.Tokenizer.ADD_PREFIX, True, V.BOOL),
        _KeyValue(gguf.Keys.Tokenizer.CHAT_TEMPLATE, CHAT_TEMPLATE, V.STRING),
    ]


def _tensor_specs(config: _Config, vocabulary: Sequence[_Token]) -> list[_TensorSpec]:
    n_vocab = len(vocabulary)
    n_embd, n_ff = config.n_embd, config.n_ff
    n_q = config.n_head * config.head_dim
    n_kv = config.n_head_kv * config.head_dim
    matrix, norm = np.float16, np.float32
    not_generated = tuple(
        index for index, token in enumerate(vocabulary) if token.type != gguf.TokenType.NORMAL
    )

    specs = [_TensorSpec("token_embd.weight", (n_vocab, n_embd), matrix, WEIGHT_STD)]
    for layer in range(config.n_layer):
        prefix = f"blk.{layer}."
        specs += [
            _TensorSpec(prefix + "attn_norm.weight", (n_embd,), norm, 0.0),
            _TensorSpec(prefix + "attn_q.weight", (n_q, n_embd), matrix, WEIGHT_STD),
            _TensorSpec(prefix + "attn_k.weight", (n_kv, n_embd), matrix, WEIGHT_STD),
            _TensorSpec(prefix + "attn_v.weight", (n_kv, n_embd), matrix, WEIGHT_STD),
            _TensorSpec(prefix + "attn_output.weight", (n_embd, n_q), matrix, WEIGHT_STD),
            _TensorSpec(prefix + "ffn_norm.weight", (n_embd,), norm, 0.0),
            _TensorSpec(prefix + "ffn_gate.weight", (n_ff, n_embd), matrix, WEIGHT_STD),
            _TensorSpec(prefix + "ffn_up.weight", (n_ff, n_embd), matrix, WEIGHT_STD),
            _TensorSpec(prefix + "ffn_down.weight", (n_embd, n_ff), matrix, WEIGHT_STD),
        ]
    # The final norm leaves about unit-variance components, so a row of standard deviation
    # LOGIT_STD / sqrt(n_embd) gives a logit of standard deviation about LOGIT_STD.
    output_std = LOGIT_STD / float(np.sqrt(n_embd))
    specs += [
        _TensorSpec("output_norm.weight", (n_embd,), norm, 0.0),
        _TensorSpec("output.weight", (n_vocab, n_embd), matrix, output_std, not_generated),
    ]
    return specs


def _tensor_data(spec: _TensorSpec, seed: int, index: int) -> npt.NDArray[Any]:
    if spec.std == 0.0:
        return np.ones(spec.shape, dtype=spec.dtype)
    rng = np.random.default_rng([seed, index])
    values = rng.standard_normal(spec.shape, dtype=np.float32)
    values *= np.float32(spec.std)
    if spec.zero_rows:
        values[list(spec.zero_rows)] = 0.0
    return values.astype(spec.dtype)


def _config(
    seed: int,
    n_embd: int,
    n_layer: int,
    n_head: int,
    n_head_kv: int,
    n_ff: int,
    context_length: int,
    vocab: str,
) -> _Config:
    config = _Config(seed, n_embd, n_layer, n_head, n_head_kv, n_ff, context_length, vocab)
    config.validate()
    return config


def write_tiny_llama(
    path: str | Path,
    *,
    seed: int = 0,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    context_length: int = 2048,
    vocab: str = "spm",
) -> Path:
    """Write a random-weight llama GGUF model to ``path`` and return ``path`` as a ``Path``.

    The file is written under a temporary name in the same directory, then renamed over
    ``path``, so readers (and concurrent writers) only ever see a complete file. The directory
    must exist. The same arguments give the same bytes. ``n_embd`` must be a multiple of
    ``n_head`` with an even quotient (the head size, which RoPE rotates in pairs) and
    ``n_head`` a multiple of ``n_head_kv`` (grouped-query attention). See the module docstring
    for the vocabulary and the weights.
    """
    config = _config(seed, n_embd, n_layer, n_head, n_head_kv, n_ff, context_length, vocab)
    target = Path(path)
    vocabulary = _vocabulary()
    metadata = _metadata(config, vocabulary)
    specs = _tensor_specs(config, vocabulary)

    fd, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    temp = Path(temp_name)
    try:
        writer = gguf.GGUFWriter(temp, arch="llama")
        try:
            for item in metadata:
                writer.add_key_value(item.key, item.value, item.type, item.sub_type)
            for spec in specs:
                writer.add_tensor_info(spec.name, spec.shape, np.dtype(spec.dtype), spec.nbytes)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            # One tensor at a time: the benchmark preset never holds all its weights in memory.
            for index, spec in enumerate(specs):
                writer.write_tensor_data(_tensor_data(spec, config.seed, index))
            writer.flush()
        finally:
            writer.close()
        os.chmod(temp, 0o644)  # mkstemp's 0o600 would make a shared cache file private
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return target


def tiny_llama_file_size(
    *,
    seed: int = 0,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    context_length: int = 2048,
    vocab: str = "spm",
) -> int:
    """The size in bytes of the file :func:`write_tiny_llama` writes for these arguments.

    Computed from the GGUF v3 layout (header, key-values, tensor infos, then the tensor data
    aligned to ``GGUF_DEFAULT_ALIGNMENT``) without generating any weights.
    """
    config = _config(seed, n_embd, n_layer, n_head, n_head_kv, n_ff, context_length, vocab)
    vocabulary = _vocabulary()
    metadata = [
        _KeyValue(gguf.Keys.General.ARCHITECTURE, "llama", gguf.GGUFValueType.STRING),
        *_metadata(config, vocabulary),
    ]
    specs = _tensor_specs(config, vocabulary)

    size = 4 + 4 + 8 + 8  # magic, version, tensor count, key-value count
    for item in metadata:
        size += _string_size(item.key) + 4 + _value_size(item.value, item.type, item.sub_type)
    for spec in specs:
        size += _string_size(spec.name) + 4 + 8 * len(spec.shape) + 4 + 8  # dims, type, offset
    size = _align(size)
    return size + sum(_align(spec.nbytes) for spec in specs)


def _align(size: int) -> int:
    alignment = gguf.GGUF_DEFAULT_ALIGNMENT
    return (size + alignment - 1) // alignment * alignment


def _string_size(text: str) -> int:
    return 8 + len(text.encode("utf-8"))


_SCALAR_SIZES: Final = {
    gguf.GGUFValueType.UINT8: 1,
    gguf.GGUFValueType.INT8: 1,
    gguf.GGUFValueType.BOOL: 1,
    gguf.GGUFValueType.UINT16: 2,
    gguf.GGUFValueType.INT16: 2,
    gguf.GGUFValueType.UINT32: 4,
    gguf.GGUFValueType.INT32: 4,
    gguf.GGUFValueType.FLOAT32: 4,
    gguf.GGUFValueType.UINT64: 8,
    gguf.GGUFValueType.INT64: 8,
    gguf.GGUFValueType.FLOAT64: 8,
}


def _value_size(
    value: Any, value_type: gguf.GGUFValueType, sub_type: gguf.GGUFValueType | None
) -> int:
    if value_type == gguf.GGUFValueType.STRING:
        return _string_size(value)
    if value_type == gguf.GGUFValueType.ARRAY:
        assert sub_type is not None
        return 4 + 8 + sum(_value_size(item, sub_type, None) for item in value)
    return _SCALAR_SIZES[value_type]


def cache_dir() -> Path:
    """``$PADDLER_CACHE_DIR`` if set and not empty, else ``~/.cache/paddler``."""
    configured = os.environ.get(CACHE_DIR_ENV, "")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "paddler"


def default_model_path() -> Path:
    """The default tiny model (``write_tiny_llama`` defaults), written once into :func:`cache_dir`.

    An existing ``tiny-llama-v1.gguf`` of the expected size is reused; otherwise (missing,
    or left by another version of this module) the model is written again. Concurrent
    processes may both write it: each writes a temporary file and renames it into place, and
    both write the same bytes, so any reader sees one complete file.
    """
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / DEFAULT_MODEL_FILENAME
    try:
        if path.stat().st_size == tiny_llama_file_size():
            return path
    except FileNotFoundError:
        pass
    return write_tiny_llama(path)
