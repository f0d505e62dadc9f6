"""Tests of lorakit.serve, one file per module (a package, so that their names cannot clash with other tests')."""
