"""Runs over datasets of prompts: lens, attribution and activation rows written to Parquet shards, locally
or on Ray workers, resumable.
"""
