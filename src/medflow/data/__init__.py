"""Data stages: sources -> ingest (manifest + quarantine + pixels) -> validate -> split -> shards."""
