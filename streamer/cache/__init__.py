"""Result cache for deterministic requests: key derivation, L1/L2/L3 levels, the tiered facade
and the hooks intake and egress call (docs/cache.md)."""
