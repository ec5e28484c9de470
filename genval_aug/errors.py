"""Exceptions raised by genval_aug. Each message names the file, record or field at fault."""
from __future__ import annotations


class GenValAugError(Exception):
    """Base class of every genval_aug error."""


class BankError(GenValAugError):
    """The bank at a path is missing, unreadable or inconsistent."""


class BadRecordError(BankError):
    """A single bank record cannot be decoded or fails validation."""


class BadInstanceError(GenValAugError, ValueError):
    """An instance offered to the bank is not a usable RGBA image (wrong shape, empty alpha, ...)."""


class DatasetError(GenValAugError):
    """A dataset file (labels, annotations, images) is missing or malformed."""


class ConfigError(GenValAugError, ValueError):
    """A configuration value is invalid."""


class AgentError(GenValAugError):
    """An LLM/VLLM agent or its backend failed."""


class BackendError(AgentError):
    """A chat backend request failed (HTTP status, timeout, bad response body, model error)."""


class BackendUnavailableError(BackendError):
    """The backend could not answer *for now*: connection refused or reset, timeout, HTTP 408/409/425/429 or a
    5xx other than 501, after the backend's own retries; a local model out of (GPU) memory. Worth trying again
    later (the top-up worker does); any other :class:`BackendError` (HTTP 400/401/403/404, another local
    ``generate()`` error, an unusable response body) is permanent: the same request fails the same way."""


class BuildStageError(GenValAugError):
    """A bank-build stage (the source or the validator) failed on several batches in a row: the build stops
    instead of settling every unit of every class as failed."""


class AgentOutputError(AgentError):
    """An agent's model kept answering with output that does not parse (after retries)."""


class TargetsError(GenValAugError, ValueError):
    """Labels handed to a transform are inconsistent (lengths, shapes, coordinates); names the field."""
