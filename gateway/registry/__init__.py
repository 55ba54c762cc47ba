"""Session registries: `MemoryRegistry` (embedded, default) and `RedisRegistry` (REDIS_URL)."""

from gateway.registry.base import CallRecord, RegistryUnavailable, SessionRegistry, digest, new_secret
from gateway.registry.memory import MemoryRegistry

__all__ = [
    "CallRecord",
    "MemoryRegistry",
    "RegistryUnavailable",
    "SessionRegistry",
    "digest",
    "new_secret",
]
