"""Graph rewrite passes. Each module is one pass; see `passes.base` for the contract."""
