"""Experiments: spec -> plan -> execute (local processes) -> store; results back as DataFrames."""

from fuselab.experiments.results import load_results

__all__ = ["load_results"]
