"""The pure market: types, the trading step, the round and its placement on devices.

Imports kernels only: no Mesa, no files, no scenario.
"""
