"""The LMDB instance bank: validated RGBA instances with provenance and verdicts."""
from genval_aug.bank.cache import DEFAULT_CACHE_MB, CachedInstanceBank
from genval_aug.bank.maintenance import export_folder, import_folder, merge, verify
from genval_aug.bank.record import Instance
from genval_aug.bank.sampling import BankSampler, category_weights, repeat_factors
from genval_aug.bank.store import BankWriter, InstanceBank

__all__ = [
    "BankSampler",
    "BankWriter",
    "CachedInstanceBank",
    "DEFAULT_CACHE_MB",
    "Instance",
    "InstanceBank",
    "category_weights",
    "export_folder",
    "import_folder",
    "merge",
    "repeat_factors",
    "verify",
]
