"""Serving on Triton: repository builder and validator, python-backend runtime, server process."""
