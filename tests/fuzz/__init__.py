"""Property-based fuzzing of every RPC (docs/fuzzing.md)."""
