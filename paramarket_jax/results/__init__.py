"""Results: tables in, files out (Parquet, summary.json, figures, the HTML report).

Imports no engine and nothing of the market: it reads host arrays and tables only.
"""
