"""Dagster asset definitions: thin wrappers that read, call the core package, write and report."""

import warnings

import dagster as dg

# Backfill policies and partitioned checks are marked beta/preview; we use them knowingly.
warnings.filterwarnings("ignore", category=dg.BetaWarning)
warnings.filterwarnings("ignore", category=dg.PreviewWarning)
