"""Outputs: result tables and CSVs, TensorBoard records, plots and per-family frontiers."""
