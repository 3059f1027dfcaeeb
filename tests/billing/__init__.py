"""Tests of the billing package (ledger, rating, credit control) against a real PostgreSQL."""
