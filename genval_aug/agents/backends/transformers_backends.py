"""Local chat backends on Hugging Face transformers: a text LLM and a vision-language model.

Both take OpenAI-style messages, render them with the model's chat template, generate in batches
(left padding) and return only the newly generated text.
"""
from __future__ import annotations

import logging
from typing import Any

from genval_aug.agents.backends.base import (
    ChatReply,
    Message,
    decode_image_data_url,
    iter_parts,
    message_text,
)
from genval_aug.errors import BackendError, BackendUnavailableError, ConfigError

logger = logging.getLogger(__name__)

_GEN_KEYS = {"temperature", "top_p", "top_k", "max_tokens", "max_new_tokens", "seed", "repetition_penalty"}


def _torch_dtype(dtype: Any):
    import torch

    if dtype is None or dtype == "auto":
        return dtype
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
                "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}[str(dtype)]
    except KeyError:
        raise ConfigError(f"dtype must be one of float32/float16/bfloat16/auto, got {dtype!r}") from None


def _dtype_keyword(transformers_version: str) -> str:
    """``from_pretrained``'s dtype keyword: ``dtype`` since transformers 4.56, ``torch_dtype`` before (where
    ``dtype=`` would reach the model's ``__init__`` and fail)."""
    from packaging.version import Version

    return "dtype" if Version(transformers_version).release >= (4, 56) else "torch_dtype"


def _generate_error(model: str, what: str, error: Exception) -> BackendError:
    """The backend error for a failed local generation: running out of (GPU) memory is worth trying again later
    (a top-up worker shares the GPU with training, whose memory use varies): ``BackendUnavailableError``;
    anything else fails the same way every time: ``BackendError``."""
    import torch

    oom = isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()
    if oom:
        return BackendUnavailableError(f"{model}: out of memory in {what} ({error}); retried later by the top-up "
                                       "worker, or lower the batch size")
    return BackendError(f"{model}: {what} failed: {error}")


def _resolve_device(device: str | None) -> str:
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


class _GenerateMixin:
    """What both backends share: construction from a model object or the Hub, batching, generation options."""

    backend: str  # the "backend" entry of cache_identity()
    model: str
    max_new_tokens: int
    batch_size: int
    device: str

    def _init_model(self, model_obj, name: str | None, device: str | None, max_new_tokens: int,
                    batch_size: int) -> None:
        self.model_obj = model_obj
        self.model = name or getattr(model_obj, "name_or_path", "") or type(model_obj).__name__
        self.device = _resolve_device(device or str(getattr(model_obj, "device", "cpu")))
        self.max_new_tokens = int(max_new_tokens)
        self.batch_size = max(1, int(batch_size))

    @staticmethod
    def _pad_left(tokenizer) -> None:
        """Batched generation needs left padding and a pad token (the EOS token when the model has none)."""
        if getattr(tokenizer, "pad_token", None) is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"

    @classmethod
    def _from_hub(cls, model_id_or_path: str, auto_model: str, auto_processor: str, *, device: str | None,
                  dtype: Any, local_files_only: bool | None, trust_remote_code: bool, **kwargs: Any):
        """``cls(model, processor)`` loaded with ``transformers.<auto_model>`` / ``<auto_processor>``."""
        import transformers

        hub = {"trust_remote_code": trust_remote_code}
        if local_files_only is not None:
            hub["local_files_only"] = local_files_only
        proc = getattr(transformers, auto_processor).from_pretrained(model_id_or_path, **hub)
        hub[_dtype_keyword(transformers.__version__)] = _torch_dtype(dtype)
        try:  # safetensors only: without this transformers falls back to unpickling pytorch_model.bin
            model = getattr(transformers, auto_model).from_pretrained(model_id_or_path, use_safetensors=True, **hub)
        except OSError as e:
            raise ConfigError(f"{model_id_or_path}: cannot load {auto_model} weights (only .safetensors files are "
                              f"accepted, no pickle formats): {e}") from e
        return cls(model, proc, name=str(model_id_or_path), device=device, **kwargs)

    def cache_identity(self) -> dict[str, Any]:
        return {"backend": self.backend, "model": self.model, "max_new_tokens": self.max_new_tokens,
                "dtype": str(getattr(self.model_obj, "dtype", ""))}

    def _generation_kwargs(self, params: dict[str, Any], pad_token_id: int | None) -> dict[str, Any]:
        import torch

        unknown = set(params) - _GEN_KEYS
        if unknown:
            logger.debug("%s ignores parameters %s", type(self).__name__, sorted(unknown))
        kw: dict[str, Any] = {"max_new_tokens": int(params.get("max_new_tokens", params.get("max_tokens",
                                                                                          self.max_new_tokens)))}
        temp = float(params.get("temperature", 0.0) or 0.0)
        if temp > 0:
            kw.update(do_sample=True, temperature=temp)
            for k in ("top_p", "top_k"):
                if k in params:
                    kw[k] = params[k]
            if params.get("seed") is not None:
                torch.manual_seed(int(params["seed"]))
        else:
            kw["do_sample"] = False
        if "repetition_penalty" in params:
            kw["repetition_penalty"] = float(params["repetition_penalty"])
        if pad_token_id is not None:
            kw["pad_token_id"] = pad_token_id
        return kw

    def _replies(self, new, texts: list[str], kw: dict[str, Any], tokenizer) -> list[ChatReply]:
        """Replies with ``finish_reason``: ``"length"`` when a row used all ``max_new_tokens`` and its last token
        is no end-of-sequence (or pad) token, else ``"stop"``."""
        limit = int(kw["max_new_tokens"])
        ends: set[int] = set()
        for src in (getattr(self.model_obj, "generation_config", None), tokenizer):
            for attr in ("eos_token_id", "pad_token_id"):
                v = getattr(src, attr, None) if src is not None else None
                ends.update(int(x) for x in (v if isinstance(v, (list, tuple)) else [v]) if x is not None)
        out = []
        for row, text in zip(new.tolist(), texts, strict=True):
            cut = len(row) >= limit and bool(row) and row[-1] not in ends
            out.append(ChatReply(text.strip(), "length" if cut else "stop", limit))
        return out

    def chat(self, messages: list[Message], **params: Any) -> str:
        return self.chat_batch([messages], **params)[0]

    def chat_batch(self, batch: list[list[Message]], **params: Any) -> list[str]:
        out: list[str] = []
        for i in range(0, len(batch), self.batch_size):
            out.extend(self._generate(batch[i:i + self.batch_size], params))
        return out

    def _generate(self, batch: list[list[Message]], params: dict[str, Any]) -> list[str]:  # pragma: no cover
        raise NotImplementedError


class TransformersChatBackend(_GenerateMixin):
    """A causal LM (``AutoModelForCausalLM``) driven through its tokenizer's chat template."""

    backend = "transformers-chat"

    def __init__(self, model_obj, tokenizer, *, name: str | None = None, device: str | None = None,
                 max_new_tokens: int = 512, batch_size: int = 8):
        self.tokenizer = tokenizer
        self._init_model(model_obj, name, device, max_new_tokens, batch_size)
        self._pad_left(tokenizer)
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"tokenizer of {self.model!r} has no chat_template; set tokenizer.chat_template")
        self.model_obj.to(self.device).eval()

    def _accepts(self, name: str) -> bool:
        import inspect

        return name in inspect.signature(self.model_obj.forward).parameters

    @classmethod
    def from_pretrained(cls, model_id_or_path: str, *, device: str | None = None, dtype: Any = "auto",
                        local_files_only: bool | None = None, trust_remote_code: bool = False, **kwargs: Any):
        return cls._from_hub(model_id_or_path, "AutoModelForCausalLM", "AutoTokenizer", device=device, dtype=dtype,
                             local_files_only=local_files_only, trust_remote_code=trust_remote_code, **kwargs)

    def _generate(self, batch: list[list[Message]], params: dict[str, Any]) -> list[str]:
        import torch

        convs = [[{"role": m["role"], "content": message_text(m)} for m in msgs] for msgs in batch]
        texts = [self.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in convs]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        if "token_type_ids" in enc and not self._accepts("token_type_ids"):
            del enc["token_type_ids"]  # tokenizers may add them; transformers 4.x generate() rejects unused inputs
        kw = self._generation_kwargs(params, self.tokenizer.pad_token_id)
        try:
            with torch.inference_mode():
                ids = self.model_obj.generate(**enc, **kw)
        except Exception as e:  # noqa: BLE001 - surface as a backend error naming the model
            raise _generate_error(self.model, "generate()", e) from e
        new = ids[:, enc["input_ids"].shape[1]:]
        return self._replies(new, self.tokenizer.batch_decode(new, skip_special_tokens=True), kw, self.tokenizer)


class TransformersVisionBackend(_GenerateMixin):
    """A vision-language model (``AutoModelForImageTextToText`` + ``AutoProcessor``: Qwen2.5-VL, SmolVLM,
    LLaVA, ...). Images arrive as base64 data-URL parts and are decoded locally."""

    backend = "transformers-vision"

    def __init__(self, model_obj, processor, *, name: str | None = None, device: str | None = None,
                 max_new_tokens: int = 512, batch_size: int = 4):
        self.processor = processor
        self._init_model(model_obj, name, device, max_new_tokens, batch_size)
        tok = getattr(processor, "tokenizer", None)
        if tok is not None:
            self._pad_left(tok)
        self.model_obj.to(self.device).eval()

    @classmethod
    def from_pretrained(cls, model_id_or_path: str, *, device: str | None = None, dtype: Any = "auto",
                        local_files_only: bool | None = None, trust_remote_code: bool = False, **kwargs: Any):
        return cls._from_hub(model_id_or_path, "AutoModelForImageTextToText", "AutoProcessor", device=device,
                             dtype=dtype, local_files_only=local_files_only, trust_remote_code=trust_remote_code,
                             **kwargs)

    @staticmethod
    def _convert(messages: list[Message]):
        conv, images = [], []
        for m in messages:
            parts = []
            for p in iter_parts(m):
                if p["type"] == "text":
                    parts.append({"type": "text", "text": p["text"]})
                else:
                    url = p.get("image_url", {})
                    images.append(decode_image_data_url(url.get("url", "") if isinstance(url, dict) else str(url)))
                    parts.append({"type": "image"})
            conv.append({"role": m["role"], "content": parts})
        return conv, images

    def _generate(self, batch: list[list[Message]], params: dict[str, Any]) -> list[str]:
        import torch

        convs, images = [], []
        for msgs in batch:
            c, im = self._convert(msgs)
            convs.append(c)
            images.append(im)
        flat = [im for ims in images for im in ims]
        try:
            texts = [self.processor.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in convs]
            kwargs: dict[str, Any] = {"text": texts, "return_tensors": "pt", "padding": True}
            if flat:
                kwargs["images"] = flat
            enc = self.processor(**kwargs).to(self.device)
            tok = getattr(self.processor, "tokenizer", self.processor)
            kw = self._generation_kwargs(params, getattr(tok, "pad_token_id", None))
            with torch.inference_mode():
                ids = self.model_obj.generate(**enc, **kw)
        except Exception as e:  # noqa: BLE001
            raise _generate_error(self.model, "processing or generate()", e) from e
        new = ids[:, enc["input_ids"].shape[1]:]
        return self._replies(new, self.processor.batch_decode(new, skip_special_tokens=True), kw, tok)
