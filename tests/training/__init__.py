"""Tests of lorakit.training, one file per module (a package, so that names like test_data.py cannot clash)."""
