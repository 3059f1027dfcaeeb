"""Ledger, rating, real-time credit control, CDRs and the balance display."""
